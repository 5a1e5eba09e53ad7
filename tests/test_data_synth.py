"""The synthetic shapes data: deterministic, true to its facts, held-out apart, every format read the same way."""
import hashlib
import json
import os
import random
import re
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import synthetic  # noqa: E402
import tiny  # noqa: E402
from llama import Tokenizer  # noqa: E402

SMALL = ["--n-train", "40", "--n-owl", "40", "--n-llava", "20", "--n-alpaca", "30", "--n-heldout", "25",
         "--n-reading", "30", "--n-drill", "40", "--n-lists", "30"]


def _synth(root, seed):
    out = str(root / f"seed{seed}")
    synthetic.main(["--out", out, "--seed", str(seed), *SMALL])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    a, again = _synth(root, 0), _synth(root / "again", 0)
    more_train = str(root / "more_train")
    synthetic.synth(more_train, seed=0, n_train=45, n_owl=5, n_llava=5, n_alpaca=5, n_heldout=25, n_reading=5,
                    n_drill=5, n_lists=5)
    return {"a": a, "again": again, "other": _synth(root, 1), "more_train": more_train}


def _files(folder):
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_same_seed_same_files_other_seed_other_files(runs):
    a, again, other = (_files(runs[k]) for k in ("a", "again", "other"))
    assert a == again
    assert {"stage1.jsonl", "stage1_single.jsonl", "stage2_owl.jsonl", "stage2_llava.json", "stage2_alpaca.json", "corpus.txt",
            "reading.jsonl", "heldout.jsonl", "tokenizer.model", "scenes.jsonl"} <= set(a)
    assert sum(name.startswith("images/") for name in a) == 40 + 25
    for name in ("stage1.jsonl", "stage2_owl.jsonl", "heldout.jsonl", "images/s_00000.png", "images/h_00000.png"):
        assert a[name] != other[name], name


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        synthetic.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--seed", "--n-train", "--n-owl", "--n-llava", "--n-alpaca", "--n-heldout", "--n-reading",
                 "--n-drill", "--n-lists"):
        assert flag in text


def _nearest_color(rgb):
    shades = [(c, shade) for c, all_shades in synthetic.SHADES.items() for shade in all_shades]
    return min(shades, key=lambda cs: sum((x - y) ** 2 for x, y in zip(rgb, cs[1])))[0]


def test_smooth_scenes_blend_their_edges_and_keep_their_fills():
    """A smooth scene has anti-aliased edges (colours between fill and background) and the same shapes: the same
    fills, and the same pixels (up to its edges) as the scene drawn sharp."""
    rng = random.Random(7)
    scene = synthetic.random_scene(rng, 3)
    sharp = np.asarray(synthetic.draw_scene({**scene, "smooth": False}), dtype=np.int64)
    smooth = np.asarray(synthetic.draw_scene({**scene, "smooth": True}), dtype=np.int64)
    pure = {tuple(scene["background"])} | {tuple(s["fill"]) for s in scene["shapes"]}
    assert {tuple(p) for p in sharp.reshape(-1, 3)} <= pure
    assert len({tuple(p) for p in smooth.reshape(-1, 3)} - pure) > 10
    assert (np.abs(sharp - smooth).max(-1) > 0).mean() < 0.1
    for s in scene["shapes"]:
        assert tuple(smooth[s["center"][1], s["center"][0]]) == tuple(s["fill"])
    scenes = [synthetic.random_scene(rng) for _ in range(400)]
    assert 0.2 < sum(sc["smooth"] for sc in scenes) / len(scenes) < 0.4
    fills = [s["fill"] for sc in scenes for s in sc["shapes"] if s["color"] == "blue"]
    assert any(f[0] < 20 and f[2] > 235 for f in fills)  # pure blue
    assert any(abs(f[0] - 45) <= 15 and abs(f[2] - 215) <= 15 for f in fills)  # the canonical one


