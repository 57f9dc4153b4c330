"""The done check of issue 19: the pipeline on a dask cluster gives the local run's outputs.

    python -m benchmarks.cluster_check [DATA.h5] [--workdir DIR] [--keep]

On DATA (default ../shared/data/multi30k-de2en-e5.h5: queries, gallery, gt, train_queries) it runs
build-bank (every train query), then probe (β 20, k 1), normalise (dis, dense and top-10),
evaluate and hubness (k 10):

  local     the `qbnorm` commands as they are, the reference
  local:2   the same commands with --cluster local:2
  killed    the same calls through the library on a LocalCluster of two workers, whose second task
            of each run kills its worker process (the scheduler reruns what was lost)
  tcp       the commands with --cluster tcp://127.0.0.1:PORT, against `dask scheduler` and two
            `dask worker` processes started here

and compares every output with the local one: each dataset byte for byte (values, dtype, shape,
attributes) and the root attributes but uuid, created_at and command. normalise, evaluate and
hubness read the local probe and scores in every mode, so their outputs record the same inputs.
Exits 1 when anything differs. Takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "multi30k-de2en-e5.h5"
QBNORM = [sys.executable, "-m", "qbnorm_cli"]
VOLATILE = ("uuid", "created_at", "command")
STEPS = ("probe", "dis", "top10", "evaluate", "hubness")


@dataclass(frozen=True)
class KillWorkerOnce:
    """qbnorm_cli.Cluster(before_task=…): the second task kills its worker process, once per marker."""

    marker: str

    def __call__(self, kind: str, number: int) -> None:
        if number != 1:
            return
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)


def fingerprint(path: Path) -> tuple[dict, dict]:
    found = {}
    with h5py.File(path, "r") as h5:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                value = obj[()]
                found[name] = (value.dtype.str, value.shape, value.tobytes(),
                               {k: np.asarray(v).tobytes() for k, v in obj.attrs.items()})
        h5.visititems(visit)
        attrs = {k: np.asarray(v).tobytes() for k, v in h5.attrs.items() if k not in VOLATILE}
        if "attribute_checksums" in h5.attrs:  # those of the volatile attributes differ too
            checksums = json.loads(h5.attrs["attribute_checksums"])
            attrs["attribute_checksums"] = {k: v for k, v in checksums.items() if k.rsplit(":", 1)[-1] not in VOLATILE}
    return found, attrs


def differences(a: Path, b: Path) -> list[str]:
    (da, aa), (db, ab) = fingerprint(a), fingerprint(b)
    out = [f"/{n}" for n in sorted(set(da) | set(db)) if da.get(n) != db.get(n)]
    return out + [f"@{k}" for k in sorted(set(aa) | set(ab)) if aa.get(k) != ab.get(k)]


def qbnorm(*args) -> float:
    start = time.perf_counter()
    proc = subprocess.run([*QBNORM, *map(str, args), "-q"], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"qbnorm {' '.join(map(str, args))} exited {proc.returncode}: {proc.stderr.strip()}")
    return time.perf_counter() - start


def cli_steps(data: str, work: Path, mode: str, cluster: list[str]) -> dict[str, float]:
    """The five steps through the `qbnorm` program; normalise and the rest read the local probe and scores."""
    times = {
        "probe": qbnorm("probe", "--bank", work / "bank.h5", "--gallery", f"{data}::/gallery", "--beta", 20, "--k", 1,
                        "-o", work / f"probe_{mode}.h5", *cluster),
    }
    common = ["--queries", f"{data}::/queries", "--gallery", f"{data}::/gallery", "--probe", work / "probe_local.h5",
              "--method", "dis"]
    times["dis"] = qbnorm("normalise", *common, "-o", work / f"dis_{mode}.h5", *cluster)
    times["top10"] = qbnorm("normalise", *common, "--top-k", 10, "-o", work / f"top10_{mode}.h5", *cluster)
    scores = [work / "dis_local.h5", work / "top10_local.h5"]
    times["evaluate"] = qbnorm("evaluate", *scores, "--gt", f"{data}::/gt", "-o", work / f"evaluate_{mode}.h5",
                               *cluster)
    times["hubness"] = qbnorm("hubness", *scores, "--k", 10, "-o", work / f"hubness_{mode}.h5", *cluster)
    return times


def library_steps(data: str, work: Path, mode: str, clusters: dict) -> dict[str, float]:
    """The five steps through the library, each on its cluster (clusters[step]), with the
    arguments the commands pass (so the outputs record the same parameters)."""
    from qbnorm_cli import api
    from qbnorm_cli.io.probefile import Probe

    times = {}
    start = time.perf_counter()
    api.probe(str(work / "bank.h5"), f"{data}::/gallery", betas=[20.0], k=1, gallery_betas=[1.0], memory="1GiB",
              output=str(work / f"probe_{mode}.h5"), cluster=clusters["probe"]).close()
    times["probe"] = time.perf_counter() - start
    for name, top_k in (("dis", None), ("top10", 10)):
        start = time.perf_counter()
        with Probe.load(work / "probe_local.h5") as probe:
            api.normalise(f"{data}::/queries", f"{data}::/gallery", probe, method="dis", top_k=top_k,
                          dtype="float32", memory="1GiB", output=str(work / f"{name}_{mode}.h5"),
                          extra_params={"params_file": None}, cluster=clusters[name])
        times[name] = time.perf_counter() - start
    scores = [str(work / "dis_local.h5"), str(work / "top10_local.h5")]
    start = time.perf_counter()
    api.evaluation_report(scores, f"{data}::/gt", memory="1GiB", output=str(work / f"evaluate_{mode}.h5"),
                          described={"gt": f"{data}::/gt", "query_mask": None}, cluster=clusters["evaluate"])
    times["evaluate"] = time.perf_counter() - start
    start = time.perf_counter()
    api.hubness_report(scores, k=[10], memory="1GiB", output=str(work / f"hubness_{mode}.h5"),
                       cluster=clusters["hubness"])
    times["hubness"] = time.perf_counter() - start
    return times


def dask_cluster(work: Path) -> tuple[str, list[subprocess.Popen]]:
    """`dask scheduler` and two `dask worker` processes on 127.0.0.1, ports chosen by the system."""
    bin_dir = Path(sys.executable).parent
    scheduler_file = work / "scheduler.json"
    env = dict(os.environ, QBNORM_THREADS="1")
    procs = [subprocess.Popen([bin_dir / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", scheduler_file],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    end = time.monotonic() + 60
    while not scheduler_file.exists() and time.monotonic() < end:
        time.sleep(0.1)
    time.sleep(0.2)
    address = json.loads(scheduler_file.read_text())["address"]
    for _ in range(2):
        procs.append(subprocess.Popen([bin_dir / "dask", "worker", address, "--nthreads", "1", "--no-dashboard",
                                       "--host", "127.0.0.1"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, env=env))
    import distributed

    with distributed.Client(address, timeout=60, set_as_default=False) as client:
        client.wait_for_workers(2, timeout=120)
    return address, procs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster_check", description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(DATA), help="HDF5 with queries, gallery, gt, train_queries")
    parser.add_argument("--workdir", help="where the outputs go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the outputs")
    args = parser.parse_args(argv)
    data = os.path.abspath(args.data)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qbnorm-cluster-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"cluster check on {data}, {os.cpu_count()} cores, outputs in {work}", flush=True)
    procs: list[subprocess.Popen] = []
    times: dict[str, dict[str, float]] = {}
    failed = False
    try:
        qbnorm("build-bank", f"{data}::/train_queries", "-o", work / "bank.h5", "--strategy", "all", "--force")
        times["local"] = cli_steps(data, work, "local", [])
        times["local:2"] = cli_steps(data, work, "local2", ["--cluster", "local:2"])
        import distributed

        import qbnorm_cli
        from qbnorm_cli.streaming.cluster import local_cluster

        local = local_cluster(2)  # as --cluster local:2 starts it
        with distributed.Client(local, set_as_default=False) as client:
            markers = work / "killed"
            markers.mkdir(exist_ok=True)
            # one kill per step: the second task of each run
            killed = {step: qbnorm_cli.Cluster(client, before_task=KillWorkerOnce(str(markers / step)))
                      for step in STEPS}
            times["killed"] = library_steps(data, work, "killed", killed)
            client.wait_for_workers(2, timeout=120)
        local.close()
        address, procs = dask_cluster(work)
        times["tcp"] = cli_steps(data, work, "tcp", ["--cluster", address])
        print(f"\n{'step':10s}" + "".join(f"{mode:>22s}" for mode in ("local:2", "killed", "tcp")))
        for step in STEPS:
            cells = []
            for suffix in ("local2", "killed", "tcp"):
                diff = differences(work / f"{step}_local.h5", work / f"{step}_{suffix}.h5")
                failed |= bool(diff)
                cells.append("identical" if not diff else "DIFFERENT " + ",".join(diff)[:30])
            print(f"{step:10s}" + "".join(f"{c:>22s}" for c in cells))
        print(f"\nworkers killed: {sorted(p.name for p in markers.iterdir())}")
        print("seconds per step (whole command or call):")
        for mode, row in times.items():
            print(f"  {mode:8s} " + "  ".join(f"{step} {row[step]:.2f}" for step in STEPS))
        missing = [s for s in STEPS if not (markers / s).exists()]
        if missing:
            print(f"no worker was killed during {', '.join(missing)}")
            failed = True
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print("cluster check: " + ("FAILED" if failed else "every output identical to the local run's"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
