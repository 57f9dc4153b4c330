"""The manifest of a directory export: manifest.json, written last, holds the size and sha256 of
every other file (the recipe's included) and a sha256 of itself; `verify_manifest` compares them
all before anything of the export is read."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from qbnorm_cli.errors import DataError, RuntimeFailure, one_line
from qbnorm_cli.io.atomic import check_interrupt
from qbnorm_cli.io.schemas import INDEX_REMEDY

RECIPE_FILE = "recipe.json"
MANIFEST_FILE, MANIFEST_FORMAT = "manifest.json", "qbnorm-index-manifest"
HASH_BUFFER = 8 << 20  # bytes read per step when a manifest's files are hashed


def _digest(path: Path) -> str:
    """sha256 of a file, read once in large steps."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_BUFFER)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
            check_interrupt()
    return digest.hexdigest()


def _manifest_digest(files: dict) -> str:
    """The manifest's own checksum: sha256 of its file list in canonical JSON."""
    text = json.dumps({"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _export_files(root: Path) -> list[str]:
    """Every file of an export directory but the manifest, relative, '/'-separated, sorted."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in names:
            relative = Path(folder, name).relative_to(root).as_posix()
            if relative != MANIFEST_FILE:
                found.append(relative)
    return sorted(found)


def write_manifest(root: Path) -> None:
    """manifest.json: the size and sha256 of every file of a complete export directory, and the
    manifest's own sha256; written last, once every other file is complete."""
    files = {}
    for relative in _export_files(root):
        file = root / relative
        files[relative] = {"bytes": file.stat().st_size, "sha256": _digest(file)}
    manifest = {"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files,
                "manifest_sha256": _manifest_digest(files)}
    (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def verify_manifest(path: str) -> None:
    """Compare an export directory with its manifest before anything of it is read: DataError
    naming the file and what is wrong (missing, a link, another size or content, a file the
    manifest does not list inside the table's directory)."""
    root = Path(path)
    where = root / MANIFEST_FILE
    damaged = f"the export is damaged or was edited: {INDEX_REMEDY}"
    if not where.is_file() or where.is_symlink():
        raise DataError(f"{where}: missing; every export qbnorm writes ends with one ({damaged})")
    try:
        manifest = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DataError(f"{where}: unreadable ({one_line(exc)}); {damaged}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT
            or manifest.get("algorithm") != "sha256" or not all(
                isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
                for v in files.values())):
        raise DataError(f"{where}: not a qbnorm index manifest; {damaged}")
    if manifest.get("manifest_sha256") != _manifest_digest(files):
        raise DataError(f"{where}: its checksum does not match its contents; {damaged}")
    if RECIPE_FILE not in files:
        raise DataError(f"{where}: does not list {RECIPE_FILE}; {damaged}")
    folders = {relative.partition("/")[0] for relative in files if "/" in relative}
    for relative in _export_files(root):
        if relative not in files and relative.partition("/")[0] in folders:
            raise DataError(f"{root / relative}: not in the export's manifest (added after qbnorm wrote it?); "
                            f"{damaged}")
    for relative, recorded in files.items():
        file = root / relative
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise DataError(f"{where}: lists {relative!r}, outside the export; {damaged}")
        linked = next((p for p in file.relative_to(root).parents if p != Path(".") and (root / p).is_symlink()), None)
        if linked is not None:
            raise DataError(f"{root / linked}: a link (qbnorm writes none); {damaged}")
        try:
            info = os.lstat(file)
        except FileNotFoundError:
            raise DataError(f"{file}: missing (the manifest lists it); {damaged}") from None
        except OSError as exc:
            raise RuntimeFailure(f"{file}: cannot read ({exc.strerror or one_line(exc)})") from None
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{file}: not a plain file (a link or device; qbnorm writes none); {damaged}")
        if info.st_size != recorded["bytes"]:
            raise DataError(f"{file}: {info.st_size} bytes, the manifest says {recorded['bytes']} (truncated or "
                            f"changed); {damaged}")
        try:
            found = _digest(file)
        except OSError as exc:
            raise RuntimeFailure(f"{file}: cannot read ({exc.strerror or one_line(exc)})") from None
        if found != recorded["sha256"]:
            raise DataError(f"{file}: changed after qbnorm wrote it (sha256 differs from {MANIFEST_FILE}); {damaged}")
