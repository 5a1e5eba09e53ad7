"""`owl.py --owleval DIR`: OwlEval's answer file, on a small OwlEval-shaped folder made here (questions.jsonl in the
official format, images in cases/), with tiny random v1 and Owl2 checkpoints. owl.main runs in this process with
Owl.generate recorded, so each test sees the prompt ids, the images and the Sampling every answer was drawn with."""
import contextlib
import io
import json
import subprocess

import pytest
import torch

import owl
from conftest import tiny_owl
from owl import OWL, OWL2, Owl, load_image
from test_owl2 import make_image, tiny_owl2

# As the official OwlEval/questions.jsonl writes them: "image" a file name in cases/, "category" a list; question 4
# starts a conversation on 4.jpg that 5 and 6 continue, and 7 asks about 4.jpg afresh.
QUESTIONS = [
    {"image": "1.jpg", "question_id": 1, "question": "What is in the picture?", "ability": "a,b",
     "category": ["single_turn"]},
    {"image": "4.jpg", "question_id": 4, "question": "Is there text in the image? If so, can you read it?",
     "ability": "a,c", "category": ["single_turn", "multi_turn"]},
    {"image": "4.jpg", "question_id": 5, "question": "What is funny about it?", "ability": "a,b,c,e,f",
     "category": ["multi_turn"]},
    {"image": "4.jpg", "question_id": 6, "question": "Which one is bigger?", "ability": "a,f",
     "category": ["multi_turn"]},
    {"image": "4.jpg", "question_id": 7, "question": "Describe the image in detail.", "ability": "a,b",
     "category": ["single_turn"]},
]
KEYS = ["image", "question_id", "question", "answer", "model_id"]  # the official answer files', in their order
NEW = 6  # --max-new-tokens of the runs


def write_owleval(folder, lines) -> None:
    """An OwlEval-shaped folder: questions.jsonl (lines: dicts, or strings written as they are) and cases/."""
    (folder / "cases").mkdir(parents=True)
    make_image(0, (40, 28)).save(folder / "cases" / "1.jpg")
    make_image(1, (23, 37)).save(folder / "cases" / "4.jpg")
    text = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    (folder / "questions.jsonl").write_text("\n".join(text) + "\n")


@pytest.fixture(scope="module")
def files(tokenizer_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("owleval")
    tiny_owl(tokenizer_model, seed=1).save_pretrained(d / "v1")
    tiny_owl2(tokenizer_model).save_pretrained(d / "owl2")
    write_owleval(d / "OwlEval", QUESTIONS)
    return d


def run_owleval(*args, generate=None) -> tuple:
    """owl.main(args) in this process, stdout and stderr captured; every Owl.generate call recorded: its model, prompt
    ids, visual tokens, Sampling, the tokens it gave and how many answer lines were out when it began."""
    out, err, calls = io.StringIO(), io.StringIO(), []
    real = Owl.generate

    def recording(self, ids, pixels=None, sampling=None, *, visual=None, **settings):
        call = dict(model=self, ids=list(ids), visual=visual, sampling=sampling, tokens=[],
                    lines_out=out.getvalue().count("\n"))
        calls.append(call)
        for token in real(self, ids, pixels, sampling, visual=visual, **settings):
            call["tokens"].append(token)
            yield token

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Owl, "generate", generate or recording)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = owl.main([str(a) for a in args])
            except SystemExit as e:
                code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue()), calls


@pytest.fixture(scope="module")
def runs(files) -> dict:
    """The runs the tests read: each checkpoint greedy by default, and with sampling flags."""
    owleval = ["--owleval", files / "OwlEval"]
    return {
        "v1": run_owleval("--checkpoint", files / "v1", *owleval, "--max-new-tokens", NEW),
        "owl2": run_owleval("--checkpoint", files / "owl2", *owleval, "--max-new-tokens", NEW, "--model-id", "owl2-x"),
        "v1 sampled": run_owleval("--checkpoint", files / "v1", *owleval, "--max-new-tokens", 4, "--temperature",
                                  0.7, "--top-k", 5, "--top-p", 0.9, "--seed", 3),
        "owl2 seed": run_owleval("--checkpoint", files / "owl2", *owleval, "--max-new-tokens", 4, "--seed", 3),
    }


def answers(r) -> list:
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def pixels_of(model: Owl, files, name: str) -> torch.Tensor:
    return load_image(str(files / "OwlEval" / "cases" / name), model.image_transform)[None]


@pytest.mark.parametrize("kind, model_id", [("v1", "v1"), ("owl2", "owl2-x")])
def test_one_line_per_question_in_order_with_the_official_keys_each_out_before_the_next_is_asked(runs, kind,
                                                                                                  model_id):
    """model_id: the checkpoint folder's name, or --model-id; each answer is the text of the tokens Owl gave."""
    r, calls = runs[kind]
    lines = answers(r)
    assert [list(a) for a in lines] == [KEYS] * len(QUESTIONS)
    assert [(a["image"], a["question_id"], a["question"]) for a in lines] == \
        [(q["image"], q["question_id"], q["question"]) for q in QUESTIONS]
    assert {a["model_id"] for a in lines} == {model_id}
    assert [c["lines_out"] for c in calls] == list(range(len(QUESTIONS)))  # streamed: printed as answered
    assert [a["answer"] for a in lines] == [c["model"].tokenizer.decode(c["tokens"]) for c in calls]
    assert all(len(c["tokens"]) == NEW and a["answer"].strip() for a, c in zip(lines, calls))


