"""Checking images before they are used: every model input and every figure is (H, W, 3) uint8."""

from __future__ import annotations

import numpy as np


def check_rgb_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """`image` as an (H, W, 3) uint8 RGB array; ValueError naming `name` and what is wrong."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{name} must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    return image
