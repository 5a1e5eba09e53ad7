"""f_K: the visual abstractor of mPLUG-Owl.

A fixed set of learnable queries (64 in the released model) cross-attends to all the ViT tokens of one image, six
layers deep, and is projected to the language model's width; a learned `vit_eos` token is appended. So every image,
whatever f_V produced, becomes num_queries + 1 = 65 tokens for f_L. Stage 1 trains f_K; the paper trains it in stage 2
too (the released code freezes it there).

Each layer, with q the queries and x the ViT output (the same x for every layer):
    qn = norm1(q);  kv = concat(qn, normk(x))          # the queries also attend to themselves
    h  = qn + out_proj(attention(query(qn), key(kv), value(kv)))   # residual from the *normalised* query
    h  = h + w2(ffn_ln(silu(w1(norm2(h))) * w3(norm2(h))))       # SwiGLU with a LayerNorm on its hidden

mPLUG-Owl2 (mPLUG-Owl2/mplug_owl2/model/visual_encoder.py) keeps this layer and adds fixed sin-cos positions
(AbstractorConfig.pos_embed): q_pos, MAE's 1-D code over the query index, and k_pos, MAE's 2-D code over the ViT's
grid x grid patches (the x/column half first) under a zero row for CLS. They are no weights: computed here in float32
as the official numpy does, kept out of the state_dict, cast to the normalised queries' dtype where they are added:
    Q = query(qn + q_pos);  K = key(kv + concat(q_pos, k_pos));  V = value(kv)    # V has no positions
Its norms are plain nn.LayerNorm (v1: float32 and back; the same numbers in bf16 but for rare last-bit roundings),
its attention dropout 0, and its queries sit inside the abstractor (`model.visual_abstractor.query_embeds`); visual_fc
and vit_eos are as in v1, so an image still gives 65 tokens. Keys: VisualAbstractor.owl2_key_map.
"""
from dataclasses import dataclass, fields

