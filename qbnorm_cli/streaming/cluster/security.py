"""How the client proves itself to a dask scheduler at an address or in a scheduler file: a
`distributed.Security`, a dict of its keywords, or a YAML/JSON file of them (docs/security.md).
A local cluster makes its own (session.local_cluster)."""

from __future__ import annotations

import os
from pathlib import Path

from qbnorm_cli.errors import DataError, UsageError, one_line, param

# distributed.Security's keywords a security file may give (paths relative to the file)
SECURITY_KEYS = ("tls_ca_file", "tls_client_cert", "tls_client_key", "tls_ciphers", "require_encryption")
SECURITY_FILES = ("tls_ca_file", "tls_client_cert", "tls_client_key")


def load_security(path) -> dict:
    """distributed.Security's keywords from a YAML or JSON file (JSON is YAML): tls_ca_file and
    tls_client_cert required (tls_client_key unless the certificate file holds the key), paths
    relative to the file, each a readable file. DataError naming the file and the key."""
    import yaml  # dask's own dependency

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{param('cluster_security')} {path}: no such file")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: not a YAML or JSON security file ({one_line(exc)})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a mapping of {', '.join(SECURITY_KEYS)}")
    unknown = sorted(str(k) for k in doc if k not in SECURITY_KEYS)
    if unknown:
        raise DataError(f"{path}: unknown key {unknown[0]!r}; expected {', '.join(SECURITY_KEYS)}")
    for key in ("tls_ca_file", "tls_client_cert"):
        if key not in doc:
            raise DataError(f"{path}: {key} missing (the CA that signed the scheduler's certificate, and this "
                            "client's certificate)")
    out = {}
    for key, value in doc.items():
        if key == "require_encryption":
            if not isinstance(value, bool):
                raise DataError(f"{path}: require_encryption must be true or false, not {value!r}")
        elif not isinstance(value, str) or not value:
            raise DataError(f"{path}: {key} must be a string, not {value!r}")
        if key in SECURITY_FILES:
            value = str((path.parent / value).resolve())
            try:
                with open(value, "rb"):
                    pass
            except OSError as exc:
                raise DataError(f"{path}: {key} {value}: {exc.strerror or one_line(exc)}") from None
            if not os.path.isfile(value):
                raise DataError(f"{path}: {key} {value}: not a file")
        out[key] = value
    return {"require_encryption": True, **out}


def client_security(value, distributed):
    """The Security a client gives a scheduler at an address (None: dask's configuration), from
    Cluster(security=…)."""
    if value is None or isinstance(value, distributed.Security):
        return value
    if isinstance(value, (str, os.PathLike)):
        value = load_security(value)
    if not isinstance(value, dict):
        raise UsageError(f"{param('security')} {value!r}: expected a distributed.Security, a dict of its keywords "
                         "or a YAML/JSON file of them")
    try:
        return distributed.Security(**value)
    except (TypeError, ValueError, OSError) as exc:
        raise UsageError(f"{param('security')}: {one_line(exc)}") from None


def tls_configured() -> bool:
    """Whether dask's configuration gives a client TLS credentials (or a loader that finds them)."""
    import dask.config

    return bool(dask.config.get("distributed.comm.tls.ca-file", None)
                or dask.config.get("distributed.client.security-loader", None))