def test_scenes_are_drawn_as_recorded(runs):
    for rec in _jsonl(os.path.join(runs["a"], "scenes.jsonl")):
        img = Image.open(os.path.join(runs["a"], rec["image"])).convert("RGB")
        w, h = img.size
        assert (w, h) == (rec["width"], rec["height"]) and 64 <= w <= 256 and 48 <= h <= 256 and 0.18 <= min(w, h) / max(w, h)
        assert img.getpixel((0, 0)) == tuple(rec["background"]) and min(rec["background"]) >= 200  # light
        shapes = rec["shapes"]
        assert 1 <= len(shapes) <= 4
        assert len({s["position"] for s in shapes}) == len(shapes)
        assert len({(s["color"], s["shape"]) for s in shapes}) == len(shapes)
        for s in shapes:
            cx, cy = s["center"]
            pixel = img.getpixel((cx, cy))
            assert _nearest_color(pixel) == s["color"]
            assert any(all(abs(p - q) <= 15 for p, q in zip(pixel, shade)) for shade in synthetic.SHADES[s["color"]])
            # the place is the third of the width and of the height the centre is in, named in plain words
            fx, fy = (cx + 0.5) / w, (cy + 0.5) / h
            column = "left" if fx < 1 / 3 else "right" if fx > 2 / 3 else ""
            row = "top" if fy < 1 / 3 else "bottom" if fy > 2 / 3 else ""
            assert s["position"] == (f"{row} {column}".strip() or "center")
            biggest = 0.45 if len(shapes) == 1 else 0.30
            assert 8 <= s["size"] <= max(8, biggest * min(w, h) + 1) and abs(s["angle"]) <= 15


def test_shapes_never_overlap_and_sizes_vary():
    rng = random.Random("overlap")
    scenes = [synthetic.random_scene(rng) for _ in range(3000)]
    for sc in scenes:
        shapes = sc["shapes"]
        assert all(synthetic._apart(a, b) for i, a in enumerate(shapes) for b in shapes[i + 1:])
    assert len({(sc["width"], sc["height"]) for sc in scenes}) > 1000
    relative = [s["size"] / min(sc["width"], sc["height"]) for sc in scenes for s in sc["shapes"]]
    assert min(relative) < 0.15 and max(relative) > 0.4


def test_shapes_sit_anywhere_not_in_slots():
    """Every one of the nine places is used, by 1-shape and 4-shape scenes alike, and centres spread within a place
    instead of sitting on a few spots (counting must not be learnt as "which slots are filled")."""
    rng = random.Random("anywhere")
    scenes = [synthetic.random_scene(rng) for _ in range(2000)]
    for n in (1, 4):
        used = {s["position"] for sc in scenes if len(sc["shapes"]) == n for s in sc["shapes"]}
        assert used == set(synthetic.POSITIONS), n
    corners = [sc for sc in scenes if {s["position"] for s in sc["shapes"]} ==
               {"top left", "top right", "bottom left", "bottom right"}]
    assert corners  # all four corners filled, as another drawing program might place them
    fx = [s["center"][0] / sc["width"] for sc in scenes for s in sc["shapes"] if s["position"] == "top left"]
    assert len({round(f, 2) for f in fx}) > 15 and max(fx) - min(fx) > 0.15
    assert [synthetic.place(x, y) for x, y in ((0.1, 0.1), (0.5, 0.5), (0.9, 0.5), (0.5, 0.95), (0.34, 0.66))] == \
        ["top left", "center", "right", "bottom", "center"]


def test_heldout_is_its_own_seed_and_shares_no_image(runs):
    folder = runs["a"]
    heldout = _jsonl(os.path.join(folder, "heldout.jsonl"))
    files = _files(folder)
    train = {files[r["image"]] for r in _jsonl(os.path.join(folder, "stage1.jsonl"))}
    held = {files[r["image"][0]] for r in heldout}
    assert len(held) == len(heldout) and not held & train
    kinds = [r["kind"] for r in heldout]
    assert {kinds.count(k) for k in ("color", "shape", "count", "position", "describe")} == {5}
    # Its own seed: drawing more training data leaves the held-out split as it was.
    assert files["heldout.jsonl"] == _files(runs["more_train"])["heldout.jsonl"]
    scenes = {r["image"]: r for r in _jsonl(os.path.join(folder, "scenes.jsonl"))}
    for r in heldout:
        shapes = scenes[r["image"][0]]["shapes"]
        assert synthetic.score_answer(r["kind"], r["answer"], r["target"]), r
        if r["kind"] in ("color", "shape"):
            assert len(shapes) == 1 and r["target"][r["kind"]] == shapes[0][r["kind"]]
        if r["kind"] == "count":
            assert r["target"]["count"] == len(shapes)


CONV = [("<image>\nWhere is the red circle?", "The red circle is at the left."),
        ("How many shapes are there?", "There are 2 shapes.")]


