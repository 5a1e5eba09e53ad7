"""Stage 2 from an mPLUG-Owl2 checkpoint, as its scripts/finetune_lora.sh fine-tunes it: LoRA on every Linear of f_L
(both modality copies of k/v), f_K trained, f_V frozen; samples in mPLUG-Owl2's template with the loss on each
answer and its </s>; images padded to a square with the mean colour; the export an mPLUG-Owl2 folder. One tiny
Owl2 (preset owl2-tiny) is trained for two steps in this process, once for the module."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import lora  # noqa: E402
import train  # noqa: E402
from llama import Tokenizer  # noqa: E402
from owl import IMAGE_ID, OWL2, Owl, OwlConfig, SquareFirst, tokenize  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TURNS = [("What color is the shape?", "The shape is red."), ("What shape is it?", "It is a circle.")]


def tiny_owl2_folder(folder: Path, tokenizer_model: Path) -> Path:
    """An mPLUG-Owl2 checkpoint of preset owl2-tiny, written by save_pretrained. Its weights are jittered, lm_head
    scaled up and the unk/bos/eos rows zeroed, so that greedy answers are long and differ between models; its
    tokenizer_config.json says "legacy": false, as Llama-2's does."""
    torch.manual_seed(0)
    model = Owl(OwlConfig.preset("owl2-tiny"))
    model.init_weights()
    tok = Tokenizer(tokenizer_model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.language_model.lm_head.weight.mul_(30.0)
        model.language_model.lm_head.weight[[tok.unk_id, tok.bos_id, tok.eos_id]] = 0.0
    model.tokenizer, tok.legacy = tok, False
    model.save_pretrained(folder, tokenizer_model=tokenizer_model)
    return folder


def write_data(d: Path) -> tuple:
    """A LLaVA JSON (two non-square images; one tagged <image> as LLaVA writes it, one <|image|> as mPLUG-Owl2's
    data does) and an Alpaca JSON."""
    rng = np.random.default_rng(0)
    for name, (w, h) in (("wide.png", (60, 36)), ("tall.png", (30, 51))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / name)
    llava = [{"image": "wide.png", "conversations": [
                 {"from": "human", "value": "<image>\n" + TURNS[0][0]}, {"from": "gpt", "value": TURNS[0][1]},
                 {"from": "human", "value": TURNS[1][0]}, {"from": "gpt", "value": TURNS[1][1]}]},
             {"image": "tall.png", "conversations": [
                 {"from": "human", "value": "<|image|>Describe the image."},
                 {"from": "gpt", "value": "Two dogs play with a ball in the green park."}]}]
    alpaca = [{"instruction": "How many people are there?", "input": "",
               "output": "Three people walk along the river."}]
    (d / "llava.json").write_text(json.dumps(llava))
    (d / "alpaca.json").write_text(json.dumps(alpaca))
    return d / "llava.json", d / "alpaca.json"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer_model):
    """train.py --stage 2 --init <tiny Owl2>, 2 steps on the CPU (Owl2's defaults otherwise), recording the model as built (LoRA applied, nothing
    trained yet), the trained model before export, the merged model export leaves, and the image transform."""
    d = tmp_path_factory.mktemp("owl2_train")
    init = tiny_owl2_folder(d / "init", tokenizer_model)
    llava, alpaca = write_data(d)
    rec = {}
    build, export, cache = train.build_model, train.export, data.ImageCache

    def recording_build(*args, **kwargs):
        model = build(*args, **kwargs)
        rec["legacy"] = args[2].legacy  # the tokenizer the samples are made with
        rec["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        rec["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        rec["lora"] = {n: (m.r, m.alpha) for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}
        return model

    def recording_export(model, *args):
        rec["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        export(model, *args)
        rec["merged"] = model  # export merged the LoRA into this very model

    class RecordingCache(cache):
        def __init__(self, transform, *args):
            super().__init__(transform, *args)
            rec["transform"] = transform

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "build_model", recording_build)
        mp.setattr(train, "export", recording_export)
        mp.setattr(data, "ImageCache", RecordingCache)
        train.main(["--stage", "2", "--init", str(init), "--data", str(llava), "--data", f"{alpaca}:0.5",
                    "--out-dir", str(d / "runs"), "--steps", "2", "--batch-size", "4", "--seq-len", "128",
                    "--weight-decay", "0", "--lora-dropout", "0", "--device", "cpu"])
    rec.update(init=init, out=d / "runs" / "stage2", images=d)
    return rec


def test_stage2_steps_train_lora_on_all_seven_targets_and_fk_and_nothing_else(run):
    """Two steps, weight decay off: in the first, every LoRA A has a zero gradient (B starts at zero), so only a
    second shows that A trains; a parameter changes only where its own gradient moved it."""
    lm = OwlConfig.preset("owl2-tiny").text
    copies = {"k_proj": (".multiway.0", ".multiway.1"), "v_proj": (".multiway.0", ".multiway.1")}  # text, visual
    block = {t: "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn" for t in TARGETS}
    lora_params = {f"language_model.model.layers.{i}.{block[t]}.{t}{c}.lora_{ab}"
                   for i in range(lm.num_layers) for t in TARGETS for c in copies.get(t, ("",)) for ab in "AB"}
    fk = {n for n in run["before"] if n.startswith("abstractor.")}
    assert len(lora_params) == lm.num_layers * 9 * 2 and fk
    assert run["trainable"] == lora_params | fk
    # the defaults of an Owl2 start: finetune_lora.sh's r 128, alpha 256, on each of the 9 Linears of every layer
    assert len(run["lora"]) == lm.num_layers * 9 and set(run["lora"].values()) == {(128, 256.0)}
    changed = {n for n, before in run["before"].items() if not torch.equal(before, run["after"][n])}
    assert changed == run["trainable"]  # every LoRA A and B, every parameter of f_K; so none of f_V, f_L, embeddings
    assert not any(n.startswith("vision_model.") or n.endswith(".weight") and n.startswith("language_model.")
                   for n in changed)
    state = torch.load(run["out"] / "train_state.pt", weights_only=True)
    assert set(state["trainable"]) == run["trainable"]
    assert state["signature"]["lora_r"] == 128 and state["signature"]["abstractor_lr_scale"] == 0.2


def test_owl2_labels_cover_each_answer_and_its_eos_and_nothing_of_the_prompts_or_images(tokenizer_model, tmp_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    tok = Tokenizer(tokenizer_model)
    tpi = 17
    conv = data.Conversation(["a.png"], [("<image>\n" + TURNS[0][0], TURNS[0][1]), TURNS[1]])
    s = data.build_sample(tok, data.conversation_segments(conv, OWL2), conv.images, tpi, 512, template=OWL2)
    # "USER: <|image|>Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>", chunk by chunk as the official
    # tokenizer_image_token and HF's slow tokenizer (legacy) cut it: each piece of text with its leading space
    prompt1 = [1] + sp.encode("USER: ") + [IMAGE_ID] * tpi + sp.encode("What color is the shape? ASSISTANT:")
    answer1 = sp.encode("The shape is red.") + [2]
    prompt2 = sp.encode("USER: What shape is it? ASSISTANT:")
    answer2 = sp.encode("It is a circle.") + [2]
    assert s.ids == prompt1 + answer1 + prompt2 + answer2
    assert s.labels == [-100] * len(prompt1) + answer1 + [-100] * len(prompt2) + answer2
    assert s.labels.count(2) == 2 and all(label == -100 for i, label in zip(s.ids, s.labels) if i == IMAGE_ID)
    # the same ids as the whole conversation rendered in the template and tokenised as inference does
    text = OWL2.prompt(TURNS[0][0], 1) + OWL2.answer(TURNS[0][1]) + OWL2.turn(TURNS[1][0]) + OWL2.answer(TURNS[1][1])
    assert text == "USER: <|image|>What color is the shape? ASSISTANT: The shape is red.</s>USER: What shape is it? " \
                   "ASSISTANT: It is a circle.</s>"
    assert s.ids == [1] + tokenize(tok, text, tpi, OWL2)
    # with a non-legacy tokenizer (Llama-2's tokenizer_config.json) the second prompt follows </s> without a space
    tok.legacy = False
    s2 = data.build_sample(tok, data.conversation_segments(conv, OWL2), conv.images, tpi, 512, template=OWL2)
    assert s2.ids == [1] + tokenize(tok, text, tpi, OWL2) and s2.ids != s.ids
    assert [t for t in s2.labels if t != -100] == answer1 + answer2
    # a LLaVA file tagged with <image> or with mPLUG-Owl2's <|image|> gives these samples
    (tmp_path / "a.png").write_bytes(b"")  # only its presence is checked when samples are built
    for tag in ("<image>\n", "<|image|>"):
        (tmp_path / "l.json").write_text(json.dumps([{"image": "a.png", "conversations": [
            {"from": "human", "value": tag + TURNS[0][0]}, {"from": "gpt", "value": TURNS[0][1]},
            {"from": "human", "value": TURNS[1][0]}, {"from": "gpt", "value": TURNS[1][1]}]}]))
        read = data.load_training_samples(tmp_path / "l.json", 2, tok, tpi, 512, template=OWL2)
        assert [(r.ids, r.labels) for r in read] == [(s2.ids, s2.labels)]
    # a text-only sample (Alpaca) is one chunk of prompt, then the answer
    alone = data.build_sample(tok, data.conversation_segments(data.Conversation([], [TURNS[1]]), OWL2), [], tpi, 512,
                              template=OWL2)
    assert alone.ids == [1] + sp.encode("USER: What shape is it? ASSISTANT:") + answer2


def test_training_images_are_padded_to_a_square_with_the_mean_colour(run):
    t = run["transform"]  # what stage 2 of the Owl2 run preprocessed its images with
    model_t = Owl.from_pretrained(run["init"]).image_transform
    assert isinstance(t, data.PadToSquare) and (t.image_size, t.mean, t.std) == (96, model_t.mean, model_t.std)
    mean, std = np.array(t.mean, np.float32), np.array(t.std, np.float32)
    fill = [int(m * 255) for m in t.mean]
    assert fill == [122, 116, 104]  # CLIP's mean colour, as expand2square gets it from the image processor
    for name in ("wide.png", "tall.png"):
        img = Image.open(run["images"] / name)
        a = np.asarray(img.convert("RGB"))
        h, w = a.shape[:2]
        side = max(h, w)
        canvas = np.empty((side, side, 3), np.uint8)
        canvas[:] = fill
        canvas[(side - h) // 2: (side - h) // 2 + h, (side - w) // 2: (side - w) // 2 + w] = a
        x = np.asarray(Image.fromarray(canvas).resize((96, 96), Image.BICUBIC), np.float32) / 255.0
        expected = torch.from_numpy(((x - mean) / std).transpose(2, 0, 1).copy())
        got = t(img)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        # the border is the mean colour, and this is no stretch (inference's SquareFirst)
        torch.testing.assert_close(got[:, 0, 0], torch.from_numpy((np.array(fill, np.float32) / 255 - mean) / std),
                                   rtol=0, atol=1e-6)
        assert (got - SquareFirst(96, t.mean, t.std)(img)).abs().max() > 0.5


def test_the_export_is_an_owl2_folder_whose_greedy_answer_is_the_merged_models(run):
    exported, merged = Owl.from_pretrained(run["out"]), run["merged"]
    assert exported.cfg.version == 2
    assert json.loads((run["out"] / "config.json").read_text())["model_type"] == "mplug_owl2"
    assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules())
    # the LoRA went into both modality copies of k and v and every other target; f_V and the rest of f_L untouched
    start, end = load_file(run["init"] / "model.safetensors"), load_file(run["out"] / "model.safetensors")
    assert start.keys() == end.keys()
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert {k for k in changed if not k.startswith("model.visual_abstractor.")} == {
        k for k in start if k.startswith("model.layers.") and any(f".{t}." in k for t in TARGETS)}
    assert sum(".multiway." in k for k in changed) == 4 * 4  # (k, v) x (text, visual) x 4 layers
    pixels = exported.image_transform(Image.open(run["images"] / "wide.png")).unsqueeze(0)
    ids = exported.prompt_ids(OWL2.prompt("What is in the picture?", 1))
    answers = [list(m.generate(ids, pixels, max_new_tokens=12)) for m in (exported, merged)]
    assert len(answers[0]) == 12 and answers[0] == answers[1]
    # and the next-token logits along prompt and answer, which the 2 steps moved away from the start's
    full = torch.tensor([ids + answers[0]])
    with torch.no_grad():
        logits = [m(full, pixels) for m in (exported, merged, Owl.from_pretrained(run["init"]))]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-4)
    assert (logits[0] - logits[2]).abs().max() > 100 * 1e-4
    assert (run["out"] / "lora.safetensors").exists()
    # the checkpoint's tokenizer reading (text after </s>) was the training samples' and is the export's
    assert run["legacy"] is False and exported.tokenizer.legacy is False
