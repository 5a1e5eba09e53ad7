"""What the tiny run adds to the paper's recipe: stage 0's f_V, and held-out accuracy by question kind.

The real recipe starts f_V from CLIP's ViT-L/14; the tiny run has no such thing to start from, so after stage 0's f_L
(train.py) it teaches its from-scratch f_V to see shapes on labelled scenes (pretrain_vision). And since the synthetic
world knows every answer, train.py scores each tiny stage on held-out questions: stage 0's f_L on scenes given as
shape vectors (shape_embeddings, evaluate_reading), stage 2's Owl on held-out images (evaluate, also
`python train.py --stage eval`).
"""
import json
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import synthetic
from llama import Llama, Tokenizer
from owl import Owl, OwlConfig, load_image, render_prompt
from vit import ImageTransform, VisionTransformer


def read_jsonl(path: Path) -> list:
    """The rows of a JSONL file this project wrote itself (data.py's own files: no malformed lines to count)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# Stage 0, second part (after train.py's f_L): the tiny f_V learns to see before stage 1, as the real f_V comes
# from CLIP's ViT-L/14.
# Captions through a frozen f_L are a weak teacher of shape (README: "The tiny Owl"), and labels are what a
# synthetic world has for free: every patch is known to show a shape or the background. Each shape's kind, colour and
# position are read by a linear head from the max over the patches it covers (a read-out that lets a from-scratch ViT
# learn shape where an average over patches does not), and the count from CLS; the heads are dropped afterwards.

MIN_COVER = 0.15  # a patch belongs to a shape when the shape covers at least this share of its pixels


def labelled_image(scene: dict, transform, patch: int, rng) -> tuple:
    """(pixels (3, S, S), [(patch mask (N,), (shape, colour, position) indices)] for each shape that still owns a
    patch, shapes in view) for one scene, drawn from its facts; cropped as in stage 1 when rng is given (not
    flipped, which would swap left and right)."""
    img, owners = synthetic.draw_scene(scene), synthetic.draw_scene(scene, owners=True)
    if rng is not None:
        img, owners = data.augment(img, rng, owners, flip=False)
    S = transform.image_size
    grid = S // patch
    own = torch.from_numpy(np.asarray(owners.resize((S, S), Image.NEAREST), dtype=np.int64).copy())
    own = own.reshape(grid, patch, grid, patch).permute(0, 2, 1, 3).reshape(grid * grid, patch * patch)  # row-major
    n = len(scene["shapes"])
    cover = torch.stack([(own == i + 1).sum(1) for i in range(n)], 1)  # (N, shapes): pixels of each shape
    owner = torch.where(cover.max(1).values >= MIN_COVER * patch * patch, cover.argmax(1), -1)
    objects = [(owner == i, facts(scene["shapes"][i])) for i in range(n) if (owner == i).any()]
    in_view = len(set(own.unique().tolist()) - {0})
    return transform(img), objects, in_view


FACTS = (synthetic.SHAPES, tuple(synthetic.COLORS), tuple(synthetic.POSITIONS))  # what the heads name of each shape


def facts(shape: dict) -> tuple:
    return tuple(words.index(shape[key]) for words, key in zip(FACTS, ("shape", "color", "position")))


def vision_loss(vit, heads, batch, device) -> tuple:
    """Summed cross-entropies over a batch of labelled images (each shape's kind, colour and position, the count),
    and the shapes whose kind is named correctly."""
    pixels = torch.stack([b[0] for b in batch]).to(device)
    hidden = vit(pixels)  # (B, 1 + N, D)
    per_patch = heads[0](hidden[:, 1:])  # (B, N, 3 + 4 + 4)
    logits = torch.stack([per_patch[i][mask.to(device)].max(0).values for i, b in enumerate(batch) for mask, _ in b[1]])
    targets = torch.tensor([f for b in batch for _, f in b[1]], device=device)  # (shapes, 3)
    counts = torch.tensor([b[2] for b in batch], device=device)
    parts = logits.split([len(words) for words in FACTS], dim=1)  # kind, colour, position
    loss = F.cross_entropy(heads[1](hidden[:, 0]), counts, reduction="sum")
    loss = loss + sum(F.cross_entropy(part, targets[:, j], reduction="sum") for j, part in enumerate(parts))
    return loss, int((parts[0].argmax(1) == targets[:, 0]).sum()), len(targets)


def pretrain_vision(cfg, batch_size: int, rank: int, world: int, device: str) -> None:
    """Stage 0's f_V: cfg.vision_steps steps of batch_size (a multiple of world, as train.py checks) on the scenes
    behind stage1.jsonl, written to stage0/vision.safetensors, which stage 1 then starts from. cfg is train.py's
    TrainConfig. Skipped without scenes.jsonl (data not from data.py) or with --data."""
    d, out = Path(cfg.data_dir), Path(cfg.out_dir) / "stage0"
    path = out / "vision.safetensors"
    if not cfg.vision_steps or cfg.data or not (d / "scenes.jsonl").is_file() or not (d / "stage1.jsonl").is_file():
        return
    if cfg.resume and path.exists():
        return
    train_images = {r["image"] for r in read_jsonl(d / "stage1.jsonl")}
    heldout_file = d / "heldout.jsonl"
    held = read_jsonl(heldout_file) if heldout_file.is_file() else []
    heldout_images = {image for r in held for image in r["image"]}
    scenes = read_jsonl(d / "scenes.jsonl")
    train = [s for s in scenes if s["image"] in train_images]
    heldout = [s for s in scenes if s["image"] in heldout_images][:256]
    per_rank = batch_size // world
    torch.manual_seed(cfg.seed)
    vcfg = OwlConfig.preset(cfg.model).vision
    vit = VisionTransformer(vcfg)
    vit.init_weights()
    heads = torch.nn.ModuleList([torch.nn.Linear(vcfg.hidden_size, sum(map(len, FACTS))),
                                 torch.nn.Linear(vcfg.hidden_size, 5)])
    both = torch.nn.ModuleList([vit, heads]).to(device)
    opt = torch.optim.AdamW(both.parameters(), lr=cfg.vision_lr, weight_decay=0.05)
    transform = ImageTransform(vcfg.image_size)
    order = random.Random(cfg.seed).choices(range(len(train)), k=cfg.vision_steps * batch_size)
    bar = tqdm(range(cfg.vision_steps), disable=rank != 0, desc="stage 0: f_V", dynamic_ncols=True)
    for step in bar:
        rng = random.Random(cfg.seed * 1000003 + step * world + rank)
        picks = order[step * batch_size: (step + 1) * batch_size][rank * per_rank: (rank + 1) * per_rank]
        batch = [labelled_image(train[i], transform, vcfg.patch_size, rng) for i in picks]
        warm = min(1.0, (step + 1) / max(1, cfg.vision_steps // 20))
        for g in opt.param_groups:
            g["lr"] = cfg.vision_lr * warm * 0.5 * (1 + math.cos(math.pi * step / cfg.vision_steps))
        loss, _, n = vision_loss(vit, heads, batch, device)
        terms = torch.tensor([float(n + len(batch))], device=device)  # shapes and counts, over all ranks
        if world > 1:
            dist.all_reduce(terms)
        (loss / terms).backward()
        if world > 1:  # summed gradients of the per-rank sums: those of one process on the whole batch
            for p in both.parameters():
                dist.all_reduce(p.grad)
        torch.nn.utils.clip_grad_norm_(both.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item() / terms.item() * world:.3f}")
    if rank == 0:
        from safetensors.torch import save_file
        vit.eval()
        with torch.no_grad():
            results = [vision_loss(vit, heads, [labelled_image(s, transform, vcfg.patch_size, None)], device)[1:]
                       for s in heldout]
        if results:
            right, total = map(sum, zip(*results))
            (out / "accuracy_vision.json").write_text(json.dumps({"shape": [right, total]}, indent=2))
            print(f"stage 0: f_V names {100 * right / max(1, total):.1f}% of the held-out shapes", file=sys.stderr)
        tmp = path.with_suffix(".tmp")  # whole or absent: --resume redoes this part unless the file is there
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, tmp)
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Held-out accuracy: answers generated greedily and scored by the words they contain (synthetic.score_answer).

def evaluate(ckpt: Path, heldout: Path, limit: int, device: str) -> dict:
    """Answer held-out questions greedily with the exported checkpoint; accuracy by question kind."""
    model = Owl.from_pretrained(ckpt, torch.float32, device)
    results, answers = [], []
    for r in tqdm(heldout_rows(heldout, limit), desc="held-out", dynamic_ncols=True):
        paths = [str(heldout.parent / p) for p in r["image"]]
        pixels = torch.stack([load_image(p, model.image_transform) for p in paths])
        ids = model.prompt_ids(render_prompt(r["question"], len(paths)))
        answer = model.tokenizer.decode(list(model.generate(ids, pixels, max_new_tokens=48)))
        results.append((r["kind"], synthetic.score_answer(r["kind"], answer, r["target"])))
        answers.append({**r, "answer": answer, "correct": results[-1][1]})
    table = synthetic.accuracy_table(results)
    # named after the held-out folder, so several test sets can be kept side by side
    (ckpt / f"accuracy_{heldout.parent.name}.json").write_text(json.dumps(table, indent=2))
    (ckpt / f"answers_{heldout.parent.name}.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    print_accuracy("held-out accuracy", table)
    return table


def heldout_rows(heldout: Path, limit: int) -> list:
    """The first limit // kinds questions of each kind in a held-out JSONL file."""
    rows = read_jsonl(heldout)
    kinds = sorted({r["kind"] for r in rows})
    per_kind = max(1, limit // len(kinds))
    return [r for k in kinds for r in [r for r in rows if r["kind"] == k][:per_kind]]


def print_accuracy(label: str, table: dict) -> None:
    print(f"{label}: " + ", ".join(f"{k} {c}/{n} = {c / max(1, n):.1%}" for k, (c, n) in table.items()),
          file=sys.stderr)


def shape_embeddings(model: Llama, ids: torch.Tensor, shapes) -> torch.Tensor:
    """Stage 0's input vectors (B, T, hidden): each token's embedding, and at each synthetic.SHAPE_ID slot the sum of
    the embeddings of that shape's words (shapes: (N, W) word ids, -1 padded, one row per slot in row-major order), one
    vector for one shape, as a visual token would bring it. The gradient reaches the word embeddings through both."""
    embed = model.model.embed_tokens
    x = embed(ids.clamp(min=0))
    if shapes is None:
        return x
    vectors = (embed(shapes.clamp(min=0)) * (shapes >= 0)[..., None]).sum(1)  # (N, hidden)
    return x.masked_scatter((ids == synthetic.SHAPE_ID)[..., None], vectors.to(x.dtype))


def shape_tensor(rows: list, device) -> torch.Tensor:
    """The word ids of shapes, a list per shape, as one (N, W) tensor padded with -1; None for no shape."""
    if not rows:
        return None
    out = torch.full((len(rows), max(map(len, rows))), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out.to(device)


@torch.inference_mode()
def evaluate_reading(model: Llama, tokenizer: Tokenizer, out: Path, heldout: Path, limit: int) -> dict:
    """Stage 0's f_L answers the held-out questions about scenes given as shape vectors, as the reading chats give
    them: the most the visual tokens can give it later, since it must read them as it reads these vectors. Half as
    many questions as --eval-samples, balanced over kinds, which is plenty for a text-only model."""
    model.eval()
    device = model.lm_head.weight.device
    results = []
    for r in tqdm(heldout_rows(heldout, limit // 2), desc="held-out reading", dynamic_ncols=True):
        chat = synthetic.reading_chat(r["scene"], [(r["question"], "")])
        ids, shapes = synthetic.tokenize_with_shapes(tokenizer, chat, 0)
        ids = torch.tensor([[tokenizer.bos_id] + ids], device=device)
        x = shape_embeddings(model, ids, shape_tensor(shapes, device))
        answer = tokenizer.decode(list(model.generate(inputs_embeds=x, max_new_tokens=48, eos_id=tokenizer.eos_id)))
        results.append((r["kind"], synthetic.score_answer(r["kind"], answer, r["target"])))
    table = synthetic.accuracy_table(results)
    (out / "accuracy_reading.json").write_text(json.dumps(table, indent=2))
    print_accuracy("held-out reading accuracy", table)
    return table
