"""Datasets stored as several files: a folder, or a glob pattern quoted so that the shell leaves
it alone ('text_emb/*.npy'), is one dataset, its files concatenated in natural sort order
(text_emb_2.npy before text_emb_10.npy).

This is how clip-retrieval and embedding-reader write embeddings (embeddings/text_emb/
text_emb_0.npy, text_emb_1.npy, …, with metadata/metadata_0.parquet beside them), and how
Hugging Face datasets shard Parquet files. Every .npy shard is memory-mapped (read by ranges when
remote); width and dtype are checked across shards (lazyarrays.Concatenated).
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np

from qbnorm_cli.errors import DataError, UsageError, one_line

GLOB_CHARS = re.compile(r"[*?\[]")
SUFFIXES = {".npy": "npy", ".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".feather": "arrow",
            ".ipc": "arrow"}
MAX_LISTED = 10


def natural_key(name: str):
    """'emb_10.npy' after 'emb_2.npy': digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def is_pattern(path: str) -> bool:
    return bool(GLOB_CHARS.search(os.path.basename(path)))


def format_of(name: str) -> str | None:
    return SUFFIXES.get(os.path.splitext(name)[1].lower())


def choose(names: list[str], label: str, subfolders: list[str]) -> tuple[str, list[str]]:
    """(format, files in natural order) of the data files among `names`; one format only."""
    kinds: dict[str, list[str]] = {}
    for name in names:
        if (fmt := format_of(name)) is not None and not os.path.basename(name).startswith("."):
            kinds.setdefault(fmt, []).append(name)
    if not kinds:
        if subfolders:
            shown = ", ".join(sorted(subfolders, key=natural_key)[:MAX_LISTED])
            raise UsageError(f"{label}: is a directory with no .npy, .parquet or .arrow files directly in it; "
                             f"name one of its folders: {shown}")
        raise UsageError(f"{label}: is a directory with no .npy, .parquet or .arrow files to read")
    if len(kinds) > 1:
        raise UsageError(f"{label}: holds files of several formats ({', '.join(sorted(kinds))}); name one with a "
                        f"pattern such as '{label.rstrip('/')}/*.npy'")
    fmt, files = next(iter(kinds.items()))
    return fmt, sorted(files, key=lambda n: natural_key(os.path.basename(n)))


def local_files(path: str) -> tuple[str, list[str]]:
    """(format, files) of a local folder or glob pattern."""
    if os.path.isdir(path):
        try:
            entries = [os.path.join(path, n) for n in os.listdir(path)]
        except OSError as exc:
            raise UsageError(f"{path}: cannot list the folder: {exc.strerror or exc}") from None
        files = [e for e in entries if os.path.isfile(e)]
        folders = [e for e in entries if os.path.isdir(e)]
        return choose(files, path, folders)
    matches = [m for m in glob.glob(path) if os.path.isfile(m)]
    if not matches:
        raise UsageError(f"{path}: no file matches this pattern")
    return choose(matches, path, [])


def npy_header(fh, label: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data offset) of an open .npy file; never unpickles."""
    try:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fh)
        offset = fh.tell()
    except (ValueError, EOFError, OSError, TypeError, SyntaxError) as exc:
        raise DataError(f"{label}: not a valid .npy file ({one_line(exc)}); .npy files are never unpickled") from None
    if dtype.hasobject:
        raise DataError(f"{label}: holds Python objects (dtype {dtype}); qbnorm refuses to unpickle data")
    return tuple(int(n) for n in shape), bool(fortran), dtype, offset
