"""Owl: mPLUG-Owl (Ye et al. 2023, arXiv 2304.14178) from pixels to the next token.

    image ──f_V (vit.py)──> 257 patch tokens ──f_K (abstractor.py)──> 65 visual tokens ─┐
    prompt ──SentencePiece──> ids with 65 placeholders per <image> ──embed──> text embeddings ┴─splice─> f_L (llama.py)
                                                                                                        └─> next token

The visual tokens of each image replace the embeddings of its placeholders, in order, and the language model reads
the result as if it were text. This file joins the three parts, owns the prompt (the template, the chunk-wise
tokenisation and the image placeholders), reads and writes the official checkpoint format, and is the CLI:

    python owl.py --checkpoint DIR --image x.jpg --prompt "What is in the picture?"
"""
import argparse
import json
import pickle
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError

from abstractor import AbstractorConfig, VisualAbstractor
from llama import Llama, LlamaConfig, Tokenizer, build_empty, iter_tensors, load_into
from vit import ImageTransform, ViTConfig, VisionTransformer

# --------------------------------------------------------------------------------------------------------------
# The prompt. One BOS for the whole sequence; the text between <image> tags is tokenised chunk by chunk (so each
# chunk gets SentencePiece's leading space, exactly as the official processor does); each <image> becomes
# num_queries + 1 placeholder ids, later filled with that image's visual tokens.

