"""Training: labels built segment by segment, the three stage-2 formats, DDP equivalence, resume, what each stage
trains, and training that loses nothing (NaN steps skipped, SIGTERM / Ctrl-C / SIGKILL survived, bad input refused
in one sentence). Runs train.py for real (as a subprocess, as a user would) on a tiny synthetic data set; the checks
that patch the loss or read stderr call train.main in this process."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import plot  # noqa: E402
import resume  # noqa: E402
import synthetic  # noqa: E402
import train  # noqa: E402
from conftest import (SMALL, TIMEOUT, TRAIN_ENV as ENV, run_script, stage1_args, stage2_args,  # noqa: E402
                      subprocess_run, write_huge_png)
from llama import LlamaConfig, Tokenizer  # noqa: E402
from owl import IMAGE_ID, Owl, UserError, render_prompt, tokenize  # noqa: E402


def run(*args, check=True):
    return run_script("train.py", *args, check=check)


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


def test_stage1_captions_are_answers_to_the_caption_prompt_or_follow_the_image(tmp_path, tok):
    (tmp_path / "a.png").write_bytes(b"")  # only its presence is checked when samples are built
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "a.png", "caption": "A red circle at the left."}) + "\n")
    caption = tok.encode("A red circle at the left.") + [tok.eos_id]
    plain = data.load_training_samples(tmp_path / "c.jsonl", 1, tok, 17, 256)[0]
    assert plain.ids == [tok.bos_id] + [IMAGE_ID] * 17 + caption and plain.images == [str(tmp_path / "a.png")]
    chat = data.load_training_samples(tmp_path / "c.jsonl", 1, tok, 17, 256, "Describe the image.")[0]
    prompt = ([tok.bos_id] + tok.encode("Human: ") + [IMAGE_ID] * 17
              + tok.encode("\nHuman: Describe the image.\nAI: "))
    assert chat.ids == prompt + caption
    assert chat.labels == [-100] * len(prompt) + caption  # the loss falls on the caption and its EOS only


def test_three_stage2_formats_give_the_same_samples(tmp_path, tok):
    turns = [("What is 2 plus 1?", "2 plus 1 is 3.")]
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": synthetic.render_owl_text(turns), "task_type": "x"}) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": turns[0][0]},
                                                                    {"from": "gpt", "value": turns[0][1]}]}]))
    (tmp_path / "c.json").write_text(json.dumps([{"instruction": turns[0][0], "input": "", "output": turns[0][1]}]))
    got = [data.load_training_samples(tmp_path / n, 2, tok, 17, 256) for n in ("a.jsonl", "b.json", "c.json")]
    assert len(got[0]) == 1 and got[0] == got[1] == got[2]


def test_the_loss_runs_the_lm_head_on_answer_positions_only_and_equals_the_full_cross_entropy(tokenizer_model,
                                                                                               monkeypatch):
    """summed_loss gives logits only to the positions that predict an answer token; loss and gradients equal the
    textbook next-token cross-entropy over the full (B, T, vocab) logits, computed in float64."""
    import copy

    from conftest import assert_close, tiny_owl

    model = tiny_owl(tokenizer_model).train()
    V = model.cfg.text.vocab_size
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :7], labels[1, :3], labels[1, 9:] = -100, -100, -100  # prompts, and a padded tail on row 1
    rows, linear = [], torch.nn.functional.linear
    head = model.language_model.lm_head.weight
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda x, w, b=None: (w is head and rows.append(x.shape[0])) or linear(x, w, b))
    loss = train.summed_loss(model, ids, labels, None)
    monkeypatch.undo()
    assert rows == [int((labels[:, 1:] != -100).sum())] == [5 + 6]
    names = ["language_model.lm_head.weight", "language_model.model.layers.0.self_attn.q_proj.weight"]
    grads = torch.autograd.grad(loss, [dict(model.named_parameters())[n] for n in names])

    exact = copy.deepcopy(model).double()
    logits = exact(ids)  # (B, T, vocab): every position
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                                            ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(ref, [dict(exact.named_parameters())[n] for n in names])
    # float32 against float64: a gradient element sums about 2300 products (96 features over 24 positions), whose
    # roundings add up to about sqrt(2300) = 48 of float32's; measured 8 and 16, and unshifted labels are off by 1e6
    assert_close(loss.double(), ref.detach(), ops=64, dtype=torch.float32)
    for g, r in zip(grads, ref_grads):
        assert_close(g.double(), r, ops=64, dtype=torch.float32)


def test_bf16_on_cpu_runs_the_matmuls_in_bf16_and_attention_in_fp32():
    """--dtype bfloat16 on CPU: autocast's Linear gives bf16, but attention runs in fp32 (PyTorch's CPU attention is
    slower in bf16), so its result matches softmax(q k^T / sqrt(d)) v written out in float64 to fp32 rounding."""
    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g).bfloat16() for _ in range(3))
    linear = torch.nn.Linear(16, 16)
    with train.mixed_precision(torch.bfloat16, "cpu"):
        assert linear(q.float()).dtype == torch.bfloat16
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    scores = q.double() @ k.double().transpose(-1, -2) / 4
    scores = scores.masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf"))
    ref = scores.softmax(-1) @ v.double()
    from conftest import assert_close
    assert y.dtype == torch.float32
    assert_close(y.double(), ref, ops=64, dtype=torch.float32)  # bf16 attention is off by ~1e-2 of the largest
    with train.mixed_precision(torch.float32, "cpu"):  # fp32: nothing changes
        assert linear(q.float()).dtype == torch.float32
    assert F.scaled_dot_product_attention(q, k, v).dtype == torch.bfloat16  # the mode ends with its context


def test_dtype_is_bf16_on_cuda_fp32_on_cpu_and_auto_follows_the_cpu(monkeypatch, capsys):
    assert train.train_dtype("", "cpu") == torch.float32 and train.train_dtype("", "cuda:0") == torch.bfloat16
    assert train.train_dtype("float32", "cuda") == torch.float32 and train.train_dtype("bfloat16", "cpu") == torch.bfloat16
    for has, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(train, "cpu_has_bf16", lambda: has)
        assert train.train_dtype("auto", "cpu") == want and train.train_dtype("auto", "cuda") == torch.bfloat16
    with pytest.raises(SystemExit) as e:
        train.train_dtype("fp16", "cpu")
    assert e.value.code == 2 and "--dtype 'fp16'" in capsys.readouterr().err


def test_each_stage_changes_exactly_what_it_trains(synth, stage1):
    stage0 = stage1  # the folder holding llm/ (the f_L stage 1 starts from) and stage1/
    run(*stage2_args(synth, stage0 / "stage1"), "--out-dir", stage0, "--steps", "3", *SMALL)
    s0 = load_file(stage0 / "llm" / "model.safetensors")
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
    p = subprocess_run([sys.executable, str(ROOT / "owl.py"), "--checkpoint", str(stage0 / "stage2"), "--image",
                        str(img), "--prompt", "What shape is it?", "--max-new-tokens", "8", "--temperature", "0"])
    # a 3-step model may well answer with EOS at once: what matters is that the exported folder runs end to end
    assert p.returncode == 0 and p.stdout.endswith("\n") and "Traceback" not in p.stderr, p.stderr
    assert (stage0 / "stage2" / "lora.safetensors").exists()


def test_stage1_trains_vision_and_abstractor(synth, pretrained, tmp_path):
    run(*stage1_args(synth, pretrained), "--out-dir", tmp_path / "r", "--steps", "2", "--seed", "5", *SMALL)
    a = load_file(tmp_path / "r" / "stage1" / "model.safetensors")
    run(*stage1_args(synth, pretrained), "--out-dir", tmp_path / "r2", "--steps", "2", "--seed", "6", *SMALL)
    b = load_file(tmp_path / "r2" / "stage1" / "model.safetensors")
    # different seeds: different f_K starts, data orders and so f_V updates; the same frozen f_L
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("vision_model."))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("language_model."))


def test_stage1_starts_from_the_clip_folder_and_the_llama_folder(synth, pretrained, tmp_path):
    """--vit-init and --llm-init: stage 1's f_V is the CLIP folder's (here the tiny stand-in) and its f_L the LLaMA
    folder's, tensor for tensor (a learning rate of 1e-30 leaves them as loaded)."""
    from vit import VisionTransformer
    p = run(*stage1_args(synth, pretrained), "--out-dir", tmp_path, "--steps", "1", "--lr", "1e-30", *SMALL)
    assert f"f_V from {pretrained / 'vit'}" in p.stderr
    owl = load_file(tmp_path / "stage1" / "model.safetensors")
    vit = VisionTransformer.from_clip(pretrained / "vit").state_dict()
    assert vit and all(torch.allclose(owl["vision_model." + k], v) for k, v in vit.items())
    llm = load_file(pretrained / "llm" / "model.safetensors")
    assert all(torch.equal(owl["language_model." + k], v) for k, v in llm.items())


