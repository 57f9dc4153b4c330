"""qbnorm: hubness measurement and querybank normalisation for cross-modal retrieval.

The library (docs/api.md): `probe` a gallery with a querybank once, `normalise` queries with the
probe's statistics (every method of `qbnorm_cli.methods`), `evaluate` and measure `hubness` of the
results, `tune` a method on validation data. Inputs are numpy arrays, memory maps, h5py datasets or
`PATH[::/dataset]` strings; the same streaming kernels as the `qbnorm` command run underneath,
under the same memory budget.
"""

from qbnorm_cli import startup  # noqa: F401  isort: skip  (first of all: Ctrl-C while the `qbnorm` program loads)

from qbnorm_cli.api import (
    Cluster,
    build_bank,
    convert,
    evaluate,
    export,
    hubness,
    hubs,
    load_params,
    normalise,
    probe,
    search,
    tune,
    update_probe,
)
from qbnorm_cli.core.results import Ranking
from qbnorm_cli.errors import DataError, QbnormError, QbnormWarning, RuntimeFailure, UsageError
from qbnorm_cli.io.probefile import Probe
from qbnorm_cli.methods import METHODS
from qbnorm_cli.version import FORMAT_VERSION, VERSION

__version__ = VERSION

__all__ = [
    "FORMAT_VERSION", "METHODS", "Cluster", "DataError", "Probe", "QbnormError", "QbnormWarning", "Ranking",
    "RuntimeFailure", "UsageError", "__version__", "build_bank", "convert", "evaluate", "export", "hubness",
    "hubs", "load_params", "normalise", "probe", "search", "tune",
    "update_probe",
]
