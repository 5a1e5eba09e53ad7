"""The tiny run's synthetic world: scenes of simple shapes, their pictures, text about them, and held-out scoring.

The demo trains a tiny Owl on CPU, so its data must be learnable in minutes yet exercise what the real recipe does
(the paper, arXiv 2304.14178, section 3): stage 1 pairs images with captions (f_V and f_K learn to see, f_L frozen); stage 2 mixes multimodal
instructions, in the official mPLUG-Owl JSONL and in LLaVA's JSON, with text-only ones in Alpaca's JSON (LoRA on
f_L). synth() writes all of it in those real formats, which data.py reads back as it reads real data. Every fact
of a scene (colour, shape, count, position) is a word, or two for a place ("top left"), so a held-out answer can be
scored by the words it contains.

    python synthetic.py --out data/synth
"""
import argparse
import io
import json
import math
import os
import random
import re
import time

from PIL import Image, ImageDraw
from tqdm import tqdm

from owl import IMAGE, SYSTEM, render_turn, tokenize


# Canonical fills, far apart in RGB and far from the light backgrounds, so the jittered fills stay unambiguous:
# the model has to learn colour names, not exact RGB values.
COLORS = {"red": (205, 45, 45), "green": (45, 160, 65), "blue": (45, 85, 215), "yellow": (235, 205, 45)}
# Other code draws the same colours in other shades: the pure ones, and common named ones (CSS, plotting
# libraries). A shape's fill is one of its colour's shades, jittered.
SHADES = {"red": (COLORS["red"], (255, 0, 0), (220, 20, 60), (178, 34, 34)),
          "green": (COLORS["green"], (0, 128, 0), (34, 139, 34), (50, 205, 50)),
          "blue": (COLORS["blue"], (0, 0, 255), (31, 119, 180), (65, 105, 225)),
          "yellow": (COLORS["yellow"], (255, 255, 0), (255, 215, 0), (250, 220, 50))}
SMOOTH = 0.3  # share of scenes drawn with anti-aliased edges, as many drawing libraries do
SHAPES = ("circle", "square", "triangle")
# Where a shape is: the third of the width and the third of the height its centre falls in, named as a reader would
# ("top left", "top", ..., "center", ..., "bottom right"), in reading order. Five words make all nine.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
POSITION_WORDS = ("top", "bottom", "left", "right", "center")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# ---------------------------------------------------------------------------------------------------------------
# Scenes: facts first (a dict that is saved to scenes.jsonl), pixels drawn from the facts.


def place(fx: float, fy: float) -> str:
    """The position word(s) of a point given as fractions of the width and height (0 = left / top edge)."""
    return POSITIONS[3 * min(2, max(0, int(fy * 3))) + min(2, max(0, int(fx * 3)))]


