"""SAM2's frozen image features and their cache (the encoder half of `lenslib.sam`).

The image encoder (Hiera trunk + FPN neck) is frozen in both LENS training stages, so its output
depends only on the image: `SamFeatures` holds it for N images and `FeatureCache` keeps it per
image (an in-memory LRU dict, optionally a safetensors copy on disk) under a key made of the
model's fingerprint and `image_hash(image)`. It serves every epoch and all G rollouts of a
GRPO group.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor


def image_hash(image: np.ndarray) -> str:
    """Content hash of an image (its pixels and shape): the per-image half of a cache key."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


@dataclass
class SamFeatures:
    """Frozen image features of N images, as `SAM2ImagePredictor.set_image` computes them.

    image_embed: (N, D, S/16, S/16) lowest-resolution map (D = prompt width), `no_mem_embed` already added.
    high_res:    ((N, C0, S/4, S/4), (N, C1, S/8, S/8)); C0, C1 = 32, 64 after the decoder's
                 conv_s0/conv_s1 (toy: 16, 32), or D, D (raw neck output) when
                 train_high_res_convs.
                 Empty for a config without high-res features.
    """

    image_embed: Tensor
    high_res: tuple[Tensor, ...]

    def __len__(self) -> int:
        return self.image_embed.shape[0]

    def select(self, index: int) -> SamFeatures:
        """Features of one image (batch 1), copied so they do not pin the whole batch in memory."""
        return SamFeatures(
            image_embed=self.image_embed[index : index + 1].clone(),
            high_res=tuple(level[index : index + 1].clone() for level in self.high_res),
        )

    @staticmethod
    def cat(items: Sequence[SamFeatures]) -> SamFeatures:
        """Stack per-image features along the batch axis (one per prompt, or one shared)."""
        if len(items) == 1:
            return items[0]
        return SamFeatures(
            image_embed=torch.cat([f.image_embed for f in items]),
            high_res=tuple(torch.cat(level) for level in zip(*(f.high_res for f in items))),
        )

    def to_tensors(self) -> dict[str, Tensor]:
        """Flat name -> tensor dict for safetensors."""
        tensors = {"image_embed": self.image_embed}
        tensors.update({f"high_res_{i}": level for i, level in enumerate(self.high_res)})
        return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}

    @staticmethod
    def from_tensors(tensors: dict[str, Tensor], device: torch.device) -> SamFeatures:
        """Inverse of `to_tensors`."""
        levels = sorted(name for name in tensors if name.startswith("high_res_"))
        return SamFeatures(
            image_embed=tensors["image_embed"].to(device),
            high_res=tuple(tensors[name].to(device) for name in levels),
        )


class FeatureCache:
    """Per-image features: an in-memory LRU dict (at most `max_items`) and an optional disk copy.

    Keys are "<model fingerprint>/<image hash>", so features of another model or another image
    are never served. Disk files: <cache_dir>/<fingerprint>/<image hash>.safetensors.
    `hits` counts lookups served from memory or disk; `misses` counts lookups that found
    nothing (the caller then runs the encoder and `put`s the result).
    """

    def __init__(self, max_items: int, cache_dir: str | Path | None = None) -> None:
        self.max_items = max_items
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.memory: OrderedDict[str, SamFeatures] = OrderedDict()
        self.hits = 0
        self.disk_hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.safetensors"

    def get(self, key: str, device: torch.device) -> SamFeatures | None:
        """Features for `key` from memory, else from disk (then kept in memory), else None."""
        if key in self.memory:
            self.memory.move_to_end(key)
            self.hits += 1
            return self.memory[key]
        if self.cache_dir is not None and self._path(key).is_file():
            features = SamFeatures.from_tensors(load_file(self._path(key)), device)
            self._remember(key, features)
            self.hits += 1
            self.disk_hits += 1
            return features
        self.misses += 1
        return None

    def put(self, key: str, features: SamFeatures) -> None:
        """Keep `features` in memory (evicting the least recently used) and on disk if enabled."""
        self._remember(key, features)
        if self.cache_dir is not None:
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            # atomic: written to a temporary file in the same folder, then renamed over the
            # final name, so a killed process or a second process (several ranks share one
            # cache) never leaves or reads a half-written file
            fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            try:
                save_file(features.to_tensors(), tmp)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def _remember(self, key: str, features: SamFeatures) -> None:
        self.memory[key] = features
        self.memory.move_to_end(key)
        while len(self.memory) > self.max_items:
            self.memory.popitem(last=False)

    def clear_memory(self) -> None:
        """Forget the in-memory features (disk files stay)."""
        self.memory.clear()

    def stats(self) -> dict[str, int]:
        """Counters and size, e.g. for logging."""
        return {
            "hits": self.hits,
            "disk_hits": self.disk_hits,
            "misses": self.misses,
            "in_memory": len(self.memory),
        }
