"""Moved to `extract.datasets.nih`; this name stays for the benchmarks and tests outside
`extract` that import the NIH image index from here."""
from extract.datasets.nih import *  # noqa: F401,F403
from extract.datasets.nih import DatasetError, file_sha256, index_images  # noqa: F401
