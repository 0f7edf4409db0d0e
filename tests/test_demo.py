"""`make demo` end to end at a few steps: it runs, prints the table and writes the report."""

from __future__ import annotations

import json

from lenslib import demo


def test_demo_runs_and_writes_a_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        demo.main(
            ["--out", str(out), "--align-steps", "2", "--rl-steps", "1", "--eval-samples", "4"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "after stage 2 (GRPO)" in printed and "| ciou |" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"after stage 1 (alignment)", "after stage 2 (GRPO)", "minutes"}
    for name in ("report.md", "curves.png", "examples.png", "model/lens_config.json"):
        assert (out / name).stat().st_size > 0
