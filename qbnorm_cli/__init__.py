"""qbnorm: hubness measurement and querybank normalisation for cross-modal retrieval."""

__version__ = "0.1.0"
FORMAT_VERSION = 1
