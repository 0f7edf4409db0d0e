"""Evaluation (lenslib.evaluate) and named splits (lenslib.splits): split specs for every data
set (small files in the real formats under tmp_path), evaluate_splits on a tiny random-weight
model, teacher-forced metrics, and the reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lenslib.splits as sp
from lenslib.data.io import DataError
from lenslib.data.writers import write_groundingsuite, write_reasonseg, write_refer
from lenslib.evaluate import evaluate_answers, markdown_table, write_reports
from lenslib.presets import build_lens, get_preset, toy_world
from lenslib.splits import EVAL_SPLITS, SplitSpec, eval_dataset, evaluate_splits, parse_spec
from lenslib.toy import ToyWorld

TOY = get_preset("toy", toy_val_size=5)
FULL = get_preset("full")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A data root with RefCOCO/+/g, ReasonSeg and GroundingSuite files written from toy
    samples; returns (preset reading it, {name: the samples written})."""
    root = tmp_path_factory.mktemp("data")
    world = ToyWorld(seed=0)
    written = {name: world.split("val", n, start) for name, n, start in
               [("a", 3, 0), ("b", 2, 3), ("c", 1, 5)]}  # fmt: skip
    a, b, c = written["a"], written["b"], written["c"]
    write_refer({"val": a, "testA": b, "testB": c}, root, "refcoco")
    # another order than refcoco's: if refcoco+ images overwrote refcoco's, both would fail
    write_refer({"val": b, "testA": c, "testB": a}, root, "refcoco+")
    write_refer({"val": c, "test": a}, root, "refcocog")
    write_reasonseg(a, root, "val")
    write_reasonseg(b, root, "test")
    for path in (root / "ReasonSeg" / "val").glob("*.json"):  # a second query per image
        annotation = json.loads(path.read_text())
        annotation["text"].append("what else could it be?")
        path.write_text(json.dumps(annotation))
    jsonl = write_groundingsuite(a + b, root / "GroundingSuite")
    return get_preset("full", data_root=str(root)), written, jsonl


# ---------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("toy:val", SplitSpec("toy", "val")),
        ("toy:testA@200", SplitSpec("toy", "testA", 200)),
        ("refcoco:testB", SplitSpec("refcoco", "testB")),
        ("refcoco+:val@7", SplitSpec("refcoco+", "val", 7)),
        ("refcocog:test", SplitSpec("refcocog", "test")),
        ("reasonseg:val", SplitSpec("reasonseg", "val")),
        ("groundingsuite:/d/GS-Eval.jsonl@3", SplitSpec("groundingsuite", "/d/GS-Eval.jsonl", 3)),
        ("groundingsuite:c:/x.jsonl", SplitSpec("groundingsuite", "c:/x.jsonl")),
    ],
)
def test_parse_spec_reads_every_form(spec, expected):
    assert parse_spec(spec, FULL) == expected


@given(
    st.sampled_from(sorted(EVAL_SPLITS)).flatmap(
        lambda d: st.tuples(st.just(d), st.sampled_from(EVAL_SPLITS[d]))
    ),
    st.one_of(st.none(), st.integers(1, 10**9)),
)
def test_parse_spec_round_trips(dataset_split, limit):
    dataset, split = dataset_split
    spec = f"{dataset}:{split}" + ("" if limit is None else f"@{limit}")
    assert parse_spec(spec, FULL) == SplitSpec(dataset, split, limit)


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("refcoco", "no ':'"),
        ("coco:val", "unknown data set 'coco'"),
        ("toy:train", "no evaluation split 'train'"),
        ("refcocog:testA", "no evaluation split 'testA'"),
        ("refcoco:val@0", "@0 is not"),
        ("toy:val@-1", "@-1 is not"),
        ("toy:val@ten", "@ten is not"),
        ("toy:val@", "@ is not"),
        ("groundingsuite:", "needs the path"),
        ("groundingsuite:/a@b/x.jsonl", "@b/x.jsonl is not"),
    ],
)
def test_bad_specs_raise_naming_the_spec_and_the_accepted_forms(spec, problem):
    with pytest.raises(ValueError, match="accepted: toy:val") as err:
        eval_dataset(spec, FULL)
    assert repr(spec) in str(err.value) and problem in str(err.value)


