"""Train Owl in the paper's two stages, on one CPU or many GPUs (DDP under torchrun).

    stage 1  pre-training: f_V and f_K (queries, visual_fc, vit_eos included) learn to caption images; f_L frozen.
             Starts from CLIP's ViT-L/14 (--vit-init) and LLaMA-7B (--llm-init).
    stage 2  joint instruction tuning: f_V frozen; LoRA on f_L (q_proj, v_proj) and f_K trained on text-only and
             multimodal instructions mixed (--freeze-abstractor freezes f_K, as the released code does). Starts from
             a stage-1 checkpoint (--init).
             From an mPLUG-Owl2 checkpoint (--init with model_type mplug_owl2), stage 2 is mPLUG-Owl2's LoRA
             fine-tuning (its scripts/finetune_lora.sh): LoRA r 128, alpha 256 on every Linear of f_L (q, k, v, o,
             gate, up, down; k and v in both modality copies), f_K trained at its own lr, f_V frozen; the same data
             files, rendered in mPLUG-Owl2's template ("USER: <|image|>Q ASSISTANT: A</s>", the loss on each answer
             and its </s>), each image padded to a square with the mean colour. Stage 1 is mPLUG-Owl's only.
             The template is the one mPLUG-Owl2's inference uses (owl.py's, conversation.py's "mplug_owl2"); the
             script's --version v1 would add Vicuna's system text, and its train.py a newline after <|image|>.

    torchrun --nproc_per_node=8 train.py --stage 1 --vit-init CLIP --llm-init LLAMA --data captions.jsonl ...
    torchrun --nproc_per_node=8 train.py --stage 2 --init runs/owl/stage1 --data llava.json --data alpaca.json:0.5 ...
    torchrun --nproc_per_node=8 train.py --stage 2 --init mplug-owl2-llama2-7b --data llava_v1_5_mix665k.json \
        --lr 1e-4 --weight-decay 0 --batch-size 128 --seq-len 2048 --grad-checkpointing ...   # finetune_lora.sh's

Each stage writes OUT_DIR/stageN/: a full checkpoint in the official format (LoRA merged) that `python owl.py
--checkpoint` loads, the LoRA adapter alone (stage 2), metrics.jsonl, loss.png, and train_state.pt for --resume.
The step, batch and learning-rate defaults are the tiny run's (tiny.py); a real run names its own.
"""
import argparse
import json
import math
import os
import random
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

import data
import lora
import resume
from llama import Llama, RMSNorm, Tokenizer, cpu_bf16_flags
from owl import MAX_PIXELS, Owl, OwlConfig, UserError
from plot import plot_losses
from vit import VisionTransformer


