"""Pretraining the toy SAM2 on the toy world: the toy stand-in for Meta's pretrained SAM2.

LENS starts from a PRETRAINED SAM2 (paper Sec. 3, Fig. 2): stage 1 freezes it and teaches the
context queries + connector to speak its prompt language; stage 2 fine-tunes its decoder. At
toy scale no pretrained SAM2 exists, so this module trains one, the way SAM was trained
(Kirillov et al. 2023, Sec. 3 and App. A; SAM2 follows the same recipe for images):

* The WHOLE model learns from random init: image encoder (Hiera + FPN neck), prompt encoder and
  mask decoder, in two phases (`PretrainConfig.decoder_first_steps`):
  1. the image encoder stays at its random init (frozen, like in LENS) and only the prompt
     encoder + mask decoder learn, until they READ THE PROMPT;
  2. then everything learns, the image encoder included.
  Trained together from step 0, the encoder and the decoder's high-res path (conv_s0,
  conv_s1) find a prompt-blind shortcut ("predict every object in the image", mean IoU ~0.3
  with the box as prompt) and the decoder learns to ignore its prompts; with the encoder
  frozen, the decoder follows the prompt within ~150 steps. (Meta's SAM avoided this with an
  MAE-pretrained encoder and ~90k steps.)
* Every object of an image is a training target: the encoder runs once per image, the decoder
  once per object (its features repeated per object).
* Prompts are mostly boxes, jittered by a few percent of the box side (SAM adds noise of 10 %
  of the side), and sometimes 1-3 random positive clicks inside the object. Training on more
  than box corners makes the sparse-prompt space richer, which is what LENS's context tokens
  later have to speak.
* Optionally (`negative_points`, `refine_rounds`; off by default, which is the recipe of the
  committed v1 asset) the clicks of SAM's interactive training: a click prompt also gets
  negative clicks on OTHER objects of the image (the occluder, the ring around it), and after
  each prediction one more click per object is drawn from the error region of the previous
  mask (`error_clicks`: a false-negative pixel as a positive click, a false-positive pixel as
  a negative one), added to the object's prompt (box prompts keep their box) and decoded
  again; every round is supervised. SAM also feeds the previous mask logits back as a dense
  prompt; LENS never uses mask prompts, so this recipe does not.
* Loss per object: L_seg = dice + BCE (`lenslib.losses.seg_loss`, the loss of eqs. 5 and 12)
  on the logits upsampled to the image size, for mask token 0 (the single-mask output LENS
  uses) and for the BEST of the 3 multimask outputs (as SAM trains them), plus the
  MSE between the predicted and the actual IoU of all 4 outputs (SAM's IoU head, which SAM2's
  stability fallback uses to pick a mask).

Read `training_step` top to bottom for one step. The CLI

    python -m lenslib.toy.pretrain_sam --out lenslib/toy/assets/sam --steps 1500

(world v2, clicks as SAM was trained: `--world-version 2 --point-fraction 0.3
--negative-points 2 --refine-rounds 1 --out lenslib/toy/assets/v2/sam`) writes float16 weights + a json (`lenslib.sam_io.save_sam`); `lenslib.toy.models.load_toy_sam`
loads them (val IoU 0.958 with ground-truth boxes as prompts).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lenslib.data.sample import SegSample
from lenslib.losses import seg_loss
from lenslib.metrics import IoUAccumulator, intersection_union, per_sample_iou
from lenslib.sam import SamConfig, SamSegmenter, preprocess_images, upsample_logits
from lenslib.sam_features import SamFeatures
from lenslib.sam_io import load_sam, save_sam
from lenslib.toy.generator import ToyWorld
from lenslib.toy.models import TOY_SAM_DIR, toy_sam_config
from lenslib.toy.schedule import warmup_cosine
from lenslib.toy.world import ToyWorldConfig, visible_masks


@dataclass(frozen=True)
class PretrainConfig:
    """The pretraining recipe (sized by steps, not by time: the CPU is shared).

    steps:          optimiser steps; each sees `batch_images` new train images of the toy world.
    decoder_first_steps: phase 1, the first steps with the image encoder frozen (see above).
    batch_images:   images per step (every object in them is a target, 2-4 per image).
    lr, weight_decay, warmup_steps: AdamW with linear warm-up, then cosine decay to 0 at
                    `steps`; the encoder's learning rate starts (with its own warm-up) in phase 2.
    point_fraction: share of objects prompted with clicks instead of a box.
    max_points:     a click prompt has 1..max_points positive points inside the object.
    box_noise:      std of each box-corner offset as a fraction of the box side (SAM: 0.1).
    loss_kind:      "bce" (authors' code) or "focal" for the pixel term of seg_loss.
    iou_weight:     weight of the IoU-prediction MSE.
    negative_points: a click prompt also gets 0..negative_points negative clicks on other
                    objects of its image (0 = none: the v1 recipe).
    refine_rounds:  after the first prediction, this many rounds of one more click per object
                    from the previous mask's error region (0 = none: the v1 recipe).
    seed:           torch seed (init) and numpy seed (prompts).
    world, world_seed: the toy world the images come from (train split for training; the
                    world is seeded by sample index, so its splits do not depend on `seed`).
    """

    steps: int = 1500
    decoder_first_steps: int = 300
    batch_images: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 30
    point_fraction: float = 0.2
    max_points: int = 3
    negative_points: int = 0
    refine_rounds: int = 0
    box_noise: float = 0.05
    loss_kind: str = "bce"
    iou_weight: float = 1.0
    seed: int = 0
    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    world_seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_images < 1:
            raise ValueError("PretrainConfig.steps and batch_images must be >= 1")
        if not 0 <= self.decoder_first_steps <= self.steps:
            raise ValueError(
                f"decoder_first_steps must lie in [0, steps={self.steps}], "
                f"got {self.decoder_first_steps}"
            )
        if not 0 <= self.point_fraction <= 1:
            raise ValueError(f"point_fraction must lie in [0, 1], got {self.point_fraction}")
        if self.max_points < 1:
            raise ValueError(f"max_points must be >= 1, got {self.max_points}")
        if self.negative_points < 0 or self.refine_rounds < 0:
            raise ValueError("negative_points and refine_rounds must be >= 0")


# ---- data: objects and prompts --------------------------------------------------------------
@dataclass
class Prompts:
    """P prompts of one kind (boxes or clicks) for objects of the images of a batch."""

    image_index: Tensor  # (P,) which image of the batch each object is in
    targets: Tensor  # (P, H, W) uint8 masks, 1 = object
    boxes: Tensor | None = None  # (P, 4) x1, y1, x2, y2 in image pixels
    points: tuple[Tensor, Tensor] | None = None  # coords (P, N, 2) as (x, y), labels (P, N)

    def __len__(self) -> int:
        return len(self.image_index)


@dataclass
class Batch:
    images: list[np.ndarray]  # (H, W, 3) uint8
    groups: list[Prompts]  # box prompts and click prompts (either may be missing)
    step: int = 0  # seeds the error-region clicks of refinement rounds


def scene_objects(sample: SegSample) -> list[np.ndarray]:
    """Visible (H, W) uint8 masks of EVERY shape of a toy scene (the target is one of them)."""
    if "shapes" not in sample.meta:
        raise ValueError(f"{sample.sample_id}: not a toy-world sample (no meta['shapes'])")
    masks = visible_masks(sample.meta["shapes"], sample.image.shape[0])
    return [m.astype(np.uint8) for m in masks if m.any()]


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight box (x1, y1, x2, y2) of a mask, exclusive x2/y2 edges (as the toy world's boxes)."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def jitter_box(box: np.ndarray, noise: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Move each box edge by N(0, noise * side), clipped to the image; the box stays non-empty."""
    side = np.array([box[2] - box[0], box[3] - box[1]] * 2, dtype=np.float32)
    moved = np.clip(box + rng.normal(0.0, noise, 4) * side, 0, size).astype(np.float32)
    if moved[2] - moved[0] < 1 or moved[3] - moved[1] < 1:
        return box
    return moved


def random_points(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) pixel positions (x, y) drawn uniformly from the object's pixels."""
    ys, xs = np.nonzero(mask)
    chosen = rng.choice(len(xs), size=n, replace=len(xs) < n)
    return np.stack([xs[chosen], ys[chosen]], axis=1).astype(np.float32)


def click_prompts(
    masks: Sequence[np.ndarray], max_points: int, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """1..max_points positive clicks per object, padded with label -1 (SAM's "not a point")."""
    coords = torch.zeros(len(masks), max_points, 2)
    labels = torch.full((len(masks), max_points), -1, dtype=torch.int32)
    for i, mask in enumerate(masks):
        n = int(rng.integers(1, max_points + 1))
        coords[i, :n] = torch.from_numpy(random_points(mask, n, rng))
        labels[i, :n] = 1
    return coords, labels


def negative_clicks(
    others: np.ndarray, mask: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """(n, 2) negative clicks (x, y): on `others` (the image's other objects) when it has
    pixels, else on the background outside `mask`."""
    region = others if others.any() else ~mask.astype(bool)
    return random_points(region, n, rng)


def add_negative_clicks(
    points: tuple[Tensor, Tensor],
    objects: list[tuple[int, np.ndarray]],
    image_masks: list[list[np.ndarray]],
    max_negative: int,
    rng: np.random.Generator,
) -> tuple[Tensor, Tensor]:
    """Append 0..max_negative negative clicks (label 0) per object, padded with label -1."""
    coords, labels = points
    p = len(objects)
    extra_coords = torch.zeros(p, max_negative, 2)
    extra_labels = torch.full((p, max_negative), -1, dtype=torch.int32)
    for i, (image_index, mask) in enumerate(objects):
        n = int(rng.integers(0, max_negative + 1))
        if n == 0:
            continue
        others = np.zeros(mask.shape, dtype=bool)
        for other in image_masks[image_index]:
            if other is not mask:
                others |= other.astype(bool)
        extra_coords[i, :n] = torch.from_numpy(negative_clicks(others, mask, n, rng))
        extra_labels[i, :n] = 0
    return torch.cat([coords, extra_coords], 1), torch.cat([labels, extra_labels], 1)


def error_clicks(
    predicted: np.ndarray, target: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One click per object from the error region of its previous prediction, as SAM trains.

    predicted, target: (P, H, W) bool. A pixel is drawn uniformly from the error region
    (false negatives | false positives): a false negative gives a positive click (label 1),
    a false positive a negative one (label 0). With no error, a positive click on the target.
    Returns coords (P, 2) as (x, y) and labels (P,).
    """
    coords = np.zeros((len(target), 2), dtype=np.float32)
    labels = np.ones(len(target), dtype=np.int32)
    for i, (pred, true) in enumerate(zip(predicted, target, strict=True)):
        missed, extra = true & ~pred, pred & ~true
        error = missed | extra
        region = error if error.any() else true
        ys, xs = np.nonzero(region)
        k = rng.integers(len(xs))
        coords[i] = xs[k], ys[k]
        labels[i] = int(bool(true[ys[k], xs[k]]))
    return coords, labels


def make_batch(world: ToyWorld, step: int, cfg: PretrainConfig) -> Batch:
    """Train images step*B .. step*B + B-1 and one prompt per object (seeded by step)."""
    rng = np.random.default_rng([cfg.seed, step])
    start = step * cfg.batch_images
    samples = [world.sample("train", start + i) for i in range(cfg.batch_images)]
    size = samples[0].image.shape[0]
    box_objects: list[tuple[int, np.ndarray]] = []
    click_objects: list[tuple[int, np.ndarray]] = []
    image_masks: list[list[np.ndarray]] = []
    for image_index, sample in enumerate(samples):
        image_masks.append(scene_objects(sample))
        for mask in image_masks[-1]:
            use_clicks = rng.random() < cfg.point_fraction
            (click_objects if use_clicks else box_objects).append((image_index, mask))

    groups = []
    if box_objects:
        boxes = [jitter_box(mask_box(m), cfg.box_noise, size, rng) for _, m in box_objects]
        groups.append(_prompts(box_objects, boxes=torch.from_numpy(np.stack(boxes))))
    if click_objects:
        points = click_prompts([m for _, m in click_objects], cfg.max_points, rng)
        if cfg.negative_points:
            points = add_negative_clicks(
                points, click_objects, image_masks, cfg.negative_points, rng
            )
        groups.append(_prompts(click_objects, points=points))
    return Batch(images=[s.image for s in samples], groups=groups, step=step)


def _prompts(objects: list[tuple[int, np.ndarray]], **prompt) -> Prompts:
    return Prompts(
        image_index=torch.tensor([i for i, _ in objects]),
        targets=torch.from_numpy(np.stack([m for _, m in objects])),
        **prompt,
    )


# ---- loss ------------------------------------------------------------------------------------
def mask_losses(
    logits: Tensor, iou_pred: Tensor, targets: Tensor, cfg: PretrainConfig
) -> dict[str, Tensor]:
    """SAM's losses for P objects and all 4 mask tokens.

    logits (P, 4, H, W) at image size, iou_pred (P, 4), targets (P, H, W). Returns mean losses:
    "single": seg_loss of token 0 (the single-mask output);
    "multi":  seg_loss of the best of tokens 1-3 per object, so the three multimask outputs may
              specialise (SAM back-propagates only the lowest of the three losses; we pick the
              output with the highest IoU, so one seg_loss call serves the whole batch);
    "iou":    MSE between the predicted and the actual IoU of every output (SAM's IoU head).
    """
    p, tokens = logits.shape[:2]
    with torch.no_grad():  # the IoU each output actually reached: the IoU head's target
        repeated = targets[:, None].expand(-1, tokens, -1, -1)  # (P, 4, H, W)
        inter, union = intersection_union(logits.flatten(0, 1) > 0, repeated.flatten(0, 1))
        actual_iou = per_sample_iou(inter, union).float().view(p, tokens)  # (P, 4)
        best = 1 + actual_iou[:, 1:].argmax(dim=1)  # (P,) best multimask token
    kind = cfg.loss_kind
    return {
        "single": seg_loss(logits[:, 0], targets, kind=kind),
        "multi": seg_loss(logits[torch.arange(p), best], targets, kind=kind),
        "iou": torch.nn.functional.mse_loss(iou_pred.float(), actual_iou),
    }


# ---- one training step -----------------------------------------------------------------------
def encoder_parameters(seg: SamSegmenter) -> list[torch.nn.Parameter]:
    """The image side: Hiera + FPN neck, and the decoder's conv_s0/conv_s1 (SAM2 applies them
    to the high-res features in `forward_image`). Frozen in phase 1, trained in phase 2."""
    decoder = seg.sam.sam_mask_decoder
    modules = (seg.sam.image_encoder, decoder.conv_s0, decoder.conv_s1)
    return [p for m in modules for p in m.parameters()]


def decoder_parameters(seg: SamSegmenter) -> list[torch.nn.Parameter]:
    """The prompt side: prompt encoder, mask decoder (without conv_s0/conv_s1), no_mem_embed.

    (SAM2's video-only heads that remain, e.g. obj_ptr_proj, are left out: images never use
    them.)
    """
    encoder_side = {id(p) for p in encoder_parameters(seg)}
    modules = (seg.sam.sam_prompt_encoder, seg.sam.sam_mask_decoder)
    params = [p for m in modules for p in m.parameters() if id(p) not in encoder_side]
    return params + [seg.sam.no_mem_embed]


def training_step(
    seg: SamSegmenter,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    cfg: PretrainConfig,
) -> dict[str, float]:
    """One optimiser step on a batch; returns the losses (floats) for logging."""
    # 1. Encode the images, with gradients once the encoder trains (phase 2): (N, D, S/16, ...
    pixels = preprocess_images(batch.images, seg.cfg.image_size)
    features = seg.image_features(pixels)
    size = batch.images[0].shape[:2]

    # 2. Decode every object with its prompt; all 4 mask tokens, upsampled to the image size.
    #    With refine_rounds, decode again with one more click from the error region.
    n_objects = sum(len(group) for group in batch.groups)
    rounds = 1 + cfg.refine_rounds
    totals = {"single": 0.0, "multi": 0.0, "iou": 0.0}
    loss = torch.zeros(())
    rng = np.random.default_rng([cfg.seed, batch.step, 1])  # unused without refine_rounds
    for group in batch.groups:
        per_object = SamFeatures(  # each object gets its image's features
            image_embed=features.image_embed[group.image_index],
            high_res=tuple(level[group.image_index] for level in features.high_res),
        )
        points = group.points
        for round_index in range(rounds):
            low_res, iou_pred = seg.predict_all_masks(
                per_object,
                boxes=group.boxes,
                points=points,
                orig_sizes=[size] * len(group),
            )  # (P, 4, S/4, S/4), (P, 4)
            logits = upsample_logits(low_res, [size] * len(group))  # (P, 4, H, W)

            # 3. SAM's losses, weighted by the group's share of the objects (and rounds).
            losses = mask_losses(logits, iou_pred, group.targets, cfg)
            share = len(group) / n_objects / rounds
            total = losses["single"] + losses["multi"] + cfg.iou_weight * losses["iou"]
            loss = loss + share * total
            for name, value in losses.items():
                totals[name] += share * value.item()
            if round_index + 1 < rounds:  # one more click per object from this error region
                predicted = (logits[:, 0] > 0).detach().cpu().numpy()
                xy, labels = error_clicks(predicted, group.targets.numpy().astype(bool), rng)
                points = append_clicks(points, torch.from_numpy(xy), torch.from_numpy(labels))

    # 4. Backpropagate into decoder and prompt encoder (and, in phase 2, the image encoder).
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), **totals}


def append_clicks(
    points: tuple[Tensor, Tensor] | None, xy: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """Add one click (xy (P, 2), labels (P,)) to every object's click prompt (or start one)."""
    new = (xy.float()[:, None, :], labels.int()[:, None])
    if points is None:
        return new
    return torch.cat([points[0], new[0]], 1), torch.cat([points[1].int(), new[1]], 1)


def set_trainable(seg: SamSegmenter, decoder: bool, encoder: bool) -> None:
    """Choose which side learns: (True, False) phase 1, (True, True) phase 2; (False, False)
    then `seg.set_decoder_trainable(True)` restores LENS's freezing."""
    for p in decoder_parameters(seg):
        p.requires_grad_(decoder)
    for p in encoder_parameters(seg):
        p.requires_grad_(encoder)
    seg.reset_cache()  # cached features of old encoder weights must not be served


def make_optimizer(
    seg: SamSegmenter, cfg: PretrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with two parameter groups: the prompt side learns from step 0, the image side
    from step `decoder_first_steps` on (each with warm-up, then cosine decay to `steps`)."""
    optimizer = torch.optim.AdamW(
        [{"params": decoder_parameters(seg)}, {"params": encoder_parameters(seg)}],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    start = cfg.decoder_first_steps

    def decoder_factor(step: int) -> float:
        return warmup_cosine(step, cfg.warmup_steps, cfg.steps)

    def encoder_factor(step: int) -> float:
        if step < start:
            return 0.0
        return warmup_cosine(step - start, cfg.warmup_steps, cfg.steps - start)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [decoder_factor, encoder_factor])
    return optimizer, scheduler


def pretrain(
    cfg: PretrainConfig,
    sam_cfg: SamConfig | None = None,
    log: Callable[[str], None] = print,
    log_every: int = 50,
) -> tuple[SamSegmenter, dict]:
    """Train a toy SAM2 from random init; returns it (LENS's freezing restored) and a summary.

    Runs with `torch.use_deterministic_algorithms(True)`: without it, some CPU kernels
    accumulate gradients in a thread-dependent order, and over 1500 steps two runs drift apart
    (measured: different weights after 40 steps). With it, a rerun on the same machine gives
    the same weights bit for bit.
    """
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _pretrain(cfg, sam_cfg, log, log_every)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _pretrain(
    cfg: PretrainConfig,
    sam_cfg: SamConfig | None,
    log: Callable[[str], None],
    log_every: int,
) -> tuple[SamSegmenter, dict]:
    torch.manual_seed(cfg.seed)
    seg = SamSegmenter(sam_cfg or toy_sam_config())
    seg.train()
    world = ToyWorld(cfg.world, seed=cfg.world_seed)
    optimizer, scheduler = make_optimizer(seg, cfg)
    start, history = time.perf_counter(), []
    for step in range(cfg.steps):
        if step == 0 or step == cfg.decoder_first_steps:  # phase 1, then phase 2
            set_trainable(seg, decoder=True, encoder=step >= cfg.decoder_first_steps)
        history.append(training_step(seg, optimizer, make_batch(world, step, cfg), cfg))
        scheduler.step()
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            recent = history[-log_every:]
            means = {k: np.mean([h[k] for h in recent]) for k in recent[0]}
            text = " ".join(f"{k} {v:.4f}" for k, v in means.items())
            log(f"step {step + 1}/{cfg.steps} {text} ({time.perf_counter() - start:.0f} s)")
    wall = time.perf_counter() - start
    set_trainable(seg, decoder=False, encoder=False)
    seg.set_decoder_trainable(True)  # LENS: image encoder frozen, prompt side trainable
    seg.eval()
    summary = {
        "steps": cfg.steps,
        "train_images": cfg.steps * cfg.batch_images,
        "wall_time_s": round(wall, 1),
        "final_loss": float(np.mean([h["loss"] for h in history[-min(50, len(history)) :]])),
    }
    return seg, summary


# ---- evaluation ------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_sam_with_boxes(
    segmenter: SamSegmenter,
    world: ToyWorld,
    split: str,
    n: int,
    batch_size: int = 16,
    stability_fallback: bool = False,
) -> dict[str, float]:
    """Mask IoU of SAM prompted with each sample's ground-truth box (the toy target's box).

    Returns gIoU (= mean per-sample IoU, LISA protocol), cIoU and the count, over samples
    0..n-1 of `split`.
    """
    was_training = segmenter.training
    segmenter.eval()
    accumulator = IoUAccumulator()
    for start in range(0, n, batch_size):
        samples = [world.sample(split, i) for i in range(start, min(n, start + batch_size))]
        features = segmenter.encode([s.image for s in samples])
        out = segmenter.decode(
            features,
            boxes=torch.tensor([s.box for s in samples], dtype=torch.float32),
            orig_sizes=[s.image.shape[:2] for s in samples],
            stability_fallback=stability_fallback,
        )
        for logits, sample in zip(out.logits, samples):
            accumulator.update(logits[0] > 0, torch.from_numpy(sample.mask))
    segmenter.train(was_training)
    result = accumulator.compute()
    return {"mean_iou": result["giou"], **result}


@torch.no_grad()
def evaluate_sam_with_click(
    segmenter: SamSegmenter, world: ToyWorld, split: str, n: int
) -> dict[str, float]:
    """Mask IoU of SAM prompted with ONE positive click: the target pixel nearest its centroid.

    Not a LENS metric; it shows that the pretrained prompt space is more than box corners.
    """
    was_training = segmenter.training
    segmenter.eval()
    accumulator = IoUAccumulator()
    for i in range(n):
        sample = world.sample(split, i)
        ys, xs = np.nonzero(sample.mask == 1)
        k = np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2)
        click = (torch.tensor([[[xs[k], ys[k]]]], dtype=torch.float32), torch.ones(1, 1))
        out = segmenter.decode(
            segmenter.encode([sample.image]), orig_sizes=[sample.mask.shape], points=click
        )
        accumulator.update(out.logits[0, 0] > 0, torch.from_numpy(sample.mask))
    segmenter.train(was_training)
    result = accumulator.compute()
    return {"mean_iou": result["giou"], **result}


# ---- command line ----------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = PretrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=TOY_SAM_DIR, help="output directory")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument(
        "--decoder-first-steps",
        type=int,
        default=None,
        help=f"phase 1 steps (default {defaults.decoder_first_steps}, at most 15%% of --steps)",
    )
    parser.add_argument("--batch-images", type=int, default=defaults.batch_images)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--point-fraction", type=float, default=defaults.point_fraction)
    parser.add_argument("--negative-points", type=int, default=defaults.negative_points)
    parser.add_argument("--refine-rounds", type=int, default=defaults.refine_rounds)
    parser.add_argument(
        "--world-version", type=int, default=1, help="ToyWorldConfig.version (2 = world v2)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--box-noise", type=float, default=defaults.box_noise)
    parser.add_argument("--loss-kind", choices=("bce", "focal"), default=defaults.loss_kind)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--eval-samples", type=int, default=500, help="val samples to score")
    parser.add_argument("--log-every", type=int, default=50)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Pretrain, save float16 weights, reload them and score the reloaded model on val."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PretrainConfig(
        steps=args.steps,
        decoder_first_steps=(
            args.decoder_first_steps
            if args.decoder_first_steps is not None
            else min(PretrainConfig.decoder_first_steps, 3 * args.steps // 20)
        ),
        batch_images=args.batch_images,
        lr=args.lr,
        warmup_steps=min(PretrainConfig.warmup_steps, max(1, args.steps // 10)),
        point_fraction=args.point_fraction,
        negative_points=args.negative_points,
        refine_rounds=args.refine_rounds,
        box_noise=args.box_noise,
        loss_kind=args.loss_kind,
        seed=args.seed,
        world=ToyWorldConfig(version=args.world_version),
    )
    seg, summary = pretrain(cfg, log_every=args.log_every)
    save_sam(seg, args.out, summary)
    loaded = load_sam(args.out)  # score what is saved: the float16-rounded weights
    world = ToyWorld(cfg.world, seed=cfg.world_seed)
    info = {
        **summary,
        "val_gt_box": evaluate_sam_with_boxes(loaded, world, "val", args.eval_samples),
        "val_gt_box_stability_fallback": evaluate_sam_with_boxes(
            loaded, world, "val", args.eval_samples, stability_fallback=True
        ),
        "val_one_click": evaluate_sam_with_click(loaded, world, "val", args.eval_samples),
        "gt_box_by_split": {
            split: evaluate_sam_with_boxes(loaded, world, split, args.eval_samples)
            for split in cfg.world.splits
            if split != "train"
        },
        "parameters": loaded.parameter_counts(),
        "pretrain_config": asdict(cfg),
    }
    save_sam(loaded, args.out, info)
    print(f"wrote {args.out}: val with GT boxes {info['val_gt_box']}")
    return info


if __name__ == "__main__":
    main()
