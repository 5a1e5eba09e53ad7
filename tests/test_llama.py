"""f_L's claims, each checked against an independent reference: HF's LlamaForCausalLM (logits, greedy generation),
Meta's checkpoint layout written out here by hand, SentencePiece itself, and sampling rules with known answers."""
import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

import llama
from conftest import assert_close
from llama import ChunkedCrossEntropy, Linear, Llama, Tokenizer, sample
from lora import apply_lora

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


def tiny_hf_llama(num_kv_heads=4, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = HFLlamaConfig(**{**TINY, "num_key_value_heads": num_kv_heads, **overrides})
    cfg._attn_implementation = "eager"  # HF's attention written out, not SDPA as ours
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF starts RMSNorm weights at 1: noise makes a swapped norm visible
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf


def hf_logits(hf, ids) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=ids).logits


def ours_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def ids_for_test(B=2, T=12, seed=1) -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def roundings(dtype=torch.float32) -> int:
    """How many roundings a logit of TINY may differ by between two correct computations (conftest.assert_close's
    ops): 6 matrix products in series per layer and the lm_head, each output off by ~sqrt(96) float32 roundings of
    its sum, or by one bf16 rounding (bf16 products are summed in float32)."""
    return (6 * TINY["num_hidden_layers"] + 1) * (10 if dtype == torch.float32 else 1)


@pytest.fixture(params=[4, 2], ids=["mha", "gqa"])
def hf_and_folder(request, tmp_path):
    hf = tiny_hf_llama(num_kv_heads=request.param)
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


# --- f_L equals HF's LLaMA ------------------------------------------------------------------------------------------

def test_llama_logits_match_hf_llama_for_causal_lm(hf_and_folder):
    hf, folder = hf_and_folder
    model = Llama.from_hf(folder).eval()
    ids = ids_for_test()
    assert_close(ours_logits(model, ids), hf_logits(hf, ids), ops=roundings())


def test_llama_input_embeddings_path_equals_token_ids(hf_and_folder):
    """mPLUG-Owl feeds f_L embeddings with the visual tokens spliced in; for text alone both paths agree with HF."""
    hf, folder = hf_and_folder
    model = Llama.from_hf(folder).eval()
    ids = ids_for_test()
    with torch.no_grad():
        out = model(inputs_embeds=model.model.embed_tokens(ids))
        ref = hf(inputs_embeds=hf.model.embed_tokens(ids)).logits
    assert_close(out, ref, ops=roundings())


def test_20_greedy_tokens_equal_hf_generate(hf_and_folder):
    hf, folder = hf_and_folder
    model = Llama.from_hf(folder).eval()
    prompt = ids_for_test(B=1, T=7, seed=3)
    hf.generation_config.eos_token_id = None  # run all 20 steps on both sides
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)[0, 7:].tolist()
    ours = list(model.generate(prompt, max_new_tokens=20, eos_id=-1, temperature=0.0))
    assert len(ref) == 20
    assert ours == ref


def test_kv_cache_decoding_equals_one_full_forward(hf_and_folder):
    """Prefill 8 tokens, append a chunk of 5, then 3 single tokens: the same logits as the whole sequence at once."""
    _, folder = hf_and_folder
    model = Llama.from_hf(folder).eval()
    ids = ids_for_test(B=2, T=16)
    full = ours_logits(model, ids)
    model.setup_cache(batch_size=2, max_len=32)
    with torch.no_grad():
        steps = [model(ids[:, :8], start_pos=0), model(ids[:, 8:13], start_pos=8)]
        steps += [model(ids[:, t:t + 1], start_pos=t) for t in range(13, 16)]
    model.clear_cache()
    assert_close(torch.cat(steps, dim=1), full, ops=roundings())


def test_last_only_gives_the_last_row_of_the_full_logits(hf_and_folder):
    """Generation needs the next token's logits only; the lm_head then skips the rest of the prompt."""
    _, folder = hf_and_folder
    model = Llama.from_hf(folder).eval()
    ids = ids_for_test()
    with torch.no_grad():
        last = model(ids, last_only=True)
    assert last.shape == (2, 1, TINY["vocab_size"])
    assert_close(last, ours_logits(model, ids)[:, -1:], ops=roundings())