@dataclass
class TrainConfig:
    stage: str = "1"  # 1, 2, or all (1 then 2; stage 2 starts from stage 1's result)
    out_dir: str = "runs/owl"  # each stage writes out_dir/stageN
    data: tuple = ()  # training data, PATH or PATH:WEIGHT, repeatable: stage 1 image-caption JSONL; stage 2 official mPLUG-Owl JSONL, LLaVA JSON or Alpaca JSON
    stage2_data: tuple = ()  # with --stage all: stage 2's data (--data is stage 1's)
    val_data: str = ""  # a file in the stage's format for the validation loss (with --stage all, stage 1's)
    stage2_val_data: str = ""  # with --stage all: stage 2's validation file
    model: str = "tiny"  # preset for the parts built from scratch (f_K, and f_V without --vit-init): tiny or owl-7b
    init: str = ""  # an official mPLUG-Owl checkpoint folder to start from (stage 2's usual start)
    vit_init: str = ""  # an HF CLIP folder for f_V (stage 1's start); without it f_V starts random
    llm_init: str = ""  # an HF or Meta LLaMA folder for f_L (stage 1's start)
    tokenizer: str = ""  # tokenizer.model; default: the one in the checkpoint or LLaMA folder the stage starts from
    steps: int = 0  # optimizer steps per stage; 0 = the stage's default
    batch_size: int = 0  # global batch (samples per optimizer step, all ranks); 0 = the stage's default
    micro_batch: int = 0  # samples per forward pass on one rank; 0 = gcd(per-rank batch, 16): few pads, same gradient
    lr: float = 0.0  # peak learning rate; 0 = the stage's default
    abstractor_lr_scale: float = 0.0  # f_K's lr as a multiple of --lr; 0 = the model's default: 3 for v1 (the tiny run's; 1 = one lr for all, as released), 0.2 for Owl2 (finetune_lora.sh's f_K lr over its lr)
    warmup: int = 0  # warm-up steps (linear), then cosine to lr/10; 0 = 5% of the steps
    weight_decay: float = 0.01  # AdamW decoupled weight decay on every parameter but biases and norm weights (queries too), the rule of the HF Trainer the released code trains with
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping (the norm is still logged)
    max_bad_steps: int = 10  # a NaN or infinite loss or gradient norm skips the step; this many in a row stop the run
    seq_len: int = 256  # tokens per sample, longer ones are truncated
    lora_r: int = 0  # LoRA rank (stage 2); 0 = the model's released recipe: 8 for v1, 128 for Owl2
    lora_alpha: float = 0.0  # LoRA scale alpha, the update being (alpha / r) B A; 0 = 32 for v1, 256 for Owl2
    lora_dropout: float = 0.05  # dropout on the LoRA input path
    lora_targets: str = ""  # comma-separated f_L Linear names that get LoRA (in Owl2 both modality copies of k_proj, v_proj); "" = q_proj,v_proj for v1, all seven for Owl2
    freeze_abstractor: bool = False  # stage 2: keep f_K frozen, as the released code does (the paper trains it)
    max_pixels: int = MAX_PIXELS  # an image with more pixels is skipped (and counted), refused from its header
    caption_prompt: str = "Describe the image."  # stage 1: each caption is learnt as the answer to this question about its image ("Human: <image>\nHuman: Q\nAI: caption", the chat layout stage 2 uses); "" puts the caption right after the image
    augment: bool = False  # stage-1 RandomResizedCrop + flip, as the official recipe (flips break left/right answers)
    grad_checkpointing: bool = False  # recompute f_V / f_L activations in backward to save memory
    eval_every: int = 0  # validation loss every N steps; 0 = at the end only
    save_every: int = 0  # train_state.pt every N steps; 0 = at the end only
    resume: bool = False  # continue from out_dir/stageN/train_state.pt (same settings required)
    seed: int = 1337  # seeds the initialisation, the data order and dropout
    device: str = ""  # default: cuda if available, else cpu
    dtype: str = ""  # bfloat16, float32 or auto; default bfloat16 on CUDA, float32 on CPU; auto = bfloat16 on CUDA and on a CPU with bf16 instructions (AVX512-BF16, AMX), where autocast runs the matmuls in bf16 about 1.4x faster (attention, weights and the loss stay fp32)


