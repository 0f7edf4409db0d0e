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

import torch
from accelerate import Accelerator

from lenslib.data.sample import SegSample
from lenslib.evaluate import evaluate_answers
from lenslib.losses import LossKind
from lenslib.mllm import tokenize_completions
from lenslib.model import LensModel
from lenslib.settings import setting
from lenslib.training import (
    LoopConfig,
    SchedulerKind,
    deepspeed_precision,
    ground_truth_answer,
    make_scheduler,
    mean_seg_loss,
    run_stage,
    run_steps,
    target_masks,
)


@dataclass(kw_only=True)
class AlignConfig(LoopConfig):
    """Stage-1 settings; the defaults are the paper's (Table A1)."""

    epochs: int = setting(25, "passes over the training set (Table A1: 25)")
    batch_size: int = setting(128, "samples per optimiser step, over all processes (Table A1: 128)")
    lr: float = setting(3e-5, "AdamW learning rate (Table A1: 3e-5)")
    scheduler: SchedulerKind = setting("cosine", "learning-rate schedule (Table A1: cosine)")
    output_dir: str = setting(
        "runs/align", "checkpoints, history and the aligned model (output_dir/final)"
    )
    loss_kind: LossKind = setting(
        "bce",
        'pixel loss beside dice: "bce" (what the authors\' "focal" computes) or a real sigmoid "focal"',
    )


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
    images = [s.image for s in samples]
    boxes = lens.answer_boxes(images, answers) if lens.cfg.box_prompt else None
    out = model(images, [s.text for s in samples], ids, mask, boxes=boxes)
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
