"""f_L's modality-adaptive mode (mPLUG-Owl2): each layer's two norms and k/v projections in two copies, multiway.0
for text tokens and multiway.1 for visual tokens. Checked against HF's LlamaForCausalLM (copies equal), a forward
written out here token by token (copies different), and f_L's own full forward (cache, left-padded batches)."""
import re

import pytest
import torch

from conftest import assert_close
from llama import Llama, LlamaConfig, Multiway
from test_llama import TINY, hf_logits, ids_for_test, roundings, tiny_hf_llama

ADAPTIVE = re.compile(r"(model\.layers\.\d+\.(?:input_layernorm|post_attention_layernorm|self_attn\.[kv]_proj))"
                      r"\.weight$")


def adaptive_state_dict(sd: dict) -> dict:
    """An HF LLaMA state dict in Owl2's key names, each multiway copy a clone of the one weight."""
    out = {}
    for key, t in sd.items():
        m = ADAPTIVE.match(key)
        if m:
            out.update({f"{m[1]}.multiway.{i}.weight": t.clone() for i in (0, 1)})
        elif not key.endswith("rotary_emb.inv_freq"):
            out[key] = t
    return out


def adaptive_llama(hf) -> Llama:
    cfg = LlamaConfig.from_hf({**hf.config.to_dict(), "modality_adaptive": True})
    model = Llama(cfg).eval()
    model.load_state_dict(adaptive_state_dict(hf.state_dict()))
    return model


def perturb_visual_copies(model: Llama, seed: int = 5) -> Llama:
    """Make every multiway.1 copy differ from its multiway.0 (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".multiway.1." in name:
                p.add_(0.2 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return model


def indicator(B, T, spans) -> torch.Tensor:
    """(B, T) modality indicator, 1 on each row's spans [start, end)."""
    m = torch.zeros(B, T, dtype=torch.long)
    for b, row in enumerate(spans):
        for start, end in row:
            m[b, start:end] = 1
    return m


MIXED = [[(2, 7)], [(0, 3), (9, 12)]]  # for (2, 12): an image inside row 0, two at the ends of row 1


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def hf(request):
    return tiny_hf_llama(num_kv_heads=request.param)


@pytest.fixture
def owl2(hf):
    """A modality-adaptive f_L of hf's weights, its two copies different."""
    return perturb_visual_copies(adaptive_llama(hf))


# --- 1. equal copies: HF's LLaMA ------------------------------------------------------------------------------------

def test_with_equal_copies_the_adaptive_llama_equals_hf_llama_for_a_mixed_indicator(hf):
    model = adaptive_llama(hf)
    ids = ids_for_test()
    with torch.no_grad():
        out = model(ids, modality=indicator(2, 12, MIXED))
    assert_close(out, hf_logits(hf, ids), ops=roundings())


# --- 2. the visual copies act on visual tokens only ----------------------------------------------------------------

def test_changing_the_visual_copies_changes_logits_from_the_first_image_on_and_no_text_only_logits(hf):
    base = adaptive_llama(hf)
    changed = perturb_visual_copies(adaptive_llama(hf))
    ids, modality = ids_for_test(), indicator(2, 12, MIXED)
    with torch.no_grad():
        before, after = base(ids, modality=modality), changed(ids, modality=modality)
        text_only = [(base(ids, modality=m), changed(ids, modality=m)) for m in (None, torch.zeros(2, 12).long())]
    assert torch.equal(before[0, :2], after[0, :2])  # row 0's text before its image
    differs = (before - after).abs().amax(-1)  # (B, T)
    assert (differs[0, 2:] > 1e-3).all() and (differs[1] > 1e-3).all()
    for b, a in text_only:
        assert torch.equal(b, a)


# --- 3. per-token routing: a forward written out token by token ------------------------------------------------------