def random_scene(rng, n_shapes=None):
    """Canvas of any size/aspect (images from other code can have any), light background, 1-4 shapes anywhere:
    each in its own of the nine places (so a place names one shape), off-grid within it, of varied size; (colour,
    shape) pairs unique so "Where is the red circle?" has one answer."""
    # any size, but not so elongated that the shapes shrink to a few pixels once squashed to the ViT's square
    w = rng.randint(64, 256)
    h = min(256, max(48, round(w * math.exp(rng.uniform(math.log(0.6), math.log(1 / 0.6))))))
    n = n_shapes or rng.randint(1, 4)
    cells = rng.sample(range(len(POSITIONS)), n)
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    base = rng.randint(228, 245)
    background = rng.choice([(255, 255, 255), (rng.randint(215, 245),) * 3,  # white, light grey,
                             (rng.randint(240, 252), rng.randint(230, 245), rng.randint(200, 225)),  # beige, cream,
                             tuple(min(255, base + rng.randint(-12, 10)) for _ in range(3))])  # pale tint
    # A lone shape may be big; several stay smaller so that they fit side by side.
    small, big = (0.15, 0.45) if n == 1 else (0.14, 0.30)
    # Shapes must not overlap (a shape's centre pixel has its own colour). Big sizes and off-centre spots sometimes
    # collide, so retry with both shrinking; the last try (the smallest size at the centres of the places) is disjoint.
    for attempt in range(20):
        shrink = 1 - attempt / 19
        shapes = []
        for (color, shape), cell in zip(pairs, cells):
            size = max(8, round(min(w, h) * rng.uniform(small, small + (big - small) * shrink)))
            half = math.ceil(size / 2)
            # anywhere in the middle 80% of its place, so that the word for where it is stays clear
            fx = (cell % 3 + 0.5 + shrink * rng.uniform(-0.4, 0.4)) / 3
            fy = (cell // 3 + 0.5 + shrink * rng.uniform(-0.4, 0.4)) / 3
            cx = min(max(round(w * fx), half + 1), w - half - 2)
            cy = min(max(round(h * fy), half + 1), h - half - 2)
            shapes.append({
                "color": color, "shape": shape, "position": place((cx + 0.5) / w, (cy + 0.5) / h),
                "center": [cx, cy], "size": size,
                "fill": [min(255, max(0, v + rng.randint(-15, 15))) for v in rng.choice(SHADES[color])],
                "angle": round(rng.uniform(-15, 15), 1) if shape == "triangle" else 0.0})
        if (all(_apart(a, b) for i, a in enumerate(shapes) for b in shapes[i + 1:])
                and len({s["position"] for s in shapes}) == n):
            break
    return {"width": w, "height": h, "background": list(background), "shapes": shapes, "smooth": rng.random() < SMOOTH}


def _apart(a, b):
    """Bounding boxes (a triangle's vertices lie on its circumcircle, so its box too) at least 1 px apart."""
    (ax, ay), (bx, by) = a["center"], b["center"]
    reach = math.ceil(a["size"] / 2) + math.ceil(b["size"] / 2) + 1
    return abs(ax - bx) > reach or abs(ay - by) > reach


def draw_scene(scene, owners=False):
    """The scene's picture; owners=True draws instead which shape owns each pixel: a one-channel image, 0 where the
    background shows, i + 1 where shape i does (the labels of the tiny f_V's pre-training in tiny.py). A smooth scene
    is drawn at 4x and scaled down, which anti-aliases its edges (its owners are drawn sharp)."""
    k = 4 if scene.get("smooth") and not owners else 1
    size = (scene["width"] * k, scene["height"] * k)
    img = Image.new("L", size, 0) if owners else Image.new("RGB", size, tuple(scene["background"]))
    draw = ImageDraw.Draw(img)
    for i, s in enumerate(scene["shapes"]):
        (cx, cy), r, fill = s["center"], s["size"] / 2, i + 1 if owners else tuple(s["fill"])
        cx, cy, r = (cx + 0.5) * k - 0.5, (cy + 0.5) * k - 0.5, r * k  # pixel centres stay put when scaled
        if s["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif s["shape"] == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:  # upright equilateral triangle around its centroid, slightly rotated
            angles = [math.radians(s["angle"] + a) for a in (-90, 30, 150)]
            draw.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles], fill=fill)
    return img.resize((scene["width"], scene["height"]), Image.BOX) if k > 1 else img


# ---------------------------------------------------------------------------------------------------------------
# Text about scenes. Several paraphrases each, so the model learns the question, not one string.

CAPTIONS = ("{n} {shapes}: {items}.", "There {are} {n} {shapes}: {items}.",
            "The image shows {n} {shapes}: {items}.", "A picture of {n} {shapes}: {items}.")
