"""Peak GPU memory per process of a LENS training launch, estimated from the model's sizes.

    .venv/bin/python benchmarks/full_scale_memory.py --preset full --stage rl --num-gpus 8 --zero 2
    .venv/bin/python benchmarks/full_scale_memory.py --preset full --stage align --zero 0 --no-gradient-checkpointing
    .venv/bin/python benchmarks/full_scale_memory.py --preset toy --stage rl --measure-toy

Nothing is loaded or downloaded: the real Qwen2.5-VL-3B is built from its published sizes on the
"meta" device and SAM2 hiera-L from the sam2 package's config under `init_empty_weights`, which
gives exact parameter counts; every other number is a formula of the sizes, printed next to it.
The toy preset reads its sizes from the built toy model instead.

What each row counts (bytes per GPU; Psi = parameters, Psi_t = trainable ones, N = GPUs):

  weights / gradients / AdamW states, as lenslib keeps them:
    DDP (--zero 0): the MLLM is loaded in bf16 and torch's AdamW keeps its two moments in the
      parameter's dtype, so the MLLM costs 2 (weight) + 2 (grad) + 4 (moments) bytes per trainable
      weight, no fp32 master copy; SAM and the context module stay fp32 (4 + 4 + 8). DDP's reducer
      keeps a flat copy of every gradient in its buckets (one more gradient).
    DeepSpeed bf16 (--zero 2 / 3): every weight bf16 (lenslib casts them), bf16 gradients, and
      fp32 master weights + two fp32 moments, K = 12 bytes per trainable weight, as in the ZeRO
      paper (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
      Parameter Models"): ZeRO-2 divides gradients and optimizer states by N, ZeRO-3 also the
      weights (frozen ones too). At the step the gradient partition is copied to fp32 (4 Psi_t / N).
  activations of the language model, per token per decoder layer (h hidden, i MLP width, e bytes
    of an activation: 2 in bf16), counted tensor by tensor as Korthikanti et al. 2022 ("Reducing
    Activation Recomputation in Large Transformer Models") count theirs (34 h + 5 a s for a GPT
    block with dropout and unfused attention), for Qwen2's block as transformers runs it:
      8 h                 two RMSNorms, each saving its input upcast to fp32 (4 h bytes)
      e * 4 h             attention: q, k, v, output (sdpa's saved tensors; GQA's k and v are
                          repeated to all heads because lenslib always passes a padding mask;
                          the output's transpose is o_proj's input, no copy)
      e * 3 i             SwiGLU MLP: gate (silu's input), silu(gate), up
      e * (4 h + i)       stage 2 only, the inputs the trainable weights need: each norm's
                          normalised input and its output (= the next linear's input), and
                          down_proj's input
    stage 2 (weights train):  8 h + e (8 h + 4 i)   = 134 KiB per token per layer at 3B
    stage 1 (weights frozen, only the queries' gradient flows back): 8 h + e (4 h + 3 i)
                                                    =  96.5 KiB per token per layer at 3B
    (checked tensor by tensor with saved-tensor hooks on the toy model: exact to the byte.)
    Flash / memory-efficient sdpa keeps no (s x s) attention matrix, so there is no 5 a s term,
    but every layer keeps its own copy of the (B, 1, S, S) attention mask in the model's dtype
    (as measured: S e bytes per token per layer), and the rotary tables are kept once.
    With full gradient checkpointing (one checkpoint per layer): e h per token per layer (the
    layer inputs) + one layer's activations recomputed during the backward pass.
  vision tower (stage 2 only; frozen with a no-grad input in stage 1): the same formula with the
    vision width, on (image tokens x merge^2) patches, once per ROW: lenslib repeats each prompt's
    image for its G rollouts (`mllm.completion_batch`).
  logits: (B, T, V) over the T completion tokens only (`logits_to_keep`), bf16, and in stage 2
    their gradient; `grpo.token_logprobs` works on pieces of `grpo.TOKEN_CHUNK` (row, token)
    positions in fp32, recomputed in the backward pass, so ~3 fp32 copies of one piece exist at
    a time (a lenslib without the chunking kept the whole fp32 log-softmax: then b T V x 4 B).
  reference log-probs (stage 2): computed before the policy's forward, without gradients,
    `rollout_micro_batch` rows at a time: a no-grad layer's working set, the reference's bf16
    logits and fp32 pieces; the no-grad pass that draws the masks of micro-batched rollouts
    is smaller and is not counted.
  SAM2 decoder: measured, not derived: 403 float32 values per (S/4)^2 pixel per row (S = SAM's
    input side), from saved-tensor hooks on the real hiera-L decoder on CPU (101 MiB per row at
    S = 1024, prompts = 64 context tokens, masks upsampled to 480 x 640).
  generation (stage 2): KV cache 2 L kv_heads head_dim e per token, one layer's no-grad working set
    during the prefill of all of this process's rollouts (lenslib generates them in one call),
    sampling buffers; under ZeRO-3 lenslib gathers every weight for the whole generation.

Phases: "resident" rows are held all the time; the peak is resident + the largest of the
"forward/backward", "generation" and "optimizer step" phases. Gradients count in forward/backward
as with gradient accumulation (micro-batch < rows per GPU) they are held across micro-batches.
Margins: the CUDA context, cuBLAS and NCCL workspaces take 1-2 GiB, and PyTorch's caching
allocator fragments a few percent more: "tight" means within 10 % of the GPU's size.

Defaults follow the preset: stage 2's `rollout_micro_batch` (None: all of a process's rollouts
in one forward) and each stage's `gradient_checkpointing`. Stage 1's loop has no micro-batches:
its rows per forward are 128 / GPUs, so a smaller --micro-batch there means more GPUs.
"""

