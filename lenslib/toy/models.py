"""The toy base models: a tiny Qwen2.5-VL and a tiny SAM2, built at random or loaded pretrained.

LENS starts from a pretrained Qwen2.5-VL and a pretrained SAM2. At toy scale both are the same
transformers / sam2 classes, shrunk:

* MLLM (~1 M parameters): `toy_qwen_config` + `toy_processor` (112x112 images stay 112x112:
  8x8 patches of 14 px -> 2x2 merge -> 16 `<|image_pad|>` tokens), with the word-level
  tokenizer of `lenslib.toy.tokenizer`; `build_toy_mllm` makes a random one, `load_toy_mllm` loads the one
  pretrained by `lenslib.toy.pretrain_mllm` (assets/mllm/).
* SAM2: the hiera-L config with `TOY_OVERRIDES` (`toy_sam_config`); `load_toy_sam` loads the
  one pretrained by `lenslib.toy.pretrain_sam` (assets/sam/).

`load_bases` and `random_bases` give both at once, as `lenslib.presets.build_lens` needs them;
`load_bases(device, version=2)` loads the pair pretrained on world v2 (assets/v2/mllm,
assets/v2/sam; `ToyWorldConfig(version=2)`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (
    AutoProcessor,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from lenslib.mllm import QWEN_CHAT_TEMPLATE
from lenslib.sam import SamConfig, SamSegmenter
from lenslib.sam_io import ARCHITECTURE_FIELDS, load_sam, read_sam_info
from lenslib.sam_io import INFO_FILE as SAM_INFO_FILE
from lenslib.toy.generator import ToyWorld, toy_corpus
from lenslib.toy.tokenizer import build_toy_tokenizer
from lenslib.toy.world import ToyWorldConfig

ASSETS = Path(__file__).parent / "assets"
TOY_MLLM_DIR = ASSETS / "mllm"
TOY_SAM_DIR = ASSETS / "sam"
# The base models pretrained on world v2 (ToyWorldConfig(version=2)); version 1 = the above.
ASSET_DIRS = {1: (TOY_MLLM_DIR, TOY_SAM_DIR), 2: (ASSETS / "v2" / "mllm", ASSETS / "v2" / "sam")}
INFO_FILE = "pretrain.json"  # written next to the toy MLLM by lenslib.toy.pretrain_mllm

# Hydra overrides that shrink the hiera-L config to a laptop-sized toy (facts, section 6):
# Hiera trunk 16 -> 128 channels over 4 stages of 1, 1, 2, 1 blocks (~0.33 M parameters).
# The neck's d_model sets SAM2's prompt width (prompt tokens, image embedding, mask decoder):
# 256 in the real model, 128 here, which shrinks the decoder from 4.2 M to 1.65 M parameters so
# the pretrained toy weights stay small on disk (~4 MB in float16). The sine position encoding
# of the neck must have the same width.
TOY_PROMPT_DIM = 128
TOY_OVERRIDES = (
    "++model.image_encoder.trunk.embed_dim=16",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
    f"++model.image_encoder.neck.d_model={TOY_PROMPT_DIM}",
    f"++model.image_encoder.neck.position_encoding.num_pos_feats={TOY_PROMPT_DIM}",
)


# ----------------------------------------------------------------------------- toy MLLM
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
    """A small Qwen2.5-VL config whose token ids match `tokenizer` (vision out width = text hidden, mRoPE sections summing to head_dim / 2).

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


def load_toy_mllm(
    device: str | torch.device = "cpu", directory: str | Path = TOY_MLLM_DIR
) -> tuple[Qwen2_5_VLForConditionalGeneration, ProcessorMixin]:
    """The pretrained toy Qwen2.5-VL (lenslib/toy/assets/mllm/) in float32, and its processor."""
    directory = Path(directory)
    if not (directory / "config.json").is_file() or not (directory / INFO_FILE).is_file():
        raise FileNotFoundError(
            f"no pretrained toy MLLM in {directory} (config.json / {INFO_FILE} missing); "
            "make one with `python -m lenslib.toy.pretrain_mllm --out <dir>`"
        )
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(directory)
    processor.tokenizer.padding_side = "left"
    return model.to(device).eval(), processor


