"""Data: the common sample type, the real dataset loaders and writers in their formats.

The synthetic toy world is not LENS data; it lives in the toy package (`ToyWorld`).
"""

from lenslib.data.groundingsuite import GroundingSuiteDataset
from lenslib.data.io import DataError
from lenslib.data.reasonseg import ReasonSegDataset
from lenslib.data.refer import ReferDataset
from lenslib.data.sample import IGNORE_LABEL, SegSample
from lenslib.data.writers import (
    write_groundingsuite,
    write_reasonseg,
    write_refer,
    write_toy_benchmarks,
)

__all__ = [
    "IGNORE_LABEL",
    "DataError",
    "GroundingSuiteDataset",
    "ReasonSegDataset",
    "ReferDataset",
    "SegSample",
    "write_groundingsuite",
    "write_reasonseg",
    "write_refer",
    "write_toy_benchmarks",
]
