"""probe, normalise, evaluate and hubness on a dask.distributed cluster (streaming/cluster/):
outputs equal to the local run's byte for byte (every dataset; not uuids or timestamps), on a
LocalCluster of two worker processes, through `dask scheduler` and `dask worker` processes on
tcp://127.0.0.1, with a worker killed during the run; and the failures: no scheduler, a worker
that cannot read an input, Ctrl-C and SIGTERM on the client, the extra not installed.

The data are random float32 embeddings (no exact products): the float32 scores round as BLAS
rounds them, so equality holds only if the tasks compute exactly the local run's products and
sums. The cluster tests are marked slow (each starts processes or a cluster)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import distributed  # the qbnorm[dask] extra: `make setup` installs it, so CI runs these tests
import h5py
import numpy as np
import pytest
from helpers import KillWorker, KillWorkerOnce, RemoveFile, interruptible, leftovers, wait_for_file

import qbnorm_cli
from qbnorm_cli.cli import main
from qbnorm_cli.errors import install_hint
from qbnorm_cli.streaming.cluster import local_cluster

slow = pytest.mark.slow
D = 24
VOLATILE = ("uuid", "created_at", "command")  # attributes that differ between any two runs


def qbnorm(*args) -> list[str]:
    return [str(Path(sys.executable).with_name("qbnorm")), *map(str, args)]


def datasets(path) -> tuple[dict, dict]:
    """Every dataset (bytes, dtype, shape, attributes) and the root attributes but the volatile ones."""
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


def assert_same_files(a, b) -> None:
    (da, aa), (db, ab) = datasets(a), datasets(b)
    assert sorted(da) == sorted(db)
    for name in da:
        assert da[name] == db[name], f"{a} and {b} differ in /{name}"
    assert aa == ab, [k for k in set(aa) | set(ab) if aa.get(k) != ab.get(k)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("cluster")
    rng = np.random.default_rng(19)
    centres = rng.standard_normal((6, D))
    with h5py.File(work / "emb.h5", "w") as h5:
        for name, rows in (("bank", 1500), ("gallery", 1100), ("queries", 900), ("gallery_bank", 700)):
            near = centres[rng.integers(0, 6, rows)] + 0.9 * rng.standard_normal((rows, D))
            h5.create_dataset(name, data=near.astype(np.float32), chunks=(128, D))
        h5["gt"] = rng.integers(0, 1100, 900)
    with h5py.File(work / "emb.h5", "r") as h5:
        g = h5["gallery"][()]
        bank, queries = h5["bank"][()], h5["queries"][()]
    with h5py.File(work / "sims.h5", "w") as h5:
        h5["bank_sims"] = bank @ g.T
        h5["sims"] = queries @ g.T
        # stored the other way round (gallery × bank, gallery × queries), read with transpose=True;
        # chunked in tiles, so that a transposed read walks column blocks
        h5.create_dataset("bank_sims_t", data=np.ascontiguousarray(h5["bank_sims"][()].T), chunks=(256, 256))
        h5.create_dataset("sims_t", data=np.ascontiguousarray(h5["sims"][()].T), chunks=(256, 256))
    return work


@pytest.fixture(scope="module")
def client():
    """Two worker processes of one thread (qbnorm's threads: one each), as `--cluster local:2` starts."""
    cluster = local_cluster(2)
    with distributed.Client(cluster, set_as_default=False) as c:
        yield c
    cluster.close()


def emb(data, name: str) -> str:
    return f"{data}/emb.h5::/{name}"


# --- without a cluster, nothing changes -----------------------------------------------------------

def test_plain_commands_do_not_import_dask(tmp_path):
    """The local path pays nothing for the extra: dask and distributed are never imported."""
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "e.h5", "w") as h5:
        h5["g"] = rng.standard_normal((40, 8)).astype(np.float32)
        h5["q"] = rng.standard_normal((30, 8)).astype(np.float32)
    script = textwrap.dedent(f"""
        import sys
        from qbnorm_cli.cli import main
        d = {str(tmp_path)!r}
        assert main(["probe", "--bank", d + "/e.h5::/q", "--gallery", d + "/e.h5::/g", "-o", d + "/p.h5", "-q"]) == 0
        assert main(["normalise", "--queries", d + "/e.h5::/q", "--gallery", d + "/e.h5::/g", "--probe", d + "/p.h5",
                     "-o", d + "/n.h5", "-q", "--top-k", "5"]) == 0
        assert main(["hubness", d + "/n.h5", "-q", "--k", "5"]) == 0
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("dask", "distributed"))
        print(loaded)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_blas_check_reads_numpys_blas_only():
    """scipy.linalg loads a BLAS of its own, which computes none of qbnorm's products: loading it on
    the client must not make the client's kernels differ from a worker's (a false warning)."""
    script = textwrap.dedent("""
        from qbnorm_cli.streaming.cluster import numpy_blas
        before = numpy_blas()
        import scipy.linalg  # noqa: F401
        print(before == numpy_blas())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_the_blas_check_finds_numpys_blas_through_a_linked_environment(tmp_path, monkeypatch):
    """threadpoolctl reports resolved paths; numpy reached through a link (a virtual environment
    linked into a checkout) is still told apart from scipy's BLAS (it matched nothing, and every
    BLAS in the process was compared: 33 false warnings in a suite run from such a checkout)."""
    import threadpoolctl

    from qbnorm_cli.streaming.cluster import numpy_blas

    real = tmp_path / "real" / "site-packages"
    (real / "numpy").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.setattr(np, "__file__", str(tmp_path / "link" / "site-packages" / "numpy" / "__init__.py"))
    libraries = [
        {"user_api": "blas", "internal_api": "openblas", "version": "0.3.30", "architecture": "SkylakeX",
         "num_threads": 2, "filepath": str(real / "numpy.libs" / "libscipy_openblas64_.so")},
        {"user_api": "blas", "internal_api": "openblas", "version": "0.3.15", "architecture": "Prescott",
         "num_threads": 2, "filepath": str(real / "scipy.libs" / "libopenblas.so")},
    ]
    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: libraries)
    assert numpy_blas() == (2, "openblas 0.3.30 SkylakeX")


