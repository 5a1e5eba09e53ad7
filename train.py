"""Train Owl in the paper's two stages, on one CPU or many GPUs (DDP under torchrun).

    stage 0  (tiny run only) pre-train the tiny f_L on a text corpus and on chats about scenes given as one vector a
             shape (a short look-up drill first, --drill-steps), so that it can answer from its context, as LLaMA-7B
             can; then the tiny f_V on labelled scenes (--vision-steps; tiny.py), so that it sees shapes, as CLIP's
             ViT-L/14 does. The real recipe starts from LLaMA-7B (--llm-init) and CLIP (--vit-init) instead.
    stage 1  pre-training: f_V and f_K (queries, visual_fc, vit_eos included) learn to caption; f_L frozen.
    stage 2  joint instruction tuning: f_V frozen; LoRA on f_L (q_proj, v_proj) and f_K trained on text-only and
             multimodal instructions mixed (--freeze-abstractor freezes f_K, as the released code does).

    python train.py --stage all                                   # the tiny Owl on data from `python data.py synth`
    torchrun --nproc_per_node=8 train.py --stage 2 --init DIR --data llava.json --data alpaca.json:0.5 ...

Each stage writes DIR/stageN/: a full checkpoint in the official format (LoRA merged) that `python owl.py
--checkpoint` loads, the LoRA adapter alone (stage 2), metrics.jsonl, loss.png, and train_state.pt for --resume.
"""
import argparse
import json
import math
import os
import pickle
import random
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import lora
import tiny
from llama import Llama, RMSNorm, Tokenizer
from owl import MAX_PIXELS, Owl, OwlConfig, UserError, read_image
from vit import VisionTransformer


@dataclass
class TrainConfig:
    stage: str = "all"  # 0, 1, 2, all (0, 1, 2 in turn), or eval (answer --heldout with the --init checkpoint)
    out_dir: str = "runs/owl-tiny"  # each stage writes out_dir/stageN
    data_dir: str = "data/synth"  # where `python data.py synth` wrote the tiny run's data
    data: tuple = ()  # PATH or PATH:WEIGHT, repeatable; default: the stage's files in data_dir
    model: str = "tiny"  # preset for a model built from scratch: tiny or owl-7b
    init: str = ""  # an official mPLUG-Owl checkpoint folder to start from
    vit_init: str = ""  # an HF CLIP folder for f_V (stage 1's usual start)
    llm_init: str = ""  # an HF or Meta LLaMA folder for f_L
    tokenizer: str = ""  # tokenizer.model; default: from --init / --llm-init / data_dir
    steps: int = 0  # optimizer steps per stage; 0 = the stage's default
    batch_size: int = 0  # global batch (samples per optimizer step, all ranks); 0 = the stage's default
    micro_batch: int = 0  # samples per forward pass on one rank; 0 = gcd(per-rank batch, 16): few pads, same gradient
    lr: float = 0.0  # peak learning rate; 0 = the stage's default
    abstractor_lr_scale: float = 3.0  # f_K's lr as a multiple of --lr (1 = one lr for all, as released)
    warmup: int = 0  # warm-up steps (linear), then cosine to lr/10; 0 = 5% of the steps
    weight_decay: float = 0.01  # AdamW decoupled weight decay on every parameter but biases and norm weights (queries too), the rule of the HF Trainer the released code trains with
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping (the norm is still logged)
    max_bad_steps: int = 10  # a NaN or infinite loss or gradient norm skips the step; this many in a row stop the run
    seq_len: int = 256  # tokens per sample, longer ones are truncated
    lora_r: int = 8  # LoRA rank (stage 2), as released
    lora_alpha: float = 32.0  # LoRA scale alpha; the update is (alpha / r) B A
    lora_dropout: float = 0.05  # dropout on the LoRA input path
    lora_targets: str = "q_proj,v_proj"  # comma-separated f_L Linear names that get LoRA
    freeze_abstractor: bool = False  # stage 2: keep f_K frozen, as the released code does (the paper trains it)
    max_pixels: int = MAX_PIXELS  # an image with more pixels is skipped (and counted), refused from its header
    drill_steps: int = 300  # stage 0 of the tiny run: its first N steps train the f_L on data_dir/drill.jsonl alone (one position question about a 2-4 shape scene), where finding a shape by its name forms; 0 = none
    vision_steps: int = 1200  # stage 0 of the tiny run, after f_L: steps pre-training the tiny f_V on the labelled scenes of data_dir/scenes.jsonl (where the real recipe starts from CLIP); 0 = none
    vision_lr: float = 2e-3  # peak learning rate of that pre-training
    caption_prompt: str = "Describe the image."  # stage 1: each caption is learnt as the answer to this question about its image ("Human: <image>\nHuman: Q\nAI: caption", the chat layout stage 2 uses); "" puts the caption right after the image
    augment: bool = False  # stage-1 RandomResizedCrop + flip, as the official recipe (flips break left/right answers)
    grad_checkpointing: bool = False  # recompute f_V / f_L activations in backward to save memory
    eval_every: int = 0  # validation loss every N steps; 0 = at the end only
    eval_samples: int = 1000  # held-out questions answered at the end of stage 2 (balanced over kinds)
    heldout: str = ""  # held-out questions (JSONL as data.py writes); default: data_dir/heldout.jsonl
    save_every: int = 0  # train_state.pt every N steps; 0 = at the end only
    resume: bool = False  # continue from out_dir/stageN/train_state.pt (same settings required)
    seed: int = 1337  # seeds the initialisation, the data order and dropout
    device: str = ""  # default: cuda if available, else cpu
    dtype: str = ""  # bfloat16 on CUDA, float32 on CPU


