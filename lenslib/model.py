"""LensModel: Qwen2.5-VL + context queries + connector + SAM2, paper eqs. 1-4 in one module.

    P_CoT, P_box = pi_mllm.generate(p_sys, T, I)                 eq. 1   `generate`
    Q'    = pi_mllm.forward(p_sys, T, I, P_CoT, P_box, Q)        eq. 2   `forward_completions`
    Q_seg = pi_connector(Q')                                     eq. 3      "
    P_seg = pi_sam(Q_seg, I)                                     eq. 4      "

`forward_completions` is the one forward every stage uses: the prompt, a completion (the
ground-truth answer in stage 1, a sampled rollout in stage 2, the greedy answer at eval) and the
M queries go through the MLLM once; it returns the completion tokens' logits (for GRPO's
log-probs) and the masks SAM draws from the queries' read-out.

Boxes: the MLLM writes boxes in pixels of ITS input image (after Qwen's smart resize); SAM and
the metrics work in the original image. `to_original_frame` converts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedModel, ProcessorMixin
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from lenslib import mllm as mllm_lib
from lenslib.answers import Box, parse_answer
from lenslib.context import (
    Activation,
    Connector,
    ConnectorKind,
    ConnectorOutput,
    ContextQueries,
    MropeMode,
)
from lenslib.sam import SamConfig, SamFeatures, SamSegmenter
from lenslib.settings import setting
from lenslib.sharding import zero3_gathered

Stage = Literal["align", "rl", "eval"]
PATCH_SIZE = 14  # Qwen2-VL / 2.5-VL vision patch side in pixels


@dataclass
class LensConfig:
    """Everything that shapes the LENS glue (the MLLM and SAM bring their own configs).
    The defaults are the paper's; the authors' code differs where a field says so."""

    num_queries: int = setting(64, "M, context queries (eq. 2; Table 3 ablates 1-128)")
    connector_kind: ConnectorKind = setting(
        "vit", 'connector: "vit" transformer (paper) or "mlp" (Table 4)'
    )
    connector_output: ConnectorOutput = setting(
        "tokens",
        'all M tokens reach SAM ("tokens", the paper\'s text) or one pooled token ("pooled", the authors\' code)',
    )
    connector_depth: int = setting(4, "transformer blocks of the vit connector")
    connector_heads: int | None = setting(
        None, "attention heads of the connector (None: hidden // 64; the authors' code: 16)"
    )
    connector_activation: Activation = setting(
        "gelu", 'MLP activation of the connector (the authors\' code: "quick_gelu")'
    )
    connector_norm_eps: float = setting(
        1e-5, "LayerNorm eps of the connector (the authors' code: 1e-6)"
    )
    mrope: MropeMode = setting(
        "correct",
        'positions of the queries: "correct" 3-D mRoPE, or "authors" (1-D, as the authors\' code)',
    )
    box_prompt: bool = setting(False, "also prompt SAM with the MLLM's own box (the authors: no)")
    stability_fallback: bool = setting(
        False,
        "at evaluation, SAM2's best of 3 masks when the mask is unstable (the authors' build)",
    )
    sam: dict = field(default_factory=dict)  # SamConfig fields of the SAM the model is built with

    def sam_config(self) -> SamConfig:
        fields = dict(self.sam)
        fields["overrides"] = tuple(fields.get("overrides", ()))
        return SamConfig(**fields)


class LensOutput(NamedTuple):
    """What one `forward_completions` gives for N rows (N = prompts x rollouts).

    logits:      (N, T, V) next-token logits of the T completion tokens.
    queries:     (N, M, C) Q' (eq. 2).
    prompts:     (N, K, D) Q_seg (eq. 3), K = M or 1, D = SAM's prompt width.
    mask_logits: (N, H, W) P_seg (eq. 4) at the original image size (mask = logits > 0),
                 or a list of (H_i, W_i) when the images differ in size.
    A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 must see the tensors a module returns
    to gather its weights again for the backward pass.
    """

    logits: Tensor
    queries: Tensor
    prompts: Tensor
    mask_logits: Tensor | list[Tensor]


@dataclass
class Rollouts:
    """G sampled (or 1 greedy) completions per prompt, rows ordered a1..aG, b1..bG, ..."""

    completion_ids: Tensor  # (N, T)
    completion_mask: Tensor  # (N, T) 1 up to and including <|im_end|>
    texts: list[str]  # N decoded completions
    boxes: list[Box | None]  # N parsed boxes in ORIGINAL image pixels (None: no box)
    group_size: int


def mllm_input_sizes(image_grid_thw: Tensor) -> list[tuple[int, int]]:
    """(H, W) of each image as the MLLM saw it: grid (t, h, w) in 14-px patches."""
    return [(int(h) * PATCH_SIZE, int(w) * PATCH_SIZE) for _, h, w in image_grid_thw.tolist()]


def mllm_image_size(processor: ProcessorMixin, height: int, width: int) -> tuple[int, int]:
    """(H', W') Qwen's processor resizes an (H, W) image to: sides multiples of 28 within its
    pixel budget (`smart_resize`). Ground-truth boxes are written in this frame."""
    ip = processor.image_processor
    return smart_resize(
        height, width, factor=ip.patch_size * ip.merge_size,
        min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"],
    )  # fmt: skip


def to_original_frame(box: Box, mllm_size: tuple[int, int], orig_size: tuple[int, int]) -> Box:
    """Rescale a box from the MLLM's resized input (H', W') to the original image (H, W)."""
    sy, sx = orig_size[0] / mllm_size[0], orig_size[1] / mllm_size[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def to_mllm_frame(box: Sequence[float], mllm_size: tuple[int, int], orig_size: tuple[int, int]):
    """Inverse of `to_original_frame`: ground-truth boxes for teacher-forced answers."""
    sy, sx = mllm_size[0] / orig_size[0], mllm_size[1] / orig_size[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


class LensModel(nn.Module):
    """The whole LENS model. Build it with `LensModel(mllm, processor, sam, cfg)` or
    `LensModel.from_pretrained(path)`; `lenslib.presets` builds the toy and full models."""

    def __init__(
        self,
        mllm: PreTrainedModel,
        processor: ProcessorMixin,
        sam: SamSegmenter,
        cfg: LensConfig | None = None,
    ) -> None:
        super().__init__()
        # a copy: the SAM in hand is the truth for cfg.sam, and the caller's config stays as it was
        self.cfg = replace(cfg or LensConfig(), sam=asdict(sam.cfg))
        self.mllm = mllm
        self.processor = processor
        self.sam = sam
        hidden = mllm.config.text_config.hidden_size
        self.queries = ContextQueries(self.cfg.num_queries, hidden, mrope=self.cfg.mrope)
        self.connector = Connector(
            hidden,
            num_queries=self.cfg.num_queries,
            kind=self.cfg.connector_kind,
            output=self.cfg.connector_output,
            depth=self.cfg.connector_depth,
            num_heads=self.cfg.connector_heads,
            prompt_dim=sam.prompt_dim,
            activation=self.cfg.connector_activation,
            norm_eps=self.cfg.connector_norm_eps,
        )
        self.to(mllm.device)

    @property
    def device(self) -> torch.device:
        return self.mllm.device

    # ---------------------------------------------------------------- eq. 1: reasoning
    @torch.no_grad()
    def generate(
        self,
        images: Sequence[np.ndarray],
        texts: Sequence[str],
        group_size: int = 1,
        max_new_tokens: int = 768,
        do_sample: bool = False,
        temperature: float = 0.9,
        top_p: float = 0.9,
        top_k: int = 50,
        share_prompt: bool = False,
    ) -> Rollouts:
        """Chain of thought + box for each (image, text); G = group_size samples per prompt in
        ONE batched generate call. Greedy unless `do_sample`. Boxes come back in original pixels.
        share_prompt: each prompt's prefill once for its G samples (the same tokens)."""
        gen = mllm_lib.generate(
            self.mllm, self.processor, images, texts, max_new_tokens=max_new_tokens,
            do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
            num_return_sequences=group_size, share_prompt=share_prompt,
        )  # fmt: skip
        sizes = mllm_input_sizes(gen.prompt["image_grid_thw"])
        boxes = self.answer_boxes(images, gen.texts, group_size, sizes)
        return Rollouts(gen.completion_ids, gen.completion_mask, gen.texts, boxes, group_size)

    def answer_boxes(
        self,
        images: Sequence[np.ndarray],
        texts: Sequence[str],
        group_size: int = 1,
        mllm_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[Box | None]:
        """The box of each answer (G = group_size per image) in ORIGINAL pixels, None where
        it has none. mllm_sizes: each image's (H', W') as the MLLM saw it (default: the
        processor's resize of the image)."""
        boxes = []
        for row, text in enumerate(texts):
            image = images[row // group_size]
            orig = image.shape[:2]
            seen = (
                mllm_sizes[row // group_size] if mllm_sizes is not None
                else mllm_image_size(self.processor, *orig)
            )  # fmt: skip
            box = parse_answer(text, image_size=(seen[1], seen[0])).box
            boxes.append(None if box is None else to_original_frame(box, seen, orig))
        return boxes

    # ---------------------------------------------------------------- eqs. 2-4: segmentation
    def forward(self, *args, **kwargs) -> LensOutput:
        """`forward_completions`: what a DDP / DeepSpeed wrapper calls on `model(...)`."""
        return self.forward_completions(*args, **kwargs)

    def forward_completions(
        self,
        images: Sequence[np.ndarray],
        texts: Sequence[str],
        completion_ids: Tensor,
        completion_mask: Tensor,
        group_size: int = 1,
        boxes: Sequence[Box | None] | None = None,
        features: SamFeatures | None = None,
        share_prompt: bool = False,
    ) -> LensOutput:
        """One MLLM forward over prompt + completion + queries, then connector and SAM.

        images, texts:   P prompts. completion_ids / mask: (P*G, T), G = group_size rows per
        prompt (a GRPO group), right-padded. boxes: P*G boxes in original pixels for SAM's box
        prompt (used only when cfg.box_prompt). features: SAM features of the P images if the
        caller has them (else `sam.encode`, which caches). share_prompt: compute each prompt
        (image included) once for its G rows (`lenslib.mllm.shared_prompt_forward`), not G times.
        """
        batch = mllm_lib.completion_batch(
            self.processor, images, texts, completion_ids, completion_mask, group_size
        ).to(self.device)
        readout = self.queries(
            self.mllm, batch, logits_to_keep=completion_ids.shape[1],
            prompt_groups=group_size if share_prompt else 1,
        )  # fmt: skip
        # the MLLM may run in bf16 and the connector in fp32 (or all in bf16 under DeepSpeed)
        q_seg = self.connector(readout.queries.to(self.connector.proj[0].weight.dtype))
        mask_logits = self.segment_from_prompts(images, q_seg, group_size, boxes, features)
        return LensOutput(readout.logits, readout.queries, q_seg, mask_logits)

    def segment_from_prompts(
        self,
        images: Sequence[np.ndarray],
        q_seg: Tensor,
        group_size: int = 1,
        boxes: Sequence[Box | None] | None = None,
        features: SamFeatures | None = None,
    ) -> Tensor | list[Tensor]:
        """Eq. 4: SAM's masks for N = P*G rows of prompt tokens (N, K, D) -> (N, H, W) logits."""
        # ZeRO-3: SAM's code reads some weights (`direct_parameters`) outside their modules'
        # forward, so they are gathered here, and registered on this module so that DeepSpeed
        # gathers them again for the backward pass
        direct = self.sam.direct_parameters()
        if features is None:
            with zero3_gathered(direct, fwd_module=self):
                features = self.sam.encode(images)  # (P, ...) frozen, cached
        if group_size > 1 or len(features) != len(q_seg):
            rows = [i for i in range(len(images)) for _ in range(group_size)]
            features = SamFeatures.cat([features.select(i) for i in rows])
        sizes = [images[i // group_size].shape[:2] for i in range(len(q_seg))]
        box_tensor = None
        if self.cfg.box_prompt:
            box_tensor = torch.tensor(
                [b if b is not None else (0, 0, s[1], s[0]) for b, s in zip(boxes, sizes)],
                dtype=torch.float32,
            )  # a missing box falls back to the whole image
        with zero3_gathered(direct, fwd_module=self):
            out = self.sam.decode(
                features, context_tokens=q_seg, boxes=box_tensor, orig_sizes=sizes,
                stability_fallback=self.cfg.stability_fallback and not self.training,
            )  # fmt: skip
        if isinstance(out.logits, Tensor):
            return out.logits[:, 0]  # (N, H, W)
        return [logit[0] for logit in out.logits]

    def forward_answers(
        self, images: Sequence[np.ndarray], texts: Sequence[str], answers: Sequence[str]
    ) -> LensOutput:
        """Teacher forcing (stage 1, eq. 5): the given answers as the assistant turns (and,
        with cfg.box_prompt, their boxes as SAM's box prompts)."""
        ids, mask = mllm_lib.tokenize_completions(self.processor, answers)
        boxes = self.answer_boxes(images, answers) if self.cfg.box_prompt else None
        return self.forward_completions(images, texts, ids, mask, boxes=boxes)

    @torch.no_grad()
    def predict(
        self, images: Sequence[np.ndarray], texts: Sequence[str], max_new_tokens: int = 768
    ) -> tuple[Rollouts, list[Tensor]]:
        """Greedy reasoning, then the masks: what evaluation and `lenslib.predict` run."""
        rollouts = self.generate(images, texts, max_new_tokens=max_new_tokens)
        out = self.forward_completions(
            images, texts, rollouts.completion_ids, rollouts.completion_mask, boxes=rollouts.boxes
        )
        masks = [m > 0 for m in out.mask_logits]
        return rollouts, masks

    # ---------------------------------------------------------------- which parts learn
    def set_stage(self, stage: Stage, train_vision_tower: bool = True) -> dict[str, int]:
        """Freeze / unfreeze for a training stage with `requires_grad_` (which really freezes;
        the authors' `module.requires_grad = False` sets an attribute and freezes nothing).

        align (eq. 5):  only the context queries and the connector.
        rl (eq. 12):    everything except SAM's image encoder; `train_vision_tower=False`
                        also freezes the MLLM's vision tower.
        eval:           nothing.
        Returns the trainable parameter counts per part.
        """
        if stage not in ("align", "rl", "eval"):
            raise ValueError(f"stage must be 'align', 'rl' or 'eval', got {stage!r}")
        self.requires_grad_(False)
        if stage in ("align", "rl"):
            self.queries.requires_grad_(True)
            self.connector.requires_grad_(True)
        if stage == "rl":
            self.mllm.requires_grad_(True)
            if not train_vision_tower:
                self.mllm.model.visual.requires_grad_(False)
            self.sam.set_decoder_trainable(True)
        return self.trainable_counts()

    def trainable_counts(self) -> dict[str, int]:
        """Trainable parameters per part: mllm, queries, connector, sam."""
        parts = {"mllm": self.mllm, "queries": self.queries, "connector": self.connector}
        parts["sam"] = self.sam
        return {  # (ds_numel: a parameter's size while DeepSpeed ZeRO-3 shards it)
            name: sum(
                getattr(p, "ds_numel", p.numel()) for p in part.parameters() if p.requires_grad
            )
            for name, part in parts.items()
        }

    # ---------------------------------------------------------------- saving and loading
    def lens_state_dict(self) -> dict[str, Tensor]:
        """Queries, connector and SAM weights (the MLLM saves itself with save_pretrained)."""
        parts = {"queries": self.queries, "connector": self.connector, "sam": self.sam}
        return {
            f"{name}.{key}": t.detach().cpu().contiguous()
            for name, part in parts.items()
            for key, t in part.state_dict().items()
        }

    def save_pretrained(
        self, path: str | Path, state_dict: dict[str, Tensor] | None = None
    ) -> None:
        """Write `path/mllm/` (transformers), `path/lens.safetensors`, `path/lens_config.json`.

        state_dict: the whole model's weights (keys "mllm.", "queries.", "connector.", "sam.")
        when this module's own tensors are not the whole truth, e.g. sharded by DeepSpeed ZeRO-3:
        `lenslib.training.save_model` gathers them with `accelerator.get_state_dict`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            self.mllm.save_pretrained(path / "mllm")
            lens_tensors = self.lens_state_dict()
        else:
            parts = {"mllm": {}, "lens": {}}
            for key, t in state_dict.items():
                part = "mllm" if key.startswith("mllm.") else "lens"
                parts[part][key.removeprefix("mllm.")] = t.detach().cpu().contiguous()
            self.mllm.save_pretrained(path / "mllm", state_dict=parts["mllm"])
            lens_tensors = parts["lens"]
        self.processor.save_pretrained(path / "mllm")
        save_file(lens_tensors, str(path / "lens.safetensors"))
        (path / "lens_config.json").write_text(json.dumps(asdict(self.cfg), indent=2))

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype=torch.float32
    ) -> LensModel:
        """Inverse of `save_pretrained`; a clear error names any missing file."""
        path = Path(path)
        for needed in ("lens_config.json", "lens.safetensors", "mllm"):
            if not (path / needed).exists():
                raise FileNotFoundError(f"{path / needed} not found: is {path} a LensModel folder?")
        cfg = LensConfig(**json.loads((path / "lens_config.json").read_text()))
        mllm, processor = mllm_lib.load_mllm(str(path / "mllm"), dtype=dtype, device=device)
        model = cls(mllm, processor, SamSegmenter(cfg.sam_config(), device), cfg)
        state = load_file(str(path / "lens.safetensors"))
        for name in ("queries", "connector", "sam"):
            prefix = name + "."
            part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            getattr(model, name).load_state_dict(part)
        return model.to(device)
