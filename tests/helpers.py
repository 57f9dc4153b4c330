"""Small helpers shared by the CLI tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qbnorm_cli.cli import main

DEXTER = Path(__file__).parent / "fixtures" / "dexter_cosine_triu.npz"


def run(capsys, *args) -> tuple[int, str, str]:
    """Run `qbnorm ARGS` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def leftovers(directory) -> list[str]:
    """Temporary output files left in `directory` (there must never be any)."""
    return sorted(p.name for p in Path(directory).glob(".*.qbnorm-tmp"))


def dexter_similarity() -> np.ndarray:
    """The 300 × 300 DEXTER cosine matrix (float32) from its stored upper triangle (see fixtures/)."""
    data = np.load(DEXTER)
    n = int(data["n"])
    sim = np.ones((n, n), dtype=np.float32)
    upper = np.triu_indices(n, k=1)
    sim[upper] = data["upper"]
    sim.T[upper] = data["upper"]
    return sim
