"""Training infrastructure: batches, both stages learning, resume, and two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lenslib.align import AlignConfig, train_alignment
from lenslib.grpo import group_advantages
from lenslib.presets import build_lens, get_preset, toy_split
from lenslib.rl import GRPOConfig, parameter_groups, train_grpo
from lenslib.training import (
    epoch_batches,
    make_accelerator,
    read_history,
    run_steps,
    start_history,
)

ROOT = Path(__file__).resolve().parent.parent


def test_epoch_batches_shard_a_seeded_permutation():
    whole = epoch_batches(10, 4, epoch=0, seed=1)
    assert len(whole) == 2 and len(set(sum(whole, []))) == 8  # last incomplete batch dropped
    ranks = [epoch_batches(10, 4, 0, 1, rank=r, world=2) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == whole  # the two ranks split each global batch
    assert epoch_batches(10, 4, 1, 1) != whole  # a new order every epoch
    with pytest.raises(ValueError, match="split"):
        epoch_batches(10, 3, 0, 1, world=2)


def _toy(num_queries=4):
    preset = get_preset("toy", num_queries=num_queries)
    return preset, build_lens(preset, pretrained=False)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_alignment_lowers_the_loss_and_trains_only_the_context_module(tmp_path):
    preset, model = _toy()
    sam_before = _params(model.sam)
    train = toy_split(preset, "train", 8)
    cfg = AlignConfig(epochs=6, batch_size=8, lr=3e-3, max_new_tokens=4, eval_samples=2,
                      output_dir=str(tmp_path))  # fmt: skip
    history = train_alignment(
        model, train, toy_split(preset, "val", 2), cfg, make_accelerator(True)
    )
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(torch.equal(a, b) for a, b in zip(sam_before, _params(model.sam)))
    assert "val_ciou" in history[-1]


def _rl_cfg(tmp_path, **changes):
    cfg = dict(epochs=1, batch_size=2, group_size=2, lr=1e-4, max_new_tokens=6, eval_samples=1,
               output_dir=str(tmp_path / "rl"), checkpoint_every=1)  # fmt: skip
    return GRPOConfig(**(cfg | changes))


def test_grpo_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    preset = get_preset("toy", num_queries=4)
    train, val = toy_split(preset, "train", 8), toy_split(preset, "val", 1)

    torch.manual_seed(0)
    model = build_lens(preset, pretrained=False)
    uninterrupted = _rl_cfg(tmp_path / "a", max_steps=3)
    train_grpo(model, train, val, uninterrupted, make_accelerator(True))
    expected = _params(model)

    def kill_after_step_two(record: dict) -> None:  # the run dies right after step 2
        if record["step"] == 2:
            raise KeyboardInterrupt

    torch.manual_seed(0)
    model = build_lens(preset, pretrained=False)
    with pytest.raises(KeyboardInterrupt):
        train_grpo(model, train, val, _rl_cfg(tmp_path / "b", max_steps=3),
                   make_accelerator(True), on_log=kill_after_step_two)  # fmt: skip
    torch.manual_seed(123)  # the restart starts from a different RNG state...
    model = build_lens(preset, pretrained=False)
    resumed = train_grpo(
        model, train, val, _rl_cfg(tmp_path / "b", max_steps=3), make_accelerator(True), resume=True
    )
    assert [r["step"] for r in resumed] == [3]  # ...and only the missing step runs
    assert all(torch.equal(a, b) for a, b in zip(expected, _params(model)))
    logged = read_history(tmp_path / "b" / "rl")  # the log file covers the whole run, once
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert logged[-1]["lr"] == 0.0  # the linear schedule ends at max_steps = 3, not at epoch end
    assert [r["loss"] for r in logged] == pytest.approx(
        [r["loss"] for r in read_history(tmp_path / "a" / "rl")]
    )


def test_the_lr_schedule_spans_the_steps_a_run_really_takes():
    assert run_steps(100, 10, epochs=2, max_steps=None) == 20
    assert run_steps(100, 10, epochs=2, max_steps=5) == 5  # shortened: the schedule shrinks
    assert run_steps(100, 10, epochs=2, max_steps=50) == 20  # max_steps never adds epochs


def test_history_file_keeps_only_the_steps_up_to_the_checkpoint(tmp_path):
    accelerator = make_accelerator(True)
    path = start_history(tmp_path, 0, accelerator)
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)))
    start_history(tmp_path, 3, accelerator)  # a run resumed from the step-3 checkpoint
    assert [r["step"] for r in read_history(tmp_path)] == [1, 2, 3]
    start_history(tmp_path, 0, accelerator)  # a fresh run
    assert read_history(tmp_path) == []
    assert read_history(tmp_path / "missing") == []


def test_two_processes_hold_identical_parameters_and_share_advantages(tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "29517", str(ROOT / "tests/helpers/two_process_train.py"),
        str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["digest"] == pytest.approx(ranks[1]["digest"], rel=1e-9)
    for step0, step1 in zip(ranks[0]["grpo"], ranks[1]["grpo"]):
        # both ranks grouped the SAME gathered rewards (2 ranks x 1 prompt x G = 2 rollouts)
        assert step0["gathered"] == step1["gathered"] and len(step0["gathered"]) == 4
        expected = group_advantages(torch.tensor(step0["gathered"]), 2, scale="batch")
        assert torch.allclose(torch.tensor(step0["advantages"]), expected)


def test_a_preset_nests_each_stages_settings_and_routes_changes_by_name():
    preset = get_preset("toy", "align", eval_samples=3)
    align = preset.align
    assert (align.epochs, align.batch_size, align.lr) == (3, 16, 3e-4)
    assert (align.max_new_tokens, align.eval_samples, align.eval_every) == (96, 3, 64)
    assert preset.rl.eval_samples == 128  # a change for stage 1 leaves stage 2 alone
    rl = get_preset("full", reward_weights=(0.0, 1.0, 0.0)).rl
    assert (rl.epochs, rl.batch_size, rl.group_size, rl.lr, rl.beta) == (16, 64, 8, 3e-6, 0.04)
    assert rl.reward_weights == (0.0, 1.0, 0.0) and rl.max_steps is None
    assert get_preset("toy").rl.max_steps == 120
    assert (rl.mllm_lr, rl.sam_lr) == (None, None)  # full: one lr for all parts, as Table A2
    toy = get_preset("toy").rl
    assert (toy.lr, toy.mllm_lr, toy.sam_lr) == (3e-5, 1e-5, 1e-5)
    both = get_preset("toy", lr=1.0)  # no stage named: a name both stages have changes both
    assert both.align.lr == both.rl.lr == 1.0
    assert get_preset("toy", num_queries=3).lens.num_queries == 3
    assert get_preset("toy", lr=None) == get_preset("toy")  # None keeps the preset's value
    with pytest.raises(ValueError, match="unknown setting 'lrr'"):
        get_preset("toy", lrr=1.0)
    with pytest.raises(ValueError, match="aggregation"):
        get_preset("toy", aggregation="mean")


def test_parameter_groups_give_each_part_its_own_lr_or_the_single_lr():
    _, model = _toy()
    model.set_stage("rl")
    single = parameter_groups(model, GRPOConfig(lr=1e-4))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in single for p in g["params"]) == trainable
    assert {g["name"]: g["lr"] for g in single} == {"mllm": 1e-4, "sam": 1e-4, "context": 1e-4}
    split = parameter_groups(model, GRPOConfig(lr=1e-4, mllm_lr=1e-5, sam_lr=2e-5))
    assert {g["name"]: g["lr"] for g in split} == {"mllm": 1e-5, "sam": 2e-5, "context": 1e-4}
    sizes = {g["name"]: sum(p.numel() for p in g["params"]) for g in split}
    counts = model.trainable_counts()
    assert sizes == {
        "mllm": counts["mllm"],
        "sam": counts["sam"],
        "context": counts["queries"] + counts["connector"],
    }
    model.set_stage("align")  # only the context module trains: one group
    assert [g["name"] for g in parameter_groups(model, GRPOConfig(mllm_lr=1e-5))] == ["context"]


def test_grpo_raises_the_box_reward_of_the_prompts_it_trains_on(tmp_path):
    """GRPO really learns: on the same 4 prompts every step, with R_box as the only reward,
    the committed toy MLLM's sampled boxes get better. (Flip the sign of the advantages and
    the reward falls instead; val gains need many more prompts, see notebook 04.)"""
    preset = get_preset("toy")
    train, val = toy_split(preset, "train", 4), toy_split(preset, "val", 1)
    torch.manual_seed(0)
    model = build_lens(preset)  # the committed toy bases, untrained context module
    cfg = GRPOConfig(
        epochs=10, batch_size=4, group_size=8, lr=0.0, mllm_lr=1e-4, sam_lr=0.0,
        scheduler="constant", beta=0.0, alpha=0.0, reward_weights=(0.0, 1.0, 0.0),
        max_new_tokens=preset.max_completion_length, eval_samples=1,
        output_dir=str(tmp_path / "rl"),
    )  # fmt: skip
    history = train_grpo(model, train, val, cfg, make_accelerator(True))
    box = [r["reward_box"] for r in history]
    first, last = sum(box[:3]) / 3, sum(box[-3:]) / 3
    assert last > first + 0.1, box
