"""f_L: the language model of mPLUG-Owl, LLaMA (Touvron et al. 2023), written out by hand.

Pre-RMSNorm decoder blocks with rotary position embeddings (RoPE) and a SwiGLU MLP; attention through
scaled_dot_product_attention with a pre-allocated KV cache for generation. It reads token ids or ready-made input
embeddings: mPLUG-Owl splices the 65 visual tokens of each image into the embeddings of the prompt.
Stage 1 keeps f_L frozen; stage 2 trains LoRA adapters on its q_proj and v_proj.

Module names equal HF's LlamaForCausalLM keys, so an HF checkpoint loads one to one (RoPE in the "rotate half"
layout). Meta's original `consolidated.*.pth` layout is converted on load (the q/k row permutation).

mPLUG-Owl2's LLaMA-2 is the same decoder with its "modality-adaptive module" (LlamaConfig.modality_adaptive): two
copies of some weights, one for text tokens and one for visual tokens; see Multiway.
"""
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: Optional[int] = None  # None: as many as num_heads (LLaMA-1); fewer is grouped-query attention
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    modality_adaptive: bool = False  # mPLUG-Owl2: two copies of each layer's norms and k/v projections (Multiway)

    def __post_init__(self):
        self.num_kv_heads = self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def preset(cls, name: str) -> "LlamaConfig":
        presets = {
            "llama-7b": cls(),
            "tiny": cls(vocab_size=512, hidden_size=192, intermediate_size=512, num_layers=4, num_heads=6,
                        max_position_embeddings=512),
            "owl2-7b": cls(rms_norm_eps=1e-6, max_position_embeddings=2048, modality_adaptive=True),
            "owl2-tiny": cls(vocab_size=512, hidden_size=192, intermediate_size=512, num_layers=4, num_heads=6,
                             max_position_embeddings=512, modality_adaptive=True),
        }
        if name not in presets:
            raise ValueError(f"unknown LLaMA preset {name!r}; choose from {sorted(presets)}")
        return presets[name]

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        """From an HF LlamaConfig dict; HF's LLaMA defaults where fields are missing. mPLUG-Owl2's config.json
        (model_type "mplug_owl2": a LlamaConfig plus visual_config) gives its modality-adaptive LLaMA."""
        rope = d.get("rope_parameters") or {}  # transformers 5 keeps rope_theta and rope_type here, 4.x at top level
        if d.get("rope_scaling") or rope.get("rope_type", "default") != "default":
            raise ValueError("rope_scaling is not supported: f_L implements plain RoPE as in LLaMA")
        d = {**d, "rope_theta": rope.get("rope_theta", d.get("rope_theta", 10000.0))}
        names = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                 "num_key_value_heads": "num_kv_heads"}
        if d.get("model_type") == "mplug_owl2":
            d = {**d, "modality_adaptive": True}
        ours = {f.name for f in fields(cls)}
        return cls(**{names.get(k, k): v for k, v in d.items() if names.get(k, k) in ours and v is not None})

    def to_hf(self) -> dict:
        """HF's LlamaConfig dict; a modality-adaptive config adds "modality_adaptive": true (which from_hf reads
        back; HF's LlamaForCausalLM cannot hold its weights)."""
        extra = {"modality_adaptive": True} if self.modality_adaptive else {}
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads, "rms_norm_eps": self.rms_norm_eps,
                "max_position_embeddings": self.max_position_embeddings, "rope_theta": self.rope_theta,
                "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
                "pad_token_id": 0, **extra}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()  # the mean square in float32, as LLaMA was trained
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(cfg: LlamaConfig, length: int, device) -> tuple:
    """cos, sin of shape (length, head_dim): dimension i pairs with i + head_dim/2 (the HF "rotate half" layout).
    sin's first half is negated, so that apply_rope needs no negation of its own at every call."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device, dtype=torch.float32) / cfg.head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return torch.cat([angles, angles], dim=-1).cos(), torch.cat([-angles.sin(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, head_dim); cos/sin (B or 1, 1, T, head_dim) in x's dtype, sin from rope_tables (first half
    negated). HF's x * cos + rotate_half(x) * sin, with rotate_half(x) * sin = [-x2, x1] * sin written as
    [x2, x1] * [-sin, sin]: the same products exactly, in 4 operations instead of 7."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def _row_blocks(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w @ x with w cut into one block of rows per thread, multiplied as a batch: each thread streams its own block."""
    k = torch.get_num_threads()
    n, d = w.shape
    return torch.bmm(x.view(1, 1, d).expand(k, 1, d), w.view(k, n // k, d).transpose(1, 2)).view(n)


# The kernels that can multiply a weight (n, d) by one vector (d,); all give w @ x, in different summation orders.
DECODE_KERNELS = {
    "F.linear": lambda w, x: F.linear(x.view(1, -1), w).view(-1),  # MKL (fp32) or oneDNN (bf16); a 1-D x would be mv
    "torch.mv": lambda w, x: torch.mv(w, x),  # PyTorch's own matrix-vector kernel
    "row blocks": _row_blocks,  # only where the rows split evenly over the threads
}
DECODE_TIMES = {}  # (weight shape, dtype, threads) -> {kernel name, or "packed": seconds a call on this machine}


def pack(w: torch.Tensor) -> torch.Tensor:
    """w laid out in oneDNN's own blocked format, once, for products with one row at a time. F.linear on a bf16
    weight runs oneDNN, which lays the weight out like this on every call; a packed weight skips that."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)


def packed_linear(x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    """x @ w.T + bias for a packed w (any number of rows): the same oneDNN product as F.linear on the plain w."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def packable(w: torch.Tensor) -> bool:
    """Whether w is a bf16 CPU weight and this PyTorch build can pack it. Only bf16: there F.linear is oneDNN's
    product too, so packing changes no result; an fp32 F.linear is MKL's, and a packed fp32 weight would round the
    prompt's products differently from HF's and the official code's, for a few % of speed at most (docs/speed.md)."""
    return (w.device.type == "cpu" and w.dtype == torch.bfloat16 and not w.is_mkldnn
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def cpu_bf16_flags() -> list:
    """The bf16 instructions this CPU has (avx512_bf16, amx_bf16), where bf16 matmuls beat fp32 ones; elsewhere they
    are emulated and slower. Read from /proc/cpuinfo (none where there is none)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()]


def time_decode_kernels(w: torch.Tensor) -> dict:
    """Seconds per call of each kernel that applies to w, and of the packed product where w can be packed: the best
    of 3 rounds (a first call's set-up or another process can only slow a round down). A decode step reads each
    weight from memory, not from a cache, so a small weight is timed over copies of it (up to 16, 64 MiB in all)."""
    k = torch.get_num_threads()
    ws = [w] + [w.clone() for _ in range(min(15, (64 << 20) // (w.numel() * w.element_size()) - 1))]
    x = torch.randn(w.shape[1], dtype=w.dtype)
    runs = {name: (f, ws) for name, f in DECODE_KERNELS.items() if name != "row blocks" or w.shape[0] % k == 0}
    if packable(w):
        try:
            packed = [pack(v) for v in ws]
            packed_linear(x.view(1, -1), packed[0])
            runs["packed"] = (lambda p, x: packed_linear(x.view(1, -1), p).view(-1), packed)
        except RuntimeError:  # e.g. a CPU without the instructions oneDNN needs for bf16: no candidate then
            pass
    seconds = {name: [] for name in runs}
    for _ in range(3):
        for name, (f, weights) in runs.items():  # in turn, so that a slow moment does not fall on one kernel only
            start = time.perf_counter()
            for v in weights:
                f(v, x)
            seconds[name].append((time.perf_counter() - start) / len(weights))
    return {name: min(s) for name, s in seconds.items()}


def decode_times(w: torch.Tensor) -> dict:
    """time_decode_kernels for w's shape, dtype and thread count, timed once and then remembered."""
    key = (tuple(w.shape), w.dtype, torch.get_num_threads())
    if key not in DECODE_TIMES:
        DECODE_TIMES[key] = time_decode_kernels(w)
    return DECODE_TIMES[key]


def decode_kernel(w: torch.Tensor) -> str:
    """The name of the fastest kernel for a plain (unpacked) w, timed on its first use."""
    times = decode_times(w)
    return min(DECODE_KERNELS.keys() & times.keys(), key=times.get)


def packs_faster(w: torch.Tensor) -> bool:
    """Whether w, packed, multiplies a vector faster than every kernel on the plain w does on this machine."""
    times = decode_times(w)
    return "packed" in times and times["packed"] < times[decode_kernel(w)]


class Linear(nn.Linear):
    """nn.Linear (same parameter, same state-dict key) with faster paths for inference on CPU.

    A decode step multiplies every weight matrix by a single vector, so its speed is the rate at which the weights
    stream from memory, and which kernel streams fastest depends on the CPU: MKL's fp32 matrix-vector kernel runs on
    one core on a 2-core AMD EPYC (row blocks in a bmm use both), oneDNN re-packs a bf16 weight on every call and
    beats torch.mv there but not on an Intel Xeon with AMX. So the candidates are timed on this machine, once per
    shape, dtype and thread count (decode_times; bench.py shows each one's rate), and the fastest is used.
    Llama.pack_for_inference goes further where it is faster: the weight itself is kept packed (see pack), and
    every product, of one row or many, is then oneDNN's on the packed weight; such a Linear has no gradient.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.is_mkldnn:
            if torch.is_grad_enabled():
                raise RuntimeError("this model's weights are packed for inference (pack_for_inference): it cannot "
                                   "be trained; load the checkpoint again without packing to train it")
            return packed_linear(x, self.weight, self.bias)
        n, d = self.weight.shape
        if (x.numel() != d or x.device.type != "cpu" or self.bias is not None or torch.is_grad_enabled()
                or torch.compiler.is_compiling()):  # nothing is timed under autograd or inside a compiled graph
            return F.linear(x, self.weight, self.bias)
        kernel = DECODE_KERNELS[decode_kernel(self.weight)]
        return kernel(self.weight, x.reshape(d)).reshape(*x.shape[:-1], n)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.weight.is_mkldnn:  # oneDNN's layout is no tensor a checkpoint can hold
            raise RuntimeError(f"{prefix}weight is packed for inference (pack_for_inference) and cannot be saved; "
                               "load the checkpoint again without packing to save it")
        super()._save_to_state_dict(destination, prefix, keep_vars)


def keep_plain(module: nn.Module, skip=frozenset()) -> None:
    """Copy each CPU parameter of module (but those whose id is in skip) into memory of its own, so that none is a
    view of a memory-mapped checkpoint file any more."""
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            if id(p) not in skip and p.device.type == "cpu" and not p.is_mkldnn:
                setattr(m, name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))


TEXT, VISUAL = 0, 1  # the modality indicator's values, and the numbers of a Multiway's copies


def modality_route(modality: Optional[torch.Tensor], B: int, T: int):
    """Where the B * T tokens of a step go in every Multiway, worked out once per forward (its host syncs too)
    rather than in each of a layer's 4 Multiways: TEXT or VISUAL when all tokens take that copy (every decode
    step), else (text index, visual index), the flat positions of the tokens of each copy. modality (B, T): 0 text,
    1 visual, int or bool; None is all text."""
    if modality is None:
        return TEXT
    if tuple(modality.shape) != (B, T):
        raise ValueError(f"modality has shape {tuple(modality.shape)}, the tokens {(B, T)}")
    flat = modality.reshape(-1)
    if flat.dtype != torch.bool and not ((flat == TEXT) | (flat == VISUAL)).all():
        raise ValueError("modality holds a value other than 0 (text) and 1 (visual)")
    visual = flat.bool().nonzero()[:, 0]
    if len(visual) == 0:
        return TEXT
    if len(visual) == len(flat):
        return VISUAL
    return (~flat.bool()).nonzero()[:, 0], visual


class Multiway(nn.Module):
    """mPLUG-Owl2's modality-adaptive module: one module in two copies, `multiway.0` for text tokens and
    `multiway.1` for visual tokens, each token passed through the copy of its modality. Owl2 makes one of each
    layer's input_layernorm, post_attention_layernorm, self_attn.k_proj and self_attn.v_proj, so text and visual
    tokens get their own normalisation and their own keys and values, while q_proj, o_proj and the MLP (and so the
    attention between all tokens) are shared. Copies act on each token alone (a norm, a bias-free Linear), so
    computing a copy on just its tokens gives what it gives them in the whole sequence.

    route: from modality_route; a step whose tokens all share a modality calls that copy on x directly."""

    def __init__(self, make):
        super().__init__()
        self.multiway = nn.ModuleList([make(), make()])  # [TEXT], [VISUAL]: the official key names

    def forward(self, x: torch.Tensor, route) -> torch.Tensor:
        if isinstance(route, int):
            return self.multiway[route](x)
        flat = x.reshape(-1, x.shape[-1])
        ys = [copy(flat.index_select(0, index)) for copy, index in zip(self.multiway, route)]
        out = ys[0].new_empty(len(flat), ys[0].shape[-1])
        for index, y in zip(route, ys):
            out.index_copy_(0, index, y)
        return out.view(*x.shape[:-1], -1)


def routed(module: nn.Module, x: torch.Tensor, route) -> torch.Tensor:
    """module(x); for a Multiway, each token through its modality's copy (the one module of a v1 LLaMA takes all)."""
    return module(x, route) if isinstance(module, Multiway) else module(x)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        D, hd = cfg.hidden_size, cfg.head_dim
        kv = lambda: Linear(D, cfg.num_kv_heads * hd, bias=False)
        self.q_proj = Linear(D, cfg.num_heads * hd, bias=False)
        self.k_proj = Multiway(kv) if cfg.modality_adaptive else kv()
        self.v_proj = Multiway(kv) if cfg.modality_adaptive else kv()
        self.o_proj = Linear(cfg.num_heads * hd, D, bias=False)
        self.cache_k = self.cache_v = None  # (B, kv_heads, max_len, head_dim) once setup_cache is called

    def forward(self, x, cos, sin, start_pos: int, mask: Optional[torch.Tensor], route=TEXT) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, self.cfg.num_heads, hd).transpose(1, 2)  # (B, heads, T, hd)
        # the cache keeps projected keys and values: each token's copy is chosen once, here
        k = routed(self.k_proj, x, route).view(B, T, self.cfg.num_kv_heads, hd).transpose(1, 2)  # (B, kv_heads, T, hd)
        v = routed(self.v_proj, x, route).view(B, T, self.cfg.num_kv_heads, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache_k is not None:  # write this step into the pre-allocated cache
            self.cache_k[:B, :, start_pos: start_pos + T] = k
            self.cache_v[:B, :, start_pos: start_pos + T] = v
            if start_pos > 0:  # attend to all of it so far, in the cache's dtype (see Llama.setup_cache)
                k, v = self.cache_k[:B, :, : start_pos + T], self.cache_v[:B, :, : start_pos + T]
                q = q.to(k.dtype)
        gqa = self.cfg.num_kv_heads != self.cfg.num_heads
        if mask is None:  # a causal prefill from position 0, or one new token that may see everything before it
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.to(x.dtype).transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm = Multiway(norm) if cfg.modality_adaptive else norm()
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = Multiway(norm) if cfg.modality_adaptive else norm()
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, start_pos, mask, route=TEXT):
        # the residual added in place into each branch's fresh output (which no backward needs): no new tensor
        x = self.self_attn(routed(self.input_layernorm, x, route), cos, sin, start_pos, mask, route).add_(x)
        return self.mlp(routed(self.post_attention_layernorm, x, route)).add_(x)


class Decoder(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class ChunkedCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of the logits x @ weight.T against targets, made a block of rows at a time so the
    (N, vocab) float32 logits never exist whole: with vocab 32000 they take 128 KB a row, and a plain
    F.cross_entropy keeps two more tensors of that size (its log-softmax and, in backward, its gradient). Here the
    gradients are made in the forward, block by block, from d loss / d logits = softmax - one_hot(target); the
    backward only scales them by the incoming gradient. x (N, D), weight (vocab, D), targets (N,); grads: whether
    to make them at all (not under no_grad)."""

    @staticmethod
    def forward(ctx, x, weight, targets, grads: bool):
        rows = max(1, (1 << 24) // weight.shape[0])  # 64 MB of float32 logits a block
        want_x, want_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if want_x else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        for i in range(0, len(x), rows):
            xi, ti = x[i: i + rows], targets[i: i + rows]
            logits = F.linear(xi, weight).float()  # (rows, vocab)
            lse = logits.logsumexp(-1)
            loss += (lse - logits.gather(1, ti[:, None])[:, 0]).sum()  # -log softmax at the target
            if want_x or want_w:
                g = logits.sub_(lse[:, None]).exp_()  # the softmax, in place of the logits
                g[torch.arange(len(ti), device=g.device), ti] -= 1.0
                g = g.to(x.dtype)
                if want_x:
                    grad_x[i: i + rows] = g @ weight
                if want_w:
                    grad_w.addmm_(g.t().float(), xi.float())  # summed in float32 over the blocks
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        grad_x = None if grad_x is None else grad_x * grad_loss.to(grad_x.dtype)
        grad_w = None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype)
        return grad_x, grad_w, None, None


class Llama(nn.Module):
    """f_L. Token ids (B, T) or input embeddings (B, T, hidden) -> next-token logits (B, T, vocab)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.grad_checkpointing = False
        self._rope = {}  # (device, dtype) -> (cos, sin) for max_position_embeddings positions, made on first use

    def rope(self, device, dtype) -> tuple:
        """The RoPE tables, made in float32 and rounded to dtype once (as HF rounds them at every call)."""
        key = (torch.device(device), dtype)
        if key not in self._rope:
            self._rope[key] = tuple(t.to(dtype) for t in rope_tables(self.cfg, self.cfg.max_position_embeddings, device))
        return self._rope[key]

    def forward(self, input_ids=None, inputs_embeds=None, start_pos: int = 0, positions=None, mask=None,
                last_only: bool = False, targets: Optional[torch.Tensor] = None, modality=None):
        """start_pos: where these tokens sit in the KV cache (0 without a cache). positions (B, T): explicit RoPE
        positions, for left-padded batches; mask: a boolean attention mask (B, 1, T, start_pos + T), True = attend.
        The lm_head (at hidden 1024 as heavy as 2.5 decoder layers) runs only where logits are wanted:
        last_only: the last position alone, (B, 1, vocab): all that generating the next token needs;
        targets (B, T): the token each position should predict, -100 for none: returns instead the summed
        cross-entropy over the positions with a target, their logits made a block at a time (ChunkedCrossEntropy).
        modality (B, T): each token's modality, 0 text, 1 visual (None: all text), which picks its copy in every
        Multiway of a modality-adaptive model; a v1 model has one copy of everything and ignores it."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        route = modality_route(modality, B, T) if self.cfg.modality_adaptive else TEXT
        end = start_pos + T if positions is None else int(positions.max()) + 1  # left pads hold no position
        if end > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {end} tokens exceeds the context of {self.cfg.max_position_embeddings}")
        cos, sin = self.rope(x.device, x.dtype)
        if positions is None:
            cos, sin = cos[start_pos: start_pos + T][None, None], sin[start_pos: start_pos + T][None, None]
        else:
            cos, sin = cos[positions][:, None], sin[positions][:, None]  # (B, 1, T, head_dim)
        if mask is None and T > 1 and start_pos > 0:  # a chunk appended to a cache: causal within, sees all before
            mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(start_pos)
        for layer in self.model.layers:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, start_pos, mask, route, use_reentrant=False)
            else:
                x = layer(x, cos, sin, start_pos, mask, route)
        if targets is not None:
            if self.lm_head.weight.is_mkldnn:
                raise RuntimeError("the loss needs the plain lm_head weight; this model is packed for inference")
            keep = targets != -100
            x, targets = self.model.norm(x[keep]), targets[keep]  # (N, D), (N,)
            if type(self.lm_head) is not Linear:  # LoRA on the lm_head: its own forward
                return F.cross_entropy(self.lm_head(x).float(), targets, reduction="sum")
            return ChunkedCrossEntropy.apply(x, self.lm_head.weight, targets, torch.is_grad_enabled())
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x)).float()

    @torch.no_grad()
    def pack_for_inference(self, others=()) -> "Llama":
        """For generation only: each Linear whose weight multiplies a vector faster packed (timed on this machine
        for its shape, see packs_faster) keeps its weight packed from now on, in place of the plain one. Prefill and
        decode then both run oneDNN's product on the packed weights (the same arithmetic as F.linear's). The model
        can no longer be trained or saved: load it again for that. others: modules loaded from the same checkpoint
        files (Owl's f_V and f_K), copied out of them too when anything is packed."""
        todo = [m for m in self.modules() if type(m) is Linear and packable(m.weight) and packs_faster(m.weight)]
        if todo:
            # A loaded weight may still be a view of the checkpoint's memory-mapped file (iter_tensors), which stays
            # mapped, and counted as resident, while any tensor views it. So the weights not packed are copied out
            # first, and the rest packed in the order they lie in memory: each file is let go once its last weight
            # is packed, before the next is read, and memory stays near one copy of the weights.
            for module in (*others, self):
                keep_plain(module, skip={id(m.weight) for m in todo})
            for m in sorted(todo, key=lambda m: m.weight.data_ptr()):
                m.weight = nn.Parameter(pack(m.weight), requires_grad=False)
        return self

    def setup_cache(self, batch_size: int, max_len: int = 0) -> None:
        """Pre-allocate every layer's KV cache once, so decoding writes in place instead of concatenating.
        A bf16 or fp16 model on CPU keeps its cache in float32, and a new token attends in float32: PyTorch's CPU
        attention of one query is 2-4x slower in bf16 than in float32 (docs/speed.md). The keys and values are the
        bf16 ones exactly; only the attention's own sums are finer. It costs twice the cache's memory (a 7B model:
        1 MB a position instead of 0.5)."""
        max_len = max_len or self.cfg.max_position_embeddings
        p = self.lm_head.weight
        dtype = torch.float32 if p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16) else p.dtype
        shape = (batch_size, self.cfg.num_kv_heads, max_len, self.cfg.head_dim)
        for layer in self.model.layers:
            layer.self_attn.cache_k = torch.zeros(shape, dtype=dtype, device=p.device)
            layer.self_attn.cache_v = torch.zeros(shape, dtype=dtype, device=p.device)

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.cache_k = layer.self_attn.cache_v = None

    @torch.inference_mode()
    def generate(self, input_ids=None, inputs_embeds=None, max_new_tokens: int = 32, eos_id: int = 2,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, generator=None,
                 modality=None) -> Iterator[int]:
        """Yield new token ids one by one for a single sequence (batch 1), stopping after EOS or max_new_tokens.
        modality (1, T): the prompt's modality indicator (see forward); every new token is text."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        T = x.shape[1]
        self.setup_cache(1, min(self.cfg.max_position_embeddings, T + max_new_tokens))
        try:
            logits = self(inputs_embeds=x, start_pos=0, last_only=True, modality=modality)[:, -1]
            for i in range(max_new_tokens):
                token = sample(logits, temperature, top_k, top_p, generator)
                yield token
                if token == eos_id or T + i + 1 >= self.cfg.max_position_embeddings or i + 1 == max_new_tokens:
                    return
                logits = self(torch.tensor([[token]], device=x.device), start_pos=T + i)[:, -1]
        finally:
            self.clear_cache()

    @torch.inference_mode()
    def generate_batch(self, inputs_embeds: torch.Tensor, lengths: List[int], max_new_tokens: int = 32,
                       eos_id: int = 2, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                       generator=None, modality=None) -> List[List[int]]:
        """The new token ids of several sequences at once. inputs_embeds (B, T, hidden) is left-padded: row b's real
        tokens are its last lengths[b]. Each row's RoPE positions start at 0 at its first real token, and no query
        ever sees a pad, in the prefill and at every step, so a row's answer is what `generate` gives it alone
        (greedy: token for token; sampling draws the rows in turn, so the random stream differs). A row stops after
        EOS, at max_new_tokens or at the context, and leaves the batch; the batch stops when no row is left.
        modality (B, T): the prompts' modality indicators, left-padded as inputs_embeds (a pad's value does not
        matter, as no query sees a pad; 0 by convention); every new token is text."""
        B, T, _ = inputs_embeds.shape
        device, context = inputs_embeds.device, self.cfg.max_position_embeddings
        real = torch.arange(T, device=device)[None] >= T - torch.tensor(lengths, device=device)[:, None]  # (B, T)
        positions = (real.cumsum(1) - 1).clamp(min=0)  # (B, T): 0 at each row's first real token
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        # a pad query sees only itself: a query that sees nothing would make NaNs, and NaNs leak through 0 weights
        mask = (causal & real[:, None, :]) | torch.eye(T, dtype=torch.bool, device=device)  # (B, T, T)
        self.setup_cache(B, T + min(max_new_tokens, context - min(lengths)))
        answers, rows = [[] for _ in range(B)], list(range(B))  # rows: the rows still in the batch, in cache order
        try:
            logits = self(inputs_embeds=inputs_embeds, positions=positions, mask=mask[:, None], last_only=True,
                          modality=modality)[:, -1]  # (B, vocab)
            for i in range(max_new_tokens):
                tokens = [sample(logits[j: j + 1], temperature, top_k, top_p, generator) for j in range(len(rows))]
                for row, token in zip(rows, tokens):
                    answers[row].append(token)
                keep = [j for j, token in enumerate(tokens) if token != eos_id and lengths[j] + i + 1 < context]
                if not keep or i + 1 == max_new_tokens:
                    break
                if len(keep) < len(rows):  # finished rows leave the batch and its cache
                    rows, tokens, lengths = ([seq[j] for j in keep] for seq in (rows, tokens, lengths))
                    real = real[keep]
                    self._keep_cache_rows(torch.tensor(keep, device=device))
                real = torch.cat([real, real.new_ones(len(rows), 1)], dim=1)  # (B', T + i + 1)
                positions = torch.tensor(lengths, device=device)[:, None] + i  # (B', 1)
                logits = self(torch.tensor(tokens, device=device)[:, None], start_pos=T + i, positions=positions,
                              mask=real[:, None, None, :])[:, -1]
        finally:
            self.clear_cache()
        return answers

    def _keep_cache_rows(self, keep: torch.Tensor) -> None:
        for layer in self.model.layers:
            a = layer.self_attn
            a.cache_k, a.cache_v = a.cache_k[keep], a.cache_v[keep]

    def init_weights(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    @classmethod
    def from_hf(cls, folder, dtype=torch.float32, device="cpu") -> "Llama":
        """An HF LLaMA folder: config.json and model.safetensors / pytorch_model.bin, single or sharded."""
        folder = Path(folder)
        cfg = LlamaConfig.from_hf(read_json(folder / "config.json"))
        model = build_empty(cls, cfg)
        ignore = lambda k: k.endswith("rotary_emb.inv_freq")  # a buffer old checkpoints carry; RoPE is recomputed
        load_into(model, ((k, t) for k, t in iter_tensors(folder) if not ignore(k)), dtype, device)
        return model

    @classmethod
    def from_meta(cls, folder, dtype=torch.float32, device="cpu") -> "Llama":
        """Meta's original layout: params.json + consolidated.*.pth (model-parallel shards are concatenated)."""
        folder = Path(folder)
        params = read_json(folder / "params.json")
        shards = [torch.load(p, map_location="cpu", weights_only=True, mmap=True)
                  for p in sorted(folder.glob("consolidated.*.pth"))]
        if not shards:
            raise FileNotFoundError(f"no consolidated.*.pth in {folder}")
        cat_dim = lambda k: 1 if k.endswith(("wo.weight", "w2.weight")) or k == "tok_embeddings.weight" else 0
        sd = {k: (shards[0][k] if shards[0][k].dim() == 1 or len(shards) == 1
                  else torch.cat([s[k] for s in shards], dim=cat_dim(k))) for k in shards[0] if "rope.freqs" not in k}
        vocab, dim = sd["tok_embeddings.weight"].shape
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=sd["layers.0.feed_forward.w1.weight"].shape[0],
                          num_layers=params["n_layers"], num_heads=params["n_heads"], num_kv_heads=params.get("n_kv_heads"),
                          rms_norm_eps=params.get("norm_eps", 1e-6), rope_theta=params.get("rope_theta", 10000.0),
                          max_position_embeddings=params.get("max_seq_len", 2048))
        model = build_empty(cls, cfg)
        load_into(model, meta_to_hf(sd, cfg).items(), dtype, device)
        return model