from __future__ import annotations

import argparse
import math
import warnings
from dataclasses import dataclass, field, replace

GIB = 2**30
SAM_DECODER_VALUES_PER_QUARTER_PIXEL = 403  # measured, see the module docstring
DEEPSPEED_BUCKET = 500_000_000  # reduce / allgather bucket elements (DeepSpeed's defaults)
CONTEXT_RESERVE_GIB = 1.5  # CUDA context + cuBLAS / NCCL workspaces, roughly
PHASES = ("resident", "forward/backward", "reference log-probs", "generation", "optimizer step")


# ----------------------------------------------------------------------------- model sizes
@dataclass(frozen=True)
class ModelSizes:
    """Every size the estimate needs, read from the models' configs; parameter counts exact."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    vis_layers: int
    vis_hidden: int
    vis_intermediate: int
    vis_patch: int
    vis_merge: int
    vis_temporal_patch: int
    num_queries: int
    connector_depth: int
    sam_image_size: int
    params: dict[str, int] = field(default_factory=dict)
    weight_bytes: int = 2  # how the MLLM is loaded: bf16 at full scale, fp32 for the toy on CPU

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mllm_params(self) -> int:
        return self.params["vision"] + self.params["language"]

    @property
    def total_params(self) -> int:
        return sum(self.params.values())


def qwen_3b_config():
    """Qwen2.5-VL-3B-Instruct's published sizes (no download)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16,
            "num_key_value_heads": 2, "intermediate_size": 11008, "vocab_size": 151936,
            "tie_word_embeddings": True,
        },
        vision_config={
            "depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420,
            "out_hidden_size": 2048,
        },
        tie_word_embeddings=True,
    )  # fmt: skip


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def lens_parameter_counts(mllm, queries, connector, sam) -> dict[str, int]:
    """Parameters per part; SAM's decoder split into what stage 2 trains and what it never does
    (`SamSegmenter.set_decoder_trainable`: conv_s0 / conv_s1 stay frozen, their output is cached)."""
    from lenslib.sam import parameter_counts

    sam_counts = parameter_counts(sam)
    decoder = sam.sam_mask_decoder
    high_res = sum(
        count(getattr(decoder, n)) for n in ("conv_s0", "conv_s1") if hasattr(decoder, n)
    )
    return {
        "vision": count(mllm.model.visual),
        "language": count(mllm.model.language_model),  # lm_head tied to the embeddings
        "queries": count(queries),
        "connector": count(connector),
        "sam_encoder": sam_counts["image_encoder"],
        "sam_trainable": sam_counts["prompt_encoder"] + sam_counts["mask_decoder"] - high_res,
        "sam_frozen_rest": sam_counts["other"] + high_res,
    }


def sizes_from_configs(name, mllm_config, params, lens_cfg, sam_image_size, weight_bytes):
    text, vision = mllm_config.text_config, mllm_config.vision_config
    return ModelSizes(
        name=name, layers=text.num_hidden_layers, hidden=text.hidden_size,
        heads=text.num_attention_heads, kv_heads=text.num_key_value_heads,
        intermediate=text.intermediate_size, vocab=text.vocab_size,
        vis_layers=vision.depth, vis_hidden=vision.hidden_size,
        vis_intermediate=vision.intermediate_size, vis_patch=vision.patch_size,
        vis_merge=vision.spatial_merge_size, vis_temporal_patch=vision.temporal_patch_size,
        num_queries=lens_cfg.num_queries, connector_depth=lens_cfg.connector_depth,
        sam_image_size=sam_image_size, params=params, weight_bytes=weight_bytes,
    )  # fmt: skip


def full_sizes(preset) -> ModelSizes:
    """Qwen2.5-VL-3B + SAM2 hiera-L + the preset's context module, built without weights."""
    import torch
    from accelerate import init_empty_weights
    from transformers import Qwen2_5_VLForConditionalGeneration

    from lenslib.context import Connector, ContextQueries
    from lenslib.sam import SamConfig, build_sam

    config = qwen_3b_config()
    lens = preset.lens
    hidden = config.text_config.hidden_size
    with torch.device("meta"):
        mllm = Qwen2_5_VLForConditionalGeneration(config)
        queries = ContextQueries(lens.num_queries, hidden)
        connector = Connector(
            hidden, lens.num_queries, lens.connector_kind, lens.connector_output,
            depth=lens.connector_depth, num_heads=lens.connector_heads, prompt_dim=256,
        )  # fmt: skip
    sam_cfg = SamConfig(config_name=preset.sam_config)
    with init_empty_weights():
        sam = build_sam(sam_cfg, device="meta")
    params = lens_parameter_counts(mllm, queries, connector, sam)
    return sizes_from_configs("full", config, params, lens, sam_cfg.image_size, 2)


