"""lenslib.tables: the miniature ablations run end to end (tiny steps) and report honestly."""

from __future__ import annotations

import json

import pytest
import torch

import lenslib.tables as tables
from lenslib.presets import build_lens, get_preset, toy_split
from lenslib.tables import (
    PAPER_TABLE3,
    TableConfig,
    box_prompt_baseline,
    load_results,
    markdown,
    merge,
    run_tables,
    save_results,
)
from lenslib.training import make_accelerator, take


@pytest.fixture(autouse=True)
def random_base_models(monkeypatch):
    """Random-weight toy models keep the test about the plumbing, and fast."""
    real = tables.build_lens
    monkeypatch.setattr(tables, "build_lens", lambda p, device="cpu": real(p, device, False))


def test_run_tables_fills_every_row_per_seed_with_the_papers_numbers_beside(tmp_path, monkeypatch):
    preset = get_preset("toy", group_size=2, max_new_tokens=4)
    preset = preset.override("align", batch_size=2).override("rl", batch_size=1)
    cfg = TableConfig(align_steps=1, rl_steps=1, eval_samples=2, query_counts=(1, 16), seeds=(0, 1))
    trained = []
    real_aligned = tables.aligned
    monkeypatch.setattr(
        tables, "aligned", lambda p, *a: trained.append(p.lens.num_queries) or real_aligned(p, *a)
    )
    results = run_tables(preset, cfg, tmp_path, make_accelerator(cpu=True))
    assert [r["row"] for r in results["table3"]] == ["M = 1", "M = 16"]
    assert [r["paper_ciou"] for r in results["table3"]] == [PAPER_TABLE3[1], PAPER_TABLE3[16]]
    assert [r["row"] for r in results["table4"]] == ["mlp", "vit"]
    assert len(results["table5"]) == len(tables.TABLE5_ROWS)
    assert all(0 <= r["toy_ciou"] <= 100 for rows in results.values() for r in rows)
    assert all(r["seeds"] == [0, 1] and len(r["toy_per_seed"]) == 2 for r in results["table5"])
    # per seed: M = 1, M = 16 (the preset's own, reused by Table 4's vit and Table 5), mlp
    assert trained == [1, 16, 16, 1, 16, 16]
    assert load_results(tmp_path / "tables.json") == results
    assert (tmp_path / "tables.md").read_text().count("| M = ") == 2
    assert json.loads((tmp_path / "tables.json").read_text())["config"]["seeds"] == [0, 1]
    # a finished seed is not trained again: its rows are read back
    trained.clear()
    assert run_tables(preset, cfg, tmp_path, make_accelerator(cpu=True)) == results
    assert trained == []


def test_merge_reports_mean_and_sample_std_over_the_seeds_that_have_a_row():
    cfg = TableConfig(query_counts=(1,), connectors=("vit",))
    seeds = [
        {"seed": 1, "tables": {"table3": {"M = 1": 40.0}, "table4": {"vit": 50.0}, "table5": {}}},
        {"seed": 0, "tables": {"table3": {"M = 1": 44.0}, "table4": {}, "table5": {}}},
    ]
    results = merge(seeds, cfg)
    (m1,) = results["table3"]
    assert (m1["toy_ciou"], m1["toy_std"], m1["seeds"]) == (42.0, 2.8, [0, 1])
    assert m1["toy_per_seed"] == [44.0, 40.0]
    (vit,) = results["table4"]
    assert (vit["toy_ciou"], vit["toy_std"], vit["seeds"]) == (50.0, 0.0, [1])
    assert results["table5"] == []
    text = markdown(results)
    assert "| M = 1 | 42.0 ± 2.8 | 2 | 85.9 |" in text and "| vit | 50.0 | 1 | 87.8 |" in text


def test_box_prompt_baseline_uses_the_mllm_box_and_an_empty_mask_without_one():
    preset = get_preset("toy", num_queries=2)
    torch.manual_seed(0)
    model = build_lens(preset, pretrained=False)
    samples = take(toy_split(preset, "val", 2), 2)
    # a random MLLM writes no parsable box in 3 tokens: every mask is empty
    result = box_prompt_baseline(model, samples, max_new_tokens=3)
    assert result["count"] == 2 and result["ciou"] == 0.0


def test_markdown_puts_a_dash_where_the_paper_has_no_number():
    results = {"table5": [{"row": "context + RL(R_box)", "toy_ciou": 12.3, "paper_ciou": None}]}
    text = markdown(results)
    assert "| context + RL(R_box) | 12.3 | 1 | — |" in text


def test_load_results_names_a_file_that_is_not_a_tables_file(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"splits": {}}))
    with pytest.raises(ValueError, match="other.json"):
        load_results(path)
    saved = save_results({"table3": []}, TableConfig(), tmp_path / "ok")
    assert load_results(saved) == {"table3": []}