def reference_logits(model: Llama, ids: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """Owl2's LLaMA in float64, plain torch: every token takes the weight of copy modality[b, t] of each multiway
    module, one token at a time; causal attention written out with RoPE in the rotate-half layout."""
    cfg = model.cfg
    w = {k: v.double() for k, v in model.state_dict().items()}
    B, T = ids.shape
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def per_token(h, name, fn):  # fn(token vector, weight of its copy)
        return torch.stack([torch.stack([fn(h[b, t], w[f"{name}.multiway.{int(modality[b, t])}.weight"])
                                         for t in range(T)]) for b in range(B)])

    def rms(v, weight):
        return weight * v / torch.sqrt(v.pow(2).mean() + cfg.rms_norm_eps)

    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]  # (T, hd/2)
    cos, sin = angle.cos(), angle.sin()

    def rope(t):  # (B, heads, T, hd): pair i with i + hd/2
        a, b = t[..., : hd // 2], t[..., hd // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    x = w["model.embed_tokens.weight"][ids]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        h = per_token(x, p + "input_layernorm", rms)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(B, T, H, hd).transpose(1, 2)
        k = per_token(h, p + "self_attn.k_proj", lambda v, wt: wt @ v).view(B, T, KV, hd).transpose(1, 2)
        v = per_token(h, p + "self_attn.v_proj", lambda v, wt: wt @ v).view(B, T, KV, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        scores = (q @ k.transpose(-1, -2) / hd ** 0.5).masked_fill(~causal, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * hd)
        x = x + y @ w[p + "self_attn.o_proj.weight"].T
        h = per_token(x, p + "post_attention_layernorm", rms)
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    x = torch.stack([torch.stack([rms(x[b, t], w["model.norm.weight"]) for t in range(T)]) for b in range(B)])
    return x @ w["lm_head.weight"].T


@pytest.mark.parametrize("spans", [MIXED, [[(0, 12)], [(0, 12)]], [[(5, 6)], []]], ids=["mixed", "all-visual", "one"])
def test_each_token_goes_through_the_copy_of_its_modality(owl2, spans):
    ids, modality = ids_for_test(), indicator(2, 12, spans)
    with torch.no_grad():
        out = owl2(ids, modality=modality)
    assert_close(out, reference_logits(owl2, ids, modality), ops=roundings(), dtype=torch.float32)


# --- 4. the KV cache ---------------------------------------------------------------------------------------------

def test_cached_decoding_with_mixed_prompt_and_chunk_equals_the_full_recompute(owl2):
    """Prefill 8 tokens, append a chunk of 5 (a second turn with its own image), then 3 single text tokens: the
    cache holds each token's keys and values from its own copy, so the logits equal the whole sequence at once."""
    ids = ids_for_test(B=2, T=16)
    modality = indicator(2, 16, [[(1, 4), (9, 11)], [(0, 8), (12, 13)]])
    with torch.no_grad():
        full = owl2(ids, modality=modality)
        owl2.setup_cache(batch_size=2, max_len=32)
        steps = [owl2(ids[:, :8], start_pos=0, modality=modality[:, :8]),
                 owl2(ids[:, 8:13], start_pos=8, modality=modality[:, 8:13])]
        steps += [owl2(ids[:, t:t + 1], start_pos=t) for t in range(13, 16)]  # generated tokens: text
        owl2.clear_cache()
    assert_close(torch.cat(steps, dim=1), full, ops=roundings())


def test_generate_runs_the_visual_copy_on_the_prompt_s_images_only(owl2):
    """Decode steps are text: after the prefill only multiway.0 runs, on the one new token, with no gather."""
    seen = {0: [], 1: []}
    hooks = [owl2.model.layers[0].self_attn.k_proj.multiway[i].register_forward_hook(
        lambda m, args, out, i=i: seen[i].append(tuple(args[0].shape))) for i in (0, 1)]
    ids, modality = ids_for_test(B=1, T=10), indicator(1, 10, [[(3, 7)]])
    try:
        tokens = list(owl2.generate(ids, max_new_tokens=5, eos_id=-1, modality=modality))
    finally:
        for h in hooks:
            h.remove()
    D = owl2.cfg.hidden_size
    assert len(tokens) == 5
    assert seen[1] == [(4, D)]  # the 4 visual tokens of the prompt, once
    assert seen[0] == [(6, D)] + [(1, 1, D)] * 4  # the 6 text tokens, then each step's token whole


# --- 5. left-padded batches ---------------------------------------------------------------------------------------

def test_generate_batch_with_left_padding_and_per_row_indicators_equals_each_row_alone(owl2):
    lengths, T = [9, 6, 11], 11
    g = torch.Generator().manual_seed(7)
    rows = [torch.randint(3, TINY["vocab_size"], (n,), generator=g) for n in lengths]
    spans = [[(2, 6)], [], [(0, 4), (7, 9)]]  # per row, in its own (unpadded) positions
    mods = [indicator(1, n, [s])[0] for n, s in zip(lengths, spans)]
    with torch.no_grad():
        embeds = [owl2.model.embed_tokens(r) for r in rows]

    def alone(**kw):
        return [list(owl2.generate(inputs_embeds=e[None], modality=m[None], max_new_tokens=8, **kw))
                for e, m in zip(embeds, mods)]

    free = alone(eos_id=-1)
    eos = next((t for i, t in enumerate(free[1]) if i >= 2 and t not in free[1][:i]), free[1][0])
    expected = alone(eos_id=eos)  # row 1 leaves the batch early
    batch = torch.randn(3, T, TINY["hidden_size"], generator=g) * 10  # pads hold noise: no query sees them
    modality = torch.zeros(3, T, dtype=torch.long)
    for b, (e, m) in enumerate(zip(embeds, mods)):
        batch[b, T - len(e):], modality[b, T - len(m):] = e, m
    assert owl2.generate_batch(batch, lengths, max_new_tokens=8, eos_id=eos, modality=modality) == expected
    assert len(expected[1]) < 8 and max(len(a) for a in expected) == 8


# --- 6. state_dict keys ------------------------------------------------------------------------------------------

def test_state_dict_keys_are_owl2_s_multiway_names_and_v1_keys_are_unchanged():
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4)
    v1 = set(Llama(LlamaConfig(**small)).state_dict())
    owl2 = set(Llama(LlamaConfig(**small, modality_adaptive=True)).state_dict())
    modules = ["input_layernorm", "post_attention_layernorm", "self_attn.k_proj", "self_attn.v_proj"]
    multiway = {f"model.layers.{n}.{m}.multiway.{i}.weight" for n in range(2) for m in modules for i in (0, 1)}
    plain = {f"model.layers.{n}.{m}.weight" for n in range(2) for m in modules}
    assert multiway <= owl2 and not plain & owl2
    assert owl2 - multiway == v1 - plain  # everything else as in v1
    shared = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert v1 == plain | {f"model.layers.{n}.{m}.weight" for n in range(2) for m in shared} | {
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


# --- the rest of the API -------------------------------------------------------------------------------------------

def test_a_v1_llama_ignores_the_modality_indicator(hf):
    model = Llama(LlamaConfig.from_hf(hf.config.to_dict())).eval()
    model.load_state_dict({k: v for k, v in hf.state_dict().items() if not k.endswith("inv_freq")})
    ids = ids_for_test()
    with torch.no_grad():
        assert torch.equal(model(ids, modality=indicator(2, 12, MIXED)), model(ids))


@pytest.mark.parametrize("modality,error", [(torch.zeros(2, 11).long(), "shape"), (torch.full((2, 12), 2), "value")])
def test_a_malformed_indicator_is_refused(owl2, modality, error):
    with pytest.raises(ValueError, match=error):
        owl2(ids_for_test(), modality=modality)


def test_the_loss_reaches_each_copy_through_its_own_tokens_only_with_or_without_checkpointing(owl2):
    ids, targets = ids_for_test(), ids_for_test(seed=2)
    key = "model.layers.1.self_attn.v_proj.multiway."

    def grads(modality, checkpointing):
        owl2.zero_grad(set_to_none=False)
        owl2.train(checkpointing).grad_checkpointing = checkpointing  # no dropout in f_L: train() changes nothing else
        loss = owl2(ids, targets=targets, modality=modality)
        loss.backward()
        params = dict(owl2.named_parameters())
        return loss.detach(), params[key + "0.weight"].grad.clone(), params[key + "1.weight"].grad.clone()

    loss, g0, g1 = grads(indicator(2, 12, MIXED), False)
    assert g0.abs().max() > 0 and g1.abs().max() > 0
    for got, want in zip(grads(indicator(2, 12, MIXED), True), (loss, g0, g1)):
        assert_close(got, want, ops=roundings())
    _, _, g1_text = grads(None, False)
    assert torch.equal(g1_text, torch.zeros_like(g1_text))
    owl2.eval()


def test_config_presets_and_hf_round_trip():
    seven = LlamaConfig.preset("owl2-7b")
    assert (seven.vocab_size, seven.hidden_size, seven.num_layers, seven.num_heads, seven.num_kv_heads,
            seven.intermediate_size, seven.rms_norm_eps, seven.max_position_embeddings, seven.rope_theta,
            seven.modality_adaptive) == (32000, 4096, 32, 32, 32, 11008, 1e-6, 2048, 10000.0, True)
    tiny = LlamaConfig.preset("owl2-tiny")
    assert tiny.modality_adaptive and {**vars(tiny), "modality_adaptive": False} == vars(LlamaConfig.preset("tiny"))
    assert not LlamaConfig.preset("llama-7b").modality_adaptive and not LlamaConfig.preset("tiny").modality_adaptive
    assert LlamaConfig.from_hf(tiny.to_hf()) == tiny
    assert "modality_adaptive" not in LlamaConfig.preset("tiny").to_hf()
    official = {"model_type": "mplug_owl2", "hidden_size": 4096, "num_hidden_layers": 32, "rms_norm_eps": 1e-6,
                "visual_config": {"visual_model": {}, "visual_abstractor": {}}}
    assert LlamaConfig.from_hf(official).modality_adaptive
    assert isinstance(Llama(tiny).model.layers[0].input_layernorm, Multiway)