def test_three_formats_parse_to_the_same_conversation(tmp_path):
    with open(tmp_path / "c.jsonl", "w") as f:
        f.write(json.dumps({"image": ["images/x.png"], "text": synthetic.render_owl_text(CONV), "task_type": "llava_sft"}))
    messages = [{"from": who, "value": v} for q, a in CONV for who, v in (("human", q), ("gpt", a))]
    with open(tmp_path / "c.json", "w") as f:
        json.dump([{"image": "images/x.png", "conversations": messages}], f)
    owl, llava = data.load_owl_jsonl(tmp_path / "c.jsonl"), data.load_llava_json(tmp_path / "c.json")
    expected = data.Conversation([str(tmp_path / "images" / "x.png")], CONV)
    assert owl == llava == [expected]
    # LLaVA's tag after the question lands in front, as the template shows it.
    moved = [{"from": "human", "value": "Where is the red circle?\n<image>"}, messages[1]]
    with open(tmp_path / "m.json", "w") as f:
        json.dump([{"image": "images/x.png", "conversations": moved}], f)
    assert data.load_llava_json(tmp_path / "m.json")[0].turns == CONV[:1]
    # Text-only: Alpaca and an image-less official line.
    with open(tmp_path / "t.json", "w") as f:
        json.dump([{"instruction": "What is 2 plus 1?", "input": "", "output": "2 plus 1 is 3."},
                   {"instruction": "Which number is bigger?", "input": "3 and 7", "output": "7 is bigger than 3."}], f)
    with open(tmp_path / "t.jsonl", "w") as f:
        for turns in ([("What is 2 plus 1?", "2 plus 1 is 3.")], [("Which number is bigger?\n3 and 7", "7 is bigger than 3.")]):
            f.write(json.dumps({"text": synthetic.render_owl_text(turns), "task_type": "llava_sft"}) + "\n")
    assert data.load_alpaca_json(tmp_path / "t.json") == data.load_owl_jsonl(tmp_path / "t.jsonl")


def test_two_images_and_the_official_text_round_trip():
    text = (data.SYSTEM + "\nHuman: <image>\nHuman: <image>\nHuman: Which image has more shapes?\n"
            "AI: The first image has more shapes.")
    turns = data.parse_owl_text(text)
    assert turns == [("<image>\n<image>\nWhich image has more shapes?", "The first image has more shapes.")]
    assert synthetic.render_owl_text(turns) == text