def toy_sizes(preset) -> ModelSizes:
    """The toy LENS's sizes, read from the built toy model (fp32, as lenslib runs it on CPU)."""
    from lenslib.presets import build_lens

    model = build_lens(preset, pretrained=False)
    params = lens_parameter_counts(model.mllm, model.queries, model.connector, model.sam.sam)
    assert sum(params.values()) == count(model)
    return sizes_from_configs(
        "toy", model.mllm.config, params, preset.lens, model.sam.cfg.image_size, 4
    )


def model_sizes(preset) -> ModelSizes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return toy_sizes(preset) if preset.mllm == "toy" else full_sizes(preset)


# ----------------------------------------------------------------------------- the launch
@dataclass(frozen=True)
class Launch:
    stage: str  # "align" or "rl"
    num_gpus: int
    zero: int  # 0 (DDP), 2, 3
    rows_per_gpu: int  # samples (align) or rollouts (rl) each process handles per optimiser step
    micro_batch: int  # rows per forward
    checkpointing: bool
    prompt_tokens: int  # image tokens + text tokens of the prompt
    image_tokens: int
    completion_tokens: int
    group_size: int = 1
    reference: bool = True  # stage 2 with beta != 0 keeps a frozen reference MLLM


@dataclass
class Row:
    part: str
    phase: str
    nbytes: float
    formula: str


def layer_bytes_per_token(h: int, i: int, e: int, trainable: bool) -> int:
    """Saved activations of one pre-norm SwiGLU decoder block per token (module docstring)."""
    if trainable:
        return 8 * h + e * (8 * h + 4 * i)
    return 8 * h + e * (4 * h + 3 * i)


def token_chunk() -> int | None:
    """`lenslib.grpo.TOKEN_CHUNK`: positions per fp32 piece of the log-probs (None: unchunked)."""
    from lenslib import grpo

    return getattr(grpo, "TOKEN_CHUNK", None)


