"""The reasoning model pi_mllm (paper eq. 1): Qwen2.5-VL, loaded and driven with transformers.

`load_mllm("Qwen/Qwen2.5-VL-3B-Instruct" or a local path)` loads the real model (LENS-2B:
Qwen2-VL-2B). The toy model is a tiny Qwen2.5-VL of the same classes (and a saved one loads with
`load_mllm` too), so everything downstream (generation, the context queries' forward, GRPO) runs
the same code.
The module also holds what every Qwen2.5-VL tokenizer shares: its special tokens (EOS =
`<|im_end|>`, pad = `<|endoftext|>`) and its chat template.

Batches follow one layout everywhere: the prompt is LEFT-padded (so generation appends to the
right of every row) and a completion, when there is one, follows it RIGHT-padded:

    [pad pad prompt prompt prompt | completion completion <|im_end|> pad]

Padding holes in the middle are harmless: the attention mask hides them and Qwen's
`get_rope_index` numbers only the real tokens, so every row computes what it would alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoProcessor,
    BatchFeature,
    DynamicCache,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

from lenslib.prompts import chat_messages

# Qwen2.5-VL's special tokens, in Qwen's own id order (151643 ... 151656).
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
PLACEHOLDER_TOKENS = ["<|image_pad|>", "<|video_pad|>"]  # stand for image / video features
QWEN_SPECIAL_TOKENS = [
    PAD_TOKEN,
    "<|im_start|>",
    EOS_TOKEN,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL / Qwen2.5-VL's chat template, as shipped with the released checkpoints.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# config.model_type -> the transformers class that loads it (LENS-3B and LENS-2B).
MLLM_CLASSES = {
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
}
AUTHORS_MAX_PIXELS = 1_000_000  # the authors' smart_resize budget for the MLLM's input image
IGNORE_INDEX = -100  # label value that transformers' loss skips

ImageLike = np.ndarray | Image.Image


# ----------------------------------------------------------------------------- full scale
def load_mllm(
    path_or_id: str,
    dtype: torch.dtype = torch.bfloat16,
    max_pixels: int | None = None,
    min_pixels: int | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a Qwen2.5-VL (or Qwen2-VL) checkpoint and its processor with transformers' classes.

    The class is picked from the config's `model_type`. `max_pixels` bounds the smart-resized
    input image (authors: AUTHORS_MAX_PIXELS = 1,000,000; the full preset passes it);
    `max_pixels` / `min_pixels` keep the saved processor's values unless given, so a saved toy
    model keeps its 112 x 112 budget.
    The tokenizer pads on the left, as generation needs.
    """
    config = AutoConfig.from_pretrained(path_or_id)
    if config.model_type not in MLLM_CLASSES:
        raise ValueError(
            f"{path_or_id}: model_type {config.model_type!r} is not one of {sorted(MLLM_CLASSES)}"
        )
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model_class = MLLM_CLASSES[config.model_type]
    model = model_class.from_pretrained(path_or_id, dtype=dtype, **kwargs).to(device)
    processor = AutoProcessor.from_pretrained(path_or_id)
    set_pixel_budget(processor, max_pixels=max_pixels, min_pixels=min_pixels)
    processor.tokenizer.padding_side = "left"
    return model, processor


def set_pixel_budget(
    processor: ProcessorMixin, max_pixels: int | None = None, min_pixels: int | None = None
) -> None:
    """Set the image processor's smart_resize bounds (pixels of the resized image)."""
    size = dict(processor.image_processor.size)
    if max_pixels is not None:
        size["longest_edge"] = int(max_pixels)
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
    if size["shortest_edge"] > size["longest_edge"]:
        raise ValueError(f"min_pixels {size['shortest_edge']} > max_pixels {size['longest_edge']}")
    processor.image_processor.size = size


