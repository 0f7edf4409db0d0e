"""ReasonSeg (LISA): reasoning segmentation with implicit queries.

Files, under a data root::

    ReasonSeg/
      train/  <name>.jpg  <name>.json
      val/    ...
      test/   ...

Each image has a same-name JSON file in a LabelMe-like format::

    {"text": ["What part of the car keeps the driver dry when it rains?", ...],   1-5 queries
     "is_sentence": true,                    long sentence (true) or short phrase (false)
     "shapes": [{"label": "target", "points": [[x, y], ...], ...},
                {"label": "ignore", "points": [...]},
                {"label": "flag", ...}]}

The mask is painted as LISA paints it (`paint_polygons_like_lisa`): OpenCV on int32
vertices, boundary pixels included, the largest shape first; label "flag" is a deprecated
marker and skipped, a label containing "ignore" paints 255 (ignored by metrics and losses),
any other label paints 1. Vertices outside the image are clipped; a shape of one or two
points paints a dot or a line, as in LISA. Some files are not UTF-8; like LISA we fall back
to cp1252.

``texts="all"`` (default) gives one sample per query; ``texts="first"`` keeps only the first
query of each image, which is what LISA's evaluation (and so the reported ReasonSeg numbers)
uses. ``empty_masks="keep"`` keeps images whose mask has no target pixel (LISA's evaluation
keeps them); the default ``"skip"`` leaves them out (counted as "empty_mask").

Bad input, decided case by case:

* unknown split, missing ``ReasonSeg/<split>`` folder: ``DataError`` at once.
* one bad image/JSON pair (JSON missing, truncated or invalid; image missing or unreadable
  header; no "text"/"shapes"; a shape OpenCV cannot paint: no points, points that are not
  [x, y] pairs or not finite numbers): skipped at construction, counted by reason in
  ``.skipped`` (messages in ``.skip_details``), one warning; ``strict=True`` raises
  ``DataError`` instead. An empty query string is skipped the same way.
* an image that cannot be decoded when read: ``DataError`` naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lenslib.data.io import DataError, SkipLog, image_size, read_rgb
from lenslib.data.masks import lisa_vertices, mask_to_box, paint_polygons_like_lisa
from lenslib.data.sample import IGNORE_LABEL, SegSample

REASONSEG_SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def label_value(label: str) -> int | None:
    """Mask value a ReasonSeg polygon label paints: None (skip "flag"), 255 (ignore) or 1."""
    if label.lower() == "flag":
        return None
    return IGNORE_LABEL if "ignore" in label.lower() else 1


def read_annotation(path: Path) -> dict:
    """Parse a ReasonSeg JSON (UTF-8, else cp1252 as LISA does); ValueError if invalid."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="strict")
    annotation = json.loads(text)
    if not isinstance(annotation, dict):
        raise ValueError("the top level is not an object")
    return annotation


@dataclass
class _Record:
    image_path: Path
    json_path: Path
    height: int
    width: int
    polygons: list[tuple[np.ndarray, int]]  # ((N, 2) int32 vertices, mask value)
    text: str
    text_index: int
    is_sentence: bool


def parse_shapes(shapes: object) -> list[tuple[np.ndarray, int]]:
    """[((N, 2) int32 vertices, value)] from a "shapes" list, flags left out; ValueError
    naming the first shape that cannot be painted."""
    if not isinstance(shapes, list):
        raise ValueError("'shapes' must be a list")
    polygons = []
    for k, shape in enumerate(shapes):
        if not isinstance(shape, dict) or not isinstance(shape.get("label"), str):
            raise ValueError(f"shape {k} has no string 'label'")
        value = label_value(shape["label"])
        if value is None:
            continue
        try:
            polygons.append((lisa_vertices(shape["points"]), value))
        except (KeyError, ValueError) as err:
            raise ValueError(f"shape {k} ({shape['label']!r}): bad 'points': {err}") from err
    return polygons


def has_target(polygons: list[tuple[np.ndarray, int]], height: int, width: int) -> bool:
    """True if the painted mask has a pixel of value 1."""
    return bool(np.any(paint_polygons_like_lisa(polygons, height, width) == 1))