@pytest.fixture
def two_threads():
    """Two torch threads, so that the row-blocks kernel really cuts every weight of TINY (even row counts) in two."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def force_decode_kernel(monkeypatch, forced: str) -> list:
    """Make every Linear pick `forced` (injected timings: it is the fastest); returns the shapes it is called on."""
    calls, kernel = [], llama.DECODE_KERNELS[forced]
    monkeypatch.setattr(llama, "DECODE_TIMES", {})
    monkeypatch.setattr(llama, "time_decode_kernels", lambda w: {name: float(name != forced) for name in llama.DECODE_KERNELS})
    monkeypatch.setitem(llama.DECODE_KERNELS, forced, lambda w, x: calls.append(tuple(w.shape)) or kernel(w, x))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", list(llama.DECODE_KERNELS))
def test_a_decode_step_on_cpu_through_each_kernel_matches_the_full_forward(hf_and_folder, monkeypatch, two_threads,
                                                                          kernel, dtype):
    """One token multiplies every weight matrix by a vector through the kernel chosen for its shape (here each
    kernel in turn); a prompt of several tokens keeps F.linear's matrix product. The step gives the full forward's
    logits up to rounding."""
    calls = force_decode_kernel(monkeypatch, kernel)
    _, folder = hf_and_folder
    model = Llama.from_hf(folder, dtype=dtype).eval()
    ids = ids_for_test(B=1, T=9)
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(batch_size=1, max_len=16)
        model(ids[:, :8])
        assert calls == []
        step = model(ids[:, 8:], start_pos=8)
        # a bf16 model's cache is float32 on CPU (its attention is faster there), holding the bf16 keys exactly
        cache = model.model.layers[0].self_attn.cache_k
        assert cache.dtype == torch.float32 and torch.equal(cache, cache.to(dtype).float())
        model.clear_cache()
    linears = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, Linear)]
    assert sorted(calls) == sorted(linears) and len(linears) == 7 * TINY["num_hidden_layers"] + 1
    assert_close(step, full[:, -1:], ops=roundings(dtype), dtype=dtype)  # the step's attention rounds differently


def test_the_decode_kernel_is_the_fastest_one_timed_once_per_shape_dtype_and_thread_count(monkeypatch):
    """The choice follows the timings (injected here), is kept for that shape, dtype and thread count, and nothing
    is timed with autograd on, for more than one row, or while torch.compile traces."""
    timed, seconds = [], {"F.linear": 3e-6, "torch.mv": 1e-6, "row blocks": 2e-6, "packed": 0.1e-6}
    monkeypatch.setattr(llama, "DECODE_TIMES", {})
    monkeypatch.setattr(llama, "time_decode_kernels", lambda w: timed.append((tuple(w.shape), w.dtype)) or dict(seconds))
    layer, x, k = Linear(64, 96, bias=False), torch.randn(1, 1, 64), torch.get_num_threads()
    with torch.no_grad():
        layer(x)
        layer(x[0, 0])
        Linear(64, 96, bias=False)(x)  # another layer of the same shape: not timed again
        seconds["row blocks"] = 0.5e-6
        Linear(64, 32, bias=False)(x)
        layer.to(torch.bfloat16)(x.bfloat16())
        layer.float()
        torch.set_num_threads(k + 1)
        try:
            layer(x)
        finally:
            torch.set_num_threads(k)
        other = Linear(64, 48, bias=False)  # a shape not timed yet, which none of these three times
        other(torch.randn(3, 64))
        with monkeypatch.context() as m:
            m.setattr(torch.compiler, "is_compiling", lambda: True)
            other(x)
    assert other(x).requires_grad  # with autograd on it is nn.Linear's own forward
    # a plain weight never takes the packed product, however fast: packing is pack_for_inference's decision
    chosen = {key: min(llama.DECODE_KERNELS, key=times.get) for key, times in llama.DECODE_TIMES.items()}
    assert chosen == {((96, 64), torch.float32, k): "torch.mv", ((32, 64), torch.float32, k): "row blocks",
                      ((96, 64), torch.bfloat16, k): "row blocks", ((96, 64), torch.float32, k + 1): "row blocks"}
    assert len(timed) == 4


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_decode_kernel_is_w_times_x_whatever_the_thread_count(threads, dtype):
    """Each kernel, and the packed product where this build can pack, gives w @ x up to the rounding of its sums (64
    products; bf16 ones are summed in float32 and rounded once), and the timing offers row blocks only where the
    rows split evenly over the threads."""
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (96, 97):
            w, x = torch.randn(rows, 64, dtype=dtype), torch.randn(64, dtype=dtype)
            names = set(llama.time_decode_kernels(w))
            assert names - {"packed"} == set(llama.DECODE_KERNELS) - ({"row blocks"} if rows % threads else set())
            products = {name: llama.DECODE_KERNELS[name](w, x) for name in names - {"packed"}}
            if "packed" in names:
                products["packed"] = llama.packed_linear(x.view(1, -1), llama.pack(w)).view(-1)
            for name, product in products.items():
                assert_close(product, w.double() @ x.double(), ops=64 if dtype == torch.float32 else 1, dtype=dtype)
    finally:
        torch.set_num_threads(before)


def time_packed(monkeypatch, packed_seconds: float) -> None:
    """Injected timings: the plain kernels take 1 s a call, the packed product packed_seconds."""
    monkeypatch.setattr(llama, "DECODE_TIMES", {})
    monkeypatch.setattr(llama, "time_decode_kernels",
                        lambda w: {"F.linear": 1.0, "torch.mv": 1.0, "row blocks": 1.0, "packed": packed_seconds})


def test_a_bf16_model_packed_for_inference_gives_hf_logits_in_prefill_and_decode(hf_and_folder, monkeypatch):
    """Every Linear's weight is replaced by its packed layout (no plain copy kept); the prompt's logits and a decode
    step's are HF's bf16 model's (the step's up to bf16 roundings: it attends in float32; greedy tokens are not
    compared: in bf16, near-ties part even the plain model from HF's). An fp32 model is never packed, however fast."""
    time_packed(monkeypatch, 0.5)
    hf, folder = hf_and_folder
    assert not any(p.is_mkldnn for p in Llama.from_hf(folder).pack_for_inference().parameters())
    dtype = torch.bfloat16
    hf = hf.to(dtype)
    model = Llama.from_hf(folder, dtype=dtype).eval().pack_for_inference()
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 7 * TINY["num_hidden_layers"] + 1 and all(m.weight.is_mkldnn for m in linears)
    plain = {n for n, p in model.named_parameters() if not p.is_mkldnn}
    assert all(n.endswith(("embed_tokens.weight", "norm.weight", "layernorm.weight")) for n in plain)
    ids = ids_for_test(B=1, T=9)
    ref = hf_logits(hf, ids)
    with torch.no_grad():
        assert_close(model(ids), ref, ops=roundings(dtype))
        model.setup_cache(batch_size=1, max_len=16)
        model(ids[:, :8])
        step = model(ids[:, 8:], start_pos=8)
        model.clear_cache()
    assert_close(step, ref[:, -1:], ops=roundings(dtype), dtype=dtype)  # attending in float32 (setup_cache)


