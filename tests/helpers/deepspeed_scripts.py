"""Run by tests/test_deepspeed.py under `accelerate launch --config_file configs/accelerate/
zero{2,3}.yaml --num_processes 2` with DS_ACCELERATOR=cpu: the EXPORTED scripts (as the README
launches them, run in this process with runpy), then what each rank holds, for the test to compare.

    python deepspeed_scripts.py OUT [--resume-check] [--rl-resume-check]

1. scripts/train_align.py, 2 steps (a checkpoint after each) -> OUT/align/final
2. with --resume-check: the same run killed right after step 1, then restarted with --resume
3. scripts/train_rl.py --init OUT/align/final, 2 steps -> OUT/rl/final
4. with --rl-resume-check: the same stage-2 run killed after step 1, then resumed
Each rank writes OUT/rank{r}.json: a digest of its GATHERED parameters after each run, and the
main rank writes OUT/masks.pt: the in-memory stage-2 model's mask logits for ground-truth answers
on 2 val samples, with the dtypes of its parameters and buffers (to rebuild it from the folder).
"""

import json
import runpy
import sys
from pathlib import Path

import torch

import lenslib.align
import lenslib.rl
from lenslib.presets import get_preset, toy_split
from lenslib.sharding import deepspeed_engine, zero3_gathered
from lenslib.training import ground_truth_answer

ROOT = Path(__file__).resolve().parents[2]
out = Path(sys.argv[1])
RESUME = "--resume-check" in sys.argv[2:]
RL_RESUME = "--rl-resume-check" in sys.argv[2:]
TINY = ["--preset", "toy", "--max-steps", "2", "--eval-samples", "2", "--eval-every", "0"]


def run_script(name: str, *args: str) -> dict:
    """Run scripts/<name> as `python scripts/<name> args` would; returns its globals."""
    sys.argv = [name, *TINY, *args]
    return runpy.run_path(str(ROOT / "scripts" / name), run_name="__main__")


def killed_then_resumed(stage, script: str, folder: Path, args: list[str]) -> dict:
    """`script` killed right after step 1 (its checkpoint written), then rerun with --resume
    from another RNG state; `stage` is the module whose `run_stage` the script's stage calls."""
    real_run_stage = stage.run_stage

    def killed_after_step_one(*args_, **kwargs):
        def on_log(entry):
            if entry["step"] == 1:
                raise KeyboardInterrupt

        return real_run_stage(*args_[:-1], on_log)

    stage.run_stage = killed_after_step_one
    try:
        run_script(script, "--output-dir", str(folder), *args)
    except KeyboardInterrupt:
        pass
    finally:
        stage.run_stage = real_run_stage
    torch.manual_seed(123)
    return run_script(script, "--output-dir", str(folder), *args, "--resume")


def gathered_digest(lens, accelerator) -> list[float]:
    """Per-parameter sums (float64) of the whole parameters, gathered under ZeRO-3."""
    with torch.no_grad(), zero3_gathered(lens.parameters(), deepspeed_engine(accelerator, lens)):
        return [float(p.double().sum()) for p in lens.parameters()]


record = {}
align_args = ["--batch-size", "4", "--checkpoint-every", "1"]
done = run_script("train_align.py", "--output-dir", str(out / "align"), *align_args)
accelerator = done["accelerator"]
record["align"] = gathered_digest(done["model"], accelerator)

if RESUME:
    resumed = killed_then_resumed(lenslib.align, "train_align.py", out / "killed", align_args)
    record["resumed"] = gathered_digest(resumed["model"], accelerator)

rl_args = ["--batch-size", "2", "--group-size", "2", "--init", str(out / "align" / "final")]
rl_args += ["--checkpoint-every", "1"]
done = run_script("train_rl.py", "--output-dir", str(out / "rl"), *rl_args)
lens = done["model"]
record["rl"] = gathered_digest(lens, accelerator)
if RL_RESUME:
    resumed = killed_then_resumed(lenslib.rl, "train_rl.py", out / "rl_killed", rl_args)
    record["rl_resumed"] = gathered_digest(resumed["model"], accelerator)
record["world"] = accelerator.num_processes
(out / f"rank{accelerator.process_index}.json").write_text(json.dumps(record))

preset = get_preset("toy")
samples = [toy_split(preset, "val", 2)[i] for i in range(2)]
lens.eval()
lens.sam.reset_cache()  # features cached before DeepSpeed's bf16 cast came from the fp32 encoder
with torch.no_grad(), zero3_gathered(lens.parameters(), deepspeed_engine(accelerator, lens)):
    answers = [ground_truth_answer(lens, s) for s in samples]
    logits = lens.forward_answers([s.image for s in samples], [s.text for s in samples], answers)
    dtypes = {n: str(t.dtype) for n, t in [*lens.named_parameters(), *lens.named_buffers()]}
if accelerator.is_main_process:
    torch.save({"mask_logits": logits.mask_logits.float(), "dtypes": dtypes}, out / "masks.pt")
accelerator.wait_for_everyone()
