"""SAM2 as LENS uses it: P_seg = pi_sam(Q_seg, I) (paper eq. 4, Fig. 2).

Two halves with two different lives:

* The IMAGE ENCODER (Hiera trunk + FPN neck) is frozen in both training stages. Its output
  depends only on the image, so it is computed once per image and kept in a `FeatureCache`
  (memory, optionally disk) that serves every epoch and all G rollouts of a GRPO group.
* The PROMPT ENCODER + MASK DECODER read the prompts. LENS's prompts are the connector's
  context tokens Q_seg (B, K, D), D = 256 (toy: 128): they are concatenated AFTER the prompt
  encoder's sparse output, exactly where box-corner or point embeddings would go, so SAM2's
  code is used unchanged.
  The dense prompt is `no_mask_embed`, what the prompt encoder gives when there is no mask.
  The decoder is trained in stage 2 (GRPO), so gradients flow from the mask logits into the
  context tokens and into the decoder, never into the image encoder.

Everything is built with the `sam2` package (`build_sam2` + hydra configs): the full model is the
authors' SAM 2.0 hiera-L (`sam2_hiera_l.yaml`, 1024 px); a toy model is the same config with
size overrides (`SamConfig.overrides`), so both run the same code. The frozen features and their
cache live in `lenslib.sam_features`, saving and loading weights in `lenslib.sam_io`.

A detail worth knowing: SAM2 keeps two 1x1 convs (`conv_s0`, `conv_s1`) inside the mask decoder
but applies them to the high-res features in `forward_image`, i.e. on the encoder side. The
authors train the whole decoder, these convs included. Caching their output would freeze them,
so `SamConfig.train_high_res_convs` chooses:
  False (default): cache the projected maps (as `SAM2ImagePredictor.set_image` stores them);
                   conv_s0/conv_s1 stay frozen; ~17 MB per 1024-px image (float32).
  True (authors):  cache the neck's raw high-res maps and apply conv_s0/conv_s1 in `decode`,
                   so they train; ~88 MB per 1024-px image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sam2  # importing sam2 initialises hydra with the package's config directory
import torch
import torch.nn.functional as F
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from sam2.build_sam import build_sam2
from sam2.modeling.sam2_base import SAM2Base
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import resize

from lenslib.data.images import check_rgb_image
from lenslib.sam_features import FeatureCache, SamFeatures, image_hash

# ImageNet statistics on 0-255 pixel values (the authors' pixel_mean / pixel_std).
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamConfig:
    """How to build SAM2 and where to keep its image features.

    config_name:  a config of the sam2 package: "sam2_hiera_l.yaml" (SAM 2.0, the authors'
                  choice), "sam2.1_hiera_l.yaml", or a path inside the package such as
                  "configs/sam2.1/sam2.1_hiera_t.yaml".
    checkpoint:   a SAM2 checkpoint file (`{"model": state_dict}`, as Meta ships them); None
                  builds random weights.
    image_size:   side of the square SAM input in pixels (1024 for the real model; multiple of 32).
    overrides:    extra hydra overrides ("++model.key=value").
    train_high_res_convs: see the module docstring (False: frozen, smaller cache; True: authors).
    cache_size:   how many images' features the in-memory cache keeps (least recently used out).
    cache_dir:    optional directory for a safetensors disk cache shared across runs.
    """

    config_name: str = "sam2_hiera_l.yaml"
    checkpoint: str | None = None
    image_size: int = 1024
    overrides: tuple[str, ...] = ()
    train_high_res_convs: bool = False
    cache_size: int = 64
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.image_size % 32 != 0:
            raise ValueError(
                f"SamConfig.image_size must be a positive multiple of 32, got {self.image_size}"
            )
        if self.cache_size < 1:
            raise ValueError(f"SamConfig.cache_size must be >= 1, got {self.cache_size}")

    def hydra_overrides(self) -> list[str]:
        """Overrides passed to `build_sam2`: the image size first, then `overrides`."""
        return [f"++model.image_size={self.image_size}", *self.overrides]


def resolve_config_name(name: str) -> str:
    """Find `name` among the sam2 package's configs; return the name hydra's `compose` expects."""
    if not name.endswith(".yaml"):
        name = f"{name}.yaml"
    root = Path(sam2.__file__).parent
    for candidate in (name, f"configs/sam2/{name}", f"configs/sam2.1/{name}"):
        if (root / candidate).is_file():
            return candidate
    known = sorted(p.name for p in root.glob("configs/sam2*/*.yaml"))
    raise FileNotFoundError(
        f"SamConfig.config_name {name!r} is not a config of the sam2 package; known: {known}"
    )


def build_sam(cfg: SamConfig, device: str | torch.device = "cpu") -> SAM2Base:
    """Build SAM2 with the package's own `build_sam2` (random weights unless cfg.checkpoint).

    `build_sam2` also switches on SAM2's "dynamic multimask" post-processing flag; `decode` makes
    that choice explicit instead (`stability_fallback`). The video-memory modules are deleted
    afterwards, as the authors do: images never use them.
    """
    if cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
        raise FileNotFoundError(
            f"SAM2 checkpoint not found (SamConfig.checkpoint): {cfg.checkpoint}"
        )
    if not GlobalHydra.instance().is_initialized():  # someone cleared hydra since `import sam2`
        initialize_config_module("sam2", version_base="1.2")
    model = build_sam2(
        resolve_config_name(cfg.config_name),
        ckpt_path=cfg.checkpoint,
        device=str(device),
        hydra_overrides_extra=cfg.hydra_overrides(),
    )
    del model.memory_attention, model.memory_encoder, model.maskmem_tpos_enc
    return model


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters in `module`."""
    return sum(p.numel() for p in module.parameters())