# train.py on one rank or under torchrun, in a wrapper that records on each rank every training forward pass (with
# images or not; synchronised by DDP or not) and the weights at the end (LoRA merged, as rank 0 exports them).
RECORDER = """
import os, sys
import torch
import lora
import train

calls, models = [], []
real_loss, real_fit = train.summed_loss, train.fit


def summed_loss(model, ids, labels, pixels):
    if model.training:
        calls.append((pixels is not None, getattr(model, "require_backward_grad_sync", True)))
    return real_loss(model, ids, labels, pixels)


def fit(model, *args, **kwargs):
    models.append(model)
    return real_fit(model, *args, **kwargs)


train.summed_loss, train.fit = summed_loss, fit
__import__(sys.argv[2]).main(sys.argv[3:])  # train or tiny
model = models[-1].float()
if any(isinstance(m, lora.LoRALinear) for m in model.modules()):  # ranks other than 0 export nothing
    lora.remove_lora(model)
torch.save({"calls": calls, "weights": model.state_dict()}, os.path.join(sys.argv[1], f"rank{os.environ.get('RANK', 0)}.pt"))
"""


def recorded(ranks: int, args: list, out: Path, script: str = "train") -> tuple:
    """SCRIPT.py ARGS --out-dir OUT on `ranks` Gloo ranks (torchrun --standalone: a free port), or alone: its stderr and
    each rank's record ({"calls": [(with images, synchronised)] per training forward pass, "weights": ...})."""
    out.mkdir(parents=True)
    (out / "recorder.py").write_text(RECORDER)
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    p = subprocess_run([sys.executable, *launch, str(out / "recorder.py"), str(out), script, *map(str, args), "--out-dir",
                        str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stderr, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(ranks)]


def logged(out: Path, stage) -> list:
    """The training steps of metrics.jsonl in OUT/stageN (stage N) or OUT/NAME (stage "llm", tiny.py's f_L)."""
    folder = out / (f"stage{stage}" if isinstance(stage, int) else stage)
    return [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def assert_two_ranks_match_one(stage, args: list, tmp_path, script: str = "train") -> list:
    """The same run alone and on two DDP ranks, gradient clipping off (so a gradient off by a factor is not clipped
    back): the same loss and gradient norm at every step, the same weights on both ranks, and the same weights as
    the run alone. Returns each rank's forward passes. Both runs sum the same samples' gradients in another order,
    which moves a float32 sum by a few roundings: far below the 4 decimals the log keeps."""
    args = [*args, "--grad-clip", "0"] if script == "train" else args
    _, [one] = recorded(1, args, tmp_path / "one", script)
    err, two = recorded(2, args, tmp_path / "two", script)
    # PyTorch's notes on DDP misuse: a gradient laid out unlike its parameter, a needless search for unused ones
    assert "Grad strides do not match" not in err and "find_unused_parameters" not in err, err[-3000:]
    a, b = logged(tmp_path / "one", stage), logged(tmp_path / "two", stage)
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 2
    for x, y in zip(a, b):  # logged to 4 decimals: one rounding step apart at most
        assert abs(x["loss"] - y["loss"]) <= 1.5e-4 and abs(x["grad_norm"] - y["grad_norm"]) <= 1.5e-4, (x, y)
    assert all(torch.equal(t, two[1]["weights"][n]) for n, t in two[0]["weights"].items())
    assert one["weights"].keys() == two[0]["weights"].keys()
    for n, t in one["weights"].items():
        # AdamW divides each gradient by its running RMS: an element whose gradient is within rounding of zero can
        # move by up to the lr (1e-3) either way, so the weights agree to the lr times the steps, not to rounding
        assert (t - two[0]["weights"][n]).abs().max() <= 1e-3 * len(a), n
    return [r["calls"] for r in two]


@pytest.fixture(scope="module")
def no_dropout(stage1, tmp_path_factory):
    """stage1's checkpoint with f_K's attention dropout off, so that runs of it draw no random numbers when LoRA's
    dropout is off too: one rank and two then see the same model at every step."""
    out = tmp_path_factory.mktemp("nodrop")
    for f in (stage1 / "stage1").iterdir():
        if f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((out / "config.json").read_text())
    cfg["visual_abstractor_config"]["attention_probs_dropout_prob"] = 0.0
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_two_ddp_ranks_match_one_rank_in_stage2_with_fk_trained_and_text_only_micro_batches(synth, no_dropout,
                                                                                               tmp_path):
    """Stage 2 as the paper trains it (f_K too) on a mix with text-only samples, 4 micro-batches a rank a step
    (accumulated under no_sync): micro-batches without images, where f_K sits out, come both synchronised and not."""
    calls = assert_two_ranks_match_one(2, [
        "--stage", "2", "--init", no_dropout, "--steps", "3", "--batch-size", "8",
        "--micro-batch", "1", "--seq-len", "160", "--lora-dropout", "0", "--data", synth / "stage2_owl.jsonl",
        "--data", f"{synth / 'stage2_alpaca.json'}:2"], tmp_path)
    seen = {c for rank in calls for c in rank}
    assert seen == {(True, True), (True, False), (False, True), (False, False)}, seen


def test_two_ddp_ranks_match_one_rank_in_stage1(synth, no_dropout, tmp_path):
    """Stage 1 trains f_V and f_K: with one image a micro-batch, the gradients of their (1, 1, D) class token and
    vit_eos come as slices of larger ones, laid out unlike the parameters."""
    calls = assert_two_ranks_match_one(1, ["--stage", "1", "--init", no_dropout, "--steps", "3", "--batch-size", "4",
                                           "--micro-batch", "1", "--seq-len", "160", "--data", synth / "stage1.jsonl"],
                                       tmp_path)
    assert calls[0] == calls[1] == [(True, False), (True, True)] * 3  # 2 micro-batches a step, the second synchronised


def test_two_ddp_ranks_match_one_rank_in_the_tiny_llm_pretraining(synth, tmp_path):
    """tiny.py's f_L through train.fit embeds its shape vectors outside DDP's forward (tiny.shape_embeddings): the
    embedding's gradient must still be all-reduced, drill and mix steps alike."""
    assert_two_ranks_match_one("llm", ["pretrain", "--data-dir", synth, "--steps", "2", "--drill-steps", "1",
                                       "--vision-steps", "0", "--batch-size", "8", "--micro-batch", "2", "--seq-len",
                                       "160", "--eval-samples", "2"], tmp_path, script="tiny")


def test_a_rank_whose_micro_batches_hold_only_unreadable_images_still_trains_in_step(synth, no_dropout, tmp_path):
    """Every image of rank 1's share of step 1 corrupt (its last micro-batch included): the run still ends, as rank 1
    takes part in every synchronised backward, the bad images are counted over both ranks, and both ranks hold the
    same weights."""
    lines = [json.loads(l) for l in (synth / "stage1.jsonl").read_text().splitlines()][:12]
    for i, line in enumerate(lines):  # an image file of its own for each caption
        (tmp_path / f"{i}.png").write_bytes((synth / line["image"]).read_bytes())
        line["image"] = str(tmp_path / f"{i}.png")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    cfg = train.TrainConfig(steps=2, batch_size=4)
    # the line behind each sample, step by step, as train_stage orders stage 1's samples
    order = data.sample_order([(list(range(len(lines))), 1.0)], cfg.steps * cfg.batch_size, cfg.seed + 1)
    rank1_step1 = set(order[2:4])
    assert not rank1_step1 & set(order[:2] + order[4:])  # so only rank 1's micro-batches of step 1 lose their images
    for i in rank1_step1:
        (tmp_path / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    err, ranks = recorded(2, ["--stage", "1", "--init", no_dropout, "--data", tmp_path / "c.jsonl",
                              "--steps", "2", "--batch-size", "4", "--micro-batch", "1", "--seq-len", "160"],
                          tmp_path / "out")
    assert [r["bad_images"] for r in logged(tmp_path / "out", 1)] == [2, 2]
    assert [len(r["calls"]) for r in ranks] == [4, 4]  # 2 micro-batches a step on each rank
    assert all(torch.equal(t, ranks[1]["weights"][n]) for n, t in ranks[0]["weights"].items())


def resumable(synth, stage1, out: Path) -> list:
    """12 steps of stage 2 with LoRA's dropout and f_K's attention dropout on, so every step draws random numbers:
    a resumed run ends as the run never stopped only if the random state is saved and put back."""
    return [sys.executable, str(ROOT / "train.py"), *map(str, stage2_args(synth, stage1 / "stage1")), "--steps", "12",
            *SMALL, "--out-dir", str(out)]


@pytest.fixture(scope="module")
def stage2_straight(synth, stage1, tmp_path_factory):
    """The run of `resumable`, never stopped."""
    out = tmp_path_factory.mktemp("straight")
    run(*resumable(synth, stage1, out)[2:])
    return out


def assert_same_weights(a: Path, b: Path, stage: int) -> None:
    a, b = (load_file(d / f"stage{stage}" / "model.safetensors") for d in (a, b))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_reproduces_the_uninterrupted_run(synth, stage1, stage2_straight, tmp_path):
    out = tmp_path / "interrupted"
    argv = resumable(synth, stage1, out)
    with open(tmp_path / "stderr.txt", "w") as err:  # a file, not a pipe that nobody reads and that could fill up
        proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
    metrics = out / "stage2" / "metrics.jsonl"
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    try:
        proc.wait(timeout=TIMEOUT)
    finally:
        proc.kill()  # nothing left running if the wait timed out
    assert proc.returncode == 130, f"the run finished before it could be interrupted: {(tmp_path / 'stderr.txt').read_text()}"
    state = torch.load(out / "stage2" / "train_state.pt", weights_only=True)
    assert 3 <= state["step"] < 12
    run(*argv[2:], "--resume")
    assert_same_weights(stage2_straight, out, 2)


def train_main(capsys, *argv) -> tuple:
    """train.main in this process, on the CPU: (exit status, stderr without the progress bar)."""
    try:
        train.main([str(a) for a in argv] + ([] if "--device" in argv else ["--device", "cpu"]))
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    return code, "\n".join(line for line in err.splitlines() if line.strip() and "|" not in line)


def test_mismatched_resume_is_refused_naming_each_difference(synth, no_dropout, tmp_path, capsys):
    common = ["--init", no_dropout, "--out-dir", tmp_path, "--batch-size", "4", "--seq-len", "64"]
    captions = ["--stage", "1", "--data", synth / "stage1_single.jsonl"]
    assert train_main(capsys, *captions, *common, "--steps", "2", "--lr", "0.001")[0] == 0
    state = tmp_path / "stage1" / "train_state.pt"
    code, err = train_main(capsys, *captions, *common, "--steps", "2", "--lr", "0.002", "--resume")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{state} was made with other settings (lr 0.001 in the checkpoint vs 0.002 now)" in err
    code, err = train_main(capsys, *captions, *common, "--steps", "3", "--lr", "0.001", "--grad-clip", "2", "--resume")
    assert code == 2 and "steps 2 in the checkpoint vs 3 now; grad_clip 1.0 in the checkpoint vs 2.0 now" in err
    # another stage's state under this stage's name
    (tmp_path / "stage2").mkdir()
    (tmp_path / "stage2" / "train_state.pt").write_bytes(state.read_bytes())
    code, err = train_main(capsys, *stage2_args(synth, no_dropout)[:4], "--data", synth / "stage2_alpaca.json",
                           *common[2:], "--steps", "2", "--lr", "0.001", "--resume")
    assert code == 2 and len(err.splitlines()) == 1 and "(stage 1 in the checkpoint vs 2 now" in err, err
    # and a file that is no train_state.pt at all
    state.write_bytes(b"not a checkpoint")
    code, err = train_main(capsys, *captions, *common, "--steps", "2", "--lr", "0.001", "--resume")
    assert code == 2 and f"{state} is not a train_state.pt Owl can read" in err and "Traceback" not in err, err


def test_missing_and_corrupt_images_skip_their_samples(tmp_path, synth, tok):
    import random as _random

    from vit import ImageTransform

    good = sorted((synth / "images").glob("s_*.png"))[:2]
    (tmp_path / "corrupt.png").write_bytes(good[0].read_bytes()[:60])  # a truncated PNG
    write_huge_png(tmp_path / "huge.png", 20000, 20000)  # 400 megapixels in 70 bytes: refused from its header
    lines = [{"image": str(good[0]), "caption": "a red circle."}, {"image": "nowhere.png", "caption": "a blue square."},
             {"image": str(tmp_path / "corrupt.png"), "caption": "a green triangle."},
             {"image": str(good[1]), "caption": "a yellow square."}, "not json",
             {"image": str(tmp_path / "huge.png"), "caption": "a red square."}]
    (tmp_path / "c.jsonl").write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    with pytest.warns(UserWarning) as caught:
        samples = data.load_training_samples(tmp_path / "c.jsonl", 1, tok, 17, 64)
    text = [str(w.message) for w in caught]
    assert len(samples) == 4 and "\n" not in "".join(text)
    assert any("skipped 1 malformed of 6 entries (first: line 5: JSONDecodeError" in t for t in text), text
    assert any("skipped 1 samples whose image file is missing" in t for t in text), text
    cache = data.ImageCache(ImageTransform(32), augment=False)
    start = time.perf_counter()
    ids, labels, pixels, _ = data.collate(samples, cache, _random.Random(0), "cpu")
    assert ids.shape[0] == 2 and pixels.shape == (2, 3, 32, 32) and cache.failed == 2
    assert time.perf_counter() - start < 1.0  # the 400-megapixel image was not decoded


# --- training that loses nothing ----------------------------------------------------------------------------------

def patch_loss(monkeypatch, bad: dict) -> list:
    """train.summed_loss, made bad on the training forward passes named in `bad` ({pass number: "nan loss" or
    "nan grad"}); returns the list that receives, at each training forward pass, a copy of the parameters it saw."""
    real, seen = train.summed_loss, []

    def summed_loss(model, ids, labels, pixels):
        if model.training:  # the validation loss runs in eval mode
            seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        loss = real(model, ids, labels, pixels)
        kind = bad.get(len(seen)) if model.training else None
        if kind == "nan loss":
            return loss * float("nan")
        if kind == "nan grad":  # a finite loss (sqrt(0) = 0) whose gradient is 0 * inf = NaN
            return loss + (next(model.parameters()) * 0).sum().sqrt()
        return loss

    monkeypatch.setattr(train, "summed_loss", summed_loss)
    return seen


def metric_rows(out: Path) -> list:
    return [json.loads(l) for l in (out / "stage1" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def small_stage1(no_dropout, synth, tmp_path) -> list:
    """A quick stage 1 in this process: one micro-batch of 4 short captions a step."""
    return ["--stage", "1", "--init", no_dropout, "--out-dir", tmp_path, "--data", synth / "stage1_single.jsonl",
            "--batch-size", "4", "--seq-len", "64"]


def test_a_step_with_a_nan_loss_or_gradient_is_skipped_and_changes_nothing(synth, no_dropout, tmp_path, monkeypatch,
                                                                           capsys):
    seen = patch_loss(monkeypatch, {3: "nan loss", 5: "nan grad"})
    code, err = train_main(capsys, *small_stage1(no_dropout, synth, tmp_path), "--steps", "6")
    assert code == 0, err
    same = [all(torch.equal(seen[i][n], seen[i + 1][n]) for n in seen[i]) for i in range(5)]
    assert same == [False, False, True, False, True]  # steps 3 and 5 left every parameter as it was
    rows = metric_rows(tmp_path)
    assert [r["loss"] is None for r in rows] == [False, False, True, False, False, False]
    assert [r["grad_norm"] is None for r in rows] == [False, False, True, False, True, False]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 2, 2]
    state = torch.load(tmp_path / "stage1" / "train_state.pt", weights_only=True)
    assert state["step"] == 6 and state["skipped"] == 2
    # AdamW stepped 4 times, not 6: its moments and bias correction never saw a bad step
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {4.0}
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())
    assert (tmp_path / "stage1" / "model.safetensors").exists()


def test_too_many_bad_steps_in_a_row_stop_the_run_and_keep_the_last_good_state(synth, no_dropout, tmp_path,
                                                                              monkeypatch, capsys):
    seen = patch_loss(monkeypatch, {k: "nan loss" for k in range(4, 20)})
    code, err = train_main(capsys, *small_stage1(no_dropout, synth, tmp_path), "--steps", "12", "--save-every", "1",
                           "--max-bad-steps", "3")
    state_path = tmp_path / "stage1" / "train_state.pt"
    assert code == 1 and "Traceback" not in err, err
    assert (f"train: stopped at step 6 after 3 steps in a row with a NaN or infinite loss or gradient norm; {state_path} "
            "still holds step 3") in err.splitlines()[-1]
    assert len(seen) == 6 and [r["skipped_steps"] for r in metric_rows(tmp_path)] == [0, 0, 0, 1, 2, 3]
    state = torch.load(state_path, weights_only=True)
    assert state["step"] == 3 and state["skipped"] == 0
    assert all(torch.equal(t, seen[3][n]) for n, t in state["trainable"].items())  # as step 3 left them
    assert not (tmp_path / "stage1" / "model.safetensors").exists()


def test_mfu_is_logged_where_the_peak_is_known_with_palms_model_flops(synth, no_dropout, tmp_path, monkeypatch,
                                                                     capsys):
    """MFU only shows on CUDA (the peak is known for named GPUs); here the peak is set, so the CPU run logs it.
    PaLM's FLOPs per token of a sequence of T: 6 N + 12 L D T."""
    monkeypatch.setattr(train, "peak_flops", lambda device: 1e6)
    real, lengths = train.summed_loss, []

    def summed_loss(model, ids, labels, pixels):
        if model.training:
            lengths.append(ids.shape[1])
        return real(model, ids, labels, pixels)

    monkeypatch.setattr(train, "summed_loss", summed_loss)
    code, err = train_main(capsys, *small_stage1(no_dropout, synth, tmp_path), "--steps", "3", "--data",
                           synth / "stage1.jsonl")
    assert code == 0, err
    n_params = sum(t.numel() for t in load_file(tmp_path / "stage1" / "model.safetensors").values())
    text = LlamaConfig.preset("tiny")
    L, D = text.num_layers, text.hidden_size
    rows = metric_rows(tmp_path)
    assert len(rows) == 3 and len(lengths) == 3  # one micro-batch of 4 a step
    assert len(set(lengths)) > 1  # the attention term differs from step to step
    for r, T in zip(rows, lengths):
        per_token = (6 * n_params + 12 * L * D * T) / 1e6
        # tokens/s is logged to 0.1 and the MFU to 1e-4; the attention term alone is about 3% of the MFU here
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token, abs=0.05 * per_token + 1e-4)


def test_the_gpu_peak_is_known_by_name_and_zero_elsewhere(monkeypatch):
    names = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA A100-SXM4-80GB": 312e12,
             "Tesla T4": 0.0}
    for name, peak in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert train.peak_flops("cuda:0") == peak
    assert train.peak_flops("cpu") == 0.0


def test_killed_and_interrupted_runs_resume_to_the_uninterrupted_result(synth, stage1, stage2_straight, tmp_path):
    """SIGKILL at seeded moments, some inside torch.save, and a Ctrl-C: after each, train_state.pt (when there is
    one) loads, a stale .tmp does not matter, and --resume ends with exactly the parameters of the run never stopped
    (same seed, same steps, dropout drawing random numbers at every step) and with each step logged once."""
    out = tmp_path / "r"
    argv = [*resumable(synth, stage1, out), "--save-every", "1", "--resume"]
    state, tmp = out / "stage2" / "train_state.pt", out / "stage2" / "train_state.pt.tmp"
    metrics = out / "stage2" / "metrics.jsonl"
    rng = random.Random(0)

    def mtime(path):
        return path.stat().st_mtime_ns if path.exists() else None

    def logged():
        return len(metrics.read_text().splitlines()) if metrics.exists() else 0

    def new_save(start, min_bytes):  # a save begun after `start`, so most likely under way (into the .tmp or the file)
        def ready():
            written = tmp.stat().st_size if tmp.exists() else -1
            return (mtime(tmp) not in (None, start["tmp"]) and written >= min_bytes) or \
                mtime(state) not in (None, start["state"])
        return ready

    def steps_done(start, n):  # counted from the log's length before the run (which --resume may cut back first)
        return lambda: logged() >= start["logged"] + n

    left_tmp = []
    # (signal, after N more logged steps or as a save has written N bytes, then a seeded random delay)
    for sig, after, delay in [(signal.SIGKILL, "save 0", 0), (signal.SIGINT, 2, 0), (signal.SIGKILL, 1, rng.random() / 4),
                              (signal.SIGKILL, "save 1", 0)]:
        start = {"tmp": mtime(tmp), "state": mtime(state), "logged": logged()}
        ready = new_save(start, int(after[5:])) if isinstance(after, str) else steps_done(start, after)
        with open(tmp_path / "stderr.txt", "w") as err:
            proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
            deadline = time.time() + TIMEOUT
            while proc.poll() is None and not ready() and time.time() < deadline:
                time.sleep(0.001)
            time.sleep(delay)
            assert proc.poll() is None, f"the run ended before the {sig.name}: {(tmp_path / 'stderr.txt').read_text()}"
            proc.send_signal(sig)
            try:
                proc.wait(timeout=60)
            finally:
                proc.kill()  # nothing left running if the wait timed out
        assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL)
        left_tmp.append(tmp.exists())
        if state.exists():
            saved = torch.load(state, weights_only=True)
            assert 0 < saved["step"] < 12
            if sig == signal.SIGINT:  # Ctrl-C: the step under way finished and was saved
                assert saved["step"] == json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert any(left_tmp), "no SIGKILL landed inside a save"
    run(*argv[2:])
    assert_same_weights(stage2_straight, out, 2)
    assert [json.loads(l)["step"] for l in metrics.read_text().splitlines() if '"loss"' in l] == list(range(1, 13))