# Defaults sized for the tiny run, so that `make demo` finishes in minutes on 2 CPU cores (docs/lab-notes.md holds
# the measurements). A from-scratch f_V is unstable above lr 1e-3; stage 1 gets most of the time at that rate (with
# shapes anywhere, 400 steps left the Owl naming 78% of lone shapes, 800 steps 98.5%).
STAGE_DEFAULTS = {1: dict(steps=800, batch_size=64, lr=1e-3), 2: dict(steps=300, batch_size=64, lr=1e-3)}
# Defaults that follow the model trained: mPLUG-Owl's released LoRA (pipeline/train.py) and the tiny run's f_K rate;
# mPLUG-Owl2's scripts/finetune_lora.sh (every Linear of f_L but lm_head, as its find_all_linear_names picks them,
# and --visual_abstractor_lr 2e-5 with --learning_rate 1e-4).
MODEL_DEFAULTS = {
    1: dict(lora_r=8, lora_alpha=32.0, lora_targets="q_proj,v_proj", abstractor_lr_scale=3.0),
    2: dict(lora_r=128, lora_alpha=256.0, lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
            abstractor_lr_scale=0.2),
}


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
    if cfg.stage not in ("1", "2", "all"):
        p.error("--stage must be 1, 2 or all")
    if not cfg.data:
        p.error("--data is required: the training data files of the stage")
    if cfg.stage == "all" and not cfg.stage2_data:
        p.error("--stage all needs --stage2-data (stage 2's files; --data is stage 1's)")
    if cfg.stage != "all" and (cfg.stage2_data or cfg.stage2_val_data):
        p.error("--stage2-data and --stage2-val-data go with --stage all only")
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
    prev = Path(cfg.out_dir) / "stage1"
    if cfg.init:
        model = Owl.from_pretrained(cfg.init, torch.float32, device)
        tokenizer.legacy = model.tokenizer.legacy  # the checkpoint's reading of text after </s> (Owl2 prompts)
    elif stage == 2 and (prev / "config.json").exists() and not cfg.llm_init:
        model = Owl.from_pretrained(prev, torch.float32, device)
    else:  # from parts: f_V from CLIP (or random), a random f_K, f_L from a LLaMA folder
        ocfg = OwlConfig.preset(cfg.model)
        if ocfg.version == 2:
            fail(f"--model {cfg.model} is mPLUG-Owl2, which Owl fine-tunes from its checkpoint only: --stage 2 "
                 "--init FOLDER")
        meta = (Path(cfg.llm_init) / "params.json").exists()
        llm = Llama.from_meta(cfg.llm_init) if meta else Llama.from_hf(cfg.llm_init)
        ocfg.text = llm.cfg
        ocfg.abstractor.llm_hidden_size = llm.cfg.hidden_size
        if cfg.vit_init:
            vit = VisionTransformer.from_clip(cfg.vit_init)
            ocfg.vision = vit.cfg
            ocfg.abstractor.hidden_size = vit.cfg.hidden_size
        model = Owl(ocfg)
        model.init_weights()
        model.language_model = llm
        if cfg.vit_init:
            model.vision_model = vit
        model = model.to(device)
    if stage == 1 and model.cfg.version == 2:
        fail(f"{cfg.init} is an mPLUG-Owl2 checkpoint, which Owl fine-tunes in stage 2 only (--stage 2 --init); "
             "stage 1 is mPLUG-Owl's pre-training")
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
    if str(device).startswith("cuda") and dtype == torch.bfloat16:
        model.language_model.to(torch.bfloat16)  # frozen f_L held in bf16; LoRA params stay fp32 (lora.py)
        for m in model.language_model.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_A.data, m.lora_B.data = m.lora_A.data.float(), m.lora_B.data.float()
    model.vision_model.encoder.grad_checkpointing = cfg.grad_checkpointing
    model.language_model.grad_checkpointing = cfg.grad_checkpointing
    return model


def find_tokenizer(cfg: TrainConfig, stage: int) -> Path:
    """The tokenizer of the model a stage starts from: --tokenizer, else the checkpoint's or the LLaMA folder's."""
    prev = Path(cfg.out_dir) / "stage1" / "tokenizer.model"
    for cand in (cfg.tokenizer, cfg.init and Path(cfg.init) / "tokenizer.model",
                 cfg.llm_init and Path(cfg.llm_init) / "tokenizer.model", stage == 2 and prev):
        if cand and Path(cand).exists():
            return Path(cand)
    fail("no tokenizer.model found beside --init or --llm-init; pass --tokenizer")


# ---------------------------------------------------------------------------------------------------------------
# The loss: each position predicts the next token, on the answers only

def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t + 1: the labels moved one to the left, -100 (no loss) at the end."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def summed_loss(model, ids, labels, pixels):
    """Sum of the next-token cross-entropy over the answer tokens (labels != -100). f_L makes logits only for
    positions with a target, a block at a time (llama.ChunkedCrossEntropy): the image tokens and prompts get none,
    and the (B, T, 32000) float32 logits of owl-7b never exist whole."""
    return model(ids, pixels, targets=shifted_targets(labels))


