"""The library's entry points: arrays (or files) in, arrays (or files) out; see docs/api.md."""

from qbnorm_cli.api.evaluation import evaluate, evaluation_report, hubness, hubness_report
from qbnorm_cli.api.files import build_bank, convert
from qbnorm_cli.api.normalising import Written, normalise
from qbnorm_cli.api.probing import probe
from qbnorm_cli.api.tuning import load_params, tune
from qbnorm_cli.streaming.cluster import Cluster

__all__ = ["Cluster", "Written", "build_bank", "convert", "evaluate", "evaluation_report", "hubness", "hubness_report",
           "load_params", "normalise", "probe", "tune"]
