"""Training: labels built segment by segment, the three stage-2 formats, DDP equivalence, resume, what each stage
trains. Runs train.py for real (as a subprocess, as a user would) on a tiny synthetic data set."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
from llama import Tokenizer  # noqa: E402
from owl import IMAGE_ID, Owl, render_prompt, tokenize  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
SMALL = ["--batch-size", "8", "--seq-len", "160", "--eval-samples", "10"]


def run(*args, check=True, **kw):
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    data.synth(str(d), seed=3, n_train=120, n_owl=60, n_llava=30, n_alpaca=30, n_heldout=10)
    return d


@pytest.fixture(scope="module")
def stage0(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    run("--stage", "0", "--data-dir", str(synth), "--out-dir", str(out), "--steps", "20", *SMALL)
    return out


@pytest.fixture(scope="module")
def tok(synth):
    return Tokenizer(synth / "tokenizer.model")


def test_labels_cover_answers_and_eos_only(tok):
    conv = data.Conversation(["a.png"], [("<image>\nWhat color is the shape?", "The shape is red."),
                                         ("What shape is it?", "It is a circle.")])
    s = data.build_sample(tok, data.conversation_segments(conv), conv.images, 17, 512)
    answers = [tok.encode("The shape is red.") + [tok.eos_id], tok.encode("It is a circle.") + [tok.eos_id]]
    labelled = [t for t in s.labels if t != -100]
    assert labelled == answers[0] + answers[1]
    assert s.ids[0] == tok.bos_id and s.ids.count(tok.bos_id) == 1
    assert s.ids.count(IMAGE_ID) == 17 and all(l == -100 for i, l in zip(s.ids, s.labels) if i == IMAGE_ID)
    # labels are the ids themselves where they are set: the loss shifts them by one
    assert all(l == i for i, l in zip(s.ids, s.labels) if l != -100)
    # the prompt part is exactly what inference feeds the model for the first turn
    first = [tok.bos_id] + tokenize(tok, render_prompt("What color is the shape?", 1), 17)
    assert s.ids[: len(first)] == first


def test_truncation_drops_a_sample_left_without_answer(tok):
    conv = data.Conversation(["a.png"], [("<image>\nDescribe the image.", "2 shapes: a red circle at the left.")])
    segs = data.conversation_segments(conv)
    full = data.build_sample(tok, segs, conv.images, 17, 512)
    prompt_len = full.labels.index(next(l for l in full.labels if l != -100))
    assert data.build_sample(tok, segs, conv.images, 17, prompt_len) is None  # no answer token: dropped, not NaN
    cut = data.build_sample(tok, segs, conv.images, 17, prompt_len + 2)
    assert len(cut.ids) == prompt_len + 2 and sum(l != -100 for l in cut.labels) == 2
    # a cut inside an image's slots removes the whole image instead of leaving part of it
    half = data.build_sample(tok, [("<image>", False), ("red", True)], ["a.png"], 17, 10)
    assert half is None or IMAGE_ID not in half.ids


def test_three_stage2_formats_give_the_same_samples(tmp_path, tok):
    turns = [("What is 2 plus 1?", "2 plus 1 is 3.")]
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": data.render_owl_text(turns), "task_type": "x"}) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": turns[0][0]},
                                                                    {"from": "gpt", "value": turns[0][1]}]}]))
    (tmp_path / "c.json").write_text(json.dumps([{"instruction": turns[0][0], "input": "", "output": turns[0][1]}]))
    got = [data.load_training_samples(tmp_path / n, 2, tok, 17, 256) for n in ("a.jsonl", "b.json", "c.json")]
    assert len(got[0]) == 1 and got[0] == got[1] == got[2]


def test_a_few_steps_lower_the_loss(stage0):
    losses = [json.loads(l)["loss"] for l in (stage0 / "stage0" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in l]
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_each_stage_changes_exactly_what_it_trains(synth, stage0):
    run("--stage", "1", "--data-dir", str(synth), "--out-dir", str(stage0), "--steps", "3", *SMALL)
    run("--stage", "2", "--data-dir", str(synth), "--out-dir", str(stage0), "--steps", "3", *SMALL)
    s0 = load_file(stage0 / "stage0" / "model.safetensors")
    s1 = load_file(stage0 / "stage1" / "model.safetensors")
    s2 = load_file(stage0 / "stage2" / "model.safetensors")
    # stage 1: f_L frozen, f_V and f_K (queries, visual_fc, vit_eos included) trained
    assert all(torch.equal(s1["language_model." + k], v) for k, v in s0.items())
    trained1 = set(torch.load(stage0 / "stage1" / "train_state.pt", weights_only=True)["trainable"])
    assert trained1 == {n for n, _ in Owl.from_pretrained(stage0 / "stage1").named_parameters()
                        if n.startswith(("vision_model.", "abstractor."))}
    assert {"abstractor.query_tokens", "abstractor.vit_eos", "abstractor.visual_fc.weight"} <= trained1
    trained2 = set(torch.load(stage0 / "stage2" / "train_state.pt", weights_only=True)["trainable"])
    assert trained2 and all(".lora_" in n or n.startswith("abstractor.") for n in trained2)
    # stage 2: f_V frozen; f_K trained; LoRA merged into q_proj and v_proj only
    changed = {k for k in s1 if not torch.equal(s1[k], s2[k])}
    assert not any(k.startswith("vision_model.") for k in changed)
    assert any(k.startswith("abstractor.") or k == "query_tokens" for k in changed)
    llm_changed = {k for k in changed if k.startswith("language_model.")}
    assert llm_changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in llm_changed)
    # and the exported folder is an official checkpoint that owl.py loads and answers with
    model = Owl.from_pretrained(stage0 / "stage2")
    assert model.cfg.tokens_per_image == 17
    img = next((synth / "images").glob("h_*.png"))
    p = subprocess.run([sys.executable, str(ROOT / "owl.py"), "--checkpoint", str(stage0 / "stage2"), "--image",
                        str(img), "--prompt", "What shape is it?", "--max-new-tokens", "8", "--temperature", "0"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    # a 3-step model may well answer with EOS at once: what matters is that the exported folder runs end to end
    assert p.returncode == 0 and p.stdout.endswith("\n") and "Traceback" not in p.stderr, p.stderr
    assert (stage0 / "stage2" / "lora.safetensors").exists()


def test_stage1_trains_vision_and_abstractor(synth, stage0, tmp_path):
    out = tmp_path / "r"
    (out / "stage0").mkdir(parents=True)
    for f in (stage0 / "stage0").iterdir():
        (out / "stage0" / f.name).write_bytes(f.read_bytes())
    run("--stage", "1", "--data-dir", str(synth), "--out-dir", str(out), "--steps", "2", "--seed", "5", *SMALL)
    a = load_file(out / "stage1" / "model.safetensors")
    run("--stage", "1", "--data-dir", str(synth), "--out-dir", str(tmp_path / "r2"), "--llm-init",
        str(stage0 / "stage0"), "--steps", "2", "--seed", "6", *SMALL)
    b = load_file(tmp_path / "r2" / "stage1" / "model.safetensors")
    # different seeds: different random f_V / f_K starts and updates, the same frozen f_L
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("vision_model."))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("language_model."))


def test_two_ddp_ranks_match_one_rank(synth, stage0, tmp_path):
    # no dropout anywhere, so both runs draw no random numbers and must agree to rounding
    common = ["--stage", "2", "--data-dir", str(synth), "--steps", "2", "--lora-dropout", "0", "--freeze-abstractor",
              *SMALL]
    init = ["--init", str(stage0 / "stage1")]
    run(*common, *init, "--out-dir", str(tmp_path / "one"))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                        str(ROOT / "train.py"), *common, *init, "--out-dir", str(tmp_path / "two")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    a = load_file(tmp_path / "one" / "stage2" / "model.safetensors")
    b = load_file(tmp_path / "two" / "stage2" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-6, worst
    assert any(not torch.equal(a[k], load_file(stage0 / "stage1" / "model.safetensors")[k]) for k in a)


def test_resume_reproduces_the_uninterrupted_run(synth, stage0, tmp_path):
    common = ["--stage", "2", "--data-dir", str(synth), "--init", str(stage0 / "stage1"), "--steps", "12", *SMALL]
    run(*common, "--out-dir", str(tmp_path / "straight"))
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, "--out-dir", str(out)], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "stage2" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    proc.wait(timeout=120)
    assert proc.returncode == 130, "the run finished before it could be interrupted"
    state = torch.load(out / "stage2" / "train_state.pt", weights_only=True)
    assert 3 <= state["step"] < 12
    run(*common, "--out-dir", str(out), "--resume")
    a = load_file(tmp_path / "straight" / "stage2" / "model.safetensors")
    b = load_file(out / "stage2" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mismatched_resume_is_refused(synth, stage0, tmp_path):
    common = ["--stage", "2", "--data-dir", str(synth), "--init", str(stage0 / "stage1"), *SMALL]
    run(*common, "--steps", "1", "--out-dir", str(tmp_path))
    p = run(*common, "--steps", "1", "--lora-r", "4", "--out-dir", str(tmp_path), "--resume", check=False)
    assert p.returncode != 0 and "lora_r" in p.stderr and "Traceback" not in p.stderr


def test_missing_and_corrupt_images_skip_their_samples(tmp_path, synth, tok):
    import random as _random
    import train
    from vit import ImageTransform

    good = sorted((synth / "images").glob("s_*.png"))[:2]
    (tmp_path / "corrupt.png").write_bytes(good[0].read_bytes()[:60])  # a truncated PNG
    lines = [{"image": str(good[0]), "caption": "a red circle."}, {"image": "nowhere.png", "caption": "a blue square."},
             {"image": str(tmp_path / "corrupt.png"), "caption": "a green triangle."},
             {"image": str(good[1]), "caption": "a yellow square."}, "not json"]
    (tmp_path / "c.jsonl").write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    with pytest.warns(UserWarning) as caught:
        samples = data.load_training_samples(tmp_path / "c.jsonl", 1, tok, 17, 64)
    text = " ".join(str(w.message) for w in caught)
    assert len(samples) == 3 and "1 malformed" in text and "1 samples whose image file is missing" in text
    cache = train.ImageCache(ImageTransform(32), augment=False)
    ids, labels, pixels = train.collate(samples, cache, _random.Random(0), "cpu")
    assert ids.shape[0] == 2 and pixels.shape == (2, 3, 32, 32) and cache.failed == 1
