"""The command line, run as a user runs it: `python owl.py ...` in a subprocess, on a tiny checkpoint made here with
the preprocessor_config.json the hub ships. It prints exactly the answer the library gives (greedy, and sampled with
a seed), and every input a user can get wrong ends with exit status 2 and one sentence on stderr, never a traceback.
The runs that generate go four at a time as subprocesses (each pays ~2 s of interpreter start-up); the runs that only
check an input error call owl.main in this process."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import tiny_owl, write_huge_png
import owl
from attention import CAPTION, COLUMNS, PANEL, attention_maps, draw_attention
from owl import Owl, load_image, render_prompt, render_turn

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is in the picture?"
GREEDY = ["--max-new-tokens", "12", "--temperature", "0"]
FLAGS = ["--checkpoint", "--image", "--prompt", "--raw-prompt", "--max-new-tokens", "--temperature", "--top-k",
         "--top-p", "--seed", "--dtype", "--device", "--questions", "--batch-size", "--show-attention", "--json",
         "--max-pixels"]
KEY_REMOVED = "abstractor.encoder.layers.1.crossattention.attention.value.bias"
KEY_RESHAPED = "vision_model.encoder.layers.0.mlp.fc1.weight"  # (128, 64) in the tiny model


def owl_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}  # four at a time on few cores
    return subprocess.run([sys.executable, "owl.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, encoding="utf-8", timeout=120)


def owl_main(*args) -> subprocess.CompletedProcess:
    """owl.main in this process, with what it prints captured: for the runs that stop before generating."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = owl.main([str(a) for a in args])
        except SystemExit as e:  # argparse's own exit (--help, an unknown flag)
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


HUB_PREPROCESSOR = {"resolution": 224, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                    "image_std": [0.26862954, 0.26130258, 0.27577711]}  # as MAGAer13/mplug-owl-llama-7b ships it


