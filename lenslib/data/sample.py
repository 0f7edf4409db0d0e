"""The one sample type every loader yields (toy world, RefCOCO/+/g, ReasonSeg, GroundingSuite)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE_LABEL = 255  # mask pixels with this value are ignored by metrics and losses (LISA protocol)


@dataclass
class SegSample:
    """One referring / reasoning segmentation example.

    image:     (H, W, 3) uint8 RGB.
    text:      the referring expression or question (one sentence; multi-sentence refs
               become several samples, as in the LISA protocol).
    mask:      (H, W) uint8 with 1 = target, 0 = background, 255 = ignore.
    box:       (x1, y1, x2, y2) float pixels of `image`, the tight box of the target.
    rationale: a chain of thought that is true of the scene (toy world only; never shown at eval).
    sample_id: unique and stable within its data set, e.g. "refcoco/val/ref123/sent456".
    source:    data set name, e.g. "toy", "refcoco", "reasonseg".
    """

    image: np.ndarray
    text: str
    mask: np.ndarray
    box: tuple[float, float, float, float]
    rationale: str | None = None
    sample_id: str = ""
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(
                f"{self.sample_id or 'sample'}: image must be (H, W, 3) uint8, "
                f"got {self.image.shape} {self.image.dtype}"
            )
        if self.mask.shape != self.image.shape[:2]:
            raise ValueError(
                f"{self.sample_id or 'sample'}: mask shape {self.mask.shape} != image shape "
                f"{self.image.shape[:2]}"
            )
        if len(self.box) != 4:
            raise ValueError(
                f"{self.sample_id or 'sample'}: box must have 4 numbers, got {self.box}"
            )