@pytest.mark.parametrize("case", ["missing data file", "data file that is not JSON", "only malformed lines",
                                  "no data", "nothing to start from"])
def test_bad_training_data_exits_2_with_one_sentence(synth, pretrained, tmp_path, capsys, case):
    (tmp_path / "bad.json").write_text("[{not json\n")
    (tmp_path / "bad.jsonl").write_text("{not json\n" + json.dumps({"image": "a.png"}) + "\n")
    stage, data_file, said = {"missing data file": ("1", "nope.txt", "does not exist"),
                              "data file that is not JSON": ("2", "bad.json", "is not stage-2 training data"),
                              "only malformed lines": ("1", "bad.jsonl", "holds no usable sample"),
                              "no data": ("1", None, "--data is required"),
                              "nothing to start from": ("1", "bad.jsonl", "needs --init")}[case]
    start = [] if case == "nothing to start from" else ["--llm-init", pretrained / "llm"]
    data_args = ["--data", tmp_path / data_file] if data_file else []
    with pytest.warns(UserWarning) if case == "only malformed lines" else nullcontext():
        code, err = train_main(capsys, "--stage", stage, "--out-dir", tmp_path / "out", *start, *data_args,
                               "--steps", "1")
    # one sentence; argparse's own errors (no --data) come after its usage lines, as for an unknown flag
    assert code == 2 and (len(err.splitlines()) == 1 or case == "no data") and "Traceback" not in err, err
    assert said in err.splitlines()[-1] and (data_file is None or case == "nothing to start from"
                                             or str(tmp_path / data_file) in err)


