"""Options that change only memory (and time), never the numbers: rollout micro-batches with
gradient accumulation, chunked token log-probs, gradient checkpointing; and the launcher
tools: save_total_limit, report_to, dry_run, atomic SAM-cache writes, DataLoader workers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.toy_rl import policy_and_reference

from lenslib import grpo
from lenslib.presets import build_lens, get_preset, toy_split
from lenslib.rl import GRPOConfig, grpo_step, row_chunks, train_grpo
from lenslib.sam_features import FeatureCache, SamFeatures
from lenslib.training import (
    LoopConfig,
    make_accelerator,
    prune_checkpoints,
    read_history,
    set_gradient_checkpointing,
    step_samples,
)

AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")


# ------------------------------------------------------------------ token log-probs
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_token_logprobs_in_pieces_equal_the_full_log_softmax_with_their_gradients(chunk):
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 5, 101)).requires_grad_()
    ids = torch.randint(0, 101, (3, 5))
    full = F.log_softmax(logits / 0.7, -1).gather(-1, ids[..., None]).squeeze(-1)
    (g_full,) = torch.autograd.grad((full * torch.arange(15.0).view(3, 5)).sum(), logits)
    pieces = grpo.token_logprobs(logits, ids, 0.7, chunk=chunk)
    (g_pieces,) = torch.autograd.grad((pieces * torch.arange(15.0).view(3, 5)).sum(), logits)
    assert pieces.dtype == torch.float32
    assert torch.allclose(pieces, full, atol=1e-5)
    assert torch.allclose(g_pieces, g_full, atol=1e-6)
    with torch.no_grad():  # no graph: no recomputation wrapper either
        assert torch.allclose(grpo.token_logprobs(logits, ids, 0.7, chunk=chunk), full, atol=1e-5)


def test_token_logprobs_of_bf16_logits_never_copy_the_whole_block_to_fp32():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 64).bfloat16()
    ids = torch.randint(0, 64, (2, 4))
    expected = F.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    seen = []
    real = grpo._chunk_logprobs

    def spy(piece, *rest):
        seen.append(piece.shape[0])
        return real(piece, *rest)

    grpo._chunk_logprobs = spy
    try:
        got = grpo.token_logprobs(logits, ids, chunk=3)
    finally:
        grpo._chunk_logprobs = real
    assert seen == [3, 3, 2] and torch.allclose(got, expected, atol=1e-5)


# ------------------------------------------------------------------ micro-batch weights
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_weighted_micro_batch_losses_sum_to_the_unsplit_loss(aggregation):
    torch.manual_seed(1)
    per_token = torch.randn(7, 6)
    mask = (torch.rand(7, 6) > 0.3).int()
    mask[3] = 0  # a rollout with no counted token
    kw = dict(max_completion_length=6, num_items_in_batch=float(mask.sum()))
    whole = grpo.aggregate(per_token, mask, aggregation, **kw)
    for size in (1, 2, 3, 7):
        parts = [
            grpo.micro_batch_weight(aggregation, mask[a:b], mask, kw["num_items_in_batch"])
            * grpo.aggregate(per_token[a:b], mask[a:b], aggregation, **kw)
            for a, b in row_chunks(7, size)
        ]
        assert torch.allclose(sum(parts), whole, atol=1e-6), (aggregation, size)
    if aggregation != "dapo":  # the plain average of micro-batch losses is NOT the loss
        plain = [grpo.aggregate(per_token[a:b], mask[a:b], aggregation, **kw) for a, b in
                 row_chunks(7, 3)]  # fmt: skip
        assert not torch.allclose(sum(plain) / len(plain), whole, atol=1e-4)


# ------------------------------------------------------------------ one GRPO step, split or not
class GradRecorder:
    """Stands in for the optimizer: keeps the gradients `grpo_step` accumulated, changes nothing."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grads = None

    def step(self):
        self.grads = [None if p.grad is None else p.grad.clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


class NoSchedule:
    def step(self):
        pass


@pytest.fixture(scope="module")
def toy_rl():
    preset = get_preset("toy", num_queries=4)
    model, ref = policy_and_reference(preset)
    return model, ref, toy_split(preset, "train", 3), make_accelerator(True)


def _step_grads(toy_rl, **changes):
    model, ref, samples, accelerator = toy_rl
    # R_seg scores thresholded masks: a pixel whose logit is 1e-7 from 0 may flip between two
    # forwards that agree within 1e-7 and move an advantage by ~1e-2, so the exact-gradient
    # tests leave R_seg out of R_unified (every rollout's mask is still drawn and scored, and
    # L_seg's gradient is compared)
    base = dict(group_size=3, max_new_tokens=48, beta=0.04, alpha=1.0, output_dir="unused",
                reward_weights=(1.0, 1.0, 0.0))  # fmt: skip
    cfg = GRPOConfig(**(base | changes))
    recorder = GradRecorder(model)
    torch.manual_seed(7)  # the same rollouts every time (the model does not change)
    record = grpo_step(model, ref, samples, accelerator, recorder, NoSchedule(), cfg)
    return recorder.grads, record


def _assert_same(a, b, tol=1e-5):
    """Every gradient within `tol` of the largest gradient entry (gradients that are zero in
    exact arithmetic, e.g. of attention key biases, are float noise: no relative test)."""
    assert len(a) == len(b)
    assert all((x is None) == (y is None) for x, y in zip(a, b))
    pairs = [(x, y) for x, y in zip(a, b) if x is not None]
    scale = max(y.abs().max().item() for _, y in pairs)
    worst = max((x - y).abs().max().item() for x, y in pairs) / scale
    assert worst < tol, worst
    total = torch.cat([x.flatten() for x, _ in pairs]) - torch.cat([y.flatten() for _, y in pairs])
    assert total.norm() < tol * torch.cat([y.flatten() for _, y in pairs]).norm()


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_rollout_micro_batches_give_the_unsplit_gradient(toy_rl, aggregation):
    whole, rec_whole = _step_grads(toy_rl, aggregation=aggregation)
    # 9 rollouts: micro-batches of 2 cut groups of 3, of 3 keep them whole
    for size in (2, 3):
        split, rec_split = _step_grads(toy_rl, aggregation=aggregation, rollout_micro_batch=size)
        _assert_same(split, whole)
        for key in ("loss", "seg_loss", "kl", "reward", "reward_box", "completion_length"):
            assert rec_split[key] == pytest.approx(rec_whole[key], rel=1e-5, abs=1e-7), key
        assert rec_split["reward_seg"] == pytest.approx(rec_whole["reward_seg"], abs=1e-2)
    assert rec_whole["advantage_spread"] > 0 and rec_whole["kl"] > 0  # both terms have a gradient


def test_the_micro_batch_test_can_fail(toy_rl):
    """Weighting each micro-batch as if it were the whole batch changes the gradient."""
    whole, _ = _step_grads(toy_rl)
    real = grpo.micro_batch_weight
    grpo.micro_batch_weight = lambda *args: 1.0
    try:
        split, _ = _step_grads(toy_rl, rollout_micro_batch=3)
    finally:
        grpo.micro_batch_weight = real
    with pytest.raises(AssertionError):
        _assert_same(split, whole)


def test_gradient_checkpointing_gives_the_same_gradient_and_covers_the_vision_tower(toy_rl):
    model = toy_rl[0]
    plain, _ = _step_grads(toy_rl)
    set_gradient_checkpointing(model, True)
    try:
        layers = [m for m in model.mllm.modules() if hasattr(m, "gradient_checkpointing")]
        visual = [m for m in model.mllm.model.visual.modules() if m in layers]
        assert visual and all(m.gradient_checkpointing for m in layers)
        checkpointed, _ = _step_grads(toy_rl)
    finally:
        set_gradient_checkpointing(model, False)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.mllm.modules())
    _assert_same(checkpointed, plain)