def test_generated_files_load_completely(runs):
    folder = runs["a"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no entry of our own data may be skipped
        owl = data.load_owl_jsonl(os.path.join(folder, "stage2_owl.jsonl"))
        llava = data.load_llava_json(os.path.join(folder, "stage2_llava.json"))
        alpaca = data.load_alpaca_json(os.path.join(folder, "stage2_alpaca.json"))
        captions = data.load_captions_jsonl(os.path.join(folder, "stage1.jsonl"))
    assert (len(owl), len(llava), len(alpaca), len(captions)) == (40, 20, 30, 40)
    assert all(os.path.isfile(p) for c in owl + llava for p in c.images)
    assert all(os.path.isabs(p) and os.path.isfile(p) for p, _ in captions)
    texts = [r["text"] for r in _jsonl(os.path.join(folder, "stage2_owl.jsonl"))]
    assert [synthetic.render_owl_text(c.turns) for c in owl] == texts
    assert any(len(c.images) == 2 for c in owl) and any(len(c.turns) > 1 for c in owl + llava)


def _marked_shapes(text):
    """The (colour, kind, place) of each shape mark of a chat's first line, and that line's text without them."""
    shapes = [tuple(m.split(" ", 2)) for m in synthetic.SHAPE_MARK.findall(text)]
    return shapes, synthetic.SHAPE_MARK.sub("", text)


def test_reading_chats_answer_from_the_scene_in_their_first_line(runs):
    """Stage 0's chats put a scene, a shape mark a shape, where stage 2 puts an image; their answers follow from
    those shapes (the count from how many there are)."""
    docs = [r["text"] for r in _jsonl(os.path.join(runs["a"], "reading.jsonl"))]
    assert len(docs) == 30 and any(d.startswith(data.SYSTEM) for d in docs) and any(d.startswith("Human: ") for d in docs)
    for doc in docs:
        body = doc[len(data.SYSTEM) + 1:] if doc.startswith(data.SYSTEM) else doc
        described, *turns = body.split("\nHuman: ")
        shapes, rest = _marked_shapes(described)
        assert rest == "Human: " and 1 <= len(shapes) <= 4 and len({p for _, _, p in shapes}) == len(shapes)
        assert [p for _, _, p in shapes] == sorted((p for _, _, p in shapes), key=synthetic.POSITIONS.index)
        facts = {w for shape in shapes for w in " ".join(shape).split()} | {str(len(shapes))}
        for turn in turns:
            question, answer = turn.split("\nAI: ")
            # every colour, shape, number and position the answer names is in the description
            named = {w for w in synthetic._words(answer)
                     if w in synthetic.COLORS or w in synthetic.SHAPES or w in synthetic.POSITION_WORDS or w.isdigit()}
            assert named and named <= facts, (described, question, answer)


def test_drill_chats_ask_where_one_shape_of_several_is(runs):
    """Stage 0's look-up drill: 2-4 shapes, one question naming one of them by colour and kind, its place answered."""
    docs = [r["text"] for r in _jsonl(os.path.join(runs["a"], "drill.jsonl"))]
    assert len(docs) == 40
    for doc in docs:
        described, question, answer = re.fullmatch(r"(.*)\nHuman: (.*)\nAI: (.*)", doc).groups()
        shapes, rest = _marked_shapes(described)
        assert rest == "Human: " and 2 <= len(shapes) <= 4
        asked = set(synthetic._words(question))
        named = [s for s in shapes if {s[0], s[1]} <= asked]  # (colour, kind) pairs are unique in a scene
        assert len(named) == 1, doc
        assert synthetic.score_answer("position", answer, dict(zip(("color", "shape", "position"), named[0]))), doc


def test_list_chats_describe_a_scene_of_several_shapes_naming_each_once_in_reading_order(runs):
    """Stage 0's list drill: 2-4 shapes, one request for a description, answered with the count and every shape's
    colour, kind and place, each once, in the order the marks give them (reading order)."""
    docs = [r["text"] for r in _jsonl(os.path.join(runs["a"], "lists.jsonl"))]
    assert len(docs) == 30
    for doc in docs:
        described, question, answer = re.fullmatch(r"(.*)\nHuman: (.*)\nAI: (.*)", doc).groups()
        shapes, rest = _marked_shapes(described)
        assert rest == "Human: " and 2 <= len(shapes) <= 4 and question in synthetic.QUESTIONS["describe"]
        target = {"count": len(shapes), "shapes": [dict(zip(("color", "shape", "position"), s)) for s in shapes]}
        assert synthetic.score_answer("describe", answer, target), doc
        items = [f"a {c} {k} at the {p}" for c, k, p in shapes]
        at = [answer.index(item) for item in items]
        assert at == sorted(at) and all(answer.count(item) == 1 for item in items), doc


def test_heldout_reading_asks_the_heldout_questions_about_the_scene_as_shape_marks(runs):
    """Stage 0's reading check: each held-out question again, its image replaced by its shapes' marks."""
    heldout = _jsonl(os.path.join(runs["a"], "heldout.jsonl"))
    reading = _jsonl(os.path.join(runs["a"], "heldout_reading.jsonl"))
    assert [(r["question"], r["kind"], r["target"]) for r in reading] == \
        [(h["question"], h["kind"], h["target"]) for h in heldout]
    scenes = {r["image"]: r for r in _jsonl(os.path.join(runs["a"], "scenes.jsonl"))}
    for r, h in zip(reading, heldout):
        shapes = scenes[h["image"][0]]["shapes"]
        marked, rest = _marked_shapes(r["scene"])
        assert rest == "" and sorted(marked) == sorted((s["color"], s["shape"], s["position"]) for s in shapes)


def test_a_tiny_llm_chat_is_learnt_on_its_answers_tokenised_as_stage2_does(runs):
    tok = Tokenizer(os.path.join(runs["a"], "tokenizer.model"))
    turns = [("What color is the shape?", "The shape is red."), ("What shape is it?", "It is a circle.")]
    doc = data.SYSTEM + "\nHuman: There is 1 shape: a red circle at the top." + "".join(
        data.render_turn(q) + a for q, a in turns)
    got = data.build_sample(tok, tiny.document_segments(doc), [], 65, 512)
    # the stage-2 sample of the same conversation with the description in a question's place
    conv = data.Conversation([], [("There is 1 shape: a red circle at the top.\nWhat color is the shape?", turns[0][1]),
                                  turns[1]])
    want = data.build_sample(tok, data.conversation_segments(conv), [], 65, 512)
    labelled = [t for t in got.labels if t != -100]
    assert labelled == [t for t in want.labels if t != -100]
    assert labelled == tok.encode("The shape is red.") + [tok.eos_id] + tok.encode("It is a circle.") + [tok.eos_id]
    assert got.ids.count(tok.eos_id) == 2  # one after each answer
    plain = data.build_sample(tok, tiny.document_segments("There is 1 shape."), [], 65, 512)
    assert plain.labels[1:] == plain.ids[1:]  # a plain document is learnt whole


def test_malformed_entries_are_skipped_and_counted(tmp_path):
    good = json.dumps({"image": ["a.png"], "text": synthetic.render_owl_text(CONV)})
    lines = [good, "{not json", json.dumps({"image": ["a.png"]}),  # no text
             json.dumps({"image": ["a.png", "b.png"], "text": synthetic.render_owl_text(CONV)}),  # 1 tag, 2 images
             json.dumps({"text": data.SYSTEM + "\nHuman: hi\nAI: "}),  # empty answer
             json.dumps({"text": data.SYSTEM + "\nHuman: hi"}), good]  # no AI turn
    (tmp_path / "o.jsonl").write_text("\n".join(lines) + "\n\n")
    with pytest.warns(UserWarning, match="skipped 5 malformed of 7 entries") as record:
        assert len(data.load_owl_jsonl(tmp_path / "o.jsonl")) == 2
    assert len(record) == 1  # one summary, not one per line
    llava = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
             {"image": "a.png", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "<image>\nq"}]},
             {"image": "a.png"}, "a string"]
    (tmp_path / "l.json").write_text(json.dumps(llava))
    with pytest.warns(UserWarning, match="skipped 3 malformed of 4"):
        assert len(data.load_llava_json(tmp_path / "l.json")) == 1
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "q", "output": "a"}, {"instruction": "q"}]))
    with pytest.warns(UserWarning, match="skipped 1 malformed of 2"):
        assert data.load_alpaca_json(tmp_path / "a.json")[0].turns == [("q", "a")]
    (tmp_path / "s.jsonl").write_text('{"image": "a.png", "caption": "1 shape."}\n{"image": "a.png"}\n')
    with pytest.warns(UserWarning, match="skipped 1 malformed of 2"):
        assert data.load_captions_jsonl(tmp_path / "s.jsonl") == [(str(tmp_path / "a.png"), "1 shape.")]


