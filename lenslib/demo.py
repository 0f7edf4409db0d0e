"""`make demo`: the whole toy pipeline from the committed base models, in minutes on a CPU.

    python -m lenslib.demo [--out runs/demo] [--align-steps N] [--rl-steps N] [--eval-samples N]

1. builds LENS from the toy base models (Qwen2.5-VL and SAM2, pretrained on the toy world);
2. stage 1: alignment (eq. 5), only the context module learns;
3. stage 2: GRPO with unified rewards (eqs. 6-12);
4. evaluates after each stage and prints a before / after table (val cIoU, gIoU, box IoU,
   format rate), and writes a report (Markdown + figures) to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from lenslib.evaluate import evaluate  # noqa: E402
from lenslib.pipeline import run_pipeline  # noqa: E402
from lenslib.presets import build_lens, get_preset, toy_split  # noqa: E402
from lenslib.training import make_accelerator, take  # noqa: E402
from lenslib.viz import plot_training_curves, show_prediction  # noqa: E402

COLUMNS = ("ciou", "giou", "box_iou", "format_rate")


def table(rows: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per stage, the metrics as columns."""
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[c]:.3f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def example_figure(model, samples, path: Path, max_new_tokens: int) -> None:
    """Predictions of the final model on a few validation samples."""
    images, texts = [s.image for s in samples], [s.text for s in samples]
    rollouts, masks = model.predict(images, texts, max_new_tokens)
    fig, axes = plt.subplots(1, len(samples), figsize=(3 * len(samples), 3.4))
    for ax, sample, mask, box in zip(axes, samples, masks, rollouts.boxes):
        show_prediction(ax, sample.image, mask.cpu().numpy(), box, sample.box, sample.text)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="folder for the report")
    parser.add_argument("--align-steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--rl-steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--eval-samples", type=int, default=256)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.manual_seed(0)
    accelerator = make_accelerator(cpu=True)
    n = args.eval_samples
    # each stage is scored once, at its end, on the same n validation samples
    quiet = dict(eval_every=0, eval_samples=n, checkpoint_every=0)
    preset = get_preset("toy", toy_val_size=n)
    preset = preset.override(
        "align", max_steps=args.align_steps, output_dir=str(out / "align"), **quiet
    )
    preset = preset.override("rl", max_steps=args.rl_steps, output_dir=str(out / "rl"), **quiet)
    model = build_lens(preset)
    val = toy_split(preset, "val", n)
    untrained = evaluate(model, take(val, n), 16, preset.max_completion_length)
    rows = {"base models + untrained context module": untrained}
    print(table(rows), flush=True)
    titles = {"align": "after stage 1 (alignment)", "rl": "after stage 2 (GRPO)"}

    def report_stage(stage: str, model, log: list[dict]) -> None:
        rows[titles[stage]] = {k[4:]: v for k, v in log[-1].items() if k.startswith("val_")}
        print(table(rows), flush=True)

    model, logs = run_pipeline(preset, accelerator, model=model, on_stage_end=report_stage)
    stage1, stage2 = logs["align"], logs["rl"]
    model.save_pretrained(out / "model")  # for `python -m lenslib.predict --model runs/demo/model`
    minutes = (time.perf_counter() - start) / 60

    fig = plot_training_curves(stage1, stage2)
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
    example_figure(model, take(val, 4), out / "examples.png", preset.max_completion_length)
    report = [
        "# lenslib demo: the toy LENS pipeline",
        "",
        f"Validation split: {n} toy samples. Wall time: {minutes:.1f} minutes.",
        "",
        table(rows),
        "",
        "![training curves](curves.png)",
        "",
        "![predictions after stage 2](examples.png)",
    ]
    (out / "report.md").write_text("\n".join(report) + "\n")
    (out / "metrics.json").write_text(json.dumps(rows | {"minutes": minutes}, indent=2))
    print("\n" + table(rows))
    print(f"\n{minutes:.1f} minutes; report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
