"""Optional extras: importing an extra's module where a feature needs it, or one line naming how
to install it (the one place that says how an extra is installed)."""

from __future__ import annotations

from qbnorm_cli.errors import RuntimeFailure

# extra's key: (module imported, extra installed)
EXTRAS = {"faiss": ("faiss", "faiss"), "lancedb": ("lancedb", "lancedb"), "arrow": ("pyarrow", "arrow"),
          "safetensors": ("safetensors", "safetensors"), "remote": ("fsspec", "remote")}


def need(extra: str, what: str):
    """The optional module of `extra`, or RuntimeFailure naming the extra to install."""
    module, name = EXTRAS[extra]
    try:
        return __import__(module)
    except ImportError:
        raise RuntimeFailure(f"{what} needs {module}: pip install 'qbnorm[{name}]'") from None
