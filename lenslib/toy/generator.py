"""The toy world's sample generator: scenes, samples, splits, datasets and the word corpus.

`ToyWorld(config, seed).sample(split, i)` draws a scene (shapes placed with centres at least
``min_center_gap`` apart in x and y, occlusion bounded), picks a target and a valid expression
of a difficulty (`lenslib.toy.expressions`), writes the rationale (`lenslib.toy.rationales`)
and returns a `SegSample` whose mask holds exactly the target's visible pixels.

Splits carry the benchmark names: ``train`` and ``val`` mix the three difficulties with
``ToyWorldConfig.difficulty_weights``; ``testA`` holds referring + relational expressions
(the "easy" benchmarks) and ``testB`` reasoning expressions only (the ReasonSeg-like test).

**Determinism.** Sample ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed,
split_id, i])``: the same on every call and machine, and any sample can be made on its own.

`ToyDataset` wraps a split for torch's DataLoader; `toy_corpus` lists every word the world can
write (the toy tokenizer's training text).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from lenslib.data.masks import mask_to_box
from lenslib.data.sample import SegSample
from lenslib.toy.expressions import (
    Describe,
    Extreme,
    Filter,
    OnlyOne,
    Relate,
    SameColour,
    Spec,
    choose_spec,
    spec_template,
    valid_specs,
)
from lenslib.toy.rationales import rationale
from lenslib.toy.world import (
    DIFFICULTIES,
    GRID_WORDS,
    SIZE_EXTREMES,
    SIZE_RELATIONS,
    SPATIAL_EXTREMES,
    SPATIAL_RELATIONS,
    SPLIT_IDS,
    SPLITS,
    TEST_DIFFICULTIES,
    Shape,
    ToyWorldConfig,
    grid_word,
    half_extent,
    render,
    shape_mask,
    visible_masks,
)


@dataclass
class Scene:
    """A sampled scene: shapes in drawing order, their visible masks and boxes, the image."""

    shapes: list[Shape]
    visible: list[np.ndarray]  # (S, S) bool each
    boxes: list[tuple[float, float, float, float]]
    image: np.ndarray  # (S, S, 3) uint8


class ToyWorld:
    """Deterministic generator of toy samples: ``ToyWorld(config, seed).sample("train", 7)``."""

    def __init__(self, config: ToyWorldConfig | None = None, seed: int = 0) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.config = config or ToyWorldConfig()
        self.seed = int(seed)

    def rng(self, split: str, index: int) -> np.random.Generator:
        """The generator of sample `index` of `split`, independent of every other sample."""
        if split not in SPLIT_IDS:
            raise ValueError(f"unknown toy split {split!r}; expected one of {SPLITS}")
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        return np.random.default_rng([self.seed, SPLIT_IDS[split], int(index)])

    def difficulties(self, split: str) -> tuple[tuple[str, ...], np.ndarray]:
        """The difficulties a split draws from, with their probabilities."""
        if split in TEST_DIFFICULTIES:
            names = TEST_DIFFICULTIES[split]
            return names, np.full(len(names), 1 / len(names))
        names = tuple(d for d in DIFFICULTIES if self.config.difficulty_weights.get(d, 0) > 0)
        weights = np.array([self.config.difficulty_weights[d] for d in names], dtype=np.float64)
        return names, weights / weights.sum()

    def sample_scene(self, rng: np.random.Generator) -> Scene:
        """Draw shapes and place them (centres apart, occlusion bounded); render the image."""
        cfg = self.config
        for _ in range(cfg.max_tries):
            n = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
            shapes = self._place(
                [
                    (
                        cfg.kinds[rng.integers(len(cfg.kinds))],
                        cfg.colours[rng.integers(len(cfg.colours))],
                        tuple(cfg.size_fractions)[rng.integers(len(cfg.size_fractions))],
                    )
                    for _ in range(n)
                ],
                rng,
            )
            if shapes is not None:
                visible = visible_masks(shapes, cfg.image_size)
                boxes = [mask_to_box(v) for v in visible]
                return Scene(shapes, visible, boxes, render(shapes, cfg))
        raise RuntimeError(
            f"could not place {cfg.min_shapes}-{cfg.max_shapes} shapes in {cfg.max_tries} tries; "
            "use fewer or smaller shapes, a larger image, a smaller min_center_gap or more "
            "max_occlusion"
        )

    def _place(
        self, attributes: list[tuple[str, str, str]], rng: np.random.Generator
    ) -> list[Shape] | None:
        """Random centres that keep every shape inside the image, centres `min_center_gap`
        apart in x and y, and at most `max_occlusion` of each shape hidden; None on failure."""
        cfg = self.config
        size, gap = cfg.image_size, cfg.min_center_gap * cfg.image_size
        shapes: list[Shape] = []
        full: list[np.ndarray] = []
        for kind, colour, size_name in attributes:
            side = cfg.size_fractions[size_name] * size
            r = half_extent(kind, side)
            if 2 * r >= size:
                return None
            for _ in range(30):
                cx, cy = rng.uniform(r, size - r, 2)
                if any(abs(cx - s.cx) < gap or abs(cy - s.cy) < gap for s in shapes):
                    continue
                shape = Shape(kind, colour, size_name, float(cx), float(cy), float(side))
                mask = shape_mask(shape, size)
                if self._occlusion_ok(full + [mask]):
                    shapes.append(shape)
                    full.append(mask)
                    break
            else:
                return None
        return shapes

    def _occlusion_ok(self, full: list[np.ndarray]) -> bool:
        covered = np.zeros_like(full[0])
        for mask in reversed(full):  # from the top shape down
            area = mask.sum()
            if area == 0 or (mask & ~covered).sum() < (1 - self.config.max_occlusion) * area:
                return False
            covered |= mask
        return True

    def scene_and_spec(self, split: str, index: int) -> tuple[Scene, int, Spec, str]:
        """The scene, target index, expression spec and difficulty of one sample."""
        rng = self.rng(split, index)
        names, probs = self.difficulties(split)
        difficulty = names[rng.choice(len(names), p=probs)]
        for _ in range(self.config.max_tries):
            scene = self.sample_scene(rng)
            targets = rng.permutation(len(scene.shapes))
            for target in targets:
                specs = valid_specs(scene.shapes, int(target), difficulty)
                if specs:
                    return scene, int(target), choose_spec(specs, rng), difficulty
        raise RuntimeError(f"no {difficulty} expression found in {self.config.max_tries} scenes")

    def sample(self, split: str, index: int) -> SegSample:
        """Sample `index` of `split`: the same on every call and machine."""
        scene, target, spec, difficulty = self.scene_and_spec(split, index)
        box = scene.boxes[target]
        return SegSample(
            image=scene.image,
            text=spec.text(),
            mask=scene.visible[target].astype(np.uint8),
            box=box,
            rationale=rationale(scene.shapes, scene.boxes, target, spec, self.config),
            sample_id=f"toy/{split}/{index:07d}",
            source="toy",
            meta={
                "difficulty": difficulty,
                "split": split,
                "template": spec_template(spec),
                "position": grid_word(box, self.config.image_size),
                "target_index": target,
                "shapes": list(scene.shapes),
                "spec": spec,
                "category": scene.shapes[target].kind,
            },
        )

    def split(self, split: str, n: int, start: int = 0) -> list[SegSample]:
        """Samples start .. start + n - 1 of a split, as a list."""
        return [self.sample(split, i) for i in range(start, start + n)]


class ToyDataset:
    """A map-style dataset (``__len__`` + ``__getitem__``, what torch's DataLoader needs) of
    the first `length` samples of a toy split; samples are generated on access."""

    def __init__(self, world: ToyWorld, split: str, length: int) -> None:
        world.rng(split, 0)  # validates the split name
        self.world, self.split_name, self.length = world, split, int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> SegSample:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        return self.world.sample(self.split_name, index % self.length)


# ---------------------------------------------------------------------------------- corpus


def toy_corpus(config: ToyWorldConfig | None = None) -> Iterator[str]:
    """Every word the world can write, in sentences of its templates (for a tokenizer).

    Not every possible expression (there are too many combinations), but every template with
    every value in every slot, so each word and each word-pair a template makes appears. The
    expressions double as the answer's "label".
    """
    cfg = config or ToyWorldConfig()
    sizes = tuple(cfg.size_fractions)
    filters = [Filter(kind=k) for k in cfg.kinds] + [Filter(colour=c) for c in cfg.colours]
    filters += [Filter(size=s) for s in sizes] + [Filter()]
    full = [
        Filter(kind=k, colour=c, size=s)
        for k, c, s in itertools.product(cfg.kinds + (None,), cfg.colours, sizes)
    ]
    negated = [Filter(kind=k, not_colour=c) for k in cfg.kinds + (None,) for c in cfg.colours]
    for f in filters + full + negated:
        yield Describe(f).text()
    for f, which in itertools.product(filters + negated, SPATIAL_EXTREMES + SIZE_EXTREMES):
        yield Extreme(f, which).text()
    for f, rel in itertools.product(filters, SPATIAL_RELATIONS + SIZE_RELATIONS):
        for anchor in filters + full:
            yield Relate(f, rel, anchor).text()
    for f, anchor in itertools.product(filters, filters + full):
        yield SameColour(f, anchor).text()
    yield OnlyOne("colour").text()
    yield OnlyOne("kind").text()
    for f, row in itertools.product(full, GRID_WORDS):
        for word in row:
            yield f"The {f.phrase()} is at the {word}. It is the target."
            yield f"The {f.phrase()} is the target."
