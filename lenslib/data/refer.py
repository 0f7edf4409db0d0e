"""RefCOCO, RefCOCO+ and RefCOCOg in the layout LISA (and LENS) use.

Files, under a data root::

    refer_seg/
      refcoco/   refs(unc).p  instances.json      RefCOCO   (splits train/val/testA/testB)
      refcoco+/  refs(unc).p  instances.json      RefCOCO+  (splits train/val/testA/testB)
      refcocog/  refs(umd).p  instances.json      RefCOCOg  (splits train/val/test)
      images/mscoco/images/train2014/COCO_train2014_000000581857.jpg ...

``refs(<split_by>).p`` is a pickle holding a list of *refs*, one per referred object::

    {"ref_id": 0, "ann_id": 1719310, "image_id": 581857, "split": "testA",
     "category_id": 1, "sent_ids": [0, 1, 2], "file_name": "..._1719310.jpg" (unused),
     "sentences": [{"sent": "the lady with the blue shirt", "raw": "...", "tokens": [...],
                    "sent_id": 0}, ...]}

``instances.json`` is COCO: ``images`` (id, file_name, height, width) and ``annotations``
(id, image_id, category_id, bbox [x, y, w, h], segmentation: polygons or RLE, iscrowd).

Following the LISA protocol, every *sentence* is one sample; its mask is the referred
annotation's segmentation (polygons merged) and its box the annotation's bbox as corners.
RefCOCO and RefCOCO+ are evaluated on val/testA/testB (testA: people, testB: other objects),
RefCOCOg on val/test.

Masks are decoded as LISA decodes them (pycocotools ``frPyObjects`` + ``decode``): parts of a
polygon outside the image are clipped, and the sample is kept. A polygon with an odd number of
coordinates loses the last one (pycocotools reads ``len // 2`` vertices); polygons with fewer
than 3 vertices cover no pixel and are dropped (pycocotools would misread a 4-number polygon
as a box). Where parts overlap LISA sums them (value 2); we take their union.

The box is the annotation's bbox as corners, clipped to the image (LISA reads no bbox, so a
bbox never drops a sample); a bbox that is not 4 finite numbers with w, h >= 0, or none, gives
the mask's tight box instead.

What the loader does with bad input (decided case by case):

* unknown data set, ``split_by`` or split; missing, truncated or invalid ``refs(...).p`` or
  ``instances.json``: ``DataError`` naming the file at once (nothing can be loaded).
* one bad ref (missing annotation or image entry, missing image file, image size not the one
  in ``instances.json``, a segmentation that cannot be decoded at all, an empty segmentation,
  a sentence without text): skipped at construction, counted by reason in ``.skipped`` with
  messages in ``.skip_details``, and one warning; ``strict=True`` raises ``DataError``
  instead. Everything that can be checked without decoding pixels is checked up front, so an
  epoch does not stop half way. (LISA stops with an error on a missing image, and evaluates a
  sentence without text.)
* an image that exists but cannot be decoded: ``DataError`` naming the file when the sample is
  read (only a full decode finds a truncated JPEG body).
* ``empty_masks="keep"`` keeps refs with an empty segmentation as all-zero masks, as LISA's
  evaluation does; the default ``"skip"`` leaves them out (counted).

`expected_count` and `count_warning` compare a loaded split with the number of samples the
LISA protocol evaluates, so a report can say when its numbers are not comparable.

The pickle format can run code when loaded: only load files from a source you trust.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Mapping
from pathlib import Path

from lenslib.data.io import DataError, SkipLog, image_size, read_rgb
from lenslib.data.masks import (
    Box,
    clip_box,
    mask_to_box,
    segmentation_area,
    segmentation_to_mask,
)
from lenslib.data.sample import SegSample

# data set -> the split_by (annotation partition) LISA uses
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
SPLITS_BY = {
    "unc": ("train", "val", "testA", "testB"),
    "umd": ("train", "val", "test"),
    "google": ("train", "val"),
}
IMAGE_DIR = Path("refer_seg/images/mscoco/images/train2014")

# (data set, split) -> sentences the LISA protocol evaluates, with the default split_by
# (unc for RefCOCO and RefCOCO+, umd for RefCOCOg). One sentence is one ReferDataset sample.
LISA_SAMPLE_COUNTS: dict[tuple[str, str], int] = {
    ("refcoco", "val"): 10_834,
    ("refcoco", "testA"): 5_657,
    ("refcoco", "testB"): 5_095,
    ("refcoco+", "val"): 10_758,
    ("refcoco+", "testA"): 5_726,
    ("refcoco+", "testB"): 4_889,
    ("refcocog", "val"): 4_896,
    ("refcocog", "test"): 9_602,
}


def expected_count(dataset: str, split: str, *, split_by: str | None = None) -> int | None:
    """Samples the LISA protocol evaluates on a split, or None where none is known.

    The count is of *sentences*: LISA evaluates every sentence of every ref of the split, and
    `ReferDataset` yields one sample per sentence, so ``len(ReferDataset(root, dataset,
    split))`` compares like with like (a ref has one or more sentences: RefCOCO val has 3,811
    refs and 10,834 sentences). None for train splits, another ``split_by`` than LISA's
    (unc / umd) and data sets other than RefCOCO, RefCOCO+ and RefCOCOg.
    """
    if split_by is not None and split_by != DEFAULT_SPLIT_BY.get(dataset):
        return None
    return LISA_SAMPLE_COUNTS.get((dataset, split))


def count_warning(
    dataset: str,
    split: str,
    count: int,
    *,
    split_by: str | None = None,
    skipped: Mapping[str, int] | None = None,
) -> str | None:
    """A message when `count` samples of a whole split differ from `expected_count`, else None.

    Pass the length of the full loaded split (not of a ``@N`` subset) and, optionally, the
    loader's ``.skipped`` counts, which the message then names. None also when no count is known.
    """
    expected = expected_count(dataset, split, split_by=split_by)
    if expected is None or count == expected:
        return None
    difference = count - expected
    message = (
        f"{dataset}/{split}: {count:,} samples loaded, but the LISA protocol evaluates "
        f"{expected:,} sentences ({abs(difference):,} {'fewer' if difference < 0 else 'more'}); "
        "metrics on this split are not comparable with published numbers"
    )
    if skipped:
        message += f"; the loader skipped {dict(skipped)}"
    return message


def refs_path(root: str | Path, dataset: str, split_by: str) -> Path:
    """``{root}/refer_seg/{dataset}/refs({split_by}).p``."""
    return Path(root) / "refer_seg" / dataset / f"refs({split_by}).p"


def instances_path(root: str | Path, dataset: str) -> Path:
    """``{root}/refer_seg/{dataset}/instances.json``."""
    return Path(root) / "refer_seg" / dataset / "instances.json"


def load_refs(path: Path) -> list[dict]:
    """The list of refs from a ``refs(...).p`` pickle; DataError if missing or malformed."""
    if not path.is_file():
        raise DataError(f"{path}: refs pickle not found")
    try:
        with open(path, "rb") as f:
            refs = pickle.load(f)
    except Exception as err:  # truncated or corrupt pickles raise many different types
        raise DataError(
            f"{path}: cannot read the refs pickle ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise DataError(f"{path}: expected a list of ref dicts, got {type(refs).__name__}")
    return refs


def load_instances(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(images by id, annotations by id) from a COCO ``instances.json``."""
    if not path.is_file():
        raise DataError(f"{path}: instances.json not found")
    try:
        with open(path, encoding="utf-8") as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
        raise DataError(f"{path}: a COCO file needs 'images' and 'annotations'")
    try:
        images = {int(im["id"]): im for im in coco["images"]}
        anns = {int(ann["id"]): ann for ann in coco["annotations"]}
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: an image or annotation has no valid 'id' ({err})") from err
    return images, anns


