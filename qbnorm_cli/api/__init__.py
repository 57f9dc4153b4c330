"""The library's entry points: arrays (or files) in, arrays (or files) out; see docs/api.md."""

from qbnorm_cli.api.evaluation import evaluate, evaluation_report, hubness, hubness_report
from qbnorm_cli.api.files import build_bank, convert
from qbnorm_cli.api.hubs import hubs, hubs_report
from qbnorm_cli.api.normalising import Written, normalise
from qbnorm_cli.api.probing import probe
from qbnorm_cli.api.serving import Exported, SearchResult, export, search
from qbnorm_cli.api.tuning import tune
from qbnorm_cli.api.updating import update_probe
from qbnorm_cli.io.paramsfile import load_params
from qbnorm_cli.streaming.cluster import Cluster

__all__ = ["Cluster", "Exported", "SearchResult", "Written", "build_bank", "convert", "evaluate", "evaluation_report",
           "export", "hubness", "hubness_report", "hubs", "hubs_report", "load_params", "normalise", "probe", "search",
           "tune", "update_probe"]
