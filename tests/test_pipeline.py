"""Stage 1 then stage 2 (lenslib.pipeline): the one wiring the demo, tables and notebooks use."""

from __future__ import annotations

import pytest
import torch

from lenslib.model import LensModel
from lenslib.pipeline import aligned_model, run_pipeline
from lenslib.presets import build_lens, get_preset
from lenslib.training import make_accelerator


def test_run_pipeline_trains_each_stage_in_order_with_the_presets_settings(tmp_path):
    preset = get_preset("toy", num_queries=2, max_steps=1, eval_every=0, eval_at_end=False)
    preset = preset.override("align", batch_size=2, output_dir=str(tmp_path / "align"))
    preset = preset.override(
        "rl", batch_size=1, group_size=2, max_new_tokens=4, output_dir=str(tmp_path / "rl")
    )
    torch.manual_seed(0)
    model = build_lens(preset, pretrained=False)
    queries = model.queries.queries.detach().clone()
    seen = []
    trained, logs = run_pipeline(
        preset,
        make_accelerator(cpu=True),
        model=model,
        on_stage_end=lambda stage, m, log: seen.append((stage, m is model, len(log))),
    )
    assert trained is model and seen == [("align", True, 1), ("rl", True, 1)]
    assert list(logs) == ["align", "rl"] and "reward" in logs["rl"][0]
    assert "val_ciou" not in logs["align"][0]  # eval_at_end=False: no validation run
    assert not torch.equal(queries, model.queries.queries)  # the context module learned


def test_aligned_model_never_starts_a_full_scale_stage_1_by_itself(tmp_path):
    with pytest.raises(FileNotFoundError, match="--init"):
        aligned_model(get_preset("full"), tmp_path / "missing", make_accelerator(cpu=True))


def test_aligned_model_loads_a_saved_stage_1_model(tmp_path):
    preset = get_preset("toy", num_queries=2)
    build_lens(preset, pretrained=False).save_pretrained(tmp_path / "final")
    model = aligned_model(preset, tmp_path / "final", make_accelerator(cpu=True))
    assert isinstance(model, LensModel) and model.cfg.num_queries == 2
