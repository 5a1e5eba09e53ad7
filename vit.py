"""f_V: the vision encoder of mPLUG-Owl, a ViT-L/14 (Dosovitskiy et al. 2020, as in OpenAI CLIP).

An image (B, 3, 224, 224) is cut into 16x16 patches of 14x14 pixels, a CLS token is prepended, learned position
embeddings are added, and 24 pre-LayerNorm transformer blocks mix the 257 tokens. The abstractor (f_K) reads all
257 outputs after `post_layernorm`. Stage 1 trains f_V (initialised from CLIP); stage 2 keeps it frozen.

Module names equal the official mPLUG-Owl keys (prefix `vision_model.`), so the official weights load one to one.

mPLUG-Owl2 (mPLUG-Owl2/mplug_owl2/model/visual_encoder.py) has the same tower and the same names below its prefix
`model.vision_model.` (VisionTransformer.owl2_key_map), with two differences: images of 448 pixels (32 x 32 patches
+ CLS = 1025 tokens, a position_embedding of 1025 rows), and plain nn.LayerNorm where v1 casts to float32 and back
(ViTConfig.fp32_norms = False). In bf16 both give the same numbers but for rare last-bit roundings (PyTorch's kernel
computes in float32 itself); they differ under CUDA autocast, where a plain LayerNorm returns float32 and so keeps
the residual stream in float32. Both versions run the attention softmax in the activations' dtype, not upcast.
"""
import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    layer_norm_eps: float = 1e-6  # mPLUG-Owl's value; CLIP's own checkpoint uses 1e-5
    fp32_norms: bool = True  # v1's LayerNormFp32; False: mPLUG-Owl2's plain nn.LayerNorm

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def preset(cls, name: str) -> "ViTConfig":
        presets = {
            "vit-l14": cls(),
            "tiny": cls(image_size=64, patch_size=8, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512),
            "owl2-7b": cls(image_size=448, fp32_norms=False),  # 32 x 32 patches + CLS = 1025 tokens
            # tiny at a higher resolution, as Owl2 is v1 at 448: 12 x 12 patches (abstractor preset owl2-tiny's grid)
            "owl2-tiny": cls(image_size=96, patch_size=8, hidden_size=128, num_layers=4, num_heads=4,
                             intermediate_size=512, fp32_norms=False),
        }
        if name not in presets:
            raise ValueError(f"unknown ViT preset {name!r}; choose from {sorted(presets)}")
        return presets[name]

    @classmethod
    def from_official(cls, d: dict) -> "ViTConfig":
        """From the `vision_config` of an mPLUG-Owl config.json (missing fields take the official defaults)."""
        names = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}
        ours = {f.name for f in fields(cls)} - {"fp32_norms"}  # ours, not a field of any official config
        kw = {names.get(k, k): v for k, v in d.items() if names.get(k, k) in ours}
        return cls(**kw)

    @classmethod
    def from_owl2(cls, d: dict) -> "ViTConfig":
        """From `visual_config["visual_model"]` of an mPLUG-Owl2 config.json (or the whole file); missing fields take
        the defaults of the official MplugOwlVisionConfig: ViT-L/14 at 448 pixels, eps 1e-6, quick_gelu."""
        if "visual_config" in d or d.get("model_type") == "mplug_owl2":
            d = (d.get("visual_config") or {}).get("visual_model") or {}  # none: the official defaults
        defaults = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=448, patch_size=14, layer_norm_eps=1e-6)
        for key, ok in (("hidden_act", "quick_gelu"), ("use_cls_token", True), ("use_post_layernorm", True),
                        ("num_channels", 3)):
            if d.get(key, ok) != ok:  # Owl2.1's ViT, e.g., has no CLS token: another model
                raise ValueError(f"visual_model.{key} is {d[key]!r}; f_V implements mPLUG-Owl2's tower with {ok!r}")
        return replace(cls.from_official({**defaults, **d}), fp32_norms=False)

    @classmethod
    def from_clip(cls, d: dict) -> "ViTConfig":
        """From an HF CLIP config.json (the whole file or its `vision_config`); CLIP's defaults where fields are missing."""
        d = d.get("vision_config", d)
        if d.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise ValueError(f"CLIP vision tower uses {d['hidden_act']!r}; f_V is defined with quick_gelu")
        defaults = dict(image_size=224, patch_size=32, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, layer_norm_eps=1e-5)
        return cls.from_official({**defaults, **d})


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back: bf16 statistics over 1024 channels are too coarse."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and x.dtype == self.weight.dtype and x.device.type in ("cpu", "cuda"):
            # PyTorch's CPU and CUDA kernels already compute bf16/fp16 statistics in float32 and round once at the
            # end; the casts below would only add two copies of x (a fifth of f_V's time in bf16 on CPU).
            return super().forward(x)
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


