"""Masks and boxes: the annotation formats of the referring-segmentation data sets.

Three ways a data set stores "which pixels are the object":

* **Polygons** (COCO ``iscrowd=0``, ReasonSeg): a flat list ``[x1, y1, x2, y2, ...]`` of vertex
  coordinates in pixels; one object may have several polygons (its visible parts). Coordinates
  are pixel *edges*: the square ``[0, 0, 1, 0, 1, 1, 0, 1]`` covers exactly the first pixel.
  pycocotools rasterises them (``frPyObjects`` then ``decode``); we merge the parts with a
  union (LISA sums them, which gives the value 2 where two parts overlap).
* **RLE** (run-length encoding, COCO ``iscrowd=1``, GroundingSuite): the mask is read in
  column-major order and stored as alternating run lengths of 0s and 1s, ``{"size": [h, w],
  "counts": [...]}`` ("uncompressed") or with ``counts`` packed into a string ("compressed").
* **Boxes**: COCO stores ``[x, y, w, h]``; LENS, Qwen2.5-VL and this library use corners
  ``(x1, y1, x2, y2)``. Both use pixel edges, so the box of a mask whose pixels span columns
  3..7 is x1 = 3, x2 = 8 (``x2`` is *exclusive*: the edge after the last pixel), exactly what
  ``pycocotools.mask.toBbox`` gives.

Masks here are ``(H, W) uint8`` arrays: 1 = object, 0 = background, 255 = ignore (ReasonSeg).

pycocotools does not validate its input: a polygon with 4 numbers is read as a *box*, and an
RLE whose runs do not add up to ``h * w`` decodes to uninitialised memory. The functions below
check both and raise ``ValueError`` with the reason; the loaders add file and record names
(``lenslib.data.io`` holds their ``DataError``, skip log and image reader).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils

from lenslib.data.sample import IGNORE_LABEL

Box = tuple[float, float, float, float]

# ----------------------------------------------------------------------------------- polygons


def check_polygon(polygon: Sequence[float]) -> None:
    """Raise ValueError unless `polygon` is a flat list of at least 3 (x, y) vertices."""
    if len(polygon) % 2 != 0:
        raise ValueError(f"polygon has an odd number of coordinates ({len(polygon)})")
    if len(polygon) < 6:
        raise ValueError(f"polygon needs at least 3 vertices, got {len(polygon) // 2}")
    if not all(np.isfinite(float(v)) for v in polygon):
        raise ValueError("polygon has a non-finite coordinate")


def polygon_inside(polygon: Sequence[float], height: int, width: int, tolerance: float) -> bool:
    """True if every vertex lies within the image, allowing `tolerance` pixels outside."""
    xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    inside_x = (xy[:, 0] >= -tolerance) & (xy[:, 0] <= width + tolerance)
    inside_y = (xy[:, 1] >= -tolerance) & (xy[:, 1] <= height + tolerance)
    return bool(np.all(inside_x & inside_y))


def polygons_to_rle(polygons: Sequence[Sequence[float]], height: int, width: int) -> dict:
    """Union of polygons as one compressed RLE (pycocotools ``frPyObjects`` + ``merge``)."""
    for polygon in polygons:
        check_polygon(polygon)
    if not polygons:
        return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
    rles = mask_utils.frPyObjects([[float(v) for v in p] for p in polygons], height, width)
    return mask_utils.merge(rles)


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Rasterise and merge polygons into an (H, W) uint8 0/1 mask; no polygons -> zeros."""
    return mask_utils.decode(polygons_to_rle(polygons, height, width)).astype(np.uint8)


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """Exact polygon form of a 0/1 mask: one axis-aligned rectangle per run of pixels.

    Consecutive rows with the same run are merged into one rectangle. Rasterising the result
    with `polygons_to_mask` gives back `mask` pixel for pixel (rectangles follow pixel edges).
    Not the compact outline an annotator draws, but lossless, which writers of test data need.
    """
    binary = np.asarray(mask) == 1
    open_runs: dict[tuple[int, int], int] = {}  # (x0, x1) -> first row of the rectangle
    rectangles: list[list[float]] = []
    for y in range(binary.shape[0] + 1):
        runs = set(_row_runs(binary[y])) if y < binary.shape[0] else set()
        for run in [r for r in open_runs if r not in runs]:
            x0, x1 = run
            y0 = open_runs.pop(run)
            rectangles.append([x0, y0, x1, y0, x1, y, x0, y])
        for run in runs:
            open_runs.setdefault(run, y)
    return [[float(v) for v in rect] for rect in rectangles]


