"""Talking to a loaded Owl: one question, the chat with its history, a questions file, OwlEval. owl.py's CLI checks
the flags, loads the model and hands over to one of these:

    python owl.py --checkpoint DIR --image x.jpg --prompt "What is it?"  # ask: one answer, streamed (or --json)
    python owl.py --checkpoint DIR --image x.jpg                         # ask, then chat: the history in the template
    python owl.py --checkpoint DIR --questions questions.jsonl           # answer_questions: a file, in batches
    python owl.py --checkpoint DIR --owleval OwlEval/ > answers.jsonl    # answer_owleval: OwlEval's answer file

A conversation is a list of Turns that chat_prompt writes in the model's template; the chat, OwlEval's multi-turn
questions and serve.py build their prompts so, and add_turn forgets the oldest turns when the context fills.
"""
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from attention import save_attention
from owl import CHAT_HELP, IMAGE_ID, MAX_PIXELS, OWL, Owl, Sampling, Template, UserError, load_image, read_image

# --------------------------------------------------------------------------------------------------------------
# One question, about the --image images


def ask(model: Owl, args, load_s: float) -> None:
    """The CLI without --questions or --owleval: read the --image images, draw --show-attention's sheet, then answer
    --prompt (streamed, or whole with --json) or, without --prompt, chat about them. load_s: the seconds the model
    took to load, for --json."""
    if args.prompt is not None:
        check_prompt(args, model.cfg.template)
    start = time.perf_counter()
    pixels = load_images(args.image, model, args)
    ids = None if args.prompt is None else prompt_ids_of(model, args)
    timings = {"load_s": load_s, "preprocess_s": time.perf_counter() - start}
    if args.show_attention:
        save_attention(model, pixels, args.show_attention)
    if ids is None:
        chat(model, pixels, args)
    elif args.json:
        answer_json(model, ids, pixels, sampling_of(args), timings)
    else:
        stream_answer(model, ids, pixels, sampling_of(args))


def check_prompt(args, template: Template) -> None:
    """The prompt's image tags (<image> for mPLUG-Owl, <|image|> for mPLUG-Owl2), once the model is known."""
    tag = template.image
    if args.raw_prompt and args.prompt.count(tag) != len(args.image):
        raise UserError(f"the prompt has {args.prompt.count(tag)} {tag} tags but {len(args.image)} images were given")
    if not args.raw_prompt and args.prompt is not None and tag in args.prompt:
        raise UserError(f"the question contains {tag}; pass --raw-prompt to place images yourself")


def load_images(paths: list, model: Owl, args) -> Optional[torch.Tensor]:
    """(N, 3, S, S) pixels of the images, or None for none."""
    if not paths:
        return None
    return torch.stack([load_image(str(p), model.image_transform, args.max_pixels) for p in paths])


def prompt_ids_of(model: Owl, args) -> List[int]:
    """The ids of --prompt: in the canonical template, or as is with --raw-prompt; refused if it fills the context."""
    ids = model.prompt_ids(args.prompt if args.raw_prompt else model.cfg.template.prompt(args.prompt, len(args.image)))
    try:
        model.check_context(ids)
    except ValueError as e:
        raise UserError(e.args[0]) from None
    return ids


def sampling_of(args) -> Sampling:
    """The sampling flags as one value; with --seed, a stream of its own that starts from the seed at each call."""
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    return Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, generator)


def stream_answer(model: Owl, ids: List[int], pixels, sampling: Sampling, out=None, visual=None) -> List[int]:
    """Generate and print the answer as it grows (to stdout unless out is given); returns the answer's token ids."""
    out, new, shown = out or sys.stdout, [], ""
    for token in model.generate(ids, pixels, sampling, visual=visual):
        new.append(token)
        text = model.answer_text(new)
        # print only what is settled: a trailing partial UTF-8 byte sequence decodes to U+FFFD until complete
        if text.startswith(shown) and not text.endswith("\ufffd"):
            out.write(text[len(shown):])
            out.flush()
            shown = text
    text = model.answer_text(new)
    out.write((text[len(shown):] if text.startswith(shown) else "") + "\n")
    out.flush()
    return new