def layer_norm(cfg: ViTConfig) -> nn.LayerNorm:
    """f_V's LayerNorm: v1's float32 one, or mPLUG-Owl2's plain nn.LayerNorm (the same weights and keys)."""
    return (LayerNormFp32 if cfg.fp32_norms else nn.LayerNorm)(cfg.hidden_size, eps=cfg.layer_norm_eps)


class Embeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embed = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.hidden_size))
        self.pre_layernorm = layer_norm(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))  # (B, D, S/P, S/P)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)  # (B, 1+N, D): CLS first
        x = x + self.position_embedding[:, : x.shape[1]].to(x.dtype)
        return self.pre_layernorm(x)


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        # The fused projection is laid out head by head: [h0: q k v, h1: q k v, ...], not [all q | all k | all v].
        qkv = self.query_key_value(x).view(B, T, self.num_heads, 3, D // self.num_heads)
        q, k, v = qkv.permute(3, 0, 2, 1, 4)  # each (B, heads, T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v)  # no mask: every patch sees every patch
        return self.dense(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # quick_gelu, CLIP's activation: h * sigmoid(1.702 h), written as silu(1.702 h) / 1.702 (the same function):
        # one pass fewer over the (B, T, 4096) tensor, 1.6-1.8x faster on CPU, and still right for autograd
        return self.fc2(F.silu(1.702 * self.fc1(x)).mul_(1 / 1.702))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.input_layernorm = layer_norm(cfg)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = layer_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the residual added in place into each branch's fresh output (which no backward needs): no new tensor
        x = self.self_attn(self.input_layernorm(x)).add_(x)
        return self.mlp(self.post_attention_layernorm(x)).add_(x)


class Encoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


class VisionTransformer(nn.Module):
    """f_V. pixels (B, 3, S, S) -> (B, 1 + (S/P)^2, hidden), CLS first, after post_layernorm."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = layer_norm(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixels)))

    def owl2_key_map(self) -> dict:
        """Our state_dict key -> the mPLUG-Owl2 checkpoint key (an explicit table, built in a loop). The names
        below the prefix `model.vision_model.` are v1's: the official converter writes exactly these."""
        p = "model.vision_model."
        table = {name: p + name for name in
                 ("embeddings.cls_token", "embeddings.patch_embed.weight", "embeddings.position_embedding")}
        for name in ("weight", "bias"):
            table[f"embeddings.pre_layernorm.{name}"] = f"{p}embeddings.pre_layernorm.{name}"
            table[f"post_layernorm.{name}"] = f"{p}post_layernorm.{name}"
        official = {"input_layernorm": "input_layernorm", "self_attn.query_key_value": "self_attn.query_key_value",
                    "self_attn.dense": "self_attn.dense", "post_attention_layernorm": "post_attention_layernorm",
                    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        for i in range(self.cfg.num_layers):
            for ours, theirs in official.items():
                for name in ("weight", "bias"):
                    table[f"encoder.layers.{i}.{ours}.{name}"] = f"{p}encoder.layers.{i}.{theirs}.{name}"
        return table

    def init_weights(self, std: float = 0.02) -> None:
        """Random init for training from scratch. Position embeddings start as 2-D sin-cos values (still learned):
        small random ones leave a small ViT unable to tell left from right for a long time."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.embeddings.cls_token, std=std)
        grid = int(math.isqrt(self.cfg.num_patches))
        pos = sincos_2d(grid, self.cfg.hidden_size)
        with torch.no_grad():
            self.embeddings.position_embedding.zero_()
            self.embeddings.position_embedding[0, 1:] = pos

    @classmethod
    def from_clip(cls, folder, dtype: torch.dtype = torch.float32) -> "VisionTransformer":
        """Build f_V from an HF CLIP checkpoint folder (e.g. openai/clip-vit-large-patch14): stage 1's starting point."""
        folder = Path(folder)
        try:
            cfg = ViTConfig.from_clip(json.loads((folder / "config.json").read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{folder / 'config.json'} is not valid JSON ({e})") from None
        # a full CLIPModel also holds the text tower and projections, which f_V does not use
        sd = {k: v for k, v in read_state_dict(folder).items()
              if not k.startswith(("text_model.", "visual_projection", "text_projection", "logit_scale"))}
        model = cls(cfg).to(dtype)
        model.load_state_dict(clip_state_dict_to_owl(sd, cfg), strict=True)
        return model


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sine-cosine position codes, row-major like the patches: half for x, half for y."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (xs.flatten(), ys.flatten()):
        angles = coord[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    out = torch.cat(parts, dim=1)
    return F.pad(out, (0, dim - out.shape[1])).float()


def clip_state_dict_to_owl(sd: dict, cfg: ViTConfig) -> dict:
    """HF CLIP vision keys (with or without the `vision_model.` prefix) -> f_V keys. Separate q/k/v are packed into
    the head-interleaved fused weight. Every source key must be used: an unmapped key is an error that names it."""
    sd = {k.removeprefix("vision_model."): v for k, v in sd.items()}
    p = ""
    out, used = {}, set()

    def take(key):
        if key not in sd:
            raise KeyError(f"CLIP checkpoint is missing {key}")
        used.add(key)
        return sd[key]

    D, H = cfg.hidden_size, cfg.num_heads
    out["embeddings.cls_token"] = take(p + "embeddings.class_embedding").reshape(1, 1, D)
    out["embeddings.patch_embed.weight"] = take(p + "embeddings.patch_embedding.weight")
    out["embeddings.position_embedding"] = take(p + "embeddings.position_embedding.weight").unsqueeze(0)
    for name in ("weight", "bias"):
        out[f"embeddings.pre_layernorm.{name}"] = take(p + f"pre_layrnorm.{name}")  # (sic) HF's spelling
        out[f"post_layernorm.{name}"] = take(p + f"post_layernorm.{name}")
    for i in range(cfg.num_layers):
        src, dst = f"{p}encoder.layers.{i}.", f"encoder.layers.{i}."
        for name in ("weight", "bias"):
            q, k, v = (take(f"{src}self_attn.{x}_proj.{name}") for x in "qkv")
            # (3, heads, head_dim, ...) -> (heads, 3, head_dim, ...): the official interleaved order
            fused = torch.stack([q, k, v]).reshape(3, H, D // H, *q.shape[1:]).transpose(0, 1)
            out[f"{dst}self_attn.query_key_value.{name}"] = fused.reshape(3 * D, *q.shape[1:])
            out[f"{dst}self_attn.dense.{name}"] = take(f"{src}self_attn.out_proj.{name}")
            out[f"{dst}input_layernorm.{name}"] = take(f"{src}layer_norm1.{name}")
            out[f"{dst}post_attention_layernorm.{name}"] = take(f"{src}layer_norm2.{name}")
            out[f"{dst}mlp.fc1.{name}"] = take(f"{src}mlp.fc1.{name}")
            out[f"{dst}mlp.fc2.{name}"] = take(f"{src}mlp.fc2.{name}")
    ignored = {"embeddings.position_ids"}  # a buffer some HF versions save
    unused = sorted(set(sd) - used - ignored)
    if unused:
        raise KeyError(f"CLIP checkpoint key {unused[0]} has no place in f_V ({len(unused)} unmapped)")
    return out


def read_state_dict(folder: Path) -> dict:
    """All tensors of an HF-style folder: model.safetensors or pytorch_model.bin, single or sharded."""
    from safetensors.torch import load_file

    for index_name, loader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", _load_bin)):
        if (folder / index_name).exists():
            files = sorted(set(json.loads((folder / index_name).read_text())["weight_map"].values()))
            outside = [f for f in files if Path(f).name != f or f in (".", "..") or "\\" in f]
            if outside:  # a downloaded index must not make Owl open any other file of the machine
                raise ValueError(f"{folder / index_name} names shard {outside[0]!r}, which is not a file in {folder}")
            return {k: v for f in files for k, v in loader(folder / f).items()}
    if (folder / "model.safetensors").exists():
        return load_file(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").exists():
        return _load_bin(folder / "pytorch_model.bin")
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")


def _load_bin(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary code


# ---------------------------------------------------------------------------------------------------------------
# Image preprocessing. The official processor (mPLUG-Owl/mplug_owl/processing_mplug_owl.py, MplugOwlProcessor.
# __call__) squashes every image to size x size with bicubic filtering *before* HF's CLIPImageProcessor runs, so that
# processor's shortest-edge resize and centre crop do not change a pixel: a non-square image is never cropped. Of
# preprocessor_config.json only the mean and std are read; the few fields that would change the official result
# otherwise are refused (ImageTransform.from_preprocessor_config).

@dataclass
class ImageTransform:
    image_size: int = 224  # the side of the square the ViT sees
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    @classmethod
    def from_preprocessor_config(cls, d: dict, image_size: int) -> "ImageTransform":
        """The mean and std of a preprocessor_config.json. The fields that would make the official processor do
        something else (no scaling to [0, 1], no normalisation, a centre crop smaller than its square) are refused."""
        mean, std = d.get("image_mean", CLIP_MEAN), d.get("image_std", CLIP_STD)
        if not all(isinstance(v, (list, tuple)) and len(v) == 3 for v in (mean, std)):
            raise ValueError("preprocessor_config.json: image_mean and image_std must be three numbers each")
        size = d.get("size", 224)
        side = size.get("shortest_edge", 224) if isinstance(size, dict) else size
        crop = d.get("crop_size", 224)
        crop = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop, crop)
        unlike = [name for name, differs in (
            ("do_rescale", not d.get("do_rescale", True)), ("rescale_factor", d.get("rescale_factor", 1 / 255) != 1 / 255),
            ("do_normalize", not d.get("do_normalize", True)),
            ("crop_size", d.get("do_center_crop", True) and crop != (side, side))) if differs]
        if unlike:
            raise ValueError(f"preprocessor_config.json's {unlike[0]} asks for a preprocessing other than mPLUG-Owl's "
                             "(squash to a square, scale to [0, 1], normalise)")
        return cls(image_size, tuple(mean), tuple(std))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image of any mode and size -> (3, S, S) float tensor: squash to S x S (bicubic), RGB, /255, mean/std.
        The squash comes before the RGB conversion, in the image's own mode, as in the official processor: PIL
        resizes a palette image with nearest-neighbour and an RGBA image with premultiplied alpha."""
        S = self.image_size
        rgb = image.resize((S, S), resample=Image.BICUBIC).convert("RGB")
        x = np.asarray(rgb, dtype=np.float32) / 255.0  # (S, S, 3)
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def preprocess(image: Image.Image, image_size: int = 224) -> torch.Tensor:
    """The released inference preprocessing: RGB, bicubic resize to image_size^2, CLIP normalisation."""
    return ImageTransform(image_size)(image)
