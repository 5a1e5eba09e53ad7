"""mPLUG-Owl2's f_V and f_K (mPLUG-Owl2/mplug_owl2/model/visual_encoder.py), each claim checked against a reference
written here from the formulas with numpy or plain torch ops on the official checkpoint names: the sin-cos tables,
the abstractor layer with its positions (float32 and bf16), the 448-style tower at another size, the key tables."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vit
from abstractor import AbstractorConfig, LayerNormFp32, VisualAbstractor
from conftest import assert_close

VIT = "model.vision_model."
ABS = "model.visual_abstractor."


def jitter_(model: torch.nn.Module, std: float = 0.05) -> None:
    """Noise on every parameter (LayerNorm affines and biases too), so a mis-mapped one shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)


# --- 1. the sin-cos tables, by hand ----------------------------------------------------------------------------------

def mae_1d(pos: np.ndarray, dim: int) -> np.ndarray:
    """MAE's 1-D code in float64, one frequency at a time: column i is sin(p / 10000^(i/(dim/2))), column dim/2 + i
    its cosine."""
    out = np.zeros((len(pos), dim))
    for i in range(dim // 2):
        angle = pos.astype(np.float64) / 10000.0 ** (i / (dim / 2))
        out[:, i], out[:, dim // 2 + i] = np.sin(angle), np.cos(angle)
    return out


def mae_2d_with_cls(grid: int, dim: int) -> np.ndarray:
    """Row 0 zero (CLS); row 1 + r*grid + c (patch at row r, column c): [mae_1d(c) | mae_1d(r)], each dim/2 wide."""
    index = np.arange(grid * grid)
    row, col = index // grid, index % grid
    out = np.zeros((1 + grid * grid, dim))
    out[1:, :dim // 2], out[1:, dim // 2:] = mae_1d(col, dim // 2), mae_1d(row, dim // 2)
    return out


# The tables are float32 as the official numpy computes them; float32 angles up to 63 rad are off by a few 1e-6.
TABLE_ATOL = 3e-5


def test_query_table_is_the_1d_code_over_the_query_index():
    with torch.device("meta"):  # the tables come from numpy, so they are real even on a meta build (as a loader makes)
        model = VisualAbstractor(AbstractorConfig.preset("owl2-7b"))
    assert model.q_pos.device.type == "cpu" and model.q_pos.dtype == torch.float32
    assert model.q_pos.shape == (64, 1024)
    np.testing.assert_allclose(model.q_pos.numpy(), mae_1d(np.arange(64), 1024), atol=TABLE_ATOL, rtol=0)


def test_grid_table_is_a_zero_cls_row_then_the_2d_code_x_half_first():
    with torch.device("meta"):
        model = VisualAbstractor(AbstractorConfig.preset("owl2-7b"))
    k = model.k_pos.numpy()
    assert k.shape == (1 + 32 * 32, 1024) and model.k_pos.dtype == torch.float32
    assert not k[0].any()  # CLS gets no position
    np.testing.assert_allclose(k, mae_2d_with_cls(32, 1024), atol=TABLE_ATOL, rtol=0)
    patches = k[1:].reshape(32, 32, 1024)  # (row, column, dim)
    # the first half depends on the column only, the second on the row only
    assert np.array_equal(patches[:, :, :512], np.broadcast_to(patches[:1, :, :512], patches[:, :, :512].shape))
    assert np.array_equal(patches[:, :, 512:], np.broadcast_to(patches[:, :1, 512:], patches[:, :, 512:].shape))
    assert np.abs(patches[0, 1, :512] - patches[0, 0, :512]).max() > 0.1  # ... and does depend on it


# --- 2. the abstractor layer with positions, from the formula --------------------------------------------------------

def ref_layer(W: dict, j: int, q, x, q_pos, k_pos, heads: int, variant: str = ""):
    """mPLUG-Owl2's abstractor layer j in plain torch ops on the official keys, in q's dtype: the tables are cast to it
    before they are added (as the official forward casts them); scores, scale, softmax in that dtype too.
        qn = norm1(q); kv = [qn; normk(x)]; Q = query(qn + q_pos); K = key(kv + [q_pos; k_pos]); V = value(kv)
        h = qn + out_proj(MHA); h = h + w2(ffn_ln(silu(w1(norm2 h)) * w3(norm2 h)))
    variant: a plausible mistake, for the tests that show the comparison sees it."""
    p = f"{ABS}encoder.layers.{j}.crossattention."
    ln = lambda t, n, eps: F.layer_norm(t, t.shape[-1:], W[n + ".weight"], W[n + ".bias"], eps)
    lin = lambda t, n: t @ W[n + ".weight"].T + W[n + ".bias"]
    B, Q, D = q.shape
    d = D // heads
    split = lambda t: t.reshape(B, t.shape[1], heads, d).permute(0, 2, 1, 3)

    qn = ln(q, p + "norm1", 1e-5)
    kv = torch.cat([qn, ln(x, p + "normk", 1e-5)], dim=1)
    qp, kp = q_pos.to(qn.dtype), k_pos.to(qn.dtype)
    k_in = kv + torch.cat([qp, kp])
    if variant == "no_query_positions_in_keys":
        k_in = kv + torch.cat([torch.zeros_like(qp), kp])
    v_in = k_in if variant == "positions_on_values" else kv
    q_in = qn if variant == "no_positions" else qn + qp
    if variant == "no_positions":
        k_in = kv
    Qh, Kh, Vh = split(lin(q_in, p + "attention.query")), split(lin(k_in, p + "attention.key")), \
        split(lin(v_in, p + "attention.value"))
    att = torch.softmax(Qh @ Kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    ctx = (att @ Vh).permute(0, 2, 1, 3).reshape(B, Q, D)
    h = qn + lin(ctx, p + "output.out_proj")
    z = ln(h, p + "output.norm2", 1e-5)
    return h + lin(ln(F.silu(lin(z, p + "output.mlp.w1")) * lin(z, p + "output.mlp.w3"), p + "output.mlp.ffn_ln", 1e-6),
                   p + "output.mlp.w2")


def tables(cfg: AbstractorConfig, variant: str = ""):
    """The hand tables as float32 tensors; variant: a wrong grid table (halves swapped, CLS row last)."""
    q = mae_1d(np.arange(cfg.num_queries), cfg.hidden_size)
    k = mae_2d_with_cls(cfg.grid_size, cfg.hidden_size)
    if variant == "y_half_first":
        k = np.concatenate([k[:, cfg.hidden_size // 2:], k[:, :cfg.hidden_size // 2]], axis=1)
    if variant == "cls_row_last":
        k = np.concatenate([k[1:], k[:1]])
    return torch.tensor(q, dtype=torch.float32), torch.tensor(k, dtype=torch.float32)


def random_owl2_abstractor(seed: int = 0):
    torch.manual_seed(seed)
    cfg = AbstractorConfig.preset("owl2-tiny")
    model = VisualAbstractor(cfg)
    model.init_weights()
    jitter_(model, 0.1)
    q = torch.randn(2, cfg.num_queries, cfg.hidden_size)
    x = torch.randn(2, 1 + cfg.grid_size ** 2, cfg.hidden_size)
    return model.eval(), cfg, q, x


def official(model) -> dict:
    sd = model.state_dict()
    return {theirs: sd[ours] for ours, theirs in model.owl2_key_map().items()}


def test_owl2_layer_matches_the_formula_in_float32():
    model, cfg, q, x = random_owl2_abstractor()
    q_pos, k_pos = tables(cfg)
    with torch.no_grad():
        out, _ = model.layers[1](q, x, pos=(q_pos, k_pos))
        assert_close(out, ref_layer(official(model), 1, q, x, q_pos, k_pos, cfg.num_heads), ops=64)


def test_owl2_layer_matches_the_formula_in_bf16_with_the_tables_cast_to_bf16():
    """A bf16 model gets the float32 tables and rounds them to bf16 before adding, as the official forward does. The
    reference runs scores and softmax in bf16 as the official code; f_K uses SDPA, which rounds elsewhere: a few bf16
    steps of the largest value apart, against the tens that a wrong term gives."""
    model, cfg, q, x = random_owl2_abstractor()
    q_pos, k_pos = tables(cfg)
    model = model.bfloat16()
    q, x = q.bfloat16(), x.bfloat16()
    W = official(model)
    with torch.no_grad():
        out, _ = model.layers[0](q, x, pos=(q_pos, k_pos))
        expected = ref_layer(W, 0, q, x, q_pos, k_pos, cfg.num_heads)
        assert out.dtype == torch.bfloat16
        assert_close(out, expected, ops=4, dtype=torch.bfloat16)
        wrong = ref_layer(W, 0, q, x, q_pos, k_pos, cfg.num_heads, variant="positions_on_values")
        with pytest.raises(AssertionError):
            assert_close(out, wrong, ops=4, dtype=torch.bfloat16)


@pytest.mark.parametrize("variant", ["no_positions", "positions_on_values", "no_query_positions_in_keys",
                                     "y_half_first", "cls_row_last"])
def test_the_layer_comparison_sees_each_detail(variant):
    """Each of these mistakes moves the output far beyond the float32 test's tolerance."""
    model, cfg, q, x = random_owl2_abstractor()
    q_pos, k_pos = tables(cfg)
    wrong_q, wrong_k = tables(cfg, variant)
    with torch.no_grad():
        out, _ = model.layers[1](q, x, pos=(q_pos, k_pos))
        wrong = ref_layer(official(model), 1, q, x, wrong_q, wrong_k, cfg.num_heads, variant)
        with pytest.raises(AssertionError):
            assert_close(out, wrong, ops=64)


def test_owl2_abstractor_matches_the_formula_through_its_key_table():
    """The whole f_K from the official keys: query_embeds through every layer with the hand tables, visual_fc, vit_eos
    last; num_queries + 1 tokens of the LLM's width."""
    model, cfg, _, x = random_owl2_abstractor()
    q_pos, k_pos = tables(cfg)
    W = official(model)
    q = W[ABS + "query_embeds"].expand(2, -1, -1)
    for j in range(cfg.num_layers):
        q = ref_layer(W, j, q, x, q_pos, k_pos, cfg.num_heads)
    expected = torch.cat([q @ W[ABS + "visual_fc.weight"].T + W[ABS + "visual_fc.bias"],
                          W[ABS + "vit_eos"].expand(2, -1, -1)], dim=1)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, cfg.num_queries + 1, cfg.llm_hidden_size)
        assert_close(out, expected, ops=64)
        out, weights = model(x, return_weights=True)  # the picture path adds the same positions
        assert_close(out, expected, ops=64)
    assert weights[-1].shape == (2, cfg.num_heads, cfg.num_queries, cfg.num_queries + 1 + cfg.grid_size ** 2)


def test_owl2_7b_abstractor_gives_65_tokens_and_refuses_another_grid():
    with torch.device("meta"):
        model = VisualAbstractor(AbstractorConfig.preset("owl2-7b")).eval()
        assert model(torch.empty(3, 1025, 1024)).shape == (3, 65, 4096)
        with pytest.raises(ValueError, match="1025"):
            model(torch.empty(3, 257, 1024))  # a 224-pixel ViT's tokens: the 2-D table does not fit


# --- 3. the vision tower at another size, plain LayerNorms -----------------------------------------------------------

def ref_vit(W: dict, pixels: torch.Tensor, cfg: vit.ViTConfig) -> torch.Tensor:
    """mPLUG-Owl2's tower in plain ops on the official keys, in the weights' dtype, with plain LayerNorms in that
    dtype: patches row-major, CLS first, positions, pre-LN blocks with the head-interleaved fused QKV, scores and
    softmax in that dtype, quick_gelu, post_layernorm."""
    P, D, H = cfg.patch_size, cfg.hidden_size, cfg.num_heads
    B, G, d = pixels.shape[0], cfg.image_size // cfg.patch_size, cfg.hidden_size // cfg.num_heads
    ln = lambda t, n: F.layer_norm(t, (D,), W[VIT + n + ".weight"], W[VIT + n + ".bias"], cfg.layer_norm_eps)
    lin = lambda t, n: t @ W[VIT + n + ".weight"].T + W[VIT + n + ".bias"]
    cells = pixels.reshape(B, 3, G, P, G, P).permute(0, 2, 4, 1, 3, 5)  # (B, row, column, channel, y, x)
    x = cells.reshape(B, G * G, 3 * P * P) @ W[VIT + "embeddings.patch_embed.weight"].reshape(D, -1).T
    x = torch.cat([W[VIT + "embeddings.cls_token"].expand(B, -1, -1), x], dim=1)
    x = ln(x + W[VIT + "embeddings.position_embedding"], "embeddings.pre_layernorm")
    for i in range(cfg.num_layers):
        p = f"encoder.layers.{i}."
        qkv = lin(ln(x, p + "input_layernorm"), p + "self_attn.query_key_value").reshape(B, -1, H, 3, d)
        q, k, v = (qkv[:, :, :, j].transpose(1, 2) for j in range(3))
        att = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, dim=-1)
        x = x + lin((att @ v).transpose(1, 2).reshape(B, -1, D), p + "self_attn.dense")
        h = lin(ln(x, p + "post_attention_layernorm"), p + "mlp.fc1")
        x = x + lin(h * torch.sigmoid(1.702 * h), p + "mlp.fc2")
    return ln(x, "post_layernorm")


def random_owl2_tower(seed: int = 0):
    torch.manual_seed(seed)
    cfg = vit.ViTConfig.preset("owl2-tiny")
    model = vit.VisionTransformer(cfg)
    model.init_weights()
    jitter_(model)
    return model.eval(), cfg


def test_owl2_tiny_tower_gives_1_plus_grid_squared_tokens_matching_the_formula():
    model, cfg = random_owl2_tower()
    assert (cfg.image_size, cfg.patch_size) == (96, 8)  # not 224, not v1's tiny 64: a 12 x 12 grid
    pixels = torch.randn(2, 3, 96, 96)
    W = {model.owl2_key_map()[k]: v for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = model(pixels)
        assert out.shape == (2, 1 + 12 * 12, cfg.hidden_size)
        assert_close(out, ref_vit(W, pixels, cfg), ops=64)


def test_owl2_tower_in_bf16_equals_plain_bf16_layer_norms_and_softmax():
    """In bf16 the tower equals the official computation (plain LayerNorm and softmax in bf16) within a few bf16
    steps, the difference being where SDPA rounds. (In bf16 an upcast LayerNorm gives these same numbers but for
    rare last-bit roundings, so no output can tell it from a plain one on a CPU; the next test checks the type.)"""
    model, cfg = random_owl2_tower()
    model = model.bfloat16()
    pixels = torch.randn(2, 3, 96, 96).bfloat16()
    W = {model.owl2_key_map()[k]: v for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = model(pixels)
        assert out.dtype == torch.bfloat16
        assert_close(out, ref_vit(W, pixels, cfg), ops=4, dtype=torch.bfloat16)


def test_owl2_norms_are_plain_layer_norms_and_v1_keeps_its_float32_ones():
    """The official Owl2 uses nn.LayerNorm, whose float32 output under CUDA autocast keeps the residual stream in
    float32; v1's LayerNormFp32 casts back to the input's dtype. Same weights, same keys either way."""
    owl2 = [vit.VisionTransformer(vit.ViTConfig.preset("owl2-tiny")),
            VisualAbstractor(AbstractorConfig.preset("owl2-tiny"))]
    v1 = [vit.VisionTransformer(vit.ViTConfig.preset("tiny")), VisualAbstractor(AbstractorConfig.preset("tiny"))]
    for model in owl2:
        norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
        assert norms and all(type(m) is torch.nn.LayerNorm for m in norms)
    for model in v1:
        norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
        assert norms and all(isinstance(m, (vit.LayerNormFp32, LayerNormFp32)) for m in norms)
    tower_eps = {m.eps for m in owl2[0].modules() if isinstance(m, torch.nn.LayerNorm)}
    layer = owl2[1].layers[0]
    assert tower_eps == {1e-6}
    assert (layer.norm1.eps, layer.normk.eps, layer.norm2.eps, layer.ffn_ln.eps) == (1e-5, 1e-5, 1e-5, 1e-6)
    upcast = vit.VisionTransformer(replace(vit.ViTConfig.preset("owl2-tiny"), fp32_norms=True))
    assert list(upcast.state_dict()) == list(owl2[0].state_dict())


# --- 4. the tables are not weights; the key tables -------------------------------------------------------------------

def spec_owl2_shapes() -> dict:
    """The official mPLUG-Owl2 f_V and f_K keys (SPEC 1.1, 1.2 and 4) with their shapes for the released 7B."""
    D, I, L = 1024, 2816, 4096
    table = {VIT + "embeddings.cls_token": (1, 1, D), VIT + "embeddings.patch_embed.weight": (D, 3, 14, 14),
             VIT + "embeddings.position_embedding": (1, 1025, D)}
    for n in ("embeddings.pre_layernorm", "post_layernorm"):
        table[f"{VIT}{n}.weight"] = table[f"{VIT}{n}.bias"] = (D,)
    for i in range(24):
        for n, (w, b) in {"input_layernorm": ((D,), (D,)), "self_attn.query_key_value": ((3 * D, D), (3 * D,)),
                          "self_attn.dense": ((D, D), (D,)), "post_attention_layernorm": ((D,), (D,)),
                          "mlp.fc1": ((4096, D), (4096,)), "mlp.fc2": ((D, 4096), (D,))}.items():
            table[f"{VIT}encoder.layers.{i}.{n}.weight"], table[f"{VIT}encoder.layers.{i}.{n}.bias"] = w, b
    table.update({ABS + "query_embeds": (1, 64, D), ABS + "vit_eos": (1, 1, L), ABS + "visual_fc.weight": (L, D),
                  ABS + "visual_fc.bias": (L,)})
    for j in range(6):
        for n, (w, b) in {"norm1": ((D,), (D,)), "normk": ((D,), (D,)), "attention.query": ((D, D), (D,)),
                          "attention.key": ((D, D), (D,)), "attention.value": ((D, D), (D,)),
                          "output.out_proj": ((D, D), (D,)), "output.norm2": ((D,), (D,)),
                          "output.mlp.w1": ((I, D), (I,)), "output.mlp.w3": ((I, D), (I,)),
                          "output.mlp.ffn_ln": ((I,), (I,)), "output.mlp.w2": ((D, I), (D,))}.items():
            p = f"{ABS}encoder.layers.{j}.crossattention.{n}"
            table[p + ".weight"], table[p + ".bias"] = w, b
    return table


def test_owl2_key_tables_cover_every_weight_once_with_the_official_names_and_shapes():
    with torch.device("meta"):
        tower = vit.VisionTransformer(vit.ViTConfig.preset("owl2-7b"))
        ab = VisualAbstractor(AbstractorConfig.preset("owl2-7b"))
    mapped = {}
    for model, prefix in ((tower, VIT), (ab, ABS)):
        key_map, sd = model.owl2_key_map(), model.state_dict()
        assert set(key_map) == set(sd)  # no weight without an official name, no name without a weight
        assert len(set(key_map.values())) == len(key_map)  # no two share one
        assert all(v.startswith(prefix) for v in key_map.values())
        mapped.update({key_map[k]: tuple(v.shape) for k, v in sd.items()})
    assert mapped == spec_owl2_shapes()


def test_sincos_tables_are_not_in_the_state_dict_and_a_checkpoint_without_them_loads():
    model, cfg, _, x = random_owl2_abstractor()
    assert {"q_pos", "k_pos"} <= dict(model.named_buffers()).keys()
    sd = model.state_dict()
    assert not any("pos" in k for k in sd)
    fresh = VisualAbstractor(cfg).eval()
    fresh.load_state_dict(sd, strict=True)  # nothing missing: the tables are computed, not loaded
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    # the official code's persistent buffers, named for a loader to skip or compare, never among the weights
    extra = model.owl2_table_keys()
    assert len(extra) == 2 * cfg.num_layers and not set(extra) & set(model.owl2_key_map().values())
    assert all(k.endswith(("attention.q_pos_embed", "attention.k_pos_embed")) for k in extra)
    assert extra[ABS + "encoder.layers.1.crossattention.attention.k_pos_embed"] is model.k_pos


# --- configs ---------------------------------------------------------------------------------------------------------

def test_from_owl2_takes_the_official_defaults_and_reads_the_visual_config():
    assert vit.ViTConfig.from_owl2({}) == vit.ViTConfig.preset("owl2-7b")
    assert AbstractorConfig.from_owl2({}, 4096) == AbstractorConfig.preset("owl2-7b")
    whole = {"model_type": "mplug_owl2", "hidden_size": 96, "visual_config": {
        "visual_model": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                         "image_size": 80, "patch_size": 8, "layer_norm_eps": 1e-5, "use_flash_attn": False},
        "visual_abstractor": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                              "intermediate_size": 96, "num_learnable_queries": 8, "grid_size": 10,
                              "encoder_hidden_size": 64, "add_v2t_pos_emb": False}}}
    v = vit.ViTConfig.from_owl2(whole["visual_config"]["visual_model"])
    assert v == vit.ViTConfig.from_owl2(whole)
    assert (v.hidden_size, v.num_layers, v.image_size, v.layer_norm_eps, v.fp32_norms) == (64, 2, 80, 1e-5, False)
    a = AbstractorConfig.from_owl2(whole["visual_config"]["visual_abstractor"], 96)
    assert a == AbstractorConfig.from_owl2(whole, 96)
    assert (a.num_queries, a.grid_size, a.num_layers, a.intermediate_size, a.llm_hidden_size) == (8, 10, 1, 96, 96)
    assert (a.pos_embed, a.fp32_norms, a.attention_dropout, a.layer_norm_eps) == (True, False, 0.0, 1e-6)
    assert AbstractorConfig.from_owl2({"grid_size": None}, 4096).grid_size == 32  # the official `or 32`


@pytest.mark.parametrize("read,d", [
    (lambda d: vit.ViTConfig.from_owl2(d), {"use_cls_token": False}),  # Owl2.1's ViT-G has no CLS
    (lambda d: vit.ViTConfig.from_owl2(d), {"hidden_act": "gelu"}),
    (lambda d: AbstractorConfig.from_owl2(d, 4096), {"use_cls_token": False}),
    (lambda d: AbstractorConfig.from_owl2(d, 4096), {"encoder_hidden_size": 1664}),
])
def test_from_owl2_refuses_another_model(read, d):
    with pytest.raises(ValueError):
        read(d)


def test_v1_configs_are_untouched():
    """v1 keeps its float32 norms and has no positions, whatever Owl2-only names a v1 config.json might carry."""
    for v in (vit.ViTConfig(), vit.ViTConfig.preset("tiny"), vit.ViTConfig.from_official({"fp32_norms": False})):
        assert v.fp32_norms
    for a in (AbstractorConfig(), AbstractorConfig.preset("tiny"),
              AbstractorConfig.from_official({"pos_embed": True, "grid_size": 16, "fp32_norms": False}, 64, 4096)):
        assert (a.pos_embed, a.grid_size, a.fp32_norms) == (False, 0, True)
    assert not hasattr(VisualAbstractor(AbstractorConfig.preset("tiny")), "q_pos")


def test_tiny_presets_fit_together():
    """ViT owl2-tiny's 1 + 12^2 tokens are exactly what abstractor owl2-tiny's grid table covers."""
    torch.manual_seed(0)
    tower = vit.VisionTransformer(vit.ViTConfig.preset("owl2-tiny"))
    ab = VisualAbstractor(AbstractorConfig.preset("owl2-tiny"))
    tower.init_weights(), ab.init_weights()
    with torch.no_grad():
        out = ab(tower(torch.randn(1, 3, 96, 96)))
    assert out.shape == (1, 17, 192) and torch.isfinite(out).all()