# What each stage of the tiny run does by default: steps, global batch, peak lr, sized so that `make demo` finishes in
# about 20 minutes on 2 CPU cores (README, "Where it stands", and its lab notes hold the measurements). Stage 0's f_L
# runs at lr 1e-3 (at 3e-3 it did not learn to copy a described list) and long enough to answer from its context:
# 300 look-up drill steps, then 1100 of the mix. With 700 mixed steps the reading check's position and describe
# depended on the draw and the seed (85% / 73% on one); with 1100 they were 96-100% and 88-95% on two seeds. A
# from-scratch f_V is the slow learner and unstable above lr 1e-3, so stage 1 gets most of the remaining time at that
# rate; with f_V pre-trained in stage 0 (--vision-steps), 500 steps reach what 800 did within 1.7 points.
STAGE_DEFAULTS = {0: dict(steps=1400, batch_size=64, lr=1e-3), 1: dict(steps=500, batch_size=64, lr=1e-3),
                  2: dict(steps=300, batch_size=64, lr=1e-3)}


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = {f.name: f for f in fields(TrainConfig)}
    comments = _field_comments()
    for name, f in helps.items():
        flag = "--" + name.replace("_", "-")
        if f.type == "bool" or isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", help=comments.get(name, "").replace("%", "%%"))
        elif isinstance(f.default, tuple):
            p.add_argument(flag, action="append", default=[], help=comments.get(name, "").replace("%", "%%"))
        else:
            p.add_argument(flag, type=type(f.default), default=f.default,
                           help=f"{comments.get(name, '')} (default: {f.default!r})".replace("%", "%%"))
    args = p.parse_args(argv)
    cfg = TrainConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items()})
    if cfg.stage not in ("0", "1", "2", "all", "eval"):
        p.error("--stage must be 0, 1, 2, all or eval")
    if cfg.stage == "eval" and not cfg.init:
        p.error("--stage eval needs --init CHECKPOINT")
    if cfg.max_bad_steps < 1:
        p.error("--max-bad-steps must be at least 1")
    if cfg.max_pixels < 1:
        p.error("--max-pixels must be at least 1")
    return cfg


def fail(sentence: str):
    """A problem with the user's input or files: one sentence on stderr and exit status 2, as owl.py does."""
    print(f"train: {sentence}", file=sys.stderr)
    sys.exit(2)


def _field_comments() -> dict:
    """The comment after each field above, reused as its --help text so the two never drift apart."""
    out, src = {}, Path(__file__).read_text().split("class TrainConfig:")[1].split("\n\n")[0]
    for line in src.splitlines():
        if ":" in line and "#" in line:
            out[line.split(":")[0].strip()] = line.split("#", 1)[1].strip()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a single process.

def setup_distributed(cfg: TrainConfig):
    ddp = "RANK" in os.environ
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if ddp:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


# ---------------------------------------------------------------------------------------------------------------
# Model building per stage

