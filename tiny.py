"""The tiny run: the stand-ins for LLaMA-7B and CLIP's ViT-L/14 that the paper's recipe starts from, and held-out
accuracy on the synthetic world. A wing on top of train.py: nothing in the recipe imports it.

The real recipe starts stage 1 from LLaMA-7B (--llm-init) and CLIP's ViT-L/14 (--vit-init). The tiny run has neither,
so `pretrain` makes both, in the formats those flags read:
    OUT/llm  an HF LLaMA folder: the tiny f_L, trained on text and on chats about scenes given as one vector a shape
             (a short look-up drill first, a list drill among them), so that it can answer from its context, as
             LLaMA-7B can;
    OUT/vit  an HF CLIP vision folder: the tiny f_V, trained on labelled scenes, so that it sees shapes, as CLIP does.
Then train.py's stages 1 and 2 run exactly as with the real weights, and `score` answers held-out questions (in
batches).

    python synthetic.py --out data/synth
    python tiny.py pretrain --data-dir data/synth --out-dir runs/owl-tiny
    python train.py --stage 1 --llm-init runs/owl-tiny/llm --vit-init runs/owl-tiny/vit --data ... --out-dir runs/owl-tiny
    python train.py --stage 2 --init runs/owl-tiny/stage1 --data ... --out-dir runs/owl-tiny
    python tiny.py score --checkpoint runs/owl-tiny/stage2 --heldout data/synth/heldout.jsonl
"""
import argparse
import json
import math
import os
import random
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import synthetic
import train
from llama import Llama, Tokenizer
from owl import Owl, OwlConfig, UserError, load_image, render_prompt
from vit import ImageTransform, VisionTransformer