QUESTIONS = {
    "color": ("What color is the shape?", "What is the color of the shape?", "Which color does the shape have?",
              "Tell me the color of the shape."),
    "shape": ("What shape is it?", "What shape is in the image?", "Which shape do you see?",
              "Name the shape in the image."),
    "count": ("How many shapes are there?", "How many shapes are in the image?", "Count the shapes in the image.",
              "What is the number of shapes?"),
    "position": ("Where is the {color} {shape}?", "Where is the {color} {shape} in the image?",
                 "In which part of the image is the {color} {shape}?", "What is the position of the {color} {shape}?"),
    "describe": ("Describe the image.", "What do you see in the image?", "Give a short description of the image.",
                 "What is in this picture?"),
}
ANSWERS = {
    "color": ("The shape is {color}.", "It is {color}.", "The color is {color}."),
    "shape": ("It is a {shape}.", "The shape is a {shape}.", "I see a {shape}."),
    "count": ("There {are} {n} {shapes}.", "I count {n} {shapes}.", "The image has {n} {shapes}."),
    "position": ("The {color} {shape} is at the {position}.", "It is at the {position}."),
}


def _counted(n):
    return {"n": n, "are": "is" if n == 1 else "are", "shapes": "shape" if n == 1 else "shapes"}


def in_reading_order(shapes):
    """Shapes by place, row by row from the top left: what an image shows then fixes its caption's content, and the
    model is not asked to guess an arbitrary order."""
    return sorted(shapes, key=lambda s: POSITIONS.index(s["position"]))


def caption(scene, rng):
    """The shapes in reading order, each with its colour, kind and place."""
    shapes = in_reading_order(scene["shapes"])
    items = [f"a {s['color']} {s['shape']} at the {s['position']}" for s in shapes]
    items = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return rng.choice(CAPTIONS).format(items=items, **_counted(len(scene["shapes"])))


def ask(kind, scene, rng):
    """(question, answer, target facts) of one kind about one scene; colour and shape need a 1-shape scene."""
    shapes = scene["shapes"]
    if kind in ("color", "shape"):
        assert len(shapes) == 1, "colour and shape questions are only asked about single-shape images"
    s = rng.choice(shapes)
    facts = {"color": s["color"], "shape": s["shape"], "position": s["position"], **_counted(len(shapes))}
    question = rng.choice(QUESTIONS[kind]).format(**facts)
    if kind == "describe":
        target = {"count": len(shapes), "shapes": [{k: t[k] for k in ("color", "shape", "position")} for t in shapes]}
        return question, caption(scene, rng), target
    target = {"color": {"color": s["color"]}, "shape": {"shape": s["shape"]}, "count": {"count": len(shapes)},
              "position": {k: s[k] for k in ("color", "shape", "position")}}[kind]
    return question, rng.choice(ANSWERS[kind]).format(**facts), target


def compare(a, b, rng):
    """A question about two images; the answer names "the first image", "the second image", both or neither."""
    if rng.random() < 0.5:
        na, nb = len(a["shapes"]), len(b["shapes"])
        q = rng.choice(("Which image has more shapes?", "Which of the two images shows more shapes?"))
        if na == nb:
            return q, "Both images have the same number of shapes."
        return q, f"The {'first' if na > nb else 'second'} image has more shapes."
    c = rng.choice(list(COLORS))
    ina, inb = (any(s["color"] == c for s in x["shapes"]) for x in (a, b))
    q = rng.choice((f"Do both images contain a {c} shape?", f"Is there a {c} shape in both images?"))
    if ina and inb:
        return q, "Yes, both images do."
    if ina or inb:
        return q, f"No, only the {'first' if ina else 'second'} image does."
    return q, "No, neither image does."