def test_packing_follows_the_timings_and_a_packed_model_refuses_training_saving_and_the_loss(hf_and_folder,
                                                                                                monkeypatch):
    _, folder = hf_and_folder
    time_packed(monkeypatch, 2.0)  # slower than the plain kernels: nothing is packed
    model = Llama.from_hf(folder, dtype=torch.bfloat16).eval().pack_for_inference()
    assert not any(p.is_mkldnn for p in model.parameters())
    time_packed(monkeypatch, 0.5)
    model.pack_for_inference()
    ids = ids_for_test(B=1, T=5)
    with pytest.raises(RuntimeError, match="q_proj.weight is packed for inference"):
        model.state_dict()
    with pytest.raises(RuntimeError, match="packed for inference"):
        model(ids)  # autograd on: a packed weight has no gradient
    with torch.no_grad(), pytest.raises(RuntimeError, match="packed for inference"):
        model(ids, targets=ids)


def test_packing_copies_the_other_weights_out_of_the_checkpoint_file_and_keeps_their_values(hf_and_folder,
                                                                                              monkeypatch):
    """A bf16 checkpoint loads as views of its memory-mapped file; once packed, no weight views the file any more
    (the file could stay mapped, and resident, beside the packed copies), and every plain weight is unchanged."""
    time_packed(monkeypatch, 0.5)
    _, folder = hf_and_folder
    save_file({k: v.bfloat16().contiguous() for k, v in load_file(folder / "model.safetensors").items()},
              folder / "model.safetensors")
    model = Llama.from_hf(folder, dtype=torch.bfloat16)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    model.pack_for_inference()
    for name, p in model.named_parameters():
        if not p.is_mkldnn:
            assert p.data_ptr() != before[name][0], name
            assert torch.equal(p, before[name][1]), name