def sample(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, generator=None) -> int:
    """One token from (1, vocab) logits: greedy when temperature is 0, else temperature, top-k, then top-p."""
    if temperature <= 0:
        return int(logits.argmax(-1)[0])
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator)[0])


def meta_to_hf(sd: dict, cfg: LlamaConfig) -> dict:
    """Meta's key names -> HF's. Meta's q/k rows pair dims (2i, 2i+1); HF's rotate-half pairs (i, i + hd/2)."""

    def permute(w, n_heads):  # per head: rows [0,1,2,3,...] (pairs adjacent) -> [0,2,4,...,1,3,5,...]
        return w.view(n_heads, cfg.head_dim // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    out = {"model.embed_tokens.weight": sd.pop("tok_embeddings.weight"), "model.norm.weight": sd.pop("norm.weight"),
           "lm_head.weight": sd.pop("output.weight")}
    for n in range(cfg.num_layers):
        src, dst = f"layers.{n}.", f"model.layers.{n}."
        out[dst + "self_attn.q_proj.weight"] = permute(sd.pop(src + "attention.wq.weight"), cfg.num_heads)
        out[dst + "self_attn.k_proj.weight"] = permute(sd.pop(src + "attention.wk.weight"), cfg.num_kv_heads)
        out[dst + "self_attn.v_proj.weight"] = sd.pop(src + "attention.wv.weight")
        out[dst + "self_attn.o_proj.weight"] = sd.pop(src + "attention.wo.weight")
        out[dst + "mlp.gate_proj.weight"] = sd.pop(src + "feed_forward.w1.weight")
        out[dst + "mlp.up_proj.weight"] = sd.pop(src + "feed_forward.w3.weight")
        out[dst + "mlp.down_proj.weight"] = sd.pop(src + "feed_forward.w2.weight")
        out[dst + "input_layernorm.weight"] = sd.pop(src + "attention_norm.weight")
        out[dst + "post_attention_layernorm.weight"] = sd.pop(src + "ffn_norm.weight")
    if sd:
        raise KeyError(f"Meta checkpoint key {sorted(sd)[0]} has no place in f_L")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Loading without materialising random weights: build on the meta device, then put each checkpoint tensor in place,
