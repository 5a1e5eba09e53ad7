"""Training: labels built segment by segment, the three stage-2 formats, DDP equivalence, resume, what each stage
trains, and training that loses nothing (NaN steps skipped, SIGTERM / Ctrl-C / SIGKILL survived, bad input refused
in one sentence). Runs train.py for real (as a subprocess, as a user would) on a tiny synthetic data set; the checks
that patch the loss or read stderr call train.main in this process."""
import json
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
import synthetic  # noqa: E402
import tiny  # noqa: E402
import train  # noqa: E402
from conftest import write_huge_png  # noqa: E402
from llama import LlamaConfig, Tokenizer  # noqa: E402
from owl import IMAGE_ID, Owl, render_prompt, tokenize  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
SMALL = ["--batch-size", "8", "--seq-len", "160", "--eval-samples", "10", "--drill-steps", "5"]


def run(*args, check=True, **kw):
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    synthetic.synth(str(d), seed=3, n_train=120, n_owl=60, n_llava=30, n_alpaca=30, n_heldout=10, n_reading=60,
               n_drill=60)
    return d


@pytest.fixture(scope="module")
def stage0(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    run("--stage", "0", "--data-dir", str(synth), "--out-dir", str(out), "--steps", "20", "--vision-steps", "4", *SMALL)
    return out


@pytest.fixture(scope="module")
def stage1(synth, stage0):
    """stage0's folder with a 3-step stage 1 added (stage0/stage1), for the tests that start from stage 1."""
    run("--stage", "1", "--data-dir", str(synth), "--out-dir", str(stage0), "--steps", "3", *SMALL)
    return stage0


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


def test_a_few_steps_lower_the_loss(stage0):
    losses = [json.loads(l)["loss"] for l in (stage0 / "stage0" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in l]
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_the_loss_runs_the_lm_head_on_answer_positions_only_and_equals_the_full_cross_entropy(tokenizer_model,
                                                                                               monkeypatch):
    """summed_loss gives logits only to the positions that predict an answer token; loss and gradients equal the
    textbook next-token cross-entropy over the full (B, T, vocab) logits."""
    from conftest import tiny_owl

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
    weights = [model.language_model.lm_head.weight, model.language_model.model.layers[0].self_attn.q_proj.weight]
    grads = torch.autograd.grad(loss, weights)

    logits = model(ids)  # (B, T, vocab): every position
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                                            ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(ref, weights)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_stage0_answers_the_heldout_questions_about_scenes_as_shape_vectors(synth, stage0):
    """After stage 0 the f_L is asked the held-out questions with each scene given as shape vectors (half as many
    as --eval-samples), and its accuracy by kind is kept beside the checkpoint."""
    table = json.loads((stage0 / "stage0" / "accuracy_reading.json").read_text())
    asked = [json.loads(l)["kind"] for l in (synth / "heldout_reading.jsonl").read_text().splitlines()][:5]
    assert {k: n for k, (_, n) in table.items() if k != "all"} == {k: asked.count(k) for k in set(asked)}
    assert table["all"][1] == 5 and all(0 <= c <= n for c, n in table.values())


def test_a_shape_mark_becomes_one_input_vector_the_sum_of_its_word_embeddings(tok):
    """Stage 0's chats give each shape as one vector: the mark's slot holds the sum of the embeddings of its words
    (counted here from the embedding table itself), the rest of the chat is embedded as usual, and the gradient
    reaches each word's embedding row. Stage 2 reads the same text as plain text."""
    chat = "Human: <shape red circle top><shape blue square left>\nHuman: Where is the red circle?\nAI: It is at the top."
    sample = data.build_sample(tok, data.document_segments(chat), [], 0, 256, with_shapes=True)
    prompt = (tok.encode("Human: ") + [synthetic.SHAPE_ID, synthetic.SHAPE_ID]
              + tok.encode("\nHuman: Where is the red circle?\nAI: "))
    answer = tok.encode("It is at the top.") + [tok.eos_id]
    assert sample.ids == [tok.bos_id] + prompt + answer
    assert sample.labels == [-100] * (1 + len(prompt)) + answer
    assert sample.shapes == [tok.encode("red circle top"), tok.encode("blue square left")]
    plain = data.build_sample(tok, data.document_segments(chat), [], 0, 256)
    assert synthetic.SHAPE_ID not in plain.ids and plain.shapes == []

    model = train.Llama(train.OwlConfig.preset("tiny").text)
    model.init_weights()
    ids, labels, _, shapes = train.collate([sample, sample], None, None, "cpu")
    x = tiny.shape_embeddings(model, ids, shapes)
    table = model.model.embed_tokens.weight
    slots = [i for i, t in enumerate(sample.ids) if t == synthetic.SHAPE_ID]
    for row in range(2):
        for slot, words in zip(slots, sample.shapes):
            torch.testing.assert_close(x[row, slot], table[words].sum(0))
        rest = [i for i in range(len(sample.ids)) if i not in slots]
        torch.testing.assert_close(x[row, rest], table[torch.tensor(sample.ids)[rest]])
    x.sum().backward()
    grad_rows = table.grad.abs().sum(1) > 0
    assert all(grad_rows[w] for words in sample.shapes for w in words)


def test_stage0_drills_the_look_up_first_then_trains_on_the_whole_mix(synth, tok):
    """--drill-steps N: the first N global batches of stage 0 are drill chats alone, the rest mix every source."""
    cfg = train.TrainConfig(data_dir=str(synth), steps=6, batch_size=8, drill_steps=4)
    sources = train.load_samples(cfg, 0, tok, 0)
    drill = {id(s) for s in sources[-1][0]}
    order = train.stage_order(cfg, 0, sources)
    assert len(order) == 48 and all(id(s) in drill for s in order[:32])
    assert any(id(s) not in drill for s in order[32:]) and any(id(s) in drill for s in order[32:])
    assert all(s.shapes and s.ids.count(synthetic.SHAPE_ID) == len(s.shapes) for s in order[:32])
    mixed = train.stage_order(train.TrainConfig(data_dir=str(synth), steps=6, batch_size=8, drill_steps=0), 0, sources)
    assert any(id(s) not in drill for s in mixed[:32])


def test_each_stage_changes_exactly_what_it_trains(synth, stage1):
    stage0 = stage1  # the folder holding stage0/ and stage1/
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
    # different seeds: different f_K starts, data orders and so f_V updates; the same frozen f_L
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("vision_model."))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("language_model."))