# ----------------------------------------------------------------------------- batches
def build_inputs(
    processor: ProcessorMixin,
    images: Sequence[ImageLike],
    queries: Sequence[str],
    completions: Sequence[str] | None = None,
) -> BatchFeature:
    """Chat-template prompts (system + image + paper's instruction), LEFT-padded, as one batch.

    Returns the processor's BatchFeature: input_ids (B, P), attention_mask (B, P),
    mm_token_type_ids (B, P), pixel_values (sum of patches, 3*2*14*14), image_grid_thw (B, 3).
    With `completions` (teacher forcing, e.g. the ground-truth answers of stage 1), each
    completion + `<|im_end|>` is appended as the assistant turn (RIGHT-padded, see
    `append_completions`) and `labels` marks the completion tokens for the LM loss.
    """
    if len(images) != len(queries):
        raise ValueError(f"{len(images)} images but {len(queries)} queries")
    texts = [
        processor.apply_chat_template(chat_messages(q), add_generation_prompt=True, tokenize=False)
        for q in queries
    ]
    batch = processor(
        images=list(images), text=texts, padding=True, padding_side="left", return_tensors="pt"
    )
    if completions is None:
        return batch
    if len(completions) != len(queries):
        raise ValueError(f"{len(completions)} completions but {len(queries)} queries")
    completion_ids, completion_mask = tokenize_completions(processor, completions)
    return append_completions(batch, completion_ids, completion_mask)


