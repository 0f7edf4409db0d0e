"""The context module (paper, "Context Module", eqs. 2-3; Tables 3-4): context queries + connector.

    Q'    = pi_mllm.forward(p_sys, T, I, P_CoT, P_box, Q)     (eq. 2)  ContextQueries
    Q_seg = pi_connector(Q')                                  (eq. 3)  Connector

M learned queries are appended after the prompt and the completion; one forward pass of the
MLLM lets them attend to the image, the instruction and the reasoning; their last-layer
hidden states are the context the connector turns into prompt tokens for SAM (eq. 4).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import nn
from transformers import BatchFeature, PreTrainedModel

from lenslib.mllm import shared_prompt_forward

MropeMode = Literal["correct", "authors"]
ConnectorKind = Literal["vit", "mlp"]
ConnectorOutput = Literal["tokens", "pooled"]
Activation = Literal["gelu", "quick_gelu"]
SAM_PROMPT_DIM = 256  # width of SAM / SAM2's prompt embeddings
REQUIRED_KEYS = (
    "input_ids",
    "attention_mask",
    "mm_token_type_ids",
    "pixel_values",
    "image_grid_thw",
)  # what the queries' forward needs from a batch


# ----------------------------------------------------------------------------- positions
def context_position_ids(
    mllm: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    image_grid_thw: torch.Tensor,
    mrope: MropeMode = "correct",
) -> torch.Tensor:
    """RoPE positions (3, B, L) for a batch whose last columns are the context queries.

    "correct": Qwen2.5-VL's own 3-D mRoPE (`get_rope_index`): image tokens get (t, h, w) grid
        positions, text and queries count on after them; padding is skipped, so a padded row
        gets the positions it would get alone.
    "authors": the authors' pass fed only `inputs_embeds`, and transformers then fell back to
        1-D positions (cumulative count of real tokens, the same on all 3 axes): the image
        tokens lose their 2-D layout (the authors' code does this). Kept to reproduce them.
    """
    if mrope == "correct":
        position_ids, _ = mllm.model.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            attention_mask=attention_mask,
        )
        return position_ids  # (3, B, L)
    if mrope == "authors":
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
        return positions.unsqueeze(0).expand(3, -1, -1)  # (3, B, L)
    raise ValueError(f"mrope must be 'correct' or 'authors', got {mrope!r}")


# ----------------------------------------------------------------------------- queries
class ContextReadout(NamedTuple):
    """What one forward with the queries appended gives.

    queries: (B, M, C) Q' of eq. 2: the queries' last-layer states after the final norm.
    logits:  (B, T, V) next-token logits of the last T tokens before the queries, i.e.
             logits[:, t] predicts input_ids[:, L - T + t] (None when T = 0). GRPO takes the
             completion tokens' log-probs from them: one forward for both.
    A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 must see the tensors a module returns
    to gather its weights (the queries) again for the backward pass.
    """

    queries: torch.Tensor
    logits: torch.Tensor | None


class ContextQueries(nn.Module):
    """M learned context queries Q in R^{M x C} (eq. 2), init N(0, 0.02), C = MLLM hidden size.

    `forward` appends them after each row's prompt + completion and reads them out of ONE
    forward of the MLLM. `mrope` chooses the positions (see `context_position_ids`); default
    "correct" (the paper's intent), "authors" reproduces the authors' 1-D positions.
    """

    def __init__(
        self, num_queries: int = 64, hidden_size: int = 2048, mrope: MropeMode = "correct"
    ) -> None:
        super().__init__()
        if mrope not in ("correct", "authors"):
            raise ValueError(f"mrope must be 'correct' or 'authors', got {mrope!r}")
        self.mrope = mrope
        self.queries = nn.Parameter(torch.randn(num_queries, hidden_size) * 0.02)  # (M, C)

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0]

    def forward(
        self,
        mllm: PreTrainedModel,
        inputs: BatchFeature | dict,
        logits_to_keep: int = 0,
        prompt_groups: int = 1,
    ) -> ContextReadout:
        """Eq. 2 for a batch from `lenslib.mllm.build_inputs` / `append_completions`.

        The M queries sit after the last column; padding holes before them are masked and
        skipped by the positions, so each row reads out what it would alone. `logits_to_keep`
        = T asks for the logits of the last T tokens (the completion) from the same forward.
        `prompt_groups` = G > 1: the rows come in groups of G that share their prompt (every
        column before the last T, as `completion_batch` repeats it), and each prompt is computed
        once per group (`lenslib.mllm.shared_prompt_forward`): the same states, less compute.
        """
        missing = [k for k in REQUIRED_KEYS if k not in inputs]
        if missing:
            raise KeyError(f"context queries need {missing} in the batch (see build_inputs)")
        input_ids = inputs["input_ids"]  # (B, L)
        B, L = input_ids.shape
        M = self.num_queries
        placeholders = torch.full_like(input_ids[:, :1], self._placeholder_id(mllm)).expand(B, M)
        full_ids = torch.cat([input_ids, placeholders], dim=1)  # (B, L+M)
        mask, types = inputs["attention_mask"], inputs["mm_token_type_ids"]
        attention_mask = torch.cat([mask, mask.new_ones(B, M)], dim=1)  # (B, L+M), queries seen
        mm_types = torch.cat([types, types.new_zeros(B, M)], dim=1)  # (B, L+M), queries = text

        text_embeds = mllm.get_input_embeddings()(input_ids)  # (B, L, C)
        queries = self.queries.to(text_embeds.dtype).expand(B, M, -1)  # (B, M, C)
        inputs_embeds = torch.cat([text_embeds, queries], dim=1)  # (B, L+M, C)
        position_ids = context_position_ids(
            mllm, full_ids, attention_mask, mm_types, inputs["image_grid_thw"], self.mrope
        )  # (3, B, L+M)

        # input_ids tell the model where the image features go; inputs_embeds carry the queries.
        if prompt_groups > 1:
            if logits_to_keep <= 0:
                raise ValueError("prompt_groups > 1 needs logits_to_keep = T (the completion)")
            batch = {"input_ids": full_ids, "attention_mask": attention_mask,
                     "pixel_values": inputs["pixel_values"],
                     "image_grid_thw": inputs["image_grid_thw"]}  # fmt: skip
            hidden = shared_prompt_forward(
                mllm.model, batch, prompt_groups, L - logits_to_keep, inputs_embeds, position_ids
            )  # (B, L+M, C), after the final RMSNorm
        else:
            hidden = mllm.model(
                input_ids=full_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"],
                use_cache=False,
            ).last_hidden_state  # (B, L+M, C), after the final RMSNorm
        logits = None
        if logits_to_keep > 0:
            # the state at column j predicts token j+1: columns L-T-1 .. L-2 predict L-T .. L-1
            logits = mllm.lm_head(hidden[:, L - logits_to_keep - 1 : L - 1])  # (B, T, V)
        return ContextReadout(queries=hidden[:, L:], logits=logits)  # queries: (B, M, C)

    @staticmethod
    def _placeholder_id(mllm: PreTrainedModel) -> int:
        """Any id that is not a vision placeholder: its embedding is replaced by a query."""
        vision_ids = {mllm.config.image_token_id, mllm.config.video_token_id}
        return next(i for i in range(len(vision_ids) + 1) if i not in vision_ids)


# ----------------------------------------------------------------------------- connector
def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): CLIP's GELU approximation, the authors' connector activation."""
    return x * torch.sigmoid(1.702 * x)


# "gelu" as a string keeps PyTorch's fused fast path; quick_gelu is a plain function
ACTIVATIONS = {"gelu": "gelu", "quick_gelu": quick_gelu}


class Connector(nn.Module):
    """pi_connector of eq. 3: Q' (B, M, C) -> Q_seg (B, K, 256), K = M or 1.

    kind (Table 4: ViT 87.8 vs MLP 72.8 cIoU):
      "vit": learned absolute position embedding (zero init) + `depth` pre-LayerNorm
             transformer blocks, bidirectional attention, MLP ratio 4 (the paper's connector).
      "mlp": one pre-LayerNorm per-token MLP block (ratio 4, residual): no attention across
             queries and no positions. The paper does not describe its MLP; this is our reading.
    activation / norm_eps / num_heads: the blocks' MLP activation ("gelu"; the authors' code:
      "quick_gelu"), LayerNorm epsilon (1e-5; authors 1e-6) and heads (C // 64; authors 16).
    output:
      "tokens": every query becomes a SAM prompt token, Linear(C,C)-GELU-Linear(C,256) per
                token (what the paper's text implies).
      "pooled": the authors' code: Conv1d(C, C, kernel=M) over the query axis pools the M
                tokens into ONE, then Linear(C,C)-GELU-Linear(C,256).
    """

    def __init__(
        self,
        hidden_size: int,
        num_queries: int = 64,
        kind: ConnectorKind = "vit",
        output: ConnectorOutput = "tokens",
        depth: int = 4,
        num_heads: int | None = None,
        prompt_dim: int = SAM_PROMPT_DIM,
        activation: str = "gelu",
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if kind not in ("vit", "mlp"):
            raise ValueError(f"connector kind must be 'vit' or 'mlp', got {kind!r}")
        if output not in ("tokens", "pooled"):
            raise ValueError(f"connector output must be 'tokens' or 'pooled', got {output!r}")
        self.kind, self.output = kind, output
        C = hidden_size
        if kind == "vit":
            heads = num_heads or max(1, C // 64)
            self.pos_embed = nn.Parameter(torch.zeros(1, num_queries, C))  # (1, M, C)
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(
                    C,
                    heads,
                    4 * C,
                    dropout=0.0,
                    activation=ACTIVATIONS[activation],
                    layer_norm_eps=norm_eps,
                    batch_first=True,
                    norm_first=True,
                )
                for _ in range(depth)
            )
        else:
            self.mlp = nn.Sequential(
                nn.LayerNorm(C), nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C)
            )
        if output == "pooled":
            self.pool = nn.Conv1d(C, C, kernel_size=num_queries)  # authors' `conv_1d`
        self.proj = nn.Sequential(nn.Linear(C, C), nn.GELU(), nn.Linear(C, prompt_dim))

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, M, C) context query states -> (B, K, 256) SAM prompt tokens."""
        x = queries
        if self.kind == "vit":
            x = x + self.pos_embed  # (B, M, C)
            for block in self.blocks:
                x = block(x)  # (B, M, C), every query attends to every query
        else:
            x = x + self.mlp(x)  # (B, M, C), each query on its own
        if self.output == "pooled":
            x = self.pool(x.transpose(1, 2)).transpose(1, 2)  # (B, C, M) -> (B, C, 1) -> (B, 1, C)
        return self.proj(x)  # (B, K, 256)