def segmentation_problem(segmentation: object, height: int, width: int) -> tuple[str, str] | None:
    """Why a COCO segmentation gives no mask: (reason, detail), or None if it is fine.

    "invalid_segmentation" if it cannot be decoded (malformed structure, a coordinate that is
    not a finite number, a malformed RLE or one of another size), "empty_segmentation" if it
    covers no pixel; measured on the RLE, without decoding pixels. Vertices outside the image
    are fine: pycocotools clips them.
    """
    try:
        if isinstance(segmentation, list) and all(isinstance(p, list) for p in segmentation):
            segmentation = coco_polygons(segmentation)
        area = segmentation_area(segmentation, height, width)
    except (ValueError, TypeError) as err:
        return "invalid_segmentation", str(err)
    if area == 0:
        return "empty_segmentation", "the segmentation covers no pixel"
    return None


def coco_polygons(polygons: list) -> list[list[float]]:
    """The polygons pycocotools rasterises, as flat float lists; ValueError if not numbers.

    pycocotools reads ``len(p) // 2`` vertices, so an odd last coordinate is dropped; polygons
    with fewer than 3 vertices cover no pixel and are left out (pycocotools would read a
    4-number polygon as a box).
    """
    usable = []
    for k, polygon in enumerate(polygons):
        try:
            flat = [float(v) for v in polygon]
        except (TypeError, ValueError) as err:
            raise ValueError(f"polygon {k} has a coordinate that is not a number ({err})") from err
        if not all(math.isfinite(v) for v in flat):
            raise ValueError(f"polygon {k} has a non-finite coordinate")
        if len(flat) >= 6:
            usable.append(flat[: len(flat) // 2 * 2])
    return usable


def annotation_box(bbox: object, height: int, width: int) -> Box | None:
    """A COCO bbox [x, y, w, h] as corners clipped to the image; None if it is not usable."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w < 0 or h < 0:
        return None
    return clip_box((x, y, x + w, y + h), height, width)


class ReferDataset:
    """One SegSample per sentence of RefCOCO / RefCOCO+ / RefCOCOg (LISA layout), read lazily.

    ``ReferDataset(root, "refcoco", "testA")``; images are decoded in ``__getitem__``.
    ``.skipped`` counts the records left out by reason, ``.skip_details`` explains them.
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str = "refcoco",
        split: str = "val",
        split_by: str | None = None,
        *,
        empty_masks: str = "skip",
        check_images: bool = True,
        strict: bool = False,
    ) -> None:
        if dataset not in DEFAULT_SPLIT_BY:
            raise DataError(
                f"unknown refer data set {dataset!r}; expected {list(DEFAULT_SPLIT_BY)}"
            )
        split_by = split_by or DEFAULT_SPLIT_BY[dataset]
        if split_by not in SPLITS_BY:
            raise DataError(f"unknown split_by {split_by!r}; expected {list(SPLITS_BY)}")
        if split not in SPLITS_BY[split_by]:
            raise DataError(
                f"unknown split {split!r} for {dataset} ({split_by}); expected {SPLITS_BY[split_by]}"
            )
        if empty_masks not in ("skip", "keep"):
            raise ValueError(f"empty_masks must be 'skip' or 'keep', got {empty_masks!r}")
        self.root, self.dataset, self.split, self.split_by = Path(root), dataset, split, split_by
        self.empty_masks = empty_masks
        self.image_dir = self.root / IMAGE_DIR
        self._log = SkipLog(f"{dataset}/{split}", strict=strict)
        self._refs_file = refs_path(root, dataset, split_by)
        self._images, self._anns = load_instances(instances_path(root, dataset))
        self._checked_images: dict[int, tuple[str, str] | None] = {}
        # one record per sentence: (ref, ann, image info, sentence index)
        self.records: list[tuple[dict, dict, dict, int]] = []
        for ref in load_refs(self._refs_file):
            if ref.get("split") == split:
                self._add_ref(ref, check_images)
        self._log.report()

    @property
    def skipped(self) -> dict[str, int]:
        """Records left out, by reason."""
        return dict(self._log.counts)

    @property
    def skip_details(self) -> list[str]:
        return list(self._log.details)

    def _add_ref(self, ref: dict, check_images: bool) -> None:
        where = f"{self._refs_file}: ref {ref.get('ref_id', '?')}"
        try:
            ann = self._anns.get(int(ref["ann_id"]))
            info = self._images.get(int(ref["image_id"]))
            sentences = ref["sentences"]
        except (KeyError, TypeError, ValueError) as err:
            return self._log.skip("invalid_record", f"{where}: missing or bad field {err}")
        if ann is None:
            message = f"{where}: ann_id {ref['ann_id']} is not in instances.json"
            return self._log.skip("missing_annotation", message)
        if info is None:
            message = f"{where}: image_id {ref['image_id']} is not in instances.json"
            return self._log.skip("missing_image_info", message)
        problem = self._image_problem(info, check_images)
        if problem is None:
            problem = self._annotation_problem(ann, info)
        if problem is not None:
            return self._log.skip(problem[0], f"{where}: {problem[1]}")
        if not isinstance(sentences, list) or not sentences:
            return self._log.skip("no_sentences", f"{where}: no sentences")
        for k, sentence in enumerate(sentences):
            text = sentence.get("sent") if isinstance(sentence, dict) else None
            if not isinstance(text, str) or not text.strip():
                self._log.skip("invalid_sentence", f"{where}: sentence {k} has no 'sent' text")
                continue
            self.records.append((ref, ann, info, k))

    def _image_problem(self, info: dict, check_images: bool) -> tuple[str, str] | None:
        """Missing file / unreadable header / size differing from instances.json (cached)."""
        image_id = int(info["id"])
        if image_id not in self._checked_images:
            self._checked_images[image_id] = self._check_image(info, check_images)
        return self._checked_images[image_id]

    def _check_image(self, info: dict, check_images: bool) -> tuple[str, str] | None:
        try:
            path = self.image_dir / info["file_name"]
            height, width = int(info["height"]), int(info["width"])
        except (KeyError, TypeError, ValueError) as err:
            return "invalid_image_info", f"image {info.get('id')} lacks {err}"
        if not path.is_file():
            return "missing_image", f"image file {path} not found"
        if check_images:
            try:
                actual = image_size(path)
            except (OSError, ValueError, SyntaxError) as err:
                return "unreadable_image", f"{path}: {err}"
            if actual != (height, width):
                message = f"{path} is {actual} (h, w), instances.json says {(height, width)}"
                return "image_size_mismatch", message
        return None

    def _annotation_problem(self, ann: dict, info: dict) -> tuple[str, str] | None:
        height, width = int(info["height"]), int(info["width"])
        problem = segmentation_problem(ann.get("segmentation"), height, width)
        if problem is not None and not (
            problem[0] == "empty_segmentation" and self.empty_masks == "keep"
        ):
            return problem[0], f"annotation {ann.get('id')}: {problem[1]}"
        return None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> SegSample:
        ref, ann, info, k = self.records[index]
        sentence = ref["sentences"][k]
        sent_id = sentence.get("sent_id", k)
        sample_id = f"{self.dataset}/{self.split}/ref{ref['ref_id']}/sent{sent_id}"
        path = self.image_dir / info["file_name"]
        image = read_rgb(path, sample_id)
        height, width = int(info["height"]), int(info["width"])
        if image.shape[:2] != (height, width):
            raise DataError(
                f"{path}: decoded size {image.shape[:2]} != {(height, width)} of {sample_id}"
            )
        segmentation = ann["segmentation"]
        if isinstance(segmentation, list) and all(isinstance(p, list) for p in segmentation):
            segmentation = coco_polygons(segmentation)
        mask = segmentation_to_mask(segmentation, height, width)
        box = annotation_box(ann.get("bbox"), height, width)
        return SegSample(
            image=image,
            text=sentence["sent"].strip(),
            mask=mask,
            box=box if box is not None else mask_to_box(mask) or (0.0, 0.0, 0.0, 0.0),
            sample_id=sample_id,
            source=self.dataset,
            meta=_meta(self, ref, ann, info, sent_id, path),
        )


def _meta(
    data: ReferDataset, ref: Mapping, ann: Mapping, info: Mapping, sent_id: int, path: Path
) -> dict:
    return {
        "dataset": data.dataset,
        "split": data.split,
        "split_by": data.split_by,
        "ref_id": ref["ref_id"],
        "ann_id": ann["id"],
        "image_id": info["id"],
        "sent_id": sent_id,
        "category_id": ref.get("category_id", ann.get("category_id")),
        "image_path": str(path),
    }


__all__ = [
    "DEFAULT_SPLIT_BY",
    "IMAGE_DIR",
    "LISA_SAMPLE_COUNTS",
    "SPLITS_BY",
    "ReferDataset",
    "annotation_box",
    "coco_polygons",
    "count_warning",
    "expected_count",
    "instances_path",
    "load_instances",
    "load_refs",
    "refs_path",
    "segmentation_problem",
]
