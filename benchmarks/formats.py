"""Issue 27: the README pipeline on inputs in every format qbnorm reads in place, and the peak
memory of reading each. Standalone:

    python -m benchmarks.formats figures [--data PATH] [--keep DIR]
    python -m benchmarks.formats memory [--rows 1000000 --dim 512 --memory 256MiB] [--keep DIR]

`figures`: the shared Multi30k embeddings (queries, gallery, train_queries) written into Parquet
(list<float> and fixed_size_list<float>), an Arrow IPC file, a 4-shard .npy folder per dataset in
clip-retrieval's layout (embeddings/text_emb/text_emb_N.npy, metadata/metadata_N.parquet),
safetensors, a PyTorch .pt dict of tensors (written by `write_pt`, torch's zip format, without
torch) and the Parquet files served by a local HTTP server on 127.0.0.1 (byte ranges) read through
fsspec. Each runs build-bank (all train_queries) → probe (β 20, k 1) → normalise (dis) →
evaluate, with no convert; every R@1 must be the HDF5 run's, 32.36.

`memory`: `normalise --method dis --top-k 10` of 100 queries against a rows × dim gallery in each
format, under --memory; the peak resident memory of each process (os.wait4), .npy first as the
baseline: reading a format streams when its peak stays near the .npy run's.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "multi30k-de2en-e5.h5"  # as api_check.py
DATASETS = ("queries", "gallery", "train_queries")
SHARDS = 4
EXPECTED_R1 = 32.36


# --- writers -----------------------------------------------------------------------------------

def _pickle_int(n: int) -> bytes:
    import pickle
    return pickle.dumps(int(n), protocol=2)[2:-1]  # the opcode that pushes n


def _pickle_str(s: str) -> bytes:
    data = s.encode()
    return b"X" + len(data).to_bytes(4, "little") + data  # BINUNICODE


def _pickle_tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK … TUPLE


def write_pt(path: str | Path, tensors: dict[str, np.ndarray], root: str | None = None) -> None:
    """A dict of float32/float16/int64 arrays as torch.save writes it (zip format: data.pkl, whose
    tensors rebuild from storages data/N, stored uncompressed), without torch."""
    storage = {np.dtype("<f4"): "FloatStorage", np.dtype("<f2"): "HalfStorage", np.dtype("<i8"): "LongStorage",
               np.dtype("<f8"): "DoubleStorage"}
    root = root or Path(path).stem
    body = [b"\x80\x02}("]  # PROTO 2, EMPTY_DICT, MARK
    for i, (name, array) in enumerate(tensors.items()):
        array = np.ascontiguousarray(array)
        strides = [s // array.itemsize for s in array.strides]
        pid = _pickle_tuple([_pickle_str("storage"), f"ctorch\n{storage[array.dtype]}\n".encode(),
                             _pickle_str(str(i)), _pickle_str("cpu"), _pickle_int(array.size)]) + b"Q"
        args = _pickle_tuple([pid, _pickle_int(0), _pickle_tuple([_pickle_int(n) for n in array.shape]),
                              _pickle_tuple([_pickle_int(s) for s in strides]), b"\x89",
                              b"ccollections\nOrderedDict\n)R"])
        body.append(_pickle_str(name) + b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R")
    body.append(b"u.")  # SETITEMS, STOP
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{root}/data.pkl", b"".join(body))
        archive.writestr(f"{root}/byteorder", "little")
        for i, array in enumerate(tensors.values()):
            archive.writestr(f"{root}/data/{i}", np.ascontiguousarray(array).tobytes())
        archive.writestr(f"{root}/version", "3\n")


def list_table(array: np.ndarray, fixed: bool):
    import pyarrow as pa

    values = pa.array(np.ascontiguousarray(array, dtype=np.float32).ravel())
    column = pa.FixedSizeListArray.from_arrays(values, array.shape[1]) if fixed else \
        pa.ListArray.from_arrays(pa.array(np.arange(0, array.size + 1, array.shape[1], dtype=np.int32)), values)
    return pa.table({"id": np.arange(array.shape[0]), "embedding": column})


def write_parquet(path, array: np.ndarray, fixed: bool, row_group_size: int = 2048) -> None:
    import pyarrow.parquet as pq

    pq.write_table(list_table(array, fixed), path, row_group_size=row_group_size)


def write_arrow(path, array: np.ndarray, batch: int = 2048) -> None:
    import pyarrow.feather as feather

    feather.write_feather(list_table(array, True), path, chunksize=batch, compression="uncompressed")


def write_shards(folder: Path, array: np.ndarray, shards: int = SHARDS) -> Path:
    """clip-retrieval's layout: FOLDER/embeddings/text_emb/text_emb_N.npy, FOLDER/metadata/metadata_N.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb, meta = folder / "embeddings" / "text_emb", folder / "metadata"
    emb.mkdir(parents=True, exist_ok=True)
    meta.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, array.shape[0], shards + 1).astype(int)
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        np.save(emb / f"text_emb_{i}.npy", array[a:b])
        pq.write_table(pa.table({"caption": [f"row {r}" for r in range(a, b)]}), meta / f"metadata_{i}.parquet")
    return emb