def build_model(cfg: TrainConfig, stage: int, tokenizer: Tokenizer, device, dtype):
    """The model a stage starts from, with exactly the parameters that stage trains set to requires_grad."""
    prev = Path(cfg.out_dir) / f"stage{stage - 1}"
    if stage == 0:
        tcfg = OwlConfig.preset(cfg.model).text
        tcfg.vocab_size = max(tcfg.vocab_size, tokenizer.vocab_size)
        model = Llama(tcfg)
        model.init_weights()
        return model.to(device)
    if cfg.init:
        model = Owl.from_pretrained(cfg.init, torch.float32, device)
    elif stage == 2 and (prev / "config.json").exists() and not cfg.llm_init:
        model = Owl.from_pretrained(prev, torch.float32, device)
    else:  # stage 1 from parts: a random or CLIP f_V, a random f_K, f_L from stage 0 or a LLaMA folder
        ocfg = OwlConfig.preset(cfg.model)
        llm_dir = cfg.llm_init or str(prev)
        llm = Llama.from_meta(llm_dir) if (Path(llm_dir) / "params.json").exists() else Llama.from_hf(llm_dir)
        ocfg.text = llm.cfg
        ocfg.abstractor.llm_hidden_size = llm.cfg.hidden_size
        if cfg.vit_init:
            vit = VisionTransformer.from_clip(cfg.vit_init)
            ocfg.vision = vit.cfg
            ocfg.abstractor.hidden_size = vit.cfg.hidden_size
        model = Owl(ocfg)
        model.init_weights()
        pretrained_vit = Path(llm_dir) / "vision.safetensors"  # the tiny run's stage 0 pre-trains f_V beside f_L
        if not cfg.vit_init and pretrained_vit.exists():
            from safetensors.torch import load_file
            model.vision_model.load_state_dict(load_file(pretrained_vit), strict=True)
            model.vision_source = pretrained_vit  # named in the stage's first line
        model.language_model = llm
        if cfg.vit_init:
            model.vision_model = vit
        model = model.to(device)
    model.tokenizer = tokenizer
    for p in model.parameters():
        p.requires_grad = False
    if stage == 1:
        for part in (model.vision_model, model.abstractor):
            part.requires_grad_(True)
    else:
        lora.apply_lora(model.language_model, tuple(cfg.lora_targets.split(",")), cfg.lora_r, cfg.lora_alpha,
                        cfg.lora_dropout)
        lora.mark_only_lora_trainable(model, extra=() if cfg.freeze_abstractor else ("abstractor.",))
    if device.startswith("cuda") and dtype == torch.bfloat16:
        model.language_model.to(torch.bfloat16)  # frozen f_L held in bf16; LoRA params stay fp32 (lora.py)
        for m in model.language_model.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_A.data, m.lora_B.data = m.lora_A.data.float(), m.lora_B.data.float()
    model.vision_model.encoder.grad_checkpointing = cfg.grad_checkpointing
    model.language_model.grad_checkpointing = cfg.grad_checkpointing
    return model


def find_tokenizer(cfg: TrainConfig, stage: int) -> Path:
    """The tokenizer of the model a stage starts from: the checkpoint's own, else the data's (a fresh run)."""
    prev = Path(cfg.out_dir) / f"stage{stage - 1}" / "tokenizer.model"
    for cand in (cfg.tokenizer, cfg.init and Path(cfg.init) / "tokenizer.model",
                 cfg.llm_init and Path(cfg.llm_init) / "tokenizer.model", stage > 0 and prev,
                 Path(cfg.data_dir) / "tokenizer.model"):
        if cand and Path(cand).exists():
            return Path(cand)
    fail("no tokenizer.model found; pass --tokenizer, or run `python data.py synth` first")


# ---------------------------------------------------------------------------------------------------------------
# Data: every sample is tokenised once, up front, into (ids, labels, image paths).

def load_samples(cfg: TrainConfig, stage: int, tokenizer: Tokenizer, tokens_per_image: int):
    d = Path(cfg.data_dir)
    sources = list(cfg.data) or {0: [f"{d / 'corpus.txt'}", f"{d / 'reading.jsonl'}:3", f"{d / 'drill.jsonl'}:2"],
                                 1: [f"{d / 'stage1.jsonl'}", f"{d / 'stage1_single.jsonl'}"],
                                 2: [f"{d / 'stage2_owl.jsonl'}", f"{d / 'stage2_llava.json'}",
                                     f"{d / 'stage2_alpaca.json'}:0.3"]}[stage]
    out = []
    for spec in sources:
        path, weight = parse_source(spec)
        if not Path(path).is_file():
            hint = "" if cfg.data else f" (write it with `python data.py synth --out {cfg.data_dir}`)"
            fail(f"data file {path} does not exist{hint}")
        try:
            samples = data.load_training_samples(path, stage, tokenizer, tokens_per_image, cfg.seq_len,
                                                 cfg.caption_prompt)
        except (ValueError, IndexError, KeyError, TypeError) as e:  # not JSON, or not the stage's format at all
            fail(f"{path} is not stage-{stage} training data ({type(e).__name__}: {e})")
        if not samples:
            fail(f"{path} holds no usable sample")
        out.append((samples, weight))
    return out