# ---------------------------------------------------------------------------------------------------------------
# Optimisation: what a resumed run must share, AdamW's groups, the lr schedule, the FLOPs of a step

def run_signature(cfg: TrainConfig, stage: int, model_cfg: dict) -> dict:
    """What must match for --resume to continue a run: the stage, the model and the optimisation settings."""
    keep = ("steps", "batch_size", "lr", "abstractor_lr_scale", "seq_len", "lora_r", "lora_alpha", "lora_targets", "freeze_abstractor",
            "seed", "weight_decay", "warmup", "grad_clip", "lora_dropout", "augment", "caption_prompt")
    return {"stage": stage, "model": model_cfg, **{k: getattr(cfg, k) for k in keep}}


def param_groups(model, cfg: TrainConfig) -> list:
    """AdamW's groups of the trainable parameters, each with its weight decay and its multiple of the lr.

    Weight decay goes on every parameter but biases and the weights of norms: the rule of the HF Trainer that the
    released stage 2 trains with (mPLUG-Owl/pipeline/train.py, weight decay 1e-4 on the LoRA matrices it trains). So
    f_K's query tokens and vit_eos, and f_V's class token and position embeddings, are decayed like any matrix.
    f_K runs at --abstractor-lr-scale times the lr: the tiny run's from-scratch f_V is unstable above lr 1e-3, while
    f_K learns faster at a higher rate (position accuracy of stage-1 captions 51% -> 99% with f_K at 3x). mPLUG-Owl2's
    finetune_lora.sh asks for f_K at 2e-5 with the lr at 1e-4 (scale 0.2, its default here), in groups like these
    (mplug_owl2_trainer.py); that trainer picks f_K's parameters by the name "visual_abstractor_lr", which none has,
    so the released script in fact runs f_K at the lr (--abstractor-lr-scale 1 does as it does)."""
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


def model_flops(model):
    """tokens, token_pairs -> the training FLOPs of a step, PaLM's model FLOPs (Chowdhery et al. 2022, appendix B):
    a token of a sequence of T costs 6 N (forward 2 N, backward 4 N, over all N parameters, frozen ones too) +
    12 L D T (attention scores and their use in f_L); token_pairs sums T over the tokens."""
    n_params = sum(p.numel() for p in model.parameters())
    text = model.cfg if isinstance(model, Llama) else model.cfg.text
    return lambda tokens, token_pairs: 6 * n_params * tokens + 12 * text.num_layers * text.hidden_size * token_pairs


def peak_flops(device) -> float:
    """Dense bf16 peak of the GPU, for MFU; 0 where unknown."""
    name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else ""
    for key, flops in (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12),
                       ("A10", 125e12)):
        if key in name:
            return flops
    return 0.0


# ---------------------------------------------------------------------------------------------------------------
# One stage: build the model, read the data, fit, export

def start_version(cfg: TrainConfig) -> int:
    """The version of the model a stage starts from, for its defaults: 2 when --init is an mPLUG-Owl2 folder
    (config.json's model_type 'mplug_owl2'), else 1 (a stage-1 result, a model built from parts). A config.json
    that cannot be read counts as 1 here; Owl.from_pretrained then says what is wrong with it."""
    if not cfg.init:
        return 1
    try:
        return 2 if json.loads((Path(cfg.init) / "config.json").read_text()).get("model_type") == "mplug_owl2" else 1
    except (OSError, ValueError, AttributeError):
        return 1


