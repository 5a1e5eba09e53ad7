"""mPLUG-Owl2 at the level of Owl and of the command line, each claim checked against a reference written here: the
prompt's pieces spelled with SentencePiece itself, the modality indicator by hand, a greedy loop that recomputes the
whole sequence at every step, checkpoint files written here in the four layouts the hub uses, and the preprocessing
as a numpy + PIL formula. The model is the owl2-tiny preset (17 positions per image, a 12 x 12 grid), random and
jittered so that its two multiway copies differ and a mis-routed token shows."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import attention
import owl
from chat import Turn, chat_prompt
from conftest import assert_close, jittered_owl, tiny_owl
from owl import IMAGE_ID, OWL2, Owl, OwlConfig, Sampling, SquareFirst, load_image
from vit import ImageTransform

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is in the picture?"
GREEDY = ["--max-new-tokens", "12", "--temperature", "0"]
CLIP_MEAN = np.float32([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.float32([0.26862954, 0.26130258, 0.27577711])
SLOTS = 17  # owl2-tiny: 16 learnable queries + vit_eos
SIDE = 96  # owl2-tiny's image size (12 x 12 patches of 8)


def tiny_owl2(tokenizer_model, seed: int = 0, legacy: bool = False) -> Owl:
    """The owl2-tiny preset with the test tokenizer's vocabulary: every parameter jittered (so the text and visual
    copies of each multiway module differ), lm_head scaled up and its unk/bos/eos rows zeroed (greedy answers of
    full length, without repeats). legacy: the tokenizer_config.json flag (Llama-2's files say false)."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    cfg = OwlConfig.preset("owl2-tiny")
    cfg = replace(cfg, text=replace(cfg.text, vocab_size=sp.get_piece_size()))
    model = jittered_owl(cfg, tokenizer_model, seed)
    model.tokenizer.legacy = legacy
    return model


def owl2_pixels(path, side: int = SIDE) -> torch.Tensor:
    """mPLUG-Owl2's preprocessing written out: RGB, bicubic to a square as wide as the longest edge, bicubic to
    side x side, /255, CLIP mean/std; (3, side, side)."""
    with Image.open(path) as f:
        rgb = f.convert("RGB")
    m = max(rgb.size)
    square = rgb.resize((m, m), Image.BICUBIC).resize((side, side), Image.BICUBIC)
    x = (np.asarray(square, dtype=np.float32) / np.float32(255) - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def make_image(seed: int, size, mode: str = "RGB") -> Image.Image:
    """A picture with structure (gradients plus noise), different for each seed, in the given mode."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * (3 + seed) + yy * 5) % 256, (yy * (7 + seed)) % 256, (xx * yy + 40 * seed) % 256], -1)
    rgb = np.clip(base + rng.integers(0, 60, size=(h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode)


def owl_main(*args, stdin: str = "") -> subprocess.CompletedProcess:
    """owl.main in this process, stdin given, what it prints captured."""
    out, err = io.StringIO(), io.StringIO()
    saved_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = owl.main([str(a) for a in args])
            except SystemExit as e:
                code = e.code
    finally:
        sys.stdin = saved_stdin
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_one_sentence_exit_2(r, *mentions) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert all(m in lines[0] for m in mentions), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def sp(tokenizer_model):
    return spm.SentencePieceProcessor(model_file=str(tokenizer_model))


@pytest.fixture(scope="module")
def model(tokenizer_model) -> Owl:
    return tiny_owl2(tokenizer_model)


@pytest.fixture(scope="module")
def files(model, tokenizer_model, tmp_path_factory):
    """The tiny Owl2 saved (legacy false), a v1 checkpoint, and images: two non-square RGB PNGs."""
    d = tmp_path_factory.mktemp("owl2")
    model.save_pretrained(d / "ckpt")
    tiny_owl(tokenizer_model, seed=1).save_pretrained(d / "v1")
    make_image(0, (40, 28)).save(d / "img0.png")
    make_image(1, (23, 37)).save(d / "img1.png")
    return d


def pieces(sp, ids) -> list:
    """Ids as SentencePiece pieces; an image slot as <IMG>."""
    return ["<IMG>" if i == IMAGE_ID else sp.id_to_piece(i) for i in ids]


def greedy(model: Owl, text: str, images: list, n: int = 12) -> list:
    """The library's greedy answer (token ids) to a prompt string, with pixels made by the formula above."""
    pixels = torch.stack([owl2_pixels(p) for p in images]) if images else None
    ids = list(model.generate(model.prompt_ids(text), pixels, max_new_tokens=n, temperature=0.0))
    assert len(ids) == n
    return ids


# --- 1. the prompt ---------------------------------------------------------------------------------------------------

def test_the_owl2_template_is_user_image_tags_question_assistant_and_ends_answers_with_eos():
    assert OWL2.prompt(QUESTION, 1) == f"USER: <|image|>{QUESTION} ASSISTANT:"
    assert OWL2.prompt(QUESTION, 0) == f"USER: {QUESTION} ASSISTANT:"
    turns = [Turn("Hi", [None, None], " A cat. "), Turn("And?", [])]
    assert chat_prompt(turns, OWL2) == "USER: <|image|><|image|>Hi ASSISTANT: A cat.</s>USER: And? ASSISTANT:"


@pytest.mark.parametrize("legacy", [False, True], ids=["legacy-false", "legacy-true"])
def test_single_turn_prompt_is_bos_user_image_slots_then_the_question_with_its_own_leading_space(model, sp, monkeypatch,
                                                                                                 legacy):
    monkeypatch.setattr(model.tokenizer, "legacy", legacy)
    got = pieces(sp, model.prompt_ids(f"USER: <|image|>{QUESTION} ASSISTANT:"))
    # "USER" is not in the tiny vocabulary: byte pieces, after the dummy prefix's lone "▁"
    user = ["▁", "<0x55>", "<0x53>", "<0x45>", "<0x52>", ":", "▁"]
    assert sp.encode("USER: ", out_type=str) == user
    question = sp.encode(f"{QUESTION} ASSISTANT:", out_type=str)
    assert question[:2] == ["▁Wh", "at"]  # the chunk after the image starts with its own dummy-prefix space
    assert got == ["<s>"] + user + ["<IMG>"] * SLOTS + question
    assert model.cfg.tokens_per_image == SLOTS == model.cfg.abstractor.num_queries + 1


@pytest.mark.parametrize("legacy", [False, True], ids=["legacy-false", "legacy-true"])
def test_multi_turn_prompt_has_eos_id_after_each_answer_and_drops_the_space_after_it_only_when_legacy_is_false(
        model, sp, monkeypatch, legacy):
    monkeypatch.setattr(model.tokenizer, "legacy", legacy)
    text = f"USER: <|image|>{QUESTION} ASSISTANT: A red cat.</s>USER: And the dog? ASSISTANT:"
    got = pieces(sp, model.prompt_ids(text))
    after = sp.encode("USER: And the dog? ASSISTANT:", out_type=str)
    assert after[0] == "▁"  # the dummy prefix's lone piece: legacy false drops it whole
    expected = (["<s>"] + sp.encode("USER: ", out_type=str) + ["<IMG>"] * SLOTS
                + sp.encode(f"{QUESTION} ASSISTANT: A red cat.", out_type=str) + ["</s>"]
                + (after if legacy else after[1:]))
    assert got == expected
    assert model.prompt_ids(text).count(2) == 1 and model.prompt_ids(text)[0] == 1  # "</s>" is EOS id 2; one BOS


@pytest.mark.parametrize("legacy", [False, True], ids=["legacy-false", "legacy-true"])
def test_text_after_eos_loses_the_underline_of_its_first_piece_unless_it_starts_with_a_space(model, sp, monkeypatch,
                                                                                             legacy):
    monkeypatch.setattr(model.tokenizer, "legacy", legacy)
    what = sp.encode("What is it?", out_type=str)
    assert what[0] == "▁Wh"
    got = pieces(sp, model.prompt_ids("USER: Hi ASSISTANT: Hi</s>What is it?"))
    assert got[-len(what) - 1:] == ["</s>"] + (what if legacy else ["Wh"] + what[1:])
    spaced = sp.encode(" What is it?", out_type=str)  # a leading space is kept, in both readings
    got = pieces(sp, model.prompt_ids("USER: Hi ASSISTANT: Hi</s> What is it?"))
    assert got[-len(spaced) - 1:] == ["</s>"] + spaced


# --- 2. the modality indicator ---------------------------------------------------------------------------------------

def two_image_prompt(model, sp, files):
    """A prompt with two images, and its indicator written by hand: 1 on the two runs of SLOTS slots."""
    ids = model.prompt_ids(f"USER: <|image|><|image|>{QUESTION} ASSISTANT:")
    head, tail = 1 + len(sp.encode("USER: ")), len(sp.encode(f"{QUESTION} ASSISTANT:"))
    indicator = torch.tensor([[0] * head + [1] * (2 * SLOTS) + [0] * tail])
    assert indicator.shape[1] == len(ids)
    pixels = torch.stack([owl2_pixels(files / "img0.png"), owl2_pixels(files / "img1.png")])
    return ids, indicator, pixels


def test_image_slots_have_indicator_1_and_text_0_and_the_forward_runs_on_it(model, sp, files):
    ids, indicator, pixels = two_image_prompt(model, sp, files)
    input_ids = torch.tensor([ids])
    assert torch.equal(model.modality(input_ids), indicator)
    with torch.no_grad():
        embeds = model.embed(input_ids, pixels)
        logits = model(input_ids, pixels)
        by_hand = model.language_model(inputs_embeds=embeds, modality=indicator)
        all_text = model.language_model(inputs_embeds=embeds, modality=torch.zeros_like(indicator))
    assert torch.equal(logits, by_hand)
    first_slot = int(indicator[0].nonzero()[0])
    assert torch.equal(logits[0, :first_slot], all_text[0, :first_slot])  # text before the images: copy 0 alike
    assert (logits[0, first_slot:] - all_text[0, first_slot:]).abs().amax() > 1e-2  # the visual copies act
    v1 = Owl(OwlConfig.preset("tiny"))
    assert v1.modality(input_ids) is None  # v1's f_L has one copy of everything


def recompute_greedy(model: Owl, ids, pixels, indicator, n: int, new_modality: int) -> list:
    """Greedy decoding the slow way: the whole sequence through f_L at every step, no cache; the new tokens get
    indicator new_modality."""
    with torch.no_grad():
        embeds = model.embed(torch.tensor([ids]), pixels)
        out = []
        for _ in range(n):
            new = model.language_model.model.embed_tokens(torch.tensor([out], dtype=torch.long))
            modality = torch.cat([indicator, torch.full((1, len(out)), new_modality)], 1)
            logits = model.language_model(inputs_embeds=torch.cat([embeds, new], 1), modality=modality)
            out.append(int(logits[0, -1].argmax()))
    return out


def test_generated_tokens_are_text_as_a_full_recompute_greedy_loop_with_indicator_0_gives(model, sp, files):
    ids, indicator, pixels = two_image_prompt(model, sp, files)
    got = list(model.generate(ids, pixels, max_new_tokens=10, temperature=0.0))
    assert got == recompute_greedy(model, ids, pixels, indicator, 10, new_modality=0)
    # the comparison can tell: had the new tokens been read as visual, the answer would be another
    assert got != recompute_greedy(model, ids, pixels, indicator, 10, new_modality=1)
    batch = model.generate_batch([(ids, pixels), (model.prompt_ids("USER: Hi ASSISTANT:"), None)], max_new_tokens=10)
    assert batch[0] == got


# --- 3. checkpoint files --------------------------------------------------------------------------------------------

def official_state(model: Owl, folder: Path) -> dict:
    """The saved weights with the RoPE inv_freq buffers the hub's files carry, one per layer."""
    state = load_file(folder / "model.safetensors")
    hd = model.cfg.text.head_dim
    inv_freq = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    for i in range(model.cfg.text.num_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    return state


def write_layout(state: dict, folder: Path, layout: str) -> None:
    """state as the hub writes it: one .bin or .safetensors file, or three shards of either with their index."""
    safe = "safetensors" in layout
    base, ext = ("model", "safetensors") if safe else ("pytorch_model", "bin")

    def write(shard, name):
        save_file(shard, folder / name, metadata={"format": "pt"}) if safe else torch.save(shard, folder / name)

    if "shards" not in layout:
        write(state, f"{base}.{ext}")
        return
    keys = sorted(state)
    groups = [keys[i::3] for i in range(3)]
    names = [f"{base}-{i + 1:05d}-of-00003.{ext}" for i in range(3)]
    for group, name in zip(groups, names):
        write({k: state[k] for k in group}, name)
    weight_map = {k: name for group, name in zip(groups, names) for k in group}
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / f"{base}.{ext}.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": weight_map}))