def test_vision_labels_name_the_patches_each_shape_covers():
    # a 64 px canvas is the tiny f_V's own size, so no resize: a square spanning pixels 8..32 fills the 8 px patches
    # of rows and columns 1-3 and touches column 4 with one pixel column (8 px, under 15% of 64); a circle elsewhere
    scene = {"width": 64, "height": 64, "background": [255, 255, 255], "shapes": [
        {"color": "red", "shape": "square", "position": "left", "center": [20, 20], "size": 24, "fill": [200, 40, 40],
         "angle": 0.0},
        {"color": "blue", "shape": "circle", "position": "right", "center": [52, 52], "size": 16, "fill": [40, 40, 200],
         "angle": 0.0}]}
    transform = tiny.ImageTransform(64)
    pixels, objects, in_view = tiny.labelled_image(scene, transform, 8, None)
    assert pixels.shape == (3, 64, 64) and in_view == 2
    assert [f for _, f in objects] == [(synthetic.SHAPES.index("square"), list(synthetic.COLORS).index("red"),
                                        list(synthetic.POSITIONS).index("left")),
                                       (synthetic.SHAPES.index("circle"), list(synthetic.COLORS).index("blue"),
                                        list(synthetic.POSITIONS).index("right"))]
    square = {(int(i) // 8, int(i) % 8) for i in objects[0][0].nonzero()}
    assert square == {(r, c) for r in (1, 2, 3) for c in (1, 2, 3)}
    circle = {(int(i) // 8, int(i) % 8) for i in objects[1][0].nonzero()}
    assert circle and all(r >= 5 and c >= 5 for r, c in circle)


def test_vision_pretraining_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    vit = train.VisionTransformer(train.OwlConfig.preset("tiny").vision)
    vit.init_weights()
    heads = torch.nn.ModuleList([torch.nn.Linear(128, 11), torch.nn.Linear(128, 5)])
    rng = random.Random(0)
    batch = [tiny.labelled_image(synthetic.random_scene(rng), tiny.ImageTransform(64), 8, None) for _ in range(8)]
    opt = torch.optim.AdamW([*vit.parameters(), *heads.parameters()], lr=1e-3)
    first = None
    for _ in range(25):
        loss, _, n = tiny.vision_loss(vit, heads, batch, "cpu")
        first = first if first is not None else loss.item()
        opt.zero_grad()
        (loss / (n + len(batch))).backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_stage1_starts_from_the_stage0_vision_encoder(synth, stage0, tmp_path):
    out = tmp_path / "r"
    (out / "stage0").mkdir(parents=True)
    for f in (stage0 / "stage0").iterdir():
        (out / "stage0" / f.name).write_bytes(f.read_bytes())
    p = run("--stage", "1", "--data-dir", str(synth), "--out-dir", str(out), "--steps", "1", "--lr", "1e-30", *SMALL)
    assert f"f_V from {out / 'stage0' / 'vision.safetensors'}" in p.stderr
    pre = load_file(out / "stage0" / "vision.safetensors")
    owl = load_file(out / "stage1" / "model.safetensors")
    assert pre and all(torch.allclose(owl["vision_model." + k], v) for k, v in pre.items())


def _one_rank_and_two(args, stage, port, tmp_path):
    """The same run on one rank and on two DDP ranks (Gloo): both final weights, after checking that both runs
    averaged the same gradients. They sum the same samples' gradients in another order (two ranks, then all-reduce,
    vs one rank), so the gradients (AdamW's first moments) agree to float rounding; a missed micro-batch or a sum
    instead of a mean is off by 10-100%."""
    run(*args, "--out-dir", str(tmp_path / "one"))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        str(ROOT / "train.py"), *args, "--out-dir", str(tmp_path / "two")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    moments = [torch.load(tmp_path / r / f"stage{stage}" / "train_state.pt", weights_only=True)["optimizer"]["state"]
               for r in ("one", "two")]
    for i, m in moments[0].items():
        gap = (m["exp_avg"] - moments[1][i]["exp_avg"]).abs().max() / m["exp_avg"].abs().max()
        assert gap < 1e-3, (i, gap.item())
    a, b = (load_file(tmp_path / r / f"stage{stage}" / "model.safetensors") for r in ("one", "two"))
    assert a.keys() == b.keys()
    return a, b


def test_two_ddp_ranks_match_one_rank(synth, stage1, tmp_path):
    stage0 = stage1  # the folder holding stage0/ and stage1/
    # no dropout anywhere, so both runs draw no random numbers and must agree to rounding
    a, b = _one_rank_and_two(["--stage", "2", "--data-dir", str(synth), "--steps", "2", "--lora-dropout", "0",
                              "--freeze-abstractor", "--init", str(stage0 / "stage1"), *SMALL], 2, 29533, tmp_path)
    # AdamW divides each gradient by its running RMS: where a gradient is within rounding of zero that ratio can
    # differ, so a handful of parameters may differ by more than rounding (measured: 58 of 3.2M elements over 1e-6,
    # the largest 1.5e-6).
    off = sum(int(((a[k] - b[k]).abs() > 1e-6).sum()) for k in a)
    assert off <= 1e-4 * sum(t.numel() for t in a.values()), off
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert any(not torch.equal(a[k], load_file(stage0 / "stage1" / "model.safetensors")[k]) for k in a)


def test_two_ddp_ranks_match_one_rank_in_stage0(synth, tmp_path):
    """Stage 0 embeds its shape vectors outside DDP's forward (tiny.shape_embeddings): the embedding's gradient must
    still be all-reduced, drill and mix steps alike."""
    a, b = _one_rank_and_two(["--stage", "0", "--data-dir", str(synth), "--steps", "2", "--drill-steps", "1",
                              "--vision-steps", "0", "--batch-size", "8", "--seq-len", "160", "--eval-samples", "2"],
                             0, 29534, tmp_path)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_resume_reproduces_the_uninterrupted_run(synth, stage1, tmp_path):
    stage0 = stage1  # the folder holding stage0/ and stage1/
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


def train_main(capsys, *argv) -> tuple:
    """train.main in this process: (exit status, stderr without the progress bar)."""
    try:
        train.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    return code, "\n".join(line for line in err.splitlines() if line.strip() and "|" not in line)


def test_mismatched_resume_is_refused_naming_each_difference(synth, tmp_path, capsys):
    common = ["--data-dir", synth, "--out-dir", tmp_path, "--batch-size", "4", "--seq-len", "64"]
    text = ["--data", synth / "corpus.txt"]  # stage 0 on its smallest file
    assert train_main(capsys, "--stage", "0", *common, *text, "--steps", "2", "--lr", "0.001")[0] == 0
    state = tmp_path / "stage0" / "train_state.pt"
    code, err = train_main(capsys, "--stage", "0", *common, *text, "--steps", "2", "--lr", "0.002", "--resume")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{state} was made with other settings (lr 0.001 in the checkpoint vs 0.002 now)" in err
    code, err = train_main(capsys, "--stage", "0", *common, *text, "--steps", "3", "--lr", "0.001", "--grad-clip",
                           "2", "--resume")
    assert code == 2 and "steps 2 in the checkpoint vs 3 now; grad_clip 1.0 in the checkpoint vs 2.0 now" in err
    # another stage's state under this stage's name: the stage and the model differ
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "train_state.pt").write_bytes(state.read_bytes())
    code, err = train_main(capsys, "--stage", "1", *common, "--steps", "2", "--llm-init", tmp_path / "stage0",
                           "--resume")
    assert code == 2 and len(err.splitlines()) == 1 and "(stage 0 in the checkpoint vs 1 now; model." in err, err
    # and a file that is no train_state.pt at all
    state.write_bytes(b"not a checkpoint")
    code, err = train_main(capsys, "--stage", "0", *common, *text, "--steps", "2", "--lr", "0.001", "--resume")
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
    cache = train.ImageCache(ImageTransform(32), augment=False)
    start = time.perf_counter()
    ids, labels, pixels, _ = train.collate(samples, cache, _random.Random(0), "cpu")
    assert ids.shape[0] == 2 and pixels.shape == (2, 3, 32, 32) and cache.failed == 2
    assert time.perf_counter() - start < 1.0  # the 400-megapixel image was not decoded


# --- training that loses nothing ----------------------------------------------------------------------------------

def patch_loss(monkeypatch, bad: dict) -> list:
    """train.summed_loss, made bad on the training forward passes named in `bad` ({pass number: "nan loss" or
    "nan grad"}); returns the list that receives, at each training forward pass, a copy of the parameters it saw."""
    real, seen = train.summed_loss, []

    def summed_loss(model, ids, labels, pixels, shapes=None):
        if model.training:  # the validation loss runs in eval mode
            seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        loss = real(model, ids, labels, pixels, shapes)
        kind = bad.get(len(seen)) if model.training else None
        if kind == "nan loss":
            return loss * float("nan")
        if kind == "nan grad":  # a finite loss (sqrt(0) = 0) whose gradient is 0 * inf = NaN
            return loss + (next(model.parameters()) * 0).sum().sqrt()
        return loss

    monkeypatch.setattr(train, "summed_loss", summed_loss)
    return seen


def metric_rows(out: Path) -> list:
    return [json.loads(l) for l in (out / "stage0" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def test_a_step_with_a_nan_loss_or_gradient_is_skipped_and_changes_nothing(synth, tmp_path, monkeypatch, capsys):
    seen = patch_loss(monkeypatch, {3: "nan loss", 5: "nan grad"})
    code, err = train_main(capsys, "--stage", "0", "--data-dir", synth, "--out-dir", tmp_path, "--steps", "6",
                           "--data", synth / "corpus.txt", "--batch-size", "4", "--seq-len", "64")
    assert code == 0, err
    same = [all(torch.equal(seen[i][n], seen[i + 1][n]) for n in seen[i]) for i in range(5)]
    assert same == [False, False, True, False, True]  # steps 3 and 5 left every parameter as it was
    rows = metric_rows(tmp_path)
    assert [r["loss"] is None for r in rows] == [False, False, True, False, False, False]
    assert [r["grad_norm"] is None for r in rows] == [False, False, True, False, True, False]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 2, 2]
    state = torch.load(tmp_path / "stage0" / "train_state.pt", weights_only=True)
    assert state["step"] == 6 and state["skipped"] == 2
    # AdamW stepped 4 times, not 6: its moments and bias correction never saw a bad step
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {4.0}
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())
    assert (tmp_path / "stage0" / "model.safetensors").exists()


def test_too_many_bad_steps_in_a_row_stop_the_run_and_keep_the_last_good_state(synth, tmp_path, monkeypatch,
                                                                              capsys):
    seen = patch_loss(monkeypatch, {k: "nan loss" for k in range(4, 20)})
    code, err = train_main(capsys, "--stage", "0", "--data-dir", synth, "--out-dir", tmp_path, "--steps", "12",
                           "--data", synth / "corpus.txt", "--batch-size", "4", "--seq-len", "64", "--save-every", "1",
                           "--max-bad-steps", "3")
    state_path = tmp_path / "stage0" / "train_state.pt"
    assert code == 1 and "Traceback" not in err, err
    assert (f"train: stopped at step 6 after 3 steps in a row with a NaN or infinite loss or gradient norm; {state_path} "
            "still holds step 3") in err.splitlines()[-1]
    assert len(seen) == 6 and [r["skipped_steps"] for r in metric_rows(tmp_path)] == [0, 0, 0, 1, 2, 3]
    state = torch.load(state_path, weights_only=True)
    assert state["step"] == 3 and state["skipped"] == 0
    assert all(torch.equal(t, seen[3][n]) for n, t in state["trainable"].items())  # as step 3 left them
    assert not (tmp_path / "stage0" / "model.safetensors").exists()


def test_mfu_is_logged_where_the_peak_is_known_with_palms_model_flops(synth, tmp_path, monkeypatch, capsys):
    """MFU only shows on CUDA (the peak is known for named GPUs); here the peak is set, so the CPU run logs it.
    PaLM's FLOPs per token of a sequence of T: 6 N + 12 L D T."""
    monkeypatch.setattr(train, "peak_flops", lambda device: 1e6)
    real, lengths = train.summed_loss, []

    def summed_loss(model, ids, labels, pixels, shapes=None):
        if model.training:
            lengths.append(ids.shape[1])
        return real(model, ids, labels, pixels, shapes)

    monkeypatch.setattr(train, "summed_loss", summed_loss)
    code, err = train_main(capsys, "--stage", "0", "--data-dir", synth, "--out-dir", tmp_path, "--steps", "3",
                           "--data", synth / "corpus.txt", "--batch-size", "4", "--seq-len", "64", "--vision-steps", "0")
    assert code == 0, err
    n_params = sum(t.numel() for t in load_file(tmp_path / "stage0" / "model.safetensors").values())
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


def test_killed_and_interrupted_runs_resume_to_the_uninterrupted_result(synth, stage0, tmp_path):
    """SIGKILL at seeded moments, some inside torch.save, and a Ctrl-C: after each, train_state.pt (when there is
    one) loads, a stale .tmp does not matter, and --resume ends with exactly the parameters of the run never stopped
    (the stage0 fixture: same seed, same steps) and with each step logged once."""
    out = tmp_path / "r"
    argv = [sys.executable, str(ROOT / "train.py"), "--stage", "0", "--data-dir", str(synth), "--out-dir", str(out),
            "--steps", "20", *SMALL, "--save-every", "1", "--resume"]
    state, tmp = out / "stage0" / "train_state.pt", out / "stage0" / "train_state.pt.tmp"
    metrics = out / "stage0" / "metrics.jsonl"
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
            while proc.poll() is None and not ready():
                time.sleep(0.001)
            time.sleep(delay)
            assert proc.poll() is None, f"the run ended before the {sig.name}: {(tmp_path / 'stderr.txt').read_text()}"
            proc.send_signal(sig)
            proc.wait(timeout=60)
        assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL)
        left_tmp.append(tmp.exists())
        if state.exists():
            saved = torch.load(state, weights_only=True)
            assert 0 < saved["step"] < 20
            if sig == signal.SIGINT:  # Ctrl-C: the step under way finished and was saved
                assert saved["step"] == json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert any(left_tmp), "no SIGKILL landed inside a save"
    run(*argv[2:])
    a = load_file(stage0 / "stage0" / "model.safetensors")
    b = load_file(out / "stage0" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metric_rows(out)] == list(range(1, 21))


@pytest.mark.parametrize("case", ["missing data file", "data file that is not JSON", "only malformed lines"])
def test_bad_training_data_exits_2_with_one_sentence(synth, stage0, tmp_path, capsys, case):
    (tmp_path / "bad.json").write_text("[{not json\n")
    (tmp_path / "bad.jsonl").write_text("{not json\n" + json.dumps({"image": "a.png"}) + "\n")
    stage, data_file, said = {"missing data file": ("0", "nope.txt", "does not exist"),
                              "data file that is not JSON": ("2", "bad.json", "is not stage-2 training data"),
                              "only malformed lines": ("1", "bad.jsonl", "holds no usable sample")}[case]
    with pytest.warns(UserWarning) if case == "only malformed lines" else nullcontext():
        code, err = train_main(capsys, "--stage", stage, "--data-dir", synth, "--out-dir", tmp_path / "out",
                               "--llm-init", stage0 / "stage0", "--data", tmp_path / data_file, "--steps", "1")
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("train: ") and str(tmp_path / data_file) in err and said in err


@pytest.mark.parametrize("case", ["no held-out file", "no checkpoint"])
def test_eval_with_a_missing_file_exits_2_with_one_sentence(synth, tmp_path, capsys, case):
    heldout, init, said = {"no held-out file": (tmp_path / "nope.jsonl", synth, "does not exist"),
                           "no checkpoint": (synth / "heldout.jsonl", tmp_path, "is not a checkpoint folder")}[case]
    code, err = train_main(capsys, "--stage", "eval", "--init", init, "--heldout", heldout)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert said in err


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


def test_data_weights_follow_the_last_colon_and_bad_weights_are_refused(tmp_path, capsys):
    colon = tmp_path / "a:b.jsonl"  # a file name with a colon in it
    colon.write_text("")
    assert train.parse_source("x.json") == ("x.json", 1.0)
    assert train.parse_source("x.json:0.3") == ("x.json", 0.3)
    assert train.parse_source("C:/data/x.json:2") == ("C:/data/x.json", 2.0)
    assert train.parse_source(str(colon)) == (str(colon), 1.0)
    assert train.parse_source(f"{colon}:0.5") == (str(colon), 0.5)
    assert train.parse_source("dir:name/x.json") == ("dir:name/x.json", 1.0)
    for bad in ("x.json:0", "x.json:-1", "x.json:nan"):
        with pytest.raises(SystemExit) as e:
            train.parse_source(bad)
        assert e.value.code == 2 and "positive number" in capsys.readouterr().err


def test_max_pixels_skips_and_counts_training_images_over_the_limit(tmp_path, capsys):
    from PIL import Image
    from vit import ImageTransform
    Image.new("RGB", (40, 28), (200, 30, 30)).save(tmp_path / "big.png")  # 1120 pixels
    Image.new("RGB", (20, 20), (30, 30, 200)).save(tmp_path / "small.png")  # 400
    samples = [data.Sample([1, 5, 6], [-100, 6, 2], [str(tmp_path / name)]) for name in ("big.png", "small.png")]
    images = train.ImageCache(ImageTransform(32), False, max_pixels=1119)
    ids, labels, pixels, _ = train.collate(samples, images, random.Random(0), "cpu")
    assert images.failed == 1 and ids.shape[0] == 1 and pixels.shape == (1, 3, 32, 32)
    assert "40x28 pixels, more than the limit of 1119 (--max-pixels)" in capsys.readouterr().err
    images = train.ImageCache(ImageTransform(32), False, max_pixels=1120)
    assert train.collate(samples, images, random.Random(0), "cpu")[0].shape[0] == 2 and images.failed == 0
    with pytest.raises(SystemExit):
        train.parse_args(["--max-pixels", "0"])
