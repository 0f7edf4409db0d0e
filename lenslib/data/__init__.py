"""Data: the common sample type, the synthetic toy world and the real dataset loaders."""

from lenslib.data.groundingsuite import GroundingSuiteDataset
from lenslib.data.io import DataError
from lenslib.data.reasonseg import ReasonSegDataset
from lenslib.data.refer import ReferDataset
from lenslib.data.sample import IGNORE_LABEL, SegSample
from lenslib.data.toy import ToyDataset, ToyWorld, ToyWorldConfig, toy_corpus
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
    "ToyDataset",
    "ToyWorld",
    "ToyWorldConfig",
    "toy_corpus",
    "write_groundingsuite",
    "write_reasonseg",
    "write_refer",
    "write_toy_benchmarks",
]
