"""The loaders give LISA's ground truth: RefCOCO masks as pycocotools decodes them (polygons
clipped to the image, samples kept), ReasonSeg masks as LISA paints them with OpenCV, and the
sample counts the LISA protocol evaluates."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from pycocotools import mask as mask_utils

from lenslib.data.groundingsuite import GroundingSuiteDataset
from lenslib.data.masks import (
    clip_box,
    lisa_vertices,
    mask_to_lisa_polygons,
    mask_to_rle,
    paint_polygons_like_lisa,
    polygons_to_mask,
    segmentation_to_mask,
)
from lenslib.data.reasonseg import ReasonSegDataset, parse_shapes
from lenslib.data.refer import (
    IMAGE_DIR,
    LISA_SAMPLE_COUNTS,
    ReferDataset,
    coco_polygons,
    count_warning,
    expected_count,
)
from lenslib.data.sample import SegSample
from lenslib.data.writers import write_reasonseg

H, W = 20, 30


def _image(path: Path, height: int = H, width: int = W) -> np.ndarray:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


# ------------------------------------------------------------- RefCOCO: pycocotools decoding


def _pycocotools_like_lisa(segmentation: list, height: int, width: int) -> np.ndarray:
    """LISA's decoding: frPyObjects + decode, parts summed (then > 0, as lenslib merges)."""
    rles = mask_utils.frPyObjects(segmentation, height, width)
    return (mask_utils.decode(rles).sum(axis=2) > 0).astype(np.uint8)


def _one_ref(root: Path, segmentation: list, bbox: object = None) -> ReferDataset:
    _image(root / IMAGE_DIR / "a.png")
    ann = {"id": 10, "image_id": 1, "segmentation": segmentation}
    if bbox is not None:
        ann["bbox"] = bbox
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
        "annotations": [ann],
    }
    folder = root / "refer_seg" / "refcoco"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "instances.json").write_text(json.dumps(coco))
    ref = {
        "ref_id": 7,
        "ann_id": 10,
        "image_id": 1,
        "split": "val",
        "sentences": [{"sent": "the thing", "sent_id": 70}, {"sent": "that one", "sent_id": 71}],
    }
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump([ref], f)
    return ReferDataset(root, "refcoco", "val", strict=True)  # strict: any skip would raise


def test_refer_polygon_partly_outside_the_image_decodes_like_pycocotools(tmp_path):
    segmentation = [
        [2.0, 3.0, 70.0, 3.0, 70.0, 9.0],  # a vertex 40 px right of the image
        [-5.5, -4.0, 10.0, -4.0, 10.0, 6.0, -5.5, 6.0],  # up-left corner outside
    ]
    data = _one_ref(tmp_path, segmentation, bbox=[-5.5, -4.0, 75.5, 13.0])
    assert len(data) == 2 and data.skipped == {}  # one sample per sentence, none dropped
    sample = data[0]
    expected = _pycocotools_like_lisa(segmentation, H, W)
    assert np.array_equal(sample.mask, expected)
    assert sample.mask[0, 0] == 1 and sample.mask[:, W - 1].any()  # clipped, not dropped
    assert sample.box == (0.0, 0.0, float(W), 9.0)  # the bbox clipped to the image


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(-40, 70, allow_nan=False), min_size=6, max_size=16).map(
            lambda p: p[: len(p) // 2 * 2]
        ),
        min_size=1,
        max_size=3,
    )
)
def test_polygons_anywhere_decode_like_pycocotools(segmentation):
    ours = segmentation_to_mask(coco_polygons(segmentation), H, W)
    assert np.array_equal(ours, _pycocotools_like_lisa(segmentation, H, W))


def test_coco_polygons_read_what_pycocotools_reads():
    rect = [2.0, 3.0, 7.0, 3.0, 7.0, 9.0, 2.0, 9.0]
    assert coco_polygons([rect + [5.0]]) == [rect]  # pycocotools reads len // 2 vertices
    assert np.array_equal(
        segmentation_to_mask(coco_polygons([rect + [5.0]]), H, W),
        _pycocotools_like_lisa([rect + [5.0]], H, W),
    )
    assert coco_polygons([rect, [1, 1, 9, 9], [3, 3]]) == [rect]  # no area: dropped
    for bad in ([[1, 2, None, 4, 5, 6]], [[1, 2, 3, 4, 5, float("inf")]], [["a"] * 6]):
        with pytest.raises(ValueError, match="polygon 0"):
            coco_polygons(bad)


@pytest.mark.parametrize("bbox", [[0, 0, float("nan"), 4], [1, 2], [3, 3, -1, 2], "box"])
def test_refer_unusable_bbox_gives_the_mask_box_and_keeps_the_sample(tmp_path, bbox):
    data = _one_ref(tmp_path, [[2.0, 3.0, 7.0, 3.0, 7.0, 9.0, 2.0, 9.0]], bbox=bbox)
    assert len(data) == 2 and data[0].box == (2.0, 3.0, 7.0, 9.0)


