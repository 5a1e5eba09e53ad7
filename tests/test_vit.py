"""f_V's claims, each checked against an independent reference: HF's CLIPVisionModel, HF's CLIPImageProcessor, or
the official formula written out here with plain torch / numpy / PIL (never our own code against itself)."""
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModel

import vit
from conftest import assert_close

TINY_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8, hidden_act="quick_gelu")


def jitter_(model: torch.nn.Module, std: float = 0.05) -> None:
    """HF starts biases at 0 and LayerNorms at (1, 0); noise on every parameter makes a mis-mapped bias visible."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)


def tiny_hf_clip_vision(**overrides) -> CLIPVisionModel:
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(**{**TINY_CLIP, **overrides})
    cfg._attn_implementation = "eager"  # attention written out by HF, not SDPA as ours
    hf = CLIPVisionModel(cfg).eval()
    jitter_(hf)
    return hf


def hf_reference(hf: CLIPVisionModel, pixels: torch.Tensor) -> torch.Tensor:
    """HF's last_hidden_state stops before post_layernorm; f_V's output is after it (the abstractor reads that)."""
    tower = getattr(hf, "vision_model", hf)  # transformers 5 flattened CLIPVisionModel; 4.x nests a vision_model
    with torch.no_grad():
        out = hf(pixel_values=pixels)
        torch.testing.assert_close(out.pooler_output, tower.post_layernorm(out.last_hidden_state[:, 0]))
        return tower.post_layernorm(out.last_hidden_state)


# --- f_V equals OpenAI CLIP's vision tower (HF layout) --------------------------------------------------------------

def test_vit_matches_hf_clip_vision_model(tmp_path):
    hf = tiny_hf_clip_vision()
    hf.save_pretrained(tmp_path)
    ours = vit.VisionTransformer.from_clip(tmp_path).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = ours(pixels)
    ref = hf_reference(hf, pixels)
    assert out.shape == ref.shape == (2, 1 + (32 // 8) ** 2, 64)
    assert_close(out, ref, ops=64)


def test_vit_from_full_clip_model_uses_only_the_vision_tower(tmp_path):
    """openai/clip-vit-large-patch14 is a CLIPModel (keys `vision_model.`, plus a text tower f_V must skip)."""
    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(text_config=text, vision_config=TINY_CLIP, projection_dim=16)
    cfg._attn_implementation = "eager"
    hf = CLIPModel(cfg).eval()
    jitter_(hf)
    hf.save_pretrained(tmp_path)
    ours = vit.VisionTransformer.from_clip(tmp_path).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = hf.vision_model.post_layernorm(hf.vision_model(pixel_values=pixels).last_hidden_state)
        assert_close(ours(pixels), ref, ops=64)


def test_clip_layer_norm_eps_is_read_from_the_config(tmp_path):
    """CLIP uses eps 1e-5 (mPLUG-Owl 1e-6): f_V must take it from config.json. A large eps makes the check sharp."""
    hf = tiny_hf_clip_vision()
    hf.save_pretrained(tmp_path / "clip")
    ours = vit.VisionTransformer.from_clip(tmp_path / "clip")
    norms = [m for m in ours.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 + 2 * TINY_CLIP["num_hidden_layers"]
    assert all(m.eps == 1e-5 for m in norms)

    odd = tiny_hf_clip_vision(layer_norm_eps=0.3)
    odd.save_pretrained(tmp_path / "odd")
    ours = vit.VisionTransformer.from_clip(tmp_path / "odd").eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close(ours(pixels), hf_reference(odd, pixels), ops=64)
    # the same weights with a fixed eps would not match: the comparison above sees the eps
    for m in ours.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-5
    with torch.no_grad():
        assert (ours(pixels) - hf_reference(odd, pixels)).abs().max() > 1e-3


def test_bf16_layer_norms_equal_the_float32_computation_rounded_once():
    """f_V's norms promise float32 statistics; in bf16 they may skip the casts because PyTorch's kernel computes in
    float32 itself: the same numbers as casting up, normalising and casting back, but for rare last-bit roundings."""
    torch.manual_seed(0)
    norm = vit.LayerNormFp32(1024, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1), norm.bias.normal_(0.0, 0.1)
    norm = norm.bfloat16()
    x = (torch.randn(4, 257, 1024) * 3 + 1).bfloat16()
    with torch.no_grad():
        cast = F.layer_norm(x.float(), (1024,), norm.weight.float(), norm.bias.float(), 1e-6).bfloat16()
        out = norm(x)
    assert (out != cast).float().mean() < 1e-3
    torch.testing.assert_close(out.float(), cast.float(), rtol=2 ** -7, atol=1e-5)  # one bf16 step at most


def test_clip_checkpoint_with_an_unknown_vision_key_is_an_error_naming_it(tmp_path):
    hf = tiny_hf_clip_vision()
    hf.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in sd) else ""
    sd[prefix + "encoder.layers.1.self_attn.rel_pos_bias"] = torch.zeros(4)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=re.escape("encoder.layers.1.self_attn.rel_pos_bias")):
        vit.VisionTransformer.from_clip(tmp_path)


def test_clip_checkpoint_with_a_missing_key_is_an_error_naming_it(tmp_path):
    hf = tiny_hf_clip_vision()
    hf.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    (key,) = [k for k in sd if k.endswith("encoder.layers.1.mlp.fc2.bias")]
    del sd[key]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=re.escape("encoder.layers.1.mlp.fc2.bias")):
        vit.VisionTransformer.from_clip(tmp_path)


# --- the head-interleaved fused QKV ---------------------------------------------------------------------------------

def attention_by_hand(x, wq, bq, wk, bk, wv, bv, wo, bo, heads):
    """softmax(q k^T / sqrt(d)) v per head, from separate projections; heads split contiguously."""
    B, T, D = x.shape
    d = D // heads
    q, k, v = x @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        att = torch.softmax(q[..., sl] @ k[..., sl].transpose(-1, -2) / d ** 0.5, dim=-1)
        outs.append(att @ v[..., sl])
    return torch.cat(outs, dim=-1) @ wo.T + bo


def test_fused_qkv_is_head_interleaved_not_three_blocks():
    """The official query_key_value rows are [h0: q k v, h1: q k v, ...]; reading them as [all q | all k | all v]
    gives a different (wrong) answer with no error, so the layout must be checked by value."""
    torch.manual_seed(0)
    D, H = 32, 4
    d = D // H
    cfg = vit.ViTConfig(image_size=16, patch_size=8, hidden_size=D, num_layers=1, num_heads=H, intermediate_size=64)
    wq, wk, wv, wo = (torch.randn(D, D) / D ** 0.5 for _ in range(4))
    bq, bk, bv, bo = (torch.randn(D) * 0.1 for _ in range(4))
    # pack by hand, head by head: rows h*3d .. h*3d+d are head h's q, then its k, then its v
    w_rows, b_rows = [], []
    for h in range(H):
        for w, b in ((wq, bq), (wk, bk), (wv, bv)):
            w_rows.append(w[h * d:(h + 1) * d])
            b_rows.append(b[h * d:(h + 1) * d])
    w_fused, b_fused = torch.cat(w_rows), torch.cat(b_rows)
    assert w_fused.shape == (3 * D, D)

    attn = vit.Attention(cfg).eval()
    x = torch.randn(2, 5, D)
    expected = attention_by_hand(x, wq, bq, wk, bk, wv, bv, wo, bo, H)
    with torch.no_grad():
        attn.dense.weight.copy_(wo)
        attn.dense.bias.copy_(bo)
        attn.query_key_value.weight.copy_(w_fused)
        attn.query_key_value.bias.copy_(b_fused)
        assert_close(attn(x), expected, ops=32)

        # the same weights packed as three blocks give a different result: the test sees the layout
        attn.query_key_value.weight.copy_(torch.cat([wq, wk, wv]))
        attn.query_key_value.bias.copy_(torch.cat([bq, bk, bv]))
        assert (attn(x) - expected).abs().max() > 1e-2


# --- shapes of the released model -----------------------------------------------------------------------------------

SPEC_VIT_L14 = {  # the released checkpoint's f_V keys, prefix `vision_model.` dropped
    "embeddings.cls_token": (1, 1, 1024),
    "embeddings.patch_embed.weight": (1024, 3, 14, 14),
    "embeddings.position_embedding": (1, 257, 1024),
    "embeddings.pre_layernorm.weight": (1024,), "embeddings.pre_layernorm.bias": (1024,),
    "post_layernorm.weight": (1024,), "post_layernorm.bias": (1024,),
    **{f"encoder.layers.{i}.{k}": s for i in range(24) for k, s in {
        "input_layernorm.weight": (1024,), "input_layernorm.bias": (1024,),
        "self_attn.query_key_value.weight": (3072, 1024), "self_attn.query_key_value.bias": (3072,),
        "self_attn.dense.weight": (1024, 1024), "self_attn.dense.bias": (1024,),
        "post_attention_layernorm.weight": (1024,), "post_attention_layernorm.bias": (1024,),
        "mlp.fc1.weight": (4096, 1024), "mlp.fc1.bias": (4096,),
        "mlp.fc2.weight": (1024, 4096), "mlp.fc2.bias": (1024,),
    }.items()},
}


def test_vit_l14_gives_257_tokens_and_has_the_official_keys_and_shapes():
    with torch.device("meta"):
        model = vit.VisionTransformer(vit.ViTConfig.preset("vit-l14"))
        out = model(torch.empty(2, 3, 224, 224))
    assert out.shape == (2, 257, 1024)  # 16 x 16 patches + CLS
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == SPEC_VIT_L14
    assert model.embeddings.patch_embed.bias is None  # the patch Conv2d has no bias
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))


def test_cls_token_comes_first_and_patches_are_row_major():
    """The embeddings written out: [CLS; patch(0,0), patch(0,1), ...] + position_embedding, then pre_layernorm."""
    torch.manual_seed(0)
    cfg = vit.ViTConfig(image_size=24, patch_size=8, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    emb = vit.Embeddings(cfg).eval()
    jitter_(emb, std=0.5)
    pixels = torch.randn(2, 3, 24, 24)
    W = emb.patch_embed.weight  # (D, 3, P, P)
    tokens = [emb.cls_token[0, 0].expand(2, -1)]
    for r in range(3):
        for c in range(3):
            patch = pixels[:, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8]
            tokens.append(torch.einsum("bchw,dchw->bd", patch, W))
    x = torch.stack(tokens, dim=1) + emb.position_embedding
    ln = emb.pre_layernorm
    expected = F.layer_norm(x, (16,), ln.weight, ln.bias, cfg.layer_norm_eps)
    with torch.no_grad():
        assert_close(emb(pixels), expected, ops=32)
        # a column-major flattening would give a different sequence
        assert (emb(pixels.transpose(2, 3)) - expected).abs().max() > 1e-2


# --- preprocessing ----------------------------------------------------------------------------------------------------

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def released_preprocessing(image: Image.Image, size: int, mean=MEAN, std=STD) -> np.ndarray:
    """The official processor's result, written out with PIL and numpy: bicubic squash to size x size in the image's
    own mode (MplugOwlProcessor.__call__ resizes the image as opened), then RGB, [0, 1], mean/std; (3, size, size)."""
    rgb = image.resize((size, size), Image.BICUBIC).convert("RGB")
    x = np.array(rgb).astype(np.float32) / 255.0
    return ((x - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)


def make_image(mode: str, w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": 1}[mode if mode != "P" else "L"]
    arr = rng.integers(0, 256, size=(h, w, bands), dtype=np.uint8)
    # a smooth gradient under the noise, so the resize has structure to get right
    arr = (arr // 2 + (np.arange(w)[None, :, None] * 127 // max(w - 1, 1))).astype(np.uint8)
    if mode in ("L", "P"):
        img = Image.fromarray(arr[..., 0], "L")
        return img.convert("P", palette=Image.ADAPTIVE, colors=32) if mode == "P" else img
    return Image.fromarray(arr, mode)


@pytest.mark.parametrize("mode,w,h", [("RGB", 224, 224), ("RGBA", 301, 177), ("L", 97, 333), ("P", 255, 255),
                                      ("CMYK", 640, 479), ("RGB", 1, 1), ("RGB", 13, 500)])
def test_preprocess_any_mode_and_size_gives_a_normalised_224_square(mode, w, h):
    img = make_image(mode, w, h)
    x = vit.preprocess(img, 224)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert np.array_equal(x.numpy(), released_preprocessing(img, 224))


def test_an_rgba_image_is_squashed_with_its_alpha_before_the_alpha_is_dropped():
    """PIL resizes RGBA with premultiplied alpha, so a transparent pixel's hidden colour never bleeds into its
    neighbours; dropping the alpha first (convert, then resize) would let it."""
    arr = np.zeros((64, 64, 4), dtype=np.uint8)
    arr[..., 0] = 255  # red everywhere ...
    arr[:, 32:, 3] = 255  # ... but only the right half is opaque
    img = Image.fromarray(arr, "RGBA")
    x = vit.preprocess(img, 24).numpy()
    assert np.array_equal(x, released_preprocessing(img, 24))
    converted_first = released_preprocessing(img.convert("RGB"), 24)
    assert np.abs(x - converted_first).max() > 1.0


def test_preprocess_squashes_instead_of_cropping():
    """The release resizes without keeping the aspect ratio: the left and right edges of a wide image survive."""
    arr = np.zeros((100, 400, 3), dtype=np.uint8)
    arr[:, :50] = 255  # a white band on the far left, which a centre crop would cut away
    x = vit.preprocess(Image.fromarray(arr), 224)
    white = (1.0 - MEAN) / STD
    np.testing.assert_allclose(x[:, 112, 0].numpy(), white, atol=1e-4)


HUB_PREPROCESSOR = {  # MAGAer13/mplug-owl-llama-7b's preprocessor_config.json, as the hub ships it
    "resolution": 224, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}
CLIP_PREPROCESSOR = {  # openai/clip-vit-large-patch14's preprocessor_config.json: shortest edge + centre crop
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224},
}
OTHER_STATS = {**HUB_PREPROCESSOR, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.3, 0.35]}


@pytest.mark.parametrize("config", [HUB_PREPROCESSOR, CLIP_PREPROCESSOR, OTHER_STATS], ids=["hub", "clip", "stats"])
@pytest.mark.parametrize("w,h", [(320, 240), (250, 401), (225, 224)])
def test_image_transform_matches_the_official_squash_then_hf_clip_image_processor(config, w, h):
    """The official pipeline: squash to 224 x 224 bicubic, then HF's CLIPImageProcessor built from the config. Its
    shortest-edge resize and centre crop then change nothing, so no config crops a non-square image; the mean and
    std are the config's."""
    transform = vit.ImageTransform.from_preprocessor_config(config, 224)
    hf = CLIPImageProcessor(**config)
    img = make_image("RGB", w, h, seed=w)
    ref = hf(images=img.resize((224, 224), Image.BICUBIC), return_tensors="np")["pixel_values"][0]
    ours = transform(img)
    assert ours.shape == (3, 224, 224) == ref.shape
    np.testing.assert_allclose(ours.numpy(), ref, atol=4 * np.finfo(np.float32).eps * np.abs(ref).max(), rtol=0)
