"""Stage 1, pretraining alignment (paper eq. 5, Table A1).

The MLLM and SAM2 are frozen; only the context queries and the connector learn, from a
segmentation loss alone:

    L_align = L_seg(P_seg, M_gt)                                              (eq. 5)

As in the authors' code, the MLLM reads the prompt AND the ground-truth answer (teacher forced),
then the queries; so the queries learn to pull out of the MLLM what the answer refers to. SAM's
image features never change in this stage, so they are computed once per image and cached
(`lenslib.sam.FeatureCache`).

`align_step` is one optimiser step, top to bottom; `train_alignment` is the loop around it
(epochs, evaluation, checkpoints, resume).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from lenslib.data.sample import SegSample
from lenslib.evaluate import evaluate_answers
from lenslib.mllm import tokenize_completions
from lenslib.model import LensModel
from lenslib.training import (
    deepspeed_precision,
    ground_truth_answer,
    make_scheduler,
    mean_seg_loss,
    run_stage,
    run_steps,
    save_model,
    target_masks,
)


@dataclass
class AlignConfig:
    """Stage-1 hyperparameters (Table A1 values in the "full" preset)."""

    epochs: int = 25
    batch_size: int = 128  # global, over all processes
    lr: float = 3e-5
    scheduler: str = "cosine"
    seed: int = 42
    loss_kind: str = "bce"  # the authors' "focal" is BCE; "focal" = real sigmoid focal loss
    eval_every: int = 0  # optimiser steps between evaluations (0: only at the end)
    eval_samples: int = 64
    max_new_tokens: int = 768  # greedy answer length at evaluation (max completion, Table A1)
    checkpoint_every: int = 0  # optimiser steps between checkpoints (0: none)
    output_dir: str = "runs/align"
    max_steps: int | None = None  # stop early (tests, quick looks)

    @classmethod
    def from_preset(cls, preset, **changes) -> AlignConfig:
        """The stage-1 settings of a `lenslib.presets.Preset` (Table A1 in "full"); `changes`
        override single fields (evaluation and checkpoints keep this class's defaults)."""
        values = dict(
            epochs=preset.align_epochs, batch_size=preset.align_batch_size, lr=preset.align_lr,
            scheduler=preset.align_scheduler, seed=preset.seed,
            max_new_tokens=preset.max_completion_length,
        )  # fmt: skip
        return cls(**(values | changes))


def align_step(
    model: torch.nn.Module,
    samples: Sequence[SegSample],
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loss_kind: str = "bce",
) -> dict[str, float]:
    """One optimiser step of eq. 5 on this process's share of the batch."""
    lens: LensModel = accelerator.unwrap_model(model)
    # 1. the ground-truth answer, teacher forced as the assistant turn
    answers = [ground_truth_answer(lens, s) for s in samples]
    ids, mask = tokenize_completions(lens.processor, answers)  # (B, T)
    # 2. prompt + answer + queries -> MLLM -> connector -> SAM (eqs. 2-4)
    out = model([s.image for s in samples], [s.text for s in samples], ids, mask)
    # 3. segmentation loss against the ground-truth masks (eq. 5)
    loss = mean_seg_loss(out.mask_logits, target_masks(samples, accelerator.device), loss_kind)
    accelerator.backward(loss)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": accelerator.reduce(loss.detach(), "mean").item()}


def train_alignment(
    model: LensModel,
    train: Sequence[SegSample],
    val: Sequence[SegSample],
    cfg: AlignConfig,
    accelerator: Accelerator,
    resume: bool = False,
    on_log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run stage 1; returns the log (one dict per step, with val metrics where evaluated).

    resume=True continues from the newest checkpoint in cfg.output_dir (if any). The loop
    (epochs, evaluation, checkpoints) is `lenslib.training.run_stage`.
    """
    deepspeed_precision(model, accelerator)  # (DeepSpeed only)
    counts = model.set_stage("align")
    accelerator.print(f"stage 1 trains {counts}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    steps = run_steps(len(train), cfg.batch_size, cfg.epochs, cfg.max_steps)
    scheduler = make_scheduler(cfg.scheduler, optimizer, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped once per global step

    def step_fn(samples: Sequence[SegSample]) -> dict[str, float]:
        return align_step(model, samples, accelerator, optimizer, scheduler, cfg.loss_kind)

    return run_stage(model, step_fn, scheduler, train, val, cfg, accelerator, resume, on_log)


def teacher_forced_metrics(
    model: LensModel,
    samples: Sequence[SegSample],
    batch_size: int = 16,
    accelerator: Accelerator | None = None,
) -> dict[str, float]:
    """gIoU / cIoU of the masks made from the GROUND-TRUTH answers, as stage 1 trains (eq. 5):
    the alignment itself, free of the MLLM's mistakes (`evaluate` includes them)."""
    lens = accelerator.unwrap_model(model) if accelerator else model
    answers = [ground_truth_answer(lens, s) for s in samples]
    return evaluate_answers(lens, samples, answers, batch_size, accelerator)


def save_aligned(model: LensModel, folder: str | Path, accelerator: Accelerator) -> None:
    """Save the stage-1 result as a LensModel folder (call on every process; the main one
    writes, see `lenslib.training.save_model`)."""
    save_model(model, folder, accelerator)


def aligned_model(preset, folder: str | Path, accelerator: Accelerator) -> LensModel:
    """The stage-1 result saved in `folder`; if there is none yet, run stage 1 with the preset's
    settings first and save it there (so notebook 04 also works on its own)."""
    from lenslib.presets import build_lens, train_val_data

    folder = Path(folder)
    if not (folder / "lens_config.json").exists():
        if preset.mllm != "toy":  # a whole full-scale stage 1 is never what a typo should start
            raise FileNotFoundError(
                f"no aligned model in {folder} (no lens_config.json): pass --init the "
                "output_dir/final folder of scripts/train_align.py"
            )
        accelerator.print(f"no aligned model in {folder}: running stage 1 first")
        model = build_lens(preset, device=accelerator.device)
        train, val = train_val_data(preset)
        cfg = AlignConfig.from_preset(preset, eval_samples=8, output_dir=str(folder.parent))
        train_alignment(model, train, val, cfg, accelerator)
        save_aligned(model, folder, accelerator)
    accelerator.wait_for_everyone()
    dtype = torch.float32 if preset.mllm == "toy" else torch.bfloat16  # as `build_lens` loads it
    return LensModel.from_pretrained(folder, device=accelerator.device, dtype=dtype)
