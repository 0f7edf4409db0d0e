"""DeepSpeed ZeRO-2 / ZeRO-3 (2 CPU processes, DS_ACCELERATOR=cpu) through the exported scripts,
pure bf16 training without autocast, and the full-scale --init check.

One `accelerate launch` per ZeRO config runs tests/helpers/deepspeed_scripts.py: stage 1 (2
steps), the same stage 1 killed after step 1 and resumed, then stage 2 (2 steps) from the saved
stage-1 model (and, under ZeRO-2, stage 2 killed and resumed too), all through
scripts/train_align.py and scripts/train_rl.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lenslib.align import AlignConfig, train_alignment
from lenslib.model import LensModel
from lenslib.pipeline import aligned_model
from lenslib.presets import build_lens, get_preset, toy_split
from lenslib.rl import GRPOConfig, train_grpo
from lenslib.training import ground_truth_answer, make_accelerator

ROOT = Path(__file__).resolve().parent.parent
PORTS = {"zero2": 29533, "zero3": 29534}


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def launched(request, tmp_path_factory):
    """(config name, output folder) of one 2-process DeepSpeed launch of both scripts."""
    pytest.importorskip("deepspeed")
    name = request.param
    out = tmp_path_factory.mktemp(name)
    env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / f"configs/accelerate/{name}.yaml"), "--num_processes", "2",
        "--main_process_port", str(PORTS[name]),
        str(ROOT / "tests/helpers/deepspeed_scripts.py"), str(out), "--resume-check",
    ]  # fmt: skip
    if name == "zero2":  # stage 2's resume (sampling RNG too) once, to keep the test short
        cmd.append("--rl-resume-check")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return name, out


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_both_ranks_end_each_stage_with_the_same_gathered_parameters(launched):
    _, out = launched
    rank0, rank1 = _ranks(out)
    assert rank0["world"] == rank1["world"] == 2  # two processes, not two copies of one
    assert rank0["align"] == rank1["align"]  # per-parameter sums, exactly
    assert rank0["rl"] == rank1["rl"]
    changed = sum(a != b for a, b in zip(rank0["align"], rank0["rl"]))
    assert changed > len(rank0["rl"]) // 2  # stage 2 trained (MLLM, SAM decoder, context)


def test_a_killed_and_resumed_stage_1_ends_with_the_uninterrupted_parameters(launched):
    _, out = launched
    for rank in _ranks(out):
        assert rank["resumed"] == rank["align"]
    logged = [json.loads(line)["step"] for line in (out / "killed/history.jsonl").open()]
    assert logged == [1, 2]  # the restart ran only the missing step


def test_a_killed_and_resumed_stage_2_ends_with_the_uninterrupted_parameters(launched):
    name, out = launched
    if name != "zero2":
        pytest.skip("stage 2's resume is checked under ZeRO-2 only (test time)")
    for rank in _ranks(out):
        assert rank["rl_resumed"] == rank["rl"]
    logged = [json.loads(line)["step"] for line in (out / "rl_killed/history.jsonl").open()]
    assert logged == [1, 2]


def test_the_saved_model_reloads_and_draws_the_in_memory_models_masks(launched):
    name, out = launched
    saved = torch.load(out / "masks.pt")
    model = LensModel.from_pretrained(out / "rl/final").eval()
    for key, tensor in [*model.named_parameters(), *model.named_buffers()]:
        tensor.data = tensor.data.to(getattr(torch, saved["dtypes"][key].removeprefix("torch.")))
    # the same weights as rank 0 held in memory (gathered), not ZeRO-3's empty shards
    digest = [float(p.detach().double().sum()) for p in model.parameters()]
    assert digest == _ranks(out)[0]["rl"], name
    samples = [toy_split(get_preset("toy"), "val", 2)[i] for i in range(2)]
    answers = [ground_truth_answer(model, s) for s in samples]
    with torch.no_grad():
        out_ = model.forward_answers([s.image for s in samples], [s.text for s in samples], answers)
    # bf16 compute: ZeRO-3 runs its own linear (zero.Init patches F.linear), so the logits may
    # differ by the bf16 rounding carried through the network: at most four steps at the scale
    # of the largest logit (bf16 keeps 8 significant bits: a step is 1/8 at 16, 1/2 at 64), under
    # half a step on average, a few pixels near 0 flipping sign; ZeRO-2's are bit for bit the same
    reloaded, expected = out_.mask_logits.float(), saved["mask_logits"]
    diff = (reloaded - expected).abs()
    agree = ((reloaded > 0) == (expected > 0)).float().mean().item()
    if name == "zero2":
        assert torch.equal(reloaded, expected), (diff.max(), agree)
    scale = expected.abs().max()
    assert diff.max() <= scale * 2**-5 and diff.mean() <= scale * 2**-8 and agree > 0.995, (
        diff.max(), scale, agree,
    )  # fmt: skip


def test_both_stages_train_in_pure_bf16_without_autocast(tmp_path):
    """What DeepSpeed's bf16 does: every parameter in bf16 (buffers such as rotary frequencies
    stay fp32), no autocast: fp32 tensors meeting bf16 layers would raise a dtype error."""
    preset = get_preset("toy", num_queries=4)
    torch.manual_seed(0)
    model = build_lens(preset, pretrained=False)
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    train, val = toy_split(preset, "train", 4), toy_split(preset, "val", 1)
    accelerator = make_accelerator(cpu=True)
    common = dict(epochs=1, eval_samples=1, max_new_tokens=6, max_steps=2)
    align = AlignConfig(batch_size=2, lr=1e-3, output_dir=str(tmp_path / "align"), **common)
    history = train_alignment(model, train, val, align, accelerator)
    rl = GRPOConfig(batch_size=2, group_size=2, lr=1e-4, output_dir=str(tmp_path / "rl"), **common)
    history += train_grpo(model, train, val, rl, accelerator)  # beta > 0: a bf16 reference
    assert len(history) == 4
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history), history
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_stage_2_at_full_scale_needs_an_existing_init(tmp_path, monkeypatch):
    accelerator = make_accelerator(cpu=True)
    with pytest.raises(FileNotFoundError, match="--init"):  # not a silent full stage 1
        aligned_model(get_preset("full"), tmp_path / "missing", accelerator)
    (tmp_path / "lens_config.json").write_text("{}")
    loaded = {}
    monkeypatch.setattr(LensModel, "from_pretrained", lambda path, **kw: loaded.update(kw))
    aligned_model(get_preset("full"), tmp_path, accelerator)
    assert loaded["dtype"] == torch.bfloat16  # the 3B MLLM in bf16, as stage 1 loads it
