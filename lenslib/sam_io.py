"""Saving and loading SAM2 weights: a safetensors file plus a json that can rebuild the model.

`save_sam` writes <directory>/model.safetensors and <directory>/sam.json (the SamConfig's
architecture fields and whatever the caller wants recorded); `load_sam` rebuilds the
`SamSegmenter` from them. Used for SAM2 models trained here (e.g. the toy SAM2); Meta's own
checkpoints load through `SamConfig.checkpoint` instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lenslib.sam import SamConfig, SamSegmenter

WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "sam.json"
ARCHITECTURE_FIELDS = ("config_name", "image_size", "overrides")  # what the weights depend on


def save_sam(
    seg: SamSegmenter, directory: str | Path, info: dict, dtype: torch.dtype = torch.float16
) -> Path:
    """Write <directory>/model.safetensors (weights cast to `dtype`) and <directory>/sam.json.

    The json holds the architecture fields of the SamConfig under "sam_config" (so `load_sam`
    can rebuild the model) plus everything in `info` (e.g. steps, wall time, val IoU).
    float16 halves the file size; `load_sam` turns the weights back into float32.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: (t.to(dtype) if t.is_floating_point() else t).detach().cpu().contiguous()
        for name, t in seg.sam.state_dict().items()
    }
    save_file(tensors, str(directory / WEIGHTS_FILE))
    config = {field: getattr(seg.cfg, field) for field in ARCHITECTURE_FIELDS}
    config["overrides"] = list(config["overrides"])
    record = {"sam_config": config, "weights_dtype": str(dtype).removeprefix("torch."), **info}
    (directory / INFO_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return directory


def read_sam_info(directory: str | Path) -> dict:
    """The json written by `save_sam`; a clear error if the directory or its files are missing."""
    directory = Path(directory)
    missing = [name for name in (WEIGHTS_FILE, INFO_FILE) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"SAM weights not found: {', '.join(str(directory / m) for m in missing)} missing."
        )
    info = json.loads((directory / INFO_FILE).read_text())
    if not isinstance(info.get("sam_config"), dict):
        raise ValueError(f"{directory / INFO_FILE}: no 'sam_config' object")
    return info


def load_sam(directory: str | Path, device: str | torch.device = "cpu", **changes) -> SamSegmenter:
    """Rebuild the SamConfig saved by `save_sam` and load its weights (as float32).

    `changes` set the non-architecture SamConfig fields (cache_size, cache_dir,
    train_high_res_convs).
    """
    directory = Path(directory)
    saved = read_sam_info(directory)["sam_config"]
    unknown = set(saved) - set(ARCHITECTURE_FIELDS)
    if unknown:
        raise ValueError(f"{directory / INFO_FILE}: unknown sam_config fields {sorted(unknown)}")
    architecture = set(changes) & set(ARCHITECTURE_FIELDS)
    if architecture:
        raise ValueError(f"load_sam cannot change architecture fields {sorted(architecture)}")
    cfg = SamConfig(**(saved | {"overrides": tuple(saved["overrides"])} | changes))
    seg = SamSegmenter(cfg, device)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    state = {name: t.float() if t.is_floating_point() else t for name, t in tensors.items()}
    seg.sam.load_state_dict(state)  # strict: a missing or extra weight is an error
    seg.reset_cache()
    return seg
