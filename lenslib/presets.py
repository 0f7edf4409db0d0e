"""Presets: the ONE place where "toy" and "full" differ. Only sizes and paths, never logic.

    toy:  the tiny Qwen2.5-VL and SAM2 pretrained on toy world v2 (committed under
          lenslib/toy/assets/v2/), toy-world data, schedules that finish in minutes on a CPU.
    full: Qwen2.5-VL-3B-Instruct + SAM2 hiera-L from local paths or hub ids, RefCOCO/+/g for
          training, the paper's hyperparameters (Tables A1 and A2).

A training script takes `--preset` and may override any field on the command line.
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass, field, fields, replace
from typing import Literal

import torch
from torch.utils.data import ConcatDataset

from lenslib.align import AlignConfig
from lenslib.data.refer import ReferDataset
from lenslib.mllm import load_mllm
from lenslib.model import LensConfig, LensModel
from lenslib.rl import GRPOConfig
from lenslib.sam import SamConfig, SamSegmenter
from lenslib.settings import add_flags, changed, check_choices, setting
from lenslib.toy import ToyDataset, ToyWorld, ToyWorldConfig, load_bases, random_bases

STAGES = ("align", "rl")
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]


@dataclass(frozen=True)
class Preset:
    """Model sources, data, the LENS glue and the settings of both stages.

    `lens`, `align` and `rl` are the dataclasses the model and the two stages take; their
    defaults are the paper's (Tables 3-4, A1, A2), so the "full" preset only names models and
    data, and the "toy" preset lists what it changes.
    """

    name: str
    # ---- models
    mllm: str = setting(
        "toy", 'Qwen2.5-VL: a local folder or hub id ("toy": the committed toy base)'
    )
    attn_implementation: AttnImplementation = setting(
        "sdpa",
        'attention kernel of the MLLM (full scale): "sdpa", "eager" or "flash_attention_2" '
        "(needs the flash-attn package)",
    )
    mllm_max_pixels: int | None = setting(
        None, "the MLLM's smart-resize pixel budget (None: the checkpoint's own)"
    )
    sam_config: str = setting(
        "toy", 'a sam2 config name, e.g. "sam2_hiera_l.yaml" ("toy": the committed toy base)'
    )
    sam_checkpoint: str | None = setting(None, "the SAM2 checkpoint file (full scale)")
    init_seed: int = setting(
        42, "seed of the toy world and of the context module's initial weights"
    )
    # ---- data
    data_root: str | None = setting(
        None, "full scale: the folder holding refer_seg/ (and ReasonSeg/)"
    )
    train_sets: tuple[str, ...] = setting(
        ("refcoco", "refcoco+", "refcocog"), "full scale: the training sets"
    )
    toy_train_size: int = setting(4096, "toy scale: samples per training epoch")
    toy_val_size: int = setting(64, "toy scale: samples in the validation split")
    toy_world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    # ---- the LENS glue and the two stages
    lens: LensConfig = field(default_factory=LensConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    rl: GRPOConfig = field(default_factory=GRPOConfig)

    @property
    def max_completion_length(self) -> int:
        """The answer length limit of generation at evaluation (stage 2's)."""
        return self.rl.max_new_tokens

    def override(self, stage: str | None = None, **changes) -> Preset:
        """A copy with settings changed by name; None values keep the preset's.

        A name is looked up among the preset's own fields, then `lens`, then the stage
        configs: `stage` ("align" or "rl") picks one stage for names both stages have
        (e.g. lr); without it such a name changes both.
        """
        changes = {k: v for k, v in changes.items() if v is not None}
        parts = {"preset": {}, "lens": {}, "align": {}, "rl": {}}
        for name, value in changes.items():
            owners = setting_owners(name, stage)
            if not owners:
                raise ValueError(f"unknown setting {name!r}; known: {sorted(setting_names())}")
            for owner in owners:
                parts[owner][name] = value
        updated = replace(self, **parts["preset"])
        nested = {
            p: replace(getattr(updated, p), **parts[p]) for p in ("lens", *STAGES) if parts[p]
        }
        updated = replace(updated, **nested)
        for part in (updated.lens, updated.align, updated.rl):
            check_choices(part)
        return updated


def setting_owners(name: str, stage: str | None = None) -> list[str]:
    """Which parts of a Preset hold setting `name`: "preset", "lens", "align" and/or "rl"."""
    if stage not in (None, *STAGES):
        raise ValueError(f"stage must be one of {STAGES} or None, got {stage!r}")
    own = {f.name for f in fields(Preset)} - {"name", "lens", "align", "rl", "toy_world"}
    if name in own:
        return ["preset"]
    if name in {f.name for f in fields(LensConfig)} - {"sam"}:
        return ["lens"]
    stages = [stage] if stage else list(STAGES)
    classes = {"align": AlignConfig, "rl": GRPOConfig}
    return [s for s in stages if name in {f.name for f in fields(classes[s])}]


def setting_names() -> set[str]:
    """Every name `Preset.override` accepts."""
    names = {f.name for f in fields(Preset)} | {f.name for f in fields(LensConfig)}
    names |= {f.name for f in fields(AlignConfig)} | {f.name for f in fields(GRPOConfig)}
    return names - {"name", "lens", "align", "rl", "toy_world", "sam"}


# world v2 answers run 43-76 tokens (candidates, the comparison, the target, then the box)
_TOY_LOOP = dict(max_new_tokens=96, eval_every=64, eval_samples=128, checkpoint_every=64)

PRESETS: dict[str, Preset] = {
    "full": Preset(
        name="full",
        mllm="Qwen/Qwen2.5-VL-3B-Instruct",
        mllm_max_pixels=1_000_000,  # the authors' budget (the hub processor allows ~12.8 M)
        sam_config="sam2_hiera_l.yaml",
        sam_checkpoint="checkpoints/sam2_hiera_large.pt",
        data_root="data",
        # memory, so that each stage fits one 80 GB GPU per process (bf16, ZeRO-2): stage 2's
        # 8 prompts x G 8 = 64 rollouts of up to 768 tokens per GPU in ONE forward would keep
        # ~0.5 TB of activations; 4 rollouts per forward/backward (gradients accumulated, same
        # gradient) and recomputed activations keep them to a few GB, at ~1.3x the time of
        # the gradient passes plus one forward without gradients for the masks (R_seg).
        # Stage 1 backpropagates through the frozen MLLM to the queries: checkpointing too.
        align=AlignConfig(gradient_checkpointing=True),
        rl=GRPOConfig(rollout_micro_batch=4, gradient_checkpointing=True),
    ),
    "toy": Preset(
        name="toy",
        toy_train_size=2048,
        toy_val_size=256,
        # world v2: beside plain scenes, scenes where a box is not enough (two shapes in one
        # box, a shape inside a ring, occluders) and rationales that compare candidates; the
        # bases in lenslib/toy/assets/v2 were pretrained on it. ToyWorldConfig() = world v1.
        toy_world=ToyWorldConfig(version=2),
        lens=LensConfig(num_queries=16),
        # 384 steps, under 5 min on 2 CPU cores; val cIoU plateaus after ~320
        align=AlignConfig(
            epochs=3, batch_size=16, lr=3e-4, output_dir="runs/toy/align", **_TOY_LOOP
        ),
        # stage-2 lrs per part, chosen by the sweep in notebook 04 (one lr of 1e-4 for every
        # part cost 0.06-0.09 val cIoU); 120 steps fit a notebook's 10 minutes
        rl=GRPOConfig(
            epochs=1,
            batch_size=4,
            lr=3e-5,
            mllm_lr=1e-5,
            sam_lr=1e-5,
            max_steps=120,
            output_dir="runs/toy/rl",
            **_TOY_LOOP,
        ),  # fmt: skip
    ),
}


def get_preset(name: str, stage: str | None = None, **changes) -> Preset:
    """The named preset with `changes` applied (see `Preset.override`; None = keep)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].override(stage, **changes)


def add_setting_flags(parser: argparse.ArgumentParser, stage: str | None) -> list[str]:
    """A `--flag` for every setting a script of `stage` ("align", "rl" or None for none) can
    change, each with its help text and its toy and full values; returns their names."""

    def values(part: str, cls: type) -> dict[str, str]:
        rows = {}
        for f in fields(cls):
            pair = [getattr(getattr(p, part) if part else p, f.name) for p in PRESETS.values()]
            rows[f.name] = ", ".join(f"{n}: {v}" for n, v in zip(PRESETS, pair))
        return rows

    names = add_flags(parser, Preset, "models and data", values("", Preset), skip=("name",))
    names += add_flags(parser, LensConfig, "the LENS glue", values("lens", LensConfig))
    if stage is not None:
        cls = {"align": AlignConfig, "rl": GRPOConfig}[stage]
        names += add_flags(parser, cls, f"stage settings ({stage})", values(stage, cls))
    return names


def preset_from_flags(args: argparse.Namespace, names: list[str], stage: str | None) -> Preset:
    """The preset `args.preset` with every flag among `names` that was given applied."""
    return get_preset(args.preset, stage, **changed(args, names))


def toy_world(preset: Preset) -> ToyWorld:
    """The toy world a preset trains and evaluates on."""
    return ToyWorld(preset.toy_world, seed=preset.init_seed)


def toy_split(preset: Preset, split: str, size: int) -> ToyDataset:
    """A toy split of `size` samples, generated lazily."""
    return ToyDataset(toy_world(preset), split, size)


def build_lens(
    preset: Preset, device: str | torch.device = "cpu", pretrained: bool = True
) -> LensModel:
    """The LENS model at the start of stage 1: pretrained MLLM + pretrained SAM2, fresh context
    module. `pretrained=False` (toy only) uses random base models, for tests of the plumbing."""
    if preset.mllm == "toy":
        if pretrained:
            mllm, processor, sam = load_bases(device, version=preset.toy_world.version)
        else:
            mllm, processor, sam = random_bases(preset.toy_world, preset.init_seed, device)
    else:
        attn = preset.attn_implementation
        if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ImportError(
                'attn_implementation "flash_attention_2" needs the flash-attn package'
            )
        mllm, processor = load_mllm(
            preset.mllm, max_pixels=preset.mllm_max_pixels, device=device, attn_implementation=attn
        )
        sam_cfg = SamConfig(config_name=preset.sam_config, checkpoint=preset.sam_checkpoint)
        sam = SamSegmenter(sam_cfg, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset.init_seed)  # the same context module init on every process
        return LensModel(mllm.to(device), processor, sam, preset.lens)


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
