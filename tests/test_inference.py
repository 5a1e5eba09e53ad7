"""Inference beyond one question, in this process on a tiny random Owl: batched answers are the one-at-a-time
answers token for token, whatever the pads hold; the attention picture shows softmax(q k^T / sqrt(d)) of f_K's last
layer over the patches; a huge image is refused from its header. The chat's tests are in test_chat.py."""
import copy
import math
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import assert_close, tiny_owl, write_huge_png
from attention import CAPTION, COLUMNS, PANEL, attention_maps, draw_attention
from owl import Sampling, UserError, load_image, render_prompt

QUESTIONS = [  # clearly different lengths and image counts
    ("Hi", 0),
    ("Describe the image in detail: the shapes, their colours, where they are and how many there are.", 1),
    ("Which one is bigger, the left shape or the right shape?", 2),
    ("How many people are there?", 1),
]


@pytest.fixture(scope="module")
def model(tokenizer_model):
    return tiny_owl(tokenizer_model, seed=2)


def noise_image(seed: int, size=(40, 28)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def pixels_of(model, seeds) -> torch.Tensor:
    return torch.stack([model.image_transform(noise_image(s)) for s in seeds]) if seeds else None


def prompts(model) -> list:
    """(ids, pixels) for each of QUESTIONS, every image a different one."""
    out, seed = [], 0
    for question, n in QUESTIONS:
        out.append((model.prompt_ids(render_prompt(question, n)), pixels_of(model, list(range(seed, seed + n)))))
        seed += n
    return out


# --- batched generation ----------------------------------------------------------------------------------------------

def test_batched_greedy_answers_equal_one_at_a_time_answers_token_for_token(model):
    batch = prompts(model)
    lengths = [len(ids) for ids, _ in batch]
    assert len(set(lengths)) == 4 and max(lengths) - min(lengths) > 150, lengths  # much padding in the batch
    alone = [list(model.generate(ids, pixels, max_new_tokens=16, temperature=0.0)) for ids, pixels in batch]
    together = model.generate_batch(batch, max_new_tokens=16, temperature=0.0)
    assert together == alone
    assert all(len(a) == 16 for a in alone) and len({tuple(a) for a in alone}) == 4


def test_sampling_travels_as_one_value_and_its_fields_as_keywords_override_it(model):
    ids, pixels = prompts(model)[1]
    seeded = lambda: torch.Generator().manual_seed(3)
    sampled = list(model.generate(ids, pixels, Sampling(max_new_tokens=8, temperature=1.0, top_k=5, generator=seeded())))
    assert sampled == list(model.generate(ids, pixels, max_new_tokens=8, temperature=1.0, top_k=5, generator=seeded()))
    greedy = list(model.generate(ids, pixels, max_new_tokens=8))  # Sampling's defaults: greedy
    assert greedy == list(model.generate(ids, pixels, Sampling(8, 1.0, 5, generator=seeded()), temperature=0.0))
    assert sampled != greedy and len(sampled) == len(greedy) == 8
    batch = [(ids, pixels), prompts(model)[0]]
    assert model.generate_batch(batch, Sampling(max_new_tokens=8), max_new_tokens=4)[0] == greedy[:4]


def test_a_prompt_that_fills_the_context_is_refused_before_anything_is_generated(model):
    context = model.cfg.text.max_position_embeddings
    ids = [model.tokenizer.bos_id] + [5] * (context - 1)  # the whole context: no position left for an answer
    with pytest.raises(ValueError, match=f"^the prompt is {context} tokens long, more than the context of {context} "):
        next(model.generate(ids))
    with pytest.raises(ValueError, match=f"^a prompt is {context} tokens long"):
        model.generate_batch([(ids[:10], None), (ids, None)])
    assert len(list(model.generate(ids[:-1], max_new_tokens=1))) == 1  # one token shorter, it answers


def padded_embeddings(llm, rows) -> tuple:
    """Left-padded input embeddings (B, T, D) of token id rows, and the rows' lengths."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    with torch.no_grad():
        return llm.model.embed_tokens(ids), [len(r) for r in rows]


def random_rows(lengths, vocab, seed=0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def alone(llm, rows, **kw) -> list:
    return [list(llm.generate(torch.tensor([r]), **kw)) for r in rows]


def test_what_the_pads_hold_changes_no_answer(model):
    """The pads are hidden from every query: filling them with large noise gives the same answers."""
    llm = model.language_model
    rows = random_rows([5, 23, 40], llm.cfg.vocab_size)
    embeds, lengths = padded_embeddings(llm, rows)
    noisy = embeds.clone()
    for b, n in enumerate(lengths):
        noisy[b, : embeds.shape[1] - n] = 10 * torch.randn(embeds.shape[1] - n, embeds.shape[2])
    answers = llm.generate_batch(embeds, lengths, max_new_tokens=10)
    assert answers == llm.generate_batch(noisy, lengths, max_new_tokens=10) == alone(llm, rows, max_new_tokens=10)


def test_in_bf16_too_the_pads_are_hidden_at_every_step(model):
    """In bf16 (PyTorch's other attention kernel) the pads stay hidden at every step too: noise in them changes no
    answer, and each row answers as it does alone up to bf16 rounding (the first tokens agree)."""
    llm = copy.deepcopy(model.language_model).to(torch.bfloat16)
    rows = random_rows([5, 23, 40], llm.cfg.vocab_size, seed=3)
    embeds, lengths = padded_embeddings(llm, rows)
    noisy = embeds.clone()
    for b, n in enumerate(lengths):
        noisy[b, : embeds.shape[1] - n] = 10 * torch.randn(embeds.shape[1] - n, embeds.shape[2])
    answers = llm.generate_batch(embeds, lengths, max_new_tokens=10, eos_id=-1)
    assert answers == llm.generate_batch(noisy, lengths, max_new_tokens=10, eos_id=-1)
    assert [a[:2] for a in answers] == [a[:2] for a in alone(llm, rows, max_new_tokens=2, eos_id=-1)]


def test_a_row_that_ends_with_eos_leaves_the_batch_and_the_others_go_on(model):
    llm = model.language_model
    rows = random_rows([7, 30, 18], llm.cfg.vocab_size, seed=1)
    free = alone(llm, rows, max_new_tokens=10, eos_id=-1)
    eos = next(t for i, t in enumerate(free[1]) if i >= 2 and t not in free[1][:i])  # row 1 ends early on it
    expected = alone(llm, rows, max_new_tokens=10, eos_id=eos)
    embeds, lengths = padded_embeddings(llm, rows)
    assert llm.generate_batch(embeds, lengths, max_new_tokens=10, eos_id=eos) == expected
    assert expected[1][-1] == eos and len(expected[1]) < 10 and max(len(a) for a in expected) == 10


def test_a_row_stops_at_the_context_as_it_does_alone(model):
    llm = model.language_model
    context = llm.cfg.max_position_embeddings
    rows = random_rows([context - 5, 12], llm.cfg.vocab_size, seed=2)
    embeds, lengths = padded_embeddings(llm, rows)
    answers = llm.generate_batch(embeds, lengths, max_new_tokens=20)
    assert answers == alone(llm, rows, max_new_tokens=20)
    assert [len(a) for a in answers] == [5, 20]


def allowed_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> set:
    """The tokens that sampling with top-k, then top-p, may draw from (1-D logits), written out: the k most likely,
    then the fewest of those whose probability mass (at the temperature) reaches p."""
    kept = torch.topk(logits, top_k).indices.tolist()
    probs = (logits[kept] / temperature).softmax(-1).tolist()  # the k kept tokens, renormalised, most likely first
    mass, allowed = 0.0, set()
    for token, prob in zip(kept, probs):
        allowed.add(token)
        mass += prob
        if mass >= top_p:
            break
    return allowed


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (4.0, 50, 0.6)])
def test_batch_sampling_is_seeded_and_draws_each_token_from_its_rows_top_k_top_p_set(model, temperature, top_k, top_p):
    llm = model.language_model
    rows = random_rows([6, 15, 11], llm.cfg.vocab_size, seed=3)
    embeds, lengths = padded_embeddings(llm, rows)

    def sampled(seed):
        return llm.generate_batch(embeds, lengths, 10, eos_id=-1, temperature=temperature, top_k=top_k, top_p=top_p,
                                  generator=torch.Generator().manual_seed(seed))

    answers = sampled(7)
    assert answers == sampled(7)  # one seed, one answer
    assert answers != sampled(8)  # another seed, another draw: sampling, not greedy decoding
    assert answers != llm.generate_batch(embeds, lengths, 10, eos_id=-1)
    with torch.no_grad():
        for row, answer in zip(rows, answers):
            logits = llm(torch.tensor([row + answer]))[0, len(row) - 1: -1]  # the logits each answer token came from
            for step, token in enumerate(answer):
                assert token in allowed_tokens(logits[step], temperature, top_k, top_p), (step, token)


# --- where the queries look ------------------------------------------------------------------------------------------

def last_layer_attention_by_hand(model, pixels) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) of f_K's last layer, from its weights, averaged over heads: (Q, Q + N)."""
    ab, cfg = model.abstractor, model.cfg.abstractor
    Q, H, hd = cfg.num_queries, cfg.num_heads, cfg.hidden_size // cfg.num_heads
    with torch.no_grad():
        x = model.vision_model(pixels)  # (1, N, D), CLS first
        q = ab.query_tokens
        for layer in ab.layers[:-1]:
            q, _ = layer(q, x)
        last = ab.layers[-1]
        norm = lambda t, ln: F.layer_norm(t, t.shape[-1:], ln.weight, ln.bias, ln.eps)
        qn = norm(q, last.norm1)
        keys_in = torch.cat([qn, norm(x, last.normk)], dim=1)  # the queries are keys too
        queries = (qn @ last.query.weight.T + last.query.bias).view(Q, H, hd).transpose(0, 1)  # (H, Q, hd)
        keys = (keys_in @ last.key.weight.T + last.key.bias).view(-1, H, hd).transpose(0, 1)  # (H, Q + N, hd)
        return torch.softmax(queries @ keys.transpose(1, 2) / math.sqrt(hd), dim=-1).mean(0)


def test_attention_maps_are_the_last_layer_softmax_over_the_patch_grid(model):
    pixels = pixels_of(model, [3])
    maps, labels = attention_maps(model, pixels)
    Q, grid = model.cfg.abstractor.num_queries, 4  # 32-px images, 8-px patches
    patches = last_layer_attention_by_hand(model, pixels)[:, Q + 1:].reshape(Q, grid, grid)  # no queries, no CLS
    assert labels == ["all queries", "query 0", "query 21", "query 42", "query 63"]
    assert maps.shape == (5, grid, grid)
    assert_close(maps[0], patches.mean(0), ops=4)
    for k, j in enumerate([0, 21, 42, 63]):
        assert_close(maps[1 + k], patches[j], ops=4)
    assert (maps[1:] - maps[1:].mean()).abs().max() > 1e-4  # the queries do not all look alike


def panel(sheet: Image.Image, k: int) -> np.ndarray:
    x, y = k % COLUMNS * PANEL, k // COLUMNS * (CAPTION + PANEL) + CAPTION
    return np.asarray(sheet.crop((x, y, x + PANEL, y + PANEL)), dtype=np.float32)


def test_the_heat_map_panel_is_hottest_where_the_map_is_and_follows_it(model):
    t = model.image_transform
    grey = ((0.5 - torch.tensor(t.mean)) / torch.tensor(t.std))[:, None, None].expand(3, 32, 32)[None]
    maps = torch.full((2, 4, 4), 0.01)
    maps[1, 2, 1] = 0.3
    sheet = draw_attention(grey, t, maps, ["a", "b"])
    assert sheet.size == (COLUMNS * PANEL, 1 * (CAPTION + PANEL))
    cell = PANEL // 4
    redness = panel(sheet, 2)[..., 0] - panel(sheet, 2)[..., 2]  # (PANEL, PANEL)
    per_cell = redness[: 4 * cell, : 4 * cell].reshape(4, cell, 4, cell).mean((1, 3))
    assert np.unravel_index(per_cell.argmax(), per_cell.shape) == (2, 1)
    moved = maps.clone()
    moved[1, 2, 1], moved[1, 0, 3] = 0.01, 0.3
    again = draw_attention(grey, t, moved, ["a", "b"])
    assert np.array_equal(panel(again, 0), panel(sheet, 0)) and np.array_equal(panel(again, 1), panel(sheet, 1))
    assert not np.array_equal(panel(again, 2), panel(sheet, 2))


# --- huge images -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", [10000, 20000])  # above PIL's own warning (89 MP) and error (179 MP) levels
def test_an_image_over_the_pixel_limit_is_refused_from_its_header_before_decoding(model, tmp_path, side):
    path = tmp_path / "huge.png"
    write_huge_png(path, side, side)
    pil_limit = Image.MAX_IMAGE_PIXELS
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would be an error here
        with pytest.raises(UserError, match=f"{side}x{side} pixels, more than the limit of 40000000"):
            load_image(str(path), model.image_transform)
    assert time.perf_counter() - start < 0.5
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # PIL's check is back on for everyone else


def test_max_pixels_is_the_limit(model, tmp_path):
    noise_image(0, size=(40, 28)).save(tmp_path / "img.png")  # 1120 pixels
    with pytest.raises(UserError, match="40x28"):
        load_image(str(tmp_path / "img.png"), model.image_transform, max_pixels=1119)
    assert load_image(str(tmp_path / "img.png"), model.image_transform, max_pixels=1120).shape == (3, 32, 32)
