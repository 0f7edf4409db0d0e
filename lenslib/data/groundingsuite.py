"""GroundingSuite-Eval (GSEval): referring expressions on COCO unlabeled2017 images.

The public ``GroundingSuite-Eval.jsonl`` has 3,715 lines (its README speaks of 3,800), all
with a compressed RLE of the image's size, a non-empty mask and a box inside the image, so
this loader skips none of them when the images are all there.

One JSON object per line of ``GroundingSuite-Eval.jsonl``::

    {"idx": 0, "image_path": "unlabeled2017/000000000267.jpg", "class_id": 1,
     "label": "a trail of white smoke",
     "caption": "A trail of white smoke follows the plane, trailing behind it.",
     "box": [0.32, 249.23, 416.96, 404.96],                          corners x1, y1, x2, y2
     "segmentation": {"size": [504, 640], "counts": "S9]3Z<2O0..."}}  compressed RLE

``image_path`` is relative to an image folder (``image_root``, by default the folder of the
jsonl file). ``segmentation`` may also be a list of RLEs, merged with a union. The sample text
is the ``caption`` (LENS evaluates with it); ``text_field="label"`` uses the short phrase.
The box is the file's box (floats, corners); a record without one gets the mask's tight box.
``empty_masks="keep"`` keeps records whose mask is empty (GroundingSuite's own evaluation
scores them); the default ``"skip"`` leaves them out (counted as "empty_segmentation").

Bad input, decided case by case:

* missing jsonl file: ``DataError`` at once.
* one bad line (invalid or truncated JSON, a missing field, image missing or with an
  unreadable header, RLE malformed or of another size than the image, an empty mask, a box
  that is not 4 ordered corners inside the image): skipped at construction, counted by reason
  in ``.skipped`` (messages name the file and line, in ``.skip_details``), one warning;
  ``strict=True`` raises ``DataError`` instead. Blank lines are ignored.
* an image that cannot be decoded when read: ``DataError`` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from lenslib.data.io import DataError, SkipLog, image_size, read_rgb
from lenslib.data.masks import (
    check_box,
    mask_to_box,
    segmentation_area,
    segmentation_to_mask,
)
from lenslib.data.sample import SegSample

GROUNDINGSUITE_FILE = "GroundingSuite-Eval.jsonl"


class GroundingSuiteDataset:
    """One SegSample per line of a GroundingSuite-Eval jsonl file, images read lazily.

    ``.skipped`` counts the lines left out by reason, ``.skip_details`` explains them.
    """

    def __init__(
        self,
        jsonl_path: str | Path,
        image_root: str | Path | None = None,
        *,
        text_field: str = "caption",
        box_tolerance: float = 1.0,
        empty_masks: str = "skip",
        strict: bool = False,
    ) -> None:
        if empty_masks not in ("skip", "keep"):
            raise ValueError(f"empty_masks must be 'skip' or 'keep', got {empty_masks!r}")
        self.empty_masks = empty_masks
        self.jsonl_path = Path(jsonl_path)
        if not self.jsonl_path.is_file():
            raise DataError(f"{self.jsonl_path}: GroundingSuite jsonl file not found")
        self.image_root = Path(image_root) if image_root is not None else self.jsonl_path.parent
        self.text_field, self.tolerance = text_field, box_tolerance
        self._log = SkipLog(f"groundingsuite ({self.jsonl_path.name})", strict=strict)
        self.records: list[tuple[int, dict, int, int]] = []  # (line, record, height, width)
        with open(self.jsonl_path, "rb") as f:
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    self._add_line(line, line_number)
        self._log.report()

    @property
    def skipped(self) -> dict[str, int]:
        """Lines left out, by reason."""
        return dict(self._log.counts)

    @property
    def skip_details(self) -> list[str]:
        return list(self._log.details)

    def _add_line(self, line: bytes, line_number: int) -> None:
        where = f"{self.jsonl_path}:{line_number}"
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return self._log.skip("invalid_json", f"{where}: invalid JSON ({err})")
        if not isinstance(record, dict):
            return self._log.skip("invalid_record", f"{where}: not a JSON object")
        missing = [k for k in ("image_path", "segmentation", self.text_field) if k not in record]
        if missing:
            return self._log.skip("invalid_record", f"{where}: missing field(s) {missing}")
        text = record[self.text_field]
        if not isinstance(text, str) or not text.strip():
            return self._log.skip("empty_text", f"{where}: {self.text_field!r} is empty")
        path = self.image_root / str(record["image_path"])
        if not path.is_file():
            return self._log.skip("missing_image", f"{where}: image {path} not found")
        try:
            height, width = image_size(path)
        except (OSError, ValueError, SyntaxError) as err:
            return self._log.skip("unreadable_image", f"{where}: {path}: {err}")
        try:
            area = segmentation_area(record["segmentation"], height, width)
        except (ValueError, TypeError, KeyError) as err:
            return self._log.skip("invalid_segmentation", f"{where}: {err}")
        if area == 0 and self.empty_masks == "skip":
            return self._log.skip("empty_segmentation", f"{where}: the mask is empty")
        if "box" in record:
            try:
                check_box(record["box"], height, width, self.tolerance)
            except (ValueError, TypeError) as err:
                return self._log.skip("invalid_box", f"{where}: {err}")
        self.records.append((line_number, record, height, width))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> SegSample:
        line_number, record, height, width = self.records[index]
        sample_id = f"groundingsuite/{record.get('idx', line_number)}"
        path = self.image_root / str(record["image_path"])
        image = read_rgb(path, sample_id)
        if image.shape[:2] != (height, width):
            raise DataError(f"{path}: decoded size changed since indexing ({sample_id})")
        mask = segmentation_to_mask(record["segmentation"], height, width)
        if "box" in record:
            box = tuple(float(v) for v in record["box"])
        else:
            box = mask_to_box(mask) or (0.0, 0.0, 0.0, 0.0)
        return SegSample(
            image=image,
            text=record[self.text_field].strip(),
            mask=mask,
            box=box,
            sample_id=sample_id,
            source="groundingsuite",
            meta={
                "dataset": "groundingsuite",
                "idx": record.get("idx"),
                "line": line_number,
                "label": record.get("label"),
                "caption": record.get("caption"),
                "class_id": record.get("class_id"),
                "image_path": str(path),
            },
        )


__all__ = ["GROUNDINGSUITE_FILE", "GroundingSuiteDataset"]