import numpy as np
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
    pos_embed: bool = False  # mPLUG-Owl2's fixed sin-cos positions on the queries and keys
    grid_size: int = 0  # with pos_embed: the ViT's patch grid side (32 for 448 / 14); the keys are 1 + grid^2
    fp32_norms: bool = True  # v1's LayerNormFp32; False: mPLUG-Owl2's plain nn.LayerNorm

    def __post_init__(self):
        if self.pos_embed and (self.grid_size < 1 or self.hidden_size % 4):
            raise ValueError("sin-cos positions need a grid_size and a hidden_size divisible by 4")

    @classmethod
    def preset(cls, name: str) -> "AbstractorConfig":
        presets = {
            "owl-7b": cls(),
            "tiny": cls(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=352, num_queries=16,
                        llm_hidden_size=192),
            "owl2-7b": cls(attention_dropout=0.0, pos_embed=True, grid_size=32, fp32_norms=False),
            "owl2-tiny": cls(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=352, num_queries=16,
                             llm_hidden_size=192, attention_dropout=0.0, pos_embed=True, grid_size=12,
                             fp32_norms=False),  # grid 12: ViT preset owl2-tiny, 96 / 8
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
        ours = {f.name for f in fields(cls)} - {"pos_embed", "grid_size", "fp32_norms"}  # mPLUG-Owl2's only
        kw = {names.get(k, k): v for k, v in {**official, **d}.items() if names.get(k, k) in ours}
        return cls(**{**kw, "num_queries": num_queries, "llm_hidden_size": llm_hidden_size})

    @classmethod
    def from_owl2(cls, d: dict, llm_hidden_size: int) -> "AbstractorConfig":
        """From `visual_config["visual_abstractor"]` of an mPLUG-Owl2 config.json (or the whole file), with the
        defaults of the official MplugOwlVisualAbstractorConfig for missing fields (grid_size None or 0 means 32)."""
        if "visual_config" in d or d.get("model_type") == "mplug_owl2":
            d = (d.get("visual_config") or {}).get("visual_abstractor") or {}
        official = dict(num_learnable_queries=64, hidden_size=1024, num_hidden_layers=6, num_attention_heads=16,
                        intermediate_size=2816, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6)
        d = {**official, **d}
        if not d.get("use_cls_token", True):
            raise ValueError("visual_abstractor.use_cls_token is false; f_K implements mPLUG-Owl2's with a CLS row")
        if d.get("encoder_hidden_size", d["hidden_size"]) != d["hidden_size"]:
            raise ValueError("visual_abstractor.encoder_hidden_size must equal its hidden_size")
        # add_v2t_pos_emb is not read: the official forward never uses the parameters it creates
        return cls(hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
                   intermediate_size=d["intermediate_size"], num_queries=d["num_learnable_queries"],
                   llm_hidden_size=llm_hidden_size, layer_norm_eps=d["layer_norm_eps"],
                   attention_dropout=d["attention_probs_dropout_prob"], pos_embed=True,
                   grid_size=d.get("grid_size") or 32, fp32_norms=False)


def sincos_1d(positions: np.ndarray, dim: int) -> np.ndarray:
    """MAE's 1-D code, (len(positions), dim): [sin(p w_i) | cos(p w_i)], w_i = 10000^(-i / (dim/2)), i < dim/2.
    numpy float32 step by step as the official get_1d_sincos_pos_embed_from_grid, so the tables are its bits."""
    omega = np.arange(dim // 2, dtype=np.float32) / np.float32(dim / 2)
    omega = 1.0 / 10000 ** omega
    angles = positions.reshape(-1).astype(np.float32)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d_with_cls(grid: int, dim: int) -> np.ndarray:
    """(1 + grid^2, dim): a zero row for CLS, then the patches row-major, each [1-D code of its column (x), dim/2 |
    1-D code of its row (y), dim/2]. The official get_2d_sincos_pos_embed calls its first half "h", but the grid it
    feeds it is meshgrid(w, h)[0], the column index."""
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32), indexing="ij")
    patches = np.concatenate([sincos_1d(cols, dim // 2), sincos_1d(rows, dim // 2)], axis=1)
    return np.concatenate([np.zeros((1, dim), dtype=np.float32), patches])


class AbstractorLayer(nn.Module):
    def __init__(self, cfg: AbstractorConfig):
        super().__init__()
        D, I = cfg.hidden_size, cfg.intermediate_size
        self.num_heads, self.dropout = cfg.num_heads, cfg.attention_dropout
        Norm = LayerNormFp32 if cfg.fp32_norms else nn.LayerNorm
        self.norm1, self.normk, self.norm2 = Norm(D), Norm(D), Norm(D)  # eps 1e-5
        self.query, self.key, self.value, self.out_proj = (nn.Linear(D, D) for _ in range(4))
        self.w1, self.w3, self.w2 = nn.Linear(D, I), nn.Linear(D, I), nn.Linear(I, D)
        self.ffn_ln = Norm(I, eps=cfg.layer_norm_eps)

    def attention(self, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor, return_weights: bool = False):
        B, Q, D = q_in.shape
        split = lambda t: t.view(B, t.shape[1], self.num_heads, D // self.num_heads).transpose(1, 2)
        q, k, v = split(self.query(q_in)), split(self.key(k_in)), split(self.value(v_in))  # (B, heads, T, head_dim)
        if return_weights:  # for pictures of where the queries look; the same numbers SDPA computes
            weights = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
            return (weights @ v).transpose(1, 2).reshape(B, Q, D), weights
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, Q, D), None

    def forward(self, q: torch.Tensor, x: torch.Tensor, return_weights: bool = False, pos=None):
        """pos: None (v1), or mPLUG-Owl2's float32 tables (q_pos (Q, D), k_pos (N, D)) on q's device."""
        qn = self.norm1(q)
        kv = torch.cat([qn, self.normk(x)], dim=1)  # (B, Q + N, D)
        if pos is None:
            ctx, weights = self.attention(qn, kv, kv, return_weights)
        else:  # cast to the normalised queries' dtype before adding, as the official code casts them
            q_pos, k_pos = (t.to(qn.dtype) for t in pos)
            ctx, weights = self.attention(qn + q_pos, kv + torch.cat([q_pos, k_pos]), kv, return_weights)
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
        if cfg.pos_embed:  # fixed, not weights: out of the state_dict; from numpy, so real even on a meta build
            D = cfg.hidden_size
            q_pos = sincos_1d(np.arange(cfg.num_queries, dtype=np.float32), D)
            self.register_buffer("q_pos", torch.from_numpy(q_pos), persistent=False)  # (Q, D)
            k_pos = sincos_2d_with_cls(cfg.grid_size, D)
            self.register_buffer("k_pos", torch.from_numpy(k_pos), persistent=False)  # (1 + grid^2, D)

    def forward(self, x: torch.Tensor, return_weights: bool = False):
        q = self.query_tokens.expand(x.shape[0], -1, -1).to(x.dtype)
        pos = None
        if self.cfg.pos_embed:
            if x.shape[1] != self.k_pos.shape[0]:
                raise ValueError(f"f_K's positions cover CLS + {self.cfg.grid_size}^2 patches = {self.k_pos.shape[0]} "
                                 f"ViT tokens; got {x.shape[1]}")
            # moved here once per call: a model built on meta and filled by a loader keeps them on the CPU
            pos = (self.q_pos.to(x.device), self.k_pos.to(x.device))
        all_weights = []
        for layer in self.layers:
            q, weights = layer(q, x, return_weights, pos)
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
        return self._key_map("abstractor.", queries="query_tokens")

    def owl2_key_map(self) -> dict:
        """Our state_dict key -> the mPLUG-Owl2 checkpoint key: prefix `model.visual_abstractor.`, the queries
        inside it as `query_embeds`, the layers named as in v1. q_pos and k_pos are not in it (not weights)."""
        return self._key_map("model.visual_abstractor.", queries="model.visual_abstractor.query_embeds")

    def owl2_table_keys(self) -> dict:
        """The official mPLUG-Owl2 key -> our table, for the sin-cos tables the official code keeps as persistent
        buffers: a checkpoint saved by its save_pretrained holds them, the hub's converted one does not. A loader
        may skip them or compare them with ours."""
        p = "model.visual_abstractor.encoder.layers."
        table = {}
        for j in range(self.cfg.num_layers):
            table[f"{p}{j}.crossattention.attention.q_pos_embed"] = self.q_pos
            table[f"{p}{j}.crossattention.attention.k_pos_embed"] = self.k_pos
        return table

    def _key_map(self, prefix: str, queries: str) -> dict:
        table = {"query_tokens": queries, "vit_eos": prefix + "vit_eos"}
        for name in ("weight", "bias"):
            table[f"visual_fc.{name}"] = f"{prefix}visual_fc.{name}"
        official = {"norm1": "norm1", "normk": "normk", "query": "attention.query", "key": "attention.key",
                    "value": "attention.value", "out_proj": "output.out_proj", "norm2": "output.norm2",
                    "w1": "output.mlp.w1", "w2": "output.mlp.w2", "w3": "output.mlp.w3", "ffn_ln": "output.mlp.ffn_ln"}
        for j in range(self.cfg.num_layers):
            for ours, theirs in official.items():
                for name in ("weight", "bias"):
                    table[f"layers.{j}.{ours}.{name}"] = f"{prefix}encoder.layers.{j}.crossattention.{theirs}.{name}"
        return table