def parse_source(spec: str) -> tuple:
    """--data PATH or PATH:WEIGHT -> (path, weight). The weight follows the last colon, so a path may hold colons
    (C:/data/x.json:0.5); a spec naming an existing file, or whose last part is not a number, is all path."""
    head, sep, tail = spec.rpartition(":")
    if not sep or Path(spec).exists():
        return spec, 1.0
    try:
        weight = float(tail)
    except ValueError:
        return spec, 1.0
    if not (weight > 0 and math.isfinite(weight)):
        fail(f"--data {spec}: the weight after the last ':' must be a positive number")
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


def stage_order(cfg: TrainConfig, stage: int, sources):
    """A stage's samples, step by step. Stage 0 of the tiny run (its default data) starts with --drill-steps
    batches of the look-up drill alone (drill.jsonl, its last source), then mixes every source."""
    drill = min(cfg.drill_steps, cfg.steps) if stage == 0 and not cfg.data else 0
    return (sample_order(sources[-1:], drill * cfg.batch_size, cfg.seed + stage + 1)
            + sample_order(sources, (cfg.steps - drill) * cfg.batch_size, cfg.seed + stage))


class ImageCache:
    """Preprocessed pixels by path; kept in memory unless augmenting, since the tiny run reads each image often."""

    def __init__(self, transform, augment: bool, max_pixels: int = MAX_PIXELS):
        self.transform, self.augment, self.max_pixels, self.cache, self.failed = transform, augment, max_pixels, {}, 0

    def __call__(self, path: str, rng: random.Random) -> torch.Tensor:
        if self.augment:
            return self.transform(data.augment(read_image(path, self.max_pixels), rng))
        if path not in self.cache:
            self.cache[path] = self.transform(read_image(path, self.max_pixels)).half()
        return self.cache[path].float()

    def blank(self, path: str, rng: random.Random) -> torch.Tensor:
        """A black image in the place of one that cannot be read, for a micro-batch that must still run."""
        return torch.zeros(3, self.transform.image_size, self.transform.image_size)


def collate(samples, images: ImageCache, rng, device):
    """Pad a micro-batch (right, label -100): ids, labels, pixels (or None) and the word ids of stage 0's shape
    vectors (or None; see tiny.shape_embeddings). A sample whose image cannot be read (missing, truncated, not an
    image, over owl.MAX_PIXELS) is skipped and counted."""
    kept, pixels = [], []
    for s in samples:
        try:
            pixels += [images(p, rng) for p in s.images]
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
    shapes = tiny.shape_tensor([w for s in kept for w in s.shapes], device)
    return ids.to(device), labels.to(device), torch.stack(pixels).to(device) if pixels else None, shapes


def summed_loss(model, ids, labels, pixels, shapes=None):
    """Sum of the next-token cross-entropy over the answer tokens (labels != -100). Position t predicts token t + 1;
    f_L makes logits only for positions with a target, a block at a time (llama.ChunkedCrossEntropy): the image
    tokens and prompts get none, and the (B, T, 32000) float32 logits of owl-7b never exist whole."""
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    inner = model.module if hasattr(model, "module") else model  # DDP wraps the model
    if isinstance(inner, Llama):
        return model(inputs_embeds=tiny.shape_embeddings(inner, ids, shapes), targets=targets)
    return model(ids, pixels, targets=targets)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary file, then renamed, so a crash mid-save leaves the previous one intact.

def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")  # a stale one, left by a killed save, is simply overwritten
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        # On disk before the rename: otherwise a power loss can persist the rename but not the data, leaving an
        # empty or partial file under the final name where the previous checkpoint used to be.
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if os.name == "posix":  # and the rename itself, which lives in the folder's entry
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def trainable_state(model) -> dict:
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def run_signature(cfg: TrainConfig, stage: int, model_cfg: dict) -> dict:
    """What must match for --resume to continue a run: the stage, the model and the optimisation settings."""
    keep = ("steps", "batch_size", "lr", "abstractor_lr_scale", "seq_len", "lora_r", "lora_alpha", "lora_targets", "freeze_abstractor",
            "seed", "weight_decay", "warmup", "grad_clip", "lora_dropout", "augment", "caption_prompt")
    return {"stage": stage, "model": model_cfg, **{k: getattr(cfg, k) for k in keep}}


def differences(saved: dict, now: dict, prefix: str = "") -> list:
    """'NAME A in the checkpoint vs B now' for each setting that differs; model fields by their dotted name."""
    out = []
    for k in list(now) + [k for k in saved if k not in now]:
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif isinstance(a, dict) or isinstance(b, dict):
            out.append(f"{prefix}{k} differs")
        elif a != b:
            out.append(f"{prefix}{k} {a!r} in the checkpoint vs {b!r} now")
    return out


