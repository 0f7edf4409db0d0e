"""What both training stages share: processes, batches, targets, schedules and checkpoints.

The stages themselves live in `lenslib/align.py` (stage 1) and `lenslib/rl.py` (stage 2),
each readable top to bottom; this module keeps them short.

Processes: training uses Hugging Face accelerate, so the same loop runs in a notebook (one
process) and under `accelerate launch` on N GPUs (or 2 CPU processes, see configs/accelerate/).
Each process takes its own shard of every batch (`epoch_batches`), gradients are averaged by
the DDP / DeepSpeed wrapper that `accelerator.prepare` puts around the model.

Checkpoints: `save_checkpoint` writes accelerate's full state (model, optimizer, scheduler, RNG
of every process) plus our data position; `load_checkpoint` restores all of it, so a run that
was killed and restarted with `--resume` ends with exactly the parameters of a run that was
never interrupted (tests/test_training.py checks this).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import resource
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.utils import DistributedType
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers import get_scheduler

from lenslib.data.sample import SegSample
from lenslib.evaluate import evaluate
from lenslib.losses import seg_loss
from lenslib.model import LensModel, mllm_image_size, to_mllm_frame
from lenslib.prompts import format_answer
from lenslib.settings import setting
from lenslib.sharding import deepspeed_engine


def make_accelerator(cpu: bool = False, log_dir: str | None = None) -> Accelerator:
    """An Accelerator for one process (notebook) or many (`accelerate launch`).

    find_unused_parameters: some SAM prompt-encoder embeddings (e.g. the box-corner ones) get
    no gradient when SAM is prompted by context tokens only; DDP must be told.

    DeepSpeed (`accelerate launch` with configs/accelerate/zero2.yaml or zero3.yaml): our loops
    make their own batches, so no DataLoader tells accelerate the micro-batch size DeepSpeed
    insists on; it is set here (1 "sample" per step: each optimiser step is one backward).
    On CPU, DeepSpeed runs with DS_ACCELERATOR=cpu, and then `cpu` must not be passed on:
    accelerate would quietly drop DeepSpeed for plain DDP.
    """
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    log_with = "tensorboard" if log_dir else None
    if cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        if os.environ.get("DS_ACCELERATOR") != "cpu":
            raise ValueError(
                "DeepSpeed on CPU (--cpu) needs the environment variable DS_ACCELERATOR=cpu"
            )
        cpu = False  # DeepSpeed's CPU accelerator already places everything on the CPU
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        if os.environ.get("DS_ACCELERATOR") == "cpu":
            # accelerate knows no CPU backend for DeepSpeed: without one it counts ONE process
            # (every rank is "main", none shards its data) while DeepSpeed talks over gloo
            kwargs.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        cpu=cpu, kwargs_handlers=kwargs, log_with=log_with, project_dir=log_dir or "."
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):
        accumulation = plugin.deepspeed_config.get("gradient_accumulation_steps", "auto")
        if accumulation == "auto":
            accumulation = accelerator.gradient_accumulation_steps
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
        plugin.deepspeed_config["train_batch_size"] = accumulation * accelerator.num_processes
    return accelerator


def deepspeed_precision(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Under DeepSpeed with bf16 (or fp16), cast the parameters DeepSpeed has not yet sharded
    to that precision before `prepare`, in place. ZeRO-2 casts the whole model itself, but
    ZeRO-3 keeps what it finds, and its optimizer refuses trainable parameters of two dtypes
    (a model loaded under zero.Init is already bf16; SAM and the context module are not)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    config = plugin.deepspeed_config
    enabled = {k: config.get(k, {}).get("enabled") is True for k in ("bf16", "fp16")}
    dtype = torch.bfloat16 if enabled["bf16"] else torch.float16 if enabled["fp16"] else None
    if dtype is None:
        return
    for param in model.parameters():
        if not hasattr(param, "ds_id") and param.is_floating_point():
            param.data = param.data.to(dtype)


def epoch_batches(
    num_samples: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """The sample indices each optimiser step of one epoch uses on process `rank`.

    A global batch of `batch_size` samples is split evenly over `world` processes, so
    `batch_size` must be divisible by `world`. The order is a permutation seeded by
    (seed, epoch): the same on every process and after a resume. A last incomplete batch is
    dropped (every step sees the same number of samples).
    """
    if batch_size % world != 0:
        raise ValueError(f"batch size {batch_size} does not split over {world} processes")
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    steps = num_samples // batch_size
    per_rank = batch_size // world
    return [
        order[s * batch_size + rank * per_rank : s * batch_size + (rank + 1) * per_rank].tolist()
        for s in range(steps)
    ]


def take(dataset: Sequence[SegSample], n: int) -> list[SegSample]:
    """The first n samples of any map-style dataset (lazy datasets do not slice)."""
    return [dataset[i] for i in range(min(n, len(dataset)))]


def first(dataset: Sequence[SegSample], n: int) -> Subset:
    """A lazy view of the first n samples: each process decodes only the ones it evaluates."""
    return Subset(dataset, range(min(n, len(dataset))))


def ground_truth_answer(model: LensModel, sample: SegSample) -> str:
    """The paper's answer format for a sample's ground truth, box in the MLLM's frame.

    Stage 1 teacher-forces it (the authors do). Real data has no rationale: the think block
    then says only which object is asked for.
    """
    h, w = sample.image.shape[:2]
    box = to_mllm_frame(sample.box, mllm_image_size(model.processor, h, w), (h, w))
    rationale = sample.rationale or f"The target is {sample.text}."
    return format_answer(rationale, box, sample.text)


def target_masks(samples: Sequence[SegSample], device: torch.device) -> list[Tensor]:
    """Ground-truth masks as (H, W) uint8 tensors (values 0, 1, 255)."""
    return [torch.from_numpy(s.mask).to(device) for s in samples]


def mean_seg_loss(
    mask_logits: Tensor | Sequence[Tensor], targets: Sequence[Tensor], kind: str = "bce"
) -> Tensor:
    """L_seg (dice + BCE or focal) averaged over samples that may differ in size."""
    if isinstance(mask_logits, Tensor) and len({t.shape for t in targets}) == 1:
        return seg_loss(mask_logits, torch.stack(targets), kind=kind)
    losses = [seg_loss(m[None], t[None], kind=kind) for m, t in zip(mask_logits, targets)]
    return torch.stack(losses).mean()


def make_scheduler(kind: str, optimizer: torch.optim.Optimizer, total_steps: int, warmup: int = 0):
    """transformers' "cosine" (Table A1) or "linear" (Table A2) learning-rate schedule."""
    return get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


