"""The authors' released LENS checkpoints (OuyBin/LENS, OuyBin/LENS_ReasonSeg, ...) as a LensModel.

A released checkpoint is ONE transformers folder: the Qwen2.5-VL weights plus the LENS parts,
saved side by side in the same safetensors shards:

    learnable_query        (1, M, C)      the M = 64 context queries (eq. 2)
    connector.pos_embed    (1, M, C)      the "ViT" connector (eq. 3): position embedding
    connector.blocks.N.*                  ... and 4 pre-LayerNorm transformer blocks
    conv_1d.{weight,bias}  (C, C, M)      pools the M tokens into ONE (authors' "pooled" output)
    proj_to_sam.{0,2}.*                   Linear(C, C) - GELU - Linear(C, 256)
    sam.*                                 SAM2 hiera-L, whose decoder stage 2 trained (eq. 12)

`load_authors_checkpoint` loads the Qwen part with `lenslib.mllm.load_mllm` (transformers
ignores the extra keys; `check_mllm_complete` makes sure it did not skip any of Qwen's) and maps
the rest onto lenslib's modules with `map_authors_state_dict`:

    learnable_query      -> queries.queries        (M, C): the leading 1 dropped
    connector.pos_embed  -> connector.pos_embed
    connector.blocks.N.  -> connector.blocks.N.    (see BLOCK_KEYS)
    conv_1d.             -> connector.pool.
    proj_to_sam.0/.2.    -> connector.proj.0/.2.
    sam.                 -> sam.sam.               (SamSegmenter keeps SAM2Base as `.sam`)

The block names are those of the authors' code (hustvl/LENS, src/open_r1/trainer/qwen2_vl.py,
`Qwen2VLVisionConnectorSimple` built from `Qwen2VLVisionBlockSimple`), which are timm-style:
`norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2`. ASSUMPTION TO VERIFY against a real
checkpoint file: they were read from the code, not from a downloaded checkpoint (none can be
downloaded here). The same code fixes three details that the key names cannot show and that
lenslib's default `Connector` does differently, so `authors_connector` matches them:

    attention heads     16 (the class default; lenslib's default is C / 64 = 32 for C = 2048)
    MLP activation      QuickGELU, x * sigmoid(1.702 x) (lenslib's default: exact GELU)
    LayerNorm epsilon   1e-6 (torch's default: 1e-5)

The authors' blocks use no rotary embedding (their "Simple" attention ignores it) and attend
bidirectionally, as `nn.TransformerEncoderLayer` does.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor
from transformers import PreTrainedModel

from lenslib.context import Connector, MropeMode
from lenslib.mllm import load_mllm
from lenslib.model import LensConfig, LensModel
from lenslib.sam import SamConfig, SamSegmenter

AUTHORS_NUM_HEADS = 16  # Qwen2VLVisionConnectorSimple's default, used by LENS
AUTHORS_NORM_EPS = 1e-6
QWEN_PREFIXES = ("model.", "visual.", "lm_head.")  # the MLLM's own weights: transformers loads them

# authors' name inside connector.blocks.N -> nn.TransformerEncoderLayer's name (norm_first).
# qkv is ONE Linear(C, 3C) whose output rows are q, k, v in that order: exactly the layout of
# nn.MultiheadAttention's in_proj_weight, so it maps without reshuffling.
BLOCK_KEYS = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.qkv.weight": "self_attn.in_proj_weight",
    "attn.qkv.bias": "self_attn.in_proj_bias",
    "attn.proj.weight": "self_attn.out_proj.weight",
    "attn.proj.bias": "self_attn.out_proj.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "linear1.weight",
    "mlp.fc1.bias": "linear1.bias",
    "mlp.fc2.weight": "linear2.weight",
    "mlp.fc2.bias": "linear2.bias",
}
# authors' top-level names -> lenslib's (learnable_query and the blocks are handled apart).
FIXED_KEYS = {
    "connector.pos_embed": "connector.pos_embed",
    "conv_1d.weight": "connector.pool.weight",
    "conv_1d.bias": "connector.pool.bias",
    "proj_to_sam.0.weight": "connector.proj.0.weight",
    "proj_to_sam.0.bias": "connector.proj.0.bias",
    "proj_to_sam.2.weight": "connector.proj.2.weight",
    "proj_to_sam.2.bias": "connector.proj.2.bias",
}
QUERY_KEY = "learnable_query"
BLOCK_PATTERN = re.compile(r"connector\.blocks\.(\d+)\.(.+)")
LENS_PARTS = ("queries", "connector", "sam")


# ----------------------------------------------------------------------------- key mapping
def map_authors_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename the authors' LENS keys to lenslib's (`LensModel.lens_state_dict` names).

    Keys of the MLLM itself (`model.`, `visual.`, `lm_head.`) are skipped: transformers loads
    them. Every other key must be one of the module docstring's table; a key that is not, a
    missing one, or a `learnable_query` / `pos_embed` / `conv_1d` whose M or C disagree raises a
    ValueError that names the keys. Tensors are not copied (learnable_query is a view).
    """
    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    blocks: dict[int, set[str]] = {}
    for key, tensor in state_dict.items():
        if key.startswith(QWEN_PREFIXES):
            continue
        if key == QUERY_KEY:
            if tensor.ndim != 3 or tensor.shape[0] != 1:
                raise ValueError(f"{QUERY_KEY} must be (1, M, C), got {tuple(tensor.shape)}")
            mapped["queries.queries"] = tensor[0]  # (M, C)
        elif key.startswith("sam."):
            mapped["sam." + key] = tensor  # sam.X -> sam.sam.X
        elif key in FIXED_KEYS:
            mapped[FIXED_KEYS[key]] = tensor
        elif (match := BLOCK_PATTERN.fullmatch(key)) and match.group(2) in BLOCK_KEYS:
            index, name = int(match.group(1)), match.group(2)
            blocks.setdefault(index, set()).add(name)
            mapped[f"connector.blocks.{index}.{BLOCK_KEYS[name]}"] = tensor
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(
            f"unexpected keys in the authors' checkpoint: {sorted(unexpected)}; known: "
            f"{QUERY_KEY}, {sorted(FIXED_KEYS)}, connector.blocks.N.{{{', '.join(BLOCK_KEYS)}}}, "
            "sam.*"
        )
    missing = [QUERY_KEY] if "queries.queries" not in mapped else []
    missing += [key for key, lens_key in FIXED_KEYS.items() if lens_key not in mapped]
    if not blocks:
        missing.append("connector.blocks.0.* (lenslib has no connector without blocks)")
    for index in range(max(blocks, default=-1) + 1):
        names = blocks.get(index, set())
        missing += [f"connector.blocks.{index}.{n}" for n in BLOCK_KEYS if n not in names]
    if missing:
        raise ValueError(f"missing keys in the authors' checkpoint: {missing}")
    _check_query_axis(mapped)
    return mapped