def parameter_counts(sam: SAM2Base) -> dict[str, int]:
    """Parameters of image encoder / prompt encoder / mask decoder / the rest, and the total."""
    counts = {
        "image_encoder": count_parameters(sam.image_encoder),
        "prompt_encoder": count_parameters(sam.sam_prompt_encoder),
        "mask_decoder": count_parameters(sam.sam_mask_decoder),
    }
    total = count_parameters(sam)
    counts["other"] = total - sum(counts.values())
    counts["total"] = total
    return counts


def preprocess_images(images: Sequence[np.ndarray], image_size: int) -> Tensor:
    """(H, W, 3) uint8 images -> (N, 3, S, S) float SAM input.

    Resize to S x S without keeping the aspect ratio (no padding), bilinear with antialiasing
    like `SAM2Transforms`, then normalise with ImageNet mean/std on 0-255 values. (The authors
    resize the uint8 image with PIL or cv2 first; the difference is below one grey level.)
    """
    batch = []
    for i, image in enumerate(images):
        image = check_rgb_image(image, f"images[{i}]")
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
        batch.append(
            resize(pixels, [image_size, image_size], InterpolationMode.BILINEAR, antialias=True)
        )
    x = torch.stack(batch)  # (N, 3, S, S), values 0..255
    mean = torch.tensor(IMAGENET_MEAN_255).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD_255).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass
class SamOutput:
    """What `decode` returns for B prompts (C = 1 mask per prompt, or 3 with multimask).

    logits:         (B, C, H, W) when all original sizes are equal, else a list of B tensors
                    (C, H_i, W_i); either way `logits[i]` is sample i at its original size.
                    Mask = logits > 0.
    iou_pred:       (B, C) SAM's predicted IoU of each returned mask.
    low_res_logits: (B, C, S/4, S/4) the decoder's output before upsampling.
    """

    logits: Tensor | list[Tensor]
    iou_pred: Tensor
    low_res_logits: Tensor


