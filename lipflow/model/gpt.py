"""``gpt``: the baseline pre-LayerNorm GPT (nanoGPT, Karpathy 2022), read top to bottom."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lipflow.model.base import AttentionSite, LanguageModel, block_attention_sites, causal_scores
from lipflow.model.registry import MODELS


class CausalSelfAttention(nn.Module):
    output_scale = 1.0

    def __init__(self, d_model: int, n_heads: int, attn_scale: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.score_scale = attn_scale  # 1/√d_head (SP) or 1/d_head (µP)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.score_scale)
        return self.out(y.transpose(1, 2).contiguous().view(B, T, C))

    @property
    def first_projection(self) -> nn.Linear:
        return self.qkv

    def attention_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-softmax scores scale·q_h·k_hᵀ, (B, H, T, T), masked entries 0."""
        B, T, C = x.shape
        q, k, _ = self.qkv(x).split(C, dim=2)
        q, k = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k))
        return causal_scores(q, k, self.score_scale)

    def projection_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_q, W_k, W_v, W_out): the fused qkv's row blocks [q; k; v] and the output projection."""
        return (*self.qkv.weight.chunk(3, dim=0), self.out.weight)


class MLP(nn.Module):
    def __init__(self, d_model: int, ratio: int):
        super().__init__()
        self.up = nn.Linear(d_model, ratio * d_model, bias=False)
        self.down = nn.Linear(ratio * d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ratio: int, attn_scale: float, branch_scale: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, attn_scale)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, ratio)
        self.branch_scale = branch_scale  # 1, or 1/√L under depth-µP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.branch_scale * self.attn(self.ln1(x))
        return x + self.branch_scale * self.mlp(self.ln2(x))


@MODELS.register("gpt")
class GPT(LanguageModel):
    """Token + learned position embeddings → N pre-LN blocks → LayerNorm → untied head.

    It certifies nothing (LayerNorm is not globally Lipschitz): the LanguageModel defaults (None) stand."""

    embedding_prefixes = ("tok.", "pos.")

    def __init__(self, cfg: dict[str, Any], vocab_size: int):
        super().__init__()
        d, n_layers, n_heads = cfg["d_model"], cfg["n_layers"], cfg["n_heads"]
        if d % n_heads:
            raise ValueError(f"d_model={d} is not divisible by n_heads={n_heads}")
        self.vocab_size, self.context = vocab_size, cfg["context"]
        head_dim = d // n_heads
        mup = cfg["parametrization"] == "mup"
        attn_scale = 1.0 / head_dim if mup else 1.0 / math.sqrt(head_dim)
        branch = 1.0 / math.sqrt(n_layers) if cfg["depth_mup"] else 1.0
        self.tok = nn.Embedding(vocab_size, d)
        self.pos = nn.Embedding(self.context, d)
        self.blocks = nn.ModuleList(
            Block(d, n_heads, cfg["mlp_ratio"], attn_scale, branch) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab_size, bias=False)
        self.output_mult = 1.0  # µP readout multiplier, set by the parametrization

    def attention_layers(self) -> list[AttentionSite]:
        return block_attention_sites(self.blocks)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        self.check_length(idx)
        self.check_token_ids(idx)
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.tok(idx) + self.pos(pos)

    def forward_embedded(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            self._record(f"block{i}", x)
        logits = self.head(self.ln_f(x)) * self.output_mult
        self._record("logits", logits)
        return logits
