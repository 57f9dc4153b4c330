"""The package's version and the version of the file format it writes."""

VERSION = "0.1.0"
FORMAT_VERSION = 1  # qbnorm_version of the files written; newer files are refused
