"""Score sources, memory budgets and the drivers that stream them through the core's kernels."""