def test_chunked_cross_entropy_equals_f_cross_entropy_of_the_full_logits_with_its_gradients():
    """Vocab 40000 makes blocks of 419 rows: 1000 rows take three, the last one short. The summed loss and the
    gradients of x and of the weight equal F.cross_entropy over the whole (1000, 40000) logits; under no_grad the
    loss alone, the same."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 64, generator=g, requires_grad=True)
    weight = (torch.randn(40000, 64, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(0, 40000, (1000,), generator=g)
    blocks, linear = [], F.linear
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "linear", lambda a, w, b=None: blocks.append(a.shape[0]) or linear(a, w, b))
        loss = ChunkedCrossEntropy.apply(x, weight, targets, True)
    assert blocks == [419, 419, 162]
    grads = torch.autograd.grad(loss * 0.5, [x, weight])
    ref = F.cross_entropy(x @ weight.T, targets, reduction="sum")
    ref_grads = torch.autograd.grad(ref * 0.5, [x, weight])
    torch.testing.assert_close(loss, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        torch.testing.assert_close(ChunkedCrossEntropy.apply(x, weight, targets, False), ref)


def test_the_loss_with_lora_on_the_lm_head_is_the_cross_entropy_of_its_logits(hf_and_folder):
    """A LoRA-wrapped lm_head has weights beyond .weight: the loss then goes through its own forward."""
    _, folder = hf_and_folder
    model = Llama.from_hf(folder).eval()
    apply_lora(model, ("lm_head",))
    torch.nn.init.normal_(model.lm_head.lora_B, std=0.5)  # a non-zero adapter
    ids = ids_for_test()
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    with torch.no_grad():
        loss = model(ids, targets=targets)
        ref = F.cross_entropy(model(ids)[:, :-1].reshape(-1, TINY["vocab_size"]), ids[:, 1:].reshape(-1),
                              reduction="sum")
    torch.testing.assert_close(loss, ref)


def test_rope_theta_is_read_from_the_config(tmp_path):
    """transformers 5 writes rope_theta inside `rope_parameters`; a non-default base must still be used."""
    hf = tiny_hf_llama(rope_theta=500000.0)
    hf.save_pretrained(tmp_path)
    model = Llama.from_hf(tmp_path).eval()
    assert model.cfg.rope_theta == 500000.0
    ids = ids_for_test(T=40)
    assert_close(ours_logits(model, ids), hf_logits(hf, ids), ops=roundings())


def test_scaled_rope_is_refused_not_silently_run_as_plain_rope(tmp_path):
    hf = tiny_hf_llama(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 64})
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rope"):
        Llama.from_hf(tmp_path)


# --- checkpoint files -------------------------------------------------------------------------------------------------

def test_loads_sharded_safetensors(tmp_path):
    hf = tiny_hf_llama()
    hf.save_pretrained(tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    ids = ids_for_test()
    assert_close(ours_logits(Llama.from_hf(tmp_path), ids), hf_logits(hf, ids), ops=roundings())


def test_loads_pytorch_model_bin(tmp_path):
    hf = tiny_hf_llama()
    hf.save_pretrained(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "st" / "config.json", tmp_path / "bin" / "config.json")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    ids = ids_for_test()
    model = Llama.from_hf(tmp_path / "bin")
    assert_close(ours_logits(model, ids), hf_logits(hf, ids), ops=roundings())


def write_hf_folder(folder, config_from, sd: dict) -> None:
    folder.mkdir()
    shutil.copy(config_from / "config.json", folder / "config.json")
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")


def test_rotary_inv_freq_buffers_in_the_checkpoint_are_ignored(tmp_path):
    hf = tiny_hf_llama()
    hf.save_pretrained(tmp_path / "hf")
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    for n in range(TINY["num_hidden_layers"]):  # as the released mPLUG-Owl checkpoint carries them
        sd[f"model.layers.{n}.self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)
    write_hf_folder(tmp_path / "old", tmp_path / "hf", sd)
    ids = ids_for_test()
    assert_close(ours_logits(Llama.from_hf(tmp_path / "old"), ids), hf_logits(hf, ids), ops=roundings())


@pytest.mark.parametrize("fault,key,error", [
    ("missing", "model.layers.1.mlp.up_proj.weight", KeyError),
    ("unexpected", "model.layers.0.self_attn.q_norm.weight", KeyError),
    ("wrong shape", "model.layers.0.mlp.down_proj.weight", ValueError),
])
def test_a_bad_checkpoint_key_is_an_error_naming_it(tmp_path, fault, key, error):
    hf = tiny_hf_llama()
    hf.save_pretrained(tmp_path / "hf")
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    if fault == "missing":
        del sd[key]
    elif fault == "unexpected":
        sd[key] = torch.ones(16)
    else:
        sd[key] = sd[key].T  # (hidden, mlp) stored as (mlp, hidden)
    write_hf_folder(tmp_path / "bad", tmp_path / "hf", sd)
    with pytest.raises(error, match=re.escape(key)):
        Llama.from_hf(tmp_path / "bad")


# --- Meta's original layout -------------------------------------------------------------------------------------------

def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of HF's convert_llama_weights_to_hf permute, w.view(n, hd//2, 2, dim).transpose(1, 2): back from
    rotate-half pairs (i, i + hd/2) to Meta's adjacent pairs (2i, 2i + 1)."""
    rows, dim = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)


