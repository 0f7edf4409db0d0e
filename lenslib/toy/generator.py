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

**World v2** (`ToyWorldConfig(version=2)`; version 1 draws exactly as before) draws each
scene's kind (`world.SCENE_KINDS`) from ``scene_weights``: "plain" scenes as in v1 (over the
larger vocabulary), and three where a box is not enough to say which object is meant, each
built around a *key* pair of shapes (`Scene.key`), other shapes placed apart from them:

* "overlap":  two shapes of different colours sharing nearly the same box (box IoU >= 0.6),
  one in front of the other (the one behind shows at least 15% of itself);
* "inside":   a small shape inside the hole of a large ring or frame;
* "occluded": a shape with 30-60% of it hidden by another one in front.

The "ambiguous" split holds only such scenes, and its targets are key shapes whose box holds
at least `AMBIGUITY_MIN` of other shapes' pixels (`box_ambiguity`). Every (kind, colour, size)
appears at most once per v2 scene, and spatial words are used only with a clear margin
(`lenslib.toy.expressions.clear_margin`), since key shapes share centres.

`ToyDataset` wraps a split for torch's DataLoader; `toy_corpus` lists every word the world can
write (the toy tokenizer's training text).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
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
from lenslib.toy.rationales import rationale, reason_corpus
from lenslib.toy.world import (
    AMBIGUOUS_SCENE_KINDS,
    CONTAINER_KINDS,
    DIFFICULTIES,
    GRID_WORDS,
    SIZE_EXTREMES,
    SIZE_RELATIONS,
    SPATIAL_EXTREMES,
    SPATIAL_RELATIONS,
    SPLIT_IDS,
    TEST_DIFFICULTIES,
    Shape,
    ToyWorldConfig,
    grid_word,
    half_extent,
    hole_half_extent,
    render,
    shape_mask,
    visible_masks,
)

AMBIGUITY_MIN = 0.1  # "ambiguous" split: other shapes fill >= 10% of the target's box


@dataclass
class Scene:
    """A sampled scene: shapes in drawing order, their visible masks and boxes, the image;
    world v2 also records the scene kind and its key shapes (indices into `shapes`)."""

    shapes: list[Shape]
    visible: list[np.ndarray]  # (S, S) bool each
    boxes: list[tuple[float, float, float, float]]
    image: np.ndarray  # (S, S, 3) uint8
    kind: str = "plain"
    key: tuple[int, ...] = ()


def box_ambiguity(visible: list[np.ndarray], box: tuple[float, ...], target: int) -> float:
    """Share of the target's box covered by OTHER shapes' visible pixels: 0 when the box
    holds the target alone (a box prompt then says which object), high when it does not."""
    x1, y1, x2, y2 = (int(v) for v in box)
    others = np.zeros_like(visible[target][y1:y2, x1:x2])
    for j, mask in enumerate(visible):
        if j != target:
            others |= mask[y1:y2, x1:x2]
    return float(others.mean()) if others.size else 0.0


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class ToyWorld:
    """Deterministic generator of toy samples: ``ToyWorld(config, seed).sample("train", 7)``."""

    def __init__(self, config: ToyWorldConfig | None = None, seed: int = 0) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.config = config or ToyWorldConfig()
        self.seed = int(seed)

    def rng(self, split: str, index: int) -> np.random.Generator:
        """The generator of sample `index` of `split`, independent of every other sample."""
        if split not in self.config.splits:
            raise ValueError(f"unknown toy split {split!r}; expected one of {self.config.splits}")
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

    def sample_scene(self, rng: np.random.Generator, kind: str = "plain") -> Scene:
        """Draw shapes and place them (centres apart, occlusion bounded); render the image.

        World v2: `kind` is one of SCENE_KINDS ("plain" = as in v1, over v2's vocabulary).
        """
        if self.config.version == 2:
            return self._sample_scene_v2(rng, kind)
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
        self,
        attributes: list[tuple[str, str, str]],
        rng: np.random.Generator,
        apart_from: Sequence[Shape] = (),
    ) -> list[Shape] | None:
        """Random centres that keep every shape inside the image, centres `min_center_gap`
        apart in x and y, and at most `max_occlusion` of each shape hidden; None on failure.
        Shapes in `apart_from` (world v2's key pair) are never touched and count for the gap."""
        cfg = self.config
        size, gap = cfg.image_size, cfg.min_center_gap * cfg.image_size
        shapes: list[Shape] = []
        full: list[np.ndarray] = []
        keep_off = np.zeros((size, size), dtype=bool)
        for shape in apart_from:
            keep_off |= shape_mask(shape, size)
        for kind, colour, size_name in attributes:
            side = cfg.size_fractions[size_name] * size
            r = half_extent(kind, side)
            if 2 * r >= size:
                return None
            for _ in range(30):
                cx, cy = rng.uniform(r, size - r, 2)
                if any(
                    abs(cx - s.cx) < gap or abs(cy - s.cy) < gap for s in (*shapes, *apart_from)
                ):
                    continue
                shape = Shape(kind, colour, size_name, float(cx), float(cy), float(side))
                mask = shape_mask(shape, size)
                if apart_from and (mask & keep_off).any():
                    continue
                if self._occlusion_ok(full + [mask]):
                    shapes.append(shape)
                    full.append(mask)
                    break
            else:
                return None
        return shapes

    def _occlusion_ok(self, full: list[np.ndarray]) -> bool:
        if not full:
            return True
        covered = np.zeros_like(full[0])
        for mask in reversed(full):  # from the top shape down
            area = mask.sum()
            if area == 0 or (mask & ~covered).sum() < (1 - self.config.max_occlusion) * area:
                return False
            covered |= mask
        return True

    # ---- world v2 scenes ----------------------------------------------------------------
    def _sample_scene_v2(self, rng: np.random.Generator, kind: str) -> Scene:
        """A v2 scene of `kind`: the key pair of shapes (none for "plain"), then others placed
        with v1's rules and apart from the key pair; each (kind, colour, size) at most once."""
        cfg = self.config
        for _ in range(cfg.max_tries):
            n = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
            key: list[Shape] = []
            if kind != "plain":
                key = self._key_shapes(kind, rng) or []
                if not key:
                    continue
            others = self._place(self._attributes(max(n - len(key), 0), rng), rng, key)
            if others is None:
                continue
            shapes = others + key  # the key pair on top (the others never touch it)
            if len({(s.kind, s.colour, s.size) for s in shapes}) < len(shapes):
                continue
            visible = visible_masks(shapes, cfg.image_size)
            if not all(v.any() for v in visible):
                continue
            boxes = [mask_to_box(v) for v in visible]
            key_index = tuple(range(len(others), len(shapes)))
            return Scene(shapes, visible, boxes, render(shapes, cfg), kind, key_index)
        raise RuntimeError(f"could not make a {kind!r} scene in {cfg.max_tries} tries")

    def _attributes(self, n: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
        cfg = self.config
        sizes = tuple(cfg.size_fractions)
        return [
            (
                cfg.kinds[rng.integers(len(cfg.kinds))],
                cfg.colours[rng.integers(len(cfg.colours))],
                sizes[rng.integers(len(sizes))],
            )
            for _ in range(n)
        ]

    def _shape_at(
        self, kind: str, colour: str, size_name: str, cx: float, cy: float
    ) -> Shape | None:
        """The shape, or None if it would stick out of the image."""
        side = self.config.size_fractions[size_name] * self.config.image_size
        r = half_extent(kind, side)
        if not (r <= cx <= self.config.image_size - r and r <= cy <= self.config.image_size - r):
            return None
        return Shape(kind, colour, size_name, float(cx), float(cy), float(side))

    def _key_shapes(self, kind: str, rng: np.random.Generator) -> list[Shape] | None:
        """The key pair of a v2 scene (drawn in this order), or None if this draw failed."""
        cfg = self.config
        size = cfg.image_size
        solid = [k for k in cfg.kinds if k not in CONTAINER_KINDS]
        sizes = tuple(cfg.size_fractions)
        colour_a, colour_b = rng.choice(len(cfg.colours), 2, replace=False)
        colour_a, colour_b = cfg.colours[colour_a], cfg.colours[colour_b]
        if kind == "overlap":  # same box, one in front: the box cannot say which
            back_size = sizes[rng.integers(1, len(sizes))]
            front_size = sizes[sizes.index(back_size) - int(rng.integers(0, 2))]
            back_kind, front_kind = (solid[i] for i in rng.integers(len(solid), size=2))
            cx, cy = rng.uniform(0.2 * size, 0.8 * size, 2)
            dx, dy = rng.uniform(-0.04 * size, 0.04 * size, 2)
            back = self._shape_at(back_kind, colour_a, back_size, cx, cy)
            front = self._shape_at(front_kind, colour_b, front_size, cx + dx, cy + dy)
            if back is None or front is None:
                return None
            full_back, full_front = shape_mask(back, size), shape_mask(front, size)
            seen = full_back & ~full_front
            if seen.sum() < max(0.15 * full_back.sum(), 30):
                return None
            if box_iou(mask_to_box(seen), mask_to_box(full_front)) < 0.6:
                return None
            return [back, front]
        if kind == "inside":  # a small shape in the hole of a large ring or frame
            containers = [k for k in cfg.kinds if k in CONTAINER_KINDS]
            container_kind = containers[rng.integers(len(containers))]
            inner_kind = solid[rng.integers(len(solid))]
            side = cfg.size_fractions[sizes[-1]] * size
            r = half_extent(container_kind, side)
            cx, cy = rng.uniform(r, size - r, 2)
            dx, dy = rng.uniform(-0.03 * size, 0.03 * size, 2)
            outer = self._shape_at(container_kind, colour_a, sizes[-1], cx, cy)
            inner = self._shape_at(inner_kind, colour_b, sizes[0], cx + dx, cy + dy)
            if outer is None or inner is None:
                return None
            if not self._in_hole(outer, inner):
                return None
            return [outer, inner]
        if kind == "occluded":  # 30-60% of the shape behind is hidden
            behind_kind, front_kind = (solid[i] for i in rng.integers(len(solid), size=2))
            behind_size = sizes[rng.integers(1, len(sizes))]
            front_size = sizes[rng.integers(len(sizes))]
            cx, cy = rng.uniform(0.15 * size, 0.85 * size, 2)
            behind = self._shape_at(behind_kind, colour_a, behind_size, cx, cy)
            if behind is None:
                return None
            reach = half_extent(behind_kind, behind.side) + half_extent(
                front_kind, cfg.size_fractions[front_size] * size
            )
            angle, distance = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.9) * reach
            front = self._shape_at(
                front_kind,
                colour_b,
                front_size,
                cx + distance * np.cos(angle),
                cy + distance * np.sin(angle),
            )
            if front is None:
                return None
            full_behind = shape_mask(behind, size)
            hidden = (full_behind & shape_mask(front, size)).sum() / full_behind.sum()
            if not 0.3 <= hidden <= 0.6:
                return None
            return [behind, front]
        raise ValueError(f"unknown scene kind {kind!r}")

    def _in_hole(self, container: Shape, inner: Shape) -> bool:
        """True if every pixel of `inner` lies in the hole of `container`."""
        size = self.config.image_size
        y, x = np.mgrid[0:size, 0:size] + 0.5
        dx, dy = x - container.cx, y - container.cy
        h = hole_half_extent(container.kind, container.side)
        if container.kind == "ring":
            inside = dx**2 + dy**2 < h**2
        else:
            inside = (np.abs(dx) < h) & (np.abs(dy) < h)
        return bool((shape_mask(inner, size) <= inside).all())

    def scene_kind(self, split: str, rng: np.random.Generator) -> str:
        """World v2: the kind of the next scene of `split` ("ambiguous": never "plain")."""
        if split == "ambiguous":
            return AMBIGUOUS_SCENE_KINDS[rng.integers(len(AMBIGUOUS_SCENE_KINDS))]
        names = tuple(k for k, w in self.config.scene_weights.items() if w > 0)
        weights = np.array([self.config.scene_weights[k] for k in names], dtype=np.float64)
        return names[rng.choice(len(names), p=weights / weights.sum())]

    def _scene_and_spec_v2(
        self, split: str, rng: np.random.Generator, difficulty: str
    ) -> tuple[Scene, int, Spec, str]:
        gap = self.config.min_center_gap * self.config.image_size
        for _ in range(self.config.max_tries):
            scene = self.sample_scene(rng, self.scene_kind(split, rng))
            targets = range(len(scene.shapes))
            if split == "ambiguous":
                targets = [
                    i
                    for i in scene.key
                    if box_ambiguity(scene.visible, scene.boxes[i], i) >= AMBIGUITY_MIN
                ]
            for target in rng.permutation(list(targets)):
                specs = valid_specs(scene.shapes, int(target), difficulty, min_gap=gap)
                if specs:
                    return scene, int(target), choose_spec(specs, rng), difficulty
        raise RuntimeError(f"no {difficulty} expression found in {self.config.max_tries} scenes")

    def scene_and_spec(self, split: str, index: int) -> tuple[Scene, int, Spec, str]:
        """The scene, target index, expression spec and difficulty of one sample."""
        rng = self.rng(split, index)
        names, probs = self.difficulties(split)
        difficulty = names[rng.choice(len(names), p=probs)]
        if self.config.version == 2:
            return self._scene_and_spec_v2(split, rng, difficulty)
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
        extra = {}
        if self.config.version == 2:
            extra = {
                "scene_kind": scene.kind,
                "key_shapes": scene.key,
                "box_ambiguity": box_ambiguity(scene.visible, box, target),
            }
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
                **extra,
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
    if cfg.version == 2:
        yield from reason_corpus(cfg)
