"""Stage 1, then stage 2: the one place where the two training stages are wired together.

    build_lens(preset)                      pretrained MLLM + SAM2, fresh context module
      -> train_stage(..., "align")          eq. 5 with preset.align   (lenslib.align)
      -> train_stage(..., "rl")             eqs. 6-12 with preset.rl  (lenslib.rl)

The demo, the tables, notebooks 03-04 and the stage-2 benchmark all go through these
functions, so they train exactly what the exported scripts train.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator

from lenslib.align import train_alignment
from lenslib.data.sample import SegSample
from lenslib.model import LensModel
from lenslib.presets import STAGES, Preset, build_lens, train_val_data
from lenslib.rl import train_grpo
from lenslib.training import save_model


def train_stage(
    model: LensModel,
    preset: Preset,
    stage: str,
    accelerator: Accelerator,
    data: tuple[Sequence[SegSample], Sequence[SegSample]] | None = None,
    resume: bool = False,
    on_log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run one stage ("align" or "rl") with the preset's settings for it; `data` is (train,
    val), by default the preset's. Returns the stage's log, one record per optimiser step."""
    train, val = data or train_val_data(preset)
    if stage == "align":
        return train_alignment(model, train, val, preset.align, accelerator, resume, on_log)
    if stage == "rl":
        return train_grpo(model, train, val, preset.rl, accelerator, resume, on_log)
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def run_pipeline(
    preset: Preset,
    accelerator: Accelerator,
    stages: Sequence[str] = STAGES,
    model: LensModel | None = None,
    on_stage_end: Callable[[str, LensModel, list[dict]], None] | None = None,
) -> tuple[LensModel, dict[str, list[dict]]]:
    """Train `stages` in order, from `model` (default: `build_lens(preset)`), calling
    `on_stage_end(stage, model, log)` after each. Returns the model and {stage: log}."""
    model = model if model is not None else build_lens(preset, device=accelerator.device)
    logs = {}
    for stage in stages:
        logs[stage] = train_stage(model, preset, stage, accelerator)
        if on_stage_end is not None:
            on_stage_end(stage, model, logs[stage])
    return model, logs


def aligned_model(preset: Preset, folder: str | Path, accelerator: Accelerator) -> LensModel:
    """The stage-1 model saved in `folder`. If there is none and the preset is the toy one,
    stage 1 runs first and saves it there (so notebook 04 also works on its own); at full
    scale a missing folder is an error, since stage 1 takes hours."""
    folder = Path(folder)
    if not (folder / "lens_config.json").exists():
        if preset.mllm != "toy":
            raise FileNotFoundError(
                f"--init {folder}: no stage-1 model there (lens_config.json missing); "
                "run scripts/train_align.py first, or pass the folder it saved (output_dir/final)"
            )
        accelerator.print(f"no aligned model in {folder}: running stage 1 first")
        quick = preset.override(
            "align", eval_every=0, eval_samples=8, checkpoint_every=0, output_dir=str(folder.parent)
        )
        model, _ = run_pipeline(quick, accelerator, stages=("align",))
        save_model(model, folder, accelerator)
    accelerator.wait_for_everyone()
    dtype = torch.float32 if preset.mllm == "toy" else torch.bfloat16  # as `build_lens` loads it
    return LensModel.from_pretrained(folder, device=accelerator.device, dtype=dtype)