def checkpoint_with(files, folder: Path, state: dict, layout: str = "safetensors", config=None) -> Path:
    """The saved checkpoint's small files, with these weights in this layout (and config.json edited)."""
    folder.mkdir()
    for f in (files / "ckpt").iterdir():
        if not f.name.startswith("model"):
            shutil.copyfile(f, folder / f.name)
    if config:
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **config}))
    write_layout(state, folder, layout)
    return folder


def our_key(official: str) -> str:
    """Where an official mPLUG-Owl2 key goes in Owl, for the keys whose place is a plain rename."""
    for theirs, ours in (("model.vision_model.", "vision_model."), ("model.visual_abstractor.query_embeds",
                                                                     "abstractor.query_tokens"),
                         ("model.visual_abstractor.", "abstractor.")):
        if official.startswith(theirs):
            return ours + official[len(theirs):]
    return "language_model." + official


LAYOUTS = ["bin", "bin shards", "safetensors", "safetensors shards"]


def test_the_saved_keys_are_the_official_owl2_names(model, files):
    state = load_file(files / "ckpt" / "model.safetensors")
    for key in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                "model.layers.3.self_attn.k_proj.multiway.0.weight",
                "model.layers.3.self_attn.v_proj.multiway.1.weight",
                "model.layers.1.input_layernorm.multiway.1.weight", "model.layers.2.mlp.down_proj.weight",
                "model.norm.weight", "lm_head.weight", "model.vision_model.embeddings.cls_token",
                "model.vision_model.encoder.layers.3.self_attn.query_key_value.weight",
                "model.visual_abstractor.query_embeds", "model.visual_abstractor.vit_eos",
                "model.visual_abstractor.encoder.layers.1.crossattention.attention.key.weight"):
        assert key in state, key
    assert not any(k.startswith(("language_model.", "abstractor.", "vision_model.", "query_tokens")) for k in state)
    ours = model.state_dict()
    for key in ("model.layers.3.self_attn.k_proj.multiway.1.weight", "model.layers.0.input_layernorm.multiway.0.weight",
                "lm_head.weight", "model.vision_model.embeddings.position_embedding",
                "model.visual_abstractor.query_embeds", "model.visual_abstractor.visual_fc.bias"):
        assert torch.equal(state[key], ours[our_key(key)]), key
    assert state["model.visual_abstractor.query_embeds"].shape == (1, 16, 128)
    assert len(state) == len(ours)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_weight_layout_with_inv_freq_keys_loads_to_identical_tensors(model, files, tmp_path, layout):
    state = official_state(model, files / "ckpt")
    folder = checkpoint_with(files, tmp_path / "ckpt", state, layout)
    written = sorted(p.name for p in folder.iterdir() if p.name.startswith(("model", "pytorch_model")))
    assert len(written) == (4 if "shards" in layout else 1)
    loaded = Owl.from_pretrained(folder)
    got, expected = loaded.state_dict(), model.state_dict()
    assert got.keys() == expected.keys()
    assert [k for k in got if not torch.equal(got[k], expected[k])] == []
    for key in ("model.layers.2.self_attn.v_proj.multiway.1.weight", "model.visual_abstractor.query_embeds"):
        assert torch.equal(got[our_key(key)], state[key])  # each tensor from its own key