def test_an_unknown_flag_exits_2_with_the_usage(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--steps", "3", "--no-such-flag"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: ") and "unrecognized arguments: --no-such-flag" in err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for name, comment in train._field_comments().items():
        assert "--" + name.replace("_", "-") in shown and " ".join(comment.split()) in shown, name
    assert len(train._field_comments()) == len(train.fields(train.TrainConfig))


def test_data_weights_follow_the_last_colon_and_bad_weights_are_refused(tmp_path):
    colon = tmp_path / "a:b.jsonl"  # a file name with a colon in it
    colon.write_text("")
    assert data.parse_source("x.json") == ("x.json", 1.0)
    assert data.parse_source("x.json:0.3") == ("x.json", 0.3)
    assert data.parse_source("C:/data/x.json:2") == ("C:/data/x.json", 2.0)
    assert data.parse_source(str(colon)) == (str(colon), 1.0)
    assert data.parse_source(f"{colon}:0.5") == (str(colon), 0.5)
    assert data.parse_source("dir:name/x.json") == ("dir:name/x.json", 1.0)
    for bad in ("x.json:0", "x.json:-1", "x.json:nan"):  # train.main turns the error into its one sentence, exit 2
        with pytest.raises(UserError, match=f"--data {bad}: the weight after the last ':' must be a positive number"):
            data.parse_source(bad)