def estimate(s: ModelSizes, run: Launch) -> list[Row]:
    """The rows of the estimate for one launch (bytes per GPU)."""
    N, Z, b = run.num_gpus, run.zero, run.micro_batch
    rl = run.stage == "rl"
    toy = s.weight_bytes == 4
    deepspeed = Z in (2, 3)
    e = s.weight_bytes  # MLLM activations: bf16 at full scale, fp32 toy
    e_glue = 4 if (toy or not deepspeed) else 2  # SAM + context module: fp32 unless DeepSpeed casts
    p = s.params
    mllm, glue = s.mllm_params, p["queries"] + p["connector"]
    sam_train, sam_frozen = p["sam_trainable"], p["sam_encoder"] + p["sam_frozen_rest"]
    trainable_mllm = mllm if rl else 0
    trainable_glue = glue + (sam_train if rl else 0)
    rows: list[Row] = []

    def add(part, phase, nbytes, formula):
        rows.append(Row(part, phase, float(nbytes), formula))

    # ---- weights, gradients, optimizer states
    if not deepspeed:
        w_glue = 4
        add("weights: MLLM", "resident", mllm * e, f"{mllm / 1e9:.3f} B x {e} B")
        add("weights: SAM2 + context module", "resident", (glue + sam_train + sam_frozen) * w_glue,
            f"{(glue + sam_train + sam_frozen) / 1e6:.1f} M x 4 B")  # fmt: skip
        grads = trainable_mllm * e + trainable_glue * 4
        add("gradients", "forward/backward", grads,
            f"{trainable_mllm / 1e9:.3f} B x {e} B + {trainable_glue / 1e6:.1f} M x 4 B")  # fmt: skip
        add("DDP reducer buckets (a flat copy of every gradient)", "forward/backward", grads
            if N > 1 else 0, "= gradients (gradient_as_bucket_view=False)")  # fmt: skip
        add("AdamW moments (in the weight's dtype, no master copy)", "resident",
            2 * grads, "2 x gradients")  # fmt: skip
        add("gradients (held through the step)", "optimizer step", grads, "= gradients")
        add("AdamW foreach temporaries", "optimizer step", grads, "~ one moment")
    else:
        shard = N if Z == 3 else 1
        total = mllm + glue + sam_train + sam_frozen
        add("weights (bf16)", "resident", 2 * total / shard,
            f"2 B x {total / 1e9:.3f} B" + (f" / {N}" if shard > 1 else ""))  # fmt: skip
        trainable = trainable_mllm + trainable_glue
        add("gradients (bf16 partition)", "forward/backward", 2 * trainable / N,
            f"2 B x {trainable / 1e6:.1f} M / {N}")  # fmt: skip
        bucket = min(trainable, DEEPSPEED_BUCKET) * 2
        add("ZeRO reduce bucket", "forward/backward", bucket, "min(Psi_t, 5e8) x 2 B")
        add("AdamW: fp32 master + 2 moments", "resident", 12 * trainable / N,
            f"12 B x {trainable / 1e6:.1f} M / {N}")  # fmt: skip
        add("gradients + fp32 copy at the step", "optimizer step", 6 * trainable / N,
            f"(2 + 4) B x Psi_t / {N}")  # fmt: skip
        add("ZeRO allgather bucket (updated weights)", "optimizer step",
            0 if Z == 3 else bucket, "min(Psi_t, 5e8) x 2 B (ZeRO-2)")  # fmt: skip
        if Z == 3:
            embed = s.vocab * s.hidden
            add("ZeRO-3 weights gathered in flight", "forward/backward", 2 * 2 * embed,
                "~2 largest modules (the embedding) x 2 B")  # fmt: skip

    # ---- the frozen reference MLLM (stage 2)
    if rl and run.reference:
        ref_shard = N if Z == 3 else 1
        add("reference MLLM (frozen copy)", "resident", mllm * e / ref_shard,
            f"{mllm / 1e9:.3f} B x {e} B" + (f" / {N}" if ref_shard > 1 else ""))  # fmt: skip

    # ---- SAM2: frozen encoder's features, cached
    s4 = (s.sam_image_size // 4) ** 2
    feature_values = 256 * s4 // 16 + 64 * s4 // 4 + 32 * s4
    add("SAM2 feature cache (64 images, on the GPU)", "resident", 64 * feature_values * e_glue,
        f"64 x {feature_values / 1e6:.1f} M values x {e_glue} B")  # fmt: skip

    # ---- activations of one micro-batch
    S = run.prompt_tokens + run.completion_tokens + s.num_queries
    h, i, L = s.hidden, s.intermediate, s.layers
    per_layer = layer_bytes_per_token(h, i, e, trainable=rl) + S * e  # + the layer's mask
    if run.checkpointing:
        lm_act = b * S * (L * e * h + per_layer)
        formula = f"b S (L e h + one layer {per_layer / 1024:.0f} KiB), S = {S}"
    else:
        lm_act = b * S * L * per_layer
        formula = f"b S L x {per_layer / 1024:.1f} KiB (S e of it the mask), S = {S}"
    add("language model activations", "forward/backward", lm_act, formula)
    add("rotary tables, final norm", "forward/backward",
        b * S * (2 * s.head_dim * e + 4 * h), "b S (2 hd e + 4 h)")  # fmt: skip
    if rl and s.params["vision"]:
        patches = run.image_tokens * s.vis_merge**2
        hv, iv, Lv = s.vis_hidden, s.vis_intermediate, s.vis_layers
        vis_layer = layer_bytes_per_token(hv, iv, e, trainable=True)
        pixels = 3 * s.vis_temporal_patch * s.vis_patch**2
        extra = patches * (pixels * e + 4 * hv + 3 * hv * e)  # patch embed input + merger
        if run.checkpointing:
            vis = b * (patches * (Lv * e * hv + vis_layer) + extra)
            formula = f"b P (Lv e hv + one layer), P = {patches} patches"
        else:
            vis = b * (patches * Lv * vis_layer + extra)
            formula = f"b P Lv x {vis_layer / 1024:.1f} KiB, P = {patches} patches"
        add("vision tower activations (image repeated per row)", "forward/backward", vis, formula)
    T, V = run.completion_tokens, s.vocab
    if rl:
        add("completion logits and their gradient", "forward/backward", 2 * b * T * V * e,
            f"2 b T V x {e} B, T = {T}, V = {V}")  # fmt: skip
        chunk = token_chunk()
        if chunk is None:  # a lenslib whose token_logprobs keeps the whole fp32 log-softmax
            add("log-softmax, fp32 (saved for backward)", "forward/backward", b * T * V * 4,
                "b T V x 4 B (not chunked)")  # fmt: skip
            add("fp32 working copies in the backward pass", "forward/backward", b * T * V * 8,
                "b T V x 8 B")  # fmt: skip
        else:
            piece = min(b * T, chunk)
            add("fp32 log-prob pieces (chunked, recomputed)", "forward/backward",
                piece * V * 12, f"min(b T, {chunk}) V x 3 x 4 B")  # fmt: skip
        if run.reference:
            piece = b * (T + 1) if chunk is None else min(b * (T + 1), chunk)
            add("reference: bf16 logits + fp32 pieces", "reference log-probs",
                b * (T + 1) * V * e + piece * V * 8, "b (T+1) V e + piece V x 8 B")  # fmt: skip
            ref_layer = b * S * (4 * h + e * (2 * h + 3 * i))
            ref_vis = b * run.image_tokens * s.vis_merge**2 * (
                4 * s.vis_hidden + e * (2 * s.vis_hidden + 3 * s.vis_intermediate)
            )  # fmt: skip
            add("reference: one layer's no-grad working set", "reference log-probs",
                max(ref_layer, ref_vis), "b S (4h + e (2h + 3i)), or the vision tower's")  # fmt: skip
    else:
        add("completion logits (computed, unused in stage 1)", "forward/backward",
            b * T * V * e, f"b T V x {e} B, T = {T}")  # fmt: skip
    C, M = s.hidden, s.num_queries
    add("connector activations", "forward/backward",
        b * M * (17 * s.connector_depth + 3) * C * e_glue, "b M (17 depth + 3) C e")  # fmt: skip
    add("SAM2 decoder activations", "forward/backward",
        b * SAM_DECODER_VALUES_PER_QUARTER_PIXEL * s4 * e_glue,
        f"b x 403 x (S/4)^2 x {e_glue} B (measured)")  # fmt: skip

    # ---- generation (stage 2): all of this process's rollouts in one call
    if rl:
        rows_gen = run.rows_per_gpu
        ctx = run.prompt_tokens + T
        kv = rows_gen * ctx * L * 2 * s.kv_heads * s.head_dim * e
        add("KV cache", "generation", kv,
            f"{rows_gen} rows x {ctx} tok x 2 L kv hd e")  # fmt: skip
        prefill = rows_gen * run.prompt_tokens * (4 * h + e * (2 * h + 3 * i))
        patches = run.image_tokens * s.vis_merge**2
        prefill_vis = (
            rows_gen
            * patches
            * (4 * s.vis_hidden + e * (2 * s.vis_hidden + 3 * s.vis_intermediate))
        )
        add("prefill working set (one layer, no grad)", "generation", max(prefill, prefill_vis),
            "rows x prompt x (4h + e (2h + 3i)), or the vision tower's")  # fmt: skip
        add("sampling buffers (fp32 logits, top-k / top-p sort)", "generation",
            rows_gen * V * 20, "rows x V x 20 B")  # fmt: skip
        if Z == 3:
            total = mllm + glue + sam_train + sam_frozen
            add("ZeRO-3: every weight gathered for generate", "generation",
                2 * total * (1 - 1 / N), "2 B x Psi x (1 - 1/N)")  # fmt: skip
    return rows


def phase_totals(rows: list[Row]) -> dict[str, float]:
    return {ph: sum(r.nbytes for r in rows if r.phase == ph) for ph in PHASES}


def peak_bytes(rows: list[Row]) -> float:
    totals = phase_totals(rows)
    return totals["resident"] + max(totals[ph] for ph in PHASES[1:])


def verdict(peak: float, gpu_gib: float) -> str:
    need = peak / GIB + CONTEXT_RESERVE_GIB
    if need > gpu_gib:
        return f"does not fit on {gpu_gib:g} GB"
    if need > 0.9 * gpu_gib:
        return f"fits on {gpu_gib:g} GB, tight"
    return f"fits on {gpu_gib:g} GB"


def fits(peak: float, gpu_gib: float) -> bool:
    return peak / GIB + CONTEXT_RESERVE_GIB <= gpu_gib


def largest_micro_batch(s: ModelSizes, run: Launch, gpu_gib: float) -> int | None:
    """The largest power-of-two micro-batch (up to the rows per GPU) that fits, or None."""
    best, b = None, 1
    while b <= run.rows_per_gpu:
        if fits(peak_bytes(estimate(s, replace(run, micro_batch=b))), gpu_gib):
            best = b
        b *= 2
    return best


# ----------------------------------------------------------------------------- printing
def fmt_gib(nbytes: float) -> str:
    return f"{nbytes / GIB:8.2f}" if nbytes >= 0.005 * GIB else f"{nbytes / 2**20:6.1f} M"


def describe_backend(zero: int) -> str:
    return {0: "DDP", 2: "ZeRO-2", 3: "ZeRO-3"}[zero]


def describe(run: Launch) -> str:
    backend = describe_backend(run.zero)
    ckpt = "checkpointing" if run.checkpointing else "no checkpointing"
    what = "rollouts" if run.stage == "rl" else "samples"
    return (
        f"stage {run.stage}, {run.num_gpus} GPUs, {backend}, {run.rows_per_gpu} {what}/GPU/step, "
        f"micro-batch {run.micro_batch}, {ckpt}, prompt {run.prompt_tokens} tok "
        f"({run.image_tokens} image), completion {run.completion_tokens} tok"
    )


def table(s: ModelSizes, run: Launch, gpus: list[float], markdown: bool = False) -> str:
    rows = estimate(s, run)
    totals = phase_totals(rows)
    peak = peak_bytes(rows)
    out = []
    if markdown:
        out += ["| component | phase | GiB | formula |", "|---|---|---:|---|"]
        for r in rows:
            if r.nbytes:
                out.append(f"| {r.part} | {r.phase} | {r.nbytes / GIB:.2f} | {r.formula} |")
        for ph in (ph for ph in PHASES if totals[ph]):
            out.append(f"| **{ph} total** | | {totals[ph] / GIB:.2f} | |")
        out.append(f"| **peak** | resident + largest phase | **{peak / GIB:.2f}** | |")
    else:
        out.append(f"{'component':54s} {'phase':17s} {'GiB':>8s}  formula")
        for r in rows:
            if r.nbytes:
                out.append(f"{r.part:54s} {r.phase:17s} {fmt_gib(r.nbytes)}  {r.formula}")
        out.append("-" * 100)
        for ph in (ph for ph in PHASES if totals[ph]):
            out.append(f"{ph + ' total':54s} {'':17s} {fmt_gib(totals[ph])}")
        out.append(f"{'PEAK = resident + largest phase':54s} {'':17s} {fmt_gib(peak)}")
    verdicts = ", ".join(verdict(peak, g) for g in gpus)
    out.append(
        f"\nverdict: {verdicts} (with {CONTEXT_RESERVE_GIB} GiB for CUDA context / workspaces)"
    )
    return "\n".join(out)


def fit_table(s: ModelSizes, run: Launch, gpus: list[float], markdown: bool = False) -> str:
    """Largest micro-batch that fits each GPU size, per ZeRO stage, with / without checkpointing."""
    head = ["backend", "checkpointing"] + [f"largest micro-batch on {g:g} GB" for g in gpus]
    lines = []
    for zero in (0, 2, 3):
        for ckpt in (False, True):
            cand = replace(run, zero=zero, checkpointing=ckpt)
            cells = []
            for g in gpus:
                best = largest_micro_batch(s, cand, g)
                if best is None:
                    cells.append("none")
                else:
                    peak = peak_bytes(estimate(s, replace(cand, micro_batch=best)))
                    steps = math.ceil(run.rows_per_gpu / best)
                    tight = ", tight" if peak / GIB + CONTEXT_RESERVE_GIB > 0.9 * g else ""
                    cells.append(f"{best} ({peak / GIB:.1f} GiB, {steps} accum.{tight})")
            name = {0: "DDP", 2: "ZeRO-2", 3: "ZeRO-3"}[zero]
            lines.append([name, "yes" if ckpt else "no"] + cells)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
    else:
        out = ["  ".join(f"{c:30s}" if k > 1 else f"{c:14s}" for k, c in enumerate(head))]
        out += [
            "  ".join(f"{c:30s}" if k > 1 else f"{c:14s}" for k, c in enumerate(line))
            for line in lines
        ]
    return "\n".join(out)


def compare_table(s: ModelSizes, run: Launch, gpus: list[float], markdown: bool = False) -> str:
    """The rows side by side for DDP, ZeRO-2 and ZeRO-3 (same micro-batch and checkpointing)."""
    backends = {0: "DDP", 2: "ZeRO-2", 3: "ZeRO-3"}
    per: dict[int, list[Row]] = {z: estimate(s, replace(run, zero=z)) for z in backends}
    parts: dict[str, str] = {}
    for rows in per.values():
        for r in rows:
            parts.setdefault(r.part, r.phase)
    cells = {z: {r.part: r.nbytes for r in rows} for z, rows in per.items()}
    lines = []
    for part, phase in parts.items():
        values = [cells[z].get(part, 0.0) for z in backends]
        if any(values):
            lines.append([part, phase] + [f"{v / GIB:.2f}" if v else "" for v in values])
    for ph in PHASES:
        if any(phase_totals(per[z])[ph] for z in backends):
            lines.append(
                [f"{ph} total", ""] + [f"{phase_totals(per[z])[ph] / GIB:.2f}" for z in backends]
            )
    lines.append(
        ["peak", "resident + largest phase"] + [f"{peak_bytes(per[z]) / GIB:.2f}" for z in backends]
    )
    for g in gpus:
        lines.append([f"on {g:g} GB", ""] + [
            "fits" if fits(peak_bytes(per[z]), g) else "does not fit" for z in backends
        ])  # fmt: skip
    head = ["component (GiB per GPU)", "phase"] + list(backends.values())
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|"]
        for line in lines:
            bold = line[0] == "peak"
            line = [f"**{c}**" if bold and c else c for c in line]
            out.append("| " + " | ".join(line) + " |")
        return "\n".join(out)
    out = [f"{head[0]:54s} {head[1]:24s} " + " ".join(f"{h:>12s}" for h in head[2:])]
    out += [f"{ln[0]:54s} {ln[1]:24s} " + " ".join(f"{c:>12s}" for c in ln[2:]) for ln in lines]
    return "\n".join(out)


# ----------------------------------------------------------------------------- toy check
def measure_toy(stage: str, steps: int = 2) -> dict[str, float]:
    """Run `steps` real toy steps of `stage` through `lenslib.pipeline.train_stage` on the CPU and
    measure (a) the bytes autograd saved for the backward pass (saved-tensor hooks, unique
    storages, weights excluded) in each step's forward, and (b) the growth of the process's peak
    resident memory (ru_maxrss) over the steps, which also sees weights' gradients, AdamW states,
    the reference copy, generation and the allocator."""
    import resource
    import tempfile

    import torch

    from lenslib.pipeline import train_stage
    from lenslib.presets import build_lens, get_preset, toy_split
    from lenslib.training import make_accelerator

    torch.manual_seed(0)
    out_dir = tempfile.mkdtemp()
    preset = get_preset("toy", max_steps=steps, eval_every=0, eval_at_end=False, checkpoint_every=0)
    preset = preset.override(stage, output_dir=out_dir)
    model = build_lens(preset, pretrained=True)
    data = (toy_split(preset, "train", 64), toy_split(preset, "val", 8))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    per_step: list[int] = []

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def on_log(record):
        per_step.append(sum(saved.values()))
        saved.clear()

    accelerator = make_accelerator(cpu=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_stage(model, preset, stage, accelerator, data=data, on_log=on_log)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "saved_activations": max(per_step) if per_step else float("nan"),
        "maxrss_growth": after - before,
        "maxrss": after,
    }


def measure_toy_parts(stage: str) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes autograd saves in ONE forward of the toy model, part by part (saved-tensor hooks,
    unique storages, weights excluded), on a batch shaped as the toy preset's step: 16 samples
    (stage 1) or 4 prompts x 8 rollouts (stage 2), completions = the ground-truth answers.
    Returns ({part: bytes}, {"rows", "prompt", "completion"})."""
    import torch

    from lenslib import grpo
    from lenslib import mllm as mllm_lib
    from lenslib.presets import build_lens, get_preset, toy_split
    from lenslib.training import ground_truth_answer

    torch.manual_seed(0)
    preset = get_preset("toy")
    model = build_lens(preset, pretrained=True)
    model.set_stage(stage)
    model.train()
    G = preset.rl.group_size if stage == "rl" else 1
    prompts = preset.rl.batch_size if stage == "rl" else preset.align.batch_size
    samples = list(toy_split(preset, "train", prompts))
    images, texts = [x.image for x in samples], [x.text for x in samples]
    answers = [ground_truth_answer(model, x) for x in samples for _ in range(G)]
    ids, mask = mllm_lib.tokenize_completions(model.processor, answers)
    batch = mllm_lib.completion_batch(model.processor, images, texts, ids, mask, G)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    parts: dict[str, int] = {}

    def counter(part: str):
        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                parts[part] = parts.get(part, 0) + storage.nbytes()
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    T = ids.shape[1]
    if stage == "rl":  # the vision tower alone first, then the same forward inside the MLLM's
        visual = model.mllm.model.visual
        with counter("vision tower"):
            keep = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        seen_vision = set(seen)
        seen.clear()
    with counter("MLLM"):
        readout = model.queries(model.mllm, batch, logits_to_keep=T)
    if stage == "rl":
        parts["language model"] = parts.pop("MLLM") - parts["vision tower"]
        del keep, seen_vision
        with counter("log-probs"):
            grpo.token_logprobs(readout.logits, ids, preset.rl.temperature)
    else:
        parts["language model"] = parts.pop("MLLM")
    with counter("connector"):
        q_seg = model.connector(readout.queries)
    with counter("SAM2 decoder"):
        model.segment_from_prompts(images, q_seg, G)
    shapes = {"rows": len(answers), "prompt": batch["input_ids"].shape[1] - T, "completion": T}
    return parts, shapes


def toy_check(s: ModelSizes, run: Launch, stage: str) -> str:
    parts, shapes = measure_toy_parts(stage)
    exact = replace(run, zero=0, num_gpus=1, checkpointing=False, micro_batch=shapes["rows"],
                    prompt_tokens=shapes["prompt"], completion_tokens=shapes["completion"])  # fmt: skip
    by_part = {r.part: r.nbytes for r in estimate(s, exact)}
    estimated = {
        "language model": by_part["language model activations"]
        + by_part["rotary tables, final norm"],
        "vision tower": by_part.get("vision tower activations (image repeated per row)", 0),
        # chunked log-probs keep only the logits (their checkpoint's input), else the fp32 copy
        "log-probs": by_part.get("log-softmax, fp32 (saved for backward)", 0)
        + by_part.get("completion logits and their gradient", 0) / 2,
        "connector": by_part["connector activations"],
        "SAM2 decoder": by_part["SAM2 decoder activations"],
    }
    lines = [
        f"toy check, stage {stage}: ONE forward, {shapes['rows']} rows, prompt {shapes['prompt']}"
        f" + completion {shapes['completion']} + {s.num_queries} query tokens, fp32 on CPU",
        f"  {'activations saved for backward':32s} {'measured MiB':>13s} {'estimated MiB':>14s}",
    ]
    for name in ("language model", "vision tower", "log-probs", "connector", "SAM2 decoder"):
        if name in parts or estimated[name]:
            lines.append(
                f"  {name:32s} {parts.get(name, 0) / 2**20:13.2f} {estimated[name] / 2**20:14.2f}"
            )
    lines.append(
        f"  {'total':32s} {sum(parts.values()) / 2**20:13.2f} {sum(estimated.values()) / 2**20:14.2f}"
    )
    measured = measure_toy(stage)
    rows = estimate(s, replace(run, zero=0, num_gpus=1, checkpointing=False))
    saved_parts = ("activations", "saved for backward", "rotary tables")  # what autograd keeps
    est_act = sum(r.nbytes for r in rows if any(k in r.part for k in saved_parts))
    peak = peak_bytes(rows)
    lines += [
        f"toy check, stage {stage}: 2 real steps through lenslib.pipeline.train_stage (CPU, fp32)",
        f"  activations saved for backward, largest step: measured "
        f"{measured['saved_activations'] / 2**20:7.2f} MiB, estimated {est_act / 2**20:7.2f} MiB"
        " (at the preset's maximum lengths)",
        f"  peak RSS growth over the steps:  measured {measured['maxrss_growth'] / 2**20:7.2f} MiB"
        f" (ru_maxrss), estimated peak {peak / 2**20:7.2f} MiB",
        f"  process peak RSS {measured['maxrss'] / 2**20:.0f} MiB: Python, torch, transformers, sam2 "
        "and the toy data dominate at this scale",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line
def default_prompt_tokens(s: ModelSizes, preset) -> tuple[int, int]:
    """(prompt tokens, image tokens): an image of the preset's pixel budget + ~128 text tokens
    (the paper's ~500-character prompt and the chat template); the toy: its 112 x 112 images
    (16 tokens) and its word-level prompt, 154 tokens in all as a toy batch pads it."""
    side = s.vis_patch * s.vis_merge  # 28 px per image token
    if s.name == "toy":
        image = (preset.toy_world.image_size // side) ** 2
        return image + 138, image
    image = (preset.mllm_max_pixels or 1_000_000) // side**2
    return image + 128, image


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
    )  # fmt: skip
    parser.add_argument("--preset", choices=("full", "toy"), default="full")
    parser.add_argument("--stage", choices=("align", "rl"), default="rl")
    parser.add_argument("--num-gpus", type=int, default=8)
    parser.add_argument("--zero", type=int, choices=(0, 2, 3), default=2, help="0 = DDP")
    parser.add_argument(
        "--micro-batch", type=int, default=None,
        help="rows (samples or rollouts) per forward per GPU (default: stage 2's "
        "rollout_micro_batch of the preset, else all of a GPU's rows in one forward)",
    )  # fmt: skip
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute the MLLM's activations (default: the preset's setting for the stage)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=None, help="image + text tokens")
    parser.add_argument(
        "--image-tokens", type=int, default=None, help="image tokens (after 2x2 merge)"
    )
    parser.add_argument(
        "--completion-tokens", type=int, default=None,
        help="default: stage 2's max_new_tokens; stage 1's teacher-forced answer ~64 tokens (toy 46)",
    )  # fmt: skip
    parser.add_argument("--gpu-gb", type=float, nargs="+", default=[80.0, 48.0])
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument(
        "--compare", action="store_true",
        help="print the components side by side for DDP, ZeRO-2 and ZeRO-3 instead of --zero's",
    )  # fmt: skip
    parser.add_argument(
        "--measure-toy", action="store_true",
        help="also run 2 real toy steps on the CPU and print measured next to estimated memory",
    )  # fmt: skip
    args = parser.parse_args()

    from lenslib.presets import get_preset

    preset = get_preset(args.preset)
    sizes = model_sizes(preset)
    cfg = preset.rl if args.stage == "rl" else preset.align
    group = preset.rl.group_size if args.stage == "rl" else 1
    rows_per_gpu = max(1, cfg.batch_size * group // args.num_gpus)
    prompt, image = default_prompt_tokens(sizes, preset)
    if args.image_tokens is not None:
        image = args.image_tokens
    if args.prompt_tokens is not None:
        prompt = args.prompt_tokens
    completion = args.completion_tokens
    if completion is None:
        completion = (
            preset.rl.max_new_tokens if args.stage == "rl" else (46 if sizes.name == "toy" else 64)
        )
    micro_batch = args.micro_batch  # default: the preset's (stage 2) or all rows in one forward
    if micro_batch is None:
        micro_batch = getattr(cfg, "rollout_micro_batch", None) or rows_per_gpu
    checkpointing = args.gradient_checkpointing
    if checkpointing is None:
        checkpointing = bool(getattr(cfg, "gradient_checkpointing", False))
    run = Launch(
        stage=args.stage, num_gpus=args.num_gpus, zero=args.zero,
        rows_per_gpu=rows_per_gpu, micro_batch=min(micro_batch, rows_per_gpu),
        checkpointing=checkpointing, prompt_tokens=prompt, image_tokens=image,
        completion_tokens=completion, group_size=group, reference=preset.rl.beta != 0.0,
    )  # fmt: skip
    p = sizes.params
    print(
        f"{sizes.name} LENS: MLLM {sizes.mllm_params / 1e9:.3f} B (vision {p['vision'] / 1e6:.1f} M, "
        f"language {p['language'] / 1e6:.1f} M), queries {p['queries'] / 1e6:.3f} M, connector "
        f"{p['connector'] / 1e6:.1f} M, SAM2 {(p['sam_encoder'] + p['sam_trainable'] + p['sam_frozen_rest']) / 1e6:.1f} M "
        f"(image encoder {p['sam_encoder'] / 1e6:.1f} M, trainable in stage 2 {p['sam_trainable'] / 1e6:.2f} M)"
    )
    if args.compare:
        print(describe(run).replace(f"{describe_backend(run.zero)}, ", "") + "\n")
        print(compare_table(sizes, run, args.gpu_gb, args.markdown))
    else:
        print(describe(run) + "\n")
        print(table(sizes, run, args.gpu_gb, args.markdown))
    print("\nsettings that fit (micro-batch searched over 1, 2, 4, ... up to the rows per GPU):")
    print(fit_table(sizes, run, args.gpu_gb, args.markdown))
    if args.measure_toy:
        if sizes.name != "toy":
            parser.error("--measure-toy needs --preset toy")
        print()
        print(toy_check(sizes, run, args.stage))


if __name__ == "__main__":
    main()