def resume_from(path: Path, signature: dict, model, opt, rank: int = 0, device: str = "cpu") -> tuple:
    """Put back the trainable parameters, the optimizer and this rank's random state saved in train_state.pt; returns
    (step, skipped steps). A state made with other settings is refused, naming each difference."""
    if not path.exists():
        print(f"train: --resume: there is no {path} yet, so the stage starts at step 0", file=sys.stderr)
        return 0, 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state["signature"]
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError) as e:
        fail(f"--resume refused: {path} is not a train_state.pt Owl can read ({type(e).__name__}); move it away "
             "to start the stage over")
    diff = differences(saved, signature)
    if diff:
        shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
        fail(f"--resume refused: {path} was made with other settings ({shown}); pass the same settings, or start "
             "anew in another --out-dir")
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state["trainable"].items():
            named[n].copy_(t)
    opt.load_state_dict(state["optimizer"])
    rngs = state["rng"] if isinstance(state["rng"], list) else [{"cpu": state["rng"], "cuda": None}]  # an older file
    mine = rngs[min(rank, len(rngs) - 1)]
    torch.set_rng_state(mine["cpu"])
    if mine["cuda"] is not None and str(device).startswith("cuda"):
        torch.cuda.set_rng_state(mine["cuda"], device)
    return state["step"], state["skipped"]


def open_log(path: Path, step: int):
    """metrics.jsonl: fresh for a fresh run; on resume, cut back to the saved step, since a run killed after its last
    save logged steps that the resumed run does again (a line cut short by the kill goes too)."""
    kept = []
    if step and path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                pass
    log = open(path, "w")
    log.write("".join(kept))
    return log


def param_groups(model, cfg: TrainConfig) -> list:
    """AdamW's groups of the trainable parameters, each with its weight decay and its multiple of the lr.

    Weight decay goes on every parameter but biases and the weights of norms: the rule of the HF Trainer that the
    released stage 2 trains with (mPLUG-Owl/pipeline/train.py, weight decay 1e-4 on the LoRA matrices it trains). So
    f_K's query tokens and vit_eos, and f_V's class token and position embeddings, are decayed like any matrix.
    f_K runs at --abstractor-lr-scale times the lr: the tiny run's from-scratch f_V is unstable above lr 1e-3, while
    f_K learns faster at a higher rate (position accuracy of stage-1 captions 51% -> 99% with f_K at 3x)."""
    no_decay = {id(p) for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, RMSNorm))
                for p in m.parameters(recurse=False)}
    no_decay |= {id(p) for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"}
    in_fk = {id(p) for p in model.abstractor.parameters()} if isinstance(model, Owl) else set()
    groups = []
    for fk, scale in ((False, 1.0), (True, cfg.abstractor_lr_scale)):
        for decayed in (True, False):
            mine = [p for p in model.parameters()
                    if p.requires_grad and (id(p) in in_fk) == fk and (id(p) not in no_decay) == decayed]
            if mine:
                groups.append({"params": mine, "weight_decay": cfg.weight_decay if decayed else 0.0, "lr_scale": scale})
    return groups


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def peak_flops(device) -> float:
    """Dense bf16 peak of the GPU, for MFU; 0 where unknown."""
    name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else ""
    for key, flops in (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12),
                       ("A10", 125e12)):
        if key in name:
            return flops
    return 0.0


# ---------------------------------------------------------------------------------------------------------------
# One stage