def tokenize_completions(
    processor: ProcessorMixin, completions: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assistant turns -> (ids (B, T), mask (B, T)), each ending in `<|im_end|>`, RIGHT-padded."""
    texts = [c + EOS_TOKEN for c in completions]
    tok = processor.tokenizer(
        texts, padding=True, padding_side="right", add_special_tokens=False, return_tensors="pt"
    )
    return tok["input_ids"], tok["attention_mask"]


def append_completions(
    prompt: BatchFeature, completion_ids: torch.Tensor, completion_mask: torch.Tensor
) -> BatchFeature:
    """Prompt batch (B, P) + completions (B, T) -> one (B, P+T) batch with `labels`.

    labels = completion ids where `completion_mask` is 1, else -100 (prompt and padding).
    """
    if completion_ids.shape != completion_mask.shape or len(completion_ids) != len(
        prompt["input_ids"]
    ):
        raise ValueError(
            f"completion_ids {tuple(completion_ids.shape)} / completion_mask "
            f"{tuple(completion_mask.shape)} do not fit prompt batch {len(prompt['input_ids'])}"
        )
    mask = completion_mask.to(prompt["attention_mask"].dtype)
    data = dict(prompt)
    data["input_ids"] = torch.cat([prompt["input_ids"], completion_ids], dim=1)  # (B, P+T)
    data["attention_mask"] = torch.cat([prompt["attention_mask"], mask], dim=1)  # (B, P+T)
    if "mm_token_type_ids" in prompt:  # completions are text: type 0
        text_types = torch.zeros_like(completion_ids, dtype=prompt["mm_token_type_ids"].dtype)
        data["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], text_types], dim=1)
    prompt_labels = torch.full_like(prompt["input_ids"], IGNORE_INDEX)
    completion_labels = completion_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
    data["labels"] = torch.cat([prompt_labels, completion_labels], dim=1)  # (B, P+T)
    return BatchFeature(data)


def repeat_batch(batch: BatchFeature, times: int) -> BatchFeature:
    """Repeat every sample `times` times in a row (a, a, b, b), images included.

    This is the row order of `generate(..., num_return_sequences=G)`; GRPO's forward over the
    G rollouts of each prompt uses it. pixel_values holds all images' patches stacked, so it
    is split per image (grid t*h*w patches each) before repeating.
    """
    data = {}
    for key, value in batch.items():
        if key == "pixel_values":
            patches = batch["image_grid_thw"].prod(-1).tolist()  # patches per image
            chunks = torch.split(value, patches)
            data[key] = torch.cat([c for c in chunks for _ in range(times)])
        elif isinstance(value, torch.Tensor):
            data[key] = value.repeat_interleave(times, dim=0)
        else:
            data[key] = value
    return BatchFeature(data)


def completion_batch(
    processor: ProcessorMixin,
    images: Sequence[ImageLike],
    queries: Sequence[str],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    group_size: int = 1,
) -> BatchFeature:
    """The model inputs for P prompts, each followed by its G = group_size completions:
    prompt batch -> each prompt repeated G times -> completions appended (rows a1..aG, b1..bG).
    completion_ids / completion_mask: (P*G, T). No labels: the caller scores the tokens."""
    prompt = build_inputs(processor, images, queries)
    if group_size > 1:
        prompt = repeat_batch(prompt, group_size)
    batch = append_completions(prompt, completion_ids.cpu(), completion_mask.cpu())
    return BatchFeature({k: v for k, v in batch.items() if k != "labels"})


def shared_prompt_forward(
    vlm: PreTrainedModel,
    inputs: Mapping[str, torch.Tensor],
    group_size: int,
    prompt_length: int,
    inputs_embeds: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """`vlm(**inputs).last_hidden_state` (N, L, C), computing each prompt ONCE per group.

    The N = P*G rows come in groups of G = group_size rows (a1..aG, b1..bG, ...) that share
    their first `prompt_length` columns: the prompt, image included (`completion_batch`'s
    layout). vlm is the MLLM's `model` (vision tower + language model, no lm_head); inputs is
    the batch the plain forward takes (input_ids, attention_mask, mm_token_type_ids,
    pixel_values, image_grid_thw of all N rows, one image per row); inputs_embeds (N, L, C) and
    position_ids (3, N, L) as the plain call (None: the token embeddings / `get_rope_index`).

        1. prefix   the P prompts (rows 0, G, 2G, ...) through the vision tower and the language
                    model, which keeps every layer's keys and values (a KV cache)
        2. expand   the cache repeated G times along the batch (repeat_interleave: a a b b, the
                    rows' order); autograd sees it, so the gradients of all G rows flow back,
                    summed, into the one prefix computation (vision tower included)
        3. suffix   the other columns of the N rows attend to the cached prompt and to
                    themselves, with the whole (N, L) attention mask and their own positions

    Exact, because attention is causal: a prompt column never attends to the columns after it,
    so its states do not depend on the completion, and the plain forward computes the same
    prompt G times. The positions are those of the whole rows (mRoPE gives the image tokens 3-D
    positions and numbers the text after them on from there), cut in two, so every column
    sees the positions it has in the plain forward.
    """
    G, Lp = group_size, prompt_length
    ids, mask, grid = inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"]
    N = len(ids)
    if N % G or len(grid) != N:
        raise ValueError(f"{N} rows and {len(grid)} images do not make groups of {G}")
    firsts = slice(None, None, G)  # the first row of each group: (P, ...)
    for columns in (ids[:, :Lp], mask[:, :Lp]):
        if not torch.equal(columns, columns[firsts].repeat_interleave(G, dim=0)):
            raise ValueError(f"rows of a group of {G} do not share their first {Lp} columns")
    language_model = getattr(vlm, "language_model", vlm)  # (the vision tower takes no cache)
    checkpointed = [getattr(m, "gradient_checkpointing", False) for m in language_model.modules()]
    if vlm.training and torch.is_grad_enabled() and any(checkpointed):
        raise ValueError(
            "share_prompt needs the KV cache, which transformers drops under "
            "gradient_checkpointing: turn one of the two settings off"
        )
    if inputs_embeds is None:
        inputs_embeds = vlm.get_input_embeddings()(ids)  # (N, L, C)
    if position_ids is None:
        position_ids, _ = vlm.get_rope_index(
            ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=grid,
            attention_mask=mask,
        )  # (3, N, L)  # fmt: skip
    patches = torch.split(inputs["pixel_values"], grid.prod(-1).tolist())  # one per image
    cache = DynamicCache(config=vlm.config)
    cache_arg = {_cache_keyword(vlm): cache}
    prefix = vlm(
        input_ids=ids[firsts, :Lp], inputs_embeds=inputs_embeds[firsts, :Lp],
        attention_mask=mask[firsts, :Lp], position_ids=position_ids[:, firsts, :Lp],
        pixel_values=torch.cat(patches[firsts]), image_grid_thw=grid[firsts], use_cache=True,
        **cache_arg,
    ).last_hidden_state  # (P, Lp, C)  # fmt: skip
    cache.batch_repeat_interleave(G)  # every layer's keys and values: (P, ...) -> (N, ...)
    suffix = vlm(
        inputs_embeds=inputs_embeds[:, Lp:], attention_mask=mask,
        position_ids=position_ids[:, :, Lp:], use_cache=True, **cache_arg,
    ).last_hidden_state  # (N, L - Lp, C)  # fmt: skip
    return torch.cat([prefix.repeat_interleave(G, dim=0), suffix], dim=1)  # (N, L, C)


@torch.no_grad()
def shared_prompt_prefill(model: PreTrainedModel, prompt: BatchFeature, group_size: int) -> dict:
    """The inputs of `model.generate` for G = group_size samples of each of P prompts, with each
    prompt's prefill computed ONCE instead of G times.

    Every prompt column but the last goes through the model for the P prompts (image included,
    keeping a KV cache); the cache is repeated G times (rows a1..aG, b1..bG, ...); generate then
    starts from the last prompt token of the P*G rows (it needs one token that is not cached
    yet). The tokens it adds are numbered by Qwen's `rope_deltas` (text after the image counts
    on from the image's positions), set here for the P*G rows. The same tokens as
    `model.generate(**prompt, num_return_sequences=G)` for the same seed: attention is causal,
    so the prompt's keys and values do not depend on what is sampled after it.
    """
    G, vlm = group_size, model.model
    ids, mask = prompt["input_ids"], prompt["attention_mask"]
    positions, deltas = vlm.get_rope_index(
        ids, mm_token_type_ids=prompt["mm_token_type_ids"],
        image_grid_thw=prompt["image_grid_thw"], attention_mask=mask,
    )  # (3, P, Lp), (P, 1)  # fmt: skip
    cache = DynamicCache(config=model.config)
    vlm(
        input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[..., :-1],
        pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"],
        use_cache=True, **{_cache_keyword(vlm): cache},
    )  # fmt: skip
    cache.batch_repeat_interleave(G)  # (P, ...) -> (P*G, ...)
    vlm.rope_deltas = deltas.repeat_interleave(G, dim=0)  # (P*G, 1), read by generate
    rows = {k: prompt[k].repeat_interleave(G, dim=0) for k in ("input_ids", "attention_mask")}
    return rows | {_cache_keyword(model): cache}


def _cache_keyword(vlm: PreTrainedModel) -> str:
    """The name of the KV-cache argument: `cache` in recent transformers, `past_key_values`
    before it was renamed."""
    parameters = inspect.signature(vlm.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 for completion tokens up to and including the first EOS, 0 after it.

    completion_ids: (B, T). Returns (B, T) int mask. A completion with no EOS counts all T
    tokens (it was cut at the maximum length). These are the tokens |o_i| of eq. 10 counts.
    """
    batch, length = completion_ids.shape
    is_eos = completion_ids == eos_token_id  # (B, T)
    first_eos = torch.full((batch,), length, dtype=torch.long, device=completion_ids.device)
    has_eos = is_eos.any(dim=1)
    first_eos[has_eos] = is_eos.int().argmax(dim=1)[has_eos]
    positions = torch.arange(length, device=completion_ids.device).expand(batch, -1)
    return (positions <= first_eos.unsqueeze(1)).int()


# ----------------------------------------------------------------------------- generation
@dataclass
class Generation:
    """Sampled completions for B prompts x G rollouts (rows a1..aG, b1..bG, ...).

    prompt:          the prompt batch (B rows), as `build_inputs` made it.
    completion_ids:  (B*G, T) token ids after the prompt; padded after `<|im_end|>`.
    completion_mask: (B*G, T) 1 up to and including the first `<|im_end|>`, then 0.
    texts:           B*G decoded completions, special tokens removed.
    """

    prompt: BatchFeature
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    images: Sequence[ImageLike],
    queries: Sequence[str],
    max_new_tokens: int = 768,
    do_sample: bool = True,
    temperature: float = 0.9,
    top_p: float = 0.9,
    top_k: int = 50,
    num_return_sequences: int = 1,
    share_prompt: bool = False,
) -> Generation:
    """Eq. 1: P_CoT, P_box = pi_mllm.generate(p_sys, T, I), for a batch, G samples per prompt.

    ONE batched `model.generate` call makes all B*G rollouts (transformers encodes each image
    once and repeats it). Stops at `<|im_end|>`. Defaults are the authors' rollout settings
    (temperature 0.9, top_p 0.9, top_k 50); `do_sample=False` is greedy decoding.
    The image / video placeholder tokens are never generated: the forward over prompt +
    completion counts them to place image features, and a sampled one would claim features
    no image has (an untrained policy does sample them).
    `share_prompt`: the prompts' prefill is computed once per prompt, not once per sample
    (`shared_prompt_prefill`); the same tokens for the same seed.
    """
    tokenizer = processor.tokenizer
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    placeholders = tokenizer.convert_tokens_to_ids(PLACEHOLDER_TOKENS)
    prompt = build_inputs(processor, images, queries).to(model.device)
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
    inputs, copies = dict(prompt), num_return_sequences
    if share_prompt and num_return_sequences > 1:
        inputs, copies = shared_prompt_prefill(model, prompt, num_return_sequences), 1
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_return_sequences=copies,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=placeholders,
        **sampling,
    )  # (B*G, P+T)
    completion_ids = out[:, prompt["input_ids"].shape[1] :]  # (B*G, T)
    mask = completion_mask(completion_ids, eos_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Generation(prompt, completion_ids, mask, texts)