def _row_runs(row: np.ndarray) -> list[tuple[int, int]]:
    """Runs of True in a 1-D bool array as (start, end) with end exclusive."""
    padded = np.concatenate([[False], row, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


# ---------------------------------------------------------------------------------------- RLE


def rle_string_to_counts(counts: str | bytes) -> list[int]:
    """Unpack a compressed COCO RLE string into run lengths (port of ``rleFrString``).

    Each run is stored in 5-bit groups as characters offset by 48; bit 0x20 means "more groups
    follow", bit 0x10 of the last group is the sign; from the fourth run on, the value is a
    difference to the run two places before. We need the plain runs to validate an RLE,
    because pycocotools decodes a malformed one without complaint.
    """
    text = counts.decode("ascii") if isinstance(counts, bytes) else counts
    runs: list[int] = []
    p = 0
    while p < len(text):
        value, k, more = 0, 0, True
        while more:
            if p >= len(text):
                raise ValueError("compressed RLE string ends in the middle of a run")
            c = ord(text[p]) - 48
            value |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                value |= -1 << (5 * k)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def check_rle(rle: dict, height: int | None = None, width: int | None = None) -> None:
    """Raise ValueError unless `rle` is a well-formed COCO RLE (of the given size, if given)."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("RLE must be a dict with 'size' and 'counts'")
    size = rle["size"]
    if len(size) != 2 or any(int(s) < 0 for s in size):
        raise ValueError(f"RLE size must be [h, w], got {size}")
    h, w = int(size[0]), int(size[1])
    if height is not None and (h, w) != (height, width):
        raise ValueError(f"RLE size {[h, w]} does not match the image size {[height, width]}")
    counts = rle["counts"]
    if isinstance(counts, list):
        if not all(isinstance(r, (int, np.integer)) for r in counts):
            raise ValueError("uncompressed RLE counts must be integers")
        runs = counts
    elif isinstance(counts, (str, bytes)):
        runs = rle_string_to_counts(counts)
    else:
        raise ValueError(f"RLE counts must be a list, str or bytes, got {type(counts).__name__}")
    if any(int(r) < 0 for r in runs):
        raise ValueError("RLE has a negative run length")
    if sum(int(r) for r in runs) != h * w:
        raise ValueError(f"RLE runs add up to {sum(int(r) for r in runs)} pixels, not {h * w}")


def rle_to_mask(rle: dict, height: int | None = None, width: int | None = None) -> np.ndarray:
    """Decode one RLE (compressed string/bytes or uncompressed list counts) to (H, W) uint8."""
    check_rle(rle, height, width)
    return mask_utils.decode(_compressed(rle)).astype(np.uint8)


def mask_to_rle(mask: np.ndarray) -> dict:
    """Compressed RLE of a 0/1 mask, JSON-ready: ``{"size": [h, w], "counts": str}``."""
    binary = np.asfortranarray((np.asarray(mask) == 1).astype(np.uint8))
    rle = mask_utils.encode(binary)
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def segmentation_to_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` field to an (H, W) uint8 0/1 mask.

    Accepts a list of polygons, one RLE dict, or a list of RLE dicts (merged with a union).
    An empty list gives an all-zero mask (callers decide whether that is allowed).
    """
    if isinstance(segmentation, dict):
        return rle_to_mask(segmentation, height, width)
    if not isinstance(segmentation, list):
        raise ValueError(f"segmentation must be a list or dict, got {type(segmentation).__name__}")
    if segmentation and all(isinstance(s, dict) for s in segmentation):
        masks = [rle_to_mask(rle, height, width) for rle in segmentation]
        return np.maximum.reduce(masks)
    if all(isinstance(s, list) for s in segmentation):
        return polygons_to_mask(segmentation, height, width)
    raise ValueError("segmentation mixes polygons and RLEs")


def _compressed(rle: dict) -> dict:
    """A checked RLE in the form pycocotools' C functions take (counts as bytes)."""
    h, w = int(rle["size"][0]), int(rle["size"][1])
    if isinstance(rle["counts"], list):
        return mask_utils.frPyObjects(rle, h, w)
    if isinstance(rle["counts"], str):
        return {"size": [h, w], "counts": rle["counts"].encode("ascii")}
    return rle


def segmentation_area(segmentation: list | dict, height: int, width: int) -> int:
    """Foreground pixels of a COCO ``segmentation`` (as `segmentation_to_mask` would give),
    computed on the RLE without decoding; ValueError if it is malformed."""
    if isinstance(segmentation, dict):
        check_rle(segmentation, height, width)
        return int(mask_utils.area(_compressed(segmentation)))
    if not isinstance(segmentation, list):
        raise ValueError(f"segmentation must be a list or dict, got {type(segmentation).__name__}")
    if segmentation and all(isinstance(s, dict) for s in segmentation):
        for rle in segmentation:
            check_rle(rle, height, width)
        return int(mask_utils.area(mask_utils.merge([_compressed(r) for r in segmentation])))
    if all(isinstance(s, list) for s in segmentation):
        return int(mask_utils.area(polygons_to_rle(segmentation, height, width)))
    raise ValueError("segmentation mixes polygons and RLEs")


# ----------------------------------------------------------------------------- ReasonSeg fill


def fill_labelled_polygons(
    polygons: Sequence[tuple[Sequence[float], int]], height: int, width: int
) -> np.ndarray:
    """Paint (polygon, value) pairs into one mask, the largest polygon first (LISA protocol).

    Smaller regions are painted last, so an "ignore" hole (value 255) inside a target (1)
    survives, and so does a small target inside a large ignore region. The LISA code
    rasterises with OpenCV (integer vertices plus a 1-pixel outline); pycocotools is used
    here, so boundaries can differ from LISA's by about a pixel.
    """
    rles = [polygons_to_rle([polygon], height, width) for polygon, _ in polygons]
    areas = [int(mask_utils.area(rle)) for rle in rles]
    mask = np.zeros((height, width), dtype=np.uint8)
    for i in sorted(range(len(rles)), key=lambda j: -areas[j]):  # stable: ties keep file order
        mask[mask_utils.decode(rles[i]) == 1] = polygons[i][1]
    return mask


# -------------------------------------------------------------------------------------- boxes


def mask_to_box(mask: np.ndarray, value: int = 1) -> Box | None:
    """Tight box (x1, y1, x2, y2) of the pixels equal to `value`, edges exclusive; None if none."""
    ys, xs = np.nonzero(np.asarray(mask) == value)
    if len(xs) == 0:
        return None
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def xywh_to_xyxy(box: Sequence[float]) -> Box:
    """COCO [x, y, w, h] -> corners (x1, y1, x2, y2)."""
    x, y, w, h = (float(v) for v in box)
    return (x, y, x + w, y + h)


def xyxy_to_xywh(box: Sequence[float]) -> Box:
    """Corners (x1, y1, x2, y2) -> COCO [x, y, w, h]."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1, y1, x2 - x1, y2 - y1)


def check_box(box: Sequence[float], height: int, width: int, tolerance: float = 1.0) -> None:
    """Raise ValueError unless `box` is 4 finite corners, ordered, inside the image (+ tolerance)."""
    if len(box) != 4 or not all(np.isfinite(float(v)) for v in box):
        raise ValueError(f"box must be 4 finite numbers, got {box}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x1 <= x2 and y1 <= y2):
        raise ValueError(f"box corners are not ordered (x1 <= x2, y1 <= y2): {box}")
    if x1 < -tolerance or y1 < -tolerance or x2 > width + tolerance or y2 > height + tolerance:
        raise ValueError(f"box {box} lies outside the {width}x{height} image")


__all__ = [
    "IGNORE_LABEL",
    "Box",
    "check_box",
    "check_polygon",
    "check_rle",
    "fill_labelled_polygons",
    "mask_to_box",
    "mask_to_polygons",
    "mask_to_rle",
    "polygon_inside",
    "polygons_to_mask",
    "polygons_to_rle",
    "rle_string_to_counts",
    "rle_to_mask",
    "segmentation_area",
    "segmentation_to_mask",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
]