class SamSegmenter(nn.Module):
    """SAM2 with a frozen, cached image encoder and a trainable prompt encoder + mask decoder.

    Typical use (one image, G rollouts of a GRPO group, context tokens from the connector):
        features = sam.encode([image])                   # batch 1, cached
        out = sam.decode(features, context_tokens=q_seg, orig_sizes=[image.shape[:2]] * G)
    """

    def __init__(self, cfg: SamConfig, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        self.sam = build_sam(cfg, device)
        self.cache = FeatureCache(cfg.cache_size, cfg.cache_dir)
        self._fingerprint: str | None = None
        self.sam.requires_grad_(False)
        self.set_decoder_trainable(True)
        self.sam.image_encoder.eval()

    # ---- parameters and modes -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.sam.no_mem_embed.device

    @property
    def prompt_dim(self) -> int:
        """Width D of SAM's prompt tokens (256; toy 128): the connector must project to this."""
        return self.sam.sam_prompt_embed_dim

    def set_decoder_trainable(self, trainable: bool) -> None:
        """Stage 1 (eq. 5): False, all of SAM frozen. Stage 2 (eq. 12): True, the prompt encoder and
        mask decoder train. The image encoder (and no_mem_embed) is frozen in both."""
        self.sam.sam_prompt_encoder.requires_grad_(trainable)
        self.sam.sam_mask_decoder.requires_grad_(trainable)
        if not self.cfg.train_high_res_convs:  # their output is cached, so they cannot learn
            self.sam.sam_mask_decoder.conv_s0.requires_grad_(False)
            self.sam.sam_mask_decoder.conv_s1.requires_grad_(False)

    def direct_parameters(self) -> list[nn.Parameter]:
        """Weights SAM2's code reads without calling their module (`no_mem_embed`, the prompt
        encoder's and the mask decoder's token embeddings): under DeepSpeed ZeRO-3 they must be
        gathered by hand (`lenslib.model.zero3_gathered`)."""
        prompt, decoder = self.sam.sam_prompt_encoder, self.sam.sam_mask_decoder
        embeddings = [prompt.no_mask_embed, prompt.not_a_point_embed, *prompt.point_embeddings]
        embeddings += [decoder.iou_token, decoder.mask_tokens]
        if getattr(decoder, "pred_obj_scores", False):
            embeddings.append(decoder.obj_score_token)
        return [self.sam.no_mem_embed] + [e.weight for e in embeddings]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that currently require gradients (for the optimiser)."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        """See `parameter_counts`."""
        return parameter_counts(self.sam)

    def train(self, mode: bool = True) -> SamSegmenter:
        """Like nn.Module.train, but the frozen image encoder always stays in eval mode."""
        super().train(mode)
        self.sam.image_encoder.eval()
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module.load_state_dict, then forget cached features (the encoder may have changed)."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.reset_cache()
        return result

    # ---- frozen image encoder + cache -----------------------------------------------------
    def fingerprint(self) -> str:
        """Hash of the config and of every weight the cached features depend on (computed once)."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=12)
            digest.update(repr(self.cfg.hydra_overrides()).encode())
            digest.update(f"{self.cfg.config_name}|{self.cfg.train_high_res_convs}".encode())
            frozen = [self.sam.image_encoder, self.sam.no_mem_embed]
            if not self.cfg.train_high_res_convs:
                frozen += [self.sam.sam_mask_decoder.conv_s0, self.sam.sam_mask_decoder.conv_s1]
            for part in frozen:
                tensors = [part] if isinstance(part, Tensor) else part.state_dict().values()
                for t in tensors:
                    digest.update(str(t.dtype).encode())
                    digest.update(t.detach().float().cpu().contiguous().numpy())  # no copy
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def reset_cache(self) -> None:
        """Forget in-memory features and the fingerprint: call after changing encoder weights."""
        self.cache.clear_memory()
        self._fingerprint = None

    @torch.no_grad()
    def encode(self, images: Sequence[np.ndarray]) -> SamFeatures:
        """Features of N (H, W, 3) uint8 images, batch N; the encoder runs only for cache misses.

        Repeated images (within the call or across calls) are encoded once.
        """
        if len(images) == 0:
            raise ValueError("encode needs at least one image")
        keys = [f"{self.fingerprint()}/{image_hash(image)}" for image in images]
        found: dict[str, SamFeatures] = {}
        to_encode: dict[str, np.ndarray] = {}
        for key, image in zip(keys, images):
            if key in found or key in to_encode:
                self.cache.hits += 1  # a duplicate within this call: served by the same result
                continue
            features = self.cache.get(key, self.device)
            if features is None:
                to_encode[key] = image
            else:
                found[key] = features
        if to_encode:
            computed = self.run_image_encoder(list(to_encode.values()))
            for i, key in enumerate(to_encode):
                found[key] = computed.select(i)
                self.cache.put(key, found[key])
        return SamFeatures.cat([found[key] for key in keys])

    @torch.no_grad()
    def run_image_encoder(self, images: Sequence[np.ndarray]) -> SamFeatures:
        """No cache, no gradients: what `SAM2ImagePredictor.set_image` computes for N images."""
        return self.image_features(preprocess_images(images, self.cfg.image_size))

    def image_features(self, pixels: Tensor) -> SamFeatures:
        """(N, 3, S, S) preprocessed pixels -> features, differentiable (for pretraining SAM).

        forward_image (Hiera + FPN neck [+ conv_s0/conv_s1]) -> _prepare_backbone_features ->
        add no_mem_embed to the lowest-resolution level -> maps back to (N, C, h, w).
        """
        pixels = pixels.to(self.device, self.sam.no_mem_embed.dtype)
        if self.cfg.train_high_res_convs:
            backbone_out = self.sam.image_encoder(pixels)  # conv_s0/conv_s1 run later, in decode
        else:
            backbone_out = self.sam.forward_image(pixels)
        _, vision_feats, _, feat_sizes = self.sam._prepare_backbone_features(backbone_out)
        if self.sam.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.sam.no_mem_embed
        n = pixels.shape[0]
        # each level is flattened as (h*w, N, C); turn it back into (N, C, h, w)
        maps = [
            feat.permute(1, 2, 0).reshape(n, -1, h, w)
            for feat, (h, w) in zip(vision_feats, feat_sizes)
        ]
        return SamFeatures(image_embed=maps[-1], high_res=tuple(maps[:-1]))

    # ---- trainable prompt encoder + mask decoder ------------------------------------------
    def embed_prompts(
        self,
        batch: int,
        boxes: Tensor | None,
        orig_sizes: Sequence[tuple[int, int]],
        points: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """SAM2's prompt encoder: sparse (B, n, D) point/box tokens and dense (B, D, h, w).

        A box (x1, y1, x2, y2) in ORIGINAL image pixels enters as two corner points (labels 2,
        3), then come the clicked points (labels 1 positive, 0 negative), all scaled to SAM's
        S x S input frame, exactly as `SAM2ImagePredictor` does; the prompt encoder appends one
        padding point, so n = 2 (box) + N (points) + 1, or 0 without any. Without a mask prompt
        the dense embedding is `no_mask_embed` broadcast over the image grid.
        """
        coords, labels = [], []
        if boxes is not None:
            coords.append(boxes.float().reshape(-1, 2, 2))  # (B, 2, 2) corners as (x, y)
            labels.append(torch.tensor([[2, 3]], dtype=torch.int).repeat(batch, 1))
        if points is not None:
            coords.append(points[0].float())  # (B, N, 2) as (x, y)
            labels.append(points[1].int().cpu())
        prompt = None
        if coords:
            hw = torch.tensor(orig_sizes, dtype=torch.float32)  # (B, 2)
            scale = (self.cfg.image_size / hw.flip(1)).to(self.device)  # (B, 2): S / W, S / H
            xy = torch.cat([c.to(self.device) for c in coords], dim=1) * scale[:, None, :]
            prompt = (xy, torch.cat(labels, dim=1).to(self.device))
        sparse, dense = self.sam.sam_prompt_encoder(points=prompt, boxes=None, masks=None)
        # with no prompt at all the prompt encoder answers for batch 1: broadcast to B
        return sparse.expand(batch, -1, -1), dense.expand(batch, -1, -1, -1)

    def decode(
        self,
        features: SamFeatures,
        context_tokens: Tensor | None = None,
        boxes: Tensor | None = None,
        orig_sizes: Sequence[tuple[int, int]] | None = None,
        multimask: bool = False,
        stability_fallback: bool = False,
        points: tuple[Tensor, Tensor] | None = None,
    ) -> SamOutput:
        """Masks for B prompts; gradients reach `context_tokens` and the decoder.

        features:       batch 1 (one image shared by all B prompts, e.g. a GRPO group: the
                        decoder repeats it internally, no copy here) or batch B.
        context_tokens: (B, K, D) LENS's Q_seg, appended after the box tokens (if any).
        boxes:          (B, 4) x1, y1, x2, y2 in original image pixels, or None (LENS default).
        orig_sizes:     B (H, W) pairs: logits are upsampled (bilinear) to these sizes.
        multimask:      False: mask token 0 (authors, training and eval); True: the 3 masks.
        stability_fallback: SAM2's "dynamic multimask": where token 0's mask has stability
                        score < 0.98, return the multimask output with the best predicted IoU
                        (the authors' SAM2 build does this at eval). Single-mask mode only.
        points:         optional clicks: coords (B, N, 2) as (x, y) in original image pixels
                        and labels (B, N), 1 = positive, 0 = negative (SAM's point prompts).
        """
        if multimask and stability_fallback:
            raise ValueError("choose multimask=True or stability_fallback=True, not both")
        all_masks, all_iou = self.predict_all_masks(
            features, context_tokens, boxes, orig_sizes, points
        )
        if multimask:
            low_res, iou = all_masks[:, 1:], all_iou[:, 1:]
        elif stability_fallback:
            decoder = self.sam.sam_mask_decoder
            low_res, iou = decoder._dynamic_multimask_via_stability(all_masks, all_iou)
        else:
            low_res, iou = all_masks[:, :1], all_iou[:, :1]
        return SamOutput(upsample_logits(low_res, orig_sizes), iou, low_res)

    def predict_all_masks(
        self,
        features: SamFeatures,
        context_tokens: Tensor | None = None,
        boxes: Tensor | None = None,
        orig_sizes: Sequence[tuple[int, int]] | None = None,
        points: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The decoder's raw output for all 4 mask tokens (arguments as in `decode`).

        Returns low-resolution logits (B, 4, S/4, S/4) and predicted IoUs (B, 4): token 0 is
        the single-mask output, tokens 1-3 the multimask outputs. `decode` picks from these;
        SAM-style pretraining supervises all of them.
        """
        batch = self._check_decode_inputs(features, context_tokens, boxes, orig_sizes, points)
        sparse, dense = self.embed_prompts(batch, boxes, orig_sizes, points)
        decoder = self.sam.sam_mask_decoder
        # everything in the decoder's dtype: the prompt encoder answers float32 sparse prompts
        # and positional encodings even in a bf16 model, and cached features may predate a
        # cast (DeepSpeed's bf16)
        dtype = decoder.iou_token.weight.dtype
        sparse, dense = sparse.to(dtype), dense.to(dtype)
        if context_tokens is not None:  # LENS: the context tokens are just more sparse prompts
            sparse = torch.cat([sparse, context_tokens.to(dtype)], dim=1)  # (B, n+K, D)
        features = SamFeatures(
            features.image_embed.to(dtype), tuple(level.to(dtype) for level in features.high_res)
        )
        high_res = list(features.high_res)
        if self.cfg.train_high_res_convs and high_res:
            high_res = [decoder.conv_s0(high_res[0]), decoder.conv_s1(high_res[1])]
        all_masks, all_iou, _, _ = decoder.predict_masks(
            image_embeddings=features.image_embed,
            image_pe=self.sam.sam_prompt_encoder.get_dense_pe().to(dtype),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            repeat_image=len(features) == 1,
            high_res_features=high_res or None,
        )
        return all_masks, all_iou

    def _check_decode_inputs(
        self,
        features: SamFeatures,
        context_tokens: Tensor | None,
        boxes: Tensor | None,
        orig_sizes: Sequence[tuple[int, int]] | None,
        points: tuple[Tensor, Tensor] | None = None,
    ) -> int:
        """Validate shapes; return the number of prompts B."""
        d = self.prompt_dim
        if context_tokens is None and boxes is None and points is None:
            raise ValueError(
                f"SAM needs a prompt: pass context_tokens (B, K, {d}), boxes (B, 4) and/or points"
            )
        if points is not None and (
            len(points) != 2
            or points[0].ndim != 3
            or points[0].shape[2] != 2
            or tuple(points[1].shape) != tuple(points[0].shape[:2])
        ):
            raise ValueError(
                "points must be (coords (B, N, 2), labels (B, N)), got shapes "
                f"{[tuple(t.shape) for t in points]}"
            )
        if context_tokens is not None and (
            context_tokens.ndim != 3 or context_tokens.shape[2] != self.prompt_dim
        ):
            raise ValueError(
                f"context_tokens must be (B, K, {self.prompt_dim}), got {tuple(context_tokens.shape)}"
            )
        if boxes is not None and (boxes.ndim != 2 or boxes.shape[1] != 4):
            raise ValueError(f"boxes must be (B, 4), got {tuple(boxes.shape)}")
        point_coords = points[0] if points is not None else None
        sizes = {t.shape[0] for t in (context_tokens, boxes, point_coords) if t is not None}
        if len(sizes) != 1:
            raise ValueError(
                f"context_tokens, boxes and points disagree on the batch size: {sizes}"
            )
        batch = sizes.pop()
        if orig_sizes is None or len(orig_sizes) != batch:
            raise ValueError(
                f"orig_sizes must give one (H, W) per prompt ({batch}), got {orig_sizes}"
            )
        if len(features) not in (1, batch):
            raise ValueError(
                f"features hold {len(features)} images for {batch} prompts: pass one image "
                "(shared by all prompts) or one per prompt (SamFeatures.cat)"
            )
        return batch

    def forward(
        self,
        images: Sequence[np.ndarray],
        context_tokens: Tensor | None = None,
        boxes: Tensor | None = None,
        multimask: bool = False,
        stability_fallback: bool = False,
    ) -> SamOutput:
        """encode + decode: one prompt per image, or many prompts for a single image."""
        features = self.encode(images)
        prompts = context_tokens if context_tokens is not None else boxes
        batch = prompts.shape[0] if prompts is not None else len(images)
        sizes = [image.shape[:2] for image in images]
        orig_sizes = sizes * batch if len(images) == 1 else sizes
        return self.decode(
            features, context_tokens, boxes, orig_sizes, multimask, stability_fallback
        )


def upsample_logits(
    low_res: Tensor, orig_sizes: Sequence[tuple[int, int]]
) -> Tensor | list[Tensor]:
    """Bilinear upsampling of (B, C, h, w) logits to each sample's original (H, W).

    One (B, C, H, W) tensor when all sizes are equal, else a list of (C, H_i, W_i).
    """
    sizes = [tuple(int(v) for v in size) for size in orig_sizes]
    if len(set(sizes)) == 1:
        return F.interpolate(low_res, sizes[0], mode="bilinear", align_corners=False)
    return [
        F.interpolate(low_res[i : i + 1], size, mode="bilinear", align_corners=False)[0]
        for i, size in enumerate(sizes)
    ]