# ------------------------------------------------------------------ presets
def test_full_preset_saves_memory_and_toy_is_unchanged():
    full, toy = get_preset("full"), get_preset("toy")
    assert full.rl.rollout_micro_batch and full.rl.gradient_checkpointing
    assert full.align.gradient_checkpointing
    assert toy.rl.rollout_micro_batch is None and not toy.rl.gradient_checkpointing
    assert not toy.align.gradient_checkpointing
    assert full.attn_implementation == "sdpa"


def test_attn_implementation_reaches_load_mllm(monkeypatch):
    import lenslib.presets as presets

    seen = {}

    def fake_load(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(presets, "load_mllm", fake_load)
    with pytest.raises(RuntimeError, match="stop here"):
        build_lens(get_preset("full", attn_implementation="eager"))
    assert seen["attn_implementation"] == "eager"
    monkeypatch.setattr(presets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="flash-attn"):
        build_lens(get_preset("full", attn_implementation="flash_attention_2"))


# ------------------------------------------------------------------ launcher tools
def _rl_cfg(tmp_path, **changes):
    cfg = dict(epochs=1, batch_size=2, group_size=2, lr=1e-4, max_new_tokens=6, eval_samples=1,
               output_dir=str(tmp_path / "rl"), checkpoint_every=1)  # fmt: skip
    return GRPOConfig(**(cfg | changes))


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_save_total_limit_keeps_the_newest_checkpoints_and_resume_still_works(tmp_path):
    preset = get_preset("toy", num_queries=4)
    train, val = toy_split(preset, "train", 8), toy_split(preset, "val", 1)
    torch.manual_seed(0)
    model = build_lens(preset, pretrained=False)
    train_grpo(model, train, val, _rl_cfg(tmp_path / "a", max_steps=3), make_accelerator(True))
    expected = _params(model)

    def die_after_two(record):
        if record["step"] == 2:
            raise KeyboardInterrupt

    torch.manual_seed(0)
    model = build_lens(preset, pretrained=False)
    limited = _rl_cfg(tmp_path / "b", max_steps=3, save_total_limit=1)
    with pytest.raises(KeyboardInterrupt):
        train_grpo(model, train, val, limited, make_accelerator(True), on_log=die_after_two)
    assert sorted(p.name for p in (tmp_path / "b/rl").glob("step_*")) == ["step_000002"]
    model = build_lens(preset, pretrained=False)
    train_grpo(model, train, val, limited, make_accelerator(True), resume=True)
    assert sorted(p.name for p in (tmp_path / "b/rl").glob("step_*")) == ["step_000003"]
    assert all(torch.equal(a, b) for a, b in zip(expected, _params(model)))


def test_prune_checkpoints_only_touches_older_folders(tmp_path):
    for step in (1, 2, 3, 4):
        (tmp_path / f"step_{step:06d}").mkdir()
        if step != 4:  # step 4 is being written
            (tmp_path / f"step_{step:06d}/train_state.json").write_text("{}")
    deleted = prune_checkpoints(tmp_path, 2)
    assert [p.name for p in deleted] == ["step_000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_000002", "step_000003", "step_000004"
    ]  # fmt: skip
    assert prune_checkpoints(tmp_path, None) == []
    with pytest.raises(ValueError):
        prune_checkpoints(tmp_path, 0)


def test_dry_run_takes_two_steps_and_writes_nothing(tmp_path, capsys):
    preset = get_preset("toy", num_queries=4)
    torch.manual_seed(0)
    model = build_lens(preset, pretrained=False)
    cfg = _rl_cfg(tmp_path, dry_run=True, eval_every=1)
    history = train_grpo(model, toy_split(preset, "train", 8), toy_split(preset, "val", 1), cfg,
                         make_accelerator(True))  # fmt: skip
    assert [r["step"] for r in history] == [1, 2]
    assert not any("val_ciou" in r for r in history)  # no evaluation
    assert not (tmp_path / "rl").exists()  # no checkpoint, no history file
    out = capsys.readouterr().out
    assert "dry run: 2 steps" in out and "peak memory" in out and "MiB" in out


def test_report_to_tensorboard_without_tensorboard_says_so(tmp_path, monkeypatch):
    import lenslib.training as training

    monkeypatch.setattr(training.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        training.start_trackers(make_accelerator(True), _rl_cfg(tmp_path, report_to="tensorboard"))


def test_report_to_starts_trackers_once_per_stage_and_logs_every_step(tmp_path, monkeypatch):
    import accelerate.accelerator as acc_module
    from accelerate.tracking import GeneralTracker

    import lenslib.training as training

    runs = []

    class FakeBoard(GeneralTracker):  # what TensorBoardTracker would receive
        name = "tensorboard"
        requires_logging_directory = True

        def __init__(self, run_name, logging_dir, **kwargs):
            super().__init__()
            self.records, self.config, self.finished = [], None, False
            runs.append((run_name, logging_dir, self))

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.records.append((step, values))

        def finish(self):
            self.finished = True

    monkeypatch.setitem(acc_module.LOGGER_TYPE_TO_CLASS, "tensorboard", FakeBoard)
    monkeypatch.setattr(training.importlib.util, "find_spec", lambda name: object())
    preset = get_preset("toy", num_queries=4)
    torch.manual_seed(0)
    model = build_lens(preset, pretrained=False)
    cfg = _rl_cfg(tmp_path, max_steps=2, checkpoint_every=0, eval_at_end=False,
                  report_to="tensorboard")  # fmt: skip
    train_grpo(model, toy_split(preset, "train", 8), toy_split(preset, "val", 1), cfg,
               make_accelerator(True))  # fmt: skip
    assert len(runs) == 1
    name, folder, board = runs[0]
    assert name == "grpo" and Path(folder) == tmp_path / "rl/logs"
    assert [step for step, _ in board.records] == [1, 2] and board.finished
    assert board.config["report_to"] == "tensorboard"
    assert [r["loss"] for _, r in board.records] == [
        r["loss"] for r in read_history(cfg.output_dir)
    ]


def test_sam_cache_writes_are_atomic(tmp_path, monkeypatch):
    import lenslib.sam_features as sam_features

    features = SamFeatures(torch.randn(1, 4, 2, 2), (torch.randn(1, 2, 8, 8),))
    cache = FeatureCache(4, tmp_path)
    cache.put("model/abc", features)
    folder = tmp_path / "model"
    assert [p.name for p in folder.iterdir()] == ["abc.safetensors"]  # no temp file left
    real = sam_features.save_file

    def dies_half_way(tensors, path):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(sam_features, "save_file", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        cache.put("model/def", features)
    assert [p.name for p in folder.iterdir()] == ["abc.safetensors"]  # nothing half-written
    monkeypatch.setattr(sam_features, "save_file", real)
    fresh = FeatureCache(4, tmp_path)
    assert fresh.get("model/def", torch.device("cpu")) is None
    assert torch.equal(
        fresh.get("model/abc", torch.device("cpu")).image_embed, features.image_embed
    )
    assert not list(folder.glob("*.tmp")) and os.listdir(folder) == ["abc.safetensors"]


def test_dataloader_workers_decode_the_same_samples_in_the_same_order():
    preset = get_preset("toy")
    train = toy_split(preset, "train", 24)
    batches = [[5, 1, 17], [0, 23, 8], [11, 2, 4]]
    here = list(step_samples(train, batches, 0))
    workers = list(step_samples(train, batches, 2))
    assert len(here) == len(workers) == 3
    for a_batch, b_batch in zip(here, workers):
        for a, b in zip(a_batch, b_batch):
            assert a.text == b.text and a.box == b.box
            assert (a.image == b.image).all() and (a.mask == b.mask).all()
    assert LoopConfig.__dataclass_fields__["num_workers"].default == 0


def test_two_processes_accumulate_micro_batches_and_sync_once_to_the_unsplit_gradient(tmp_path):
    """DDP over 2 CPU processes: micro-batches under `no_sync` but the last, then one all-reduce,
    give every rank the gradient of the unsplit step."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "29531", str(root / "tests/helpers/two_process_micro_batches.py"),
        str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["norm"] > 0 for r in ranks)
    assert ranks[0]["digest"] == pytest.approx(ranks[1]["digest"], rel=1e-6)  # synchronised
    for r in ranks:
        assert r["relative_difference"] < 1e-5 and r["max_difference"] < 1e-5, r


def test_deepspeed_zero2_accumulates_micro_batches_into_one_step(tmp_path):
    """DeepSpeed (2 CPU processes, ZeRO-2 in fp32): accelerate hands `sync_gradients` on to
    the engine, which then steps once, after the last micro-batch, with the unsplit gradient.
    (In bf16 the two runs differ by bf16 rounding; fp32 shows the accumulation is exact.)"""
    import json
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    root = Path(__file__).resolve().parent.parent
    config = (root / "configs/accelerate/zero2.yaml").read_text()
    fp32 = tmp_path / "zero2_fp32.yaml"
    fp32.write_text(config.replace("mixed_precision: bf16", 'mixed_precision: "no"'))
    env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(fp32),
        "--num_processes", "2", "--main_process_port", "29532",
        str(root / "tests/helpers/deepspeed_micro_batches.py"), str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    for r in (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)):
        assert r["whole_norm"] > 0.1 and r["relative_difference"] < 1e-4, r