def test_clip_box():
    assert clip_box((-3, 2, 40, 25), H, W) == (0.0, 2.0, float(W), float(H))
    assert clip_box((1, 2, 3, 4), H, W) == (1.0, 2.0, 3.0, 4.0)


# ------------------------------------------------------------------- sample counts (LISA)


def test_expected_counts_are_lisas_sentence_counts():
    assert expected_count("refcoco", "val") == 10_834
    assert [expected_count("refcoco", s) for s in ("testA", "testB")] == [5_657, 5_095]
    assert [expected_count("refcoco+", s) for s in ("val", "testA", "testB")] == [
        10_758,
        5_726,
        4_889,
    ]
    assert [expected_count("refcocog", s) for s in ("val", "test")] == [4_896, 9_602]
    assert len(LISA_SAMPLE_COUNTS) == 8
    assert expected_count("refcoco", "train") is None and expected_count("toy", "val") is None
    assert expected_count("refcocog", "val", split_by="google") is None
    assert expected_count("refcocog", "val", split_by="umd") == 4_896


def test_count_warning_says_when_a_split_is_not_comparable(tmp_path):
    assert count_warning("refcoco", "testA", 5_657) is None
    assert count_warning("toy", "val", 3) is None
    message = count_warning("refcoco", "testA", 5_650, skipped={"missing_image": 3})
    assert message is not None
    assert "5,650" in message and "5,657" in message and "7 fewer" in message
    assert "missing_image" in message
    assert "2 more" in count_warning("refcocog", "test", 9_604)
    # a loaded split is counted in sentences, like LISA's numbers: 1 ref, 2 sentences here
    data = _one_ref(tmp_path, [[2.0, 3.0, 7.0, 3.0, 7.0, 9.0, 2.0, 9.0]])
    assert "2 samples loaded" in count_warning("refcoco", "val", len(data))


# ---------------------------------------------------------------- ReasonSeg: OpenCV painting


def _lisa_reference(shapes: list[dict], height: int, width: int) -> np.ndarray:
    """LISA's recipe, step by step: int32 vertices, outline (thickness 1) then fillPoly, the
    largest area first, 255 for "ignore" labels, "flag" skipped."""
    kept = [s for s in shapes if s["label"].lower() != "flag"]
    areas = []
    for shape in kept:
        alone = np.zeros((height, width), dtype=np.uint8)
        vertices = np.array([shape["points"]], dtype=np.int32)
        cv2.polylines(alone, vertices, True, 1, 1)
        cv2.fillPoly(alone, vertices, 1)
        areas.append(alone.sum())
    mask = np.zeros((height, width), dtype=np.uint8)
    for i in np.argsort(areas)[::-1]:
        value = 255 if "ignore" in kept[i]["label"].lower() else 1
        vertices = np.array([kept[i]["points"]], dtype=np.int32)
        cv2.polylines(mask, vertices, True, value, 1)
        cv2.fillPoly(mask, vertices, value)
    return mask


def _paint(shapes: list[dict], height: int = H, width: int = W) -> np.ndarray:
    return paint_polygons_like_lisa(parse_shapes(shapes), height, width)


HOLE = [
    {"label": "ignore", "points": [[8.6, 6.2], [14.9, 6.7], [13.1, 12.8], [7.4, 11.5]]},
    {"label": "target", "points": [[2.3, 1.7], [25.8, 2.2], [24.4, 17.9], [3.1, 16.6]]},
]


def test_a_hole_inside_a_target_is_painted_like_lisa():
    mask = _paint(HOLE)
    assert np.array_equal(mask, _lisa_reference(HOLE, H, W))
    assert mask[9, 11] == 255 and mask[3, 5] == 1 and mask[0, 0] == 0
    # pycocotools reads the same vertices as pixel edges and paints a smaller target
    target = [v for point in HOLE[1]["points"] for v in point]
    by_pycocotools, by_lisa = polygons_to_mask([target], H, W), _paint(HOLE[1:])
    assert by_pycocotools.sum() < by_lisa.sum() and not (by_pycocotools > by_lisa).any()


def test_thin_shapes_are_painted_like_lisa():
    sliver = {"label": "target", "points": [[3.2, 2.0], [3.7, 2.0], [3.7, 15.9], [3.2, 15.9]]}
    mask = _paint([sliver])
    assert np.array_equal(mask, _lisa_reference([sliver], H, W))
    assert mask.sum() == 14 and mask[2:16, 3].all()  # one column, rows 2..15
    line = {"label": "target", "points": [[20, 1], [26, 7]]}  # two points: a line
    dot = {"label": "target", "points": [[28.9, 18.2]]}  # one point: a pixel
    mask = _paint([line, dot])
    assert np.array_equal(mask, _lisa_reference([line, dot], H, W))
    assert mask.sum() == 7 + 1 and mask[18, 28] == 1


def test_painting_is_opencv_4_8s():
    # OpenCV >= 4.11 paints this triangle without (3, 2) and (7, 3): 10 pixels, not LISA's 12
    mask = paint_polygons_like_lisa([([[3, 9], [1, 3], [1, 1]], 1)], 12, 12)
    assert mask.sum() == 12 and mask[3, 2] == 1 and mask[7, 3] == 1, cv2.__version__