def test_sincos_tables_saved_by_the_official_code_are_skipped(model, files, tmp_path):
    state = load_file(files / "ckpt" / "model.safetensors")
    for j in range(model.cfg.abstractor.num_layers):
        p = f"model.visual_abstractor.encoder.layers.{j}.crossattention.attention."
        state[p + "q_pos_embed"] = torch.zeros(16, 128)
        state[p + "k_pos_embed"] = torch.zeros(1 + 12 * 12, 128)
    loaded = Owl.from_pretrained(checkpoint_with(files, tmp_path / "ckpt", state))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(loaded.abstractor.k_pos, model.abstractor.k_pos)  # computed, not read


def unexpected(state):
    state["model.layers.0.self_attn.z_proj.weight"] = torch.zeros(3)
    return "model.layers.0.self_attn.z_proj.weight", "unexpected"


def missing(state):
    del state["model.layers.1.self_attn.v_proj.multiway.1.weight"]
    return "model.layers.1.self_attn.v_proj.multiway.1.weight", "missing"


def reshaped(state):
    key = "model.layers.0.mlp.gate_proj.weight"  # (512, 192)
    state[key] = state[key].t().contiguous()
    return key, "(192, 512)"


@pytest.mark.parametrize("edit", [unexpected, missing, reshaped])
def test_an_unexpected_missing_or_misshapen_key_is_an_error_naming_it(model, files, tmp_path, edit):
    state = load_file(files / "ckpt" / "model.safetensors")
    key, word = edit(state)
    folder = checkpoint_with(files, tmp_path / "ckpt", state)
    with pytest.raises((KeyError, ValueError), match=key):
        Owl.from_pretrained(folder)
    assert_one_sentence_exit_2(owl_main("--checkpoint", folder, "--prompt", "Hi", *GREEDY), key, word)


