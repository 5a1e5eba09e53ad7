"""f_K: the visual abstractor of mPLUG-Owl.

A fixed set of learnable queries (64 in the released model) cross-attends to all the ViT tokens of one image, six
layers deep, and is projected to the language model's width; a learned `vit_eos` token is appended. So every image,
whatever f_V produced, becomes num_queries + 1 = 65 tokens for f_L. Stage 1 trains f_K; the paper trains it in stage 2
too (the released code freezes it there).

Each layer, with q the queries and x the ViT output (the same x for every layer):
    qn = norm1(q);  kv = concat(qn, normk(x))          # the queries also attend to themselves
    h  = qn + out_proj(attention(query(qn), key(kv), value(kv)))   # residual from the *normalised* query
    h  = h + w2(ffn_ln(silu(w1(norm2(h))) * w3(norm2(h))))       # SwiGLU with a LayerNorm on its hidden
"""
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F



class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back, as the official abstractor does in bf16. vit.py's norm of the
    same name gives the same result with a shortcut for f_V's many calls; f_K's few calls keep the plain form."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).type_as(x)


@dataclass
class AbstractorConfig:
    hidden_size: int = 1024
    num_layers: int = 6
    num_heads: int = 16
    intermediate_size: int = 2816  # the released checkpoint's width (the official code's default of 4096 is unused)
    num_queries: int = 64
    llm_hidden_size: int = 4096
    layer_norm_eps: float = 1e-6  # ffn_ln only; norm1, normk and norm2 use LayerNorm's default 1e-5
    attention_dropout: float = 0.1

    @classmethod
    def preset(cls, name: str) -> "AbstractorConfig":
        presets = {
            "owl-7b": cls(),
            "tiny": cls(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=352, num_queries=16,
                        llm_hidden_size=192),
        }
        if name not in presets:
            raise ValueError(f"unknown abstractor preset {name!r}; choose from {sorted(presets)}")
        return presets[name]

    @classmethod
    def from_official(cls, d: dict, num_queries: int, llm_hidden_size: int) -> "AbstractorConfig":
        """From `visual_abstractor_config` of an mPLUG-Owl config.json, with the official defaults for missing fields."""
        names = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                 "attention_probs_dropout_prob": "attention_dropout"}
        official = dict(hidden_size=1024, num_hidden_layers=6, num_attention_heads=16, intermediate_size=4096,
                        layer_norm_eps=1e-6, attention_probs_dropout_prob=0.1)
        ours = {f.name for f in fields(cls)}
        kw = {names.get(k, k): v for k, v in {**official, **d}.items() if names.get(k, k) in ours}
        return cls(**{**kw, "num_queries": num_queries, "llm_hidden_size": llm_hidden_size})


class AbstractorLayer(nn.Module):
    def __init__(self, cfg: AbstractorConfig):
        super().__init__()
        D, I = cfg.hidden_size, cfg.intermediate_size
        self.num_heads, self.dropout = cfg.num_heads, cfg.attention_dropout
        self.norm1, self.normk, self.norm2 = LayerNormFp32(D), LayerNormFp32(D), LayerNormFp32(D)  # eps 1e-5
        self.query, self.key, self.value, self.out_proj = (nn.Linear(D, D) for _ in range(4))
        self.w1, self.w3, self.w2 = nn.Linear(D, I), nn.Linear(D, I), nn.Linear(I, D)
        self.ffn_ln = LayerNormFp32(I, eps=cfg.layer_norm_eps)

    def attention(self, q: torch.Tensor, kv: torch.Tensor, return_weights: bool = False):
        B, Q, D = q.shape
        split = lambda t: t.view(B, t.shape[1], self.num_heads, D // self.num_heads).transpose(1, 2)
        q, k, v = split(self.query(q)), split(self.key(kv)), split(self.value(kv))  # (B, heads, T, head_dim)
        if return_weights:  # for pictures of where the queries look; the same numbers SDPA computes
            weights = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
            return (weights @ v).transpose(1, 2).reshape(B, Q, D), weights
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, Q, D), None

    def forward(self, q: torch.Tensor, x: torch.Tensor, return_weights: bool = False):
        qn = self.norm1(q)
        kv = torch.cat([qn, self.normk(x)], dim=1)  # (B, Q + N, D)
        ctx, weights = self.attention(qn, kv, return_weights)
        h = qn + self.out_proj(ctx)
        z = self.norm2(h)
        h = h + self.w2(self.ffn_ln(F.silu(self.w1(z)) * self.w3(z)))
        return h, weights


class VisualAbstractor(nn.Module):
    """f_K. ViT tokens (B, N, hidden) -> visual tokens for the LLM (B, num_queries + 1, llm_hidden)."""

    def __init__(self, cfg: AbstractorConfig):
        super().__init__()
        self.cfg = cfg
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_queries, cfg.hidden_size))
        self.layers = nn.ModuleList(AbstractorLayer(cfg) for _ in range(cfg.num_layers))
        self.visual_fc = nn.Linear(cfg.hidden_size, cfg.llm_hidden_size)
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, cfg.llm_hidden_size))

    def forward(self, x: torch.Tensor, return_weights: bool = False):
        q = self.query_tokens.expand(x.shape[0], -1, -1).to(x.dtype)
        all_weights = []
        for layer in self.layers:
            q, weights = layer(q, x, return_weights)
            all_weights.append(weights)
        out = self.visual_fc(q)  # (B, Q, llm_hidden)
        out = torch.cat([out, self.vit_eos.expand(out.shape[0], -1, -1).to(out.dtype)], dim=1)  # (B, Q+1, llm_hidden)
        return (out, all_weights) if return_weights else out

    def init_weights(self, std: float = 0.02) -> None:
        """Random init for training from scratch. The official code starts the queries at zero, which makes them
        identical and lets them learn only the same thing; small random values break the symmetry."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.query_tokens, std=std)
        nn.init.trunc_normal_(self.vit_eos, std=std)

    def official_key_map(self) -> dict:
        """Our state_dict key -> the official checkpoint key (an explicit table, built in a loop)."""
        table = {"query_tokens": "query_tokens", "vit_eos": "abstractor.vit_eos"}
        for name in ("weight", "bias"):
            table[f"visual_fc.{name}"] = f"abstractor.visual_fc.{name}"
        official = {"norm1": "norm1", "normk": "normk", "query": "attention.query", "key": "attention.key",
                    "value": "attention.value", "out_proj": "output.out_proj", "norm2": "output.norm2",
                    "w1": "output.mlp.w1", "w2": "output.mlp.w2", "w3": "output.mlp.w3", "ffn_ln": "output.mlp.ffn_ln"}
        for j in range(self.cfg.num_layers):
            for ours, theirs in official.items():
                for name in ("weight", "bias"):
                    table[f"layers.{j}.{ours}.{name}"] = f"abstractor.encoder.layers.{j}.crossattention.{theirs}.{name}"
        return table