def test_max_pixels_skips_and_counts_training_images_over_the_limit(no_dropout, tmp_path, capsys):
    """train.py --max-pixels reaches the training images: one of 80x80 = 6400 pixels is skipped under a limit of 5000
    and counted in metrics.jsonl, and read under the default limit."""
    from PIL import Image
    Image.new("RGB", (80, 80), (200, 30, 30)).save(tmp_path / "big.png")
    Image.new("RGB", (64, 64), (30, 30, 200)).save(tmp_path / "small.png")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"image": str(tmp_path / f"{name}.png"), "caption": text}) + "\n"
                                              for name, text in (("big", "a red square."), ("small", "a blue one."))))
    common = ["--stage", "1", "--init", no_dropout, "--data", tmp_path / "c.jsonl", "--steps",
              "1", "--batch-size", "2", "--seq-len", "64"]
    code, err = train_main(capsys, *common, "--out-dir", tmp_path / "limited", "--max-pixels", "5000")
    assert code == 0 and "80x80 pixels, more than the limit of 5000 (--max-pixels)" in err, err
    assert [r["bad_images"] for r in logged(tmp_path / "limited", 1)] == [1]
    code, err = train_main(capsys, *common, "--out-dir", tmp_path / "default")
    assert code == 0 and [r["bad_images"] for r in logged(tmp_path / "default", 1)] == [0], err
    with pytest.raises(SystemExit):
        train.parse_args(["--max-pixels", "0"])