def read_jsonl(path: Path) -> list:
    """The rows of a JSONL file synthetic.py wrote (no malformed lines to count)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# The f_L stand-in: text, and chats about scenes given as shape vectors (synthetic.SHAPE_MARK), one vector a shape,
# as a visual token would bring it; in the reading and list chats a scene fills as many slots as f_K has queries,
# blank ones among its shapes, so that the f_L learns to list the shapes it is given and pass over the rest.

@dataclass
class ShapeSample(data.Sample):
    shapes: list  # the word ids of each synthetic.SHAPE_ID slot, in order


def document_segments(text: str) -> list:
    """A document: all of it is the target, unless it is a chat in the template ("...\nAI: answer"), which is
    learnt as stage 2 learns: its answers (and the EOS after each) are the targets."""
    parts = text.split("\nAI: ")
    if len(parts) == 1:
        return [(text, True)]
    segments, prompt = [], parts[0]
    for rest in parts[1:]:
        answer, human, after = rest.partition("\nHuman: ")
        segments += [(prompt + "\nAI: ", False), (answer, True)]  # the prompt in one piece, tokenised as stage 2 does
        prompt = human + after
    return segments


def in_slots(tokenizer, text: str, slots: int, rng):
    """synthetic.tokenize_with_shapes (ids, the word ids of each shape), with the scene's shape vectors spread over
    `slots` slots, as f_K's queries will bring a scene: the shapes in their order, each in one slot, and blank slots
    between them at random places, each blank's "words" the one number -2 - seed, the seed of its noise
    (shape_embeddings). 0 slots or no shapes: one slot a shape, as tokenize_with_shapes gives them."""
    ids, shapes = synthetic.tokenize_with_shapes(tokenizer, text, 0)
    if not slots or not shapes:
        return ids, shapes
    taken, rest = set(rng.sample(range(slots), len(shapes))), iter(shapes)
    first = ids.index(synthetic.SHAPE_ID)
    return (ids[:first] + [synthetic.SHAPE_ID] * slots + ids[first + len(shapes):],
            [next(rest) if i in taken else [-2 - rng.randrange(2 ** 31)] for i in range(slots)])


def shape_sample(tokenizer, segments, seq_len, slots=0, rng=None):
    """data.build_sample with each shape mark of a prompt made one SHAPE_ID slot, its words kept beside (a scene
    spread over `slots` slots, see in_slots)."""
    words = []

    def encode(text):
        ids, shapes = in_slots(tokenizer, text, slots, rng)
        words.extend(shapes)
        return ids

    s = data.build_sample(tokenizer, segments, [], 0, seq_len, encode)
    return None if s is None else ShapeSample(s.ids, s.labels, [], words[: s.ids.count(synthetic.SHAPE_ID)])


def load_text(path, stage, tokenizer, tokens_per_image, seq_len, caption_prompt=""):
    """The f_L's data, in data.load_samples' reader form: a text file a document a line, or JSONL with a "text"
    each (a document may span lines, as the chat template does). tokens_per_image: the slots a scene is spread
    over (in_slots; 0 = one vector a shape and nothing else), their places drawn once per file from a fixed seed."""
    if str(path).endswith(".jsonl"):
        docs = [document_segments(r["text"]) for r in read_jsonl(path)]
    else:
        docs = [[(line.strip(), True)] for line in Path(path).read_text().splitlines() if line.strip()]
    rng = random.Random(0)
    return [s for s in (shape_sample(tokenizer, d, seq_len, tokens_per_image, rng) for d in docs) if s is not None]


def shape_embeddings(model: Llama, ids: torch.Tensor, shapes) -> torch.Tensor:
    """Input vectors (B, T, hidden): each token's embedding, and at each synthetic.SHAPE_ID slot the sum of the
    embeddings of that shape's words (shapes: (N, W) word ids, -1 padded, one row per slot in row-major order), one
    vector for one shape, as a visual token would bring it; a row that starts with -2 - seed is a blank slot
    (in_slots). The gradient reaches the word embeddings through both."""
    embed = model.model.embed_tokens
    x = embed(ids.clamp(min=0))
    if shapes is None:
        return x
    vectors = (embed(shapes.clamp(min=0)) * (shapes >= 0)[..., None]).sum(1)  # (N, hidden)
    at = ids == synthetic.SHAPE_ID
    blank = shapes[:, 0] < -1
    if blank.any():  # noise as long as its sample's shape vectors on average, for the f_L to pass over; drawn from
        # the blank's own seed, so that a sample's noise does not depend on its batch (DDP ranks = one process)
        D = vectors.shape[-1]
        rows = at.nonzero()[:, 0]  # the sample of each slot
        norms = torch.zeros(len(ids), device=ids.device).index_add_(0, rows, vectors.detach().norm(dim=-1) * ~blank)
        counts = torch.zeros(len(ids), device=ids.device).index_add_(0, rows, (~blank).float())
        scale = (norms / counts.clamp(min=1))[rows] / D ** 0.5
        noise = torch.stack([torch.randn(D, generator=torch.Generator().manual_seed(-2 - int(seed)))
                             for seed in shapes[blank, 0]]).to(vectors)
        vectors = vectors.masked_scatter(blank[:, None], noise * scale[blank, None])
    return x.masked_scatter(at[..., None], vectors.to(x.dtype))


def shape_tensor(rows: list, device) -> torch.Tensor:
    """The word ids of shapes, a list per shape, as one (N, W) tensor padded with -1; None for no shape."""
    if not rows:
        return None
    out = torch.full((len(rows), max(map(len, rows))), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out.to(device)


def llm_loss(device):
    """train.fit's micro_loss for the f_L: the summed answer loss with shape vectors in place of their slots."""
    def micro_loss(model, samples, rng):
        ids, labels, _, kept = data.collate(samples, None, rng, device)
        inner = model.module if hasattr(model, "module") else model  # the vectors are made outside DDP's forward
        x = shape_embeddings(inner, ids, shape_tensor([w for s in kept for w in s.shapes], device))
        return model(inputs_embeds=x, targets=train.shifted_targets(labels)), ids
    return micro_loss