@pytest.mark.parametrize("spec", ["refcoco:val", "refcocog:test", "reasonseg:val"])
def test_real_data_sets_need_a_data_root(spec):
    with pytest.raises(ValueError, match=r"data_root, which is None.*accepted"):
        eval_dataset(spec, TOY)


# ---------------------------------------------------------------------------------- data sets


def test_toy_specs_give_the_presets_toy_splits():
    val = eval_dataset("toy:val", TOY)
    assert len(val) == TOY.toy_val_size == 5
    test_a = eval_dataset("toy:testA@3", TOY)
    assert len(test_a) == 3
    expected = toy_world(TOY).sample("testA", 2)
    assert test_a[2].sample_id == expected.sample_id and test_a[2].text == expected.text
    assert np.array_equal(test_a[2].mask, expected.mask)
    assert {s.meta["difficulty"] for s in eval_dataset("toy:testB@4", TOY)} == {"reasoning"}


def _same(got, want) -> bool:
    same_image = np.array_equal(got.image, want.image)
    return got.text == want.text and np.array_equal(got.mask, want.mask) and same_image


@pytest.mark.parametrize(
    "spec, which",
    [
        ("refcoco:val", "a"),
        ("refcoco:testA", "b"),
        ("refcoco:testB", "c"),
        ("refcoco+:val", "b"),
        ("refcoco+:testA", "c"),
        ("refcoco+:testB", "a"),
        ("refcocog:val", "c"),
        ("refcocog:test", "a"),
        ("reasonseg:test", "b"),
    ],
)
def test_real_specs_read_the_files_written_in_real_formats(data, spec, which):
    preset, written, _ = data
    samples = eval_dataset(spec, preset)
    assert len(samples) == len(written[which])
    assert all(_same(got, want) for got, want in zip(samples, written[which]))


def test_reasonseg_uses_the_first_query_unless_asked_for_all(data):
    preset, written, _ = data
    first = eval_dataset("reasonseg:val", preset)
    assert len(first) == 3 and all(_same(g, w) for g, w in zip(first, written["a"]))
    every = eval_dataset("reasonseg:val", preset, reasonseg_texts="all")
    assert len(every) == 6


def test_groundingsuite_spec_reads_the_jsonl_and_its_images(data):
    preset, written, jsonl = data
    samples = eval_dataset(f"groundingsuite:{jsonl}", preset)
    assert len(samples) == 5
    assert all(_same(g, w) for g, w in zip(samples, written["a"] + written["b"]))
    with pytest.raises(DataError, match="not found"):
        eval_dataset(f"groundingsuite:{jsonl.parent / 'missing.jsonl'}", preset)


def test_at_n_keeps_the_first_n_samples_of_real_splits(data):
    preset, written, jsonl = data
    head = eval_dataset("refcoco:val@2", preset)
    assert len(head) == 2 and all(_same(g, w) for g, w in zip(head, written["a"][:2]))
    assert _same(eval_dataset(f"groundingsuite:{jsonl}@1", preset)[0], written["a"][0])
    assert len(eval_dataset("refcoco:val@99", preset)) == 3  # fewer exist: all of them


# ---------------------------------------------------------------------------- evaluate_splits


def test_evaluate_splits_runs_each_split_on_a_tiny_model():
    torch.manual_seed(0)
    preset = get_preset("toy", num_queries=4)
    model = build_lens(preset, pretrained=False)
    results = evaluate_splits(model, ["toy:val@2", "toy:testA@2"], preset, 2, max_new_tokens=4)
    assert list(results) == ["toy:val@2", "toy:testA@2"]
    for metrics in results.values():
        assert set(metrics) == {"giou", "ciou", "box_iou", "format_rate", "count"}
        assert metrics["count"] == 2
        assert all(0.0 <= metrics[k] <= 1.0 for k in ("giou", "ciou", "box_iou", "format_rate"))


class _Worker:
    is_main_process = False


