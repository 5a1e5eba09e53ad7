"""f_K's claims: 65 visual tokens per image, and the official layer (mPLUG-Owl/mplug_owl/modeling_mplug_owl.py, MplugOwlVisualAbstractorLayer) written out here with plain torch ops on the
official checkpoint names (no HF reference exists for the abstractor; the formula is the reference)."""
import pytest
import torch
import torch.nn.functional as F

from abstractor import AbstractorConfig, VisualAbstractor
from conftest import assert_close


def official_state_dict(model: VisualAbstractor) -> dict:
    """The module's weights under the official checkpoint names, through its own key table."""
    sd = model.state_dict()
    return {official: sd[ours] for ours, official in model.official_key_map().items()}


def spec_abstractor(W: dict, x: torch.Tensor, cfg: AbstractorConfig, norm_eps=1e-5, ffn_ln_eps=1e-6,
                    residual="normalised") -> torch.Tensor:
    """The official abstractor layer, from the official keys: per layer qn = norm1(q), kv = [qn; normk(x)], h = qn + out_proj(MHA),
    h = h + w2(ffn_ln(silu(w1(norm2 h)) * w3(norm2 h))); then visual_fc and vit_eos appended."""
    B, N, D = x.shape
    H, d = cfg.num_heads, D // cfg.num_heads

    def ln(t, name, eps):
        return F.layer_norm(t, t.shape[-1:], W[name + ".weight"], W[name + ".bias"], eps)

    def linear(t, name):
        return t @ W[name + ".weight"].T + W[name + ".bias"]

    def heads(t):  # (B, T, D) -> (B, H, T, d), heads split contiguously
        return t.reshape(B, t.shape[1], H, d).permute(0, 2, 1, 3)

    q = W["query_tokens"].expand(B, -1, -1)
    for j in range(cfg.num_layers):
        p = f"abstractor.encoder.layers.{j}.crossattention."
        qn = ln(q, p + "norm1", norm_eps)
        kv = torch.cat([qn, ln(x, p + "normk", norm_eps)], dim=1)  # (B, Q + N, D)
        Qh, Kh, Vh = heads(linear(qn, p + "attention.query")), heads(linear(kv, p + "attention.key")), \
            heads(linear(kv, p + "attention.value"))
        att = torch.softmax(Qh @ Kh.transpose(-1, -2) / d ** 0.5, dim=-1)  # (B, H, Q, Q + N)
        ctx = (att @ Vh).permute(0, 2, 1, 3).reshape(B, -1, D)
        h = (qn if residual == "normalised" else q) + linear(ctx, p + "output.out_proj")
        z = ln(h, p + "output.norm2", norm_eps)
        hidden = F.silu(linear(z, p + "output.mlp.w1")) * linear(z, p + "output.mlp.w3")
        q = h + linear(ln(hidden, p + "output.mlp.ffn_ln", ffn_ln_eps), p + "output.mlp.w2")
    out = linear(q, "abstractor.visual_fc")
    return torch.cat([out, W["abstractor.vit_eos"].expand(B, -1, -1)], dim=1)


def random_tiny(seed: int = 0):
    """The tiny abstractor with every weight random: LayerNorm affines and biases too, so a mix-up shows. Queries and
    ViT tokens are small, so the LayerNorm eps is not lost in the variance and an eps mistake shows too."""
    torch.manual_seed(seed)
    cfg = AbstractorConfig.preset("tiny")
    model = VisualAbstractor(cfg)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ffn_ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
        model.query_tokens.normal_(0, 0.003)
        model.vit_eos.normal_(0, 1.0)
    x = torch.randn(2, 17, cfg.hidden_size) * 0.003  # a 17-token "ViT output" (e.g. 4x4 patches + CLS)
    return model.eval(), cfg, x


# --- 65 visual tokens per image ---------------------------------------------------------------------------------------

def test_owl_7b_abstractor_gives_65_visual_tokens_per_image_of_llm_width():
    with torch.device("meta"):
        model = VisualAbstractor(AbstractorConfig.preset("owl-7b")).eval()
        out = model(torch.empty(3, 257, 1024))  # 3 images, all 257 ViT-L/14 tokens
    assert out.shape == (3, 64 + 1, 4096)


