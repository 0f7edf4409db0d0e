"""Write samples (e.g. a toy split) to disk in the real data sets' formats.

So the loaders that read RefCOCO, ReasonSeg and GroundingSuite read the toy world through the
very same code (and tests can build small data sets in the real formats):

* `write_refer`: ``refer_seg/<dataset>/refs(<split_by>).p`` + ``instances.json`` + images
  under ``refer_seg/images/mscoco/images/train2014/``. One COCO image, annotation and ref with
  one sentence per sample. The segmentation is a compressed RLE (``iscrowd=1``), or, with
  ``segmentation="polygons"``, exact pixel-edge rectangles (``iscrowd=0``, like most COCO
  objects); both decode to the sample's mask exactly.
* `write_reasonseg`: ``ReasonSeg/<split>/<name>.<ext>`` + ``<name>.json`` with the target as
  "target" polygons and ignore pixels (255) as "ignore" polygons, their vertices on pixel
  centres so that LISA's OpenCV painting gives back the mask exactly.
* `write_groundingsuite`: ``GroundingSuite-Eval.jsonl`` + ``images/<name>.<ext>``.
* `write_toy_benchmarks`: all three from a `ToyWorld`, with the toy splits mapped onto each
  benchmark's split names.

Images are PNG by default (lossless: a round trip gives back the pixels); ``image_format=
"jpg"`` writes JPEG like the real data sets (quality 95, so pixels change slightly; masks and
boxes never do, they live in the annotation files).
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from lenslib.data.groundingsuite import GROUNDINGSUITE_FILE
from lenslib.data.masks import (
    mask_to_lisa_polygons,
    mask_to_polygons,
    mask_to_rle,
    xyxy_to_xywh,
)
from lenslib.data.reasonseg import REASONSEG_SPLITS
from lenslib.data.refer import DEFAULT_SPLIT_BY, IMAGE_DIR, SPLITS_BY, instances_path, refs_path
from lenslib.data.sample import IGNORE_LABEL, SegSample

IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG"}


def save_image(image: np.ndarray, path: Path, image_format: str) -> None:
    """Save (H, W, 3) uint8 RGB as PNG (lossless) or JPEG (quality 95)."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {list(IMAGE_FORMATS)}, got {image_format!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95} if image_format == "jpg" else {}
    Image.fromarray(image).save(path, IMAGE_FORMATS[image_format], **options)


def file_stem(sample_id: str) -> str:
    """A file-name-safe stem from a sample id ("toy/val/0000003" -> "toy_val_0000003").

    "+" becomes "plus", so RefCOCO and RefCOCO+ written under one root never share a file name.
    """
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", sample_id.replace("+", "plus")).strip("_")


def write_refer(
    splits: Mapping[str, Sequence[SegSample]],
    root: str | Path,
    dataset: str = "refcoco",
    split_by: str | None = None,
    image_format: str = "png",
    segmentation: str = "rle",
) -> Path:
    """Write {split name: samples} as one RefCOCO-style data set; returns the refs file."""
    split_by = split_by or DEFAULT_SPLIT_BY[dataset]
    unknown = [s for s in splits if s not in SPLITS_BY[split_by]]
    if unknown:
        raise ValueError(f"splits {unknown} do not exist in {dataset} ({split_by})")
    if segmentation not in ("rle", "polygons"):
        raise ValueError(f"segmentation must be 'rle' or 'polygons', got {segmentation!r}")
    root = Path(root)
    images, annotations, refs, categories = [], [], [], {}
    for split, samples in splits.items():
        for sample in samples:
            ident = len(refs) + 1  # image, annotation, ref and sentence share one number
            name = f"{file_stem(dataset)}_{ident:012d}.{image_format}"
            save_image(sample.image, root / IMAGE_DIR / name, image_format)
            height, width = sample.mask.shape
            category = str(sample.meta.get("category", "object"))
            category_id = categories.setdefault(category, len(categories) + 1)
            images.append({"id": ident, "file_name": name, "height": height, "width": width})
            annotations.append(_coco_annotation(sample, ident, category_id, segmentation))
            refs.append(
                {
                    "ref_id": ident,
                    "ann_id": ident,
                    "image_id": ident,
                    "split": split,
                    "category_id": category_id,
                    "sent_ids": [ident],
                    "file_name": f"{Path(name).stem}_{ident}.{image_format}",
                    "sentences": [
                        {
                            "sent": sample.text,
                            "raw": sample.text,
                            "tokens": sample.text.split(),
                            "sent_id": ident,
                        }
                    ],
                }
            )
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for n, i in categories.items()],
    }
    instances = instances_path(root, dataset)
    instances.parent.mkdir(parents=True, exist_ok=True)
    instances.write_text(json.dumps(coco), encoding="utf-8")
    path = refs_path(root, dataset, split_by)
    with open(path, "wb") as f:
        pickle.dump(refs, f)
    return path