def stage_config(cfg: TrainConfig, stage: int, version: int = 1) -> TrainConfig:
    """cfg with the stage's and the model version's defaults filled in and its own data: for --stage all, stage 2
    reads --stage2-data."""
    filled = {k: getattr(cfg, k) or v for k, v in {**STAGE_DEFAULTS[stage], **MODEL_DEFAULTS[version]}.items()}
    if cfg.stage == "all" and stage == 2:
        filled.update(data=cfg.stage2_data, val_data=cfg.stage2_val_data)
    out = TrainConfig(**{**asdict(cfg), **filled})
    out.warmup = out.warmup or max(1, out.steps // 20)
    return out


def train_stage(cfg: TrainConfig, stage: int, rank: int, world: int, device: str) -> Path:
    """Stage 1 or 2, from its start (build_model) to its checkpoint in out_dir/stageN."""
    cfg = stage_config(cfg, stage, start_version(cfg))
    out = Path(cfg.out_dir) / f"stage{stage}"
    dtype = train_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed + stage)
    after_stage1 = stage == 2 and (Path(cfg.out_dir) / "stage1" / "config.json").exists()
    if not (cfg.init or cfg.llm_init or after_stage1):
        fail(f"stage {stage} needs --init (an Owl checkpoint) or --llm-init (a LLaMA folder) to start from")
    tok_path = find_tokenizer(cfg, stage)
    tokenizer = Tokenizer(tok_path)
    model = build_model(cfg, stage, tokenizer, device, dtype)
    tpi = model.cfg.tokens_per_image
    read = partial(data.load_training_samples, template=model.cfg.template)  # each conversation in the model's own
    sources = data.load_samples(cfg.data, stage, tokenizer, tpi, cfg.seq_len, cfg.caption_prompt, read)
    order = data.sample_order(sources, cfg.steps * cfg.batch_size, cfg.seed + stage)
    images = data.ImageCache(training_transform(model), cfg.augment and stage == 1, cfg.max_pixels)
    # the trained parameters that a micro-batch without images (stage 2's text-only instructions) leaves out
    idle = [p for part in (model.vision_model, model.abstractor) for p in part.parameters() if p.requires_grad]

    def micro_loss(ddp_model, samples, rng):
        batch, weight = data.collate(samples, images, rng, device), 1.0
        if batch is None:
            # Every image of this micro-batch unreadable: its samples still go through, with blank images and no
            # weight, since every rank must run each backward that DDP synchronises, or the others wait.
            batch, weight = data.collate(samples, images, rng, device, blank=True), 0.0
        ids, labels, pixels, _ = batch
        loss = summed_loss(ddp_model, ids, labels, pixels) * weight
        if pixels is None and idle:
            # DDP waits in each backward for the gradient of every trained parameter: f_V's and f_K's get a zero one
            # here (so a step with no image at all moves them as AdamW moves any parameter with a zero gradient)
            loss = loss + sum(p.sum() for p in idle) * 0.0
        return loss, ids

    val = None
    if cfg.val_data:
        val_samples = data.load_samples([cfg.val_data], stage, tokenizer, tpi, cfg.seq_len, cfg.caption_prompt, read)[0][0]
        val = lambda: validation_loss(model, val_samples[:256], micro_loss)  # noqa: E731
    frozen = [model.language_model] if stage == 1 else [model.vision_model] + (
        [model.abstractor] if cfg.freeze_abstractor else [])
    vision = f", f_V from {cfg.vit_init}" if cfg.vit_init else ""
    fit(model, cfg, order, micro_loss, out, f"stage {stage}", rank, world, device,
        signature=run_signature(cfg, stage, asdict(model.cfg)), frozen=frozen, validate=val,
        bad_images=lambda: images.failed, intro=f"{sum(len(s) for s, _ in sources)} samples{vision}")
    if rank == 0:
        export(model, stage, out, tok_path)
    return out


def training_transform(model: Owl):
    """The images' preprocessing in training: mPLUG-Owl2's padded to a square with the mean colour, as its
    fine-tuning pads them (data.PadToSquare, with the checkpoint's mean and std); mPLUG-Owl's as at inference."""
    t = model.image_transform
    return data.PadToSquare(t.image_size, t.mean, t.std) if model.cfg.version == 2 else t


def cpu_has_bf16() -> bool:
    """Whether `--dtype auto` trains in bf16 on this CPU (llama.cpu_bf16_flags)."""
    return bool(cpu_bf16_flags())


