"""Owl's training data: readers of the stage-1 and stage-2 formats, training samples with answer-only labels in the
model's template, stage 1's augmentation and mPLUG-Owl2's training image transform, and the batches train.py makes of
them: the --data sources mixed by weight, the images read once, micro-batches padded.

Stage 1 reads image-caption JSONL; stage 2 the official mPLUG-Owl JSONL, LLaVA's JSON and Alpaca's JSON (text-only),
each into one Conversation. A malformed line or a missing image skips that sample with a counted warning.
"""
import json
import math
import os
import random
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from owl import IMAGE, IMAGE_ID, MAX_PIXELS, OWL, OWL2, Template, UserError, read_image, render_turn, tokenize
from owl import SYSTEM  # noqa: F401 (data.SYSTEM: tests)
from vit import ImageTransform


# ---------------------------------------------------------------------------------------------------------------
# Stage-2 formats -> one in-memory form. Training sees only Conversation, whatever file it came from.


@dataclass
class Conversation:
    """A stage-2 sample: absolute image paths and (question, answer) turns. A question starts with one "<image>\\n"
    per image shown at that turn, in order, as the canonical template shows images on their own "Human:" lines
    before the question; the three formats land in this same form, whichever model the sample is rendered for."""
    images: list[str]
    turns: list[tuple[str, str]]


def parse_owl_text(text):
    """The official stage-2 "text" (the canonical template with answers) -> turns: drop the system text, turn "Human: <image>" lines into tags on the next
    question; an answer is the text after "AI: " up to the next "\\nHuman: "."""
    segments = ("\n" + text if text.startswith("Human: ") else text).split("\nHuman: ")[1:]
    if not segments:
        raise ValueError('no "Human: " turn')
    turns, tags = [], ""
    for segment in segments:
        if segment.strip() == IMAGE:
            tags += IMAGE + "\n"
            continue
        question, sep, answer = segment.partition("\nAI: ")
        if not sep:
            raise ValueError('a "Human: " turn without "AI: "')
        turns.append((tags + question, answer))
        tags = ""
    if tags:
        raise ValueError("an image after the last question")
    return turns


def _conversation(images, turns, base):
    """Validate and normalise: image tags (mPLUG-Owl's <image>, or mPLUG-Owl2's <|image|> as its own training data
    writes them) moved to the front of their question as <image>, one per image overall, and no empty answer (a
    turn with nothing to learn is a malformed entry, not a sample)."""
    images = [images] if isinstance(images, str) else list(images or [])
    turns = [(q.replace(OWL2.image, IMAGE), a) for q, a in turns]
    turns = [((IMAGE + "\n") * q.count(IMAGE) + q.replace(IMAGE, "").strip(), a.strip()) for q, a in turns]
    if not turns or not all(a for _, a in turns):
        raise ValueError("no turns, or an empty answer")
    if sum(q.count(IMAGE) for q, _ in turns) != len(images):
        raise ValueError(f"{sum(q.count(IMAGE) for q, _ in turns)} <image> tags for {len(images)} images")
    return Conversation([os.path.join(base, p) for p in images], turns)


def _owl(line, base):
    d = json.loads(line)
    return _conversation(d.get("image"), parse_owl_text(d["text"]), base)


