"""Data: the common sample type, the synthetic toy world and the real dataset loaders."""

from lenslib.data.sample import SegSample

__all__ = ["SegSample"]