def test_evaluate_splits_checks_every_spec_first_and_fills_defaults(monkeypatch):
    calls, bars = [], []

    def fake(model, samples, batch_size, max_new_tokens, accelerator):
        calls.append((len(samples), max_new_tokens))
        return {}

    monkeypatch.setattr(sp, "evaluate", fake)
    with pytest.raises(ValueError, match="'toy:nope'"):
        evaluate_splits(None, ["toy:val@1", "toy:nope"], TOY)
    assert calls == []  # nothing evaluated before the bad spec was found
    with pytest.raises(ValueError, match="repeat"):
        evaluate_splits(None, ["toy:val@1", "toy:val@1"], TOY)

    def bar(items, disable, **kwargs):
        bars.append(disable)
        return items

    monkeypatch.setattr(sp, "tqdm", bar)
    evaluate_splits(None, ["toy:val@1", "toy:testB"], TOY)
    evaluate_splits(None, ["toy:val@1"], TOY, max_new_tokens=3, accelerator=_Worker())
    assert calls == [(1, TOY.max_completion_length), (5, TOY.max_completion_length), (1, 3)]
    assert bars == [False, True]  # the progress bar shows on the main process only


# ---------------------------------------------------------------------------------- reports

RESULTS = {
    "refcoco:val": {"giou": 0.84249, "ciou": 0.8, "box_iou": 0.9, "format_rate": 1.0, "count": 7},
    "toy:testB@2": {"giou": 0.0, "ciou": 0.0555, "box_iou": 0.5, "format_rate": 0.5, "count": 2},
}


def test_markdown_table_has_one_row_per_split_in_percent():
    lines = markdown_table(RESULTS).splitlines()
    assert lines[0] == "| split | gIoU | cIoU | box IoU | format rate | samples |"
    assert lines[2] == "| refcoco:val | 84.2 | 80.0 | 90.0 | 100.0 | 7 |"
    assert lines[3] == "| toy:testB@2 | 0.0 | 5.5 | 50.0 | 50.0 | 2 |"
    assert len(lines) == 2 + len(RESULTS)
    with pytest.raises(ValueError, match=r"'x'.*\['box_iou'"):
        markdown_table({"x": {"giou": 1.0, "ciou": 1.0, "format_rate": 1.0, "count": 1}})


def test_write_reports_writes_json_and_markdown(tmp_path):
    meta = {"checkpoint": Path("runs/rl/final"), "preset": "toy"}
    json_path, md_path = write_reports(RESULTS, tmp_path / "new" / "eval", meta)
    assert (json_path, md_path) == (tmp_path / "new/eval/metrics.json", md_path)
    assert md_path.name == "metrics.md"
    report = json.loads(json_path.read_text())
    assert report == {"meta": {"checkpoint": "runs/rl/final", "preset": "toy"}, "splits": RESULTS}
    text = md_path.read_text()
    assert text.startswith("# ") and "- checkpoint: runs/rl/final\n- preset: toy\n" in text
    assert markdown_table(RESULTS) in text
    assert sum(line.startswith("| ") for line in text.splitlines()) == 1 + len(RESULTS)
    _, bare = write_reports(RESULTS, tmp_path / "bare")
    assert json.loads((tmp_path / "bare/metrics.json").read_text())["meta"] == {}
    assert "- " not in bare.read_text()


# ------------------------------------------------------------------------- teacher forcing


def test_teacher_forced_metrics_segment_from_the_ground_truth_answers(monkeypatch):
    from lenslib.align import teacher_forced_metrics
    from lenslib.training import ground_truth_answer

    torch.manual_seed(0)
    model = build_lens(get_preset("toy", num_queries=2), pretrained=False)
    samples = [toy_world(TOY).sample("val", i) for i in range(3)]
    seen = []
    real = model.forward_answers
    monkeypatch.setattr(
        model,
        "forward_answers",
        lambda im, tx, answers: seen.extend(answers) or real(im, tx, answers),
    )
    metrics = teacher_forced_metrics(model, samples, batch_size=2)
    assert seen == [ground_truth_answer(model, s) for s in samples]
    assert metrics["count"] == 3 and 0 <= metrics["ciou"] <= 1
    with pytest.raises(ValueError, match="2 answers for 3 samples"):
        evaluate_answers(model, samples, seen[:2])


def test_a_whole_benchmark_split_is_counted_against_the_lisa_protocol(data, capsys):
    preset, _, _ = data
    samples = eval_dataset("refcoco:val", preset)
    with pytest.warns(UserWarning, match="LISA protocol evaluates 10,834"):
        message = sp.check_count("refcoco:val", samples, preset)
    assert f"{len(samples):,} samples loaded" in message
    assert "refcoco:val: 3 samples (LISA protocol: 10,834)" in capsys.readouterr().out
    assert sp.check_count("refcoco:val@2", samples, preset) is None  # a subset is not compared
    assert sp.check_count("toy:val", [], TOY) is None  # no published count