def answer_json(model: Owl, ids: List[int], pixels, sampling: Sampling, timings: dict) -> None:
    """--json: generate without streaming, then print the answer, the token counts and the timings (seconds) as one
    JSON object. prompt_tokens counts every position of the prompt, image_tokens the visual ones among them;
    first_token_s includes encoding the images and reading the prompt."""
    start, first, new = time.perf_counter(), None, []
    for token in model.generate(ids, pixels, sampling):
        if first is None:
            first = time.perf_counter() - start
        new.append(token)
    total = time.perf_counter() - start
    record = {"answer": model.answer_text(new), "prompt_tokens": len(ids),
              "image_tokens": sum(i == IMAGE_ID for i in ids), "generated_tokens": len(new),
              **timings, "first_token_s": first, "generate_s": total, "tokens_per_s": len(new) / total}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}, ensure_ascii=False))


# --------------------------------------------------------------------------------------------------------------
# A conversation, and the chat on stdin


@dataclass
class Turn:
    """One exchange of a chat: the question, the images shown with it (each as its visual tokens (Q+1, D), encoded
    once when it is added), the answer."""
    question: str
    images: list
    answer: str = ""


def chat_prompt(turns: List[Turn], template: Template = OWL) -> str:
    """The conversation in the model's template: its start, then each turn and its answer (the last one unanswered)."""
    return template.start + "".join(template.turn(t.question, len(t.images)) + (template.answer(t.answer)
                                    if i + 1 < len(turns) else "") for i, t in enumerate(turns))


def turns_to_drop(model: Owl, history: List[Turn], turn: Turn, room: int) -> Optional[int]:
    """How many of the oldest turns must go so the prompt leaves `room` tokens of the context for the answer; None
    if even the new turn alone does not fit."""
    for dropped in range(len(history) + 1):
        ids = model.prompt_ids(chat_prompt(history[dropped:] + [turn], model.cfg.template))
        if len(ids) + room < model.cfg.text.max_position_embeddings:
            return dropped
    return None


def notice(text: str) -> None:
    print(f"owl: {text}", file=sys.stderr)


def chat(model: Owl, pixels, args, lines=None) -> None:
    """Interactive multi-turn chat on stdin (or lines); the history is kept in the template, each turn with the
    images shown at it. The --image images belong to the first question. A user's mistake (a bad /image path, a
    question too long for the context) is reported in one sentence and the chat goes on."""
    history, pending = [], [] if pixels is None else list(encode(model, pixels))
    notice(f"chat about your images: {CHAT_HELP}.")
    for line in sys.stdin if lines is None else lines:
        command, _, rest = line.strip().partition(" ")
        if not command:
            continue
        if command == "/quit":
            return
        if command == "/reset":
            history, pending = [], []
            notice("the conversation and its images are forgotten.")
        elif command == "/image":
            try:
                if not rest.strip():
                    raise UserError("/image needs a path")
                pending += encode(model, load_image(rest.strip(), model.image_transform, args.max_pixels)[None])
            except UserError as e:
                notice(f"{e}; the chat goes on without it.")
        elif command.startswith("/"):
            notice(f"unknown command {command}: {CHAT_HELP}.")
        else:
            answered = chat_turn(model, history, Turn(line.strip(), pending), args)
            if answered is not None:
                history, pending = answered, []


