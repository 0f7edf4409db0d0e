"""The reasoning model pi_mllm (paper eq. 1): Qwen2.5-VL, at full scale or as a tiny toy.

Both scales use transformers' own classes, so everything downstream (generation, the context
queries' forward, GRPO) runs the same code:

- full: `load_mllm("Qwen/Qwen2.5-VL-3B-Instruct" or a local path)` (LENS-2B: Qwen2-VL-2B);
- toy:  `build_toy_mllm(tokenizer)`: a ~1 M-parameter Qwen2.5-VL built from a config, with the
  word-level tokenizer of `lenslib.tokenizer` and a processor that keeps 112x112 images at
  112x112 (grid 8x8 patches of 14 px -> 2x2 merge -> 16 `<|image_pad|>` tokens).

Batches follow one layout everywhere: the prompt is LEFT-padded (so generation appends to the
right of every row) and a completion, when there is one, follows it RIGHT-padded:

    [pad pad prompt prompt prompt | completion completion <|im_end|> pad]

Padding holes in the middle are harmless: the attention mask hides them and Qwen's
`get_rope_index` numbers only the real tokens, so every row computes what it would alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoProcessor,
    BatchFeature,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from lenslib.grpo import completion_mask
from lenslib.prompts import chat_messages
from lenslib.tokenizer import EOS_TOKEN, QWEN_CHAT_TEMPLATE

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


# ----------------------------------------------------------------------------- toy scale
def default_mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (time, height, width) as Qwen does (16:24:24)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def toy_qwen_config(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_depth: int = 2,
    vision_hidden_size: int = 64,
    vision_heads: int = 2,
    rope_theta: float = 10.0,
    mrope_section: Sequence[int] | None = None,
    tie_word_embeddings: bool = True,
) -> Qwen2_5_VLConfig:
    """A small Qwen2.5-VL config whose token ids match `tokenizer` (facts file, sections 5, 9).

    Defaults: text 128 wide x 4 layers (4 layers localised better than 2 at the same budget),
    vision 64 wide x 2 blocks, head_dim 32 -> mrope_section [4, 6, 6]. `rope_theta` 10 (Qwen:
    1e6) gives the height/width sections visible rotation over a 4-8 cell grid. Embeddings are
    tied, as in Qwen2.5-VL-3B.
    """
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"hidden {hidden_size} / heads {num_heads} / kv {num_kv_heads} mismatch")
    head_dim = hidden_size // num_heads
    section = list(mrope_section) if mrope_section else default_mrope_section(head_dim)
    if sum(section) != head_dim // 2:
        raise ValueError(f"mrope_section {section} must sum to head_dim/2 = {head_dim // 2}")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")}
    ids |= {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>")}
    if tokenizer.unk_token_id in ids.values():
        raise ValueError("tokenizer lacks Qwen's vision special tokens")
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 4 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": rope_theta,
            "mrope_section": section,
        },
        "bos_token_id": tokenizer.pad_token_id,  # Qwen: <|endoftext|>
        "eos_token_id": tokenizer.eos_token_id,  # <|im_end|>
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "depth": vision_depth,
        "hidden_size": vision_hidden_size,
        "intermediate_size": 4 * vision_hidden_size,
        "num_heads": vision_heads,
        "out_hidden_size": hidden_size,  # the patch merger writes straight into the LM's width
        "fullatt_block_indexes": [vision_depth - 1],  # must be < depth
        "window_size": 112,
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )


def toy_processor(
    tokenizer: PreTrainedTokenizerBase, image_size: int = 112, min_pixels: int = 28 * 28
) -> Qwen2_5_VLProcessor:
    """A real Qwen2_5_VLProcessor for the toy: images up to image_size^2 pixels keep their size.

    112x112 -> smart_resize keeps 112x112 -> 8x8 patches -> 16 `<|image_pad|>` tokens.
    """
    if image_size % 28:
        raise ValueError(
            f"image_size must be a multiple of 28 (patch 14 x merge 2), got {image_size}"
        )
    pixels = {"min_pixels": min_pixels, "max_pixels": image_size * image_size}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),  # required by the class, unused
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def build_toy_mllm(
    tokenizer: PreTrainedTokenizerBase, image_size: int = 112, seed: int = 0, **config_kwargs
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """A randomly initialised tiny Qwen2.5-VL and its processor (`config_kwargs` -> toy_qwen_config).

    The same `seed` gives the same weights; the global RNG is left untouched.
    """
    config = toy_qwen_config(tokenizer, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.pad_token_id
    return model.eval(), toy_processor(tokenizer, image_size=image_size)


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
) -> Generation:
    """Eq. 1: P_CoT, P_box = pi_mllm.generate(p_sys, T, I), for a batch, G samples per prompt.

    ONE batched `model.generate` call makes all B*G rollouts (transformers encodes each image
    once and repeats it). Stops at `<|im_end|>`. Defaults are the authors' rollout settings
    (temperature 0.9, top_p 0.9, top_k 50); `do_sample=False` is greedy decoding.
    """
    tokenizer = processor.tokenizer
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    prompt = build_inputs(processor, images, queries).to(model.device)
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
    out = model.generate(
        **prompt,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_return_sequences=num_return_sequences,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )  # (B*G, P+T)
    completion_ids = out[:, prompt["input_ids"].shape[1] :]  # (B*G, T)
    mask = completion_mask(completion_ids, eos_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Generation(prompt, completion_ids, mask, texts)