def write_all(data: Path, out: Path) -> dict[str, dict[str, str]]:
    """{format: {dataset: spec}} of the Multi30k arrays written in every format."""
    from safetensors.numpy import save_file

    with h5py.File(data, "r") as h5:
        arrays = {name: h5[name][()].astype(np.float32) for name in DATASETS}
    specs: dict[str, dict[str, str]] = {}
    for fmt, fixed in (("parquet-list", False), ("parquet-fixed", True)):
        specs[fmt] = {}
        for name, array in arrays.items():
            write_parquet(out / f"{name}.{fmt}.parquet", array, fixed)
            specs[fmt][name] = f"{out}/{name}.{fmt}.parquet::embedding"
    specs["arrow"] = {}
    for name, array in arrays.items():
        write_arrow(out / f"{name}.arrow", array)
        specs["arrow"][name] = f"{out}/{name}.arrow::embedding"
    specs["npy-shards"] = {name: str(write_shards(out / f"clip-{name}", array)) for name, array in arrays.items()}
    save_file(arrays, str(out / "multi30k.safetensors"))
    specs["safetensors"] = {name: f"{out}/multi30k.safetensors::{name}" for name in arrays}
    write_pt(out / "multi30k.pt", arrays)
    specs["pt"] = {name: f"{out}/multi30k.pt::{name}" for name in arrays}
    return specs


# --- a local HTTP server answering byte ranges ---------------------------------------------------

class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Files with single byte ranges (RFC 7233), as object stores serve them."""

    def log_message(self, *args):
        pass

    def send_head(self):
        path = self.translate_path(self.path)
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if os.path.isdir(path) or not match or not os.path.isfile(path):
            self.remaining = None
            return super().send_head()
        size = os.path.getsize(path)
        start, end = int(match.group(1)), min(int(match.group(2) or size - 1), size - 1)
        fh = open(path, "rb")  # closed by the handler once copied
        fh.seek(start)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.remaining = end - start + 1
        return fh

    def copyfile(self, source, outputfile):
        try:
            if self.remaining is None:
                super().copyfile(source, outputfile)
            else:
                outputfile.write(source.read(self.remaining))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client had what it wanted


class served:
    """A folder served on 127.0.0.1 for the time of a `with` (a thread; stops itself on exit)."""

    def __init__(self, folder: Path):
        handler = functools.partial(RangeHandler, directory=str(folder))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


# --- running qbnorm ----------------------------------------------------------------------------

def qbnorm(*args, env=None) -> str:
    """Run a qbnorm command; its stdout."""
    proc = subprocess.run([sys.executable, "-m", "qbnorm_cli", *map(str, args)], capture_output=True, env=env,
                          check=False)
    if proc.returncode:
        raise SystemExit(f"qbnorm {' '.join(map(str, args))} failed: {proc.stderr.decode().strip()}")
    return proc.stdout.decode()


# A fresh, small process starts each measured command: Linux carries a parent's peak resident
# size over into a forked child's ru_maxrss, so a command forked from this (large) process would
# report at least this process's peak. The launcher also samples the command's anonymous resident
# memory (RssAnon: what it allocated, not the file pages its memory maps hold, which the kernel
# reclaims at will) every 10 ms.
LAUNCHER = """
import os, subprocess, sys, time
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
anon = 0
while True:
    pid, status, usage = os.wait4(p.pid, os.WNOHANG)
    if pid:
        break
    try:
        with open(f"/proc/{p.pid}/status") as fh:
            anon = max([anon] + [int(line.split()[1]) for line in fh if line.startswith("RssAnon:")])
    except OSError:
        pass
    time.sleep(0.01)