# one at a time in the target dtype, so a 7B model in bf16 needs little more memory than its weights.

def build_empty(cls, *args) -> nn.Module:
    with torch.device("meta"):
        return cls(*args)


def read_json(path: Path) -> dict:
    """A JSON file of a checkpoint folder; a file that is not JSON is an error that names it."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds a JSON {type(d).__name__}, not an object")
    return d


def shard_names(index: Path) -> list:
    """The shard files an index's weight_map names, each a bare file name in the index's own folder: a downloaded
    index must not make Owl open any other file of the machine (a name such as ../../../etc/passwd). Shards that are
    symbolic links (the HF cache's layout) are fine: the name is checked, not where the link points."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no weight_map")
    names = sorted(set(weight_map.values()), key=str)
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") or "\\" in name:
            raise ValueError(f"{index} names shard {name!r}, which is not a file in {index.parent}")
    return names


def iter_tensors(folder) -> Iterator[tuple]:
    """(key, tensor) for every tensor of an HF-style folder, shard by shard; .bin files are read weights-only."""
    from safetensors import safe_open

    folder = Path(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).exists():
            files = shard_names(folder / index_name)
            break
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).exists()][:1]
    if not files:
        raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or shard index in {folder}")
    for name in files:
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"shard {name} named in the index is missing from {folder}")
        if name.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        else:
            # mmap keeps the pickle's tensors on disk until each is copied into place
            yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()


