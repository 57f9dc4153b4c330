"""probe, normalise, evaluate and hubness on a dask.distributed cluster, with the local results to
the bit (docs/distributed.md): the session (session.py: connecting, running tasks, signals), the
workers' side (worker.py: reopening and caching inputs), the stages cut into tasks (tasks.py), and
the client's credentials (security.py)."""

from qbnorm_cli.streaming.cluster.security import load_security
from qbnorm_cli.streaming.cluster.session import Cluster, Session, connect, dask_logs_quiet, local_cluster
from qbnorm_cli.streaming.cluster.tasks import run_normalise, run_probe, score_rows
from qbnorm_cli.streaming.cluster.worker import numpy_blas

__all__ = ["Cluster", "Session", "connect", "dask_logs_quiet", "load_security", "local_cluster", "numpy_blas",
           "run_normalise", "run_probe", "score_rows"]
