"""The tiny run's wing (tiny.py): the stand-ins for LLaMA-7B and CLIP written in the formats train.py's --llm-init
and --vit-init read, the shape vectors of the f_L's chats, the look-up drill, the f_V's labelled scenes, scoring."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
from conftest import SMALL, TIMEOUT  # noqa: E402
import synthetic  # noqa: E402
import tiny  # noqa: E402
from llama import Llama, Tokenizer  # noqa: E402
from owl import OwlConfig  # noqa: E402
from vit import ImageTransform, VisionTransformer  # noqa: E402


@pytest.fixture(scope="module")
def tok(synth):
    return Tokenizer(synth / "tokenizer.model")


def test_a_few_steps_lower_the_loss(pretrained):
    losses = [json.loads(l)["loss"] for l in (pretrained / "llm" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in l]
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_the_stand_ins_load_as_a_llama_folder_and_a_clip_folder(pretrained):
    """OUT/llm is what Llama.from_hf reads (and train.py --llm-init), OUT/vit what VisionTransformer.from_clip reads
    (and --vit-init), with the tiny preset's shapes."""
    llm = Llama.from_hf(pretrained / "llm")
    assert llm.cfg.hidden_size == OwlConfig.preset("tiny").text.hidden_size
    assert (pretrained / "llm" / "tokenizer.model").is_file()
    vit = VisionTransformer.from_clip(pretrained / "vit")
    assert vit.cfg == OwlConfig.preset("tiny").vision


def test_save_clip_writes_what_from_clip_reads_back_exactly(tmp_path):
    """The CLIP writer is the inverse of the CLIP reader (separate q, k, v from the head-interleaved fused weight),
    checked on random weights; a writer that kept the fused order would give another model."""
    torch.manual_seed(0)
    vit = VisionTransformer(OwlConfig.preset("tiny").vision)
    for p in vit.parameters():
        torch.nn.init.normal_(p)
    tiny.save_clip(vit, tmp_path)
    back = VisionTransformer.from_clip(tmp_path)
    assert all(torch.equal(t, back.state_dict()[n]) for n, t in vit.state_dict().items())
    sd = load_file(tmp_path / "model.safetensors")
    D = vit.cfg.hidden_size
    q = vit.state_dict()["encoder.layers.0.self_attn.query_key_value.weight"].reshape(vit.cfg.num_heads, 3, -1, D)
    assert torch.equal(sd["vision_model.encoder.layers.0.self_attn.q_proj.weight"], q[:, 0].reshape(D, D))


def test_the_llm_answers_the_heldout_questions_about_scenes_as_shape_vectors(synth, pretrained):
    """After pre-training the f_L is asked the held-out questions with each scene given as shape vectors (half as
    many as --eval-samples), and its accuracy by kind is kept beside the checkpoint."""
    table = json.loads((pretrained / "llm" / "accuracy_reading.json").read_text())
    asked = [json.loads(l)["kind"] for l in (synth / "heldout_reading.jsonl").read_text().splitlines()][:5]
    assert {k: n for k, (_, n) in table.items() if k != "all"} == {k: asked.count(k) for k in set(asked)}
    assert table["all"][1] == 5 and all(0 <= c <= n for c, n in table.values())


def test_a_shape_mark_becomes_one_input_vector_the_sum_of_its_word_embeddings(tok):
    """The f_L's chats give each shape as one vector: the mark's slot holds the sum of the embeddings of its words
    (counted here from the embedding table itself), the rest of the chat is embedded as usual, and the gradient
    reaches each word's embedding row. Stage 2's reader reads the same text as plain text."""
    chat = "Human: <shape red circle top><shape blue square left>\nHuman: Where is the red circle?\nAI: It is at the top."
    sample = tiny.shape_sample(tok, tiny.document_segments(chat), 256)
    prompt = (tok.encode("Human: ") + [synthetic.SHAPE_ID, synthetic.SHAPE_ID]
              + tok.encode("\nHuman: Where is the red circle?\nAI: "))
    answer = tok.encode("It is at the top.") + [tok.eos_id]
    assert sample.ids == [tok.bos_id] + prompt + answer
    assert sample.labels == [-100] * (1 + len(prompt)) + answer
    assert sample.shapes == [tok.encode("red circle top"), tok.encode("blue square left")]
    plain = data.build_sample(tok, tiny.document_segments(chat), [], 0, 256)
    assert synthetic.SHAPE_ID not in plain.ids

    model = Llama(OwlConfig.preset("tiny").text)
    model.init_weights()
    ids, labels, _, kept = data.collate([sample, sample], None, None, "cpu")
    x = tiny.shape_embeddings(model, ids, tiny.shape_tensor([w for s in kept for w in s.shapes], "cpu"))
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


