"""Pretraining the toy Qwen2.5-VL on the toy world: the toy stand-in for a pretrained Qwen2.5-VL.

LENS starts from a PRETRAINED, instruction-tuned Qwen2.5-VL that already finds objects and
writes boxes; GRPO (eq. 11) only sharpens a policy that localises sometimes (RL needs a
base policy that is sometimes right). At toy scale no such model exists, so this module makes one by supervised
next-token training (teacher forcing) on the toy world:

    prompt  = chat template (system + image + the paper's instruction, `lenslib.prompts`)
    target  = "<think>The blue triangle is at the top left. It is the target.</think>
               <answer>[{"bbox_2d": [x1, y1, x2, y2], "label": "the blue triangle"}]</answer>"

The answer FORMAT is learned in a minute; WHERE things are is the hard part: Qwen2.5-VL's
vision tower has no absolute position embedding and RoPE only changes attention scores, so a
tiny model trained from scratch barely looks at the image. The recipe adds (the toy world's
colour-ramp background, `ToyWorldConfig.background_gradient`, does the rest):

* **A dense auxiliary objective** (`dense_weight`; pretraining only, not part of the model LENS
  uses): a linear `DenseHead` reads the language model's hidden state of every image token
  (after layer `dense_layer`) and predicts the colour, the kind and the box of the shape that
  covers that token's 28x28-pixel cell (or "background"), so WHAT is at every image token and
  WHERE its object is are stored early in the network.
* **An answer read-out objective** (`recall_weight`): a linear `RecallHead` reads the last two
  hidden states of every answer token from `"label": ` on and predicts the box the answer just
  wrote. A 3B-parameter LM keeps what it has said in its hidden states (that is what LENS's
  context queries read, eq. 2); a 4-layer toy LM trained only on the next token does not
  (linear probes of its states after the box: R^2 ~ 0).
* **A name look-up objective** (`locate_weight`): a second `RecallHead` reads every answer
  token from the rationale's naming of the target ("The blue TRIANGLE is at ...") on and
  predicts the target's box, so the states that choose the position word hold where the named
  shape is.
* **Coarse coordinates**: target boxes are rounded to multiples of `box_quantum` pixels (the
  answer format is unchanged), so each coordinate token is seen more often.

Read `training_step` top to bottom for one step. The committed asset (lenslib/toy/assets/mllm/)
is ONE run of the defaults, `python -m lenslib.toy.pretrain_mllm` (`--out DIR` to write
elsewhere; 3000 steps x 32 samples, 48 min on one CPU thread): free-running val box IoU 0.587
on 200 greedy answers, format 100%. `--init-from DIR` goes on training a saved model with a
fresh schedule on new samples. Each run writes the model and processor (`save_pretrained`,
safetensors, float32, ~5 MB) plus `pretrain.json` (config, steps, wall time, val metrics);
`lenslib.toy.models.load_toy_mllm` loads them. README.md next to this file logs what was tried.

World v2 (lenslib/toy/assets/v2/mllm/): `--world-version 2` (the "reason" rationales; the name
look-up then starts at the rationale's deciding sentence, `locate_from="last"`), warm-started
from the v1 asset (`--warm-start`: same architecture, the words both vocabularies share keep
their embeddings), `--save-every-eval` saves the weights at every evaluation so a run stopped
early leaves its last evaluated state.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    BatchFeature,
    PreTrainedModel,
    ProcessorMixin,
)

from lenslib.answers import parse_answer
from lenslib.data.masks import mask_to_box
from lenslib.data.sample import SegSample
from lenslib.mllm import build_inputs, generate
from lenslib.prompts import format_answer
from lenslib.rewards import box_reward, format_reward
from lenslib.toy.generator import ToyWorld, toy_corpus
from lenslib.toy.models import (
    INFO_FILE,
    TOY_MLLM_DIR,
    build_toy_mllm,
    load_toy_mllm,
    toy_mllm_world,
    world_config_from_dict,
)
from lenslib.toy.schedule import warmup_cosine
from lenslib.toy.tokenizer import build_toy_tokenizer
from lenslib.toy.world import ToyWorldConfig, visible_masks

CELL = 28  # pixels per image token side: patch 14 x spatial merge 2
LABEL_MARKER = '"label": '  # the toy tokenizer's single token after the answer's box


@dataclass(frozen=True)
class MllmPretrainConfig:
    """The pretraining recipe (sized by steps, not by time: the CPU is shared).

    steps, batch_size:   optimiser steps; each sees `batch_size` new train samples.
    lr, weight_decay, warmup_steps, min_lr_ratio: AdamW, linear warm-up, cosine decay to
                         `min_lr_ratio * lr`.
    grad_clip:           clip the global gradient norm.
    box_quantum:         target box coordinates are rounded to multiples of this (1 = exact).
    dense_weight:        weight of the dense auxiliary loss (0 = plain next-token training).
    dense_layer:         which hidden state the DenseHead reads: 0 = the vision tower's merged
                         tokens as they enter the language model, k = after LM layer k.
    recall_weight:       weight of the answer read-out loss (0 = off): the RecallHead predicts
                         the answer's box (cell units) from the last two hidden states of the
                         answer tokens from `"label": ` to the end.
    locate_weight:       weight of the name look-up loss (0 = off): a second RecallHead
                         predicts the target's box from the last two hidden states of every
                         answer token from the rationale's first naming of the target's kind on.
    dense_box_bins:      0: the DenseHead regresses the box (smooth L1, cell units); n > 0:
                         it classifies each coordinate into n bins over [0, image_size].
    min_cover:           a cell belongs to a shape when the shape covers at least this
                         fraction of its pixels (the most-covering shape wins), else background.
    model:               keyword arguments of `lenslib.toy.models.toy_qwen_config` (unused with
                         `init_from`: the saved model keeps its architecture).
    world, world_seed:   the toy world (train split for training, val for evaluation).
    seed:                torch seed of the initial weights (and of the DenseHead).
    init_from:           "" = random initial weights; else a saved toy MLLM directory to go
                         on training from (a fresh DenseHead and lr schedule; same world).
    sample_offset:       index of the first train sample (a run that goes on from a saved
                         model starts after the samples that model has seen).
    warm_start:          "" = random initial weights (unless `init_from`); else a saved toy
                         MLLM directory (possibly of ANOTHER world, e.g. v1 for a v2 run) whose
                         weights initialise every parameter of the same name and shape, and
                         the embedding rows of the words both vocabularies have (new words
                         keep their random rows); `world` and the tokenizer are this run's.
    locate_from:         where the name look-up loss starts: "first" = the answer's first
                         naming of the target's kind (the v1 recipe: its rationale names the
                         target once), "last" = the rationale's last naming of it (world v2's
                         "reason" rationales list candidates first and name the target in the
                         deciding sentence at the end).
    """

    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    box_quantum: int = 4
    dense_weight: float = 1.0
    dense_layer: int = 2
    dense_box_bins: int = 0
    recall_weight: float = 1.0
    locate_weight: float = 1.0
    min_cover: float = 0.15
    model: dict = field(default_factory=dict)
    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    world_seed: int = 0
    seed: int = 0
    init_from: str = ""
    sample_offset: int = 0
    locate_from: str = "first"
    warm_start: str = ""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}"
            )
        if self.box_quantum < 1 or self.world.image_size % self.box_quantum:
            raise ValueError(
                f"box_quantum {self.box_quantum} must be >= 1 and divide image_size "
                f"{self.world.image_size}"
            )
        if self.world.image_size % CELL:
            raise ValueError(f"image_size {self.world.image_size} must be a multiple of {CELL}")
        if self.warm_start and self.init_from:
            raise ValueError("use init_from (same world) or warm_start (new vocabulary), not both")
        if self.locate_from not in ("first", "last"):
            raise ValueError(f"locate_from must be 'first' or 'last', got {self.locate_from!r}")


# ----------------------------------------------------------------------------- targets
def quantise_box(box: Sequence[float], quantum: int, image_size: int) -> list[int]:
    """Round (x1, y1, x2, y2) to multiples of `quantum`, inside [0, image_size], never empty."""
    q = [int(min(max(round(float(v) / quantum) * quantum, 0), image_size)) for v in box]
    for lo, hi in ((0, 2), (1, 3)):
        if q[hi] <= q[lo]:  # a box thinner than the quantum: keep one quantum of it
            q[hi] = min(q[lo] + quantum, image_size)
            q[lo] = q[hi] - quantum
    return q


def target_text(sample: SegSample, quantum: int, image_size: int) -> str:
    """The assistant turn the model is taught: rationale, then the (quantised) box and label."""
    box = quantise_box(sample.box, quantum, image_size)
    return format_answer(sample.rationale, box, label=sample.text)


@dataclass
class DenseTargets:
    """What the DenseHead should predict for every image token of a batch (N = B * cells).

    colour: (N,) index into world.colours + 1, 0 = background.
    kind:   (N,) index into world.kinds + 1, 0 = background.
    box:    (N, 4) box of the shape at that cell, in cell units (pixels / 28); 0 for background.
    answer_box: (B, 4) the box each answer writes, in cell units (for the RecallHead).
    """

    colour: Tensor
    kind: Tensor
    box: Tensor
    answer_box: Tensor | None = None  # (B, 4) the answer's box in cell units (RecallHead)
    name_ids: Tensor | None = None  # (B,) token id of each target's kind word (locate loss)


def cell_targets(sample: SegSample, world: ToyWorldConfig, min_cover: float) -> DenseTargets:
    """Per image-token cell (raster order, as the model's image tokens): the covering shape."""
    shapes = sample.meta["shapes"]
    size, grid = world.image_size, world.image_size // CELL
    masks = np.stack(visible_masks(shapes, size))  # (K, S, S)
    cover = masks.reshape(len(shapes), grid, CELL, grid, CELL).mean(axis=(2, 4))  # (K, g, g)
    owner = cover.reshape(len(shapes), -1).argmax(0)  # (g*g,)
    present = cover.reshape(len(shapes), -1).max(0) >= min_cover
    boxes = torch.tensor([mask_to_box(m) for m in masks], dtype=torch.float32) / CELL  # (K, 4)
    colour = torch.tensor([world.colours.index(s.colour) + 1 for s in shapes])[owner]
    kind = torch.tensor([world.kinds.index(s.kind) + 1 for s in shapes])[owner]
    keep = torch.from_numpy(present)
    return DenseTargets(
        colour=torch.where(keep, colour, 0),
        kind=torch.where(keep, kind, 0),
        box=boxes[owner] * keep[:, None],
    )


class DenseHead(nn.Module):
    """Linear read-out of one hidden state per image token: colour, kind and box logits.

    Used only during pretraining (it is not saved with the model LENS uses).
    """

    def __init__(
        self, hidden_size: int, num_colours: int, num_kinds: int, box_bins: int = 0
    ) -> None:
        super().__init__()
        self.box_bins = box_bins
        self.colour = nn.Linear(hidden_size, num_colours + 1)
        self.kind = nn.Linear(hidden_size, num_kinds + 1)
        self.box = nn.Linear(hidden_size, 4 * max(box_bins, 1))

    def forward(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """hidden (N, H) -> colour logits (N, C+1), kind logits (N, K+1), and the box:
        (N, 4) in cell units (box_bins = 0) or (N, 4, box_bins) bin logits."""
        box = self.box(hidden)
        if self.box_bins:
            box = box.unflatten(-1, (4, self.box_bins))
        return self.colour(hidden), self.kind(hidden), box


class RecallHead(nn.Module):
    """Linear read-out of the box an answer wrote, from the last two hidden states of each
    answer token after the box (pretraining only, not saved with the model).

    marker_id: the token id of `"label": `, which follows the box in the paper's format.
    """

    def __init__(self, hidden_size: int, marker_id: int) -> None:
        super().__init__()
        self.marker_id = marker_id
        self.last = nn.Linear(hidden_size, 4)  # from the final (normed) hidden state
        self.before_last = nn.Linear(hidden_size, 4)  # from the input of the last layer

    def forward(self, before_last: Tensor, last: Tensor) -> tuple[Tensor, Tensor]:
        """(N, H), (N, H) -> two (N, 4) box predictions in cell units."""
        return self.before_last(before_last), self.last(last)


def recall_positions(input_ids: Tensor, labels: Tensor, marker_id: int) -> Tensor:
    """(B, L) bool: the answer tokens from the first `marker_id` token (`"label": `) on."""
    answer = labels != -100  # the prompt's instruction also shows the format: skip it
    after_marker = ((input_ids == marker_id) & answer).cumsum(dim=1) > 0
    return after_marker & answer


def locate_positions(
    input_ids: Tensor, labels: Tensor, name_ids: Tensor, think_end_id: int | None = None
) -> Tensor:
    """(B, L) bool: the answer tokens from the first one equal to that row's `name_ids`
    (the target's kind word in the rationale: "The blue TRIANGLE is at ...") on.

    With `think_end_id` (the `</think>` token): from the LAST such token before it on, i.e.
    the naming in a "reason" rationale's deciding sentence ("The largest is the purple
    CIRCLE, at ...").
    """
    answer = labels != -100
    hits = (input_ids == name_ids[:, None]) & answer
    if think_end_id is None:
        return (hits.cumsum(dim=1) > 0) & answer
    in_rationale = ((input_ids == think_end_id) & answer).cumsum(dim=1) == 0
    index = torch.arange(input_ids.shape[1]).expand_as(hits)
    last = torch.where(hits & in_rationale, index, -1).max(dim=1).values  # (B,), -1: none
    return (index >= last[:, None]) & (last[:, None] >= 0) & answer


def recall_loss(
    head: RecallHead,
    hidden_states: Sequence[Tensor],
    batch: BatchFeature,
    answer_box: Tensor,
    where: Tensor | None = None,
) -> Tensor:
    """Smooth-L1 (cell units) between the RecallHead's boxes and the answer's box, averaged
    over the answer tokens after the box (or the given (B, L) positions `where`) and over
    both read-out layers."""
    if where is None:
        where = recall_positions(batch["input_ids"], batch["labels"], head.marker_id)  # (B, L)
    target = answer_box[:, None, :].expand(-1, where.shape[1], -1)[where]  # (N, 4)
    before_last, last = head(hidden_states[-2][where], hidden_states[-1][where])
    return F.smooth_l1_loss(before_last, target) + F.smooth_l1_loss(last, target)


def dense_loss(
    head: DenseHead, image_hidden: Tensor, targets: DenseTargets, image_size: int = 112
) -> Tensor:
    """CE(colour) + CE(kind) + box loss, the box only on cells with a shape: smooth-L1 in
    cell units, or (head.box_bins > 0) cross-entropy over bins spread evenly on [0, image_size]."""
    colour_logits, kind_logits, box = head(image_hidden)
    loss = F.cross_entropy(colour_logits, targets.colour) + F.cross_entropy(
        kind_logits, targets.kind
    )
    has_shape = targets.colour > 0
    if has_shape.any():
        true_box = targets.box[has_shape]  # (M, 4) cell units
        if head.box_bins:
            scale = CELL / image_size * (head.box_bins - 1)
            bins = (true_box * scale).round().long().clamp(0, head.box_bins - 1)  # (M, 4)
            loss = loss + F.cross_entropy(box[has_shape].flatten(0, 1), bins.flatten())
        else:
            loss = loss + F.smooth_l1_loss(box[has_shape], true_box)
    return loss


# ----------------------------------------------------------------------------- batches
def make_batch(
    samples: Sequence[SegSample], processor: ProcessorMixin, cfg: MllmPretrainConfig
) -> tuple[BatchFeature, DenseTargets]:
    """Teacher-forcing batch (prompt + target answer, `labels` on the answer) + dense targets."""
    size = cfg.world.image_size
    batch = build_inputs(
        processor,
        [s.image for s in samples],
        [s.text for s in samples],
        [target_text(s, cfg.box_quantum, size) for s in samples],
    )
    cells = [cell_targets(s, cfg.world, cfg.min_cover) for s in samples]
    boxes = [quantise_box(s.box, cfg.box_quantum, size) for s in samples]
    targets = DenseTargets(
        colour=torch.cat([c.colour for c in cells]),
        kind=torch.cat([c.kind for c in cells]),
        box=torch.cat([c.box for c in cells]),
        answer_box=torch.tensor(boxes, dtype=torch.float32) / CELL,
        name_ids=torch.tensor(
            [processor.tokenizer.convert_tokens_to_ids(target_kind(s)) for s in samples]
        ),
    )
    return batch, targets


def target_kind(sample: SegSample) -> str:
    """The toy tokenizer's token for the kind word (" circle", ...) of the sample's target:
    the rationale names it after a space ("The blue circle is ...")."""
    return " " + sample.meta["shapes"][sample.meta["target_index"]].kind


def learning_rate_factor(step: int, cfg: MllmPretrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay from 1 to `min_lr_ratio`."""
    return warmup_cosine(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)


# ----------------------------------------------------------------------------- one step
def training_step(
    model: PreTrainedModel,
    head: DenseHead,
    batch: BatchFeature,
    targets: DenseTargets,
    optimizer: torch.optim.Optimizer,
    cfg: MllmPretrainConfig,
    recall_head: RecallHead | None = None,
    locate_head: RecallHead | None = None,
    think_end_id: int | None = None,
) -> dict[str, float]:
    """One optimiser step: LM loss on the answer tokens + dense_weight * dense loss
    (+ recall_weight * answer read-out loss + locate_weight * name look-up loss)."""
    model.train()
    # 1. Forward with teacher forcing: transformers shifts `labels` and averages the
    #    cross-entropy over the answer tokens (the prompt is labelled -100).
    out = model(**batch, output_hidden_states=True)
    loss = out.loss
    # 2. Dense auxiliary loss on the image tokens' hidden states after layer `dense_layer`.
    dense = torch.zeros(())
    if cfg.dense_weight > 0:
        hidden = out.hidden_states[cfg.dense_layer]  # (B, L, H)
        is_image = batch["input_ids"] == model.config.image_token_id  # (B, L)
        dense = dense_loss(
            head, hidden[is_image], targets, cfg.world.image_size
        )  # image tokens in raster order
        loss = loss + cfg.dense_weight * dense
    # 3. Answer read-out loss: the states after the box must still hold the box.
    recall = torch.zeros(())
    if cfg.recall_weight > 0:
        recall = recall_loss(recall_head, out.hidden_states, batch, targets.answer_box)
        loss = loss + cfg.recall_weight * recall
    # 4. Name look-up loss: from the word naming the target on, the states must hold its box.
    locate = torch.zeros(())
    if cfg.locate_weight > 0:
        where = locate_positions(
            batch["input_ids"],
            batch["labels"],
            targets.name_ids,
            think_end_id if cfg.locate_from == "last" else None,
        )
        locate = recall_loss(locate_head, out.hidden_states, batch, targets.answer_box, where)
        loss = loss + cfg.locate_weight * locate
    # 5. Backward, clip, step.
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    losses = {"loss": loss.item(), "lm": out.loss.item(), "dense": dense.item()}
    if cfg.recall_weight > 0:
        losses["recall"] = recall.item()
    if cfg.locate_weight > 0:
        losses["locate"] = locate.item()
    return losses


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_mllm(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    world: ToyWorld,
    split: str = "val",
    n: int = 200,
    batch_size: int = 50,
    max_new_tokens: int = 80,
) -> dict[str, float]:
    """Greedy answers for the first `n` samples of `split`: format rate and box IoU.

    format_rate:     share of answers passing R_format (eq. 11's <think>..<answer> check).
    mean_box_iou:    mean R_box (IoU of the parsed box with the true box; 0 if unparsable).
    frac_iou_gt_0.5: share of answers whose box IoU exceeds 0.5.
    """
    model.eval()
    size = (world.config.image_size, world.config.image_size)
    formats, ious = [], []
    for start in range(0, n, batch_size):
        samples = world.split(split, min(batch_size, n - start), start=start)
        gen = generate(
            model,
            processor,
            [s.image for s in samples],
            [s.text for s in samples],
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        for sample, text in zip(samples, gen.texts, strict=True):
            formats.append(format_reward(text))
            ious.append(box_reward(parse_answer(text, image_size=size).box, sample.box))
    return {
        "format_rate": float(np.mean(formats)),
        "mean_box_iou": float(np.mean(ious)),
        "frac_iou_gt_0.5": float(np.mean(np.array(ious) > 0.5)),
    }


@torch.no_grad()
def box_iou_given_rationale(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    world: ToyWorld,
    split: str = "val",
    n: int = 100,
    box_quantum: int = 4,
) -> float:
    """Diagnostic: mean box IoU when the TRUE rationale is given and only the box is generated.

    The answer is teacher-forced up to `"bbox_2d": ` and decoded greedily from there, one
    sample at a time. Compared with `evaluate_mllm`'s free-running IoU it says whether the
    model fails at localising the object it names, or at naming the right object.
    """
    model.eval()
    size = world.config.image_size
    ious = []
    for sample in world.split(split, n):
        full = target_text(sample, box_quantum, size)
        prefix = full[: full.index('"bbox_2d": ') + len('"bbox_2d": ')]
        batch = build_inputs(processor, [sample.image], [sample.text], [prefix])
        batch.pop("labels")
        for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            batch[key] = batch[key][:, :-1]  # drop the <|im_end|> that closes a completion
        out = model.generate(**batch.to(model.device), max_new_tokens=30, do_sample=False)
        answer = processor.tokenizer.decode(out[0, batch["input_ids"].shape[1] :])
        box = parse_answer(prefix + answer, image_size=(size, size)).box
        ious.append(box_reward(box, sample.box))
    return float(np.mean(ious))


# ----------------------------------------------------------------------------- warm start
@torch.no_grad()
def warm_start_from(model: PreTrainedModel, tokenizer, directory: str | Path) -> dict[str, int]:
    """Copy a saved toy MLLM's weights into `model` (whose tokenizer may have more words).

    Every parameter of the same name and shape is copied; the token embedding (and the tied
    LM head) row by row for the words both vocabularies have. Returns counts of what was
    copied ("tensors", "rows", "new_rows").
    """
    old_model, old_processor = load_toy_mllm(directory=directory)
    old_ids = old_processor.tokenizer.get_vocab()
    new_ids = tokenizer.get_vocab()
    old_state = old_model.state_dict()
    counts = {"tensors": 0, "rows": 0, "new_rows": 0}
    done: set[int] = set()  # tied weights appear twice in the state dict
    for name, tensor in model.state_dict().items():
        old = old_state.get(name)
        if old is None or tensor.data_ptr() in done:
            continue
        done.add(tensor.data_ptr())
        if tensor.shape[0] == len(tokenizer) and old.shape[0] == len(old_ids):
            if tensor.shape[1:] != old.shape[1:]:
                continue
            for word, i in new_ids.items():  # embedding / LM head: row per shared word
                if word in old_ids:
                    tensor[i] = old[old_ids[word]]
                    counts["rows"] += 1
                else:
                    counts["new_rows"] += 1
            counts["tensors"] += 1
        elif tensor.shape == old.shape:
            tensor.copy_(old)
            counts["tensors"] += 1
    return counts


# ----------------------------------------------------------------------------- the loop
def pretrain(
    cfg: MllmPretrainConfig,
    eval_every: int = 0,
    eval_samples: int = 100,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[PreTrainedModel, ProcessorMixin, dict], None] | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin, dict]:
    """Train a fresh toy Qwen2.5-VL with `cfg`; returns (model, processor, training info).

    `checkpoint(model, processor, info)`, if given, is called after every evaluation (every
    `eval_every` steps) with the training info so far, e.g. to save intermediate weights.
    """
    world = ToyWorld(cfg.world, seed=cfg.world_seed)
    if cfg.init_from:
        model, processor = load_toy_mllm(directory=cfg.init_from)
        if toy_mllm_world(cfg.init_from).config != cfg.world:
            raise ValueError(f"{cfg.init_from} was pretrained on another ToyWorldConfig")
    else:
        tokenizer = build_toy_tokenizer(toy_corpus(cfg.world), max_coordinate=cfg.world.image_size)
        model, processor = build_toy_mllm(
            tokenizer, image_size=cfg.world.image_size, seed=cfg.seed, **cfg.model
        )
        if cfg.warm_start:
            copied = warm_start_from(model, tokenizer, cfg.warm_start)
            log(f"warm start from {cfg.warm_start}: {copied}")
    layers = model.config.text_config.num_hidden_layers
    if not 0 <= cfg.dense_layer <= layers:
        raise ValueError(f"dense_layer {cfg.dense_layer} must lie in 0..{layers} (LM layers)")
    torch.manual_seed(cfg.seed)
    head = DenseHead(
        model.config.text_config.hidden_size,
        len(cfg.world.colours),
        len(cfg.world.kinds),
        cfg.dense_box_bins,
    )
    think_end_id = processor.tokenizer.convert_tokens_to_ids("</think>")
    marker_id = processor.tokenizer.convert_tokens_to_ids(LABEL_MARKER)
    if marker_id == processor.tokenizer.unk_token_id:
        raise ValueError(f"the toy tokenizer has no single token {LABEL_MARKER!r}")
    recall_head = RecallHead(model.config.text_config.hidden_size, marker_id)
    locate_head = RecallHead(model.config.text_config.hidden_size, marker_id)
    optimizer = torch.optim.AdamW(
        [
            *model.parameters(),
            *head.parameters(),
            *recall_head.parameters(),
            *locate_head.parameters(),
        ],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, cfg))
    start, history = time.time(), []
    for step in range(cfg.steps):
        first = cfg.sample_offset + step * cfg.batch_size
        samples = world.split("train", cfg.batch_size, start=first)
        batch, targets = make_batch(samples, processor, cfg)
        losses = training_step(
            model, head, batch, targets, optimizer, cfg, recall_head, locate_head, think_end_id
        )
        scheduler.step()
        if step % 25 == 0 or step == cfg.steps - 1:
            minutes = (time.time() - start) / 60
            log(
                f"step {step} {minutes:.1f} min "
                + " ".join(f"{k} {v:.3f}" for k, v in losses.items())
            )
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < cfg.steps:
            metrics = evaluate_mllm(model, processor, world, "val", eval_samples)
            history.append({"step": step + 1, "minutes": (time.time() - start) / 60, **metrics})
            log(f"eval {history[-1]}")
            if checkpoint is not None:
                checkpoint(model, processor, {"steps_done": step + 1, "history": history})
                model.train()
    model.eval()
    info = {"steps": cfg.steps, "train_minutes": (time.time() - start) / 60, "history": history}
    return model, processor, info


def config_dict(cfg: MllmPretrainConfig) -> dict:
    """The recipe as plain json-able values."""
    return json.loads(json.dumps(asdict(cfg)))


# ----------------------------------------------------------------------------- save / load
def save_toy_mllm(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    directory: str | Path,
    info: dict,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """`save_pretrained` model (safetensors, weights cast to `dtype`) + processor + pretrain.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(directory)
    model.to(torch.float32)
    processor.save_pretrained(directory)
    (directory / INFO_FILE).write_text(json.dumps(info, indent=2))
    return directory


# ----------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = MllmPretrainConfig()
    parser = argparse.ArgumentParser(description="Pretrain the toy Qwen2.5-VL on the toy world.")
    parser.add_argument("--out", type=Path, default=TOY_MLLM_DIR)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--box-quantum", type=int, default=defaults.box_quantum)
    parser.add_argument("--dense-weight", type=float, default=defaults.dense_weight)
    parser.add_argument("--dense-layer", type=int, default=defaults.dense_layer)
    parser.add_argument("--dense-box-bins", type=int, default=defaults.dense_box_bins)
    parser.add_argument("--recall-weight", type=float, default=defaults.recall_weight)
    parser.add_argument("--locate-weight", type=float, default=defaults.locate_weight)
    parser.add_argument("--model", type=json.loads, default={}, help="e.g. '{\"num_layers\": 4}'")
    parser.add_argument("--world", type=json.loads, default={}, help="ToyWorldConfig fields")
    parser.add_argument(
        "--world-version",
        type=int,
        default=None,
        help="ToyWorldConfig.version (2 = world v2; also sets --locate-from last)",
    )
    parser.add_argument("--locate-from", choices=("first", "last"), default=None)
    parser.add_argument(
        "--warm-start", default="", help="initialise from a saved toy MLLM of another world"
    )
    parser.add_argument(
        "--save-every-eval",
        action="store_true",
        help="save the weights to --out after every --eval-every evaluation (partial runs)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--init-from", default="", help="go on training a saved toy MLLM")
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point: train, evaluate on val, save; returns the info written to json."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    previous = {"total_steps": 0, "total_samples": 0, "total_train_minutes": 0.0}
    if args.init_from:
        saved = json.loads((Path(args.init_from) / INFO_FILE).read_text())
        previous = {
            "total_steps": saved.get("total_steps", saved["steps"]),
            "total_samples": saved.get(
                "total_samples", saved["steps"] * saved["config"]["batch_size"]
            ),
            "total_train_minutes": saved.get("total_train_minutes", saved["train_minutes"]),
        }
    world = dict(args.world)
    if args.world_version is not None:
        world["version"] = args.world_version
    locate_from = args.locate_from or ("last" if world.get("version", 1) == 2 else "first")
    cfg = MllmPretrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=min(args.warmup_steps, args.steps),
        box_quantum=args.box_quantum,
        dense_weight=args.dense_weight,
        dense_layer=args.dense_layer,
        dense_box_bins=args.dense_box_bins,
        recall_weight=args.recall_weight,
        locate_weight=args.locate_weight,
        model=args.model,
        world=world_config_from_dict(world),
        seed=args.seed,
        init_from=str(args.init_from),
        sample_offset=previous["total_samples"],
        locate_from=locate_from,
        warm_start=str(args.warm_start),
    )
    start = time.time()

    def save_partial(model, processor, partial: dict) -> None:
        """Intermediate weights + what is known so far (marked "partial")."""
        info = {"partial": True, "config": config_dict(cfg), **partial}
        info |= {"val": {"split": "val", "greedy": True, **partial["history"][-1]}}
        save_toy_mllm(model, processor, args.out, info)

    model, processor, info = pretrain(
        cfg,
        eval_every=args.eval_every,
        checkpoint=save_partial if args.save_every_eval else None,
    )
    world = ToyWorld(cfg.world, seed=cfg.world_seed)
    metrics = evaluate_mllm(model, processor, world, "val", args.eval_samples)
    info |= {
        "config": config_dict(cfg),
        "wall_minutes": (time.time() - start) / 60,
        "val": {"split": "val", "n": args.eval_samples, "greedy": True, **metrics},
        "parameters": sum(p.numel() for p in model.parameters()),
        "total_steps": previous["total_steps"] + cfg.steps,
        "total_samples": previous["total_samples"] + cfg.steps * cfg.batch_size,
        "total_train_minutes": previous["total_train_minutes"] + info["train_minutes"],
    }
    save_toy_mllm(model, processor, args.out, info)
    print(json.dumps(info["val"]))
    return info


if __name__ == "__main__":
    main()