def train_dtype(name: str, device: str) -> torch.dtype:
    """--dtype: "" is bf16 on CUDA and fp32 on CPU; auto is bf16 on CUDA and on a CPU with bf16 instructions. On CPU,
    bf16 means autocast (the matmuls in bf16, weights, norms and the loss in fp32)."""
    if name not in ("", "auto", "bfloat16", "float32"):
        fail(f"--dtype {name!r}: use bfloat16, float32 or auto")
    if name in ("", "auto"):
        cuda = device.startswith("cuda")
        return torch.bfloat16 if cuda or (name == "auto" and cpu_has_bf16()) else torch.float32
    return getattr(torch, name)


class Fp32Attention(TorchFunctionMode):
    """Attention in fp32 inside a CPU autocast: PyTorch's CPU attention is 2-3x slower in bf16 than in fp32 (forward
    and backward, measured on AVX512-BF16), while its bf16 matmuls are about twice as fast."""
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v, *rest = args
            with torch.autocast("cpu", enabled=False):
                return func(q.float(), k.float(), v.float(), *rest, **kwargs)
        return func(*args, **kwargs)


@contextmanager
def mixed_precision(dtype: torch.dtype, device: str):
    """The context each forward runs in: nothing for fp32; bf16 autocast for bf16, on CPU with attention in fp32."""
    if dtype != torch.bfloat16:
        yield
        return
    kind = device.split(":")[0]
    with torch.autocast(kind, dtype=torch.bfloat16), (Fp32Attention() if kind == "cpu" else nullcontext()):
        yield


def micro_batch_size(cfg: TrainConfig, world: int) -> int:
    """Samples per micro-batch (--micro-batch, else up to 16), refusing a batch the ranks or micro-batches cannot share."""
    if cfg.batch_size % world:
        fail(f"--batch-size {cfg.batch_size} is not divisible by the {world} ranks")
    per_rank = cfg.batch_size // world
    micro = cfg.micro_batch or math.gcd(per_rank, 16)
    if per_rank % micro:
        fail(f"the per-rank batch {per_rank} is not divisible by --micro-batch {micro}")
    return micro


def wrap_ddp(model, params: list, world: int, device: str):
    """The model under DistributedDataParallel when there are several ranks, else the model itself."""
    if world == 1:
        return model
    # every backward reaches every trained parameter (micro_loss gives idle ones a zero gradient), so DDP needs no
    # search for unused ones: a graph traversal each step, and a warning each run where it finds none
    ddp_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.startswith("cuda") else None)
    # DDP copies each gradient into a flat bucket laid out as its parameter. The gradient of a (1, 1, D) parameter
    # (vit_eos, cls_token) can come as a slice of a larger gradient, with other strides, which DDP copies with a
    # warning: it is given the parameter's layout first.
    for p in params:
        p.register_hook(lambda g, p=p: g if g.stride() == p.stride() else torch.empty_like(p).copy_(g))
    return ddp_model


def train_step(ddp_model, opt, params: list, cfg: TrainConfig, step: int, batch: list, rank: int, world: int,
               micro: int, micro_loss, autocast, stop_asked: bool, bad_images, device: str) -> dict:
    """Step number step of AdamW on this rank's share of the global batch, a micro-batch at a time, the gradients
    synchronised by DDP in the last backward only. A step whose loss or gradient norm is not finite is skipped.
    bad_images() counts the images found unreadable so far. Returns the step's loss, gradient norm, token counts,
    and what the ranks agreed."""
    n_targets = sum(sum(label != -100 for label in s.labels[1:]) for s in batch)
    per_rank = len(batch) // world
    # sorted by length, so each micro-batch pads little; the summed loss does not depend on the order
    mine = sorted(batch[rank * per_rank: (rank + 1) * per_rank], key=lambda s: len(s.ids))
    rng = random.Random(cfg.seed * 1000003 + step * world + rank)
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg) * g["lr_scale"]
    total, tokens, token_pairs = 0.0, 0, 0
    for i in range(0, len(mine), micro):
        sync = nullcontext() if i + micro >= len(mine) or world == 1 else ddp_model.no_sync()
        with sync, autocast():
            loss, ids = micro_loss(ddp_model, mine[i: i + micro], rng)
            # the sum over this micro-batch / the target count of the whole global batch, times the ranks DDP
            # averages over: the same gradient as one process on the whole batch
            loss = loss * (world / max(1, n_targets))
            loss.backward()
        total += loss.item() / world
        tokens += ids.numel()
        token_pairs += ids.numel() * ids.shape[1]  # attention's cost grows with the sequence length
    # Every rank must decide alike whether to skip and whether to stop: the loss is summed over the ranks (and a
    # stop request with it, and the unreadable images to count), and the gradient norm comes from DDP's averaged
    # gradients.
    agreed = torch.tensor([total, float(stop_asked), bad_images()], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(agreed)
    total = agreed[0].item()
    norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf))
    applied = math.isfinite(total) and math.isfinite(norm)
    if applied:
        opt.step()
    # else skipped: parameters and optimizer untouched; the batch and the lr schedule's step are used up
    opt.zero_grad(set_to_none=True)
    return {"loss": total, "norm": norm, "tokens": tokens, "token_pairs": token_pairs, "applied": applied,
            "stop": agreed[1].item() > 0, "bad_images": int(agreed[2].item())}