def test_vertices_are_truncated_like_numpy_int32():
    assert lisa_vertices([[2.9, -0.5], [-1.7, 3.0]]).tolist() == [[2, 0], [-1, 3]]
    for bad in ([], [[1.0]], [[1, 2, 3]], [[float("nan"), 1]], [[1e12, 2]], [["a", 1]]):
        with pytest.raises(ValueError):
            lisa_vertices(bad)


LABELS = st.sampled_from(["target", "ignore", "Ignore_2", "flag", "part"])
POINT = st.lists(st.floats(-8, 38, allow_nan=False), min_size=2, max_size=2)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries({"label": LABELS, "points": st.lists(POINT, min_size=1, max_size=7)}),
        min_size=1,
        max_size=5,
    )
)
def test_random_float_shapes_are_painted_like_lisa(shapes):
    assert np.array_equal(_paint(shapes), _lisa_reference(shapes, H, W))


@settings(max_examples=40, deadline=None)
@given(
    arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.integers(0, 1))
)
def test_lisa_polygons_of_a_mask_paint_it_back_exactly(mask):
    shapes = [(points, 1) for points in mask_to_lisa_polygons(mask)]
    assert np.array_equal(paint_polygons_like_lisa(shapes, *mask.shape), mask)


def test_reasonseg_loader_mask_is_lisas_painting(tmp_path):
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[2:15, 3:20] = 1
    mask[5:8, 6:9] = 255  # an ignore hole
    mask[17, 0:W] = 1  # a 1-pixel-high sliver
    image = np.zeros((H, W, 3), dtype=np.uint8)
    sample = SegSample(image, "what holds the water?", mask, (0.0, 2.0, float(W), 18.0), None, "s0")
    folder = write_reasonseg([sample], tmp_path, "val")
    shapes = json.loads(next(folder.glob("*.json")).read_text())["shapes"]
    loaded = ReasonSegDataset(tmp_path, "val")[0].mask
    assert np.array_equal(loaded, _lisa_reference(shapes, H, W))
    assert np.array_equal(loaded, mask)
    # a hand-written file with float vertices, a hole, a sliver and vertices outside the image
    json_path = next(folder.glob("*.json"))
    outside = {"label": "target", "points": [[20.5, 10.2], [45.0, 10.2], [45.0, 25.0]]}
    flag = {"label": "flag", "points": [[0, 0]]}
    sliver = {"label": "target", "points": [[1.5, 0.1], [1.9, 0.1], [1.9, 9.9], [1.5, 9.9]]}
    shapes = [*HOLE, outside, flag, sliver]
    json_path.write_text(json.dumps({"text": ["q"], "is_sentence": False, "shapes": shapes}))
    data = ReasonSegDataset(tmp_path, "val", strict=True)  # strict: any skip would raise
    assert np.array_equal(data[0].mask, _lisa_reference(shapes, H, W))


def _reason_file(folder: Path, shapes: list[dict]) -> None:
    _image(folder / "img.jpg")
    (folder / "img.json").write_text(json.dumps({"text": ["q"], "shapes": shapes}))


def test_reasonseg_keeps_what_lisa_keeps(tmp_path):
    folder = tmp_path / "ReasonSeg" / "test"
    outside = {"label": "target", "points": [[0, 0], [90, 0], [9, 9]]}
    _reason_file(folder, [outside])
    data = ReasonSegDataset(tmp_path, "test", strict=True)
    assert np.array_equal(data[0].mask, _lisa_reference([outside], H, W))
    ignore_only = [{"label": "ignore", "points": [[2, 2], [9, 2], [9, 9]]}]
    _reason_file(folder, ignore_only)
    with pytest.warns(UserWarning, match="empty_mask"):
        assert len(ReasonSegDataset(tmp_path, "test")) == 0
    kept = ReasonSegDataset(tmp_path, "test", empty_masks="keep")  # as LISA's evaluation
    assert len(kept) == 1 and not (kept[0].mask == 1).any() and kept[0].box == (0, 0, 0, 0)
    with pytest.raises(ValueError, match="empty_masks"):
        ReasonSegDataset(tmp_path, "test", empty_masks="drop")


def test_groundingsuite_empty_masks_can_be_kept(tmp_path):
    _image(tmp_path / "img.jpg")
    record = {"idx": 3, "image_path": "img.jpg", "caption": "nothing"}
    record["segmentation"] = mask_to_rle(np.zeros((H, W), dtype=np.uint8))
    path = tmp_path / "GroundingSuite-Eval.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.warns(UserWarning, match="empty_segmentation"):
        assert len(GroundingSuiteDataset(path)) == 0
    kept = GroundingSuiteDataset(path, empty_masks="keep")
    assert len(kept) == 1 and kept[0].mask.sum() == 0 and kept[0].box == (0, 0, 0, 0)