def llm_sources(d: Path, tokenizer, seq_len: int, slots: int) -> list:
    """The f_L's sources, as data.load_samples gives them: corpus.txt, reading.jsonl (weight 3), the list drill
    lists.jsonl (weight 2) and last the look-up drill (weight 2). The reading and list chats give a scene as f_K's
    queries will, spread over `slots` slots (in_slots); the look-up drill's scenes stay bare: finding a shape by its
    name formed less well among blanks (docs/lab-notes.md)."""
    return (data.load_samples([d / "corpus.txt", f"{d / 'reading.jsonl'}:3", f"{d / 'lists.jsonl'}:2"], 0, tokenizer,
                              slots, seq_len, load=load_text)
            + data.load_samples([f"{d / 'drill.jsonl'}:2"], 0, tokenizer, 0, seq_len, load=load_text))


def llm_order(sources, steps: int, batch_size: int, drill: int, seed: int) -> list:
    """The f_L's samples, step by step: `drill` batches of the look-up drill alone (the last source), then every
    source mixed by weight."""
    return (data.sample_order(sources[-1:], drill * batch_size, seed + 1)
            + data.sample_order(sources, (steps - drill) * batch_size, seed))


def pretrain_llm(args, rank: int, world: int, device: str, before_each=None) -> Path:
    """The tiny f_L, from scratch: --drill-steps batches of the look-up drill alone (drill.jsonl; finding a shape
    by its name forms there), then the mix of corpus.txt, reading.jsonl, lists.jsonl and drill.jsonl; written to
    OUT/llm as an HF LLaMA folder, then asked the held-out questions with each scene given as shape vectors.
    before_each: called before every micro-batch's loss (pretrain_side_by_side's check for the f_V's end)."""
    d, out = Path(args.data_dir), Path(args.out_dir) / "llm"
    cfg = train.TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=max(1, args.steps // 20),
                            seq_len=args.seq_len, seed=args.seed, resume=args.resume, micro_batch=args.micro_batch,
                            dtype=args.dtype)
    torch.manual_seed(cfg.seed)
    tok_path = d / "tokenizer.model"
    if not tok_path.is_file():
        train.fail(f"{tok_path} does not exist (write the data with `python synthetic.py --out {d}`)")
    tokenizer = Tokenizer(tok_path)
    tcfg = OwlConfig.preset(args.model).text
    tcfg.vocab_size = max(tcfg.vocab_size, tokenizer.vocab_size)
    model = Llama(tcfg)
    model.init_weights()
    model = model.to(device)
    slots = OwlConfig.preset(args.model).abstractor.num_queries
    sources = llm_sources(d, tokenizer, cfg.seq_len, slots)
    drill = min(args.drill_steps, cfg.steps)
    order = llm_order(sources, cfg.steps, cfg.batch_size, drill, cfg.seed)
    val = d / "val_corpus.txt"
    val_samples = load_text(val, 0, tokenizer, 0, cfg.seq_len)[:256] if val.is_file() else []
    loss = llm_loss(device)
    if before_each:
        def loss(*a, micro_loss=loss):
            before_each()
            return micro_loss(*a)
    train.fit(model, cfg, order, loss, out, "f_L", rank, world, device,
              signature=train.run_signature(cfg, 0, {"llm": vars(tcfg), "drill_steps": drill}),
              validate=(lambda: train.validation_loss(model, val_samples, loss)) if val_samples else None)
    if rank == 0:
        from safetensors.torch import save_file
        model = model.float().eval()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
        (out / "config.json").write_text(json.dumps(model.cfg.to_hf(), indent=2))
        (out / "tokenizer.model").write_bytes(tok_path.read_bytes())
        reading = d / "heldout_reading.jsonl"
        if reading.is_file():
            evaluate_reading(model, tokenizer, out, reading, args.eval_samples, slots)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The f_V stand-in: the tiny f_V learns to see before stage 1, as the real f_V comes from CLIP's ViT-L/14.
