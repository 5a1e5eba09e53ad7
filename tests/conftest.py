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
    from llama import LlamaConfig, Tokenizer
    from owl import Owl, OwlConfig
    from vit import ViTConfig

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    cfg = OwlConfig(
        ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
        AbstractorConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96, num_queries=64,
                         llm_hidden_size=96),
        LlamaConfig(vocab_size=sp.get_piece_size(), hidden_size=96, intermediate_size=160, num_layers=2, num_heads=4,
                    max_position_embeddings=512))
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
