"""The hand-run benchmarks stay runnable: each parses its flags (`--help`) against today's lenslib."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).parents[1] / "benchmarks").glob("*.py"))


def test_there_are_benchmarks() -> None:
    assert {p.stem for p in BENCHMARKS} >= {
        "grpo_step",
        "stage1_cache",
        "stage2_recipes",
        "full_scale_memory",
        "trl_side_by_side",
        "reward_gaps",
    }


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_help(script: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:"), done.stdout