def conversation(kind: str, turns: list) -> str:
    """The prompt of a conversation on one image shown at its first question, written out by hand: turns are
    (question, answer) pairs, the last answer None."""
    if kind == "v1":
        return OWL.start + "\nHuman: <image>" + "".join(
            f"\nHuman: {q}\nAI: " + (a if a is not None else "") for q, a in turns)
    return "".join(f"USER: {'<|image|>' if i == 0 else ''}{q} ASSISTANT:" + ("" if a is None else f" {a.strip()}</s>")
                   for i, (q, a) in enumerate(turns))


@pytest.mark.parametrize("kind", ["v1", "owl2"])
def test_a_multi_turn_question_s_prompt_holds_the_earlier_questions_and_the_answers_owl_gave_them(files, runs, kind):
    """Questions 5 and 6 continue 4's conversation on 4.jpg: their prompts hold 4 (with the image) and Owl's answers,
    in the template, and 4.jpg's visual tokens are the ones passed."""
    r, calls = runs[kind]
    a = [line["answer"] for line in answers(r)]
    q = [line["question"] for line in QUESTIONS]
    model = calls[0]["model"]
    assert calls[2]["ids"] == model.prompt_ids(conversation(kind, [(q[1], a[1]), (q[2], None)]))
    assert calls[3]["ids"] == model.prompt_ids(conversation(kind, [(q[1], a[1]), (q[2], a[2]), (q[3], None)]))
    image = model.encode_images(pixels_of(model, files, "4.jpg"))
    for c in calls[1:4]:
        assert torch.equal(c["visual"], image)


@pytest.mark.parametrize("kind", ["v1", "owl2"])
def test_a_single_turn_question_starts_fresh_even_after_a_conversation_on_its_image(files, runs, kind):
    r, calls = runs[kind]
    template = OWL if kind == "v1" else OWL2
    model = calls[0]["model"]
    for i, image in ((0, "1.jpg"), (1, "4.jpg"), (4, "4.jpg")):
        assert calls[i]["ids"] == model.prompt_ids(template.prompt(QUESTIONS[i]["question"], 1))
        assert torch.equal(calls[i]["visual"], model.encode_images(pixels_of(model, files, image)))


def test_answers_are_greedy_by_default_and_the_sampling_flags_are_honoured(files, runs):
    """Unset, --temperature is 0 (the model's default of 1.0 or 0.2 is not used); given, each flag is the Sampling's.
    --seed alone asks for sampling: the unset flags take the model's defaults."""
    for kind in ("v1", "owl2"):
        samplings = [c["sampling"] for c in runs[kind][1]]
        assert [(s.temperature, s.max_new_tokens) for s in samplings] == [(0.0, NEW)] * len(QUESTIONS)
    _, calls = runs["v1"]  # and greedy is the library's greedy answer
    model = calls[0]["model"]
    ids = model.prompt_ids(OWL.prompt(QUESTIONS[0]["question"], 1))
    assert calls[0]["tokens"] == list(Owl.generate(model, ids, pixels_of(model, files, "1.jpg"), max_new_tokens=NEW))
    r, calls = runs["v1 sampled"]
    assert len(answers(r)) == len(QUESTIONS)
    for c in calls:
        s = c["sampling"]
        assert (s.max_new_tokens, s.temperature, s.top_k, s.top_p) == (4, 0.7, 5, 0.9) and s.generator is not None
        assert len(c["tokens"]) == 4
    r, calls = runs["owl2 seed"]
    assert len(answers(r)) == len(QUESTIONS)
    assert {(c["sampling"].temperature, c["sampling"].top_k) for c in calls} == \
        {(OWL2.defaults["temperature"], OWL2.defaults["top_k"])}


def never(*args, **kwargs):
    raise AssertionError("Owl.generate ran, but the run should have stopped before it")


BAD = {  # case: (the questions, line 3 or line 2 bad; what the sentence names)
    "missing image": (QUESTIONS[:2] + [{**QUESTIONS[4], "image": "9.jpg"}], ["line 3", "9.jpg", "does not exist"]),
    "not JSON": (QUESTIONS[:1] + ['{"image": "1.jpg", "question_id": 2,'] + QUESTIONS[1:],
                 ["line 2", "not valid JSON"]),
    "no question": (QUESTIONS[:2] + [{**QUESTIONS[4], "question": ""}], ["line 3", '"question"']),
    "no turn category": (QUESTIONS[:2] + [{**QUESTIONS[4], "category": ["other"]}], ["line 3", '"category"']),
    "multi_turn on another image": (QUESTIONS[:1] + QUESTIONS[2:3], ["line 2", "multi_turn", "4.jpg"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_missing_image_or_a_malformed_line_exits_2_naming_it_before_anything_is_generated(files, tmp_path, case):
    lines, mentions = BAD[case]
    write_owleval(tmp_path / "OwlEval", lines)
    r, _ = run_owleval("--checkpoint", files / "v1", "--owleval", tmp_path / "OwlEval", generate=never)
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    sentences = r.stderr.strip().splitlines()
    assert len(sentences) == 1 and "Traceback" not in r.stderr, r.stderr
    assert all(m in sentences[0] for m in mentions + ["questions.jsonl"]), sentences[0]


@pytest.mark.parametrize("flags", [["--image", "x.png"], ["--prompt", "Hi"], ["--questions", "q.jsonl"], ["--json"],
                                   ["--show-attention", "a.png"]])
def test_owleval_refuses_the_flags_of_the_other_modes_in_one_sentence(files, flags):
    r, _ = run_owleval("--checkpoint", files / "v1", "--owleval", files / "OwlEval", *flags, generate=never)
    assert (r.returncode, r.stdout) == (2, "")
    assert len(r.stderr.strip().splitlines()) == 1 and "--owleval" in r.stderr and flags[0] in r.stderr
    r, _ = run_owleval("--checkpoint", files / "v1", "--model-id", "m", generate=never)
    assert r.returncode == 2 and "--model-id" in r.stderr and "--owleval" in r.stderr