def world_config_from_dict(values: dict) -> ToyWorldConfig:
    """A ToyWorldConfig from its json form (lists back to the tuples the dataclass uses)."""
    return ToyWorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def toy_mllm_world(directory: str | Path = TOY_MLLM_DIR) -> ToyWorld:
    """The toy world the saved toy MLLM was pretrained on (from its pretrain.json)."""
    path = Path(directory) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `python -m lenslib.toy.pretrain_mllm`")
    config = json.loads(path.read_text())["config"]
    return ToyWorld(world_config_from_dict(config["world"]), seed=config["world_seed"])


# ----------------------------------------------------------------------------- toy SAM2
def toy_sam_config(**changes) -> SamConfig:
    """The hiera-L config shrunk to 128 px, a tiny trunk and prompt width 128 (random weights
    unless `checkpoint`; `load_toy_sam` loads the pretrained toy weights)."""
    settings = {"image_size": 128, "overrides": TOY_OVERRIDES} | changes
    return SamConfig(**settings)


def load_toy_sam(
    device: str | torch.device = "cpu", directory: str | Path = TOY_SAM_DIR, **changes
) -> SamSegmenter:
    """The pretrained toy SAM2 (lenslib/toy/assets/sam/), the toy stand-in for Meta's SAM2.

    Raises if the asset is missing, or if it was trained for another architecture than the
    current `toy_sam_config()` (then rerun `python -m lenslib.toy.pretrain_sam`).
    """
    try:
        saved = read_sam_info(directory)["sam_config"]
    except FileNotFoundError as missing:
        raise FileNotFoundError(
            f"{missing} Create them with `python -m lenslib.toy.pretrain_sam --out "
            f"{directory}` (the toy SAM2 is pretrained on the toy world, ~20 min on a CPU)."
        ) from None
    toy = toy_sam_config()
    expected = {field: getattr(toy, field) for field in ARCHITECTURE_FIELDS}
    expected["overrides"] = list(expected["overrides"])
    if saved != expected:
        raise ValueError(
            f"{Path(directory) / SAM_INFO_FILE} was trained for sam_config {saved}, but "
            f"toy_sam_config() is now {expected}: rerun `python -m lenslib.toy.pretrain_sam "
            f"--out {directory}`"
        )
    return load_sam(directory, device, **changes)


# ----------------------------------------------------------------------------- both at once
def load_bases(
    device: str | torch.device = "cpu", version: int = 1
) -> tuple[Qwen2_5_VLForConditionalGeneration, ProcessorMixin, SamSegmenter]:
    """The pretrained toy base models LENS starts from: (mllm, processor, sam).

    version: the toy world they were pretrained on (1 = the default world, assets/mllm and
    assets/sam; 2 = world v2, assets/v2/). `toy_mllm_world(ASSET_DIRS[version][0])` gives the
    matching `ToyWorld`.
    """
    if version not in ASSET_DIRS:
        raise ValueError(f"no toy base models for world version {version}; have {list(ASSET_DIRS)}")
    mllm_dir, sam_dir = ASSET_DIRS[version]
    mllm, processor = load_toy_mllm(device, directory=mllm_dir)
    return mllm, processor, load_toy_sam(device, directory=sam_dir)


def random_bases(
    world_config: ToyWorldConfig | None = None, seed: int = 0, device: str | torch.device = "cpu"
) -> tuple[Qwen2_5_VLForConditionalGeneration, ProcessorMixin, SamSegmenter]:
    """Randomly initialised toy base models (for tests of the plumbing): (mllm, processor, sam).

    The tokenizer is trained on `world_config`'s corpus; the MLLM's weights come from `seed`
    (the global RNG untouched), SAM2's from the global torch RNG. The MLLM stays on the CPU
    (the caller moves it), SAM2 is built on `device`.
    """
    tokenizer = build_toy_tokenizer(toy_corpus(world_config))
    mllm, processor = build_toy_mllm(tokenizer, seed=seed)
    return mllm, processor, SamSegmenter(toy_sam_config(), device)