@pytest.mark.parametrize("kind,mentions", [("mplug_owl2_1", ["mplug_owl2_1", "Qwen"]), ("qwen_vl", ["qwen_vl"])])
def test_owl2_1_and_unknown_model_types_are_refused_in_one_sentence(files, tmp_path, kind, mentions):
    state = load_file(files / "ckpt" / "model.safetensors")
    folder = checkpoint_with(files, tmp_path / "ckpt", state, config={"model_type": kind})
    with pytest.raises(ValueError, match=kind):
        Owl.from_pretrained(folder)
    line = assert_one_sentence_exit_2(owl_main("--checkpoint", folder, "--prompt", "Hi", *GREEDY), *mentions)
    assert "mplug_owl2" in line.replace("mplug_owl2_1", "")  # it names what Owl runs


# --- 4. the images ---------------------------------------------------------------------------------------------------

def test_two_step_resize_equals_the_one_step_one_for_square_images_and_differs_for_non_square():
    square, wide = make_image(3, (70, 70)), make_image(3, (300, 200))
    assert torch.equal(SquareFirst(SIDE)(square), ImageTransform(SIDE)(square))
    differs = (SquareFirst(SIDE)(wide) - ImageTransform(SIDE)(wide)).abs()
    assert differs.amax() > 0.05  # bicubic twice is not bicubic once