def test_a_missing_extra_is_one_line_naming_it(cli, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` fails as if not installed
    code, _, err = cli("probe", "--bank", emb(data, "bank"), "--gallery", emb(data, "gallery"), "-o",
                       tmp_path / "p.h5", "--cluster", "local:2")
    assert code == 1
    assert err == f"qbnorm: error: --cluster needs dask.distributed: {install_hint('dask')}\n"
    assert not (tmp_path / "p.h5").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(("address", "says"), [
    ("loacl", "--cluster 'loacl': expected local, local:N, tcp://HOST:PORT or an existing scheduler file"),
    ("local:0", "--cluster 'local:0': expected local:N with N ≥ 1 worker processes"),
])
def test_a_bad_address_is_a_usage_error(cli, data, tmp_path, address, says):
    code, _, err = cli("probe", "--bank", emb(data, "bank"), "--gallery", emb(data, "gallery"), "-o",
                       tmp_path / "p.h5", "--cluster", address)
    assert code == 2 and err == f"qbnorm: error: {says}\n"
    assert leftovers(tmp_path) == []


# --- the same outputs, byte for byte ---------------------------------------------------------------

PROBES = {
    "embeddings": {},
    "blocks": {"block_rows": 256},  # several gallery blocks per task, tiles of 256 bank rows
    "gallery bank, sorted": {"gallery_bank": "gallery_bank", "keep_sorted": True, "topk_means": [5, 64]},
    "precomputed": {"bank_sims": "sims"},
    "small memory": {"memory": "1MiB"},
    "sinkhorn, dual": {"gallery_bank": "gallery_bank", "sinkhorn": True, "sinkhorn_iters": 5},
    "transposed": {"bank_sims": "bank_sims_t", "transpose": True, "memory": "4MiB"},
}


def probe_args(data, case: dict) -> dict:
    kwargs = {"betas": [10, 20], "k": 2, **case}
    if kwargs.get("gallery_bank"):
        kwargs["gallery_bank"] = emb(data, kwargs["gallery_bank"])
    if kwargs.get("bank_sims"):
        kwargs["bank_sims"] = f"{data}/sims.h5::/{kwargs['bank_sims']}"
        return kwargs
    return {"bank": emb(data, "bank"), "gallery": emb(data, "gallery"), **kwargs}


@slow
@pytest.mark.parametrize("case", list(PROBES))
def test_probe(client, data, tmp_path, case):
    kwargs = probe_args(data, PROBES[case])
    here = qbnorm_cli.probe(**kwargs, output=tmp_path / "here.h5")
    there = qbnorm_cli.probe(**kwargs, output=tmp_path / "there.h5", cluster=client)
    # the local pass's blocks, grouped: precomputed scores held whole are one block, one task
    assert there.cluster["workers"] == 2 and there.cluster["tasks"] >= (1 if "bank_sims" in kwargs else 2)
    here.close(), there.close()
    assert_same_files(tmp_path / "here.h5", tmp_path / "there.h5")


@pytest.fixture(scope="module")
def probes(data, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("probes")
    out = {}
    for name, sims in (("embeddings", False), ("precomputed", True)):
        kwargs = probe_args(data, {"bank_sims": "bank_sims"} if sims else {
            "gallery_bank": "gallery_bank", "keep_sorted": True, "sinkhorn": True, "sinkhorn_iters": 5})
        qbnorm_cli.probe(**kwargs, output=work / f"{name}.h5").close()
        out[name] = work / f"{name}.h5"
    return out


NORMALISE = [  # method and its parameters, top_k, other options
    ({"method": "dis"}, None, {}),
    ({"method": "dis"}, 10, {}),
    ({"method": "dis"}, 10, {"block_rows": 200}),
    ({"method": "csls"}, 7, {"memory": "2MiB"}),
    ({"method": "dual-is", "gallery_beta": 1.0}, None, {"block_rows": 300}),
    ({"method": "gc"}, 5, {}),
    ({"method": "none"}, 3, {"sims": True}),
    ({"method": "nnn"}, None, {"sims": True, "dtype": "float32"}),
    ({"method": "dis", "min_count": 3}, 10, {}),
    ({"method": "sn"}, 10, {}),
    ({"method": "dbsn"}, None, {"block_rows": 300}),
    ({"method": "dn"}, 10, {}),
    ({"method": "dis"}, 10, {"sims": "transposed", "memory": "4MiB"}),
]


@slow
@pytest.mark.parametrize(("method", "top_k", "extra"), NORMALISE,
                         ids=[f"{m['method']}-{k}-{'-'.join(e)}" for m, k, e in NORMALISE])
def test_normalise(client, data, probes, tmp_path, method, top_k, extra):
    extra = dict(extra)
    sims = extra.pop("sims", False)
    if sims == "transposed":  # stored gallery × queries: QB-Norm on a dump of the other direction
        inputs, probe = {"sims": f"{data}/sims.h5::/sims_t", "transpose": True}, probes["precomputed"]
    elif sims:
        inputs, probe = {"sims": f"{data}/sims.h5::/sims"}, probes["precomputed"]
    else:
        inputs, probe = {"queries": emb(data, "queries"), "gallery": emb(data, "gallery")}, probes["embeddings"]
    kwargs = {**inputs, "probe": str(probe), **method, "top_k": top_k, **extra}
    qbnorm_cli.normalise(**kwargs, output=tmp_path / "here.h5")
    written = qbnorm_cli.normalise(**kwargs, output=tmp_path / "there.h5", cluster=client)
    assert written.cluster["tasks"] >= 1 and written.cluster["bytes_returned"] > 0
    assert_same_files(tmp_path / "here.h5", tmp_path / "there.h5")


@slow
def test_evaluate_and_hubness(client, data, probes, tmp_path):
    scores = []
    for top_k in (None, 10):
        path = tmp_path / f"scores{top_k}.h5"
        qbnorm_cli.normalise(emb(data, "queries"), emb(data, "gallery"), str(probes["embeddings"]), top_k=top_k,
                             output=path)
        scores.append(str(path))
    gt = emb(data, "gt")
    here = qbnorm_cli.api.evaluation_report(scores, gt, output=tmp_path / "e_here.h5", block_rows=100)
    there = qbnorm_cli.api.evaluation_report(scores, gt, output=tmp_path / "e_there.h5", block_rows=100, cluster=client)
    assert_same_files(tmp_path / "e_here.h5", tmp_path / "e_there.h5")
    assert here["inputs"] == there["inputs"] and there["cluster"]["tasks"] >= 4
    kinds = [*scores, str(probes["embeddings"])]
    qbnorm_cli.api.hubness_report(kinds, k=[1, 10], output=tmp_path / "h_here.h5")
    there = qbnorm_cli.api.hubness_report(kinds, k=[1, 10], output=tmp_path / "h_there.h5", cluster=client)
    assert_same_files(tmp_path / "h_here.h5", tmp_path / "h_there.h5")
    with h5py.File(f"{data}/sims.h5", "r") as h5:
        square = h5["sims"][:, :900]
    here = qbnorm_cli.hubness(square, k=5, exclude_self=True)
    there = qbnorm_cli.hubness(square, k=5, exclude_self=True, block_rows=64, cluster=client)
    assert here["by_k"] == there["by_k"]
    assert all(here["k_occurrence"][k].tobytes() == there["k_occurrence"][k].tobytes() for k in here["k_occurrence"])


EVALUATIONS = [  # (input, options): every pass of streaming.evaluation, along rows and along columns
    ("dense", {"direction": "t2v"}),
    ("dense", {"direction": "v2t"}),                       # column standings of the stored rows
    ("ranking", {"direction": "v2t"}),                     # column standings of top-N lists
    ("dense transposed", {"direction": "v2t", "transpose": True}),   # stored rows are the items
    ("dense transposed", {"direction": "t2v", "transpose": True}),   # columns are the captions
    ("ranking", {"direction": "t2v", "ties": "expected"}),
]


@slow
@pytest.mark.parametrize(("kind", "options"), EVALUATIONS,
                         ids=[f"{k}-{'-'.join(map(str, o.values()))}" for k, o in EVALUATIONS])
def test_evaluate_in_both_directions(client, data, probes, tmp_path, kind, options):
    gt = emb(data, "gt")
    if kind == "dense transposed":
        scores = f"{data}/sims.h5::/sims_t"
    else:
        scores = str(tmp_path / "scores.h5")
        qbnorm_cli.normalise(emb(data, "queries"), emb(data, "gallery"), str(probes["embeddings"]),
                             top_k=50 if kind == "ranking" else None, output=scores)
    mask = np.arange(900) % 7 != 3  # masked captions: v2t ranks them last
    common = {"query_mask": mask, "block_rows": 128, **options}
    here = qbnorm_cli.api.evaluation_report([scores], gt, output=tmp_path / "e_here.h5", **common)
    there = qbnorm_cli.api.evaluation_report([scores], gt, output=tmp_path / "e_there.h5", cluster=client, **common)
    assert here["inputs"] == there["inputs"] and there["cluster"]["tasks"] >= 1
    assert_same_files(tmp_path / "e_here.h5", tmp_path / "e_there.h5")


@slow
def test_hubness_of_a_transposed_dump(client, data):
    sims = f"{data}/sims.h5::/sims_t"
    here = qbnorm_cli.hubness(sims, k=[1, 10], transpose=True, block_rows=100)
    there = qbnorm_cli.hubness(sims, k=[1, 10], transpose=True, block_rows=100, cluster=client)
    assert here["by_k"] == there["by_k"]
    assert all(here["k_occurrence"][k].tobytes() == there["k_occurrence"][k].tobytes() for k in here["k_occurrence"])


@slow
def test_arrays_in_memory_go_to_the_workers(client, data):
    with h5py.File(f"{data}/emb.h5", "r") as h5:
        bank, gallery, queries = h5["bank"][()], h5["gallery"][()], h5["queries"][()]
    here = qbnorm_cli.probe(bank, gallery)
    there = qbnorm_cli.probe(bank, gallery, cluster=client)
    for name in here.datasets:
        assert np.asarray(here.datasets[name][()]).tobytes() == np.asarray(there.datasets[name][()]).tobytes()
    assert there.cluster["bytes_sent"] >= bank.nbytes + gallery.nbytes
    top_here = qbnorm_cli.normalise(queries, gallery, here, top_k=10)
    top_there = qbnorm_cli.normalise(queries, gallery, here, top_k=10, cluster=client)
    for a, b in ((top_here.indices, top_there.indices), (top_here.scores, top_there.scores),
                 (top_here.normalised, top_there.normalised)):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


# --- faults -----------------------------------------------------------------------------------------

@slow
def test_a_worker_killed_mid_run_changes_nothing(client, data, probes, tmp_path):
    """The second task kills its worker: the scheduler reruns what was lost, the outputs are the same."""
    for name, run in (
        ("probe", lambda out, cluster: qbnorm_cli.probe(**probe_args(data, PROBES["blocks"]), output=out,
                                                        cluster=cluster).close()),
        ("topk", lambda out, cluster: qbnorm_cli.normalise(emb(data, "queries"), emb(data, "gallery"),
                                                           str(probes["embeddings"]), top_k=10, block_rows=100,
                                                           output=out, cluster=cluster)),
        # short runs right after the kills above: their tasks were once left unrunnable for good
        ("evaluate", lambda out, cluster: qbnorm_cli.api.evaluation_report(
            [str(tmp_path / "topk_here.h5")], emb(data, "gt"), output=out, cluster=cluster)),
        ("hubness", lambda out, cluster: qbnorm_cli.api.hubness_report(
            [str(tmp_path / "topk_here.h5")], k=[10], output=out, cluster=cluster)),
    ):
        marker = tmp_path / f"{name}.killed"
        first = name in ("evaluate", "hubness")  # one task of a small file: kill the first
        run(tmp_path / f"{name}_here.h5", None)
        run(tmp_path / f"{name}_there.h5", qbnorm_cli.Cluster(client, before_task=KillWorkerOnce(
            str(marker), number=0 if first else 1)))
        assert marker.exists(), "no worker was killed"
        assert_same_files(tmp_path / f"{name}_here.h5", tmp_path / f"{name}_there.h5")
    client.wait_for_workers(2, timeout=60)


@slow
def test_a_worker_that_cannot_open_an_input(client, data, tmp_path):
    gallery = tmp_path / "gallery.h5"
    with h5py.File(f"{data}/emb.h5", "r") as src, h5py.File(gallery, "w") as dst:
        dst["g"] = src["gallery"][()]
    hidden = qbnorm_cli.Cluster(client, before_task=RemoveFile(str(gallery)))
    with pytest.raises(qbnorm_cli.RuntimeFailure) as caught:
        qbnorm_cli.probe(emb(data, "bank"), f"{gallery}::/g", output=tmp_path / "p.h5", cluster=hidden)
    message = str(caught.value)
    assert message.startswith(f"{gallery}: no such file (on the worker at tls://127.0.0.1:")  # local: TLS
    assert "cluster needs every input on storage all workers see, at the same path" in message
    assert "\n" not in message and not (tmp_path / "p.h5").exists() and leftovers(tmp_path) == []


@slow
def test_no_scheduler_there(data, tmp_path):
    """Nothing listens at the address: exit 1 within the connection timeout, one line naming it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(qbnorm_cli.RuntimeFailure, match=f"^cluster {address}: no scheduler reachable within 1 s"):
        qbnorm_cli.probe(emb(data, "bank"), emb(data, "gallery"), cluster=qbnorm_cli.Cluster(address, timeout=1))
    env = dict(os.environ, DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="1s")
    start = time.perf_counter()
    proc = subprocess.run(qbnorm("probe", "--bank", emb(data, "bank"), "--gallery", emb(data, "gallery"), "-o",
                                 tmp_path / "p.h5", "--cluster", address), capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(f"qbnorm: error: --cluster {address}: no scheduler reachable within 1 s (")
    assert proc.stderr.count("\n") == 1 and time.perf_counter() - start < 30
    assert not (tmp_path / "p.h5").exists() and leftovers(tmp_path) == []


def security_file(security, where: Path) -> Path:
    """A --cluster-security file of a Security's client credentials (a local cluster's: PEM text)."""
    names = {}
    for key in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
        (where / f"{key}.pem").write_text(getattr(security, key))
        names[key] = f"{key}.pem"
    (where / "security.json").write_text(json.dumps(names))
    return where / "security.json"


def queued(client) -> list[str]:
    """The keys of qbnorm's tasks (and their data) the scheduler holds."""
    return client.run_on_scheduler(lambda dask_scheduler: [str(k) for k in dask_scheduler.tasks
                                                           if str(k).startswith("qbnorm-")])


@slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_client_cancels_its_tasks(client, data, probes, tmp_path, signum):
    """Both workers are busy, so the client's tasks wait in the scheduler: an interrupt then ends
    the run (exit 130, no output, no temporary file) and takes its tasks off the cluster."""
    release = str(tmp_path / "release")
    busy = [client.submit(wait_for_file, release, key=f"busy-{i}-{signum}", pure=False) for i in range(2)]
    earlier = set(queued(client))
    out = tmp_path / "out.h5"
    with interruptible():
        proc = subprocess.Popen(qbnorm("normalise", "--queries", emb(data, "queries"), "--gallery",
                                       emb(data, "gallery"), "--probe", probes["embeddings"], "-o", out, "--top-k", 5,
                                       "--block-rows", 100, "--cluster", client.scheduler.address,
                                       "--cluster-security", security_file(client.security, tmp_path)),
                                stderr=subprocess.PIPE, text=True)

    def ours() -> list[str]:
        return [key for key in queued(client) if key not in earlier]

    try:
        end = time.monotonic() + 60
        while not ours() and time.monotonic() < end and proc.poll() is None:
            time.sleep(0.1)
        assert ours(), "the client submitted nothing"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        Path(release).touch()
        client.gather(busy)
    assert proc.returncode == 130, err
    assert err.endswith("qbnorm: interrupted; no output was written\n"), err
    assert not out.exists() and leftovers(tmp_path) == []
    end = time.monotonic() + 20
    while ours() and time.monotonic() < end:
        time.sleep(0.1)
    assert ours() == [], "tasks left on the cluster"


# --- the command line: local:2, and dask's own scheduler and workers over tcp ----------------------

def _pipeline(data, probe_file, work: Path, suffix: str, cluster: list[str], local: Path | None = None) -> dict:
    """probe, normalise (dis, dense and top-10), evaluate and hubness through the CLI (in this
    process: `main`, as the `qbnorm` program runs it): their --json documents."""
    steps = {
        "probe": ["probe", "--bank", emb(data, "bank"), "--gallery", emb(data, "gallery"), "--beta", 20, "--k", 1,
                  "-o", work / f"probe{suffix}.h5"],
        "dense": ["normalise", "--queries", emb(data, "queries"), "--gallery", emb(data, "gallery"), "--probe",
                  probe_file, "-o", work / f"dense{suffix}.h5"],
        "top": ["normalise", "--queries", emb(data, "queries"), "--gallery", emb(data, "gallery"), "--probe",
                probe_file, "-o", work / f"top{suffix}.h5", "--top-k", 10],
    }
    # evaluate and hubness read the local run's scores both times: their outputs record their inputs
    scores = [(local or work) / "dense_here.h5", (local or work) / "top_here.h5"]
    steps["evaluate"] = ["evaluate", *scores, "--gt", emb(data, "gt"), "-o", work / f"eval{suffix}.h5"]
    steps["hubness"] = ["hubness", *scores, "--k", 10, "-o", work / f"hub{suffix}.h5"]
    docs = {}
    for name, args in steps.items():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in (*args, "--json", "-q", *cluster)])
        assert code == 0, err.getvalue()
        docs[name] = json.loads(out.getvalue())
    return docs


@pytest.fixture(scope="module")
def local_run(data, probes, tmp_path_factory) -> tuple[Path, dict]:
    """The pipeline run here, once: what every cluster run is compared with."""
    work = tmp_path_factory.mktemp("local_run")
    return work, _pipeline(data, probes["embeddings"], work, "_here", [])


def _compare_pipelines(data, probes, local_run, tmp_path, cluster: list[str]) -> dict:
    work, here = local_run
    there = _pipeline(data, probes["embeddings"], tmp_path, "_there", cluster, local=work)
    for name in ("probe", "dense", "top", "eval", "hub"):
        assert_same_files(work / f"{name}_here.h5", tmp_path / f"{name}_there.h5")
    for name, doc in there.items():
        stats = doc["cluster"]
        assert stats["workers"] == 2 and stats["tasks"] >= 1, name
        assert stats["bytes_returned"] > 0 and stats["bytes_read"] > 0, name
        assert "cluster" not in here[name]
    assert here["evaluate"]["inputs"] == there["evaluate"]["inputs"]
    assert here["hubness"]["inputs"] == there["hubness"]["inputs"]
    assert leftovers(tmp_path) == []
    return there


@slow
def test_the_cli_on_local_2(data, probes, local_run, tmp_path):
    there = _compare_pipelines(data, probes, local_run, tmp_path, ["--cluster", "local:2"])
    assert {doc["cluster"]["address"] for doc in there.values()} == {"local:2"}


@pytest.fixture
def dask_processes(tmp_path):
    """`dask scheduler` and two `dask worker` processes on 127.0.0.1 (ports chosen by the system)."""
    bin_dir = Path(sys.executable).parent
    scheduler_file = tmp_path / "scheduler.json"
    tests = str(Path(__file__).parent)  # the hooks (helpers.py) unpickle there too
    env = dict(os.environ, QBNORM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p))
    procs = [subprocess.Popen([bin_dir / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", scheduler_file], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env)]
    try:
        end = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < end:
            time.sleep(0.1)
        time.sleep(0.2)  # written whole
        address = json.loads(scheduler_file.read_text())["address"]
        for _ in range(2):
            procs.append(subprocess.Popen([bin_dir / "dask", "worker", address, "--nthreads", "1", "--no-dashboard",
                                           "--host", "127.0.0.1", "--no-nanny"], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, env=env))
        with distributed.Client(address, timeout=30, set_as_default=False) as c:
            c.wait_for_workers(2, timeout=60)
        yield address, scheduler_file
    finally:
        for proc in procs:  # test processes: nothing of theirs needs a clean end
            proc.kill()
            proc.wait(timeout=20)


@slow
def test_dask_scheduler_and_workers_over_tcp(data, probes, local_run, tmp_path, dask_processes):
    address, scheduler_file = dask_processes
    assert address.startswith("tcp://127.0.0.1:")
    there = _compare_pipelines(data, probes, local_run, tmp_path, ["--cluster", address])
    assert {doc["cluster"]["address"] for doc in there.values()} == {address}
    proc = subprocess.run(qbnorm("probe", "--bank", emb(data, "bank"), "--gallery", emb(data, "gallery"), "-o",
                                 tmp_path / "probe_file.h5", "--beta", 20, "--k", 1, "-q", "--cluster", scheduler_file),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert_same_files(local_run[0] / "probe_here.h5", tmp_path / "probe_file.h5")


@slow
def test_a_cluster_left_without_workers_ends_the_run(data, tmp_path, dask_processes):
    """Every task kills its worker, and nothing restarts them: the client does not wait forever."""
    address, _ = dask_processes
    doomed = qbnorm_cli.Cluster(address, timeout=2, before_task=KillWorker())
    with pytest.raises(qbnorm_cli.RuntimeFailure, match=f"^cluster {address}: the cluster has had no worker for 2 s"):
        qbnorm_cli.probe(emb(data, "bank"), emb(data, "gallery"), output=tmp_path / "p.h5", cluster=doomed)
    assert not (tmp_path / "p.h5").exists() and leftovers(tmp_path) == []
    with distributed.Client(address, timeout=30, set_as_default=False) as c:  # the scheduler as it was
        assert c.run_on_scheduler(no_workers_timeout) is None


def no_workers_timeout(dask_scheduler):
    return dask_scheduler.no_workers_timeout


@pytest.fixture
def no_workers(request):
    """A scheduler in this process without any worker (its distributed.scheduler.no-workers-timeout:
    the test's parameter, or dask's default, none)."""
    import dask.config

    with dask.config.set({"distributed.scheduler.no-workers-timeout": getattr(request, "param", None)}):
        cluster = distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=None)
    with distributed.Client(cluster, set_as_default=False) as c:
        yield c
    cluster.close()


def small_arrays():
    rng = np.random.default_rng(5)
    return rng.standard_normal((60, D)).astype(np.float32), rng.standard_normal((50, D)).astype(np.float32)


@slow
def test_a_cluster_without_workers_fails_by_the_schedulers_no_workers_timeout(no_workers):
    """dask's default waits for a worker for good: for the run, the session sets the scheduler's
    no-workers-timeout to the connect timeout, which fails the tasks; the run ends with one line,
    and the scheduler gets its own setting back."""
    start = time.monotonic()
    address = no_workers.scheduler.address
    with pytest.raises(qbnorm_cli.RuntimeFailure,
                       match=f"^cluster {address}: the cluster has had no worker for 1 s; probe tasks cannot run$"):
        qbnorm_cli.probe(*small_arrays(), cluster=qbnorm_cli.Cluster(no_workers, timeout=1))
    assert time.monotonic() - start < 20
    assert no_workers.run_on_scheduler(no_workers_timeout) is None


@slow
@pytest.mark.parametrize("no_workers", ["1500ms"], indirect=True)
def test_a_schedulers_own_no_workers_timeout_is_kept(no_workers):
    """A scheduler configured with a no-workers-timeout of its own: that one decides, and stays."""
    with pytest.raises(qbnorm_cli.RuntimeFailure, match=r"the cluster has had no worker for 1\.5 s; probe tasks"):
        qbnorm_cli.probe(*small_arrays(), cluster=qbnorm_cli.Cluster(no_workers, timeout=60))
    assert no_workers.run_on_scheduler(no_workers_timeout) == 1.5


@slow
def test_an_interrupt_ends_the_wait_for_tasks(no_workers):
    """The client waits for its tasks in distributed's as_completed: a signal's exception comes
    through that wait at once, the tasks are taken off the cluster and the scheduler's setting is
    given back."""
    import threading

    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    start = time.monotonic()
    timer.start()
    try:
        with interruptible(), pytest.raises(KeyboardInterrupt):
            qbnorm_cli.probe(*small_arrays(), cluster=qbnorm_cli.Cluster(no_workers, timeout=120))
    finally:
        timer.cancel()
    assert time.monotonic() - start < 20
    assert no_workers.run_on_scheduler(no_workers_timeout) is None
    end = time.monotonic() + 20
    while queued(no_workers) and time.monotonic() < end:
        time.sleep(0.1)
    assert queued(no_workers) == [], "tasks left on the cluster"


@slow
def test_progress_on_a_terminal_follows_the_tasks(data, probes, tmp_path):
    """On a terminal the bar of the local run is fed by completed tasks."""
    from test_progress import qbnorm as on_terminal

    code, _, err = on_terminal(tmp_path, "normalise", "--queries", emb(data, "queries"), "--gallery",
                               emb(data, "gallery"), "--probe", probes["embeddings"], "-o", tmp_path / "n.h5",
                               "--top-k", 5, "--block-rows", 100, "--cluster", "local:2", stderr_tty=True)
    assert code == 0, err
    assert "normalise" in err and "rows/s" in err, err


# --- who may use the cluster (issue 24, item 17) ----------------------------------------------------

STRANGER = textwrap.dedent("""
    import json, os, sys
    import distributed

    address = sys.argv[1]
    attempts = {"tcp": (address.replace("tls://", "tcp://"), None), "tls without a certificate": (address, None),
                "tls with a certificate of its own": (address, distributed.Security.temporary())}
    ran = {}
    for name, (where, security) in attempts.items():
        try:
            client = distributed.Client(where, timeout=3, set_as_default=False, security=security)
            ran[name] = client.submit(os.getpid).result(timeout=5)  # code run in the cluster's worker
        except Exception as exc:
            ran[name] = type(exc).__name__
    print(json.dumps(ran))
    os._exit(0)  # a half-made client must not wait at exit
""")


@slow
def test_a_local_cluster_refuses_clients_without_its_certificate():
    """`--cluster local:N` speaks TLS with a certificate made for the run: another local process
    (another user) cannot connect to its scheduler and run code in qbnorm's workers, whether it
    speaks plain TCP, TLS without a certificate, or TLS with a certificate of its own; a client
    with the run's certificate can (so the refusals are the certificate's doing)."""
    cluster = local_cluster(1)
    try:
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")
        proc = subprocess.run([sys.executable, "-c", STRANGER, address], capture_output=True, text=True, timeout=120)
        ran = json.loads(proc.stdout)
        assert all(isinstance(outcome, str) for outcome in ran.values()), ran  # an exception's name: refused
        with distributed.Client(address, timeout=30, set_as_default=False, security=cluster.security) as friend:
            assert friend.submit(os.getpid).result(timeout=60) > 0
    finally:
        cluster.close()


def security_files(where: Path) -> tuple[dict[str, Path], distributed.Security]:
    """A temporary certificate written as a scheduler, its workers and a client take it."""
    made = distributed.Security.temporary()
    files = {}
    for name in ("tls_ca_file", "tls_scheduler_cert", "tls_scheduler_key", "tls_client_cert", "tls_client_key"):
        files[name] = where / f"{name}.pem"
        files[name].write_text(getattr(made, name))
    return files, made


def test_a_bad_security_file_is_one_line(cli, data, tmp_path):
    files, _ = security_files(tmp_path)
    args = ["probe", "--bank", emb(data, "bank"), "--gallery", emb(data, "gallery"), "-o", tmp_path / "p.h5"]
    cases = {
        "unknown key": ("tls_ca_file: a.pem\ntls_cert: b.pem\n", 3, "unknown key 'tls_cert'"),
        "no CA": (f"tls_client_cert: {files['tls_client_cert'].name}\n", 3, "tls_ca_file missing"),
        "a missing file": ("tls_ca_file: nowhere.pem\ntls_client_cert: nowhere.pem\n", 3, "nowhere.pem"),
        "not a mapping": ("[1, 2]\n", 3, "expected a mapping"),
        "not YAML": ("tls_ca_file: [\n", 3, "not a YAML or JSON security file"),
    }
    for name, (text, code, says) in cases.items():
        (tmp_path / "security.yaml").write_text(text)
        got, _, err = cli(*args, "--cluster", "tcp://127.0.0.1:9", "--cluster-security", tmp_path / "security.yaml")
        assert got == code and says in err and err.count("\n") == 1, (name, err)
    got, _, err = cli(*args, "--cluster-security", tmp_path / "security.yaml")
    assert got == 2 and "give --cluster too" in err
    got, _, err = cli(*args, "--cluster", "local:2", "--cluster-security", tmp_path / "security.yaml")
    assert got == 2 and "makes its own" in err
    assert not (tmp_path / "p.h5").exists() and leftovers(tmp_path) == []


@slow
def test_a_tls_scheduler_takes_the_cluster_security_file(data, probes, local_run, tmp_path):
    """`dask scheduler --protocol tls` with a CA: qbnorm connects with --cluster-security (its
    results those of the local run), and without it is told in one line what it needs."""
    files, _ = security_files(tmp_path)
    bin_dir = Path(sys.executable).parent
    scheduler_file = tmp_path / "scheduler.json"
    tls = ["--tls-ca-file", files["tls_ca_file"], "--tls-cert", files["tls_scheduler_cert"], "--tls-key",
           files["tls_scheduler_key"]]
    env = dict(os.environ, QBNORM_THREADS="1")
    procs = [subprocess.Popen([bin_dir / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--protocol",
                               "tls", "--no-dashboard", "--scheduler-file", scheduler_file, *tls],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    try:
        end = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < end:
            time.sleep(0.1)
        time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tls://")
        procs.append(subprocess.Popen([bin_dir / "dask", "worker", address, "--nthreads", "1", "--no-dashboard",
                                       "--host", "127.0.0.1", "--no-nanny", *tls], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, env=env))
        security = tmp_path / "security.json"
        security.write_text(json.dumps({"tls_ca_file": files["tls_ca_file"].name,
                                        "tls_client_cert": files["tls_client_cert"].name,
                                        "tls_client_key": files["tls_client_key"].name}))
        args = ("probe", "--bank", emb(data, "bank"), "--gallery", emb(data, "gallery"), "--beta", 20, "--k", 1, "-q")
        proc = subprocess.run(qbnorm(*args, "-o", tmp_path / "p.h5", "--cluster", address, "--cluster-security",
                                     security), capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr
        assert_same_files(local_run[0] / "probe_here.h5", tmp_path / "p.h5")
        quick = dict(os.environ, DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="3s")
        proc = subprocess.run(qbnorm(*args, "-o", tmp_path / "q.h5", "--cluster", address), capture_output=True,
                              text=True, timeout=180, env=quick)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "needs --cluster-security" in proc.stderr and not (tmp_path / "q.h5").exists()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=20)


# --- stderr is qbnorm's, whatever dask logs (issue 24, item 16) --------------------------------------

def test_dask_logs_are_kept_off_stderr_during_a_session_and_restored_after(capfd, monkeypatch):
    """distributed logs "Batched Comm Closed" with a traceback (INFO, from distributed.batched) when
    a comm closes under a write: a cluster closed at an interrupt did so on the client's stderr
    (LocalCluster restores its own `silence_logs` level as it closes, before its comms are done)."""
    import logging
    import sys

    from qbnorm_cli.streaming.cluster import dask_logs_quiet

    monkeypatch.delenv("QBNORM_DEBUG", raising=False)
    root = logging.getLogger("distributed")
    dask_handler = logging.StreamHandler(sys.stderr)  # what dask installs at import in a plain process
    root.addHandler(dask_handler)
    monkeypatch.setattr(root, "level", logging.INFO)
    monkeypatch.setattr(root, "propagate", False)
    batched = logging.getLogger("distributed.batched")
    try:
        try:
            raise distributed.comm.CommClosedError("in <TLS (closed) Scheduler connection>")
        except distributed.comm.CommClosedError:
            with dask_logs_quiet():
                batched.info("Batched Comm Closed %r", "comm", exc_info=True)
                logging.getLogger("distributed.nanny").error("Failed to start process", exc_info=True)
            assert capfd.readouterr().err == ""
            batched.warning("after the session")
        assert "after the session" in capfd.readouterr().err  # restored
        root.propagate = True  # an application's handlers on the root logger (none here): no last resort
        with dask_logs_quiet():
            root.removeHandler(dask_handler)
            logging.getLogger("distributed.nanny").error("Failed to start process")
            root.addHandler(dask_handler)
        assert capfd.readouterr().err == ""
        monkeypatch.setenv("QBNORM_DEBUG", "1")
        with dask_logs_quiet():
            batched.warning("shown when debugging")
        assert "shown when debugging" in capfd.readouterr().err
    finally:
        root.removeHandler(dask_handler)


@slow
def test_signals_near_the_end_of_a_local_run_leave_one_line(data, probes, tmp_path):
    """SIGTERM and SIGINT at seeded moments around the end of a `--cluster local:2` run (bounded:
    at most six runs, a minute after the first): each ends with exit 130 and qbnorm's one line (no output), or exit 0
    with the output and nothing on stderr; never dask's tracebacks."""
    out = tmp_path / "n.h5"
    args = qbnorm("normalise", "--queries", emb(data, "queries"), "--gallery", emb(data, "gallery"), "--probe",
                  probes["embeddings"], "--top-k", 5, "--block-rows", 100, "--cluster", "local:2", "-q", "--force",
                  "-o", out)
    start = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    whole = time.monotonic() - start
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    rng = np.random.default_rng(16)
    seen = set()
    end = time.monotonic() + 60
    for number in range(6):
        if time.monotonic() > end and number >= 2:
            break
        signum = (signal.SIGTERM, signal.SIGINT)[number % 2]
        out.unlink(missing_ok=True)
        with interruptible():
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(whole * rng.uniform(0.6, 1.1))
        proc.send_signal(signum)
        stdout, err = proc.communicate(timeout=120)
        seen.add(proc.returncode)
        if proc.returncode == 0:
            assert err == "" and stdout == "" and out.exists(), err
        elif err == f"qbnorm: interrupted; {out} was written, nothing else\n":  # a signal at the commit point
            assert proc.returncode == 130 and out.exists()
        else:
            assert proc.returncode == 130 and err == "qbnorm: interrupted; no output was written\n", err
            assert not out.exists()
        assert leftovers(tmp_path) == []
    assert 130 in seen  # the signals did land during runs


@slow
def test_a_signal_while_the_client_connects_closes_it(data, probes, tmp_path, monkeypatch, capsys):
    """A signal while the client of `--cluster local:2` connects to it (its start is held, as the
    cluster's is): exit 130, one line, and the client closed before its cluster. One left half
    started ran on the stopped cluster's event loop: its close at exit waited a minute, then
    printed dask's `Client.__del__` traceback."""
    clients = []
    start = distributed.Client._start

    async def signalled(self, *args, **kwargs):
        clients.append(self)
        os.kill(os.getpid(), signal.SIGTERM)
        return await start(self, *args, **kwargs)

    monkeypatch.setattr(distributed.Client, "_start", signalled)
    out = tmp_path / "n.h5"
    capsys.readouterr()
    code = main(["normalise", "--queries", emb(data, "queries"), "--gallery", emb(data, "gallery"), "--probe",
                 probes["embeddings"], "--top-k", 5, "--cluster", "local:2", "-q", "-o", str(out)])
    assert (code, capsys.readouterr().err) == (130, "qbnorm: interrupted; no output was written\n")
    assert [client.status for client in clients] == ["closed"]
    assert not out.exists() and leftovers(tmp_path) == []
