"""Masks and boxes: the annotation formats of the referring-segmentation data sets.

Four ways a data set stores "which pixels are the object":

* **Polygons** (COCO ``iscrowd=0``): a flat list ``[x1, y1, x2, y2, ...]`` of vertex
  coordinates in pixels; one object may have several polygons (its visible parts). Coordinates
  are pixel *edges*: the square ``[0, 0, 1, 0, 1, 1, 0, 1]`` covers exactly the first pixel.
  pycocotools rasterises them (``frPyObjects`` then ``decode``), clipping what lies outside
  the image; we merge the parts with a union (LISA sums them, which gives the value 2 where
  two parts overlap).
* **LabelMe polygons** (ReasonSeg): ``points`` [[x, y], ...] that LISA paints with OpenCV on
  int32 vertices, boundary pixels included (`paint_polygons_like_lisa`); we paint them the
  same way, so ReasonSeg masks equal LISA's ground truth pixel for pixel.
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

import cv2
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


# ---------------------------------------------------------------------- ReasonSeg (OpenCV)


def lisa_vertices(points: object) -> np.ndarray:
    """LabelMe ``points`` [[x, y], ...] as the (N, 2) int32 vertices LISA paints with OpenCV.

    Like LISA's ``np.array(points, dtype=np.int32)``, coordinates are truncated toward zero
    (2.9 -> 2, -0.5 -> 0). ValueError for what OpenCV cannot paint: no point, points that are
    not (x, y) pairs, non-finite or out-of-int32 coordinates.
    """
    try:
        xy = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"points are not numbers ({err})") from err
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) == 0:
        raise ValueError(f"points must be a non-empty list of [x, y] pairs, got shape {xy.shape}")
    if not np.all(np.isfinite(xy)) or np.any(np.abs(xy) >= 2**31):
        raise ValueError("points have a non-finite or out-of-range coordinate")
    return xy.astype(np.int32)


def _paint_lisa(mask: np.ndarray, vertices: np.ndarray, value: int) -> None:
    """One closed outline of thickness 1, then the filled interior (both 8-connected)."""
    polygon = vertices.reshape(1, -1, 2)
    cv2.polylines(mask, polygon, True, int(value), 1)
    cv2.fillPoly(mask, polygon, int(value))


def paint_polygons_like_lisa(
    shapes: Sequence[tuple[object, int]], height: int, width: int
) -> np.ndarray:
    """Paint (points, value) shapes into one (H, W) uint8 mask exactly as LISA's ReasonSeg loader.

    Vertices go through `lisa_vertices` (int32, truncated); each shape is an OpenCV outline of
    thickness 1 plus ``fillPoly``, so the painted region includes the boundary pixels and is
    clipped to the image. Shapes are painted largest first, the area being the pixel count of
    the shape painted alone, ordered by ``np.argsort(areas)[::-1]`` as in LISA (so shapes of
    equal area are ordered as numpy's sort leaves them, not by file order). Smaller
    regions painted last survive: an "ignore" hole (255) inside a target (1), or a small
    target inside a large ignore region. pycocotools, which reads vertices as pixel edges at
    sub-pixel precision, paints the same points up to about a pixel smaller along the edges.

    OpenCV 4.11 changed how ``fillPoly`` rasterises edges (often one pixel along a slanted
    edge): LISA used OpenCV 4.8, which 4.10 matches pixel for pixel, hence the ``<4.11`` pin.
    """
    polygons = [(lisa_vertices(points), value) for points, value in shapes]
    areas = []
    for vertices, _ in polygons:
        alone = np.zeros((height, width), dtype=np.uint8)
        _paint_lisa(alone, vertices, 1)
        areas.append(alone.sum())
    mask = np.zeros((height, width), dtype=np.uint8)
    for i in np.argsort(areas)[::-1]:
        _paint_lisa(mask, *polygons[int(i)])
    return mask


def mask_to_lisa_polygons(mask: np.ndarray) -> list[list[list[int]]]:
    """Points lists that `paint_polygons_like_lisa` paints back to the 0/1 mask exactly.

    The rectangles of `mask_to_polygons` with their vertices on the centres of the corner
    pixels (OpenCV paints the boundary pixels), as LabelMe ``points`` [[x, y], ...].
    """
    shapes = []
    for x0, y0, x1, _, _, y1, _, _ in mask_to_polygons(mask):
        left, top, right, bottom = int(x0), int(y0), int(x1) - 1, int(y1) - 1
        shapes.append([[left, top], [right, top], [right, bottom], [left, bottom]])
    return shapes


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


def clip_box(box: Sequence[float], height: int, width: int) -> Box:
    """Corners (x1, y1, x2, y2) clipped to the image ``[0, width] x [0, height]``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = float(width), float(height)
    return (min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h))


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
    "clip_box",
    "lisa_vertices",
    "mask_to_box",
    "mask_to_lisa_polygons",
    "mask_to_polygons",
    "mask_to_rle",
    "paint_polygons_like_lisa",
    "polygons_to_mask",
    "polygons_to_rle",
    "rle_string_to_counts",
    "rle_to_mask",
    "segmentation_area",
    "segmentation_to_mask",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
]