def test_a_scene_spread_over_slots_keeps_its_shapes_in_order_and_its_blanks_are_noise_the_size_of_a_shape(tok):
    """The reading chats give a scene as f_K's 16 queries will: 16 slots, the shapes in their order each in one
    slot, blank slots between them at random places; a blank slot's vector is noise as long as the sample's shape
    vectors on average, drawn from the blank's own seed: the same in any batch, another for another blank."""
    chat = "Human: <shape red circle top><shape blue square left>\nHuman: Describe the image.\nAI: Two shapes."
    layouts = set()
    for seed in range(20):
        sample = tiny.shape_sample(tok, tiny.document_segments(chat), 256, 16, random.Random(seed))
        slots = [i for i, t in enumerate(sample.ids) if t == synthetic.SHAPE_ID]
        assert slots == list(range(slots[0], slots[0] + 16)) and len(sample.shapes) == 16
        assert [w for w in sample.shapes if w[0] >= 0] == [tok.encode("red circle top"), tok.encode("blue square left")]
        layouts.add(tuple(w[0] >= 0 for w in sample.shapes))
        assert sample.ids[slots[-1] + 1:] == tiny.shape_sample(tok, tiny.document_segments(chat), 256).ids[
            slots[0] + 2:]  # the chat after the scene is unchanged
    assert len(layouts) > 10  # the blanks' places vary

    model = Llama(OwlConfig.preset("tiny").text)
    model.init_weights()
    other = tiny.shape_sample(tok, tiny.document_segments(chat.replace("red circle", "green triangle")), 256, 16,
                              random.Random(99))

    def embedded(samples):
        ids, _, _, kept = data.collate(samples, None, None, "cpu")
        x = tiny.shape_embeddings(model, ids, tiny.shape_tensor([w for s in kept for w in s.shapes], "cpu"))
        return [x[i, ids[i] == synthetic.SHAPE_ID] for i in range(len(samples))]
    [x], [x_again, y] = embedded([sample]), embedded([sample, other])
    table = model.model.embed_tokens.weight
    full = [i for i, w in enumerate(sample.shapes) if w[0] >= 0]
    blank = [i for i, w in enumerate(sample.shapes) if w[0] < 0]
    for i in full:
        torch.testing.assert_close(x[i], table[sample.shapes[i]].sum(0))
    assert 0.7 < x[blank].norm(dim=-1).mean() / x[full].norm(dim=-1).mean() < 1.3
    torch.testing.assert_close(x_again, x)  # the same noise beside another sample
    assert len({tuple(v.tolist()) for v in x[blank]}) == 14  # and another for each blank
    other_blank = y[[i for i, w in enumerate(other.shapes) if w[0] < 0]]
    assert (x[blank] @ other_blank.T).abs().max() < 0.5 * x[blank].norm(dim=-1).max() ** 2


def test_the_llm_drills_the_look_up_first_then_trains_on_the_whole_mix(synth, tok):
    """--drill-steps N: the first N global batches are drill chats alone, the rest mix every source. The reading
    and list chats' scenes are spread over the slots, the drill's are bare."""
    sources = tiny.llm_sources(synth, tok, 256, 16)
    assert [w for _, w in sources] == [1.0, 3.0, 2.0, 2.0]
    for chats in (sources[1][0], sources[2][0]):
        assert all(s.ids.count(synthetic.SHAPE_ID) == len(s.shapes) == 16 for s in chats)
    assert all(sum(w[0] >= 0 for w in s.shapes) >= 2 for s in sources[2][0])  # a list: several shapes
    assert not any(synthetic.SHAPE_ID in s.ids for s in sources[0][0])
    drill = {id(s) for s in sources[-1][0]}
    order = tiny.llm_order(sources, 6, 8, 4, 1337)
    assert len(order) == 48 and all(id(s) in drill for s in order[:32])
    assert any(id(s) not in drill for s in order[32:]) and any(id(s) in drill for s in order[32:])
    assert all(s.shapes and min(w[0] for w in s.shapes) >= 0 and s.ids.count(synthetic.SHAPE_ID) == len(s.shapes) <= 4
               for s in order[:32])
    mixed = tiny.llm_order(sources, 6, 8, 0, 1337)
    assert any(id(s) not in drill for s in mixed[:32])


