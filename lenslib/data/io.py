"""Reading files and reporting bad input: what every data set loader shares.

* ``DataError``: a malformed file or record; the message names the file and the record.
* ``SkipLog``: a loader that meets a bad record leaves it out, counts it by reason and warns
  once at the end, so a skip is never silent (or, with ``strict=True``, raises at once).
* ``image_size`` / ``read_rgb``: the image header and the decoded pixels.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image


class DataError(ValueError):
    """A data set file or record is malformed; the message names the file and the record."""


class SkipLog:
    """Counts the records a loader left out, by reason, and keeps the first messages.

    With ``strict=True`` the first problem raises DataError instead of being skipped.
    """

    def __init__(self, name: str, strict: bool = False, keep: int = 50) -> None:
        self.name = name
        self.strict = strict
        self.keep = keep
        self.counts: Counter[str] = Counter()
        self.details: list[str] = []

    def skip(self, reason: str, message: str) -> None:
        """Record one skipped record (or raise DataError when strict)."""
        if self.strict:
            raise DataError(message)
        self.counts[reason] += 1
        if len(self.details) < self.keep:
            self.details.append(message)

    def report(self) -> None:
        """Warn once with the totals, so a skip is never silent."""
        if self.counts:
            total = sum(self.counts.values())
            warnings.warn(
                f"{self.name}: skipped {total} record(s) {dict(self.counts)}; "
                f"first: {self.details[0]} (see .skip_details)",
                stacklevel=3,
            )


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the image header, without decoding the pixels."""
    with Image.open(path) as image:
        width, height = image.size
    return height, width


def read_rgb(path: Path, sample_id: str) -> np.ndarray:
    """Decode an image file (JPEG, PNG, ...) to (H, W, 3) uint8 RGB; DataError if unreadable.

    EXIF orientation is NOT applied: COCO-style annotations refer to the stored pixel grid.
    """
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError as err:
        raise DataError(f"{path}: image of {sample_id} is missing") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{path}: cannot decode the image of {sample_id}: {err}") from err


__all__ = ["DataError", "SkipLog", "image_size", "read_rgb"]