class ReasonSegDataset:
    """One SegSample per query of a ReasonSeg split, read lazily: ``ReasonSegDataset(root, "val")``.

    ``.skipped`` counts the records left out by reason, ``.skip_details`` explains them.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        *,
        texts: str = "all",
        empty_masks: str = "skip",
        strict: bool = False,
    ) -> None:
        if split not in REASONSEG_SPLITS:
            raise DataError(f"unknown ReasonSeg split {split!r}; expected {REASONSEG_SPLITS}")
        if texts not in ("all", "first"):
            raise ValueError(f"texts must be 'all' or 'first', got {texts!r}")
        if empty_masks not in ("skip", "keep"):
            raise ValueError(f"empty_masks must be 'skip' or 'keep', got {empty_masks!r}")
        self.split, self.texts, self.empty_masks = split, texts, empty_masks
        self.folder = Path(root) / "ReasonSeg" / split
        if not self.folder.is_dir():
            raise DataError(f"{self.folder}: ReasonSeg split folder not found")
        self._log = SkipLog(f"reasonseg/{split}", strict=strict)
        self.records: list[_Record] = []
        images = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for image_path in images:
            self._add_image(image_path)
        image_stems = {p.stem for p in images}
        for json_path in sorted(self.folder.glob("*.json")):
            if json_path.stem not in image_stems:
                self._log.skip("missing_image", f"{json_path}: no image with the same name")
        self._log.report()

    @property
    def skipped(self) -> dict[str, int]:
        """Records left out, by reason."""
        return dict(self._log.counts)

    @property
    def skip_details(self) -> list[str]:
        return list(self._log.details)

    def _add_image(self, image_path: Path) -> None:
        json_path = image_path.with_suffix(".json")
        if not json_path.is_file():
            return self._log.skip("missing_json", f"{image_path}: no {json_path.name} beside it")
        try:
            height, width = image_size(image_path)
        except (OSError, ValueError, SyntaxError) as err:
            return self._log.skip("unreadable_image", f"{image_path}: {err}")
        try:
            annotation = read_annotation(json_path)
        except (ValueError, UnicodeDecodeError) as err:
            return self._log.skip("invalid_json", f"{json_path}: invalid JSON ({err})")
        queries = annotation.get("text")
        queries = [queries] if isinstance(queries, str) else queries
        if not isinstance(queries, list) or not queries:
            return self._log.skip("no_text", f"{json_path}: 'text' must be a non-empty list")
        try:
            polygons = parse_shapes(annotation.get("shapes"))
        except ValueError as err:
            return self._log.skip("invalid_shapes", f"{json_path}: {err}")
        if self.empty_masks == "skip" and not has_target(polygons, height, width):
            return self._log.skip("empty_mask", f"{json_path}: no target pixel")
        is_sentence = bool(annotation.get("is_sentence", False))
        for k, query in enumerate(queries[:1] if self.texts == "first" else queries):
            if not isinstance(query, str) or not query.strip():
                self._log.skip("empty_text", f"{json_path}: text {k} is empty")
                continue
            self.records.append(
                _Record(image_path, json_path, height, width, polygons, query, k, is_sentence)
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> SegSample:
        record = self.records[index]
        sample_id = f"reasonseg/{self.split}/{record.image_path.stem}/{record.text_index}"
        image = read_rgb(record.image_path, sample_id)
        if image.shape[:2] != (record.height, record.width):
            raise DataError(f"{record.image_path}: decoded size changed since indexing")
        mask = paint_polygons_like_lisa(record.polygons, record.height, record.width)
        return SegSample(
            image=image,
            text=record.text.strip(),
            mask=mask,
            box=mask_to_box(mask, 1) or (0.0, 0.0, 0.0, 0.0),
            sample_id=sample_id,
            source="reasonseg",
            meta={
                "dataset": "reasonseg",
                "split": self.split,
                "is_sentence": record.is_sentence,
                "text_index": record.text_index,
                "image_path": str(record.image_path),
            },
        )


__all__ = [
    "REASONSEG_SPLITS",
    "ReasonSegDataset",
    "has_target",
    "label_value",
    "parse_shapes",
    "read_annotation",
]
