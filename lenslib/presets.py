"""Presets: the ONE place where "toy" and "full" differ. Only sizes and paths, never logic.

    toy:  the tiny Qwen2.5-VL and SAM2 pretrained on the toy world (committed under
          lenslib/assets/toy/), toy-world data, schedules that finish in minutes on a CPU.
    full: Qwen2.5-VL-3B-Instruct + SAM2 hiera-L from local paths or hub ids, RefCOCO/+/g for
          training, the paper's hyperparameters (Tables A1 and A2).

A training script takes `--preset` and may override any field on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch.utils.data import ConcatDataset

from lenslib.data.refer import ReferDataset
from lenslib.data.toy import ToyDataset, ToyWorld, ToyWorldConfig, toy_corpus
from lenslib.mllm import build_toy_mllm, load_mllm
from lenslib.model import LensConfig, LensModel
from lenslib.sam import SamConfig, SamSegmenter
from lenslib.tokenizer import build_toy_tokenizer


@dataclass(frozen=True)
class Preset:
    """Model sources, data and hyperparameters of both stages."""

    name: str
    # ---- models
    mllm: str = "toy"  # "toy" (committed toy base model) or a path / hub id of Qwen2.5-VL
    mllm_max_pixels: int | None = None  # smart-resize budget; None: the checkpoint's own
    sam_config: str = "toy"  # "toy" or a sam2 config name, e.g. "sam2_hiera_l.yaml"
    sam_checkpoint: str | None = None  # a SAM2 checkpoint file (full scale)
    num_queries: int = 64  # M, Table 3
    connector_kind: str = "vit"  # Table 4
    connector_output: str = "tokens"  # "tokens" (paper) or "pooled" (authors' code)
    mrope: str = "correct"  # "correct" or "authors"
    # ---- data
    data_root: str | None = None  # folder holding refer_seg/ (and ReasonSeg/) at full scale
    train_sets: tuple[str, ...] = ("refcoco", "refcoco+", "refcocog")
    toy_train_size: int = 4096  # samples per toy "epoch"
    toy_val_size: int = 64
    # ---- stage 1: alignment (Table A1)
    align_epochs: int = 25
    align_batch_size: int = 128
    align_lr: float = 3e-5
    align_scheduler: str = "cosine"
    # ---- stage 2: GRPO (Table A2)
    rl_epochs: int = 16
    rl_batch_size: int = 64  # prompts per step (x G rollouts)
    rl_lr: float = 3e-6
    rl_mllm_lr: float = 0.0  # the MLLM's stage-2 lr (0: rl_lr for every part, as Table A2)
    rl_sam_lr: float = 0.0  # SAM decoder's stage-2 lr (0: rl_lr)
    rl_scheduler: str = "linear"
    rl_max_steps: int = 0  # stop stage 2 after this many steps (0: all rl_epochs)
    group_size: int = 8  # G
    beta: float = 0.04  # KL weight, eq. 10
    alpha: float = 1.0  # seg loss weight, eq. 12
    reward_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # lambda_1..3, eq. 11
    temperature: float = 0.9
    top_p: float = 0.9
    top_k: int = 50
    max_completion_length: int = 768
    max_prompt_length: int = 2048
    seed: int = 42
    eval_every: int = 500  # optimiser steps between validation runs
    eval_samples: int = 1000  # validation samples per run
    checkpoint_every: int = 500  # optimiser steps between checkpoints
    toy_world: ToyWorldConfig = field(default_factory=ToyWorldConfig)

    def override(self, **changes) -> Preset:
        """A copy with the given fields changed; None values mean "keep the preset's"."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown preset field(s) {sorted(unknown)}; known: {sorted(known)}")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


