"""Owl's claims: the official checkpoint format round-trips strictly, the prompt is tokenised chunk by chunk with 65
placeholders per image, visual tokens land in their slots, and the whole pipeline answers exactly what an independent
reference answers: HF's CLIPVisionModel + the official abstractor's formulas + HF's LlamaForCausalLM, read from the saved
official files, never from our modules."""
import json
import pickle

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import assert_close, tiny_owl
from owl import IMAGE_ID, Owl, load_image, render_prompt, save_shards

QUESTION = "What is in the picture?"


def make_image(seed: int, size=(45, 29)) -> Image.Image:
    """A non-square RGB image with structure (smooth gradients plus noise), different for each seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * (3 + seed) + yy * 5) % 256, (yy * (7 + seed)) % 256, (xx * yy + 40 * seed) % 256], -1)
    noise = rng.integers(0, 60, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def model(tokenizer_model) -> Owl:
    return tiny_owl(tokenizer_model, seed=0)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """The tiny model written once in the official format (single-file safetensors)."""
    folder = tmp_path_factory.mktemp("owl")
    model.save_pretrained(folder)
    return folder


def prompt_and_pixels(model: Owl, n_images: int):
    ids = model.prompt_ids(render_prompt(QUESTION, n_images))
    pixels = torch.stack([model.image_transform(make_image(i)) for i in range(n_images)])
    return ids, pixels


def logits_of(model: Owl, ids, pixels) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]), pixels)


# --- the checkpoint format ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["single safetensors", "sharded safetensors", "bin"])
def test_save_then_load_gives_identical_logits(model, tmp_path, layout):
    if layout == "single safetensors":
        model.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").exists()
    elif layout == "sharded safetensors":
        model.save_pretrained(tmp_path, max_shard_bytes=200_000)
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) >= 3 and all((tmp_path / s).exists() for s in shards)
        assert not (tmp_path / "model.safetensors").exists()
        assert set(index["weight_map"]) == {k for s in shards for k in load_file(tmp_path / s)}
    else:
        model.save_pretrained(tmp_path, safe=False)
        assert (tmp_path / "pytorch_model.bin").exists() and not (tmp_path / "model.safetensors").exists()
    loaded = Owl.from_pretrained(tmp_path)
    ids, pixels = prompt_and_pixels(model, 1)
    assert torch.equal(logits_of(loaded, ids, pixels), logits_of(model, ids, pixels))


def test_shards_filled_one_at_a_time_from_a_meta_plan_are_the_ones_save_pretrained_writes(model, tmp_path):
    """bench.py writes its random owl-7b so: the plan holds only shapes and dtypes, fill gives each shard's values
    as it is written. Same files, same index, same tensors as save_pretrained's own sharding."""
    model.save_pretrained(tmp_path / "saved", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "saved" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    state = {k: t for s in shards for k, t in load_file(tmp_path / "saved" / s).items()}
    plan = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in state.items()}
    filled = []

    def fill(path, shard):
        assert all(t.is_meta for t in shard.values())
        filled.append(path.name)
        return {k: state[k] for k in shard}

    (tmp_path / "planned").mkdir()
    save_shards(plan, tmp_path / "planned", max_shard_bytes=200_000, fill=fill)
    assert filled == shards and len(shards) >= 3
    assert json.loads((tmp_path / "planned" / "model.safetensors.index.json").read_text()) == index
    for s in shards:
        written, expected = load_file(tmp_path / "planned" / s), load_file(tmp_path / "saved" / s)
        assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in written)