def write_meta_checkpoint(folder, hf: LlamaForCausalLM, unpermute=True, shards=1) -> None:
    """The tiny HF model in Meta's consolidated.NN.pth layout, split the way Meta's model-parallel code splits it:
    column-parallel weights (wq wk wv w1 w3 output) by rows, row-parallel (wo w2) and tok_embeddings by columns."""
    c = hf.config
    sd = hf.state_dict()
    fix = (lambda w, n: hf_to_meta_rows(w, n)) if unpermute else (lambda w, n: w)
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    for n in range(c.num_hidden_layers):
        hfp, mp = f"model.layers.{n}.", f"layers.{n}."
        meta[mp + "attention.wq.weight"] = fix(sd[hfp + "self_attn.q_proj.weight"], c.num_attention_heads)
        meta[mp + "attention.wk.weight"] = fix(sd[hfp + "self_attn.k_proj.weight"], c.num_key_value_heads)
        meta[mp + "attention.wv.weight"] = sd[hfp + "self_attn.v_proj.weight"]
        meta[mp + "attention.wo.weight"] = sd[hfp + "self_attn.o_proj.weight"]
        meta[mp + "feed_forward.w1.weight"] = sd[hfp + "mlp.gate_proj.weight"]
        meta[mp + "feed_forward.w2.weight"] = sd[hfp + "mlp.down_proj.weight"]
        meta[mp + "feed_forward.w3.weight"] = sd[hfp + "mlp.up_proj.weight"]
        meta[mp + "attention_norm.weight"] = sd[hfp + "input_layernorm.weight"]
        meta[mp + "ffn_norm.weight"] = sd[hfp + "post_attention_layernorm.weight"]
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
              "norm_eps": c.rms_norm_eps, "vocab_size": -1, "multiple_of": 32}
    if c.num_key_value_heads != c.num_attention_heads:
        params["n_kv_heads"] = c.num_key_value_heads
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(params))
    split_dim = lambda k: 1 if k.endswith(("wo.weight", "w2.weight")) or k == "tok_embeddings.weight" else 0
    for s in range(shards):
        part = {k: v if v.dim() == 1 else v.chunk(shards, dim=split_dim(k))[s].clone() for k, v in meta.items()}
        torch.save(part, folder / f"consolidated.{s:02d}.pth")


def test_meta_layout_checkpoint_gives_hf_logits(hf_and_folder, tmp_path):
    hf, _ = hf_and_folder
    write_meta_checkpoint(tmp_path / "meta", hf)
    ids = ids_for_test()
    assert_close(ours_logits(Llama.from_meta(tmp_path / "meta"), ids), hf_logits(hf, ids), ops=roundings())


def test_meta_layout_from_two_model_parallel_shards(hf_and_folder, tmp_path):
    hf, _ = hf_and_folder
    write_meta_checkpoint(tmp_path / "meta", hf, shards=2)
    ids = ids_for_test()
    assert_close(ours_logits(Llama.from_meta(tmp_path / "meta"), ids), hf_logits(hf, ids), ops=roundings())


def test_meta_weights_without_the_rope_permutation_give_wrong_logits(tmp_path):
    """The q/k row order is what tells the two RoPE layouts apart: skipping it loads without error but is wrong,
    so the comparison above does check the permutation."""
    hf = tiny_hf_llama()
    write_meta_checkpoint(tmp_path / "meta", hf, unpermute=False)
    ids = ids_for_test()
    assert (ours_logits(Llama.from_meta(tmp_path / "meta"), ids) - hf_logits(hf, ids)).abs().max() > 1e-3


# --- tokenizer --------------------------------------------------------------------------------------------------------