@dataclass
class TrainState:
    """Where a run is: enough to resume it exactly."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimiser steps done in the current epoch
    global_step: int = 0


def save_checkpoint(accelerator: Accelerator, folder: str | Path, state: TrainState) -> Path:
    """accelerate's state (model, optimizer, scheduler, RNGs) + our data position.

    A model with tied embeddings (the toy MLLM's lm_head is its input embedding) stores the
    shared tensor once, and accelerate warns "Removed shared tensor" on every save; the
    reload re-ties it (tests/test_training.py resumes bit for bit), so that warning is muted.
    """
    path = Path(folder) / f"step_{state.global_step:06d}"
    saver_log = logging.getLogger("accelerate.utils.other")
    level = saver_log.level
    saver_log.setLevel(logging.ERROR)
    try:
        accelerator.save_state(str(path))
    finally:
        saver_log.setLevel(level)
    if accelerator.is_main_process:
        (path / "train_state.json").write_text(json.dumps(asdict(state)))
    accelerator.wait_for_everyone()
    return path


def save_model(model: torch.nn.Module, folder: str | Path, accelerator: Accelerator) -> None:
    """Save a (prepared) LensModel as a `LensModel.from_pretrained` folder. Call it on EVERY
    process: under DeepSpeed ZeRO-3 each holds only a shard of every weight, and
    `accelerator.get_state_dict` gathers them (a collective); the main process writes."""
    accelerator.wait_for_everyone()
    lens = accelerator.unwrap_model(model)
    state = None
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        engine = deepspeed_engine(accelerator, lens)
        state = accelerator.get_state_dict(engine) if engine is not None else None
    if accelerator.is_main_process:
        lens.save_pretrained(folder, state_dict=state)
    accelerator.wait_for_everyone()


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint in `folder`, or None."""
    done = sorted(Path(folder).glob("step_*/train_state.json")) if Path(folder).exists() else []
    return done[-1].parent if done else None


def prune_checkpoints(folder: str | Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints in `folder` (and any incomplete one
    older than those); returns what was deleted. None keeps everything. Call it on ONE process."""
    if keep is None or not Path(folder).exists():
        return []
    if keep < 1:
        raise ValueError(f"save_total_limit must be >= 1 (or None), got {keep}")
    complete = sorted(p.parent for p in Path(folder).glob("step_*/train_state.json"))
    if len(complete) <= keep:
        return []
    oldest_kept = complete[-keep]
    doomed = [p for p in sorted(Path(folder).glob("step_*")) if p.is_dir() and p < oldest_kept]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> TrainState:
    """Restore what `save_checkpoint` wrote; raises naming the folder if it is incomplete."""
    path = Path(path)
    if not (path / "train_state.json").exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no train_state.json)")
    accelerator.load_state(str(path))
    return TrainState(**json.loads((path / "train_state.json").read_text()))


def total_steps(num_samples: int, batch_size: int, epochs: int) -> int:
    """Optimiser steps of a run (incomplete last batches are dropped)."""
    return max(1, math.floor(num_samples / batch_size)) * epochs


def run_steps(num_samples: int, batch_size: int, epochs: int, max_steps: int | None) -> int:
    """Optimiser steps a run will really take: all epochs, or `max_steps` if that is fewer.
    The learning-rate schedule spans exactly these steps (as `transformers.Trainer` does with
    `max_steps`), so a shortened run still ends with its lr decayed, not cut off mid-schedule."""
    steps = total_steps(num_samples, batch_size, epochs)
    return min(steps, max_steps) if max_steps else steps


SchedulerKind = Literal["cosine", "linear", "constant", "constant_with_warmup"]
ReportTo = Literal["none", "tensorboard"]
DRY_RUN_STEPS = 2


@dataclass(kw_only=True)
class LoopConfig:
    """The loop settings both stages share. `AlignConfig` and `GRPOConfig` extend it and give
    the first four their stage's defaults (Tables A1 and A2)."""

    epochs: int = setting(help="passes over the training set")
    batch_size: int = setting(help="global batch size, over all processes")
    lr: float = setting(help="AdamW learning rate")
    scheduler: SchedulerKind = setting(help="transformers learning-rate schedule")
    output_dir: str = setting(
        help="checkpoints, history.jsonl and the final model (output_dir/final)"
    )
    seed: int = setting(42, "seed of the order in which training samples are drawn")
    max_steps: int | None = setting(None, "stop after this many optimiser steps (None: all epochs)")
    max_new_tokens: int = setting(
        768, "answer length limit when the model generates (max completion)"
    )
    eval_every: int = setting(
        0, "optimiser steps between validation runs (0: none during training)"
    )
    eval_samples: int = setting(64, "validation samples per validation run")
    eval_at_end: bool = setting(True, "run validation after the last step")
    checkpoint_every: int = setting(0, "optimiser steps between checkpoints (0: none)")
    save_total_limit: int | None = setting(
        None, "keep only the newest N checkpoints in output_dir (None: keep all)"
    )
    gradient_checkpointing: bool = setting(
        False,
        "recompute the MLLM's activations (language model and vision tower) in the backward "
        "pass instead of keeping them: less memory, about one more forward of time",
    )
    report_to: ReportTo = setting(
        "none",
        'where accelerate logs each step\'s record: "none" or "tensorboard" (output_dir/logs)',
    )
    dry_run: bool = setting(
        False,
        "2 optimiser steps at the real shapes, no evaluation, no checkpoints, no history; prints "
        "peak memory and seconds per step, then stops",
    )
    num_workers: int = setting(
        0, "DataLoader worker processes decoding each step's samples (0: in this process)"
    )


HISTORY_FILE = "history.jsonl"


def start_history(folder: str | Path, step: int, accelerator: Accelerator) -> Path:
    """The run's log file (`folder`/history.jsonl, one JSON record per optimiser step), kept
    only up to `step`: a fresh run (step 0) empties it, a resumed run drops the records
    written after its checkpoint, so the file always matches the training it describes."""
    path = Path(folder) / HISTORY_FILE
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_history(folder) if r["step"] <= step] if step else []
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return path


def read_history(folder: str | Path) -> list[dict]:
    """The records of `folder`/history.jsonl ([] if there is none)."""
    path = Path(folder) / HISTORY_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def set_gradient_checkpointing(model: LensModel, on: bool) -> None:
    """Gradient checkpointing of the whole MLLM: transformers marks every decoder layer of the
    language model AND every block of the vision tower (all are `GradientCheckpointingLayer`s),
    non-reentrant, so frozen inputs and ZeRO-3 work. It acts only in training mode with
    gradients on: generation and evaluation keep their KV cache and speed."""
    mllm, kwargs = model.mllm, {"use_reentrant": False}
    if hasattr(mllm, "activation_checkpointing_enable"):  # transformers >= 5.2x: the new names
        if on:
            mllm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif mllm.is_activation_checkpointing:
            mllm.activation_checkpointing_disable()
    elif on:
        mllm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif mllm.is_gradient_checkpointing:
        mllm.gradient_checkpointing_disable()


def start_trackers(accelerator: Accelerator, cfg: LoopConfig) -> bool:
    """accelerate's trackers for `cfg.report_to`, started once per stage (project "align" or
    "grpo", logs under output_dir/logs), so that `accelerator.log` records go somewhere.
    Returns whether any was started."""
    if cfg.report_to == "none" or cfg.dry_run:
        return False
    if cfg.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ImportError(
            "report_to='tensorboard' needs the tensorboard package, which lenslib does not "
            "install: `pip install tensorboard` (or run with --report-to none)"
        )
    if cfg.report_to not in [str(t) for t in accelerator.log_with]:
        accelerator.log_with = [*accelerator.log_with, cfg.report_to]
    accelerator.project_configuration.logging_dir = str(Path(cfg.output_dir) / "logs")
    project = type(cfg).__name__.removesuffix("Config").lower()
    hparams = {
        k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in asdict(cfg).items()
    }
    accelerator.init_trackers(project, config=hparams)
    return True


def stop_trackers(accelerator: Accelerator) -> None:
    """Finish this stage's trackers (not `accelerator.end_training`: the next stage, in the
    same process, still needs the process group)."""
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            tracker.finish()
    accelerator.trackers = []


def step_samples(
    dataset: Sequence[SegSample], batches: Sequence[Sequence[int]], num_workers: int = 0
):
    """The samples of each step's indices, in order: decoded here (num_workers 0), or by a
    DataLoader's worker processes (the same samples in the same order, prefetched while the
    step before trains)."""
    if num_workers == 0:
        for indices in batches:
            yield [dataset[i] for i in indices]
        return
    loader = DataLoader(
        dataset, batch_sampler=[list(b) for b in batches], collate_fn=list,
        num_workers=num_workers,
    )  # fmt: skip
    yield from loader


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_stage(
    model: torch.nn.Module,
    step_fn: Callable[[Sequence[SegSample]], dict[str, float]],
    scheduler,
    train: Sequence[SegSample],
    val: Sequence[SegSample],
    cfg: LoopConfig,
    accelerator: Accelerator,
    resume: bool = False,
    on_log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Epochs of `step_fn(batch_of_this_process) -> record`, with evaluation, checkpoints and
    resume. `model` and the optimiser must already be `accelerator.prepare`d and the
    scheduler registered for checkpointing. Returns one record per optimiser step of this
    call; every record is also appended to cfg.output_dir/history.jsonl (`read_history`)."""
    state = TrainState()
    last = latest_checkpoint(cfg.output_dir) if resume else None
    if last is not None:
        state = load_checkpoint(accelerator, last)
        accelerator.print(f"resumed from {last} (step {state.global_step})")
    lens = accelerator.unwrap_model(model)
    end = run_steps(len(train), cfg.batch_size, cfg.epochs, cfg.max_steps)
    if cfg.dry_run:  # a dry run writes nothing: no history, no checkpoints, no trackers
        end = min(end, state.global_step + DRY_RUN_STEPS)
        if accelerator.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(accelerator.device)
    history: list[dict] = []
    log_file = (
        None if cfg.dry_run else start_history(cfg.output_dir, state.global_step, accelerator)
    )
    tracking = start_trackers(accelerator, cfg)
    set_gradient_checkpointing(lens, cfg.gradient_checkpointing)
    seconds: list[float] = []
    progress = tqdm(total=end, initial=state.global_step, disable=not accelerator.is_main_process)
    try:
        while state.global_step < end:
            batches = epoch_batches(
                len(train), cfg.batch_size, state.epoch, cfg.seed,
                accelerator.process_index, accelerator.num_processes,
            )  # fmt: skip
            for samples in step_samples(train, batches[state.step_in_epoch :], cfg.num_workers):
                model.train()
                started = time.perf_counter()
                record = step_fn(samples)
                seconds.append(time.perf_counter() - started)
                state.step_in_epoch += 1
                state.global_step += 1
                record |= {"step": state.global_step, "lr": scheduler.get_last_lr()[0]}
                step = state.global_step
                evaluate_now = (step == end and cfg.eval_at_end) or (
                    cfg.eval_every and step % cfg.eval_every == 0
                )
                if evaluate_now and not cfg.dry_run:
                    metrics = evaluate(
                        lens, first(val, cfg.eval_samples), max_new_tokens=cfg.max_new_tokens,
                        accelerator=accelerator,
                    )  # fmt: skip
                    record |= {f"val_{k}": v for k, v in metrics.items() if k != "count"}
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not cfg.dry_run:
                    save_checkpoint(accelerator, cfg.output_dir, state)
                    if accelerator.is_main_process:
                        prune_checkpoints(cfg.output_dir, cfg.save_total_limit)
                    accelerator.wait_for_everyone()
                history.append(record)
                if accelerator.is_main_process and log_file is not None:
                    with open(log_file, "a") as f:
                        f.write(json.dumps(record) + "\n")
                accelerator.log(record, step=step)  # (a no-op without trackers)
                if on_log:
                    on_log(record)
                progress.update(1)
                if step >= end:
                    break
            else:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
    finally:
        progress.close()
        set_gradient_checkpointing(lens, False)
        if tracking:
            stop_trackers(accelerator)
    if cfg.dry_run:
        report_dry_run(accelerator, seconds)
    return history


def report_dry_run(accelerator: Accelerator, seconds: Sequence[float]) -> None:
    """What a dry run prints: seconds per step (the first includes warm-up) and peak memory."""
    per_step = ", ".join(f"{s:.2f}" for s in seconds)
    where = "GPU allocated" if accelerator.device.type == "cuda" else "resident (RSS)"
    accelerator.print(
        f"dry run: {len(seconds)} steps, seconds per step {per_step}; "
        f"peak memory ({where}, process {accelerator.process_index}) "
        f"{peak_memory_mib(accelerator.device):.0f} MiB"
    )
