"""The numerical core: pure numpy, arrays in and arrays out (statistics, normalisers, top-k, metrics, hubness)."""
