"""Optional extras: importing an extra's module where a feature needs it, or one line naming how
to install it (errors.install_hint says how, for the way qbnorm was installed)."""

from __future__ import annotations

from qbnorm_cli.errors import RuntimeFailure, install_hint

# extra's key: (module imported, extra installed)
EXTRAS = {"faiss": ("faiss", "faiss"), "lancedb": ("lancedb", "lancedb"), "arrow": ("pyarrow", "arrow"),
          "safetensors": ("safetensors", "safetensors"), "remote": ("fsspec", "remote")}


def need(extra: str, what: str):
    """The optional module of `extra`, or RuntimeFailure naming the extra to install."""
    module, name = EXTRAS[extra]
    try:
        return __import__(module)
    except ImportError:
        raise RuntimeFailure(f"{what} needs {module}: {install_hint(name)}") from None