def test_score_answer_accepts_right_and_rejects_wrong_or_contradicting():
    assert synthetic.score_answer("color", "The shape is red.", {"color": "red"})
    assert not synthetic.score_answer("color", "The shape is blue.", {"color": "red"})
    assert not synthetic.score_answer("color", "It is red or blue.", {"color": "red"})
    assert synthetic.score_answer("shape", "It is a triangle.", {"shape": "triangle"})
    assert not synthetic.score_answer("shape", "It is a square.", {"shape": "triangle"})
    assert synthetic.score_answer("count", "There are 3 shapes.", {"count": 3})
    assert synthetic.score_answer("count", "There are three shapes.", {"count": 3})
    assert not synthetic.score_answer("count", "There are 2 shapes.", {"count": 3})
    assert not synthetic.score_answer("count", "There are 3 or 4 shapes.", {"count": 3})
    target = {"color": "red", "shape": "circle", "position": "left"}
    assert synthetic.score_answer("position", "The red circle is at the left.", target)
    assert not synthetic.score_answer("position", "The red circle is at the left and right.", target)
    assert not synthetic.score_answer("position", "It is at the top.", target)
    corner = {"color": "red", "shape": "circle", "position": "top left"}
    assert synthetic.score_answer("position", "The red circle is at the top left.", corner)
    assert not synthetic.score_answer("position", "The red circle is at the top.", corner)
    assert not synthetic.score_answer("position", "It is at the top right.", corner)
    assert not synthetic.score_answer("position", "It is at the left.", corner)
    scene = {"count": 2, "shapes": [{"color": "red", "shape": "circle", "position": "left"},
                                    {"color": "blue", "shape": "square", "position": "top"}]}
    assert synthetic.score_answer("describe", "2 shapes: a red circle at the left and a blue square at the top.", scene)
    assert synthetic.score_answer("describe", "There are two shapes: a blue square and a red circle.", scene)
    assert not synthetic.score_answer("describe", "2 shapes: a red circle at the left.", scene)
    assert not synthetic.score_answer("describe", "2 shapes: a blue circle and a red square.", scene)
    assert not synthetic.score_answer("describe", "3 shapes: a red circle, a blue square and a green triangle.", scene)
    assert not synthetic.score_answer("describe", "2 shapes: a red circle at the bottom and a blue square.", scene)
    table = synthetic.accuracy_table([("color", True), ("color", False), ("count", True)])
    assert table == {"color": (1, 2), "count": (1, 1), "all": (2, 3)}


