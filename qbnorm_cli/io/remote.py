"""Inputs named by URL (s3://, gs://, https://, hf://, memory://, …), read through fsspec (the
`remote` extra) by byte ranges, never downloaded whole.

Blocks read are cached on disk under QBNORM_CACHE_DIR (default ~/.cache/qbnorm), through fsspec's
block cache, so a second pass over a remote gallery reads the cache. Credentials come from fsspec's
own configuration (its config files, the environment variables of s3fs, gcsfs, huggingface_hub);
qbnorm never prints them: the user name, password and query string of a URL are left out of every
message and provenance record (`redact`).
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager

from qbnorm_cli.errors import DataError, RuntimeFailure, UsageError, one_line, package_hint
from qbnorm_cli.io.extras import need

URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+")
CACHE_ENV = "QBNORM_CACHE_DIR"
UNCACHED = ("memory", "file", "local")  # already local: a cache would copy them
# The fsspec implementation a protocol needs, when it is not fsspec itself.
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub",
            "az": "adlfs", "abfs": "adlfs", "http": "aiohttp", "https": "aiohttp"}


def is_url(path: str) -> bool:
    return bool(URL.match(str(path)))


def redact(url: str) -> str:
    """A URL as qbnorm shows it: without user name, password, query string or fragment (signed
    URLs carry their credentials there); a `::KEY` after the path is kept."""
    if not is_url(url):
        return url
    scheme, rest = url.split("://", 1)
    host, sep, path = rest.partition("/")
    path, key_sep, key = path.partition("::")
    path = path.split("?", 1)[0].split("#", 1)[0]
    host = host.rsplit("@", 1)[-1].split("?", 1)[0].split("#", 1)[0]
    return f"{scheme}://{host}{sep}{path}{key_sep}{key}"


def redact_text(text: str) -> str:
    """Every URL inside `text` (a command line, a library's message) redacted."""
    return URL_IN_TEXT.sub(lambda match: redact(match.group()), text)


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "qbnorm")


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for `url`; the extra or protocol package is named when missing."""
    need("remote", f"reading {redact(url)}")
    import fsspec.core

    protocol = url.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        package = PACKAGES.get(protocol)
        if package is None:
            raise RuntimeFailure(f"reading {redact(url)} needs the fsspec implementation of {protocol}://, "
                                 "which is not installed") from None
        raise RuntimeFailure(f"reading {redact(url)} needs {package}: {package_hint(package)}") from None
    except ValueError as exc:
        raise UsageError(f"{redact(url)}: cannot open this URL ({one_line(exc)})") from None


@contextmanager
def remote_errors(label: str):
    """fsspec and network errors while reading `label` as one line (never a URL's credentials)."""
    try:
        yield
    except (DataError, RuntimeFailure, UsageError):
        raise
    except FileNotFoundError:
        raise UsageError(f"{label}: no such file") from None
    except PermissionError:
        raise RuntimeFailure(f"{label}: permission denied") from None
    except (OSError, TimeoutError, ConnectionError) as exc:
        raise RuntimeFailure(f"{label}: cannot read: {redact_text(one_line(exc))}") from None


def open_file(fs, path: str, label: str):
    """A seekable binary file object reading `path` of `fs` by ranges, blocks cached on disk."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    with remote_errors(label):
        if protocol in UNCACHED:
            return fs.open(path, "rb")
        from fsspec.implementations.cached import CachingFileSystem

        os.makedirs(cache_dir(), exist_ok=True)
        cached = CachingFileSystem(fs=fs, cache_storage=os.path.join(cache_dir(), "blocks"), check_files=True)
        return cached.open(path, "rb")


def listing(fs, pattern: str, label: str) -> list[str]:
    """The files a directory holds (directly), or those a glob pattern matches."""
    with remote_errors(label):
        if fs.isdir(pattern):
            return [entry["name"] for entry in fs.ls(pattern, detail=True) if entry.get("type") == "file"]
        return [name for name in fs.glob(pattern) if fs.isfile(name)]


def is_dir(fs, path: str, label: str) -> bool:
    with remote_errors(label):
        return fs.isdir(path)


def exists(fs, path: str, label: str) -> bool:
    with remote_errors(label):
        return fs.exists(path)


def unqualified(fs, name: str) -> str:
    """A name fs.ls or fs.glob returned, as a URL again (they drop the protocol)."""
    return fs.unstrip_protocol(name)