PRESETS: dict[str, Preset] = {
    "full": Preset(
        name="full",
        mllm="Qwen/Qwen2.5-VL-3B-Instruct",
        mllm_max_pixels=1_000_000,  # the authors' budget (the hub processor allows ~12.8 M)
        sam_config="sam2_hiera_l.yaml",
        sam_checkpoint="checkpoints/sam2_hiera_large.pt",
        data_root="data",
    ),
    "toy": Preset(
        name="toy",
        num_queries=16,
        toy_train_size=2048,
        toy_val_size=256,
        align_epochs=3,  # 384 steps, under 5 min on 2 CPU cores; val cIoU plateaus after ~320
        align_batch_size=16,
        align_lr=3e-4,  # 1e-3 left the vit connector stuck at its untrained cIoU
        rl_epochs=1,
        rl_batch_size=4,
        # Stage-2 lrs, measured on 256 val samples from a stage-1 model at cIoU 0.539: one lr
        # of 1e-4 for all parts moved the MLLM's hidden states under the context queries and
        # cost 0.06-0.09 cIoU; MLLM 1e-5, SAM decoder 1e-5, context module 3e-5 kept 0.532.
        # Notebook 04 has the full table (16 prompts a step do better, at 4x the time per step);
        # benchmarks/stage2_recipes.py reruns any recipe.
        rl_lr=3e-5,
        rl_mllm_lr=1e-5,
        rl_sam_lr=1e-5,
        rl_max_steps=120,  # one toy epoch is 512 steps; 120 fit a notebook's 10 minutes
        max_completion_length=48,
        max_prompt_length=512,
        eval_every=64,  # stage 1: 6 evaluations in 384 steps; stage 2: at 64 and 120
        eval_samples=128,
        checkpoint_every=64,
    ),
}


def get_preset(name: str, **changes) -> Preset:
    """The named preset with `changes` applied (None = keep)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].override(**changes)


def toy_world(preset: Preset) -> ToyWorld:
    """The toy world a preset trains and evaluates on."""
    return ToyWorld(preset.toy_world, seed=preset.seed)


def toy_split(preset: Preset, split: str, size: int) -> ToyDataset:
    """A toy split of `size` samples, generated lazily."""
    return ToyDataset(toy_world(preset), split, size)


def lens_config(preset: Preset) -> LensConfig:
    """The LensConfig a preset asks for."""
    return LensConfig(
        num_queries=preset.num_queries,
        connector_kind=preset.connector_kind,
        connector_output=preset.connector_output,
        mrope=preset.mrope,
    )


def build_lens(
    preset: Preset, device: str | torch.device = "cpu", pretrained: bool = True
) -> LensModel:
    """The LENS model at the start of stage 1: pretrained MLLM + pretrained SAM2, fresh context
    module. `pretrained=False` (toy only) uses random base models, for tests of the plumbing."""
    if preset.mllm == "toy":
        if pretrained:
            from lenslib.pretrain_mllm import load_toy_mllm
            from lenslib.sam import load_toy_sam

            mllm, processor = load_toy_mllm(device)
            sam = load_toy_sam(device)
        else:
            tokenizer = build_toy_tokenizer(toy_corpus(preset.toy_world))
            mllm, processor = build_toy_mllm(tokenizer, seed=preset.seed)
            sam = SamSegmenter(SamConfig.toy(), device)
    else:
        mllm, processor = load_mllm(preset.mllm, max_pixels=preset.mllm_max_pixels, device=device)
        sam_cfg = SamConfig(config_name=preset.sam_config, checkpoint=preset.sam_checkpoint)
        sam = SamSegmenter(sam_cfg, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset.seed)  # the same context module init on every process
        return LensModel(mllm.to(device), processor, sam, lens_config(preset))


def train_val_data(preset: Preset):
    """(train, val) datasets of a preset: the toy world, or RefCOCO/+/g train and RefCOCO val
    (the paper trains both stages on the RefCOCO series, appendix A)."""
    if preset.mllm == "toy":
        return (
            toy_split(preset, "train", preset.toy_train_size),
            toy_split(preset, "val", preset.toy_val_size),
        )
    if preset.data_root is None:
        raise ValueError("the full preset needs --data-root (the folder holding refer_seg/)")
    train = ConcatDataset(
        [ReferDataset(preset.data_root, name, "train") for name in preset.train_sets]
    )
    return train, ReferDataset(preset.data_root, "refcoco", "val")