def test_tokenizer_round_trips_every_text_with_llama_ids(runs):
    import sentencepiece as spm
    folder = runs["a"]
    sp = spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert 100 < sp.get_piece_size() <= 512
    convs = (data.load_owl_jsonl(os.path.join(folder, "stage2_owl.jsonl"))
             + data.load_llava_json(os.path.join(folder, "stage2_llava.json"))
             + data.load_alpaca_json(os.path.join(folder, "stage2_alpaca.json")))
    texts = [s for c in convs for turn in c.turns for s in turn] + [data.SYSTEM]
    texts += [c for _, c in data.load_captions_jsonl(os.path.join(folder, "stage1.jsonl"))]
    texts += [r["answer"] for r in _jsonl(os.path.join(folder, "heldout.jsonl"))]
    texts += [synthetic.render_owl_text(c.turns) for c in convs]  # the template's "\nHuman: " and "AI: " too
    for text in texts:
        ids = sp.encode(text)
        assert 0 not in ids and sp.decode(ids) == text, text
    for word in [*synthetic.COLORS, *synthetic.SHAPES, *synthetic.POSITION_WORDS]:
        assert len(sp.encode(word)) == 1, word
    assert len(sp.encode("12 plus 30")) > 3  # digits split one by one, any number tokenizes


def test_stage1_single_repeats_exactly_the_single_shape_captions(runs):
    folder = runs["a"]
    scenes = {r["image"]: r for r in _jsonl(os.path.join(folder, "scenes.jsonl"))}
    stage1 = _jsonl(os.path.join(folder, "stage1.jsonl"))
    single = _jsonl(os.path.join(folder, "stage1_single.jsonl"))
    assert single and single == [r for r in stage1 if len(scenes[r["image"]]["shapes"]) == 1]
    assert all(r["caption"].split(":")[0].endswith("1 shape") for r in single)


@pytest.fixture(scope="module")
def spm_tok(tokenizer_model):
    return Tokenizer(tokenizer_model)


@pytest.mark.parametrize("into_second", [1, 40, 64])
def test_a_cut_inside_a_later_image_drops_that_image_and_keeps_the_sample(spm_tok, into_second):
    """Two turns, an image each; --seq-len ends inside the second image's 65 slots. The sample keeps the first
    image and its answer, and no slot of the second image: the model would otherwise be handed part of an image."""
    conv = data.Conversation(["a.png", "b.png"], [("<image>\nWhat is it?", "A red circle."),
                                                  ("<image>\nAnd this one?", "A blue square.")])
    full = data.build_sample(spm_tok, data.conversation_segments(conv), conv.images, 65, 1024)
    second = [i for i, t in enumerate(full.ids) if t == data.IMAGE_ID][65]  # the first slot of the second image
    cut = data.build_sample(spm_tok, data.conversation_segments(conv), conv.images, 65, second + into_second)
    assert cut is not None and cut.images == ["a.png"]
    assert cut.ids == full.ids[:second] and cut.ids.count(data.IMAGE_ID) == 65
    assert cut.labels == full.labels[:second] and spm_tok.encode("A red circle.")[0] in cut.labels


def test_a_llava_json_whose_first_entry_is_malformed_keeps_every_good_entry(tmp_path, spm_tok):
    """The format is told apart entry by entry: a broken first entry is skipped and counted, not taken as a sign
    that the whole file is Alpaca."""
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
    entries = [{"image": "a.png", "conversation": good["conversations"]}, good, good,
               {"instruction": "q", "output": "a"}, "a string"]
    (tmp_path / "l.json").write_text(json.dumps(entries))
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.warns(UserWarning, match="skipped 2 malformed of 5"):  # as the trainer reads a stage-2 file
        samples = data.load_training_samples(tmp_path / "l.json", 2, spm_tok, 65, 512)
    assert [s.images for s in samples] == [[str(tmp_path / "a.png")]] * 2 + [[]]