# Captions through a frozen f_L are a weak teacher of shape (docs/lab-notes.md), and labels are what a
# synthetic world has for free: every patch is known to show a shape or the background. Each shape's kind, colour and
# position are read by a linear head from the max over the patches it covers (a read-out that lets a from-scratch ViT
# learn shape where an average over patches does not), and the count from CLS; the heads are dropped afterwards.

MIN_COVER = 0.15  # a patch belongs to a shape when the shape covers at least this share of its pixels


def labelled_image(scene: dict, transform, patch: int, rng, folder=None) -> tuple:
    """(pixels (3, S, S), [(patch mask (N,), (shape, colour, position) indices)] for each shape that still owns a
    patch, shapes in view) for one scene, drawn from its facts; cropped as in stage 1 when rng is given (not
    flipped, which would swap left and right). With folder, the picture is the scene's image file there, which
    synthetic.py drew from the same facts: reading it is faster than drawing it again."""
    if folder is None:
        img = synthetic.draw_scene(scene)
    else:
        with Image.open(Path(folder) / scene["image"]) as f:
            img = f.convert("RGB")
    owners = synthetic.draw_scene(scene, owners=True)
    if rng is not None:
        img, owners = data.augment(img, rng, owners, flip=False)
    S = transform.image_size
    grid = S // patch
    # numpy, not torch: such small arrays cost more in torch's thread start-up than in the work itself
    full = np.asarray(owners.resize((S, S), Image.NEAREST), dtype=np.int64)  # (S, S)
    own = full.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, patch * patch)  # row-major
    n = len(scene["shapes"])
    cover = np.stack([(own == i + 1).sum(1) for i in range(n)], 1)  # (N, shapes): pixels of each shape
    owner = np.where(cover.max(1) >= MIN_COVER * patch * patch, cover.argmax(1), -1)
    # A crop moves shapes: each one's place is where the middle of its pixels is in the cropped picture (a
    # shape's centre is its area's centroid, triangles too, as draw_scene draws them around it).
    objects = []
    for i in range(n):
        if (owner == i).any():
            rows, cols = np.nonzero(full == i + 1)
            place = synthetic.place((cols.mean() + 0.5) / S, (rows.mean() + 0.5) / S)
            objects.append((torch.from_numpy(owner == i), facts({**scene["shapes"][i], "position": place})))
    in_view = len(set(np.unique(full).tolist()) - {0})
    return transform(img), objects, in_view


FACTS = (synthetic.SHAPES, tuple(synthetic.COLORS), tuple(synthetic.POSITIONS))  # what the heads name of each shape


def facts(shape: dict) -> tuple:
    return tuple(words.index(shape[key]) for words, key in zip(FACTS, ("shape", "color", "position")))


def vision_loss(vit, heads, batch, device) -> tuple:
    """Summed cross-entropies over a batch of labelled images (each shape's kind, colour and position, the count),
    and the shapes whose kind is named correctly."""
    pixels = torch.stack([b[0] for b in batch]).to(device)
    hidden = vit(pixels)  # (B, 1 + N, D)
    per_patch = heads[0](hidden[:, 1:])  # (B, N, 3 + 4 + 9)
    counts = torch.tensor([b[2] for b in batch], device=device)
    loss = F.cross_entropy(heads[1](hidden[:, 0]), counts, reduction="sum")
    shapes = [per_patch[i][mask.to(device)].max(0).values for i, b in enumerate(batch) for mask, _ in b[1]]
    if not shapes:  # every shape too small to own a patch once squashed to the f_V's size: the count alone
        return loss, 0, 0
    logits = torch.stack(shapes)
    targets = torch.tensor([f for b in batch for _, f in b[1]], device=device)  # (shapes, 3)
    parts = logits.split([len(words) for words in FACTS], dim=1)  # kind, colour, position
    loss = loss + sum(F.cross_entropy(part, targets[:, j], reduction="sum") for j, part in enumerate(parts))
    return loss, int((parts[0].argmax(1) == targets[:, 0]).sum()), len(targets)