def official_pixels(path, size: int = 32) -> torch.Tensor:
    """The official preprocessing written out: squash to size x size (bicubic) as opened, RGB, /255, CLIP mean/std."""
    with Image.open(path) as f:
        rgb = f.resize((size, size), Image.BICUBIC).convert("RGB")
    mean, std = np.float32(HUB_PREPROCESSOR["image_mean"]), np.float32(HUB_PREPROCESSOR["image_std"])
    x = (np.asarray(rgb, dtype=np.float32) / np.float32(255) - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


@pytest.fixture(scope="module")
def files(tokenizer_model, tmp_path_factory):
    """A tiny checkpoint, its broken variants, and good and bad image files."""
    d = tmp_path_factory.mktemp("cli")
    tiny_owl(tokenizer_model, seed=1).save_pretrained(d / "ckpt")
    (d / "ckpt" / "preprocessor_config.json").write_text(json.dumps(HUB_PREPROCESSOR))
    for i, size in enumerate([(40, 28), (23, 37)]):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(d / f"img{i}.png")
    (d / "x.png").write_text("this is text, not a picture\n")
    png = (d / "img0.png").read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    write_huge_png(d / "huge.png", 20000, 20000)  # 400 megapixels in 70 bytes
    questions = [{"image": ["img0.png"], "prompt": QUESTION}, {"prompt": "Hi"},
                 {"image": ["img1.png", str(d / "img0.png")], "prompt": "Which one is bigger, the left or the right?"},
                 {"image": [], "prompt": "Describe the image in detail, every shape and colour, and where it is."}]
    lines = [json.dumps(q) for q in questions]
    (d / "questions.jsonl").write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")  # a blank line is skipped
    for name, bad in BAD_LINES.items():
        (d / f"{name}.jsonl").write_text("\n".join([lines[0], bad, lines[1]]) + "\n")  # the bad one is line 2

    def variant(name, edit_files=None, edit_weights=None):
        shutil.copytree(d / "ckpt", d / name)
        if edit_files:
            edit_files(d / name)
        if edit_weights:
            weights = load_file(d / name / "model.safetensors")
            edit_weights(weights)
            save_file(weights, d / name / "model.safetensors")

    variant("no-config", lambda p: (p / "config.json").unlink())
    variant("no-weights", lambda p: (p / "model.safetensors").unlink())
    variant("no-tokenizer", lambda p: (p / "tokenizer.model").unlink())
    variant("llava", lambda p: (p / "config.json").write_text(
        json.dumps({**json.loads((p / "config.json").read_text()), "model_type": "llava"})))
    variant("key-removed", edit_weights=lambda w: w.pop(KEY_REMOVED))
    variant("key-reshaped", edit_weights=lambda w: w.update({KEY_RESHAPED: w[KEY_RESHAPED].t().contiguous()}))
    variant("truncated-weights", lambda p: (p / "model.safetensors").write_bytes(
        (p / "model.safetensors").read_bytes()[:5000]))
    variant("pickled-code", lambda p: write_bin_with_code(p, d / "pwned"))
    variant("index-outside", lambda p: write_index(p, "../../../etc/passwd"))
    variant("config-not-json", lambda p: (p / "config.json").write_text("{model_type: mplug-owl}"))
    return d


def write_index(folder: Path, shard: str) -> None:
    """A shard index whose weight_map sends one key to `shard`, the others to the real weights file."""
    keys = list(load_file(folder / "model.safetensors"))
    weight_map = {k: "model.safetensors" for k in keys} | {keys[0]: shard}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


class WritesMarker:
    """Unpickling this calls open(marker, "w"): code that runs, with a file to show it ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_bin_with_code(folder: Path, marker: Path) -> None:
    """The checkpoint as pytorch_model.bin, one of its tensors swapped for a pickled call."""
    weights = dict(load_file(folder / "model.safetensors"))
    weights["language_model.model.norm.weight"] = WritesMarker(marker)
    torch.save(weights, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


BAD_LINES = {"not-json": '{"prompt": "Hi"', "no-prompt": '{"image": ["img0.png"]}',
             "image-not-a-list": '{"image": "img0.png", "prompt": "Hi"}',
             "missing-image": '{"image": ["nope.png"], "prompt": "Hi"}',
             "unreadable-image": '{"image": ["x.png"], "prompt": "Hi"}'}


def bad_inputs(d: Path) -> dict:
    """name -> (argv, what the one-sentence error must mention)."""
    ok = ["--checkpoint", d / "ckpt", "--image", d / "img0.png"]
    prompt = ["--prompt", QUESTION, *GREEDY]
    return {
        "missing image file": (["--checkpoint", d / "ckpt", "--image", d / "nope.png", *prompt], ["nope.png"]),
        "text file named .png": (["--checkpoint", d / "ckpt", "--image", d / "x.png", *prompt], ["x.png"]),
        "truncated png": (["--checkpoint", d / "ckpt", "--image", d / "truncated.png", *prompt], ["truncated.png"]),
        "checkpoint folder missing": (["--checkpoint", d / "no-such-ckpt", *prompt], ["no-such-ckpt", "not exist"]),
        "no config.json": (["--checkpoint", d / "no-config", *prompt], ["config.json"]),
        "no weights": (["--checkpoint", d / "no-weights", *prompt], ["model.safetensors"]),
        "no tokenizer.model": (["--checkpoint", d / "no-tokenizer", *prompt], ["tokenizer.model"]),
        "another model_type": (["--checkpoint", d / "llava", *prompt], ["llava", "mplug-owl"]),
        "a key removed": (["--checkpoint", d / "key-removed", *prompt], [KEY_REMOVED, "missing"]),
        "a shape mismatch": (["--checkpoint", d / "key-reshaped", *prompt], [KEY_RESHAPED, "(64, 128)", "(128, 64)"]),
        "truncated weights file": (["--checkpoint", d / "truncated-weights", *prompt], ["truncated-weights"]),
        "a .bin that holds code": (["--checkpoint", d / "pickled-code", *prompt], ["pickled-code", "more than tensors"]),
        "a shard index naming a file outside the folder": (["--checkpoint", d / "index-outside", *prompt],
                                                          ["model.safetensors.index.json", "../../../etc/passwd"]),
        "config.json that is not JSON": (["--checkpoint", d / "config-not-json", *prompt],
                                         ["config.json", "not valid JSON"]),
        "raw prompt with wrong <image> count": (
            [*ok, "--raw-prompt", "--prompt", "Human: <image>\nHuman: <image>\nAI: ", *GREEDY], ["<image>", "2", "1"]),
        "raw prompt with too few <image> tags": (
            [*ok, "--image", d / "img1.png", "--raw-prompt", "--prompt", "Human: <image>\nAI: ", *GREEDY],
            ["1 <image> tags but 2 images"]),
        "<image> in a plain question": ([*ok, "--prompt", "<image> what is it?", *GREEDY], ["<image>", "--raw-prompt"]),
        "prompt longer than the context": ([*ok, "--prompt", "the cat " * 400, *GREEDY], ["context"]),
        "empty prompt": ([*ok, "--prompt", "  ", *GREEDY], ["empty"]),
        "image over the pixel limit": (["--checkpoint", d / "ckpt", "--image", d / "huge.png", *prompt],
                                       ["huge.png", "20000x20000", "--max-pixels"]),
        "--json without --prompt": ([*ok, "--json", *GREEDY], ["--json", "--prompt"]),
        "--show-attention without --image": (["--checkpoint", d / "ckpt", "--show-attention", d / "a.png", *prompt],
                                             ["--show-attention", "--image"]),
        "--questions with --prompt": (["--checkpoint", d / "ckpt", "--questions", d / "questions.jsonl", *prompt],
                                      ["--questions", "--prompt"]),
        # batches of one: a bad line stops the run before line 1's answer is printed
        **{f"questions: {name}": (["--checkpoint", d / "ckpt", "--questions", d / f"{name}.jsonl", "--batch-size", 1,
                                   *GREEDY], ["line 2", f"{name}.jsonl"]) for name in BAD_LINES},
        "unknown flag": (["--checkpoint", d / "ckpt", "--no-such-flag", "--prompt", QUESTION],
                         ["unrecognized arguments: --no-such-flag"]),
    }


RAW_TWO_IMAGES = "Human: <image>\nHuman: <image>\nHuman: Which one is bigger?\nAI: "


SAMPLED = ["--max-new-tokens", "12", "--temperature", "1", "--seed", "5"]  # top-k 3, the release's default


@pytest.fixture(scope="module")
def runs(files) -> dict:
    """Every run of this file: those that generate as subprocesses, four at a time; the input errors in-process."""
    d = files
    argvs = {
        "answer": ["--checkpoint", d / "ckpt", "--image", d / "img0.png", "--prompt", QUESTION, *GREEDY],
        "sampled": ["--checkpoint", d / "ckpt", "--image", d / "img0.png", "--prompt", QUESTION, *SAMPLED],
        "help": ["--help"],
        "raw two images": ["--checkpoint", d / "ckpt", "--image", d / "img0.png", "--image", d / "img1.png",
                           "--raw-prompt", "--prompt", RAW_TWO_IMAGES, *GREEDY],
        "json": ["--checkpoint", d / "ckpt", "--image", d / "img0.png", "--prompt", QUESTION, "--json", *GREEDY],
        "questions": ["--checkpoint", d / "ckpt", "--questions", d / "questions.jsonl", "--batch-size", "3", *GREEDY],
        "questions, a bad line": ["--checkpoint", d / "ckpt", "--questions", d / "missing-image.jsonl", *GREEDY],
        "show attention": ["--checkpoint", d / "ckpt", "--image", d / "img0.png", "--image", d / "img1.png",
                           "--raw-prompt", "--prompt", RAW_TWO_IMAGES, "--show-attention", d / "attention.png", *GREEDY],
    }
    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(argvs, pool.map(lambda argv: owl_cli(*argv), argvs.values())))
    results.update({name: owl_main(*argv) for name, (argv, _) in bad_inputs(d).items()})
    # bf16 in this process, beside the library's bf16 answer: both run the same kernels on the same threads
    results["bfloat16"] = owl_main("--checkpoint", d / "ckpt", "--image", d / "img0.png", "--prompt", QUESTION,
                                   "--dtype", "bfloat16", *GREEDY)
    return results


def library_answer(checkpoint: Path, text: str, images: list, dtype=torch.float32, seed=None) -> str:
    """What the library answers in this process: Owl.from_pretrained(...).generate on pixels made by the official
    preprocessing written out here, decoded; greedy, or sampled at temperature 1 among the top 3 with a seed."""
    model = Owl.from_pretrained(checkpoint, dtype=dtype)
    pixels = torch.stack([official_pixels(p) for p in images])
    sampling = dict(temperature=0.0) if seed is None else \
        dict(temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(seed))
    ids = list(model.generate(model.prompt_ids(text), pixels, max_new_tokens=12, **sampling))
    assert len(ids) == 12
    return model.tokenizer.decode(ids)


def greedy_answer(checkpoint: Path, text: str, images: list) -> str:
    return library_answer(checkpoint, text, images)


def test_cli_prints_exactly_the_greedy_answer_of_the_library(files, runs):
    r = runs["answer"]
    assert r.returncode == 0, r.stderr
    expected = greedy_answer(files / "ckpt", render_prompt(QUESTION, 1), [files / "img0.png"])
    assert expected.strip()
    assert r.stdout == expected + "\n"
    assert "Traceback" not in r.stderr


def test_cli_raw_prompt_places_two_images_and_answers(files, runs):
    r = runs["raw two images"]
    assert r.returncode == 0, r.stderr
    expected = greedy_answer(files / "ckpt", RAW_TWO_IMAGES, [files / "img0.png", files / "img1.png"])
    assert r.stdout == expected + "\n"


def test_cli_with_a_seed_samples_exactly_what_the_library_samples_with_that_seed(files, runs):
    r = runs["sampled"]
    assert r.returncode == 0, r.stderr
    prompt, image = render_prompt(QUESTION, 1), [files / "img0.png"]
    assert r.stdout == library_answer(files / "ckpt", prompt, image, seed=5) + "\n"
    # the seed is what chose: another seed, and greedy decoding, answer otherwise
    assert r.stdout != library_answer(files / "ckpt", prompt, image, seed=6) + "\n"
    assert r.stdout != runs["answer"].stdout


def test_cli_runs_in_bfloat16_and_answers_as_the_library_does_in_bfloat16(files, runs):
    r = runs["bfloat16"]
    assert r.returncode == 0, r.stderr
    expected = library_answer(files / "ckpt", render_prompt(QUESTION, 1), [files / "img0.png"], dtype=torch.bfloat16)
    assert expected.strip() and r.stdout == expected + "\n"


def test_cli_help_names_every_flag(runs):
    r = runs["help"]
    assert r.returncode == 0, r.stderr
    missing = [flag for flag in FLAGS if flag not in r.stdout]
    assert missing == []


@pytest.mark.parametrize("case", list(bad_inputs(Path("names-only"))))
def test_cli_bad_input_exits_2_with_one_sentence_and_no_traceback(files, runs, case):
    """In-process: an exception that escaped owl.main would fail this test with its traceback."""
    r = runs[case]
    must_mention = bad_inputs(files)[case][1]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    if case == "unknown flag":  # argparse's usage line, then its one sentence
        assert lines[0].startswith("usage:") and ": error: " in lines[-1]
        lines = lines[-1:]
    assert len(lines) == 1, r.stderr
    assert all(thing in lines[0] for thing in must_mention), lines[0]


def test_cli_a_bad_line_of_a_chat_py_mode_exits_2_in_one_sentence_as_a_user_runs_it(files, runs):
    """chat.py raises owl.UserError: `python owl.py` must catch that class, not a copy of it in __main__."""
    r = runs["questions, a bad line"]
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stderr[-2000:])
    path = files / "missing-image.jsonl"
    assert r.stderr.splitlines() == [f"owl: line 2 of {path}: image file {files / 'nope.png'} does not exist"]


def test_cli_a_bin_that_holds_code_is_refused_without_running_it(files, runs):
    assert runs["a .bin that holds code"].returncode == 2
    assert not (files / "pwned").exists()  # the pickled call never ran


def test_cli_without_prompt_chats_with_history_in_the_template(files):
    """Two questions on stdin: the second is answered with the first turn and its answer in the prompt."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    q1, q2 = QUESTION, "And what else?"
    r = subprocess.run([sys.executable, "owl.py", "--checkpoint", str(files / "ckpt"), "--image",
                        str(files / "img0.png"), *GREEDY], cwd=ROOT, env=env, input=f"{q1}\n{q2}\n",
                       capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    a1 = greedy_answer(files / "ckpt", render_prompt(q1, 1), [files / "img0.png"])
    a2 = greedy_answer(files / "ckpt", render_prompt(q1, 1) + a1 + render_turn(q2), [files / "img0.png"])
    assert r.stdout == f"{a1}\n{a2}\n"


def test_cli_json_prints_one_object_with_the_plain_answer_counts_and_timings(files, runs):
    r = runs["json"]
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1
    result = json.loads(r.stdout)
    assert result["answer"] + "\n" == runs["answer"].stdout
    model = Owl.from_pretrained(files / "ckpt")
    assert result["prompt_tokens"] == len(model.prompt_ids(render_prompt(QUESTION, 1)))
    assert (result["image_tokens"], result["generated_tokens"]) == (65, 12)
    assert 0 < result["first_token_s"] <= result["generate_s"]
    assert all(result[k] >= 0 for k in ("load_s", "preprocess_s"))
    assert result["tokens_per_s"] == pytest.approx(12 / result["generate_s"], rel=0.01)


def test_cli_questions_answers_every_line_in_batches_as_one_at_a_time(files, runs):
    """Batches of 3 (0, 1 and 2 images, lengths far apart, left-padded): each answer is the library's greedy answer
    to that question alone, in the file's order; image paths are relative to the file's folder or absolute."""
    r = runs["questions"]
    assert r.returncode == 0, r.stderr
    answers = [json.loads(line) for line in r.stdout.splitlines()]
    asked = [json.loads(line) for line in (files / "questions.jsonl").read_text().splitlines() if line]
    assert [(a["image"], a["prompt"]) for a in answers] == [(q.get("image", []), q["prompt"]) for q in asked]
    model = Owl.from_pretrained(files / "ckpt")
    for a in answers:
        paths = [p if Path(p).is_absolute() else files / p for p in a["image"]]
        pixels = torch.stack([load_image(str(p), model.image_transform) for p in paths]) if paths else None
        ids = model.prompt_ids(render_prompt(a["prompt"], len(paths)))
        assert a["answer"] == model.tokenizer.decode(model.generate(ids, pixels, max_new_tokens=12, temperature=0.0))


def test_cli_show_attention_draws_the_first_image_s_sheet_and_still_answers(files, runs):
    r = runs["show attention"]
    assert r.returncode == 0, r.stderr
    assert r.stdout == runs["raw two images"].stdout
    with Image.open(files / "attention.png") as f:
        assert f.format == "PNG" and f.size == (COLUMNS * PANEL, 2 * (CAPTION + PANEL))  # 6 panels, 3 to a row
        drawn = np.asarray(f.convert("RGB"), dtype=np.int16)
    model = Owl.from_pretrained(files / "ckpt")
    pixels = load_image(str(files / "img0.png"), model.image_transform)[None]
    sheet = draw_attention(pixels, model.image_transform, *attention_maps(model, pixels))
    assert np.abs(drawn - np.asarray(sheet, dtype=np.int16)).max() <= 1
