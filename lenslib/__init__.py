"""lenslib: a teaching implementation of LENS (Learning to Segment Anything with Unified Reinforced Reasoning)."""

__version__ = "0.1.0"
