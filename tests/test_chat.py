"""The chat (chat.py), in this process on a tiny random Owl: it keeps its history in the template, puts /image images
in the next turn, forgets the oldest turns and their images when the context fills, and refuses a turn that alone
does not fit, then goes on."""
import pytest
import torch

from chat import chat
from conftest import assert_close, tiny_owl
from owl import SYSTEM, build_parser, load_image, render_prompt, render_turn
from test_inference import noise_image


@pytest.fixture(scope="module")
def model(tokenizer_model):
    return tiny_owl(tokenizer_model, seed=2)


def record_generate(model, monkeypatch) -> list:
    """Wrap model.generate to record each call's (ids, images, answer tokens); the images as their visual tokens
    (N, Q+1, D), however the caller passed them (a chat encodes each image once and passes the tokens)."""
    calls, real = [], model.generate

    def generate(ids, pixels=None, *args, visual=None, **kwargs):
        tokens = list(real(ids, pixels, *args, visual=visual, **kwargs))
        if visual is None and pixels is not None:
            visual = model.encode_images(pixels)
        calls.append((list(ids), visual, tokens))
        yield from tokens

    monkeypatch.setattr(model, "generate", generate)
    return calls


def chat_args(*extra):
    return build_parser().parse_args(["--temperature", "0", "--max-new-tokens", "6", *extra])


@pytest.fixture()
def images(tmp_path):
    for i in range(2):
        noise_image(10 + i).save(tmp_path / f"img{i}.png")
    return tmp_path


def test_chat_keeps_the_history_and_puts_slash_image_images_in_the_next_turn(model, images, monkeypatch, capsys):
    calls = record_generate(model, monkeypatch)
    img0, img1 = (load_image(str(images / f"img{i}.png"), model.image_transform) for i in range(2))
    q1, q2, q3 = "What is in the picture?", "And in these two?", "Hello again."
    lines = [q1, f"/image {images / 'img1.png'}", f"/image {images / 'img0.png'}", q2,
             f"/image {images / 'nope.png'}", "/reset", q3, "/quit", "never asked"]
    chat(model, img0[None], chat_args(), lines)
    assert len(calls) == 3
    a1, a2, a3 = (model.tokenizer.decode(tokens) for _, _, tokens in calls)
    expected = [(render_prompt(q1, 1), [img0]),
                (render_prompt(q1, 1) + a1 + render_turn(q2, 2), [img0, img1, img0]),  # images in the prompt's order
                (SYSTEM + render_turn(q3), None)]  # /reset forgot the history, its images and the bad /image
    for (ids, visual, _), (text, want) in zip(calls, expected):
        assert ids == model.prompt_ids(text)
        assert (visual is None and want is None) or torch.allclose(visual, model.encode_images(torch.stack(want)),
                                                                     atol=1e-5)
    out, err = capsys.readouterr()
    assert out == f"{a1}\n{a2}\n{a3}\n"
    assert [line for line in err.splitlines() if "nope.png" in line] == \
        [f"owl: image file {images / 'nope.png'} does not exist; the chat goes on without it."]


def long_question(i: int) -> str:
    return f"Question {i}:" + " which one is bigger, the left shape or the right shape?" * 6


def test_chat_forgets_the_oldest_turns_and_their_images_when_the_context_fills(model, images, monkeypatch, capsys):
    calls = record_generate(model, monkeypatch)
    img0 = load_image(str(images / "img0.png"), model.image_transform)
    q = [long_question(i) for i in range(3)]
    chat(model, img0[None], chat_args(), q)
    a = [model.tokenizer.decode(tokens) for _, _, tokens in calls]
    context, room = model.cfg.text.max_position_embeddings, 6
    everything = render_prompt(q[0], 1) + a[0] + render_turn(q[1]) + a[1] + render_turn(q[2])
    assert len(model.prompt_ids(everything)) + room >= context  # the whole history does not fit ...
    assert len(calls) == 3
    ids, visual, _ = calls[2]
    assert ids == model.prompt_ids(SYSTEM + render_turn(q[1]) + a[1] + render_turn(q[2]))  # ... without turn 1, it does
    assert visual is None  # turn 1's image went with it
    assert all(len(ids) + room < context for ids, _, _ in calls)
    err = capsys.readouterr().err
    assert "the oldest 1 turn(s) and their 1 image(s) are forgotten" in err


def test_chat_refuses_a_turn_that_alone_does_not_fit_and_goes_on(model, images, monkeypatch, capsys):
    calls = record_generate(model, monkeypatch)
    img0, img1 = (load_image(str(images / f"img{i}.png"), model.image_transform) for i in range(2))
    q1, q2 = "What is in the picture?", "And now?"
    chat(model, img0[None], chat_args(), [q1, f"/image {images / 'img1.png'}", "the cat " * 400, q2])
    assert len(calls) == 2
    a1 = model.tokenizer.decode(calls[0][2])
    ids, visual, _ = calls[1]
    assert ids == model.prompt_ids(render_prompt(q1, 1) + a1 + render_turn(q2, 1))  # history and /image image kept
    assert_close(visual, model.encode_images(torch.stack([img0, img1])), ops=16)
    err = capsys.readouterr().err
    assert "do not fit in the context of 512 tokens" in err and "Traceback" not in err