def chat_turn(model: Owl, history: List[Turn], turn: Turn, args) -> Optional[List[Turn]]:
    """Answer one turn (streamed) and return the history with it. When the history and room for the answer
    outgrow the context, the oldest turns and their images are forgotten, with a notice; when the turn alone does
    not fit, it is not asked (None)."""
    context = model.cfg.text.max_position_embeddings
    kept = add_turn(model, history, turn, min(args.max_new_tokens, context // 4), "the conversation")
    if kept is None:
        notice(f"this question and its images do not fit in the context of {context} tokens; ask a shorter one.")
        return None
    history, ids, visual = kept
    # a fresh stream each turn: with --seed, every answer is drawn as a one-question run draws it
    turn.answer = model.answer_text(stream_answer(model, ids, None, sampling_of(args), visual=visual))
    return history


def add_turn(model: Owl, history: List[Turn], turn: Turn, room: int, what: str) -> Optional[tuple]:
    """(the history with turn, its prompt ids, its visual tokens or None), the oldest turns and their images
    forgotten, with a notice naming `what`, when the history and `room` for the answer outgrow the context; None
    when the turn alone does not fit."""
    dropped = turns_to_drop(model, history, turn, room)
    if dropped is None:
        return None
    if dropped:
        notice(f"{what} outgrew the context of {model.cfg.text.max_position_embeddings} tokens: the oldest {dropped} "
               f"turn(s) and their {sum(len(t.images) for t in history[:dropped])} image(s) are forgotten.")
    history = history[dropped:] + [turn]
    images = [image for t in history for image in t.images]  # in the order of their image tags
    return history, model.prompt_ids(chat_prompt(history, model.cfg.template)), torch.stack(images) if images else None


@torch.inference_mode()
def encode(model: Owl, pixels: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, S, S) -> their visual tokens (N, Q+1, D): a chat encodes each image once, not every turn."""
    return model.encode_images(pixels.to(model.device))


# --------------------------------------------------------------------------------------------------------------
# A questions file


@dataclass
class Question:
    """One line of a questions file: its number, its image paths as written, its question."""
    line: int
    images: List[str]
    prompt: str


def read_questions(path: str, template: Template = OWL) -> List[Question]:
    """Every line of a JSONL questions file, {"image": [paths], "prompt": "..."}, checked before anything is
    generated: a malformed line is an error that names its number. Blank lines are skipped."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"questions file {path} does not exist")
    questions = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"line {n} of {path} is not valid JSON") from None
        where = f"line {n} of {path}"
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise UserError(f'{where} has no "prompt" string')
        images = item.get("image") or []
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise UserError(f'{where} has an "image" that is not a list of paths')
        if template.image in item["prompt"]:
            raise UserError(f'{where} has {template.image} in its prompt; its images are placed from "image"')
        questions.append(Question(n, images, item["prompt"]))
    if not questions:
        raise UserError(f"questions file {path} holds no questions")
    return questions


def answer_questions(model: Owl, path: str, args) -> None:
    """Answer a questions file in batches of --batch-size, one JSON line per question, in the file's order. Image
    paths are relative to the file's folder. Every prompt is tokenised and every image read before the first batch."""
    questions, folder = read_questions(path, model.cfg.template), Path(path).parent
    ids = [model.prompt_ids(model.cfg.template.prompt(q.prompt, len(q.images))) for q in questions]
    for q, q_ids in zip(questions, ids):
        try:
            model.check_context(q_ids, f"line {q.line} of {path}")
        except ValueError as e:
            raise UserError(e.args[0]) from None
        for image in q.images:  # read in full and let go: a bad image stops the run before any answer is out
            try:
                read_image(str(folder / image), args.max_pixels)
            except UserError as e:
                raise UserError(f"line {q.line} of {path}: {e}") from None
    sampling = sampling_of(args)  # one stream for the whole file: each batch draws on where the last one stopped
    for start in range(0, len(questions), args.batch_size):
        batch = list(zip(questions, ids))[start: start + args.batch_size]
        prompts = [(q_ids, load_images([folder / i for i in q.images], model, args)) for q, q_ids in batch]
        answers = model.generate_batch(prompts, sampling)
        for (q, _), answer in zip(batch, answers):
            record = {"image": q.images, "prompt": q.prompt, "answer": model.answer_text(answer)}
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        sys.stdout.flush()


# --------------------------------------------------------------------------------------------------------------
# OwlEval, the paper's evaluation set (the official repository's mPLUG-Owl/OwlEval/): questions.jsonl holds one
# {"image": "4.jpg", "question_id": 4, "question": "...", "ability": "a,c", "category": ["single_turn", "multi_turn"]}
# per line, its images are in cases/, and each model's answers are a file of {"image", "question_id", "question",
# "answer", "model_id"} lines in the questions' order (answer/mPLUG_Owl_7b_answer.jsonl and the others).

OWLEVAL_TURNS = ("single_turn", "multi_turn")


@dataclass
class EvalQuestion:
    """One line of OwlEval's questions.jsonl: its number, its image as written and the file that names, its id and
    question, and whether it starts a conversation (its category holds "single_turn") or continues the one before."""
    line: int
    image: str
    path: Path
    question_id: object
    question: str
    fresh: bool


def read_owleval(folder: str, template: Template = OWL, max_pixels: int = MAX_PIXELS) -> List[EvalQuestion]:
    """Every line of an OwlEval folder's questions.jsonl, checked, then every image it names read in full, before
    anything is generated: a malformed line, or a missing or unreadable image, is an error that names its line.
    Images are file names in the folder's cases/ (the folder itself when it has no cases/). category is a list
    of "single_turn" / "multi_turn" (the official file's) or one of them as a string; a question that is only
    "multi_turn" must follow a question on the same image, whose conversation it continues. Blank lines are skipped."""
    root = Path(folder)
    file = root / "questions.jsonl"
    if not file.is_file():
        raise UserError(f"OwlEval folder {folder} has no questions.jsonl")
    cases = root / "cases" if (root / "cases").is_dir() else root
    questions: List[EvalQuestion] = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {n} of {file}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{where} is not valid JSON") from None
        if not isinstance(item, dict):
            raise UserError(f"{where} is not a JSON object")
        image, question_id, question, category = (item.get(k) for k in ("image", "question_id", "question", "category"))
        if not isinstance(image, str) or not image.strip():
            raise UserError(f'{where} has no "image" file name')
        if isinstance(question_id, bool) or not isinstance(question_id, (int, str)):
            raise UserError(f'{where} has no "question_id" (a number or a string)')
        if not isinstance(question, str) or not question.strip():
            raise UserError(f'{where} has no "question" string')
        if template.image in question:
            raise UserError(f"{where} has {template.image} in its question; its image is placed from \"image\"")
        category = [category] if isinstance(category, str) else category
        if not isinstance(category, list) or not any(c in OWLEVAL_TURNS for c in category if isinstance(c, str)):
            raise UserError(f'{where} has a "category" that holds neither "single_turn" nor "multi_turn"')
        fresh = "single_turn" in category
        if not fresh and (not questions or questions[-1].image != image):
            raise UserError(f'{where} is only "multi_turn" but does not follow a question on {image}, whose '
                            "conversation it would continue")
        questions.append(EvalQuestion(n, image, cases / image, question_id, question, fresh))
    if not questions:
        raise UserError(f"{file} holds no questions")
    checked = set()
    for q in questions:  # each image read in full and let go: a bad one stops the run before any answer is out
        if q.path not in checked:
            try:
                read_image(str(q.path), max_pixels)
            except UserError as e:
                raise UserError(f"line {q.line} of {file}: {e}") from None
            checked.add(q.path)
    return questions


def answer_owleval(model: Owl, folder: str, args) -> None:
    """Write OwlEval's answer file to stdout, one JSON line per question in the file's order, each flushed as it is
    answered. A "single_turn" question starts a conversation with its image; a "multi_turn" one continues it, its
    history rendered by chat_prompt as the chat renders it (and, like the chat, forgetting the oldest turns, with a
    notice, if it outgrows the context). Each answer is drawn from a fresh Sampling, as a one-question run draws it."""
    template, context = model.cfg.template, model.cfg.text.max_position_embeddings
    questions = read_owleval(folder, template, args.max_pixels)
    room = min(args.max_new_tokens, context // 4)  # the chat's room for an answer
    for q in questions:  # the question alone with its image must leave that room, as a chat turn must
        ids = model.prompt_ids(template.prompt(q.question, 1))
        if len(ids) + room >= context:
            raise UserError(f"line {q.line} of {Path(folder) / 'questions.jsonl'} with its image is {len(ids)} "
                            f"tokens long, which leaves less than {room} of the context of {context} for the answer")
    model_id = args.model_id if args.model_id is not None else Path(args.checkpoint).resolve().name
    history: List[Turn] = []
    for q in questions:
        if q.fresh:
            history = []
            turn = Turn(q.question, list(encode(model, load_image(str(q.path), model.image_transform,
                                                                  args.max_pixels)[None])))
        else:
            turn = Turn(q.question, [])
        # the question alone fits (checked above), so add_turn keeps it
        history, ids, visual = add_turn(model, history, turn, room, f"question {q.question_id}'s conversation")
        answer = model.generate(ids, None, sampling_of(args), visual=visual)
        turn.answer = model.answer_text(list(answer))
        record = {"image": q.image, "question_id": q.question_id, "question": q.question, "answer": turn.answer,
                  "model_id": model_id}  # the keys of the official answer files, in their order
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        sys.stdout.flush()