@pytest.mark.parametrize("name,size,mode,fmt", [("rgb.png", (300, 200), "RGB", "PNG"),
                                                ("gray.jpg", (180, 240), "L", "JPEG")])
def test_pixels_equal_the_square_then_resize_formula(files, tmp_path, name, size, mode, fmt):
    make_image(5, size, mode).save(tmp_path / name, format=fmt)
    loaded = Owl.from_pretrained(files / "ckpt")  # the transform as the saved preprocessor_config.json makes it
    got = load_image(str(tmp_path / name), loaded.image_transform)
    expected = owl2_pixels(tmp_path / name)
    assert got.shape == (3, SIDE, SIDE)
    assert_close(got, expected)
    assert_close(load_image(str(tmp_path / name), Owl(OwlConfig.preset("owl2-tiny")).image_transform), expected)
    if mode == "L":  # grey: the three channels hold the same 8-bit values before normalisation
        levels = [((got[c] * float(CLIP_STD[c]) + float(CLIP_MEAN[c])) * 255).round() for c in range(3)]
        assert torch.equal(levels[0], levels[1]) and torch.equal(levels[1], levels[2])


def test_the_7b_preset_squares_then_resizes_to_448():
    with torch.device("meta"):
        big = Owl(OwlConfig.preset("owl2-7b"))
    assert type(big.image_transform) is SquareFirst and big.image_transform.image_size == 448
    assert big.cfg.tokens_per_image == 65


# --- 5. load -> save -> load ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("legacy", [False, True, None], ids=["legacy-false", "legacy-true", "legacy-absent"])
def test_load_save_load_is_bit_exact_and_keeps_the_legacy_flag(files, tmp_path, legacy):
    first = tmp_path / "first"
    shutil.copytree(files / "ckpt", first)
    tok = json.loads((first / "tokenizer_config.json").read_text())
    tok.pop("legacy")
    (first / "tokenizer_config.json").write_text(json.dumps(tok if legacy is None else {**tok, "legacy": legacy}))
    a = Owl.from_pretrained(first)
    assert a.tokenizer.legacy is (legacy is not False)  # transformers 4.31 reads a missing flag as true
    a.save_pretrained(tmp_path / "second")
    b = Owl.from_pretrained(tmp_path / "second")
    assert json.loads((tmp_path / "second" / "tokenizer_config.json").read_text())["legacy"] is a.tokenizer.legacy
    assert b.tokenizer.legacy is a.tokenizer.legacy
    assert b.cfg == a.cfg
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert load_file(tmp_path / "second" / "model.safetensors").keys() == load_file(first / "model.safetensors").keys()
    assert (tmp_path / "second" / "tokenizer.model").read_bytes() == (first / "tokenizer.model").read_bytes()


