"""Stage-2 test scaffolding shared by test modules: a toy LENS policy and a reference unlike it."""

from __future__ import annotations

import torch

from lenslib.model import LensModel
from lenslib.presets import Preset, build_lens
from lenslib.rl import frozen_reference


def policy_and_reference(preset: Preset) -> tuple[LensModel, torch.nn.Module]:
    """The committed toy bases (real answers, boxes and advantages) set up for stage 2, and a
    frozen reference nudged away from them, so that the KL term has a gradient too."""
    torch.manual_seed(0)
    model = build_lens(preset)
    ref = frozen_reference(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.set_stage("rl")
    model.train()
    return model, ref