SYSTEM = ("The following is a conversation between a curious human and AI assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE = "<image>"
IMAGE_ID = -1  # placeholder id: never a real token, replaced by a visual token before f_L sees it


def render_turn(question: str, num_images: int = 0) -> str:
    """One turn: a `Human: <image>` line per image shown at this turn, the question, and 'AI: ' (trailing space)
    after which the answer follows. A conversation is SYSTEM + turn + answer + turn + answer ..."""
    return f"\nHuman: {IMAGE}" * num_images + f"\nHuman: {question}\nAI: "


def render_prompt(question: str, num_images: int) -> str:
    """The canonical single-turn prompt of the released model."""
    return SYSTEM + render_turn(question, num_images)


def tokenize(tokenizer: Tokenizer, text: str, tokens_per_image: int) -> List[int]:
    """Ids of text (no BOS): text chunks tokenised separately, each <image> -> tokens_per_image placeholders."""
    ids = []
    for chunk in re.split(f"({re.escape(IMAGE)})", text):
        if chunk == IMAGE:
            ids += [IMAGE_ID] * tokens_per_image
        elif chunk:
            ids += tokenizer.encode(chunk)
    return ids


# --------------------------------------------------------------------------------------------------------------
# The model


@dataclass
class OwlConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    abstractor: AbstractorConfig = field(default_factory=AbstractorConfig)
    text: LlamaConfig = field(default_factory=LlamaConfig)

    @property
    def tokens_per_image(self) -> int:
        return self.abstractor.num_queries + 1  # the queries plus vit_eos: 65 in the released model

    @classmethod
    def preset(cls, name: str) -> "OwlConfig":
        if name == "owl-7b":
            return cls(ViTConfig.preset("vit-l14"), AbstractorConfig.preset("owl-7b"), LlamaConfig.preset("llama-7b"))
        if name == "tiny":
            return cls(ViTConfig.preset("tiny"), AbstractorConfig.preset("tiny"), LlamaConfig.preset("tiny"))
        raise ValueError(f"unknown Owl preset {name!r}; choose from ['owl-7b', 'tiny']")

    @classmethod
    def from_official(cls, d: dict) -> "OwlConfig":
        """From an mPLUG-Owl config.json (model_type 'mplug-owl')."""
        text = LlamaConfig.from_hf(d.get("text_config", {}))
        vision = ViTConfig.from_official(d.get("vision_config", {}))
        abstractor = AbstractorConfig.from_official(d.get("visual_abstractor_config", {}),
                                                    d.get("num_query_tokens", 64), text.hidden_size)
        if abstractor.hidden_size != vision.hidden_size:
            raise ValueError("the abstractor's hidden_size must equal the vision model's hidden_size")
        return cls(vision, abstractor, text)

    def to_official(self) -> dict:
        v, a = self.vision, self.abstractor
        return {
            "model_type": "mplug-owl", "architectures": ["MplugOwlForConditionalGeneration"],
            "num_query_tokens": a.num_queries,
            "vision_config": {"model_type": "mplug_owl_vision_model", "hidden_size": v.hidden_size,
                              "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
                              "num_attention_heads": v.num_heads, "image_size": v.image_size,
                              "patch_size": v.patch_size, "layer_norm_eps": v.layer_norm_eps,
                              "hidden_act": "quick_gelu", "num_channels": 3},
            "visual_abstractor_config": {"model_type": "mplug_owl_visual_abstract", "hidden_size": a.hidden_size,
                                         "num_hidden_layers": a.num_layers, "num_attention_heads": a.num_heads,
                                         "intermediate_size": a.intermediate_size, "layer_norm_eps": a.layer_norm_eps,
                                         "encoder_hidden_size": v.hidden_size,
                                         "attention_probs_dropout_prob": a.attention_dropout},
            "text_config": self.text.to_hf(),
        }


class Owl(nn.Module):
    """f_V + f_K + f_L. Attribute names follow the official checkpoint: vision_model, abstractor, language_model."""

    def __init__(self, cfg: OwlConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionTransformer(cfg.vision)
        self.abstractor = VisualAbstractor(cfg.abstractor)
        self.language_model = Llama(cfg.text)
        self.tokenizer: Optional[Tokenizer] = None
        self.image_transform = ImageTransform(cfg.vision.image_size)

    def init_weights(self) -> None:
        for part in (self.vision_model, self.abstractor, self.language_model):
            part.init_weights()

    def encode_images(self, pixels: torch.Tensor, return_weights: bool = False):
        """pixels (N, 3, S, S) -> visual tokens (N, num_queries + 1, llm_hidden): f_V, then f_K."""
        patches = self.vision_model(pixels.to(self.vision_model.embeddings.patch_embed.weight.dtype))
        return self.abstractor(patches, return_weights=return_weights)

    def embed(self, input_ids: torch.Tensor, pixels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (B, T) with IMAGE_ID placeholders -> input embeddings (B, T, llm_hidden) with visual tokens in."""
        is_image = input_ids == IMAGE_ID
        x = self.language_model.model.embed_tokens(input_ids.clamp(min=0))
        n_slots = int(is_image.sum())
        if n_slots == 0:
            return x
        if pixels is None or n_slots != len(pixels) * self.cfg.tokens_per_image:
            given = 0 if pixels is None else len(pixels)
            raise ValueError(f"the ids hold {n_slots // self.cfg.tokens_per_image} image slots but {given} images were given")
        visual = self.encode_images(pixels).to(x.dtype)  # (N, Q+1, D)
        # row-major fill: the first slot in the batch gets the first image's first token, and so on
        return x.masked_scatter(is_image.unsqueeze(-1), visual.reshape(-1, visual.shape[-1]))

    def forward(self, input_ids: torch.Tensor, pixels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, T, vocab) for ids with image placeholders; images in the order their slots appear."""
        return self.language_model(inputs_embeds=self.embed(input_ids, pixels))

    @torch.inference_mode()
    def generate(self, ids: List[int], pixels: Optional[torch.Tensor] = None, max_new_tokens: int = 512,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, generator=None) -> Iterator[int]:
        """Yield the answer's token ids one by one (batch 1). ids: BOS + prompt ids with placeholders."""
        context = self.cfg.text.max_position_embeddings
        if len(ids) >= context:
            raise ValueError(f"the prompt is {len(ids)} tokens long, more than the context of {context} tokens")
        device = self.language_model.lm_head.weight.device
        embeds = self.embed(torch.tensor([ids], device=device), None if pixels is None else pixels.to(device))
        yield from self.language_model.generate(inputs_embeds=embeds, max_new_tokens=max_new_tokens,
                                                eos_id=self.tokenizer.eos_id, temperature=temperature, top_k=top_k,
                                                top_p=top_p, generator=generator)

    def prompt_ids(self, text: str) -> List[int]:
        return [self.tokenizer.bos_id] + tokenize(self.tokenizer, text, self.cfg.tokens_per_image)

    # ---- the official checkpoint format -------------------------------------------------------------------------

    def official_key_map(self) -> dict:
        """Official checkpoint key -> our state_dict key. f_V and f_L already use the official names."""
        table = {}
        for name in self.state_dict():
            if name.startswith(("vision_model.", "language_model.")):
                table[name] = name
        for ours, theirs in self.abstractor.official_key_map().items():
            table[theirs] = "abstractor." + ours
        return table

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32, device="cpu") -> "Owl":
        """Read an official mPLUG-Owl checkpoint folder strictly, tensor by tensor into the target dtype."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
        for needed in ("config.json", "tokenizer.model"):
            if not (folder / needed).exists():
                raise FileNotFoundError(f"checkpoint folder {folder} has no {needed}")
        config = json.loads((folder / "config.json").read_text())
        if config.get("model_type") != "mplug-owl":
            raise ValueError(f"{folder} holds a {config.get('model_type')!r} checkpoint, not mPLUG-Owl "
                             "(config.json model_type must be 'mplug-owl')")
        model = build_empty(cls, OwlConfig.from_official(config))
        ignore = lambda k: k.endswith("rotary_emb.inv_freq")  # a buffer old checkpoints carry; RoPE is recomputed
        load_into(model, ((k, t) for k, t in iter_tensors(folder) if not ignore(k)), dtype, device,
                  key_map=model.official_key_map())
        model.tokenizer = Tokenizer(folder / "tokenizer.model")
        if model.tokenizer.vocab_size > model.cfg.text.vocab_size:
            raise ValueError(f"tokenizer.model has {model.tokenizer.vocab_size} pieces, the model only "
                             f"{model.cfg.text.vocab_size} embeddings")
        pre = folder / "preprocessor_config.json"
        if pre.exists():
            model.image_transform = ImageTransform.from_preprocessor_config(json.loads(pre.read_text()),
                                                                            model.cfg.vision.image_size)
        return model.eval()

    def save_pretrained(self, folder, tokenizer_model=None, max_shard_bytes: int = 0, safe: bool = True) -> None:
        """Write the official format: config.json, weights (safetensors or .bin, sharded above max_shard_bytes),
        tokenizer.model and the small json files, so the official code can load what Owl trained."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        ours_to_official = {v: k for k, v in self.official_key_map().items()}
        state = {ours_to_official[k]: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        shards, size = [{}], 0
        for key in sorted(state):
            nbytes = state[key].numel() * state[key].element_size()
            if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = state[key]
            size += nbytes
        base, ext = ("model", "safetensors") if safe else ("pytorch_model", "bin")
        names = [f"{base}.{ext}"] if len(shards) == 1 else \
            [f"{base}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            save_file(shard, folder / name, metadata={"format": "pt"}) if safe else torch.save(shard, folder / name)
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
            (folder / f"{names[0].split('-')[0]}.{ext}.index.json").write_text(json.dumps(index, indent=2))
        (folder / "config.json").write_text(json.dumps(self.cfg.to_official(), indent=2))
        src = tokenizer_model or (self.tokenizer.sp.serialized_model_proto() if self.tokenizer else None)
        if isinstance(src, (str, Path)):
            shutil.copyfile(src, folder / "tokenizer.model")
        elif src is not None:
            (folder / "tokenizer.model").write_bytes(src)
        t = self.image_transform
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "CLIPImageProcessor", "do_resize": True, "do_center_crop": False,
            "size": {"height": t.image_size, "width": t.image_size}, "resample": t.resample, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(t.mean), "image_std": list(t.std),
            "do_convert_rgb": True}, indent=2))
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "pad_token": "<unk>", "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": self.cfg.text.max_position_embeddings}, indent=2))
        (folder / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}, indent=2))
        (folder / "generation_config.json").write_text(json.dumps(
            {"max_length": 512, "do_sample": True, "top_k": 3, "bos_token_id": 1, "eos_token_id": 2,
             "pad_token_id": 0}, indent=2))