def _coco_annotation(sample: SegSample, ident: int, category_id: int, segmentation: str) -> dict:
    """A COCO annotation whose segmentation decodes exactly to the sample's mask."""
    target = sample.mask == 1
    if segmentation == "rle":
        seg, iscrowd = mask_to_rle(target), 1
    else:
        seg, iscrowd = mask_to_polygons(target), 0
    return {
        "id": ident,
        "image_id": ident,
        "category_id": category_id,
        "segmentation": seg,
        "area": int(target.sum()),
        "bbox": list(xyxy_to_xywh(sample.box)),
        "iscrowd": iscrowd,
    }


def write_reasonseg(
    samples: Sequence[SegSample], root: str | Path, split: str, image_format: str = "png"
) -> Path:
    """Write samples as ``ReasonSeg/<split>/`` image + JSON pairs; returns the folder."""
    if split not in REASONSEG_SPLITS:
        raise ValueError(f"ReasonSeg split must be one of {REASONSEG_SPLITS}, got {split!r}")
    folder = Path(root) / "ReasonSeg" / split
    for sample in samples:
        stem = file_stem(sample.sample_id)
        save_image(sample.image, folder / f"{stem}.{image_format}", image_format)
        shapes = [_labelme_shape("target", p) for p in mask_to_lisa_polygons(sample.mask == 1)]
        shapes += [
            _labelme_shape("ignore", p) for p in mask_to_lisa_polygons(sample.mask == IGNORE_LABEL)
        ]
        height, width = sample.mask.shape
        annotation = {
            "text": [sample.text],
            "is_sentence": sample.meta.get("difficulty") == "reasoning",
            "shapes": shapes,
            "imagePath": f"{stem}.{image_format}",
            "imageHeight": height,
            "imageWidth": width,
        }
        (folder / f"{stem}.json").write_text(json.dumps(annotation), encoding="utf-8")
    return folder


def _labelme_shape(label: str, points: list[list[int]]) -> dict:
    return {"label": label, "points": points, "shape_type": "polygon"}


def write_groundingsuite(
    samples: Sequence[SegSample], root: str | Path, image_format: str = "png"
) -> Path:
    """Write samples as ``GroundingSuite-Eval.jsonl`` + ``images/``; returns the jsonl path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for idx, sample in enumerate(samples):
        image_path = f"images/{file_stem(sample.sample_id)}.{image_format}"
        save_image(sample.image, root / image_path, image_format)
        record = {
            "idx": idx,
            "image_path": image_path,
            "class_id": 1,
            "label": sample.text,
            "caption": sample.text,
            "box": [float(v) for v in sample.box],
            "segmentation": mask_to_rle(sample.mask == 1),
        }
        lines.append(json.dumps(record))
    path = root / GROUNDINGSUITE_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_toy_benchmarks(
    world, root: str | Path, sizes: Mapping[str, int], image_format: str = "png"
) -> dict[str, Path]:
    """Write a world of samples as all three benchmarks; `world` has `.split(name, n)`
    returning a split's first n samples, as the toy world does.

    `sizes` gives the number of samples per toy split ("train", "val", "testA", "testB").
    RefCOCO layout: the toy splits keep their names (they are RefCOCO's unc splits).
    ReasonSeg: toy train -> train, val -> val, testB (reasoning) -> test.
    GroundingSuite-Eval: testA followed by testB.
    """
    root = Path(root)
    splits = {name: world.split(name, n) for name, n in sizes.items() if n > 0}
    reason_map = {"train": "train", "val": "val", "testB": "test"}
    paths = {"refcoco": write_refer(splits, root, "refcoco", image_format=image_format)}
    for toy_split, reason_split in reason_map.items():
        if toy_split in splits:
            paths[f"reasonseg/{reason_split}"] = write_reasonseg(
                splits[toy_split], root, reason_split, image_format
            )
    evaluation = splits.get("testA", []) + splits.get("testB", [])
    if evaluation:
        paths["groundingsuite"] = write_groundingsuite(
            evaluation, root / "GroundingSuite", image_format
        )
    return paths


__all__ = [
    "file_stem",
    "save_image",
    "write_groundingsuite",
    "write_reasonseg",
    "write_refer",
    "write_toy_benchmarks",
]