def text_task(rng):
    """A text-only instruction (Alpaca format) in the same small vocabulary."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    tasks = [
        (f"What is {a} plus {b}?", "", f"{a} plus {b} is {a + b}."),
        (f"What is {max(a, b)} minus {min(a, b)}?", "", f"{max(a, b)} minus {min(a, b)} is {max(a, b) - min(a, b)}."),
        ("Which number is bigger?", f"{a} and {b}",
         f"{max(a, b)} is bigger than {min(a, b)}." if a != b else "The numbers are the same."),
        (f"What number comes after {a}?", "", f"{a + 1} comes after {a}."),
        ("Name a color.", "", f"{color.capitalize()} is a color."),
        ("Name a shape.", "", f"A {shape} is a shape."),
        (f"Is {color} a color?", "", f"Yes, {color} is a color."),
        (f"Is {color} a shape?", "", f"No, {color} is a color."),
        (f"Is a {shape} a shape?", "", f"Yes, a {shape} is a shape."),
        (f"Is a {shape} a color?", "", f"No, a {shape} is a shape."),
        ("Which word is a color?", " or ".join(rng.sample([color, shape], 2)), f"{color.capitalize()} is a color."),
        ("How many sides does a triangle have?", "", "A triangle has 3 sides."),
        ("How many sides does a square have?", "", "A square has 4 sides."),
        ("Name the colors you know.", "", "I know red, green, blue and yellow."),
    ]
    instruction, inp, output = rng.choice(tasks)
    return {"instruction": instruction, "input": inp, "output": output}


# Stage 0 gives the tiny f_L a scene the way a visual token can hold it: each shape ONE input vector, the sum of the
# embeddings of its words (colour, kind, place), in a chat's text as a mark "<shape red circle top>". Measured: a
# question naming one shape of several ("Where is the red circle?") is answered from such vectors after a short drill
# (position 84%), and is not from the same scene in words in the same steps (31%), nor through pixels later (54%).
SHAPE_MARK = re.compile(r"<shape ([a-z ]+)>")
SHAPE_ID = -2  # placeholder id of one shape vector: never a real token


def shape_marks(scene):
    """A scene as shape marks, in reading order (as its caption lists them)."""
    return "".join(f"<shape {s['color']} {s['shape']} {s['position']}>" for s in in_reading_order(scene["shapes"]))


def tokenize_with_shapes(tokenizer, text, tokens_per_image):
    """owl.tokenize, and each shape mark -> one SHAPE_ID; returns (ids, the word ids of each mark in order)."""
    ids, shapes = [], []
    for j, chunk in enumerate(SHAPE_MARK.split(text)):
        if j % 2:
            ids.append(SHAPE_ID)
            shapes.append(tokenizer.encode(chunk))
        elif chunk:
            ids += tokenize(tokenizer, chunk, tokens_per_image)
    return ids, shapes


def drill_chat(rng):
    """Stage 0's look-up drill: a 2-4 shape scene as shape vectors and one question that names a shape by its colour
    and kind, answered with its place. Short (about 31 tokens) and nothing else in the batch, so the first 300 steps
    of stage 0 spend all their signal on finding the shape named (measured: it forms between steps 100 and 300,
    when depends on the seed; with a description asked in a third of these chats, or the same chats in words, it had
    not formed by step 200). Drawing half of them so that another shape shares the asked one's colour made it key on
    both words on one seed and fail on another."""
    scene = random_scene(rng, rng.randint(2, 4))
    s = rng.choice(scene["shapes"])
    return reading_chat(shape_marks(scene), [(rng.choice(QUESTIONS["position"]).format(**s),
                                               rng.choice(ANSWERS["position"]).format(**s))])


def list_chat(rng):
    """Stage 0's list drill: a 2-4 shape scene as shape vectors and one request to describe it, answered with its
    caption, each shape once, in reading order. Without it the tiny f_L, given a scene's exact vectors, described
    70% of the held-out scenes right, most misses naming the first shape twice; with it 96.5% (docs/lab-notes.md)."""
    scene = random_scene(rng, rng.randint(2, 4))
    question, answer, _ = ask("describe", scene, rng)
    return reading_chat(shape_marks(scene), [(question, answer)])


def reading_chat(described, turns):
    """A chat about a scene (in words, or as shape marks), put where stage 2 puts the image; an empty last answer
    leaves the prompt for the model to answer."""
    return "Human: " + described + "".join(render_turn(q) + a for q, a in turns)


def render_owl_text(turns):
    """The official stage-2 "text": the canonical template (owl.render_prompt) with answers. Questions carry their images
    as leading "<image>\\n" tags (see Conversation); each becomes its own "Human: <image>" line."""
    return SYSTEM + "".join(render_turn(q.replace(IMAGE, "").strip(), q.count(IMAGE)) + a for q, a in turns)


# ---------------------------------------------------------------------------------------------------------------
# Synthesis: every part has its own random stream, so changing one --n-* leaves the other files as they were.


def synth(out, seed=0, n_train=12000, n_owl=8000, n_llava=4000, n_alpaca=600, n_heldout=1000, vocab_size=512,
          n_reading=20000, n_drill=20000, n_lists=20000):
    """Write into `out`: images/ (s_* for training, h_* held out), scenes.jsonl (the facts of every image),
    stage1.jsonl (and stage1_single.jsonl: its single-shape lines again), stage2_owl.jsonl, stage2_llava.json,
    stage2_alpaca.json, corpus.txt, reading.jsonl, drill.jsonl and lists.jsonl (stage 0's text; the scenes of these
    chats as shape marks), heldout.jsonl (questions without <image> tags, their images listed apart),
    heldout_reading.jsonl (the same questions about the scene as shape marks), val_* files for the validation loss (on
    held-out images) and tokenizer.model. Paths are relative to `out`."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    rng = random.Random(f"train/{seed}")
    scenes, records, stage1, corpus = [], [], [], SYSTEM.replace(". ", ".\n").splitlines()
    for i in tqdm(range(n_train), desc="stage-1 images"):
        scenes.append(random_scene(rng))
        name = f"images/s_{i:05d}.png"
        draw_scene(scenes[-1]).save(os.path.join(out, name))
        records.append({"image": name, **scenes[-1]})
        stage1.append({"image": name, "caption": caption(scenes[-1], rng)})
    corpus += [r["caption"] for r in stage1]
    # The single-shape images again, as a second stage-1 source: a caption naming one shape is the clearest signal
    # f_V gets for telling shapes apart (measured with the demo's defaults: held-out shape 49% -> 60%, all 64 -> 66%).
    single = [i for i, s in enumerate(scenes) if len(s["shapes"]) == 1]
    stage1_single = [stage1[i] for i in single]
    # Chats about a scene given as shape vectors, in the template stage 2 uses with an image where the vectors are:
    # the tiny f_L learns to answer from facts in its context, the skill it later needs with the visual tokens (a
    # real LLM brings it along; a tiny one trained on single sentences cannot copy a colour from its context).
    crng = random.Random(f"reading/{seed}")
    reading = []
    for _ in range(n_reading):
        scene = random_scene(crng, 1 if crng.random() < 0.4 else None)
        kinds = ["count", "position", "describe"] + (["color", "shape"] * 2 if len(scene["shapes"]) == 1 else [])
        turns = [ask(kind, scene, crng)[:2] for kind in crng.sample(kinds, crng.choice((1, 1, 2)))]
        chat = reading_chat(shape_marks(scene), turns)
        reading.append({"text": SYSTEM + "\n" + chat if crng.random() < 0.25 else chat})  # the system text is long
    drng = random.Random(f"drill/{seed}")
    drill = [{"text": drill_chat(drng)} for _ in range(n_drill)]
    lrng = random.Random(f"lists/{seed}")
    lists = [{"text": list_chat(lrng)} for _ in range(n_lists)]

    rng = random.Random(f"stage2/{seed}")
    owl, llava = [], []
    for i in tqdm(range(n_owl + n_llava), desc="stage-2 conversations"):
        if i < n_owl and rng.random() < 0.15:  # two-image comparisons only in the official format (LLaVA has one)
            a, b = rng.sample(range(n_train), 2)
            q, answer = compare(scenes[a], scenes[b], rng)
            images, turns = [stage1[a]["image"], stage1[b]["image"]], [(IMAGE + "\n" + IMAGE + "\n" + q, answer)]
        else:
            # single-shape images a third of the time, so colour and shape questions are common enough to learn
            k = rng.choice(single) if rng.random() < 0.35 else rng.randrange(n_train)
            kinds = ["count", "position", "describe"] + (["color", "shape"] if len(scenes[k]["shapes"]) == 1 else [])
            kinds = rng.sample(kinds, rng.choice((1, 1, 2, 3)))
            turns = [ask(kind, scenes[k], rng)[:2] for kind in kinds]
            images, turns = [stage1[k]["image"]], [(IMAGE + "\n" + turns[0][0], turns[0][1])] + turns[1:]
        corpus += [s.replace(IMAGE, "").strip() for turn in turns for s in turn]
        if i < n_owl:
            owl.append({"image": images, "text": render_owl_text(turns), "task_type": "llava_sft"})
        else:
            llava.append({"image": images[0], "conversations": [
                {"from": who, "value": v} for q, a in turns for who, v in (("human", q), ("gpt", a))]})

    rng = random.Random(f"alpaca/{seed}")
    alpaca = [text_task(rng) for _ in range(n_alpaca)]
    corpus += [t[k] for t in alpaca for k in ("instruction", "output")]

    # Held-out: another seed and its own files, so no image is shared with training; kinds balanced.
    rng, heldout = random.Random(f"heldout/{seed}"), []
    vrng, val_captions = random.Random(f"val/{seed}"), []  # validation-loss files drawn on the held-out images
    heldout_reading = []  # the same questions with the scene as shape marks where the image would be: stage 0's check
    for i in tqdm(range(n_heldout), desc="held-out images"):
        kind = ("color", "shape", "count", "position", "describe")[i % 5]
        scene = random_scene(rng, 1 if kind in ("color", "shape") else None)
        name = f"images/h_{i:05d}.png"
        draw_scene(scene).save(os.path.join(out, name))
        records.append({"image": name, **scene})
        q, answer, target = ask(kind, scene, rng)
        heldout.append({"image": [name], "question": q, "kind": kind, "answer": answer, "target": target})
        heldout_reading.append({"scene": shape_marks(scene), "question": q, "kind": kind, "target": target})
        val_captions.append({"image": name, "caption": caption(scene, vrng)})
    val_owl = [{"image": h["image"], "text": render_owl_text([(IMAGE + "\n" + h["question"], h["answer"])]),
                "task_type": "llava_sft"} for h in heldout]

    for name, rows in (("scenes.jsonl", records), ("stage1.jsonl", stage1), ("stage1_single.jsonl", stage1_single),
                       ("stage2_owl.jsonl", owl),
                       ("heldout.jsonl", heldout), ("heldout_reading.jsonl", heldout_reading),
                       ("stage2_llava.json", llava), ("stage2_alpaca.json", alpaca),
                       ("corpus.txt", corpus), ("reading.jsonl", reading), ("drill.jsonl", drill),
                       ("lists.jsonl", lists),
                       ("val_stage1.jsonl", val_captions), ("val_stage2_owl.jsonl", val_owl),
                       ("val_corpus.txt", [c["caption"] for c in val_captions])):
        with open(os.path.join(out, name), "w") as f:
            if name.endswith(".json"):
                json.dump(rows, f, indent=1)
            else:
                f.writelines((r if name.endswith(".txt") else json.dumps(r)) + "\n" for r in rows)
    texts = corpus + [SHAPE_MARK.sub(r"\1 ", r["text"]) for r in owl + reading] + [r["answer"] for r in heldout]
    train_tokenizer(texts, os.path.join(out, "tokenizer.model"), vocab_size)


