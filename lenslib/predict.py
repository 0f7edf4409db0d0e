"""Segment one image from the command line with a trained LENS model.

    python -m lenslib.predict --model runs/toy/stage2 --image photo.jpg \\
        --text "the car that may need repair" --out predictions/

prints the model's reasoning (its <think> part) and box (in pixels of the original image),
and writes `<out>/<image stem>_mask.png` (the binary mask, 0 / 255) and
`<out>/<image stem>_overlay.png` (the image with the mask tinted and the box drawn,
`lenslib.viz.overlay`).

Decoding is greedy (`LensModel.predict`, as at evaluation): the same image and text always give
the same answer. A missing model folder, an unreadable image or an empty prompt stop the
program with one line naming the culprit and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lenslib.answers import Box, parse_answer
from lenslib.data.io import DataError
from lenslib.model import LensModel
from lenslib.viz import overlay


@dataclass
class Prediction:
    """What the model says about one (image, text).

    text:  the whole completion (reasoning and answer).
    think: the <think> part, or None when the completion has no <think> block.
    box:   (x1, y1, x2, y2) in pixels of the original image, or None (no box in the answer).
    mask:  (H, W) bool at the original image's size.
    """

    text: str
    think: str | None
    box: Box | None
    mask: np.ndarray


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB; DataError naming the file if it is missing
    or cannot be decoded."""
    path = Path(path)
    if not path.is_file():
        reason = "is a folder, not an image" if path.is_dir() else "not found"
        raise DataError(f"image {path}: {reason}")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"image {path}: cannot decode it ({err})") from err


def check_prompt(text: str) -> str:
    """The prompt without surrounding whitespace; ValueError if nothing is left."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"prompt (--text) is empty: {text!r}; say what to segment")
    return text.strip()


def load_model(path: str | Path, device: str = "cpu") -> LensModel:
    """`LensModel.from_pretrained`, in eval mode; FileNotFoundError naming the folder or the
    file it lacks when `path` is not a saved LensModel."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} not found (expected a LensModel folder)")
    return LensModel.from_pretrained(path, device=device).eval()


def predict_one(
    model: LensModel, image: np.ndarray, text: str, max_new_tokens: int = 768
) -> Prediction:
    """Greedy reasoning, box and mask for one image (eqs. 1-4) through `LensModel.predict`."""
    text = check_prompt(text)
    rollouts, masks = model.predict([image], [text], max_new_tokens=max_new_tokens)
    completion = rollouts.texts[0]
    return Prediction(
        text=completion,
        think=parse_answer(completion).think,
        box=rollouts.boxes[0],
        mask=masks[0].cpu().numpy().astype(bool),
    )


def save_prediction(
    prediction: Prediction, image: np.ndarray, out_dir: str | Path, stem: str
) -> tuple[Path, Path]:
    """Write `<stem>_mask.png` (0 / 255, single channel) and `<stem>_overlay.png` (RGB) into
    `out_dir` (created if needed); returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_path, overlay_path = out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png"
    Image.fromarray(prediction.mask.astype(np.uint8) * 255).save(mask_path)
    Image.fromarray(overlay(image, prediction.mask, prediction.box)).save(overlay_path)
    return mask_path, overlay_path


def describe(prediction: Prediction, image_name: str, image: np.ndarray) -> str:
    """The human-readable report `main` prints: reasoning, box, mask size."""
    height, width = image.shape[:2]
    if prediction.think is not None:
        reasoning = prediction.think
    else:
        reasoning = f"(no <think> block; the whole answer) {prediction.text}"
    if prediction.box is None:
        box = "none (the answer holds no readable box)"
    else:
        box = "[" + ", ".join(f"{v:.1f}" for v in prediction.box) + "]"
        box += f" (x1, y1, x2, y2 in pixels of {image_name}, {width}x{height})"
    area = int(prediction.mask.sum())
    mask = f"{area} pixels ({100 * area / (height * width):.1f}% of the image)"
    return f"reasoning: {reasoning}\nbox: {box}\nmask: {mask}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lenslib.predict",
        description="Reason about an image and segment what the text asks for (LENS).",
    )
    parser.add_argument("--model", required=True, help="a folder written by save_pretrained")
    parser.add_argument("--image", required=True, help="an image file (JPEG, PNG, ...)")
    parser.add_argument("--text", required=True, help="what to segment, in words")
    parser.add_argument("--out", default=".", help="folder for the mask and overlay PNGs")
    parser.add_argument("--max-new-tokens", type=int, default=768, help="reasoning budget")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: check the inputs (cheap) before loading the model (slow)."""
    args = build_parser().parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        text = check_prompt(args.text)
        image = load_image(args.image)
        model = load_model(args.model, args.device)
    except (OSError, ValueError) as err:  # DataError is a ValueError
        print(f"lenslib.predict: error: {err}", file=sys.stderr)
        raise SystemExit(1) from err
    prediction = predict_one(model, image, text, args.max_new_tokens)
    stem = Path(args.image).stem
    mask_path, overlay_path = save_prediction(prediction, image, args.out, stem)
    print(describe(prediction, Path(args.image).name, image))
    print(f"wrote {mask_path}\nwrote {overlay_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