def fit(model, cfg: TrainConfig, order: list, micro_loss, out: Path, name: str, rank: int, world: int, device: str,
        signature: dict, frozen=(), validate=None, bad_images=lambda: 0, intro: str = "") -> None:
    """The training loop, for any model and loss: cfg.steps AdamW steps of cfg.batch_size samples from order (the
    run's global sample order), each rank taking its share in micro-batches of cfg.micro_batch;
    micro_loss(model, samples, rng) -> (summed loss, ids). DDP under torchrun, NaN skips, SIGTERM / Ctrl-C,
    train_state.pt for --resume, metrics.jsonl (with MFU on a known GPU), validate() -> loss or None. Frozen parts
    run in eval mode (no dropout). Exits with 130 when stopped, 1 after --max-bad-steps bad steps in a row."""
    master, on_cuda = rank == 0, device.startswith("cuda")
    micro = micro_batch_size(cfg, world)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.95), fused=on_cuda)
    step, skipped, state_path = 0, 0, out / "train_state.pt"
    if cfg.resume:
        step, skipped = resume.resume_from(state_path, signature, model, opt, rank, device)
        if master and step:
            print(f"resuming {name} at step {step}", file=sys.stderr)
    saved_at = step if step else None  # the step train_state.pt holds
    ddp_model = wrap_ddp(model, params, world, device)
    n_params = sum(p.numel() for p in model.parameters())
    if master:
        out.mkdir(parents=True, exist_ok=True)
        print(f"{name}: {sum(p.numel() for p in params) / 1e6:.2f}M trainable of {n_params / 1e6:.2f}M parameters, "
              f"{cfg.steps} steps of {cfg.batch_size}" + (f", {intro}" if intro else ""), file=sys.stderr)
    flops_of, peak = model_flops(model), peak_flops(device) * world
    autocast = partial(mixed_precision, train_dtype(cfg.dtype, device), device)

    def train_mode():
        model.train()
        for part in frozen:
            part.eval()  # a frozen part runs as at inference: no dropout

    def log_validation():
        if validate and master:
            with autocast():
                loss = validate()
            log.write(json.dumps({"stage": name, "step": step, "val_loss": round(loss, 4)}) + "\n")
        train_mode()

    train_mode()
    bar = tqdm(total=cfg.steps, initial=step, disable=not master, desc=name, dynamic_ncols=True)
    log = resume.open_log(out / "metrics.jsonl", step) if master else None
    stopping, bad_in_a_row = False, 0
    try:
        with resume.StopRequest() as stop:
            while step < cfg.steps and not stopping and bad_in_a_row < cfg.max_bad_steps:
                t0 = time.time()
                batch = order[step * cfg.batch_size: (step + 1) * cfg.batch_size]
                r = train_step(ddp_model, opt, params, cfg, step, batch, rank, world, micro, micro_loss, autocast,
                               stop.asked, bad_images, device)
                stopping = r["stop"]
                skipped, bad_in_a_row = (skipped, 0) if r["applied"] else (skipped + 1, bad_in_a_row + 1)
                step += 1
                if master:
                    dt = time.time() - t0
                    flops = flops_of(r["tokens"], r["token_pairs"])
                    log_step(log, bar, name, step, r["loss"], r["norm"], lr_at(step - 1, cfg),
                             r["tokens"] * world / dt, skipped, r["bad_images"], flops * world / dt / peak if peak else None)
                # only after a good step, so that train_state.pt always holds the state a good step left
                if cfg.save_every and step % cfg.save_every == 0 and not bad_in_a_row:
                    saved_at = resume.save_state(state_path, model, opt, signature, step, skipped, rank, world, device)
                if cfg.eval_every and step % cfg.eval_every == 0:
                    log_validation()
    except KeyboardInterrupt:
        if master:
            print(f"\ntrain: interrupted in step {step + 1}; {state_path} holds step {saved_at}", file=sys.stderr)
        sys.exit(130)
    finally:
        bar.close()
    if bad_in_a_row >= cfg.max_bad_steps:
        # the weights that give NaN may be where the trouble lies, so they are not saved over the last good state
        if master:
            log.close()
            kept = f"{state_path} still holds step {saved_at}" if saved_at else "no train_state.pt was saved"
            print(f"train: stopped at step {step} after {bad_in_a_row} steps in a row with a NaN or infinite loss "
                  f"or gradient norm; {kept} (try a lower --lr, or check the data)", file=sys.stderr)
        sys.exit(1)
    resume.save_state(state_path, model, opt, signature, step, skipped, rank, world, device)  # on a stop too, for --resume
    if master:
        if not stopping:
            log_validation()
        log.close()
        if stopping:
            print(f"train: stopped at step {step}; continue with --resume", file=sys.stderr)
            sys.exit(130)
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    elif stopping:
        sys.exit(130)


