"""The prediction CLI on a saved random-weight toy LensModel: outputs, and clear errors."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from PIL import Image

from lenslib.data.io import DataError
from lenslib.predict import Prediction, check_prompt, load_image, main, predict_one
from lenslib.presets import build_lens, get_preset

HEIGHT, WIDTH = 90, 120  # not multiples of 28: the MLLM sees a resized copy
MAX_NEW = "8"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lens")
    build_lens(get_preset("toy", num_queries=4), pretrained=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


def run(model_dir, image, text, out) -> list[str]:
    return [
        "--model", str(model_dir), "--image", str(image), "--text", text,
        "--out", str(out), "--max-new-tokens", MAX_NEW,
    ]  # fmt: skip


def test_main_writes_mask_and_overlay_at_image_size(model_dir, image_path, tmp_path, capsys):
    assert main(run(model_dir, image_path, "the blue square", tmp_path)) == 0
    mask = np.asarray(Image.open(tmp_path / "photo_mask.png"))
    shown = np.asarray(Image.open(tmp_path / "photo_overlay.png"))
    assert mask.shape == (HEIGHT, WIDTH) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    assert shown.shape == (HEIGHT, WIDTH, 3)
    printed = capsys.readouterr().out
    assert "reasoning:" in printed and "box:" in printed
    assert "photo_mask.png" in printed and "photo_overlay.png" in printed


def test_predict_one_returns_mask_of_the_original_size(model_dir, image_path):
    from lenslib.predict import load_model

    model = load_model(model_dir)
    image = load_image(image_path)
    pred = predict_one(model, image, "  the red circle ", max_new_tokens=8)
    assert isinstance(pred, Prediction)
    assert pred.mask.shape == (HEIGHT, WIDTH) and pred.mask.dtype == bool
    assert isinstance(pred.text, str) and pred.text
    if pred.box is not None:  # boxes come back in original pixels, inside the image
        x1, y1, x2, y2 = pred.box
        assert 0 <= x1 <= x2 <= WIDTH and 0 <= y1 <= y2 <= HEIGHT
    # greedy decoding: the same input gives the same answer
    again = predict_one(model, image, "the red circle", max_new_tokens=8)
    assert again.text == pred.text and np.array_equal(again.mask, pred.mask)


def test_load_image_gives_rgb_uint8_from_grey_and_rgba(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((5, 7), 100, np.uint8)).save(grey)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.zeros((5, 7, 4), np.uint8)).save(rgba)
    for path in (grey, rgba):
        image = load_image(path)
        assert image.shape == (5, 7, 3) and image.dtype == np.uint8
    assert load_image(grey)[0, 0].tolist() == [100, 100, 100]


def test_load_image_names_missing_and_broken_files(tmp_path):
    with pytest.raises(DataError, match="nothere.jpg: not found"):
        load_image(tmp_path / "nothere.jpg")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="broken.jpg: cannot decode"):
        load_image(broken)
    with pytest.raises(DataError, match="is a folder"):
        load_image(tmp_path)


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_check_prompt_rejects_blank_text(text):
    with pytest.raises(ValueError, match="prompt"):
        check_prompt(text)


def error_of(argv, capsys) -> str:
    """The one stderr line main prints before exiting with status 1."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_missing_model_folder_is_named(image_path, tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    line = error_of(run(missing, image_path, "the circle", tmp_path), capsys)
    assert "no_such_model" in line and "not found" in line


def test_folder_that_is_not_a_lens_model_is_named(image_path, tmp_path, capsys):
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    line = error_of(run(empty, image_path, "the circle", tmp_path), capsys)
    assert "empty_folder" in line and "LensModel" in line


def test_bad_image_is_named(model_dir, tmp_path, capsys):
    line = error_of(run(model_dir, tmp_path / "ghost.png", "the circle", tmp_path), capsys)
    assert "ghost.png" in line
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    line = error_of(run(model_dir, broken, "the circle", tmp_path), capsys)
    assert "broken.png" in line and "decode" in line
    assert not (tmp_path / "broken_mask.png").exists()


@pytest.mark.parametrize("text", ["", "   "])
def test_blank_prompt_is_named(model_dir, image_path, tmp_path, text, capsys):
    line = error_of(run(model_dir, image_path, text, tmp_path), capsys)
    assert "prompt" in line and "empty" in line


def test_bad_max_new_tokens_is_named(model_dir, image_path, tmp_path, capsys):
    argv = run(model_dir, image_path, "the circle", tmp_path)
    argv[argv.index("--max-new-tokens") + 1] = "0"
    assert "--max-new-tokens" in error_of(argv, capsys)