def train_tokenizer(texts, path, vocab_size=512):
    """A LLaMA-layout SentencePiece BPE model (unk 0, bos 1, eos 2, no pad) on all the text of the data. Identity
    normalisation and all characters kept, so every answer (newlines of the template too) round-trips exactly;
    one thread and no shuffling, so the model file is the same for the same text."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sorted(set(texts))), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, num_threads=1,
        shuffle_input_sentence=False, minloglevel=2)
    with open(path, "wb") as f:
        f.write(model.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# Held-out scoring: the answer must say the expected word(s) of its kind and no other word of that kind.

_NUMBERS = {str(i) for i in range(100)}


def _words(answer):
    """Lower-case words, plural shape words made singular, number words made digits."""
    words = []
    for w in re.findall(r"[a-z]+|\d+", answer.lower()):
        w = w[:-1] if w.endswith("s") and w[:-1] in SHAPES else w
        words.append(str(NUMBER_WORDS.index(w)) if w in NUMBER_WORDS else w)
    return words


def score_answer(kind, answer, target):
    """kind in color|shape|count|position|describe; target as in heldout.jsonl. Describe needs every
    "<colour> <shape>" pair and the count, and no colour, shape, number or place word that is not in the scene; a
    position answer must say exactly the words of the place ("top left": both, and no other)."""
    words = _words(answer)

    def said(vocab):
        return {w for w in words if w in vocab}
    if kind == "color":
        return said(COLORS) == {target["color"]}
    if kind == "shape":
        return said(SHAPES) == {target["shape"]}
    if kind == "count":
        return said(_NUMBERS) == {str(target["count"])}
    if kind == "position":
        return said(POSITION_WORDS) == set(target["position"].split())
    if kind == "describe":
        shapes = target["shapes"]
        pairs = set(zip(words, words[1:]))
        return (all((s["color"], s["shape"]) in pairs for s in shapes)
                and said(COLORS) == {s["color"] for s in shapes} and said(SHAPES) == {s["shape"] for s in shapes}
                and said(_NUMBERS) == {str(target["count"])}
                and said(POSITION_WORDS) <= {w for s in shapes for w in s["position"].split()})
    raise ValueError(f"unknown question kind {kind!r}")


def accuracy_table(results):
    """(kind, correct) pairs -> {kind: (correct, total)}, plus "all"."""
    table = {}
    for kind, ok in results:
        correct, total = table.get(kind, (0, 0))
        table[kind] = (correct + bool(ok), total + 1)
    table["all"] = (sum(c for c, _ in table.values()), sum(t for _, t in table.values()))
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw shape scenes and write stage-1 captions, stage-2 instructions "
                                "(official mPLUG-Owl JSONL, LLaVA JSON, Alpaca JSON), the tiny f_L's stage-0 text, a "
                                "held-out split and tokenizer.model into one folder. The same seed gives the same files.")
    p.add_argument("--out", required=True, help="folder to write into (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the held-out split derives its own from it")
    p.add_argument("--n-train", type=int, default=12000, help="stage-1 images with one caption each")
    p.add_argument("--n-owl", type=int, default=8000,
                   help="stage-2 conversations in official JSONL (on the stage-1 images; ~15%% compare two images)")
    p.add_argument("--n-llava", type=int, default=4000, help="stage-2 single-image conversations in LLaVA JSON")
    p.add_argument("--n-alpaca", type=int, default=600, help="text-only instructions in Alpaca JSON")
    p.add_argument("--n-heldout", type=int, default=1000, help="held-out questions, each on a new image")
    p.add_argument("--n-reading", type=int, default=20000,
                   help="stage-0 chats about scenes given as shape vectors (reading.jsonl), no images")
    p.add_argument("--n-drill", type=int, default=20000,
                   help="stage-0 look-up drill chats (drill.jsonl): one position question about a 2-4 shape scene")
    p.add_argument("--n-lists", type=int, default=20000,
                   help="stage-0 list drill chats (lists.jsonl): a 2-4 shape scene described, every shape once")
    p.add_argument("--vocab-size", type=int, default=512, help="SentencePiece vocabulary size (an upper bound)")
    args = p.parse_args(argv)
    if args.n_train < 2:
        p.error("--n-train must be at least 2 (comparisons need two images)")
    start = time.time()
    synth(args.out, args.seed, args.n_train, args.n_owl, args.n_llava, args.n_alpaca, args.n_heldout,
          args.vocab_size, args.n_reading, args.n_drill, args.n_lists)
    print(f"wrote {args.out} in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