def _check_query_axis(mapped: dict[str, Tensor]) -> None:
    """learnable_query (M, C), pos_embed (1, M, C) and conv_1d (C, C, M) must agree on M and C."""
    m, c = mapped["queries.queries"].shape
    expected = {
        "connector.pos_embed": (1, m, c),
        "connector.pool.weight": (c, c, m),
        "connector.pool.bias": (c,),
    }
    for lens_key, shape in expected.items():
        if tuple(mapped[lens_key].shape) != shape:
            raise ValueError(
                f"{authors_key(lens_key)} has shape {tuple(mapped[lens_key].shape)}, but "
                f"{QUERY_KEY} (1, {m}, {c}) implies {shape}"
            )


def authors_key(lens_key: str) -> str:
    """Inverse of the renaming, for error messages: lenslib key -> the authors' key."""
    if lens_key == "queries.queries":
        return QUERY_KEY
    if lens_key.startswith("sam.sam."):
        return lens_key.removeprefix("sam.")
    inverse = {v: k for k, v in FIXED_KEYS.items()}
    if lens_key in inverse:
        return inverse[lens_key]
    match = BLOCK_PATTERN.fullmatch(lens_key)
    block_inverse = {v: k for k, v in BLOCK_KEYS.items()}
    if match and match.group(2) in block_inverse:
        return f"connector.blocks.{match.group(1)}.{block_inverse[match.group(2)]}"
    return lens_key