def test_vision_labels_name_the_patches_each_shape_covers():
    # a 64 px canvas is the tiny f_V's own size, so no resize: a square spanning pixels 8..32 fills the 8 px patches
    # of rows and columns 1-3 and touches column 4 with one pixel column (8 px, under 15% of 64); a circle elsewhere
    scene = {"width": 64, "height": 64, "background": [255, 255, 255], "shapes": [
        {"color": "red", "shape": "square", "position": "left", "center": [20, 20], "size": 24, "fill": [200, 40, 40],
         "angle": 0.0},
        {"color": "blue", "shape": "circle", "position": "right", "center": [52, 52], "size": 16, "fill": [40, 40, 200],
         "angle": 0.0}]}
    pixels, objects, in_view = tiny.labelled_image(scene, ImageTransform(64), 8, None)
    assert pixels.shape == (3, 64, 64) and in_view == 2
    assert [f for _, f in objects] == [(synthetic.SHAPES.index("square"), list(synthetic.COLORS).index("red"),
                                        synthetic.POSITIONS.index("top left")),
                                       (synthetic.SHAPES.index("circle"), list(synthetic.COLORS).index("blue"),
                                        synthetic.POSITIONS.index("bottom right"))]
    square = {(int(i) // 8, int(i) % 8) for i in objects[0][0].nonzero()}
    assert square == {(r, c) for r in (1, 2, 3) for c in (1, 2, 3)}
    circle = {(int(i) // 8, int(i) % 8) for i in objects[1][0].nonzero()}
    assert circle and all(r >= 5 and c >= 5 for r, c in circle)


def test_vision_labels_name_the_place_a_shape_has_after_the_crop():
    """The recorded place is where the shape is in the uncropped scene; a crop can move it into another third,
    and the label must follow what the f_V sees (the middle of the shape's pixels in the crop)."""
    scene = {"width": 120, "height": 120, "background": [255, 255, 255], "smooth": False, "shapes": [
        {"color": "red", "shape": "square", "position": "center", "center": [56, 56], "size": 12, "fill": [200, 40, 40],
         "angle": 0.0}]}
    rng, seen = random.Random(0), set()
    for _ in range(60):
        pixels, objects, _ = tiny.labelled_image(scene, ImageTransform(64), 8, rng)
        red = pixels[0] - pixels[2] > 1.0  # the square's pixels in what the f_V gets (normalised red minus blue)
        ys, xs = (red.nonzero().float() + 0.5).mean(0) / 64
        thirds = ("top", "", "bottom")[int(ys * 3)], ("left", "", "right")[int(xs * 3)]
        assert synthetic.POSITIONS[objects[0][1][2]] == (" ".join(w for w in thirds if w) or "center")
        seen.add(synthetic.POSITIONS[objects[0][1][2]])
    # a crop of half the area that keeps the square near one of its sides moves it out of the centre third
    assert "center" in seen and len(seen) > 1


def test_vision_pretraining_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    vit = VisionTransformer(OwlConfig.preset("tiny").vision)
    vit.init_weights()
    heads = torch.nn.ModuleList([torch.nn.Linear(128, sum(map(len, tiny.FACTS))), torch.nn.Linear(128, 5)])
    rng = random.Random(0)
    batch = [tiny.labelled_image(synthetic.random_scene(rng), ImageTransform(64), 8, None) for _ in range(8)]
    opt = torch.optim.AdamW([*vit.parameters(), *heads.parameters()], lr=1e-3)
    first = None
    for _ in range(25):
        loss, _, n = tiny.vision_loss(vit, heads, batch, "cpu")
        first = first if first is not None else loss.item()
        opt.zero_grad()
        (loss / (n + len(batch))).backward()
        opt.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("case", ["no held-out file", "no checkpoint", "no data"])
def test_score_and_pretrain_with_a_missing_file_exit_2_with_one_sentence(synth, tmp_path, capsys, case):
    argv = {"no held-out file": ["score", "--checkpoint", synth, "--heldout", tmp_path / "nope.jsonl"],
            "no checkpoint": ["score", "--checkpoint", tmp_path, "--heldout", synth / "heldout.jsonl"],
            "no data": ["pretrain", "--data-dir", tmp_path, "--out-dir", tmp_path / "out"]}[case]
    said = {"no held-out file": "does not exist", "no checkpoint": "is not a checkpoint folder",
            "no data": "python synthetic.py --out"}[case]
    with pytest.raises(SystemExit) as e:
        tiny.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err and said in err, err


def test_score_writes_the_accuracy_by_kind_and_each_answer(synth, stage1):
    tiny.main(["score", "--checkpoint", str(stage1 / "stage1"), "--heldout", str(synth / "heldout.jsonl"),
               "--eval-samples", "5", "--device", "cpu"])
    # named after the held-out file's folder, so several test sets can be kept side by side
    table = json.loads((stage1 / "stage1" / f"accuracy_{synth.name}.json").read_text())
    answers = [json.loads(l) for l in (stage1 / "stage1" / f"answers_{synth.name}.jsonl").read_text().splitlines()]
    assert table["all"][1] == len(answers) == 5 and sum(a["correct"] for a in answers) == table["all"][0]


def test_score_answers_in_batches_as_one_question_at_a_time_and_writes_the_table(synth, stage1):
    """tiny.py score generates the held-out answers 32 at a time; greedy, each must be the answer the checkpoint
    gives that question alone, and the table counts what score_answer says of each."""
    from owl import Owl, load_image, render_prompt
    ckpt, heldout = stage1 / "stage1", synth / "heldout.jsonl"
    table = tiny.evaluate(ckpt, heldout, 40)
    name = heldout.parent.name  # the files are named after the held-out folder
    written = [json.loads(line) for line in (ckpt / f"answers_{name}.jsonl").read_text().splitlines()]
    model = Owl.from_pretrained(ckpt)
    assert len(written) == 10
    for r in written:
        pixels = torch.stack([load_image(str(synth / p), model.image_transform) for p in r["image"]])
        ids = model.prompt_ids(render_prompt(r["question"], len(r["image"])))
        alone = model.tokenizer.decode(list(model.generate(ids, pixels, max_new_tokens=48)))
        assert r["answer"] == alone and r["correct"] == synthetic.score_answer(r["kind"], alone, r["target"])
    assert table["all"] == (sum(r["correct"] for r in written), 10)
    assert json.loads((ckpt / f"accuracy_{name}.json").read_text())["all"] == list(table["all"])



def test_a_scene_whose_only_shape_owns_no_patch_is_learnt_from_its_count_alone():
    """A small shape on a large canvas, squashed to the f_V's 64 px, can cover under 15% of every patch: no shape to
    name, the count still to learn (the held-out check meets such scenes one at a time)."""
    scene = {"width": 256, "height": 256, "background": [255, 255, 255], "smooth": False, "shapes": [
        {"color": "red", "shape": "circle", "position": "center", "center": [128, 128], "size": 8,
         "fill": [200, 40, 40], "angle": 0.0}]}
    item = tiny.labelled_image(scene, ImageTransform(64), 8, None)
    assert item[1] == []
    vit = VisionTransformer(OwlConfig.preset("tiny").vision)
    vit.init_weights()
    heads = torch.nn.ModuleList([torch.nn.Linear(128, sum(map(len, tiny.FACTS))), torch.nn.Linear(128, 5)])
    loss, right, n = tiny.vision_loss(vit, heads, [item], "cpu")
    assert torch.isfinite(loss) and (right, n) == (0, 0)
    loss.backward()
    assert heads[1].weight.grad is not None and heads[0].weight.grad is None


def test_the_vision_pretraining_trains_each_step_on_a_batch_of_its_own(synth, tmp_path, monkeypatch):
    """The next batch is labelled in a thread while a step trains: every step still gets its own batch, once."""
    steps, per_step, seen = 6, 4, []

    def named(scene, transform, patch, rng, folder=None):
        return scene["image"], rng and rng.random()  # the scene, and the augmentation draw of its step

    def loss(vit, heads, batch, device):
        if vit.training:
            seen.append(tuple(batch))
        return sum(p.sum() for p in heads.parameters()) * 0.0, 0, 0

    monkeypatch.setattr(tiny, "labelled_image", named)
    monkeypatch.setattr(tiny, "vision_loss", loss)
    args = tiny.parse_args(["pretrain", "--data-dir", str(synth), "--out-dir", str(tmp_path),
                            "--vision-steps", str(steps), "--batch-size", str(per_step)])
    tiny.pretrain_vision(args, 0, 1, "cpu")
    assert len(seen) == steps and all(len(b) == per_step for b in seen)
    assert len(set(seen)) == steps  # no batch trained twice (each step's augmentation draws differ)


def test_the_stand_ins_trained_side_by_side_are_those_trained_one_after_the_other(synth, tmp_path):
    """With two threads, `pretrain` trains the f_V in a second process beside the f_L, one thread each, and the f_L
    takes both back once the f_V is done; with one, it trains them in turn. The f_V, on one thread either way, is
    the same bit for bit; the f_L learns the same, up to the order its sums take over one or two threads."""
    runs = {}
    for threads in ("2", "1"):
        out = tmp_path / threads
        p = subprocess.run([sys.executable, str(ROOT / "tiny.py"), "pretrain", "--data-dir", str(synth), "--out-dir",
                            str(out), "--steps", "6", "--drill-steps", "2", "--vision-steps", "3", "--eval-samples",
                            "4", *SMALL], env={**os.environ, "OMP_NUM_THREADS": threads},
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert p.returncode == 0, p.stderr[-3000:]
        losses = [json.loads(line)["loss"] for line in (out / "llm" / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in line]
        runs[threads] = losses, load_file(out / "vit" / "model.safetensors")
    (losses, vit), (losses_1, vit_1) = runs["2"], runs["1"]
    assert vit.keys() == vit_1.keys() and all(torch.equal(vit[k], vit_1[k]) for k in vit)
    assert len(losses) == len(losses_1) == 6
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_1), rtol=1e-4, atol=0)