def pretrain_vision(args, rank: int, world: int, device: str, bar_line: int = 0) -> Path:
    """The tiny f_V, from scratch: --vision-steps steps of --batch-size labelled scenes (those behind stage1.jsonl),
    written to OUT/vit as an HF CLIP vision folder, which `train.py --vit-init` reads. bar_line: the terminal line of
    its progress bar, below the f_L's when the two train side by side."""
    d, out = Path(args.data_dir), Path(args.out_dir) / "vit"
    path = out / "model.safetensors"
    if args.resume and path.exists():  # written whole at the end (temporary file, then rename)
        return out
    if args.batch_size % world:
        train.fail(f"--batch-size {args.batch_size} is not divisible by the {world} ranks")
    train_images = {r["image"] for r in read_jsonl(d / "stage1.jsonl")}
    heldout_file = d / "heldout.jsonl"
    held = read_jsonl(heldout_file) if heldout_file.is_file() else []
    heldout_images = {image for r in held for image in r["image"]}
    scenes = read_jsonl(d / "scenes.jsonl")
    train_scenes = [s for s in scenes if s["image"] in train_images]
    heldout = [s for s in scenes if s["image"] in heldout_images][:256]
    per_rank = args.batch_size // world
    torch.manual_seed(args.seed)
    vcfg = OwlConfig.preset(args.model).vision
    vit = VisionTransformer(vcfg)
    vit.init_weights()
    heads = torch.nn.ModuleList([torch.nn.Linear(vcfg.hidden_size, sum(map(len, FACTS))),
                                 torch.nn.Linear(vcfg.hidden_size, 5)])
    both = torch.nn.ModuleList([vit, heads]).to(device)
    opt = torch.optim.AdamW(both.parameters(), lr=args.vision_lr, weight_decay=0.05)
    transform = ImageTransform(vcfg.image_size)
    steps = args.vision_steps
    order = random.Random(args.seed).choices(range(len(train_scenes)), k=steps * args.batch_size)

    def labelled_batch(step):
        rng = random.Random(args.seed * 1000003 + step * world + rank)
        picks = order[step * args.batch_size: (step + 1) * args.batch_size][rank * per_rank: (rank + 1) * per_rank]
        return [labelled_image(train_scenes[i], transform, vcfg.patch_size, rng, d) for i in picks]

    # the next batch is read and labelled in a thread while this one trains (PIL and numpy release the GIL)
    autocast = partial(train.mixed_precision, train.train_dtype(args.dtype, device), device)
    bar = tqdm(range(steps), disable=rank != 0, desc="f_V", dynamic_ncols=True, position=bar_line)
    with ThreadPoolExecutor(1) as prefetch:
        coming = prefetch.submit(labelled_batch, 0)
        for step in bar:
            batch = coming.result()
            if step + 1 < steps:
                coming = prefetch.submit(labelled_batch, step + 1)
            warm = min(1.0, (step + 1) / max(1, steps // 20))
            for g in opt.param_groups:
                g["lr"] = args.vision_lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
            with autocast():
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
        out.mkdir(parents=True, exist_ok=True)
        vit.eval()
        with torch.no_grad():
            results = [vision_loss(vit, heads, [labelled_image(s, transform, vcfg.patch_size, None, d)], device)[1:]
                       for s in heldout]
        if results:
            right, total = map(sum, zip(*results))
            (out / "accuracy_vision.json").write_text(json.dumps({"shape": [right, total]}, indent=2))
            print(f"f_V names {100 * right / max(1, total):.1f}% of the held-out shapes", file=sys.stderr)
        save_clip(vit, out)
    return out


def pretrain_side_by_side(args) -> None:
    """On a CPU, the f_V trains in a second process while the f_L trains in this one, each on half the threads: the
    tiny models' small matrix products gain little from a second thread (150 f_L steps: 51 s on one thread of the
    2-core AMD EPYC, 43 s on two), so the two at once take less time than one after the other (the demo's ~10
    minutes of pre-training took 7-8.5). They share nothing: the f_V needs no f_L. With the default steps the f_V
    ends first, and the f_L then takes back every thread."""
    threads = torch.get_num_threads()
    vision = torch.multiprocessing.get_context("spawn").Process(target=_pretrain_vision_alone,
                                                                args=(args, threads // 2), daemon=True)
    vision.start()
    torch.set_num_threads(threads - threads // 2)

    def take_back_threads():
        if torch.get_num_threads() < threads and not vision.is_alive():
            torch.set_num_threads(threads)
    try:
        pretrain_llm(args, 0, 1, "cpu", before_each=take_back_threads)
    except BaseException:  # an error or Ctrl-C here stops the f_V too
        vision.terminate()
        raise
    finally:
        torch.set_num_threads(threads)
    vision.join()
    if vision.exitcode:
        train.fail(f"the f_V's pre-training stopped with exit code {vision.exitcode} (its message is above)")


def _pretrain_vision_alone(args, threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        pretrain_vision(args, 0, 1, "cpu", bar_line=1)
    except UserError as e:
        train.fail(e.args[0])


def save_clip(vit: VisionTransformer, out: Path) -> None:
    """f_V as an HF CLIP vision folder (config.json, model.safetensors with CLIP's key names and separate q, k, v),
    the inverse of vit.clip_state_dict_to_owl; the weights file last and whole (temporary file, then rename)."""
    from safetensors.torch import save_file

    c, sd = vit.cfg, {k: v.detach().float().cpu() for k, v in vit.state_dict().items()}
    D, H = c.hidden_size, c.num_heads
    clip = {"embeddings.class_embedding": sd["embeddings.cls_token"].reshape(D),
            "embeddings.patch_embedding.weight": sd["embeddings.patch_embed.weight"],
            "embeddings.position_embedding.weight": sd["embeddings.position_embedding"][0]}
    for name in ("weight", "bias"):
        clip[f"pre_layrnorm.{name}"] = sd[f"embeddings.pre_layernorm.{name}"]  # (sic) HF's spelling
        clip[f"post_layernorm.{name}"] = sd[f"post_layernorm.{name}"]
    for i in range(c.num_layers):
        src, dst = f"encoder.layers.{i}.", f"encoder.layers.{i}."
        for name in ("weight", "bias"):
            fused = sd[f"{src}self_attn.query_key_value.{name}"]
            # (heads, 3, head_dim, ...) -> q, k, v: the official head-interleaved order undone
            q, k, v = fused.reshape(H, 3, D // H, *fused.shape[1:]).transpose(0, 1).reshape(3, D, *fused.shape[1:])
            clip.update({f"{dst}self_attn.q_proj.{name}": q, f"{dst}self_attn.k_proj.{name}": k,
                         f"{dst}self_attn.v_proj.{name}": v,
                         f"{dst}self_attn.out_proj.{name}": sd[f"{src}self_attn.dense.{name}"],
                         f"{dst}layer_norm1.{name}": sd[f"{src}input_layernorm.{name}"],
                         f"{dst}layer_norm2.{name}": sd[f"{src}post_attention_layernorm.{name}"],
                         f"{dst}mlp.fc1.{name}": sd[f"{src}mlp.fc1.{name}"],
                         f"{dst}mlp.fc2.{name}": sd[f"{src}mlp.fc2.{name}"]})
    config = {"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"], "hidden_act": "quick_gelu",
              "image_size": c.image_size, "patch_size": c.patch_size, "hidden_size": c.hidden_size,
              "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
              "num_attention_heads": c.num_heads, "layer_norm_eps": c.layer_norm_eps, "num_channels": 3}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tmp = out / "model.safetensors.tmp"
    save_file({"vision_model." + k: v.contiguous() for k, v in clip.items()}, tmp)
    os.replace(tmp, out / "model.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Held-out accuracy: answers generated greedily and scored by the words they contain (synthetic.score_answer).

def evaluate(ckpt: Path, heldout: Path, limit: int, device: str = "cpu") -> dict:
    """Answer held-out questions greedily with the exported checkpoint; accuracy by question kind."""
    model = Owl.from_pretrained(ckpt, torch.float32, device)
    results, answers, rows = [], [], heldout_rows(heldout, limit)
    batch = 32  # greedy answers in a batch are those of one question at a time, in a fraction of the time
    for start in tqdm(range(0, len(rows), batch), desc="held-out", unit="batch", dynamic_ncols=True):
        prompts = []
        for r in rows[start: start + batch]:
            pixels = torch.stack([load_image(str(heldout.parent / p), model.image_transform) for p in r["image"]])
            prompts.append((model.prompt_ids(render_prompt(r["question"], len(r["image"]))), pixels))
        for r, new in zip(rows[start: start + batch], model.generate_batch(prompts, max_new_tokens=48)):
            answer = model.tokenizer.decode(new)
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


@torch.inference_mode()
def evaluate_reading(model: Llama, tokenizer: Tokenizer, out: Path, heldout: Path, limit: int, slots: int) -> dict:
    """Stage 0's f_L answers the held-out questions about scenes given as shape vectors, as the reading chats give
    them (spread over `slots` slots): the most the visual tokens can give it later, since it must read them as it
    reads these vectors. Half as many questions as --eval-samples, balanced over kinds, which is plenty for a
    text-only model."""
    model.eval()
    device = model.lm_head.weight.device
    results, rng = [], random.Random(0)
    for r in tqdm(heldout_rows(heldout, limit // 2), desc="held-out reading", dynamic_ncols=True):
        chat = synthetic.reading_chat(r["scene"], [(r["question"], "")])
        ids, shapes = in_slots(tokenizer, chat, slots, rng)
        ids = torch.tensor([[tokenizer.bos_id] + ids], device=device)
        x = shape_embeddings(model, ids, shape_tensor(shapes, device))
        answer = tokenizer.decode(list(model.generate(inputs_embeds=x, max_new_tokens=48, eos_id=tokenizer.eos_id)))
        results.append((r["kind"], synthetic.score_answer(r["kind"], answer, r["target"])))
    table = synthetic.accuracy_table(results)
    (out / "accuracy_reading.json").write_text(json.dumps(table, indent=2))
    print_accuracy("held-out reading accuracy", table)
    return table


# ---------------------------------------------------------------------------------------------------------------
# The command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    pre = commands.add_parser("pretrain", help="make the stand-ins for LLaMA-7B and CLIP: OUT/llm and OUT/vit",
                              description="Pre-train the tiny f_L (OUT/llm, an HF LLaMA folder) and the tiny f_V "
                                          "(OUT/vit, an HF CLIP vision folder) on the synthetic world's data.")
    pre.add_argument("--data-dir", default="data/synth", help="where `python synthetic.py` wrote the data (default: "
                     "%(default)s)")
    pre.add_argument("--out-dir", default="runs/owl-tiny", help="writes OUT/llm and OUT/vit (default: %(default)s)")
    pre.add_argument("--model", default="tiny", help="the size preset of both parts (default: %(default)s)")
    pre.add_argument("--steps", type=int, default=1200, help="f_L optimizer steps (default: %(default)s); at 700 "
                     "its answers from the shape vectors depended on the seed (docs/lab-notes.md)")
    pre.add_argument("--drill-steps", type=int, default=300, help="the first N f_L steps train on the look-up drill "
                     "alone (one position question about a 2-4 shape scene), where finding a shape by its name forms; "
                     "0 = none (default: %(default)s)")
    pre.add_argument("--batch-size", type=int, default=64, help="samples per step, f_L and f_V (default: %(default)s)")
    pre.add_argument("--micro-batch", type=int, default=0, help="f_L samples per forward pass on one rank; 0 = "
                     "gcd(per-rank batch, 16) (default: %(default)s)")
    pre.add_argument("--lr", type=float, default=1e-3, help="f_L peak learning rate; at 3e-3 it did not learn to "
                     "copy a described list (default: %(default)s)")
    pre.add_argument("--seq-len", type=int, default=256, help="f_L tokens per sample (default: %(default)s)")
    pre.add_argument("--vision-steps", type=int, default=1600, help="f_V steps on labelled scenes; at 1000 it "
                     "named 90-97%% of held-out shapes, depending on the seed (default: %(default)s)")
    pre.add_argument("--vision-lr", type=float, default=2e-3, help="f_V peak learning rate (default: %(default)s)")
    pre.add_argument("--eval-samples", type=int, default=400, help="held-out questions for the f_L's reading check "
                     "(half of them are asked; default: %(default)s)")
    pre.add_argument("--seed", type=int, default=1337, help="seeds initialisation, data order and dropout "
                     "(default: %(default)s)")
    pre.add_argument("--resume", action="store_true", help="continue the f_L from OUT/llm/train_state.pt (same "
                     "settings), and keep OUT/vit if it was written")
    pre.add_argument("--device", default="", help="default: cuda if available, else cpu")
    pre.add_argument("--dtype", default="", help="bfloat16, float32 or auto (bf16 on CUDA and on a CPU with bf16 "
                     "instructions, there about 1.4x faster); default: bf16 on CUDA, fp32 on CPU")
    score = commands.add_parser("score", help="answer held-out questions; accuracy by question kind",
                                description="Answer held-out questions greedily with a checkpoint; write "
                                            "accuracy_NAME.json and answers_NAME.jsonl into it (NAME: the held-out "
                                            "file's folder).")
    score.add_argument("--checkpoint", required=True, help="an Owl checkpoint folder (train.py's stageN)")
    score.add_argument("--heldout", default="data/synth/heldout.jsonl", help="held-out questions (JSONL as "
                       "synthetic.py writes) (default: %(default)s)")
    score.add_argument("--eval-samples", type=int, default=1000, help="questions, balanced over kinds (default: "
                       "%(default)s)")
    score.add_argument("--device", default="", help="default: cuda if available, else cpu")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.command == "score":
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if not Path(args.heldout).is_file():
            train.fail(f"the held-out file {args.heldout} does not exist (write one with `python synthetic.py`)")
        if not (Path(args.checkpoint) / "config.json").is_file():
            train.fail(f"{args.checkpoint} is not a checkpoint folder (no config.json)")
        evaluate(Path(args.checkpoint), Path(args.heldout), args.eval_samples, device)
        return
    for name in ("tokenizer.model", "corpus.txt", "reading.jsonl", "lists.jsonl", "drill.jsonl", "scenes.jsonl",
                 "stage1.jsonl"):
        if not (Path(args.data_dir) / name).is_file():
            train.fail(f"{Path(args.data_dir) / name} does not exist (write the data with `python synthetic.py "
                       f"--out {args.data_dir}`)")
    rank, world, device = train.setup_distributed(train.TrainConfig(device=args.device))
    try:
        if world == 1 and device == "cpu" and torch.get_num_threads() > 1:
            pretrain_side_by_side(args)
        else:
            pretrain_llm(args, rank, world, device)
            pretrain_vision(args, rank, world, device)
    except UserError as e:  # an unusable data file or train_state.pt for --resume
        train.fail(e.args[0])
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    warnings.formatwarning = lambda message, *_, **__: f"tiny: {message}\n"  # one line, without the source line
    main()