def test_a_state_save_is_on_disk_before_it_replaces_the_last_one(tmp_path, monkeypatch):
    """atomic_save writes train_state.pt.tmp whole, fsyncs it, renames it over the old file, then fsyncs the folder
    (which holds the rename): a crash or power loss at any point leaves the old state or the new one, whole."""
    import stat

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)  # which file (by inode, which the rename keeps) and how much of it is written
        events.append(("fsync", st.st_ino, st.st_size if stat.S_ISREG(st.st_mode) else "folder"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "train_state.pt"
    path.write_bytes(b"the last state")
    resume.atomic_save({"x": torch.arange(1000)}, path)
    assert events == [("fsync", path.stat().st_ino, path.stat().st_size),
                      ("replace", "train_state.pt.tmp", "train_state.pt"), ("fsync", tmp_path.stat().st_ino, "folder")]
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(1000))


def test_weight_decay_spares_biases_and_norms_and_fk_runs_at_its_own_lr(tokenizer_model):
    """AdamW's groups, as the HF Trainer of the released code forms them: every trained parameter decayed but biases
    and norm weights (f_K's queries and vit_eos, f_V's class token and position embeddings decayed), each parameter
    in one group, f_K's at --abstractor-lr-scale times the lr."""
    import re

    import lora
    from conftest import tiny_owl

    model = tiny_owl(tokenizer_model)
    cfg = train.TrainConfig(weight_decay=0.1, abstractor_lr_scale=3.0)

    def groups_by_name():
        names = {id(p): n for n, p in model.named_parameters()}
        got = [(names[id(p)], g["weight_decay"], g["lr_scale"]) for g in train.param_groups(model, cfg)
               for p in g["params"]]
        assert len(got) == len({n for n, _, _ in got})  # each parameter in one group only
        return {n: (wd, scale) for n, wd, scale in got}

    def expected(name):
        spared = name.endswith(".bias") or re.search(r"(norm\w*|_ln)\.weight$", name)
        return (0.0 if spared else 0.1, 3.0 if name.startswith("abstractor.") else 1.0)

    model.requires_grad_(False)  # stage 1: f_V and f_K
    for part in (model.vision_model, model.abstractor):
        part.requires_grad_(True)
    got = groups_by_name()
    assert got == {n: expected(n) for n, p in model.named_parameters() if p.requires_grad}
    assert got["abstractor.query_tokens"] == got["abstractor.vit_eos"] == (0.1, 3.0)
    assert got["vision_model.embeddings.cls_token"] == got["vision_model.embeddings.position_embedding"] == (0.1, 1.0)
    assert got["abstractor.layers.0.norm1.weight"] == got["abstractor.layers.0.query.bias"] == (0.0, 3.0)
    assert got["vision_model.post_layernorm.weight"] == (0.0, 1.0)
    lora.apply_lora(model.language_model, ("q_proj", "v_proj"), 4, 8.0, 0.0)  # stage 2: LoRA and f_K
    lora.mark_only_lora_trainable(model, extra=("abstractor.",))
    got = groups_by_name()
    assert got == {n: expected(n) for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in got if not n.startswith("abstractor.")} == {
        n for n, _ in model.named_parameters() if ".lora_" in n} and all(got[n] == (0.1, 1.0) for n in got if ".lora_" in n)


def test_the_lr_warms_up_linearly_then_falls_by_a_cosine_to_a_tenth():
    cfg = train.TrainConfig(lr=1e-3, steps=10, warmup=2)
    lrs = [train.lr_at(step, cfg) for step in range(11)]
    assert lrs[:3] == [5e-4, 1e-3, 1e-3]
    assert lrs[6] == pytest.approx(0.55e-3, rel=1e-12)  # half way through the cosine: half way from lr to lr / 10
    assert lrs[9] == pytest.approx(1e-3 * (0.1 + 0.45 * (1 + math.cos(7 / 8 * math.pi))), rel=1e-12)
    assert lrs[10] == pytest.approx(1e-4, rel=1e-12) and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_plot_losses_draws_stages_gaps_validation_and_ticks(tmp_path):
    """loss.png read back as pixels: both stages' curves in their colours, a gap at the skipped step, the validation
    diamonds where plot.loss_axes puts those points, and tick numbers left of and below the frame."""
    from PIL import Image

    rows = [{"stage": "stage 1", "step": s, "loss": v} for s, v in [(1, 4.0), (2, 3.5), (3, None), (4, 2.5), (5, 2.2)]]
    rows += [{"stage": "stage 1", "step": 5, "val_loss": 3.0}]
    rows += [{"stage": "stage 2", "step": s, "loss": v} for s, v in [(1, 2.0), (2, 1.8), (3, 1.7), (4, 1.5)]]
    rows += [{"stage": "stage 2", "step": 4, "val_loss": 1.2}]
    metrics, png = tmp_path / "metrics.jsonl", tmp_path / "loss.png"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot.plot_losses(metrics, png)
    img = Image.open(png).convert("RGB")
    assert img.size == plot.PLOT_SIZE
    to_px, xt, yt = plot.loss_axes(plot.loss_series(metrics))
    assert xt[0] <= 0 and xt[-1] >= 5 and yt[0] <= 1.2 and yt[-1] >= 4.0

    def colours_near(step, loss, r=3):
        x, y = (round(c) for c in to_px(step, loss))
        return {img.getpixel((x + dx, y + dy)) for dx in range(-r, r + 1) for dy in range(-r, r + 1)}

    blue, green = plot.STAGE_COLOURS[:2]
    assert blue in colours_near(1.5, 3.75) and green in colours_near(2.5, 1.75)  # mid-segment of each curve
    assert blue not in colours_near(3, 3.0, r=1)  # steps 2 to 4 of stage 1 are not joined: step 3 was skipped
    assert plot.VAL_COLOUR in colours_near(5, 3.0) and plot.VAL_COLOUR in colours_near(4, 1.2)
    assert plot.VAL_COLOUR not in colours_near(2, 3.0)  # nowhere near a validation point
    left, top, right, bottom = plot.PLOT_BOX
    white = (255, 255, 255)
    y_labels = [img.getpixel((x, y)) for x in range(left - 30, left - 5) for y in range(top - 8, bottom + 8)]
    x_labels = [img.getpixel((x, y)) for x in range(left - 10, right + 10) for y in range(bottom + 6, bottom + 20)]
    assert sum(c != white for c in y_labels) > 20 and sum(c != white for c in x_labels) > 20