print(usage.ru_maxrss if status == 0 else -1, anon)
"""


def peak_of(*args, env=None) -> tuple[int, int]:
    """(peak resident KiB, peak anonymous resident KiB) of one qbnorm command, that process alone."""
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-m", "qbnorm_cli", *map(str, args)],
                          capture_output=True, text=True, env=env, check=False)
    peak, anon = (int(v) for v in (proc.stdout.split() or ["-1", "-1"]))
    if peak < 0:
        raise SystemExit(f"qbnorm {' '.join(map(str, args))} failed: {proc.stderr.strip()}")
    return peak, anon


def pipeline(spec: dict[str, str], gt: str, work: Path, env=None) -> float:
    """README pipeline, bank = all train_queries; the DIS R@1."""

    work.mkdir(parents=True, exist_ok=True)
    bank, probe, dis = work / "bank.h5", work / "probe.h5", work / "dis.h5"
    qbnorm("build-bank", spec["train_queries"], "-o", bank, "--strategy", "all", "--force", "-q", env=env)
    qbnorm("probe", "--bank", bank, "--gallery", spec["gallery"], "-o", probe, "--beta", 20, "--k", 1, "--force",
           "-q", env=env)
    qbnorm("normalise", "--queries", spec["queries"], "--gallery", spec["gallery"], "--probe", probe, "-o", dis,
           "--method", "dis", "--force", "-q", env=env)
    out = qbnorm("evaluate", dis, "--gt", gt, "--json", env=env)
    return float(json.loads(out)["inputs"][0]["metrics"]["R@1"])


def figures(args) -> None:
    data = Path(args.data).resolve()
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qbnorm-formats-"))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "QBNORM_CACHE_DIR": str(out / "cache")}
    try:
        specs = {"hdf5": {name: f"{data}::/{name}" for name in DATASETS}, **write_all(data, out)}
        gt = f"{data}::/gt"
        rows = []
        with served(out) as server:
            specs["parquet-http"] = {name: f"{server.url}/{name}.parquet-list.parquet::embedding" for name in DATASETS}
            for fmt, spec in specs.items():
                r1 = pipeline(spec, gt, out / f"run-{fmt}", env)
                rows.append((fmt, r1))
                print(f"{fmt:14s} R@1 {r1:6.2f}  ({spec['gallery']})", flush=True)
        bad = [fmt for fmt, r1 in rows if abs(r1 - EXPECTED_R1) > 0.005]
        print("every format gives R@1 32.36" if not bad else f"DIFFERENT R@1: {bad}")
        if bad:
            raise SystemExit(1)
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


def memory(args) -> None:
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qbnorm-formats-mem-"))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "QBNORM_CACHE_DIR": str(out / "cache")}
    try:
        recorded = out / "inputs.json"
        specs = json.loads(recorded.read_text()) if recorded.exists() else write_memory_inputs(out, args, env)
        recorded.write_text(json.dumps(specs))
        probe = out / "probe.h5"
        print(f"normalise --method dis --top-k 10: 100 queries × {args.rows} × {args.dim} gallery, "
              f"--memory {args.memory}; peak RSS and peak anonymous RSS (MiB; memory maps' file pages are in "
              "the first only), wall time (one run each, on a shared machine)")
        base = None
        with served(out) as server:
            specs["parquet over http"] = f"{server.url}/gallery.parquet::embedding"
            for fmt, spec in specs.items():
                began = time.perf_counter()
                kib, anon = peak_of("normalise", "--queries", out / "queries.npy", "--gallery", spec, "--probe", probe,
                              "-o", out / "dis.h5", "--method", "dis", "--top-k", 10, "--memory", args.memory,
                              "--force", "-q", env=env)
                base = base or kib
                print(f"{fmt:18s} RSS {kib / 1024:6.0f} ({kib / base:4.2f}× the .npy run)   "
                      f"anonymous {anon / 1024:6.0f}   {time.perf_counter() - began:5.0f} s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


def write_memory_inputs(out: Path, args, env) -> dict[str, str]:
    """The gallery in every format, the queries, a bank and its probe (`memory`'s inputs)."""
    rng = np.random.default_rng(0)
    gallery = out / "gallery.npy"
    mm = np.lib.format.open_memmap(gallery, mode="w+", dtype=np.float32, shape=(args.rows, args.dim))
    for a in range(0, args.rows, 65536):
        b = min(args.rows, a + 65536)
        mm[a:b] = rng.standard_normal((b - a, args.dim), dtype=np.float32)
    mm.flush()
    np.save(out / "queries.npy", rng.standard_normal((100, args.dim), dtype=np.float32))
    np.save(out / "bank.npy", rng.standard_normal((1000, args.dim), dtype=np.float32))
    specs = {"npy": str(gallery)}
    import pyarrow as pa
    import pyarrow.parquet as pq

    def parquet(path, source, fixed):
        writer = None
        for block in iter_blocks(source, args.write_rows):
            table = list_table(block, fixed)
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table, row_group_size=args.row_group)
        writer.close()

    parquet(out / "gallery.parquet", mm, fixed=False)
    specs["parquet (list)"] = f"{out}/gallery.parquet::embedding"
    parquet(out / "gallery-fixed.parquet", mm, fixed=True)
    specs["parquet (fixed)"] = f"{out}/gallery-fixed.parquet::embedding"
    with pa.OSFile(str(out / "gallery.arrow"), "wb") as sink:
        writer = None
        for block in iter_blocks(mm, args.row_group):
            table = list_table(block, True)
            writer = writer or pa.ipc.new_file(sink, table.schema)
            writer.write_table(table)
        writer.close()
    specs["arrow"] = f"{out}/gallery.arrow::embedding"
    shards = out / "shards"
    shards.mkdir(exist_ok=True)
    bounds = np.linspace(0, args.rows, SHARDS + 1).astype(int)
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        np.save(shards / f"emb_{i}.npy", mm[a:b])
    specs["npy shards"] = str(shards)
    from safetensors.numpy import save_file

    save_file({"gallery": np.asarray(mm)}, str(out / "gallery.safetensors"))
    specs["safetensors"] = f"{out}/gallery.safetensors::gallery"
    write_pt(out / "gallery.pt", {"gallery": np.asarray(mm)})
    specs["pt"] = f"{out}/gallery.pt::gallery"
    del mm
    qbnorm("build-bank", out / "bank.npy", "-o", out / "bank.h5", "--strategy", "all", "--force", "-q", env=env)
    qbnorm("probe", "--bank", out / "bank.h5", "--gallery", gallery, "-o", out / "probe.h5", "--beta", 20,
           "--k", 1, "--memory", args.memory, "--force", "-q", env=env)
    return specs


def iter_blocks(array, rows: int):
    for a in range(0, array.shape[0], rows):
        yield np.asarray(array[a:a + rows])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    fig = sub.add_parser("figures")
    fig.add_argument("--data", default=str(DATA))
    fig.add_argument("--keep", default=None)
    mem = sub.add_parser("memory")
    mem.add_argument("--rows", type=int, default=1_000_000)
    mem.add_argument("--dim", type=int, default=512)
    mem.add_argument("--memory", default="256MiB")
    mem.add_argument("--row-group", type=int, default=16384)
    mem.add_argument("--write-rows", type=int, default=65536)
    mem.add_argument("--keep", default=None)
    args = parser.parse_args(argv)
    figures(args) if args.what == "figures" else memory(args)


if __name__ == "__main__":
    main()
