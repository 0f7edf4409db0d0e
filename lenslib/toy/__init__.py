"""The toy world and the toy base models: everything LENS needs to run on a laptop.

Nothing of LENS itself lives here and no LENS module imports this package; only
`lenslib.presets` (the "toy" preset), the notebooks, tests and benchmarks do.

* `world`, `expressions`, `rationales`, `generator`: the synthetic referring-segmentation world
  (`ToyWorld`, `ToyWorldConfig`, `ToyDataset`, `toy_corpus`).
* `tokenizer`: a word-level tokenizer with Qwen2.5-VL's special tokens and chat template.
* `models`: the tiny Qwen2.5-VL and SAM2; `load_bases(device)` gives the pretrained pair
  (committed under assets/; `load_bases(device, version=2)` the pair pretrained on world v2,
  assets/v2/), `random_bases(world_config, seed, device)` a random one.
* World v2 (`ToyWorldConfig(version=2)`): scenes where a box is not enough (overlap, inside
  a ring or frame, occluded), non-convex kinds, an "ambiguous" split and reasoning
  rationales; version 1 stays the default.
* `pretrain_mllm`, `pretrain_sam`: how the committed base models were made
  (`python -m lenslib.toy.pretrain_mllm`, `python -m lenslib.toy.pretrain_sam`); `schedule` is
  their learning-rate schedule. README.md next to this file is the log of what was tried.

The world is imported eagerly (numpy only); the model helpers load torch, transformers and sam2
on first use.
"""

from __future__ import annotations

import importlib

from lenslib.toy.expressions import (
    Describe,
    Extreme,
    Filter,
    OnlyOne,
    Relate,
    SameColour,
    Spec,
    candidate_specs,
    resolve,
    valid_specs,
)
from lenslib.toy.generator import Scene, ToyDataset, ToyWorld, box_ambiguity, toy_corpus
from lenslib.toy.rationales import rationale
from lenslib.toy.world import (
    DIFFICULTIES,
    GRID_WORDS,
    KINDS,
    PALETTE,
    SCENE_KINDS,
    SIZES,
    SPLITS,
    TEST_DIFFICULTIES,
    V2_SPLITS,
    Shape,
    ToyWorldConfig,
    grid_word,
    render,
    shape_mask,
    visible_masks,
)

_LAZY = {  # name -> module, imported on first access (they need torch / transformers / sam2)
    "load_bases": "lenslib.toy.models",
    "random_bases": "lenslib.toy.models",
    "load_toy_mllm": "lenslib.toy.models",
    "load_toy_sam": "lenslib.toy.models",
    "toy_mllm_world": "lenslib.toy.models",
    "toy_sam_config": "lenslib.toy.models",
    "build_toy_mllm": "lenslib.toy.models",
    "build_toy_tokenizer": "lenslib.toy.tokenizer",
}


def __getattr__(name: str):
    """Load the model helpers on first use, so the world alone stays light to import."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lenslib.toy' has no attribute {name!r}")


__all__ = [
    "DIFFICULTIES",
    "GRID_WORDS",
    "KINDS",
    "PALETTE",
    "SCENE_KINDS",
    "SIZES",
    "SPLITS",
    "TEST_DIFFICULTIES",
    "V2_SPLITS",
    "Describe",
    "Extreme",
    "Filter",
    "OnlyOne",
    "Relate",
    "SameColour",
    "Scene",
    "Shape",
    "Spec",
    "ToyDataset",
    "ToyWorld",
    "ToyWorldConfig",
    "box_ambiguity",
    "candidate_specs",
    "grid_word",
    "rationale",
    "render",
    "resolve",
    "shape_mask",
    "toy_corpus",
    "valid_specs",
    "visible_masks",
    *_LAZY,
]
