"""Shared fixtures: a tiny SentencePiece tokenizer trained here and a tiny random Owl that can use it."""
import io
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The tests compare CPU runs with CPU references; on a machine with a GPU, Owl's CLI and trainer would pick it by
# default. Hidden before anything asks CUDA, for this process and every subprocess it starts.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

SPM_TEXT = [
    "The following is a conversation between a curious human and AI assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "Human: What is in the picture? AI: A red cat sits on a blue mat near the window.",
    "Describe the image in detail. Two dogs play with a ball in the green park under the sun.",
    "How many people are there? Three people walk along the river at night with lanterns.",
    "Which one is bigger, the left shape or the right shape? The square on the left is bigger.",
]


def train_spm(vocab_size: int = 400) -> bytes:
    """A LLaMA-style SentencePiece model, serialised: unk 0, bos 1, eos 2, no pad, BPE with byte fallback, no
    normalisation and whitespace kept as is (so a newline becomes the byte piece <0x0A>, as in LLaMA's tokenizer)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SPM_TEXT * 20), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True, hard_vocab_limit=False,
                                   minloglevel=2)
    return buf.getvalue()


def tiny_owl(tokenizer_model, seed: int = 0):
    """A small random Owl whose vocabulary is exactly the tokenizer's. Every parameter is jittered (so a mis-mapped
    bias or LayerNorm shows), lm_head is scaled up (so greedy decoding does not repeat one token), and the rows of
    unk/bos/eos are zeroed (so greedy decoding never stops early or emits text-less tokens)."""
    import sentencepiece as spm

    from abstractor import AbstractorConfig
    from llama import LlamaConfig
    from owl import OwlConfig
    from vit import ViTConfig

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    cfg = OwlConfig(
        ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
        AbstractorConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96, num_queries=64,
                         llm_hidden_size=96),
        LlamaConfig(vocab_size=sp.get_piece_size(), hidden_size=96, intermediate_size=160, num_layers=2, num_heads=4,
                    max_position_embeddings=512))
    return jittered_owl(cfg, tokenizer_model, seed)


def jittered_owl(cfg, tokenizer_model, seed: int = 0):
    """Owl(cfg) with random weights, every parameter jittered, lm_head scaled up and its unk/bos/eos rows zeroed (see
    tiny_owl), and the test tokenizer attached; in eval mode."""
    import sentencepiece as spm

    from llama import Tokenizer
    from owl import Owl

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    torch.manual_seed(seed)
    model = Owl(cfg)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.language_model.lm_head.weight.mul_(30.0)
        model.language_model.lm_head.weight[[sp.unk_id(), sp.bos_id(), sp.eos_id()]] = 0.0
    model.tokenizer = Tokenizer(tokenizer_model)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory):
    """Path of a tiny tokenizer.model, trained once per test session."""
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(train_spm())
    return path


def write_huge_png(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height 1-bit pixels but whose data is a few bytes: decoding it would fail,
    so an error that names its size proves the size was refused from the header, before decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale, no interlace
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
                     + chunk(b"IEND", b""))


def assert_close(actual, expected, ops: int = 1, dtype=None) -> None:
    """actual == expected up to rounding: each value may be off by `ops` roundings of the dtype (float32 unless
    given), relative to the largest value of the reference. A sum of n products carries about sqrt(n) roundings and
    the summation order differs between threads and kernels, so a caller passes the depth of its computation, not a
    tolerance tuned to one machine. A real bug (a wrong layout, a missing term) is off by far more than that."""
    dtype = dtype or (expected.dtype if expected.is_floating_point() else torch.float32)
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    atol = ops * torch.finfo(dtype).eps * scale
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol, rtol=0)


# --- training runs, shared by test_train.py and test_tiny.py ------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# GPUs hidden: these runs are compared with each other and with CPU results, bit for bit
TRAIN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}
TIMEOUT = 300  # seconds for any one training run here; the slowest takes about 30 on 2 cores
SMALL = ["--batch-size", "8", "--seq-len", "160"]


def subprocess_run(cmd, timeout=TIMEOUT):
    """subprocess.run with a timeout that also ends the children (torchrun's ranks): a run that hangs fails the test."""
    import signal
    import subprocess

    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=TRAIN_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"{' '.join(map(str, cmd))} did not end within {timeout} s")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_script(script: str, *args, check=True):
    """python SCRIPT ARGS in the repository (train.py, tiny.py); fails the test with its stderr unless it succeeds."""
    p = subprocess_run([sys.executable, os.path.join(ROOT, script), *map(str, args)])
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def stage1_args(synth, pretrained) -> list:
    """train.py's stage 1 on the small synthetic data, from the tiny stand-ins in pretrained/llm and pretrained/vit."""
    return ["--stage", "1", "--llm-init", pretrained / "llm", "--vit-init", pretrained / "vit",
            "--data", synth / "stage1.jsonl", "--data", synth / "stage1_single.jsonl"]


def stage2_args(synth, init) -> list:
    """train.py's stage 2 on the small synthetic data, from the Owl checkpoint init."""
    return ["--stage", "2", "--init", init, "--data", synth / "stage2_owl.jsonl", "--data",
            synth / "stage2_llava.json", "--data", f"{synth / 'stage2_alpaca.json'}:0.3"]


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """A small synthetic world (synthetic.py), written once per test session."""
    import synthetic
    from pathlib import Path

    d = tmp_path_factory.mktemp("synth")
    synthetic.synth(str(d), seed=3, n_train=120, n_owl=60, n_llava=30, n_alpaca=30, n_heldout=10, n_reading=60,
                    n_drill=60, n_lists=60)
    return Path(d)


@pytest.fixture(scope="session")
def pretrained(synth, tmp_path_factory):
    """`tiny.py pretrain` for a few steps: OUT/llm (an HF LLaMA folder) and OUT/vit (an HF CLIP vision folder)."""
    out = tmp_path_factory.mktemp("runs")
    run_script("tiny.py", "pretrain", "--data-dir", synth, "--out-dir", out, "--steps", "20", "--drill-steps", "5",
               "--vision-steps", "4", "--eval-samples", "10", *SMALL)
    return out


@pytest.fixture(scope="session")
def stage1(synth, pretrained):
    """pretrained's folder with a 3-step stage 1 added (OUT/stage1), for the tests that start from stage 1."""
    run_script("train.py", *stage1_args(synth, pretrained), "--out-dir", pretrained, "--steps", "3", *SMALL)
    return pretrained