CORPUS = ["The following is a conversation between a curious human and AI assistant.",
          "Human: what is in the image?", "AI: a cat sitting on a mat, looking at the camera.",
          "The assistant gives helpful, detailed, and polite answers to the user's questions.",
          "mPLUG-Owl reads pictures and answers questions about them."] * 20

TEXTS = ["Human: what is in the image?", "\nHuman: ", "AI: ", " leading space", "two  spaces", "Zebra xyz 42!",
         "The assistant gives polite answers.\nAI: a cat", ""]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=100, model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2)
    return folder / "tokenizer.model"


def test_tokenizer_special_ids_are_llama_s(sp_model):
    tok = Tokenizer(sp_model)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 2, 0, 100)


def test_tokenizer_encode_equals_sentencepiece_and_hf_slow_backend(sp_model):
    """Without BOS/EOS, with SentencePiece's dummy prefix: what HF's slow (legacy) LlamaTokenizer gave per chunk."""
    import sentencepiece as spm
    from transformers import SentencePieceBackend  # transformers 5's slow, sentencepiece-backed tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    hf = SentencePieceBackend(vocab_file=str(sp_model), legacy=True)
    tok = Tokenizer(sp_model)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == sp.encode(text) == hf.encode(text, add_special_tokens=False), text
        assert 1 not in ids and 2 not in ids
    assert 0 in tok.encode("Zebra xyz 42!")  # characters outside the corpus are unk


def test_tokenizer_decode_skips_bos_eos_and_unk(sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = Tokenizer(sp_model)
    ids = tok.encode("Human: what is in the image?")
    assert tok.decode([1] + ids + [2]) == "Human: what is in the image?" == sp.decode(ids)
    assert tok.decode([1] + tok.encode("a cat") + [0, 2]) == "a cat"


# --- sampling ---------------------------------------------------------------------------------------------------------

LOGITS = torch.tensor([[0.3, 2.0, -1.0, 1.7, 0.0, 1.9]])


def draws(n=400, seed=0, **kw) -> list:
    g = torch.Generator().manual_seed(seed)
    return [sample(LOGITS, generator=g, **kw) for _ in range(n)]


def test_temperature_zero_is_argmax():
    assert sample(LOGITS, temperature=0.0) == 1
    assert set(draws(50, temperature=0.0, top_k=3, top_p=0.5)) == {1}


def test_top_k_1_is_argmax_at_any_temperature():
    assert set(draws(200, temperature=1.0, top_k=1)) == {1}
    assert set(draws(200, temperature=5.0, top_k=1)) == {1}


def test_top_k_keeps_the_k_most_likely():
    assert set(draws(temperature=1.0, top_k=3)) == {1, 5, 3}


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p():
    """Tokens by probability (unsorted on purpose, so the mask must be put back in vocabulary order):
    p = [0.05, 0.5, 0.1, 0.25, 0.0, 0.1] -> top_p 0.45 keeps {1}; 0.7 keeps {1, 3}; 0.8 keeps {1, 3, one of 0.1s}."""
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.25, 1e-9, 0.1]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    pick = lambda p: {sample(logits, 1.0, 0, p, g) for _ in range(400)}
    assert pick(0.45) == {1}
    assert pick(0.7) == {1, 3}
    assert pick(0.8) in ({1, 3, 2}, {1, 3, 5})
    assert pick(0.9) == {1, 3, 2, 5}
    assert pick(0.97) == {0, 1, 2, 3, 5}


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampling_follows_the_softmax_of_logits_over_temperature(temperature):
    counts = torch.bincount(torch.tensor(draws(4000, temperature=temperature)), minlength=6).float() / 4000
    torch.testing.assert_close(counts, (LOGITS / temperature).softmax(-1)[0], atol=0.03, rtol=0)


def test_a_seeded_generator_gives_reproducible_samples():
    a, b = draws(seed=7, temperature=1.0, top_k=4), draws(seed=7, temperature=1.0, top_k=4)
    assert a == b
    assert a != draws(seed=8, temperature=1.0, top_k=4)


def test_seeded_generation_is_reproducible(tmp_path):
    hf = tiny_hf_llama()
    hf.save_pretrained(tmp_path)
    model = Llama.from_hf(tmp_path).eval()
    prompt = ids_for_test(B=1, T=5)
    run = lambda seed: list(model.generate(prompt, max_new_tokens=12, eos_id=-1, temperature=1.0, top_k=20,
                                           generator=torch.Generator().manual_seed(seed)))
    assert run(0) == run(0)
    assert run(0) != run(1)