def test_tiny_abstractor_gives_num_queries_plus_one_tokens():
    model, cfg, x = random_tiny()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, cfg.num_queries + 1, cfg.llm_hidden_size)
    torch.testing.assert_close(out[:, -1], model.vit_eos[0].expand(2, -1))  # the learned vit_eos comes last


def test_abstractor_output_does_not_depend_on_other_images_in_the_batch():
    model, cfg, x = random_tiny()
    with torch.no_grad():
        assert_close(model(x)[1:], model(x[1:]), ops=16)


# --- the official formula -------------------------------------------------------------------------------------------------

def test_abstractor_matches_the_spec_formula_written_out():
    model, cfg, x = random_tiny()
    with torch.no_grad():
        expected = spec_abstractor(official_state_dict(model), x, cfg)
        assert_close(model(x), expected, ops=64)


def test_attention_weights_are_over_the_queries_and_all_vit_tokens():
    """return_weights (for pictures) gives the same output as the fast path, with weights over Q + N keys."""
    model, cfg, x = random_tiny()
    with torch.no_grad():
        out, weights = model(x, return_weights=True)
        assert_close(out, model(x), ops=64)
    assert len(weights) == cfg.num_layers
    for w in weights:
        assert w.shape == (2, cfg.num_heads, cfg.num_queries, cfg.num_queries + x.shape[1])
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))


@pytest.mark.parametrize("variant", [
    dict(residual="raw"),  # the residual from the raw query, as a standard pre-LN block would do
    dict(ffn_ln_eps=1e-5),  # ffn_ln with LayerNorm's default eps
    dict(norm_eps=1e-6),  # norm1/normk/norm2 with ffn_ln's eps
])
def test_the_formula_comparison_sees_each_detail(variant):
    """Each detail of the official layer changes the output by more than the parity test's tolerance, so that test
    would fail if the module got it wrong."""
    model, cfg, x = random_tiny()
    with torch.no_grad():
        wrong = spec_abstractor(official_state_dict(model), x, cfg, **variant)
        with pytest.raises(AssertionError):
            assert_close(model(x), wrong, ops=64)


def test_layer_norm_eps_per_norm():
    model, cfg, _ = random_tiny()
    for layer in model.layers:
        assert (layer.norm1.eps, layer.normk.eps, layer.norm2.eps, layer.ffn_ln.eps) == (1e-5, 1e-5, 1e-5, 1e-6)


def test_attention_dropout_acts_only_in_training():
    model, cfg, x = random_tiny()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(2)
        assert (a - model(x)).abs().max() > 1e-4


# --- official checkpoint names ----------------------------------------------------------------------------------------

def spec_official_shapes(num_layers=6, D=1024, I=2816, L=4096, Q=64) -> dict:
    """The official key list for the released owl-7b abstractor (weight and bias of every LayerNorm and Linear)."""
    table = {"query_tokens": (1, Q, D), "abstractor.vit_eos": (1, 1, L),
             "abstractor.visual_fc.weight": (L, D), "abstractor.visual_fc.bias": (L,)}
    for j in range(num_layers):
        p = f"abstractor.encoder.layers.{j}.crossattention."
        shapes = {"norm1": ((D,), (D,)), "normk": ((D,), (D,)), "attention.query": ((D, D), (D,)),
                  "attention.key": ((D, D), (D,)), "attention.value": ((D, D), (D,)),
                  "output.out_proj": ((D, D), (D,)), "output.norm2": ((D,), (D,)),
                  "output.mlp.w1": ((I, D), (I,)), "output.mlp.w3": ((I, D), (I,)),
                  "output.mlp.ffn_ln": ((I,), (I,)), "output.mlp.w2": ((D, I), (D,))}
        for name, (w, b) in shapes.items():
            table[p + name + ".weight"], table[p + name + ".bias"] = w, b
    return table


def test_official_key_map_covers_every_weight_once_with_the_spec_names_and_shapes():
    with torch.device("meta"):
        model = VisualAbstractor(AbstractorConfig.preset("owl-7b"))
    key_map = model.official_key_map()
    sd = model.state_dict()
    assert set(key_map) == set(sd)  # every weight has an official name ...
    assert len(set(key_map.values())) == len(key_map)  # ... and no two share one
    assert {key_map[k]: tuple(v.shape) for k, v in sd.items()} == spec_official_shapes()