def _llava(d, base):
    messages = d["conversations"]
    roles = [m["from"] for m in messages]
    if not messages or roles != ["human", "gpt"] * (len(messages) // 2):
        raise ValueError("turns must alternate human, gpt")
    return _conversation(d.get("image"), [(q["value"], a["value"]) for q, a in zip(messages[::2], messages[1::2])],
                         base)


def _alpaca(d, base):
    question = d["instruction"] + ("\n" + d["input"] if d.get("input") else "")
    return _conversation([], [(question, d["output"])], base)


def _llava_or_alpaca(d, base):
    """A stage-2 JSON entry in either format, told apart entry by entry: one malformed entry (the first, say) must not
    decide how the whole file is read."""
    if not isinstance(d, dict) or not ("conversations" in d or "instruction" in d):
        raise ValueError('neither LLaVA ("conversations") nor Alpaca ("instruction")')
    return (_llava if "conversations" in d else _alpaca)(d, base)


def _caption(line, base):
    d = json.loads(line)
    if not (isinstance(d["image"], str) and isinstance(d["caption"], str) and d["caption"].strip()):
        raise ValueError("needs an image path and a caption")
    return os.path.join(base, d["image"]), d["caption"]


def _load(path, parse, jsonl):
    """Parse every entry of a file; a malformed one is skipped and counted, with one warning per file."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        if jsonl:
            entries = [(f"line {i}", line) for i, line in enumerate(f, 1) if line.strip()]
        else:
            entries = json.load(f)
            if not isinstance(entries, list):
                raise ValueError(f"{path}: expected a JSON list of samples")
            entries = [(f"entry {i}", e) for i, e in enumerate(entries)]
    out, bad = [], []
    for where, entry in entries:
        try:
            out.append(parse(entry, base))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            bad.append(f"{where}: {type(e).__name__}: {e}")
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} malformed of {len(entries)} entries (first: {bad[0]})")
    return out


def load_owl_jsonl(path):
    return _load(path, _owl, jsonl=True)


def load_llava_json(path):
    return _load(path, _llava, jsonl=False)


def load_alpaca_json(path):
    return _load(path, _alpaca, jsonl=False)


def load_instruction_json(path):
    """Stage-2 JSON as users hold it: LLaVA entries, Alpaca entries, or both, each entry read in its own format."""
    return _load(path, _llava_or_alpaca, jsonl=False)


def load_captions_jsonl(path):
    """Stage 1: a list of (absolute image path, caption)."""
    return _load(path, _caption, jsonl=True)


# ---------------------------------------------------------------------------------------------------------------
# Training samples. Ids and labels are built together, segment by segment, with owl.py's own renderer and
# tokeniser, so they cannot drift apart: the prompt text (system, questions, image slots) gets label -100, each
# answer and the EOS after it are the targets.


@dataclass
class Sample:
    ids: list[int]  # BOS + tokens, IMAGE_ID at image slots
    labels: list[int]  # the token to predict at each position, -100 where there is no loss
    images: list[str]  # one path per image slot run, in order


def conversation_segments(conv, template: Template = OWL):
    """(text, is_answer) segments of a conversation in the model's template, as inference renders its history
    (chat.chat_prompt). mPLUG-Owl: the system text, "\\nHuman: <image>" per image, "\\nHuman: Q\\nAI: ", then the
    answer. mPLUG-Owl2: "USER: <|image|>Q ASSISTANT:", then " answer</s>"; the space and the </s> are build_sample's
    (each answer is followed by the EOS id, and tokenised as it reads after a space)."""
    segments, prefix = [], template.start
    for question, answer in conv.turns:
        segments.append((prefix + template.turn(question.replace(IMAGE, "").strip(), question.count(IMAGE)), False))
        segments.append((answer, True))
        prefix = ""
    return segments


def build_sample(tokenizer, segments, images, tokens_per_image, seq_len, encode=None, template: Template = OWL):
    """Ids and labels from segments, truncated to seq_len; None when no answer token survives the cut (such a
    sample costs a forward and backward and teaches nothing). A cut never keeps part of an image: the image slots
    of a cut image go, with that image. encode(text) -> ids tokenises the prompt segments (owl.tokenize in the
    template by default).

    An answer is SentencePiece's pieces of its text, then EOS: the same ids as the answer inside the whole rendered
    conversation, since the prompt before it ends where a word ends (after "AI: " or "ASSISTANT:"). In mPLUG-Owl2 a
    prompt that follows an answer follows its </s>, and is tokenised after one, as owl.tokenize reads the history
    (with a non-legacy tokenizer the text after </s> gets no leading space)."""
    encode = encode or (lambda text: tokenize(tokenizer, text, tokens_per_image, template))
    ids, labels, after_answer = [tokenizer.bos_id], [-100], False
    for text, is_answer in segments:
        if is_answer:
            piece = tokenizer.encode(text) + [tokenizer.eos_id]
        elif after_answer and template.eos:
            piece = encode(template.eos + text)[1:]  # the </s> only places the text; the answer's EOS is in already
        else:
            piece = encode(text)
        ids, labels = ids + piece, labels + (piece if is_answer else [-100] * len(piece))
        after_answer = is_answer
    if len(ids) > seq_len:
        # an image's slots are contiguous: the slots left over after whole images are the start of a cut one
        cut = seq_len - (ids[:seq_len].count(IMAGE_ID) % tokens_per_image if tokens_per_image else 0)
        ids, labels = ids[:cut], labels[:cut]
    if all(label == -100 for label in labels):
        return None
    return Sample(ids, labels, images[: ids.count(IMAGE_ID) // tokens_per_image] if images else [])


def caption_segments(caption, caption_prompt=""):
    """A stage-1 sample: the caption right after its image; or, with a caption_prompt, the caption as the answer to
    that question about the image, in stage 2's chat layout (less the system text):
    "Human: <image>\nHuman: {caption_prompt}\nAI: {caption}"."""
    prompt = "Human: " + IMAGE + render_turn(caption_prompt) if caption_prompt else IMAGE
    return [(prompt, False), (caption, True)]


def load_training_samples(path, stage, tokenizer, tokens_per_image, seq_len, caption_prompt="",
                          template: Template = OWL):
    """Every usable sample of one data file, tokenised. Stage 1: image-caption JSONL (laid out by caption_segments);
    stage 2: the official mPLUG-Owl JSONL, or LLaVA JSON (entries with "conversations") and Alpaca JSON, told apart
    entry by entry, rendered in the template of the model trained (owl.OWL or owl.OWL2)."""
    if stage == 1:
        items = [(caption_segments(text, caption_prompt), [image]) for image, text in load_captions_jsonl(path)]
    else:
        convs = load_owl_jsonl(path) if str(path).endswith(".jsonl") else load_instruction_json(path)
        items = [(conversation_segments(c, template), c.images) for c in convs]
    present = [item for item in items if all(os.path.isfile(p) for p in item[1])]
    if len(present) < len(items):
        warnings.warn(f"{path}: skipped {len(items) - len(present)} samples whose image file is missing")
    samples = [build_sample(tokenizer, segs, images, tokens_per_image, seq_len, template=template)
               for segs, images in present]
    dropped = sum(s is None for s in samples)
    if dropped:
        warnings.warn(f"{path}: dropped {dropped} samples left without an answer token by --seq-len {seq_len}")
    return [s for s in samples if s is not None]


def augment(img, rng, *more, flip=True):
    """Stage-1 augmentation of the official recipe: RandomResizedCrop (scale 0.5-1, aspect 3/4-4/3) and a
    horizontal flip; the resize to the ViT's size happens in the shared image transform afterwards. Images in
    `more` (of img's size: label maps) get the same crop and flip, and all come back as a tuple. flip=False: crop
    only, so that left and right keep their meaning."""
    w, h = img.size
    images = (img,) + more
    for _ in range(10):
        area = w * h * rng.uniform(0.5, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            images = tuple(i.crop((left, top, left + cw, top + ch)) for i in images)
            break
    if flip and rng.random() < 0.5:
        images = tuple(i.transpose(Image.FLIP_LEFT_RIGHT) for i in images)
    return images if more else images[0]


class PadToSquare(ImageTransform):
    """mPLUG-Owl2's training images (its train.py with --image_aspect_ratio pad, as scripts/finetune_lora.sh runs
    it; mm_utils.expand2square): RGB, centred on a square as wide as its longest edge that is filled with the image
    processor's mean colour (each channel's mean times 255, truncated: (122, 116, 104) for CLIP's), then resized to
    S x S (bicubic) and normalised with the processor's mean and std, as at inference. Nothing of the image is cut
    or stretched; inference (owl.SquareFirst) stretches instead, as the official README and evaluation do."""

    def __call__(self, image: Image.Image):
        rgb = image.convert("RGB")
        (w, h), side = rgb.size, max(rgb.size)
        if w != h:
            square = Image.new("RGB", (side, side), tuple(int(m * 255) for m in self.mean))
            square.paste(rgb, ((side - w) // 2, (side - h) // 2))
            rgb = square
        return super().__call__(rgb)


# ---------------------------------------------------------------------------------------------------------------
# Batches: every sample is tokenised once, up front, into (ids, labels, image paths); a step's samples come from
# one global order that every rank computes alike; images are read when a micro-batch needs them.

def load_samples(specs, stage: int, tokenizer, tokens_per_image: int, seq_len: int,
                 caption_prompt: str = "", load=load_training_samples) -> list:
    """[(samples, weight)] for each --data PATH[:WEIGHT]; load(path, stage, tokenizer, tokens_per_image, seq_len,
    caption_prompt) reads one file (the tiny run passes its own reader of stage-0 text)."""
    out = []
    for spec in specs:
        path, weight = parse_source(spec)
        if not Path(path).is_file():
            raise UserError(f"data file {path} does not exist")
        try:
            samples = load(path, stage, tokenizer, tokens_per_image, seq_len, caption_prompt)
        except (ValueError, IndexError, KeyError, TypeError) as e:  # not JSON, or not the stage's format at all
            raise UserError(f"{path} is not stage-{stage} training data ({type(e).__name__}: {e})")
        if not samples:
            raise UserError(f"{path} holds no usable sample")
        out.append((samples, weight))
    return out


def parse_source(spec: str) -> tuple:
    """--data PATH or PATH:WEIGHT -> (path, weight). The weight follows the last colon, so a path may hold colons
    (C:/data/x.json:0.5); a spec naming an existing file, or whose last part is not a number, is all path."""
    spec = str(spec)
    head, sep, tail = spec.rpartition(":")
    if not sep or Path(spec).exists():
        return spec, 1.0
    try:
        weight = float(tail)
    except ValueError:
        return spec, 1.0
    if not (weight > 0 and math.isfinite(weight)):
        raise UserError(f"--data {spec}: the weight after the last ':' must be a positive number")
    return head, weight


def sample_order(sources, n: int, seed: int):
    """The global order of samples for the whole run: sources mixed by weight, each shuffled and cycled.
    Every rank computes the same list, so a step's global batch is known everywhere (and after a resume)."""
    rng = random.Random(seed)
    weights = [w for _, w in sources]
    perms = [list(range(len(s))) for s, _ in sources]
    cursors = [len(p) for p in perms]
    order = []
    for _ in range(n):
        k = rng.choices(range(len(sources)), weights)[0]
        if cursors[k] == len(perms[k]):
            rng.shuffle(perms[k])
            cursors[k] = 0
        order.append(sources[k][0][perms[k][cursors[k]]])
        cursors[k] += 1
    return order


class ImageCache:
    """Preprocessed pixels by path; kept in memory unless augmenting, since a small run reads each image often."""

    def __init__(self, transform, augment: bool, max_pixels: int = MAX_PIXELS):
        self.transform, self.augment, self.max_pixels, self.cache, self.failed = transform, augment, max_pixels, {}, 0

    def __call__(self, path: str, rng: random.Random) -> torch.Tensor:
        if self.augment:
            return self.transform(augment(read_image(path, self.max_pixels), rng))
        if path not in self.cache:
            self.cache[path] = self.transform(read_image(path, self.max_pixels)).half()
        return self.cache[path].float()

    def blank(self, path: str, rng: random.Random) -> torch.Tensor:
        """A black image in the place of one that cannot be read, for a micro-batch that must still run."""
        return torch.zeros(3, self.transform.image_size, self.transform.image_size)


def collate(samples, images: ImageCache, rng, device, blank: bool = False):
    """Pad a micro-batch (right, label -100): (ids, labels, pixels or None, the samples kept). A sample whose image
    cannot be read (missing, truncated, not an image, over --max-pixels) is skipped and counted; None if none is left.
    images: an ImageCache (blank=True: black images in place of every image, see fit)."""
    kept, pixels = [], []
    for s in samples:
        try:
            pixels += [(images.blank if blank else images)(p, rng) for p in s.images]
            kept.append(s)
        except UserError as e:
            images.failed += 1
            if images.failed == 1:
                print(f"\ntrain: skipping samples with unreadable images, first: {e}", file=sys.stderr)
            pixels = pixels[: sum(len(k.images) for k in kept)]
    if not kept:
        return None
    T = max(len(s.ids) for s in kept)
    ids = torch.full((len(kept), T), 0, dtype=torch.long)
    labels = torch.full((len(kept), T), -100, dtype=torch.long)
    for i, s in enumerate(kept):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        labels[i, : len(s.labels)] = torch.tensor(s.labels)
    return ids.to(device), labels.to(device), torch.stack(pixels).to(device) if pixels else None, kept