# ----------------------------------------------------------------------------- the connector
def authors_connector(hidden_size: int, num_queries: int, depth: int, prompt_dim: int) -> Connector:
    """lenslib's "vit" + "pooled" Connector with the authors' heads, activation and epsilon."""
    if hidden_size % AUTHORS_NUM_HEADS:
        raise ValueError(f"hidden size {hidden_size} is not divisible by {AUTHORS_NUM_HEADS} heads")
    return Connector(
        hidden_size,
        num_queries=num_queries,
        kind="vit",
        output="pooled",
        depth=depth,
        num_heads=AUTHORS_NUM_HEADS,
        prompt_dim=prompt_dim,
        activation="quick_gelu",
        norm_eps=AUTHORS_NORM_EPS,
    )


# ----------------------------------------------------------------------------- reading
def read_authors_extras(path: str | Path) -> dict[str, Tensor]:
    """Every non-Qwen tensor of the folder's safetensors files (the LENS parts and SAM).

    Only those tensors are read (`safe_open`), so the ~7 GB of Qwen weights are not loaded twice.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"authors' checkpoint folder not found: {path}")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {path}: is it a LENS checkpoint?")
    extras: dict[str, Tensor] = {}
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.startswith(QWEN_PREFIXES):
                    continue
                if key in extras:
                    raise ValueError(f"key {key} is in both {where[key].name} and {file.name}")
                extras[key], where[key] = f.get_tensor(key), file
    if QUERY_KEY not in extras:
        raise ValueError(
            f"{path}: no '{QUERY_KEY}' in {[f.name for f in files]}: a plain Qwen2.5-VL "
            "checkpoint, not a LENS one?"
        )
    return extras


def count_qwen_numbers(path: str | Path, tied_embeddings: bool) -> int:
    """How many numbers the folder's MLLM tensors hold (shapes only, nothing is read).

    A tied `lm_head.weight` saved anyway is not counted: the model holds it once.
    """
    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.startswith(QWEN_PREFIXES) and not (
                    tied_embeddings and key == "lm_head.weight"
                ):
                    total += math.prod(f.get_slice(key).get_shape())
    return total


def check_mllm_complete(path: str | Path, mllm: PreTrainedModel) -> None:
    """Raise unless the loaded MLLM holds exactly as many numbers as the checkpoint's MLLM tensors.

    transformers only WARNS when a checkpoint lacks weights the config's class needs, and
    initialises them at random. That is what happens if config.json names the wrong class: the
    authors' config class derives from Qwen2VLConfig, so a Qwen2.5-VL checkpoint's config.json
    may say "qwen2_vl" (to verify on a real one).
    """
    in_files = count_qwen_numbers(path, mllm.config.tie_word_embeddings)
    in_model = sum(p.numel() for p in mllm.parameters())
    if in_files != in_model:
        raise ValueError(
            f"{path}: the checkpoint's MLLM tensors hold {in_files:,} numbers, but the "
            f"{type(mllm).__name__} built from config.json (model_type "
            f"{mllm.config.model_type!r}) has {in_model:,}: some weights were not loaded and "
            "are random. Does config.json name the right model_type?"
        )


# ----------------------------------------------------------------------------- loading
def load_authors_weights(model: LensModel, mapped: dict[str, Tensor]) -> None:
    """Copy mapped tensors (from `map_authors_state_dict`) into the model's queries, connector
    and (when the checkpoint has `sam.*` keys) SAM, in each parameter's own dtype.

    Every lenslib tensor of those parts must be given exactly once with its shape; errors name
    the authors' keys.
    """
    problems: list[str] = []
    states: dict[str, dict[str, Tensor]] = {}
    for part in LENS_PARTS:
        prefix = part + "."
        given = {k[len(prefix) :]: v for k, v in mapped.items() if k.startswith(prefix)}
        if part == "sam" and not given:
            continue  # SAM keeps the weights of sam_cfg
        target = getattr(model, part).state_dict()
        problems += [f"missing {authors_key(prefix + k)}" for k in target if k not in given]
        problems += [f"unexpected {authors_key(prefix + k)}" for k in given if k not in target]
        problems += [
            f"{authors_key(prefix + k)} has shape {tuple(v.shape)}, lenslib's "
            f"{prefix + k} needs {tuple(target[k].shape)}"
            for k, v in given.items()
            if k in target and v.shape != target[k].shape
        ]
        states[part] = {k: v.to(target[k].dtype) for k, v in given.items() if k in target}
    if problems:
        raise ValueError("the authors' weights do not fit this LensModel: " + "; ".join(problems))
    for part, state in states.items():  # nothing is loaded unless everything fits
        getattr(model, part).load_state_dict(state, strict=True)


def load_authors_checkpoint(
    path: str | Path,
    sam_cfg: SamConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    mrope: MropeMode = "authors",
    stability_fallback: bool = True,
) -> LensModel:
    """A released LENS checkpoint folder -> LensModel ("vit" connector, "pooled", M queries).

    path:     the folder (config.json, processor files, safetensors shards) as on the hub.
    sam_cfg:  builds SAM2 (the authors: `SamConfig()`, SAM 2.0 hiera-L at 1024 px). The
              checkpoint's own `sam.*` weights replace sam_cfg's when it has them (the released
              ones do: their SAM decoder was trained in stage 2); else sam_cfg.checkpoint's stay.
    dtype:    the MLLM's dtype; queries, connector and SAM stay float32, as in `LensModel`.
    mrope:    "authors" by default because these weights were trained with the authors' 1-D
              positions for the pass with the queries (as their code does); "correct" is the paper.
    stability_fallback: SAM2's dynamic multimask at eval, as the authors' SAM build does.

    Caveat: `LensConfig` does not record the connector's heads, activation and epsilon, so
    `save_pretrained` + `LensModel.from_pretrained` of the result rebuilds lenslib's default
    connector (different heads / GELU). Reload with this function instead.
    """
    mapped = map_authors_state_dict(read_authors_extras(path))
    num_queries, hidden = mapped["queries.queries"].shape
    depth = len({k.split(".")[2] for k in mapped if k.startswith("connector.blocks.")})
    mllm, processor = load_mllm(str(path), dtype=dtype, device=device)
    check_mllm_complete(path, mllm)
    if mllm.config.text_config.hidden_size != hidden:
        raise ValueError(
            f"{path}: {QUERY_KEY} is {hidden} wide, the MLLM's hidden size is "
            f"{mllm.config.text_config.hidden_size}"
        )
    has_sam = any(k.startswith("sam.") for k in mapped)
    if not has_sam and sam_cfg.checkpoint is None:
        warnings.warn(
            f"{path} has no sam.* weights and sam_cfg.checkpoint is None: SAM2 is random",
            stacklevel=2,
        )
    sam = SamSegmenter(sam_cfg, device)
    cfg = LensConfig(
        num_queries=num_queries,
        connector_kind="vit",
        connector_output="pooled",
        connector_depth=depth,
        connector_heads=AUTHORS_NUM_HEADS,
        connector_activation="quick_gelu",
        connector_norm_eps=AUTHORS_NORM_EPS,
        mrope=mrope,
        box_prompt=False,
        stability_fallback=stability_fallback,
    )
    model = LensModel(mllm, processor, sam, cfg)  # its connector is `authors_connector`'s
    load_authors_weights(model, mapped)
    return model.eval()