def load_into(model: nn.Module, items, dtype, device="cpu", key_map: Optional[dict] = None) -> None:
    """Strictly fill a (meta-device) model: every checkpoint key must map to a parameter of the same shape, and every
    parameter must be filled. key_map: checkpoint key -> our key (identity where absent)."""
    params = dict(model.named_parameters())
    filled = set()
    for key, tensor in items:
        name = key_map.get(key) if key_map is not None else key
        if name is None or name not in params:
            raise KeyError(f"unexpected key {key} in checkpoint: it has no place in the model")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(f"key {key} has shape {tuple(tensor.shape)}, the model expects {tuple(params[name].shape)}")
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        t = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        setattr(module, leaf, nn.Parameter(t, requires_grad=params[name].requires_grad))
        filled.add(name)
    missing = sorted(set(params) - filled)
    if missing:  # named as the checkpoint names it, so the user can look for it there
        to_checkpoint = {ours: theirs for theirs, ours in (key_map or {}).items()}
        raise KeyError(f"missing key {to_checkpoint.get(missing[0], missing[0])} in checkpoint ({len(missing)} missing)")


class Tokenizer:
    """LLaMA's SentencePiece tokenizer: unk 0, bos 1, eos 2; pad is unk, as in the released model."""

    def __init__(self, path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.pad_id = self.unk_id
        self.vocab_size = self.sp.get_piece_size()
        # HF's "legacy" reading (tokenizer_config.json): False spells text after a special token without the
        # leading space; the caller that splits on special tokens sets it
        self.legacy = True

    def encode(self, text: str) -> list:
        """Ids of text without BOS/EOS. SentencePiece adds its dummy-prefix space to each call, as HF's slow
        LlamaTokenizer does for every chunk it is given."""
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        """Text of ids, special tokens (unk, bos, eos) skipped, as decode(..., skip_special_tokens=True)."""
        special = {self.bos_id, self.eos_id, self.unk_id}
        # ids past the tokenizer's pieces (an embedding table padded beyond the vocabulary) have no text either
        return self.sp.decode([i for i in ids if i not in special and 0 <= i < self.vocab_size])