def log_step(log, bar, name, step, loss, norm, lr, tokens_per_s, skipped, bad_images, mfu) -> None:
    """One line of metrics.jsonl (flushed, so `tail -f` follows the run) and the progress bar's figures."""
    stats = {"stage": name, "step": step, "loss": round(loss, 4) if math.isfinite(loss) else None, "lr": lr,
             "grad_norm": round(norm, 4) if math.isfinite(norm) else None, "tokens_per_s": round(tokens_per_s, 1),
             "skipped_steps": skipped, "bad_images": bad_images, **({"mfu": round(mfu, 4)} if mfu is not None else {})}
    log.write(json.dumps(stats) + "\n")
    log.flush()
    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_s:.0f}",
                    **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}), **({"skipped": skipped} if skipped else {}),
                    **({"bad_images": bad_images} if bad_images else {}))
    bar.update(1)


def export(model, stage: int, out: Path, tok_path: Path) -> None:
    """Write the stage's result as an official Owl folder (LoRA merged; stage 2 also writes the adapter alone)."""
    model = model.float().eval()
    if stage == 2:
        lora.save_lora(model, out / "lora.safetensors")
        lora.remove_lora(model)
    model.save_pretrained(out, tokenizer_model=tok_path)


@torch.no_grad()
def validation_loss(model, samples: list, micro_loss) -> float:
    """Mean loss per answer token over held-out samples, in eval mode (no dropout)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(samples), 32):
        loss, _ = micro_loss(model, samples[i: i + 32], random.Random(0))
        total += loss.item()
        count += sum(sum(label != -100 for label in s.labels[1:]) for s in samples[i: i + 32])
    return total / max(1, count)


def main(argv=None) -> None:
    cfg = parse_args(argv)
    rank, world, device = setup_distributed(cfg)
    try:
        for stage in [1, 2] if cfg.stage == "all" else [int(cfg.stage)]:
            train_stage(cfg, stage, rank, world, device)
            if world > 1:
                dist.barrier()
    except UserError as e:  # bad --data, an unusable train_state.pt for --resume, ...
        fail(e.args[0])
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    warnings.formatwarning = lambda message, *_, **__: f"train: {message}\n"  # one line, without the source line
    main()