def train_stage(cfg: TrainConfig, stage: int, rank: int, world: int, device: str) -> Path:
    out = Path(cfg.out_dir) / f"stage{stage}"
    master = rank == 0
    defaults = STAGE_DEFAULTS[stage]
    cfg = TrainConfig(**{**asdict(cfg), **{k: getattr(cfg, k) or v for k, v in defaults.items()}})
    cfg.warmup = cfg.warmup or max(1, cfg.steps // 20)
    if cfg.batch_size % world:
        fail(f"--batch-size {cfg.batch_size} is not divisible by the {world} ranks")
    per_rank = cfg.batch_size // world
    # samples are sorted by length before they are cut into micro-batches, so short micro-batches pad little (one
    # micro-batch of 64 is padded to its longest sample: about twice the work in stage 0)
    micro = cfg.micro_batch or math.gcd(per_rank, 16)
    if per_rank % micro:
        fail(f"the per-rank batch {per_rank} is not divisible by --micro-batch {micro}")
    on_cuda = device.startswith("cuda")
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else (torch.bfloat16 if on_cuda else torch.float32)
    torch.manual_seed(cfg.seed + stage)

    tok_path = find_tokenizer(cfg, stage)
    tokenizer = Tokenizer(tok_path)
    model = build_model(cfg, stage, tokenizer, device, dtype)
    is_llm = isinstance(model, Llama)
    tpi = 0 if is_llm else model.cfg.tokens_per_image
    sources = load_samples(cfg, stage, tokenizer, tpi)
    order = stage_order(cfg, stage, sources)
    transform = None if is_llm else model.image_transform
    images = ImageCache(transform, cfg.augment and stage == 1, cfg.max_pixels)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.95), fused=on_cuda)
    model_cfg = asdict(model.cfg)
    signature = run_signature(cfg, stage, model_cfg)
    step, skipped, state_path = 0, 0, out / "train_state.pt"
    if cfg.resume:
        step, skipped = resume_from(state_path, signature, model, opt, rank, device)
        if master and step:
            print(f"resuming stage {stage} at step {step}", file=sys.stderr)
    saved_at = step if step else None  # the step train_state.pt holds
    # the trained parameters that a micro-batch without images (stage 2's text-only instructions) leaves out
    idle = [] if is_llm else [p for part in (model.vision_model, model.abstractor) for p in part.parameters()
                              if p.requires_grad]
    ddp_model = model
    if world > 1:
        # every backward reaches every trained parameter (idle ones get a zero gradient), so DDP needs no search
        # for unused ones: a graph traversal each step, and a warning each run where it finds none
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if on_cuda else None)
        # DDP copies each gradient into a flat bucket laid out as its parameter. The gradient of a (1, 1, D) parameter
        # (vit_eos, cls_token) can come as a slice of a larger gradient, with other strides, which DDP copies with a
        # warning: it is given the parameter's layout first.
        for p in params:
            p.register_hook(lambda g, p=p: g if g.stride() == p.stride() else torch.empty_like(p).copy_(g))
    n_params = sum(p.numel() for p in model.parameters())
    if master:
        out.mkdir(parents=True, exist_ok=True)
        n_train = sum(p.numel() for p in params)
        print(f"stage {stage}: {n_train / 1e6:.2f}M trainable of {n_params / 1e6:.2f}M "
              f"parameters, {sum(len(s) for s, _ in sources)} samples, {cfg.steps} steps of {cfg.batch_size}"
              + (f", f_V from {model.vision_source}" if getattr(model, "vision_source", None) else ""), file=sys.stderr)
    # MFU with PaLM's model FLOPs (Chowdhery et al. 2022, appendix B): a token of a sequence of T costs 6 N (forward
    # 2 N, backward 4 N, over all N parameters, frozen ones too) + 12 L D T (attention scores and their use in f_L)
    text = model.cfg if is_llm else model.cfg.text
    attention_flops = 12 * text.num_layers * text.hidden_size  # times T, per token
    peak = peak_flops(device) * world
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda and dtype == torch.bfloat16 else nullcontext()
    # SIGTERM or a first Ctrl-C asks to stop: the step under way finishes, then the state is saved. A second Ctrl-C
    # interrupts at once and saves nothing, since the step it lands in may be half applied.
    stop = {"asked": False}

    def ask_to_stop(*_):
        stop["asked"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    handlers = {sig: signal.signal(sig, ask_to_stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def save_state():
        nonlocal saved_at
        # the random state of every rank (dropout, augmentation), CPU and CUDA, so that each resumes its own stream
        rngs = [{"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if on_cuda else None}] * world
        if world > 1:
            dist.all_gather_object(rngs, rngs[0])
        if master:
            atomic_save({"signature": signature, "trainable": trainable_state(model), "optimizer": opt.state_dict(),
                         "step": step, "skipped": skipped, "rng": rngs}, state_path)
        saved_at = step

    model.train()
    frozen = {0: [], 1: [getattr(model, "language_model", None)],
              2: [getattr(model, "vision_model", None)] + ([model.abstractor] if cfg.freeze_abstractor else [])}[stage]
    for part in filter(None, frozen):
        part.eval()  # a frozen part runs as at inference: no dropout
    bar = tqdm(total=cfg.steps, initial=step, disable=not master, desc=f"stage {stage}", dynamic_ncols=True)
    log = open_log(out / "metrics.jsonl", step) if master else None
    stopping, bad_in_a_row = False, 0
    try:
        while step < cfg.steps and not stopping and bad_in_a_row < cfg.max_bad_steps:
            t0 = time.time()
            batch = order[step * cfg.batch_size: (step + 1) * cfg.batch_size]
            n_targets = sum(sum(label != -100 for label in s.labels[1:]) for s in batch)
            # sorted by length, so each micro-batch pads little; the summed loss does not depend on the order
            mine = sorted(batch[rank * per_rank: (rank + 1) * per_rank], key=lambda s: len(s.ids))
            rng = random.Random(cfg.seed * 1000003 + step * world + rank)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg) * g["lr_scale"]
            total, tokens, flops = 0.0, 0, 0
            for i in range(0, per_rank, micro):
                last = i + micro >= per_rank
                batch_tensors, weight = collate(mine[i: i + micro], images, rng, device), 1.0
                if batch_tensors is None:
                    # Every image of this micro-batch unreadable: its samples still go through, with blank images and
                    # no weight, since every rank must run each backward that DDP synchronises, or the others wait.
                    batch_tensors, weight = collate(mine[i: i + micro], images.blank, rng, device), 0.0
                ids, labels, pixels, shapes = batch_tensors
                sync = nullcontext() if last or world == 1 else ddp_model.no_sync()
                with sync, autocast:
                    # the sum over this micro-batch / the target count of the whole global batch, times the ranks
                    # DDP averages over: the same gradient as one process on the whole batch
                    loss = summed_loss(ddp_model, ids, labels, pixels, shapes) * (weight * world / max(1, n_targets))
                    if pixels is None and idle:
                        # DDP waits in each backward for the gradient of every trained parameter: f_V's and f_K's
                        # get a zero one here (and so a step with no image at all moves them as AdamW moves any
                        # parameter with a zero gradient, by momentum and weight decay, on one rank as on many)
                        loss = loss + sum(p.sum() for p in idle) * 0.0
                    loss.backward()
                total += loss.item() / world
                tokens += ids.numel()
                flops += ids.numel() * (6 * n_params + attention_flops * ids.shape[1])
            # Every rank must decide alike whether to skip and whether to stop: the loss is summed over the ranks
            # (and a stop request with it, and the unreadable images to count), and the gradient norm comes from
            # DDP's averaged gradients.
            agreed = torch.tensor([total, float(stop["asked"]), images.failed], dtype=torch.float64, device=device)
            if world > 1:
                dist.all_reduce(agreed)
            total, stopping, bad_images = agreed[0].item(), agreed[1].item() > 0, int(agreed[2].item())
            norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf))
            if math.isfinite(total) and math.isfinite(norm):
                opt.step()
                bad_in_a_row = 0
            else:  # skipped: parameters and optimizer untouched; the batch and the lr schedule's step are used up
                skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.time() - t0
            if master:
                tps = tokens * world / dt
                stats = {"stage": stage, "step": step, "loss": round(total, 4) if math.isfinite(total) else None,
                         "lr": lr_at(step - 1, cfg), "grad_norm": round(norm, 4) if math.isfinite(norm) else None,
                         "tokens_per_s": round(tps, 1), "skipped_steps": skipped, "bad_images": bad_images}
                if peak:
                    stats["mfu"] = round(flops * world / dt / peak, 4)
                log.write(json.dumps(stats) + "\n")
                log.flush()  # readable while the run goes on (tail -f)
                bar.set_postfix(loss=f"{total:.3f}", lr=f"{stats['lr']:.1e}", tok_s=f"{tps:.0f}",
                                **({"mfu": f"{stats['mfu']:.1%}"} if peak else {}),
                                **({"skipped": skipped} if skipped else {}),
                                **({"bad_images": bad_images} if bad_images else {}))
                bar.update(1)
            # only after a good step, so that train_state.pt always holds the state a good step left
            if cfg.save_every and step % cfg.save_every == 0 and not bad_in_a_row:
                save_state()
            if cfg.eval_every and step % cfg.eval_every == 0 and master:
                val = validation_loss(model, cfg, stage, tokenizer, tpi, images, device, autocast)
                if val is not None:
                    log.write(json.dumps({"stage": stage, "step": step, "val_loss": round(val, 4)}) + "\n")
    except KeyboardInterrupt:
        if master:
            print(f"\ntrain: interrupted in step {step + 1}; {state_path} holds step {saved_at}", file=sys.stderr)
        sys.exit(130)
    finally:
        bar.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if bad_in_a_row >= cfg.max_bad_steps:
        # the weights that give NaN may be where the trouble lies, so they are not saved over the last good state
        if master:
            log.close()
            kept = f"{state_path} still holds step {saved_at}" if saved_at else "no train_state.pt was saved"
            print(f"train: stopped at step {step} after {bad_in_a_row} steps in a row with a NaN or infinite loss "
                  f"or gradient norm; {kept} (try a lower --lr, or check the data)", file=sys.stderr)
        sys.exit(1)
    save_state()  # also on SIGTERM / Ctrl-C, so --resume continues from here
    if stopping:
        if master:
            log.close()
            print(f"train: stopped at step {step}; continue with --resume", file=sys.stderr)
        sys.exit(130)
    if master:
        val = validation_loss(model, cfg, stage, tokenizer, tpi, images, device, autocast)
        if val is not None:
            log.write(json.dumps({"stage": stage, "step": step, "val_loss": round(val, 4)}) + "\n")
        log.close()
        export(model, stage, out, tok_path, cfg)
        plot_losses(out / "metrics.jsonl", out / "loss.png")
        heldout = Path(cfg.heldout or Path(cfg.data_dir) / "heldout.jsonl")
        if stage == 2 and heldout.exists():
            tiny.evaluate(out, heldout, cfg.eval_samples, device)
        reading = Path(cfg.data_dir) / "heldout_reading.jsonl"
        if stage == 0 and not cfg.data and reading.exists():
            tiny.evaluate_reading(model, tokenizer, out, reading, cfg.eval_samples)
    return out


def export(model, stage: int, out: Path, tok_path: Path, cfg: TrainConfig) -> None:
    """Write the stage's result: stage 0 an HF LLaMA folder; stages 1-2 an official Owl folder (LoRA merged)."""
    from safetensors.torch import save_file

    model = model.float().eval()
    if stage == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
        (out / "config.json").write_text(json.dumps(model.cfg.to_hf(), indent=2))
        (out / "tokenizer.model").write_bytes(tok_path.read_bytes())
        return
    if stage == 2:
        lora.save_lora(model, out / "lora.safetensors")
        lora.remove_lora(model)
    model.save_pretrained(out, tokenizer_model=tok_path)


@torch.no_grad()
def validation_loss(model, cfg, stage, tokenizer, tpi, images, device, autocast):
    """Mean answer-token loss on the validation file next to the training data, if there is one."""
    d = Path(cfg.data_dir)
    path = {0: d / "val_corpus.txt", 1: d / "val_stage1.jsonl", 2: d / "val_stage2_owl.jsonl"}[stage]
    if not path.exists():
        return None
    samples = data.load_training_samples(path, stage, tokenizer, tpi, cfg.seq_len, cfg.caption_prompt)[:256]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(samples), 32):
        ids, labels, pixels, shapes = collate(samples[i: i + 32], images, random.Random(0), device)
        with autocast:
            total += summed_loss(model, ids, labels, pixels, shapes).item()
        count += int((labels[:, 1:] != -100).sum())
    model.train(was_training)
    return total / max(1, count)


def plot_losses(metrics: Path, png: Path) -> None:
    """The training-loss curve as a PNG, drawn with Pillow (no plotting library at run time)."""
    from PIL import Image, ImageDraw

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]  # a skipped step has none
    if len(losses) < 2:
        return
    W, H, pad = 640, 360, 40
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    lo, hi = min(losses), max(losses)
    pts = [(pad + i * (W - 2 * pad) / (len(losses) - 1), H - pad - (v - lo) / max(hi - lo, 1e-9) * (H - 2 * pad))
           for i, v in enumerate(losses)]
    draw.rectangle([pad, pad, W - pad, H - pad], outline="gray")
    draw.line(pts, fill=(40, 90, 200), width=2)
    draw.text((pad, 10), f"{png.parent.name}: training loss {hi:.3f} -> {losses[-1]:.3f} over {len(losses)} steps",
              fill="black")
    img.save(png)


def main(argv=None) -> None:
    cfg = parse_args(argv)
    if cfg.stage == "eval":
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        heldout = Path(cfg.heldout or Path(cfg.data_dir) / "heldout.jsonl")
        if not heldout.is_file():
            fail(f"the held-out file {heldout} does not exist (write one with `python data.py synth`)")
        if not (Path(cfg.init) / "config.json").is_file():
            fail(f"{cfg.init} is not a checkpoint folder (no config.json)")
        tiny.evaluate(Path(cfg.init), heldout, cfg.eval_samples, device)
        return
    rank, world, device = setup_distributed(cfg)
    try:
        stages = [0, 1, 2] if cfg.stage == "all" else [int(cfg.stage)]
        for stage in stages:
            train_stage(cfg, stage, rank, world, device)
            if stage == 0:
                # the batch of stage 0's f_L, whose division over the ranks train_stage has checked
                tiny.pretrain_vision(cfg, cfg.batch_size or STAGE_DEFAULTS[0]["batch_size"], rank, world, device)
            if world > 1:
                dist.barrier()
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    warnings.formatwarning = lambda message, *_, **__: f"train: {message}\n"  # one line, without the source line
    main()
