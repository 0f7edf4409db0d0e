"""Tests of masks helpers, real-format loaders (RefCOCO/+/g, ReasonSeg, GroundingSuite) and
writers. Every test writes its own small files in the real formats under tmp_path."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from pycocotools import mask as mask_utils

from lenslib.data.groundingsuite import GroundingSuiteDataset
from lenslib.data.io import DataError, SkipLog, image_size, read_rgb
from lenslib.data.masks import (
    check_box,
    mask_to_box,
    mask_to_polygons,
    mask_to_rle,
    paint_polygons_like_lisa,
    polygons_to_mask,
    rle_string_to_counts,
    rle_to_mask,
    segmentation_area,
    segmentation_to_mask,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from lenslib.data.reasonseg import ReasonSegDataset, label_value
from lenslib.data.refer import IMAGE_DIR, ReferDataset
from lenslib.data.writers import (
    write_groundingsuite,
    write_reasonseg,
    write_refer,
    write_toy_benchmarks,
)
from lenslib.toy import ToyWorld

H, W = 20, 30
RECT = [2.0, 3.0, 7.0, 3.0, 7.0, 9.0, 2.0, 9.0]  # pixels x 2..6, y 3..8


def _rect_mask(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def _image(path: Path, height: int = H, width: int = W, seed: int = 0) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def _runs_column_major(mask: np.ndarray) -> list[int]:
    flat = mask.T.ravel()
    runs, value, length = [], 0, 0
    for v in flat:
        if v == value:
            length += 1
        else:
            runs.append(length)
            value, length = v, 1
    runs.append(length)
    return runs


# --------------------------------------------------------------------------------- io.py


def test_skip_log_counts_keeps_first_messages_and_warns_once():
    log = SkipLog("demo", keep=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log.report()  # nothing skipped: no warning
    log.skip("empty_mask", "a.json: empty")
    log.skip("empty_mask", "b.json: empty")
    log.skip("bad_box", "c.json: box")
    assert log.counts == {"empty_mask": 2, "bad_box": 1} and log.details == ["a.json: empty"]
    with pytest.warns(UserWarning, match=r"demo: skipped 3 record\(s\).*first: a.json"):
        log.report()
    with pytest.raises(DataError, match="c.json: box"):
        SkipLog("demo", strict=True).skip("bad_box", "c.json: box")


def test_image_size_and_read_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.full((5, 7), 200, dtype=np.uint8)).save(path)
    assert image_size(path) == (5, 7)
    rgb = read_rgb(path, "s0")
    assert rgb.shape == (5, 7, 3) and rgb.dtype == np.uint8 and np.all(rgb == 200)
    with pytest.raises(DataError, match="missing.png: image of s1 is missing"):
        read_rgb(tmp_path / "missing.png", "s1")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.jpg: cannot decode the image of s2"):
        read_rgb(tmp_path / "bad.jpg", "s2")


# ------------------------------------------------------------------------------ masks.py


def test_polygon_rasterises_on_pixel_edges_and_parts_merge():
    assert np.array_equal(polygons_to_mask([RECT], H, W), _rect_mask(2, 3, 7, 9))
    overlapping = [RECT, [4.0, 3.0, 10.0, 3.0, 10.0, 9.0, 4.0, 9.0]]
    merged = polygons_to_mask(overlapping, H, W)
    assert merged.max() == 1 and np.array_equal(merged, _rect_mask(2, 3, 10, 9))
    assert polygons_to_mask([], H, W).sum() == 0


@pytest.mark.parametrize(
    "polygon", [[1.0, 2.0, 3.0], [1.0, 1.0, 3.0, 3.0], [0, 0, 1, 0, 1, np.nan]]
)
def test_bad_polygons_are_rejected(polygon):
    with pytest.raises(ValueError):
        polygons_to_mask([polygon], H, W)


@settings(max_examples=40, deadline=None)
@given(
    arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.integers(0, 1))
)
def test_mask_polygons_and_rle_round_trip_exactly(mask):
    height, width = mask.shape
    polygons = mask_to_polygons(mask)
    assert np.array_equal(polygons_to_mask(polygons, height, width), mask)
    rle = mask_to_rle(mask)
    assert isinstance(rle["counts"], str)
    assert rle_string_to_counts(rle["counts"]) == _runs_column_major(mask)
    assert np.array_equal(rle_to_mask(rle), mask)
    assert segmentation_area(rle, height, width) == mask.sum()


def test_rle_forms_decode_alike():
    mask = _rect_mask(2, 3, 7, 9)
    rle = mask_to_rle(mask)
    as_bytes = {"size": rle["size"], "counts": rle["counts"].encode()}
    uncompressed = {"size": [H, W], "counts": _runs_column_major(mask)}
    for form in (rle, as_bytes, uncompressed):
        assert np.array_equal(rle_to_mask(form, H, W), mask)
    two = [mask_to_rle(_rect_mask(0, 0, 2, 2)), mask_to_rle(_rect_mask(1, 1, 4, 4))]
    union = segmentation_to_mask(two, H, W)
    assert union.max() == 1 and union.sum() == 4 + 9 - 1
    assert segmentation_area(two, H, W) == 12


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ({"size": [H, W], "counts": [5, 3]}, "add up"),  # pycocotools would decode garbage
        ({"size": [H, W], "counts": "0"}, "add up"),
        ({"size": [H, W], "counts": [-5, 605]}, "negative"),
        ({"size": [H, W + 1], "counts": [H * (W + 1)]}, "does not match"),
        ({"size": [H, W], "counts": 7}, "counts must be"),
        ({"counts": "abc"}, "size"),
    ],
)
def test_malformed_rle_is_rejected(rle, message):
    with pytest.raises(ValueError, match=message):
        rle_to_mask(rle, H, W)


def test_segmentation_mixing_polygons_and_rle_is_rejected():
    with pytest.raises(ValueError, match="mixes"):
        segmentation_to_mask([RECT, mask_to_rle(_rect_mask(0, 0, 1, 1))], H, W)


def test_boxes():
    mask = _rect_mask(2, 3, 7, 9)
    assert mask_to_box(mask) == (2.0, 3.0, 7.0, 9.0)  # x2, y2: edge after the last pixel
    x, y, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask)))
    assert xywh_to_xyxy([x, y, w, h]) == mask_to_box(mask)  # same convention as COCO
    assert mask_to_box(np.zeros((3, 3))) is None
    ignore = np.full((4, 4), 255, dtype=np.uint8)
    assert mask_to_box(ignore, 255) == (0.0, 0.0, 4.0, 4.0)
    assert xyxy_to_xywh(xywh_to_xyxy([1.5, 2, 3, 4])) == (1.5, 2.0, 3.0, 4.0)
    check_box([0, 0, W, H], H, W)
    for bad in ([5, 5, 1, 8], [0, 0, W + 5, H], [0, 0, 1], [0, 0, float("nan"), 1]):
        with pytest.raises(ValueError):
            check_box(bad, H, W)


def test_paint_like_lisa_paints_the_largest_shape_first():
    target = [[0, 0], [19, 0], [19, 19], [0, 19]]
    hole = [[5, 5], [9, 5], [9, 9], [5, 9]]
    mask = paint_polygons_like_lisa([(hole, 255), (target, 1)], H, W)  # file order: hole first
    assert mask[7, 7] == 255 and mask[1, 1] == 1 and mask[1, 25] == 0
    assert (mask == 255).sum() == 25 and (mask == 1).sum() == 400 - 25  # boundary included
    mask = paint_polygons_like_lisa([(target, 255), (hole, 1)], H, W)
    assert mask[7, 7] == 1 and mask[1, 1] == 255
    assert label_value("flag") is None and label_value("Ignore_2") == 255
    assert label_value("target") == 1


# ------------------------------------------------------------------------------- RefCOCO


def _refer_files(root: Path, dataset: str = "refcoco", refs=None, anns=None, images=None):
    """A small refer data set: images 1 (png) and 2 (jpg), annotations 10 (polygons), 11
    (compressed RLE), 12 (uncompressed RLE) and refs in several splits."""
    image_dir = root / IMAGE_DIR
    _image(image_dir / "a.png", seed=1)
    _image(image_dir / "b.jpg", seed=2)
    if images is None:
        images = [
            {"id": 1, "file_name": "a.png", "height": H, "width": W},
            {"id": 2, "file_name": "b.jpg", "height": H, "width": W},
        ]
    if anns is None:
        anns = [
            {"id": 10, "image_id": 1, "segmentation": [RECT, [1, 1, 2, 2]], "bbox": [2, 3, 5, 6]},
            {
                "id": 11,
                "image_id": 2,
                "segmentation": mask_to_rle(_rect_mask(0, 0, 4, 4)),
                "bbox": [0, 0, 4, 4],
            },
            {
                "id": 12,
                "image_id": 2,
                "bbox": [5, 5, 1, 1],
                "segmentation": {
                    "size": [H, W],
                    "counts": _runs_column_major(_rect_mask(5, 5, 6, 6)),
                },
            },
        ]
    if refs is None:
        refs = [
            _ref(0, 10, 1, "testA", ["the left box", "box on the left"]),
            _ref(1, 11, 2, "testA", ["the corner"]),
            _ref(2, 12, 2, "val", ["the dot"]),
        ]
    folder = root / "refer_seg" / dataset
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "instances.json").write_text(json.dumps({"images": images, "annotations": anns}))
    split_by = "umd" if dataset == "refcocog" else "unc"
    with open(folder / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f)
    return folder


def _ref(ref_id: int, ann_id: int, image_id: int, split: str, sents: list[str]) -> dict:
    return {
        "ref_id": ref_id,
        "ann_id": ann_id,
        "image_id": image_id,
        "split": split,
        "category_id": 1,
        "sent_ids": list(range(len(sents))),
        "sentences": [
            {"sent": s, "raw": s, "tokens": s.split(), "sent_id": 100 * ref_id + k}
            for k, s in enumerate(sents)
        ],
    }


def test_refer_one_sample_per_sentence_with_exact_masks(tmp_path):
    _refer_files(tmp_path)
    data = ReferDataset(tmp_path, "refcoco", "testA")
    assert len(data) == 3 and data.skipped == {}
    first, second, corner = data[0], data[1], data[2]
    assert (first.text, second.text, corner.text) == (
        "the left box",
        "box on the left",
        "the corner",
    )
    assert np.array_equal(first.mask, _rect_mask(2, 3, 7, 9))  # the 2-vertex polygon is dropped
    assert first.box == (2.0, 3.0, 7.0, 9.0)
    assert first.sample_id == "refcoco/testA/ref0/sent0" and second.sample_id.endswith("sent1")
    assert np.array_equal(first.image, np.asarray(Image.open(tmp_path / IMAGE_DIR / "a.png")))
    assert corner.image.shape == (H, W, 3)  # a .jpg reads like a .png
    assert np.array_equal(corner.mask, _rect_mask(0, 0, 4, 4))
    assert first.meta["ann_id"] == 10 and first.source == "refcoco"
    val = ReferDataset(tmp_path, "refcoco", "val")
    assert len(val) == 1 and np.array_equal(val[0].mask, _rect_mask(5, 5, 6, 6))
    assert len(ReferDataset(tmp_path, "refcoco", "testB")) == 0


def test_refer_split_names(tmp_path):
    _refer_files(tmp_path, "refcocog", refs=[_ref(0, 10, 1, "test", ["x"])])
    assert len(ReferDataset(tmp_path, "refcocog", "test")) == 1
    with pytest.raises(DataError, match="unknown split 'testA'"):
        ReferDataset(tmp_path, "refcocog", "testA")
    with pytest.raises(DataError, match="unknown split 'test'"):
        ReferDataset(tmp_path, "refcoco", "test")
    with pytest.raises(DataError, match="unknown refer data set"):
        ReferDataset(tmp_path, "refclef", "val")
    with pytest.raises(DataError, match="split_by"):
        ReferDataset(tmp_path, "refcoco", "val", split_by="nope")


def test_refer_missing_or_corrupt_index_files(tmp_path):
    with pytest.raises(DataError, match="instances.json not found"):
        ReferDataset(tmp_path, "refcoco", "val")
    folder = _refer_files(tmp_path)
    refs_file = folder / "refs(unc).p"
    refs_file.write_bytes(refs_file.read_bytes()[:-20])  # truncated pickle
    with pytest.raises(DataError, match=r"refs\(unc\)\.p: cannot read"):
        ReferDataset(tmp_path, "refcoco", "val")
    refs_file.write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(DataError, match="list of ref dicts"):
        ReferDataset(tmp_path, "refcoco", "val")
    instances = folder / "instances.json"
    instances.write_text(instances.read_text()[:-30])  # truncated JSON
    with pytest.raises(DataError, match="instances.json: invalid JSON"):
        ReferDataset(tmp_path, "refcoco", "val")
    _refer_files(tmp_path)  # valid files again, then remove the pickle
    refs_file.unlink()
    with pytest.raises(DataError, match="refs pickle not found"):
        ReferDataset(tmp_path, "refcoco", "val")


def _bad_refer(tmp_path: Path, ann: dict, image: dict | None = None, **kwargs) -> ReferDataset:
    images = [image or {"id": 1, "file_name": "a.png", "height": H, "width": W}]
    _refer_files(tmp_path, anns=[ann], images=images, refs=[_ref(7, ann["id"], 1, "val", ["x"])])
    return ReferDataset(tmp_path, "refcoco", "val", **kwargs)


@pytest.mark.parametrize(
    ("ann", "image", "reason"),
    [
        (
            {"id": 10, "image_id": 1, "segmentation": [RECT]},
            {"id": 1, "file_name": "gone.jpg", "height": H, "width": W},
            "missing_image",
        ),
        (
            {"id": 10, "image_id": 1, "segmentation": [RECT]},
            {"id": 1, "file_name": "a.png", "height": H + 1, "width": W},
            "image_size_mismatch",
        ),
        ({"id": 10, "image_id": 1, "segmentation": []}, None, "empty_segmentation"),
        (
            {"id": 10, "image_id": 1, "segmentation": {"size": [H, W], "counts": [3]}},
            None,
            "invalid_segmentation",
        ),
        (
            {"id": 10, "image_id": 1, "segmentation": [[1, 2, 3, 4, 5]]},  # 2 vertices: no area
            None,
            "empty_segmentation",
        ),
        (
            {"id": 10, "image_id": 1, "segmentation": [[2, 3, "x", 3, 7, 9]]},
            None,
            "invalid_segmentation",
        ),
        (
            {"id": 10, "image_id": 1, "segmentation": [[2, 3, 7, 3, 7, float("nan")]]},
            None,
            "invalid_segmentation",
        ),
    ],
)
def test_refer_bad_records_are_skipped_counted_and_reported(tmp_path, ann, image, reason):
    with pytest.warns(UserWarning, match=reason):
        data = _bad_refer(tmp_path, ann, image)
    assert len(data) == 0 and data.skipped == {reason: 1}
    assert "ref 7" in data.skip_details[0] and "refs(unc).p" in data.skip_details[0]
    with pytest.raises(DataError, match="ref 7"):
        _bad_refer(tmp_path, ann, image, strict=True)


def test_refer_ref_without_annotation_or_sentences(tmp_path):
    refs = [_ref(7, 99, 1, "val", ["x"]), _ref(8, 10, 1, "val", []), _ref(9, 10, 1, "val", [""])]
    _refer_files(tmp_path, refs=refs)
    with pytest.warns(UserWarning, match="missing_annotation"):
        data = ReferDataset(tmp_path, "refcoco", "val")
    assert len(data) == 0
    assert data.skipped == {"missing_annotation": 1, "no_sentences": 1, "invalid_sentence": 1}


def test_refer_empty_masks_can_be_kept_like_lisa(tmp_path):
    ann = {"id": 10, "image_id": 1, "segmentation": [], "bbox": [0, 0, 0, 0]}
    data = _bad_refer(tmp_path, ann, empty_masks="keep")
    assert len(data) == 1 and data[0].mask.sum() == 0


def test_refer_unreadable_images(tmp_path):
    _refer_files(tmp_path)
    (tmp_path / IMAGE_DIR / "b.jpg").write_bytes(b"not an image at all")
    with pytest.warns(UserWarning, match="unreadable_image"):
        data = ReferDataset(tmp_path, "refcoco", "testA")
    assert len(data) == 2 and data.skipped == {"unreadable_image": 1}
    # a JPEG whose header is fine but whose body is cut: found only when decoded
    path = tmp_path / IMAGE_DIR / "b.jpg"
    _image(path, seed=3)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) * 2 // 3])
    data = ReferDataset(tmp_path, "refcoco", "val")
    with pytest.raises(DataError, match="b.jpg: cannot decode"):
        data[0]


# ----------------------------------------------------------------------------- ReasonSeg


def _reason_files(folder: Path, name: str, annotation: dict | str, image: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if image:
        _image(folder / f"{name}.jpg")
    text = annotation if isinstance(annotation, str) else json.dumps(annotation)
    (folder / f"{name}.json").write_text(text)


def _points(polygon: list[float]) -> list[list[float]]:
    return [[polygon[i], polygon[i + 1]] for i in range(0, len(polygon), 2)]


GOOD = {
    "text": ["What keeps the rain off?", "the umbrella"],
    "is_sentence": True,
    "shapes": [
        {"label": "target", "points": _points([0, 0, 12, 0, 12, 10, 0, 10])},
        {"label": "ignore", "points": _points([2, 2, 4, 2, 4, 4, 2, 4])},
        {"label": "flag", "points": [[0, 0]]},
    ],
}


def test_reasonseg_samples_per_text_with_ignore_pixels(tmp_path):
    folder = tmp_path / "ReasonSeg" / "val"
    _reason_files(folder, "img1", GOOD)
    data = ReasonSegDataset(tmp_path, "val")
    assert len(data) == 2 and data.skipped == {}
    sample = data[0]
    assert sample.text == "What keeps the rain off?" and data[1].text == "the umbrella"
    assert sample.mask[3, 3] == 255 and sample.mask[0, 0] == 1 and sample.mask[15, 20] == 0
    assert (sample.mask == 1).sum() == 13 * 11 - 9  # OpenCV paints the boundary pixels too
    assert sample.box == (0.0, 0.0, 13.0, 11.0)
    assert sample.meta["is_sentence"] is True and sample.sample_id == "reasonseg/val/img1/0"
    assert len(ReasonSegDataset(tmp_path, "val", texts="first")) == 1  # LISA's evaluation


def test_reasonseg_reads_cp1252_json(tmp_path):
    folder = tmp_path / "ReasonSeg" / "train"
    _reason_files(folder, "img1", GOOD)
    text = json.dumps(dict(GOOD, text=["the café sign"]), ensure_ascii=False)
    (folder / "img1.json").write_bytes(text.encode("cp1252"))
    assert ReasonSegDataset(tmp_path, "train")[0].text == "the café sign"


@pytest.mark.parametrize(
    ("annotation", "reason"),
    [
        (json.dumps(GOOD)[:-15], "invalid_json"),
        (dict(GOOD, text=[]), "no_text"),
        (dict(GOOD, shapes=[{"label": "target", "points": []}]), "invalid_shapes"),
        (dict(GOOD, shapes=[{"label": "target", "points": [[0, 0, 1]]}]), "invalid_shapes"),
        (dict(GOOD, shapes=[{"label": "target", "points": [[0, "a"], [5, 5]]}]), "invalid_shapes"),
        (dict(GOOD, shapes=[{"label": 3, "points": [[0, 0], [5, 5]]}]), "invalid_shapes"),
        (dict(GOOD, shapes=[GOOD["shapes"][1]]), "empty_mask"),
        (
            dict(
                GOOD,
                shapes=[
                    dict(GOOD["shapes"][1], label="ignore"),
                    {"label": "ignore", "points": GOOD["shapes"][0]["points"]},
                ],
            ),
            "empty_mask",
        ),
    ],
)
def test_reasonseg_bad_files_are_skipped_counted_and_reported(tmp_path, annotation, reason):
    folder = tmp_path / "ReasonSeg" / "test"
    _reason_files(folder, "bad", annotation)
    _reason_files(folder, "good", GOOD)
    with pytest.warns(UserWarning, match=reason):
        data = ReasonSegDataset(tmp_path, "test")
    assert len(data) == 2 and data.skipped == {reason: 1}
    assert "bad.json" in data.skip_details[0]
    with pytest.raises(DataError, match="bad.json"):
        ReasonSegDataset(tmp_path, "test", strict=True)


def test_reasonseg_unpaired_files_and_bad_split(tmp_path):
    folder = tmp_path / "ReasonSeg" / "val"
    _reason_files(folder, "no_image", GOOD, image=False)
    _image(folder / "no_json.jpg")
    with pytest.warns(UserWarning):
        data = ReasonSegDataset(tmp_path, "val")
    assert data.skipped == {"missing_image": 1, "missing_json": 1}
    with pytest.raises(DataError, match="unknown ReasonSeg split"):
        ReasonSegDataset(tmp_path, "testA")
    with pytest.raises(DataError, match="folder not found"):
        ReasonSegDataset(tmp_path, "train")


# ------------------------------------------------------------------------ GroundingSuite


def _gs_record(idx: int, **changes) -> dict:
    record = {
        "idx": idx,
        "image_path": "unlabeled2017/img.jpg",
        "class_id": 1,
        "label": "the box",
        "caption": "The box in the upper left corner.",
        "box": [2.0, 3.0, 7.0, 9.0],
        "segmentation": mask_to_rle(_rect_mask(2, 3, 7, 9)),
    }
    record.update(changes)
    return record


def _gs_file(root: Path, lines: list) -> Path:
    _image(root / "unlabeled2017" / "img.jpg")
    path = root / "GroundingSuite-Eval.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_groundingsuite_reads_records(tmp_path):
    two_parts = [mask_to_rle(_rect_mask(0, 0, 2, 2)), mask_to_rle(_rect_mask(5, 5, 8, 8))]
    path = _gs_file(tmp_path, [_gs_record(0), "", _gs_record(1, segmentation=two_parts)])
    data = GroundingSuiteDataset(path)
    assert len(data) == 2
    assert data[0].text == "The box in the upper left corner." and data[0].box == (2, 3, 7, 9)
    assert np.array_equal(data[0].mask, _rect_mask(2, 3, 7, 9))
    assert data[1].mask.sum() == 4 + 9 and data[1].sample_id == "groundingsuite/1"
    assert data[0].meta["label"] == "the box"
    assert GroundingSuiteDataset(path, text_field="label")[0].text == "the box"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (json.dumps(_gs_record(5))[:-9], "invalid_json"),
        ({k: v for k, v in _gs_record(5).items() if k != "segmentation"}, "invalid_record"),
        (_gs_record(5, image_path="unlabeled2017/gone.jpg"), "missing_image"),
        (_gs_record(5, segmentation=mask_to_rle(np.ones((H + 1, W)))), "invalid_segmentation"),
        (_gs_record(5, segmentation=mask_to_rle(np.zeros((H, W)))), "empty_segmentation"),
        (_gs_record(5, box=[7.0, 3.0, 2.0, 9.0]), "invalid_box"),
        (_gs_record(5, caption=" "), "empty_text"),
    ],
)
def test_groundingsuite_bad_lines_are_skipped_counted_and_reported(tmp_path, line, reason):
    path = _gs_file(tmp_path, [_gs_record(0), line])
    with pytest.warns(UserWarning, match=reason):
        data = GroundingSuiteDataset(path)
    assert len(data) == 1 and data.skipped == {reason: 1}
    assert "GroundingSuite-Eval.jsonl:2" in data.skip_details[0]
    with pytest.raises(DataError, match="jsonl:2"):
        GroundingSuiteDataset(path, strict=True)


def test_groundingsuite_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        GroundingSuiteDataset(tmp_path / "nope.jsonl")


# ------------------------------------------------------------------- writers: round trips


@pytest.fixture(scope="module")
def data_toy_splits():
    world = ToyWorld(seed=11)
    return world, {split: world.split(split, 6) for split in ("train", "val", "testA", "testB")}


def _same(loaded, generated, exact_image: bool = True) -> None:
    assert len(loaded) == len(generated)
    for a, b in zip(loaded, generated):
        assert a.text == b.text and a.box == b.box
        assert np.array_equal(a.mask, b.mask)
        if exact_image:
            assert np.array_equal(a.image, b.image)
        else:
            assert np.abs(a.image.astype(int) - b.image.astype(int)).mean() < 4


@pytest.mark.parametrize("segmentation", ["rle", "polygons"])
def test_toy_refer_round_trip(tmp_path, data_toy_splits, segmentation):
    _, splits = data_toy_splits
    write_refer(splits, tmp_path, "refcoco+", segmentation=segmentation)
    for split, samples in splits.items():
        _same(ReferDataset(tmp_path, "refcoco+", split), samples)


def test_toy_reasonseg_and_groundingsuite_round_trip(tmp_path, data_toy_splits):
    _, splits = data_toy_splits
    write_reasonseg(splits["val"], tmp_path, "val")
    _same(ReasonSegDataset(tmp_path, "val"), splits["val"])
    path = write_groundingsuite(splits["testB"], tmp_path / "gs")
    _same(GroundingSuiteDataset(path), splits["testB"])


def test_ignore_pixels_survive_the_reasonseg_writer(tmp_path, data_toy_splits):
    _, splits = data_toy_splits
    sample = splits["train"][0]
    sample.mask[:3, :3] = 255  # an ignore region (a copy would be cleaner; fixture is reused)
    try:
        write_reasonseg([sample], tmp_path, "train")
        assert np.array_equal(ReasonSegDataset(tmp_path, "train")[0].mask, sample.mask)
    finally:
        sample.mask[:3, :3] = 0


def test_jpeg_writing_keeps_masks_exact(tmp_path, data_toy_splits):
    _, splits = data_toy_splits
    write_refer({"val": splits["val"]}, tmp_path, "refcoco", image_format="jpg")
    assert next((tmp_path / IMAGE_DIR).iterdir()).suffix == ".jpg"
    _same(ReferDataset(tmp_path, "refcoco", "val"), splits["val"], exact_image=False)


def test_write_toy_benchmarks_maps_splits(tmp_path, data_toy_splits):
    world, splits = data_toy_splits
    sizes = {"train": 2, "val": 2, "testA": 2, "testB": 3}
    paths = write_toy_benchmarks(world, tmp_path, sizes)
    _same(ReferDataset(tmp_path, "refcoco", "testB"), splits["testB"][:3])
    _same(ReasonSegDataset(tmp_path, "test"), splits["testB"][:3])
    _same(GroundingSuiteDataset(paths["groundingsuite"]), splits["testA"][:2] + splits["testB"][:3])


def test_writers_reject_bad_arguments(tmp_path, data_toy_splits):
    _, splits = data_toy_splits
    with pytest.raises(ValueError, match="do not exist"):
        write_refer({"testA": splits["testA"]}, tmp_path, "refcocog")
    with pytest.raises(ValueError, match="image_format"):
        write_reasonseg(splits["val"], tmp_path, "val", image_format="gif")
    with pytest.raises(ValueError, match="ReasonSeg split"):
        write_reasonseg(splits["val"], tmp_path, "testA")