def test_the_saved_config_is_mplug_owl2_with_a_visual_config_and_no_sincos_tables_are_saved(model, files):
    cfg = json.loads((files / "ckpt" / "config.json").read_text())
    assert cfg["model_type"] == "mplug_owl2"
    assert set(cfg["visual_config"]) == {"visual_model", "visual_abstractor"}
    v, a = cfg["visual_config"]["visual_model"], cfg["visual_config"]["visual_abstractor"]
    assert (v["image_size"], v["patch_size"], v["hidden_size"], v["num_hidden_layers"]) == (96, 8, 128, 4)
    assert (a["num_learnable_queries"], a["grid_size"], a["hidden_size"], a["num_hidden_layers"]) == (16, 12, 128, 2)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (192, 4, model.tokenizer.vocab_size)
    weights = load_file(files / "ckpt" / "model.safetensors")
    assert not set(weights) & set(model.abstractor.owl2_table_keys())
    assert not [k for k in weights if "pos_embed" in k or k.endswith("inv_freq")]


# --- 6. the command line ---------------------------------------------------------------------------------------------

def test_cli_prints_the_library_greedy_answer_as_its_last_line(model, files):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([sys.executable, "owl.py", "--checkpoint", str(files / "ckpt"), "--image",
                        str(files / "img0.png"), "--prompt", QUESTION, *GREEDY], cwd=ROOT, env=env,
                       capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    expected = model.tokenizer.decode(greedy(model, f"USER: <|image|>{QUESTION} ASSISTANT:", [files / "img0.png"]))
    assert expected.strip()
    assert r.stdout.splitlines()[-1] == expected


def test_an_answer_is_given_without_whitespace_at_its_ends_as_the_owl2_scripts_strip_it(model, sp, files,
                                                                                        monkeypatch):
    """mPLUG-Owl2's README, cli.py and evaluation scripts hand out tokenizer.decode(...).strip(); v1's README the
    decoded text as is. An answer that starts and ends with whitespace pieces, through the CLI (streamed and --json)
    and the server's worker."""
    import serve
    pieces = [sp.piece_to_id(p) for p in ("<0x0A>", "\u2581", "<0x0C>")]
    assert all(i != sp.unk_id() for i in pieces)
    newline, space, form_feed = pieces
    answer = [newline, space] + sp.encode("Hi there") + [space, newline, form_feed]
    raw = model.tokenizer.decode(answer)
    assert raw != raw.strip() and raw.strip() == "Hi there"
    monkeypatch.setattr(Owl, "generate", lambda self, *a, **kw: (token for token in answer))  # a generator, as it is
    r = owl_main("--checkpoint", files / "ckpt", "--prompt", QUESTION, *GREEDY)
    assert r.returncode == 0 and r.stdout == "Hi there\n", (r.stdout, r.stderr)
    r = owl_main("--checkpoint", files / "ckpt", "--prompt", QUESTION, "--json", *GREEDY)
    assert json.loads(r.stdout)["answer"] == "Hi there"
    worker = serve.Worker.__new__(serve.Worker)  # its answer() alone, without the thread
    worker.model, worker.stopping = model, serve.threading.Event()
    job = serve.Job(ids=[1], pixels=None, sampling=Sampling(), stop=[], stream=True, include_usage=False)
    worker.answer(job)
    sent = []
    while not job.events.empty():
        sent.append(job.events.get()[1])
    assert "".join(sent) == "Hi there"
    assert owl.OWL.reply(raw) == raw  # v1 hands out the decoded text as it is


def test_cli_json_counts_the_owl2_image_positions(model, files):
    r = owl_main("--checkpoint", files / "ckpt", "--image", files / "img0.png", "--image", files / "img1.png",
                 "--prompt", QUESTION, "--json", *GREEDY)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    text = f"USER: <|image|><|image|>{QUESTION} ASSISTANT:"
    assert (result["image_tokens"], result["prompt_tokens"]) == (2 * SLOTS, len(model.prompt_ids(text)))
    assert result["answer"] == model.tokenizer.decode(greedy(model, text, [files / "img0.png", files / "img1.png"]))


def test_cli_questions_batch_answers_equal_one_at_a_time_greedy_answers_token_for_token(model, files, monkeypatch):
    questions = [{"image": ["img0.png"], "prompt": QUESTION}, {"prompt": "How many people are there?"},
                 {"image": ["img1.png", "img0.png"], "prompt": "Which one is bigger, the left or the right?"}]
    (files / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    batches, original = [], Owl.generate_batch

    def recording(self, prompts, sampling=None, **settings):
        batches.append(original(self, prompts, sampling, **settings))
        return batches[-1]

    monkeypatch.setattr(Owl, "generate_batch", recording)
    r = owl_main("--checkpoint", files / "ckpt", "--questions", files / "questions.jsonl", "--batch-size", 3, *GREEDY)
    assert r.returncode == 0, r.stderr
    assert len(batches) == 1 and len(batches[0]) == 3  # one batch of three
    alone = [greedy(model, f"USER: {'<|image|>' * len(q.get('image', []))}{q['prompt']} ASSISTANT:",
                    [files / p for p in q.get("image", [])]) for q in questions]
    assert batches[0] == alone
    answers = [json.loads(line) for line in r.stdout.splitlines()]
    assert [a["answer"] for a in answers] == [model.tokenizer.decode(ids) for ids in alone]
    assert [a["prompt"] for a in answers] == [q["prompt"] for q in questions]


def test_cli_chat_builds_the_owl2_multi_turn_template_and_reset_starts_over(model, sp, files, monkeypatch):
    calls, original = [], Owl.generate

    def recording(self, ids, pixels=None, sampling=None, **kw):
        calls.append({"ids": list(ids), "visual": kw.get("visual"), "pixels": pixels})
        return original(self, ids, pixels, sampling, **kw)

    monkeypatch.setattr(Owl, "generate", recording)
    q1, q2, q3 = QUESTION, "And the dog?", "How many people are there?"
    stdin = f"/image {files / 'img0.png'}\n{q1}\n{q2}\n/reset\n{q3}\n/quit\nnever asked\n"
    r = owl_main("--checkpoint", files / "ckpt", *GREEDY, stdin=stdin)
    assert r.returncode == 0, r.stderr
    assert len(calls) == 3
    # each answer on its own line; a random model's answer may hold a newline itself, so the text is cut by the
    # library's first and last answers rather than split at every newline
    a1 = model.tokenizer.decode(greedy(model, f"USER: <|image|>{q1} ASSISTANT:", [files / "img0.png"]))
    a3 = model.tokenizer.decode(greedy(model, f"USER: {q3} ASSISTANT:", []))
    assert r.stdout.startswith(a1 + "\n") and r.stdout.endswith("\n" + a3 + "\n")
    a2 = r.stdout[len(a1) + 1: -len(a3) - 2]

    def enc(text):
        return sp.encode(text)

    first = [1] + enc("USER: ") + [IMAGE_ID] * SLOTS + enc(f"{q1} ASSISTANT:")
    assert calls[0]["ids"] == first
    after_eos = sp.encode(f"USER: {q2} ASSISTANT:", out_type=str)
    assert after_eos[0] == "▁"  # legacy false (the saved tokenizer_config.json): dropped after </s>
    second = ([1] + enc("USER: ") + [IMAGE_ID] * SLOTS + enc(f"{q1} ASSISTANT: {a1.strip()}") + [2]
              + [sp.piece_to_id(p) for p in after_eos[1:]])
    assert calls[1]["ids"] == second
    with torch.no_grad():
        visual = model.encode_images(owl2_pixels(files / "img0.png")[None])
    for call in calls[:2]:  # the /image picture, in both turns (the same computation in this process: at most a
        assert call["pixels"] is None and call["visual"].shape == (1, SLOTS, 192)  # rounding or so apart)
        assert_close(call["visual"], visual, ops=8)
    assert calls[2]["ids"] == [1] + enc(f"USER: {q3} ASSISTANT:") and calls[2]["visual"] is None
    assert a2.strip()


@pytest.mark.parametrize("prompt,n_images,mentions", [
    (f"USER: <|image|><|image|>{QUESTION} ASSISTANT:", 1, ["2 <|image|> tags but 1 images"]),
    (f"USER: {QUESTION} ASSISTANT:", 1, ["0 <|image|> tags but 1 images"]),
    (f"USER: <image>{QUESTION} ASSISTANT:", 1, ["0 <|image|> tags"]),  # v1's tag is text to Owl2
    (f"USER: <|image|>{QUESTION} ASSISTANT:", 2, ["1 <|image|> tags but 2 images"]),
])
def test_cli_raw_prompt_with_a_wrong_image_tag_count_exits_2_in_one_sentence(files, prompt, n_images, mentions):
    images = [a for p in ["img0.png", "img1.png"][:n_images] for a in ("--image", files / p)]
    r = owl_main("--checkpoint", files / "ckpt", *images, "--raw-prompt", "--prompt", prompt, *GREEDY)
    assert_one_sentence_exit_2(r, *mentions)


def test_cli_raw_prompt_with_owl2_tags_answers_as_the_template_does(model, files):
    raw = owl_main("--checkpoint", files / "ckpt", "--image", files / "img1.png", "--raw-prompt", "--prompt",
                   f"USER: <|image|>{QUESTION} ASSISTANT:", *GREEDY)
    plain = owl_main("--checkpoint", files / "ckpt", "--image", files / "img1.png", "--prompt", QUESTION, *GREEDY)
    assert raw.returncode == plain.returncode == 0, raw.stderr + plain.stderr
    expected = model.tokenizer.decode(greedy(model, f"USER: <|image|>{QUESTION} ASSISTANT:", [files / "img1.png"]))
    assert raw.stdout == plain.stdout == expected + "\n"
    r = owl_main("--checkpoint", files / "ckpt", "--image", files / "img1.png", "--prompt", "<|image|> what?", *GREEDY)
    assert_one_sentence_exit_2(r, "<|image|>", "--raw-prompt")


@pytest.mark.parametrize("checkpoint,flags,expected", [
    ("ckpt", [], (512, 0.2, 50, 1.0)),  # Owl2's serve/cli.py: temperature 0.2, HF generate's top-k 50
    ("v1", [], (512, 1.0, 3, 1.0)),  # mPLUG-Owl's demo
    ("ckpt", ["--temperature", "0", "--top-k", "7", "--max-new-tokens", "5", "--top-p", "0.9"], (5, 0.0, 7, 0.9)),
    ("ckpt", ["--top-k", "4"], (512, 0.2, 4, 1.0)),  # an unset flag still takes the default
], ids=["owl2-defaults", "v1-defaults", "all-set", "one-set"])
def test_cli_sampling_defaults_apply_when_flags_are_unset(files, monkeypatch, checkpoint, flags, expected):
    seen = []

    def recording(self, ids, pixels=None, sampling=None, **kw):
        seen.append(sampling)
        return iter([])

    monkeypatch.setattr(Owl, "generate", recording)
    r = owl_main("--checkpoint", files / checkpoint, "--prompt", "Hi", *flags)
    assert r.returncode == 0, r.stderr
    assert len(seen) == 1 and isinstance(seen[0], Sampling)
    s = seen[0]
    assert (s.max_new_tokens, s.temperature, s.top_k, s.top_p) == expected


def test_cli_show_attention_draws_maps_on_the_tiny_grid(model, files, tmp_path, monkeypatch):
    drawn, original = [], attention.draw_attention

    def recording(pixels, transform, maps, labels):
        drawn.append(maps)
        return original(pixels, transform, maps, labels)

    monkeypatch.setattr(attention, "draw_attention", recording)
    r = owl_main("--checkpoint", files / "ckpt", "--image", files / "img0.png", "--prompt", QUESTION,
                 "--show-attention", tmp_path / "a.png", *GREEDY)
    assert r.returncode == 0, r.stderr
    assert len(drawn) == 1 and drawn[0].shape == (5, 12, 12)  # all queries + 4 single ones, 96 / 8 = 12
    with Image.open(tmp_path / "a.png") as f:
        assert f.format == "PNG"