# --------------------------------------------------------------------------------------------------------------
# The command line


class UserError(Exception):
    """A problem with the user's input: reported as one sentence and exit status 2, never a traceback."""


def load_image(path: str, transform: ImageTransform) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"image file {path} does not exist")
    try:
        with Image.open(p) as img:
            img.load()
            return transform(img)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path} is not an image Owl can read ({type(e).__name__})") from None


def stream_answer(model: Owl, ids: List[int], pixels, args, out=sys.stdout) -> List[int]:
    """Generate and print the answer as it grows; returns the answer's token ids."""
    gen = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    new, shown = [], ""
    for token in model.generate(ids, pixels, args.max_new_tokens, args.temperature, args.top_k, args.top_p, gen):
        new.append(token)
        text = model.tokenizer.decode(new)
        # print only what is settled: a trailing partial UTF-8 byte sequence decodes to U+FFFD until complete
        if text.startswith(shown) and not text.endswith("\ufffd"):
            out.write(text[len(shown):])
            out.flush()
            shown = text
    text = model.tokenizer.decode(new)
    out.write((text[len(shown):] if text.startswith(shown) else "") + "\n")
    out.flush()
    return new


def chat(model: Owl, pixels, args) -> None:
    """Interactive multi-turn chat about the given images; the history is kept in the template."""
    history, pending_images = SYSTEM, 0 if pixels is None else len(pixels)
    print("Chat with Owl about the image(s). End with Ctrl-D.", file=sys.stderr)
    for line in sys.stdin:
        question = line.strip()
        if not question:
            continue
        prompt = history + render_turn(question, pending_images)
        pending_images = 0
        ids = model.prompt_ids(prompt)
        if len(ids) >= model.cfg.text.max_position_embeddings:
            raise UserError("the conversation is longer than the model's context")
        answer = model.tokenizer.decode(stream_answer(model, ids, pixels, args))
        history = prompt + answer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Ask Owl (mPLUG-Owl) about images.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="runs/owl-tiny/stage2",
                   help="an mPLUG-Owl checkpoint folder (official format: config.json, weights, tokenizer.model)")
    p.add_argument("--image", action="append", default=[], help="an image file; repeat for several images, in order")
    p.add_argument("--prompt", default=None,
                   help="the question; wrapped in the canonical template with one 'Human: <image>' line per image. "
                        "Without it, an interactive chat starts")
    p.add_argument("--raw-prompt", action="store_true",
                   help="use --prompt as the full prompt, as is, with one <image> tag per --image")
    p.add_argument("--max-new-tokens", type=int, default=512, help="the most tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy decoding")
    p.add_argument("--top-k", type=int, default=3, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set with this mass")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and compute dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise UserError("--max-new-tokens must be at least 1")
        if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
            raise UserError("--temperature must be >= 0, --top-k >= 0 and --top-p in (0, 1]")
        if args.raw_prompt and args.prompt is None:
            raise UserError("--raw-prompt needs --prompt")
        if args.prompt is not None and not args.prompt.strip():
            raise UserError("the prompt is empty")
        if args.raw_prompt and args.prompt.count(IMAGE) != len(args.image):
            raise UserError(f"the prompt has {args.prompt.count(IMAGE)} {IMAGE} tags but {len(args.image)} images "
                            "were given")
        if not args.raw_prompt and args.prompt is not None and IMAGE in args.prompt:
            raise UserError(f"the question contains {IMAGE}; pass --raw-prompt to place images yourself")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA device is available")
        try:
            model = Owl.from_pretrained(args.checkpoint, getattr(torch, args.dtype), args.device)
        except (FileNotFoundError, KeyError, ValueError, OSError, RuntimeError) as e:
            raise UserError(f"cannot load checkpoint {args.checkpoint}: {e.args[0] if e.args else e}") from None
        except (pickle.UnpicklingError, EOFError, SafetensorError) as e:  # e.g. an interrupted download
            raise UserError(f"cannot load checkpoint {args.checkpoint}: a weights file is truncated, corrupt or holds "
                            f"more than tensors ({type(e).__name__})") from None
        pixels = torch.stack([load_image(p, model.image_transform) for p in args.image]) if args.image else None
        if args.prompt is None:
            chat(model, pixels, args)
            return 0
        text = args.prompt if args.raw_prompt else render_prompt(args.prompt, len(args.image))
        ids = model.prompt_ids(text)
        if len(ids) >= model.cfg.text.max_position_embeddings:
            raise UserError(f"the prompt is {len(ids)} tokens long, more than the context of "
                            f"{model.cfg.text.max_position_embeddings} tokens")
        stream_answer(model, ids, pixels, args)
        return 0
    except UserError as e:
        print(f"owl: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