def official_keys(cfg: dict) -> dict:
    """Every key and shape of an official mPLUG-Owl checkpoint for an mPLUG-Owl checkpoint with these config.json sizes."""
    v, a, t = cfg["vision_config"], cfg["visual_abstractor_config"], cfg["text_config"]
    D, I, P = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    N = (v["image_size"] // P) ** 2 + 1
    keys = {"vision_model.embeddings.cls_token": (1, 1, D), "vision_model.embeddings.patch_embed.weight": (D, 3, P, P),
            "vision_model.embeddings.position_embedding": (1, N, D)}
    for name in ("weight", "bias"):
        keys[f"vision_model.embeddings.pre_layernorm.{name}"] = (D,)
        keys[f"vision_model.post_layernorm.{name}"] = (D,)
    for i in range(v["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        for name, shape in [("input_layernorm.weight", (D,)), ("input_layernorm.bias", (D,)),
                            ("self_attn.query_key_value.weight", (3 * D, D)), ("self_attn.query_key_value.bias", (3 * D,)),
                            ("self_attn.dense.weight", (D, D)), ("self_attn.dense.bias", (D,)),
                            ("post_attention_layernorm.weight", (D,)), ("post_attention_layernorm.bias", (D,)),
                            ("mlp.fc1.weight", (I, D)), ("mlp.fc1.bias", (I,)), ("mlp.fc2.weight", (D, I)),
                            ("mlp.fc2.bias", (D,))]:
            keys[p + name] = shape
    A, AI, L = a["hidden_size"], a["intermediate_size"], t["hidden_size"]
    for j in range(a["num_hidden_layers"]):
        p = f"abstractor.encoder.layers.{j}.crossattention."
        for name, shape in [("norm1", (A,)), ("normk", (A,)), ("output.norm2", (A,)), ("output.mlp.ffn_ln", (AI,))]:
            keys[f"{p}{name}.weight"] = keys[f"{p}{name}.bias"] = shape
        for name in ("attention.query", "attention.key", "attention.value", "output.out_proj"):
            keys[f"{p}{name}.weight"], keys[f"{p}{name}.bias"] = (A, A), (A,)
        for name in ("output.mlp.w1", "output.mlp.w3"):
            keys[f"{p}{name}.weight"], keys[f"{p}{name}.bias"] = (AI, A), (AI,)
        keys[f"{p}output.mlp.w2.weight"], keys[f"{p}output.mlp.w2.bias"] = (A, AI), (A,)
    keys.update({"abstractor.visual_fc.weight": (L, A), "abstractor.visual_fc.bias": (L,),
                 "abstractor.vit_eos": (1, 1, L), "query_tokens": (1, cfg["num_query_tokens"], A)})
    V, TI = t["vocab_size"], t["intermediate_size"]
    keys.update({"language_model.model.embed_tokens.weight": (V, L), "language_model.model.norm.weight": (L,),
                 "language_model.lm_head.weight": (V, L)})
    for n in range(t["num_hidden_layers"]):
        p = f"language_model.model.layers.{n}."
        for x in "qkvo":
            keys[f"{p}self_attn.{x}_proj.weight"] = (L, L)
        keys.update({p + "mlp.gate_proj.weight": (TI, L), p + "mlp.up_proj.weight": (TI, L),
                     p + "mlp.down_proj.weight": (L, TI), p + "input_layernorm.weight": (L,),
                     p + "post_attention_layernorm.weight": (L,)})
    return keys


def test_config_json_and_weight_keys_are_the_official_ones(model, saved):
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["model_type"] == "mplug-owl"
    assert {"vision_config", "visual_abstractor_config", "text_config"} <= set(cfg)
    assert cfg["num_query_tokens"] == model.cfg.abstractor.num_queries == 64
    v, a, t = cfg["vision_config"], cfg["visual_abstractor_config"], cfg["text_config"]
    assert (v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"], v["image_size"], v["patch_size"]) == \
        (64, 2, 4, 32, 8)
    assert (a["hidden_size"], a["num_hidden_layers"], a["num_attention_heads"], a["intermediate_size"]) == (64, 2, 4, 96)
    assert (t["hidden_size"], t["num_hidden_layers"], t["vocab_size"]) == (96, 2, model.tokenizer.vocab_size)
    weights = load_file(saved / "model.safetensors")
    for key in ("vision_model.encoder.layers.0.self_attn.query_key_value.weight",
                "abstractor.encoder.layers.0.crossattention.output.mlp.ffn_ln.weight", "query_tokens",
                "language_model.model.layers.0.self_attn.q_proj.weight"):
        assert key in weights
    expected = official_keys(cfg)
    assert sorted(set(weights) ^ set(expected)) == []
    assert {k: tuple(w.shape) for k, w in weights.items()} == expected


# --- strict loading ------------------------------------------------------------------------------------------------

def copy_with_config(saved, folder, **text_fields):
    """saved, copied to folder, with text_config fields changed (None deletes the whole text_config)."""
    folder.mkdir()
    for f in saved.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((saved / "config.json").read_text())
    if text_fields.get("text_config", 1) is None:
        del cfg["text_config"]
    else:
        cfg["text_config"].update(text_fields)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_rope_fields_in_config_json_are_ignored_as_the_official_llama_ignores_them(model, saved, tmp_path):
    """transformers 4.28's LLaMA, which the official code runs on, has RoPE base 10000 and no scaling, whatever
    text_config says: Owl computes what the official code computes."""
    copy_with_config(saved, tmp_path / "ckpt", rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    ids, pixels = prompt_and_pixels(model, 1)
    assert torch.equal(logits_of(Owl.from_pretrained(tmp_path / "ckpt"), ids, pixels), logits_of(model, ids, pixels))


@pytest.mark.parametrize("fields,named", [(dict(num_key_value_heads=2), "num_key_value_heads"),
                                          (dict(tie_word_embeddings=True), "tie_word_embeddings"),
                                          (dict(hidden_act="gelu"), "hidden_act"),
                                          (dict(text_config=None), "text_config")])
def test_a_text_config_that_makes_another_model_is_refused_naming_the_field(saved, tmp_path, fields, named):
    copy_with_config(saved, tmp_path / "ckpt", **fields)
    with pytest.raises(ValueError, match=named):
        Owl.from_pretrained(tmp_path / "ckpt")


def edited_checkpoint(saved, tmp_path, edit) -> None:
    """A copy of the saved checkpoint whose tensors went through edit(dict)."""
    for f in saved.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = load_file(saved / "model.safetensors")
    edit(weights)
    save_file(weights, tmp_path / "model.safetensors")


@pytest.mark.parametrize("key", ["abstractor.encoder.layers.1.crossattention.output.mlp.ffn_ln.bias", "query_tokens",
                                 "vision_model.encoder.layers.0.self_attn.query_key_value.weight",
                                 "language_model.lm_head.weight"])
def test_a_missing_key_is_an_error_that_names_it(saved, tmp_path, key):
    edited_checkpoint(saved, tmp_path, lambda w: w.pop(key))
    with pytest.raises(KeyError) as e:
        Owl.from_pretrained(tmp_path)
    assert key in str(e.value)


def test_an_unknown_key_is_an_error_that_names_it(saved, tmp_path):
    key = "abstractor.encoder.layers.0.crossattention.attention.rotary.weight"
    edited_checkpoint(saved, tmp_path, lambda w: w.update({key: torch.zeros(3)}))
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        Owl.from_pretrained(tmp_path)


def test_a_wrongly_shaped_tensor_is_an_error_naming_it_and_both_shapes(saved, tmp_path):
    key = "abstractor.encoder.layers.0.crossattention.output.mlp.w1.weight"  # (96, 64) in the tiny model
    edited_checkpoint(saved, tmp_path, lambda w: w.update({key: w[key].t().contiguous()}))  # same size, transposed
    with pytest.raises(ValueError) as e:
        Owl.from_pretrained(tmp_path)
    assert key in str(e.value) and "(64, 96)" in str(e.value) and "(96, 64)" in str(e.value)


class WritesMarker:
    """Unpickling this runs open(marker, 'w'): it creates a file as a side effect."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_bin_with_pickled_code_is_refused_without_running_it(saved, tmp_path):
    for f in saved.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = dict(load_file(saved / "model.safetensors"))
    marker = tmp_path / "pwned"
    weights["language_model.model.norm.weight"] = WritesMarker(marker)
    torch.save(weights, tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError):
        Owl.from_pretrained(tmp_path)
    assert not marker.exists()
    # the payload is live: plain unpickling does run it, so the refusal above is what kept the file from appearing
    torch.load(tmp_path / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


# --- the prompt ----------------------------------------------------------------------------------------------------

CANONICAL = ("The following is a conversation between a curious human and AI assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions.\nHuman: <image>\nHuman: {question}\nAI: ")


def test_render_prompt_is_the_canonical_template():
    assert render_prompt(QUESTION, 1) == CANONICAL.format(question=QUESTION)
    two = CANONICAL.replace("Human: <image>\n", "Human: <image>\nHuman: <image>\n")
    assert render_prompt(QUESTION, 2) == two.format(question=QUESTION)
    assert render_prompt(QUESTION, 1).endswith("\nAI: ")


@pytest.mark.parametrize("n_images", [1, 2, 3])
def test_prompt_ids_are_one_bos_then_chunks_and_65_placeholders_per_image(model, tokenizer_model, n_images):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    text = render_prompt(QUESTION, n_images)
    ids = model.prompt_ids(text)
    per_image = model.cfg.abstractor.num_queries + 1
    assert per_image == 65
    expected = [sp.bos_id()]
    chunks = text.split("<image>")
    for i, chunk in enumerate(chunks):
        expected += sp.encode(chunk)  # each chunk on its own, with its own leading-space handling
        if i < len(chunks) - 1:
            expected += [IMAGE_ID] * per_image
    assert ids == expected
    assert ids[0] == sp.bos_id() and ids.count(sp.bos_id()) == 1
    runs = [len(r) for r in "".join("I" if i == IMAGE_ID else "t" for i in ids).split("t") if r]
    assert runs == [per_image] * n_images


def test_visual_tokens_fill_their_image_slots_in_order(model):
    ids, pixels = prompt_and_pixels(model, 2)
    with torch.no_grad():
        embeds = model.embed(torch.tensor([ids]), pixels)[0]
        visual = [model.encode_images(pixels[i:i + 1])[0] for i in range(2)]
        text = model.language_model.model.embed_tokens(torch.tensor(ids).clamp(min=0))
    slots = torch.tensor(ids) == IMAGE_ID
    first, second = slots.nonzero().flatten().split(65)
    assert first[-1] < second[0] and (second[0] - first[-1]) > 1  # two separate runs
    assert not torch.allclose(visual[0], visual[1], atol=1e-3)  # the images differ, so the order is visible
    assert_close(embeds[first], visual[0], ops=16)
    assert_close(embeds[second], visual[1], ops=16)
    assert torch.equal(embeds[~slots], text[~slots])


# --- end to end against an independent reference -------------------------------------------------------------------

def reference_vit(sd: dict, cfg: dict, pixels: torch.Tensor) -> torch.Tensor:
    """f_V as HF's CLIPVisionModel filled from the official keys; its post_layernorm applied to every token."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    v = cfg["vision_config"]
    hf_cfg = CLIPVisionConfig(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                              num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
                              image_size=v["image_size"], patch_size=v["patch_size"], layer_norm_eps=1e-6,
                              hidden_act="quick_gelu")
    hf_cfg._attn_implementation = "eager"
    clip = CLIPVisionModel(hf_cfg).eval()
    D, H = v["hidden_size"], v["num_attention_heads"]
    g = lambda k: sd["vision_model." + k]
    out = {"embeddings.class_embedding": g("embeddings.cls_token").reshape(D),
           "embeddings.patch_embedding.weight": g("embeddings.patch_embed.weight"),
           "embeddings.position_embedding.weight": g("embeddings.position_embedding")[0]}
    for name in ("weight", "bias"):
        out[f"pre_layrnorm.{name}"] = g(f"embeddings.pre_layernorm.{name}")
        out[f"post_layernorm.{name}"] = g(f"post_layernorm.{name}")
        for i in range(v["num_hidden_layers"]):
            p = f"encoder.layers.{i}."
            fused = g(p + f"self_attn.query_key_value.{name}")
            q, k, vv = fused.reshape(H, 3, D // H, *fused.shape[1:]).unbind(1)  # (heads, 3, head_dim) interleaved
            for x, w in zip("qkv", (q, k, vv)):
                out[p + f"self_attn.{x}_proj.{name}"] = w.reshape(D, *fused.shape[1:])
            out[p + f"self_attn.out_proj.{name}"] = g(p + f"self_attn.dense.{name}")
            out[p + f"layer_norm1.{name}"] = g(p + f"input_layernorm.{name}")
            out[p + f"layer_norm2.{name}"] = g(p + f"post_attention_layernorm.{name}")
            out[p + f"mlp.fc1.{name}"] = g(p + f"mlp.fc1.{name}")
            out[p + f"mlp.fc2.{name}"] = g(p + f"mlp.fc2.{name}")
    tower = getattr(clip, "vision_model", clip)  # transformers 4 wraps the tower, 5 does not
    missing, unexpected = tower.load_state_dict(out, strict=False)
    assert set(missing) <= {"embeddings.position_ids"} and not unexpected, (missing, unexpected)  # a buffer, not a weight
    with torch.no_grad():
        return tower.post_layernorm(clip(pixel_values=pixels).last_hidden_state)


def reference_abstractor(sd: dict, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """f_K written out from the official layer with plain torch ops on the official keys."""
    a = cfg["visual_abstractor_config"]
    H, B = a["num_attention_heads"], x.shape[0]
    q = sd["query_tokens"].expand(B, -1, -1)
    for j in range(a["num_hidden_layers"]):
        p = f"abstractor.encoder.layers.{j}.crossattention."
        lin = lambda t, n: F.linear(t, sd[p + n + ".weight"], sd[p + n + ".bias"])
        ln = lambda t, n, eps: F.layer_norm(t, t.shape[-1:], sd[p + n + ".weight"], sd[p + n + ".bias"], eps)
        heads = lambda t: t.reshape(B, t.shape[1], H, -1).transpose(1, 2)  # (B, H, T, hd), heads contiguous
        qn, xn = ln(q, "norm1", 1e-5), ln(x, "normk", 1e-5)
        kv = torch.cat([qn, xn], dim=1)
        Q, K, V = heads(lin(qn, "attention.query")), heads(lin(kv, "attention.key")), heads(lin(kv, "attention.value"))
        att = torch.softmax(Q @ K.transpose(-1, -2) / Q.shape[-1] ** 0.5, dim=-1)
        ctx = (att @ V).transpose(1, 2).reshape(B, q.shape[1], -1)
        h = qn + lin(ctx, "output.out_proj")
        z = ln(h, "output.norm2", 1e-5)
        hidden = F.silu(lin(z, "output.mlp.w1")) * lin(z, "output.mlp.w3")
        q = h + lin(ln(hidden, "output.mlp.ffn_ln", a["layer_norm_eps"]), "output.mlp.w2")
    out = F.linear(q, sd["abstractor.visual_fc.weight"], sd["abstractor.visual_fc.bias"])
    return torch.cat([out, sd["abstractor.vit_eos"].expand(B, -1, -1)], dim=1)


def reference_llama(sd: dict, cfg: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**cfg["text_config"])
    hf_cfg._attn_implementation = "eager"
    llama = LlamaForCausalLM(hf_cfg).eval()
    llama.load_state_dict({k.removeprefix("language_model."): w for k, w in sd.items()
                           if k.startswith("language_model.")}, strict=True)
    return llama


def reference_prompt_ids(sp, question: str, n_images: int, num_query_tokens: int) -> list:
    """The official processor's tokenisation from scratch: BOS once, each chunk between <image> tags encoded alone, num_query_tokens + 1 slots."""
    text = ("The following is a conversation between a curious human and AI assistant. The assistant gives helpful, "
            "detailed, and polite answers to the user's questions." + "\nHuman: <image>" * n_images +
            f"\nHuman: {question}\nAI: ")
    ids = [sp.bos_id()]
    for i, chunk in enumerate(text.split("<image>")):
        ids += ([-1] * (num_query_tokens + 1) if i else []) + sp.encode(chunk)
    return ids


@pytest.mark.parametrize("n_images", [1, 2])
def test_owl_answers_exactly_as_the_hf_clip_spec_abstractor_hf_llama_reference(saved, n_images):
    from transformers import CLIPImageProcessor

    cfg = json.loads((saved / "config.json").read_text())
    sd = load_file(saved / "model.safetensors")
    sp = spm.SentencePieceProcessor(model_file=str(saved / "tokenizer.model"))
    images = [make_image(10 + i, size=(50 - 9 * i, 31 + 7 * i)) for i in range(n_images)]

    # the reference: preprocess, f_V, f_K, prompt, splice, f_L, all from the saved files
    S = cfg["vision_config"]["image_size"]  # the official processor: squash to a square, then HF's CLIP processor
    squashed = [im.resize((S, S), Image.BICUBIC) for im in images]
    pixels_ref = CLIPImageProcessor.from_pretrained(saved)(squashed, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        visual = reference_abstractor(sd, cfg, reference_vit(sd, cfg, pixels_ref))  # (n, Q + 1, L)
    assert visual.shape == (n_images, 65, cfg["text_config"]["hidden_size"])
    ids_ref = reference_prompt_ids(sp, QUESTION, n_images, cfg["num_query_tokens"])
    llama = reference_llama(sd, cfg)
    embeds = llama.model.embed_tokens(torch.tensor([ids_ref]).clamp(min=0)).detach()
    slots = [i for i, t in enumerate(ids_ref) if t == -1]
    embeds[0, slots] = visual.reshape(-1, visual.shape[-1])
    with torch.no_grad():
        logits_ref = llama(inputs_embeds=embeds).logits
        gen_ref = llama.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                 max_new_tokens=12, do_sample=False, eos_token_id=sp.eos_id(), pad_token_id=0)
    gen_ref = gen_ref[0, -12:].tolist() if gen_ref.shape[1] > 12 else gen_ref[0].tolist()
    text_ref = sp.decode([t for t in gen_ref if not (sp.is_control(t) or sp.is_unknown(t))])

    # ours
    owl = Owl.from_pretrained(saved)
    pixels = torch.stack([owl.image_transform(im) for im in images])
    ids = owl.prompt_ids(render_prompt(QUESTION, n_images))
    assert ids == ids_ref
    gen = list(owl.generate(ids, pixels, max_new_tokens=12, temperature=0.0))
    logits = logits_of(owl, ids, pixels)

    assert len(gen_ref) == 12 and len(set(gen_ref)) > 3, "the reference answer is too degenerate to test anything"
    # tens of float32 roundings of the largest logit: ~10 layers of sums over up to 160 products, in another order
    assert_close(logits, logits_ref, ops=64)
    assert gen == gen_ref
    assert owl.tokenizer.decode(gen) == text_ref and text_ref.strip()


# --- images --------------------------------------------------------------------------------------------------------

def official_pixels(path, size: int, mean=(0.48145466, 0.4578275, 0.40821073),
                    std=(0.26862954, 0.26130258, 0.27577711)) -> torch.Tensor:
    """The official preprocessing written out with PIL and numpy: the image as opened, squashed to size x size
    (bicubic), then RGB, /255, (x - mean) / std, channels first."""
    with Image.open(path) as f:
        rgb = f.resize((size, size), Image.BICUBIC).convert("RGB")
    x = (np.asarray(rgb, dtype=np.float32) / np.float32(255) - np.float32(mean)) / np.float32(std)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


@pytest.mark.parametrize("mode,suffix", [("RGBA", ".png"), ("P", ".png"), ("L", ".png"), ("CMYK", ".jpg")])
def test_images_of_any_mode_are_preprocessed_as_the_official_processor_does(model, tmp_path, mode, suffix):
    rgb = make_image(3)
    image = rgb.convert(mode)
    if mode == "RGBA":
        image.putalpha(Image.fromarray(np.linspace(0, 255, 45 * 29).reshape(29, 45).astype(np.uint8)))
    path = tmp_path / f"img{suffix}"
    image.save(path)
    pixels = load_image(str(path), model.image_transform)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert torch.equal(pixels, official_pixels(path, 32))


HUB_PREPROCESSOR = {"resolution": 224, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                    "image_std": [0.26862954, 0.26130258, 0.27577711]}  # as MAGAer13/mplug-owl-llama-7b ships it


@pytest.mark.parametrize("name,mode,size", [("wide.png", "RGB", (300, 200)), ("tall.jpg", "L", (180, 240))])
def test_with_the_hubs_preprocessor_config_a_non_square_photo_is_squashed_not_cropped(saved, tmp_path, name, mode,
                                                                                     size):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in saved.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "preprocessor_config.json").write_text(json.dumps(HUB_PREPROCESSOR))
    model = Owl.from_pretrained(folder)
    make_image(7, size=size).convert(mode).save(tmp_path / name)
    pixels = load_image(str(tmp_path / name), model.image_transform)
    assert torch.equal(pixels, official_pixels(tmp_path / name, 32))
    # the border columns survive: a centre crop of the wide image would lose a sixth of its width on each side
    with Image.open(tmp_path / name) as f:
        cropped = f.crop((50, 0, 250, 200)) if size[0] > size[1] else f.crop((0, 30, 180, 210))
        cropped.save(tmp_path / ("cropped" + name[-4:]))
    assert not torch.allclose(pixels, official_pixels(tmp_path / ("cropped" + name[-4:]), 32), atol=0.1)


def test_the_saved_preprocessor_config_makes_the_official_processor_agree(model, saved):
    """What the official MplugOwlProcessor does with the preprocessor_config.json Owl writes: squash to
    size["shortest_edge"] (bicubic), then HF's CLIPImageProcessor from that file, whose resize and crop then keep
    every pixel. A non-square image is squashed, not cropped, and the result is Owl's."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(saved)
    side = processor.size["shortest_edge"]
    image = make_image(5, size=(61, 23))
    ref = processor(image.resize((side, side), Image.BICUBIC), return_tensors="pt")["pixel_values"][0]
    ours = model.image_transform(image)
    assert ref.shape == ours.shape == (3, 32, 32)
    assert_close(ours, ref, ops=4)


@pytest.mark.parametrize("field,value", [("do_normalize", False), ("rescale_factor", 1 / 127.5),
                                         ("crop_size", {"height": 24, "width": 24}), ("image_mean", [0.5])])
def test_a_preprocessor_config_asking_for_other_preprocessing_is_refused_naming_the_field(saved, tmp_path, field,
                                                                                          value):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in saved.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((saved / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=field):
        Owl.from_pretrained(folder)
