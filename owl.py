"""Owl: mPLUG-Owl (Ye et al. 2023, arXiv 2304.14178) from pixels to the next token.

    image ──f_V (vit.py)──> CLS + 256 patch tokens ──f_K (abstractor.py)──> 65 visual tokens ─┐
    prompt ──SentencePiece──> ids with 65 placeholders per <image> ──embed──> text embeddings ┴─splice─> f_L (llama.py)
                                                                                                         └─> next token

The visual tokens of each image replace the embeddings of its placeholders, in order, and the language model reads
the result as if it were text. This file joins the three parts, owns the prompt (the template, the chunk-wise
tokenisation and the image placeholders), reads and writes the official checkpoint format, and is the CLI: it
checks the flags, loads the model and hands it to chat.py, which answers in one of four ways:

    python owl.py --checkpoint DIR --image x.jpg --prompt "What is in the picture?"   # one answer, streamed
    python owl.py --checkpoint DIR --image x.jpg                                      # a chat
    python owl.py --checkpoint DIR --questions questions.jsonl                        # a file, in batches
    python owl.py --checkpoint DIR --owleval OwlEval/ > answers.jsonl                 # OwlEval's answer file
"""
import argparse
import json
import pickle
import re
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, List, Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError

from abstractor import AbstractorConfig, VisualAbstractor
from llama import Llama, LlamaConfig, Tokenizer, build_empty, iter_tensors, load_into, read_json
from vit import ImageTransform, ViTConfig, VisionTransformer

# --------------------------------------------------------------------------------------------------------------
# The prompt. One BOS for the whole sequence; the text between image tags is tokenised chunk by chunk (so each chunk
# gets SentencePiece's leading space, exactly as the official processors do); each image tag becomes num_queries + 1
# placeholder ids, later filled with that image's visual tokens. mPLUG-Owl and mPLUG-Owl2 differ in the template.

SYSTEM = ("The following is a conversation between a curious human and AI assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE_ID = -1  # placeholder id: never a real token, replaced by a visual token before f_L sees it


@dataclass(frozen=True)
class Template:
    """A model's conversation format. A conversation is start + turn + answer(a) + turn + answer(a) + ... + turn;
    the model writes the last answer. eos: a tag that stands for the EOS id inside a prompt (Owl2 ends each answer
    with it), or "" where the text is spelled as it is. defaults: the official CLI's sampling settings."""
    name: str
    image: str  # the image tag of --raw-prompt and the template
    start: str
    eos: str
    defaults: dict

    def turn(self, question: str, num_images: int = 0) -> str:
        """One question, with the images shown at it, up to where the answer begins."""
        if self.name == "mplug-owl":  # a `Human: <image>` line per image, then the question, then 'AI: '
            return f"\nHuman: {self.image}" * num_images + f"\nHuman: {question}\nAI: "
        return f"USER: {self.image * num_images}{question} ASSISTANT:"  # Owl2: the tags lead the question

    def answer(self, text: str) -> str:
        """What follows a turn once it is answered."""
        return text if self.name == "mplug-owl" else f" {self.reply(text)}{self.eos}"

    def reply(self, text: str) -> str:
        """An answer's decoded text as the official code hands it out: v1's as decoded (its README's decode);
        mPLUG-Owl2's without leading and trailing whitespace (the .strip() of its README, cli.py and eval scripts)."""
        return text if self.name == "mplug-owl" else text.strip()

    def prompt(self, question: str, num_images: int) -> str:
        """The canonical single-turn prompt of the released model."""
        return self.start + self.turn(question, num_images)


# v1: MplugOwlProcessor's template; sampling as the official demo samples. Owl2: conversation.py's "mplug_owl2"
# (no system text), sampling as serve/cli.py does (temperature 0.2, and HF generate's top_k of 50).
OWL = Template("mplug-owl", "<image>", SYSTEM, "", dict(temperature=1.0, top_k=3, top_p=1.0, max_new_tokens=512))
OWL2 = Template("mplug_owl2", "<|image|>", "", "</s>", dict(temperature=0.2, top_k=50, top_p=1.0, max_new_tokens=512))
IMAGE = OWL.image  # kept for the training code and tests that speak v1


def render_turn(question: str, num_images: int = 0) -> str:
    return OWL.turn(question, num_images)


def render_prompt(question: str, num_images: int) -> str:
    return OWL.prompt(question, num_images)


def tokenize(tokenizer: Tokenizer, text: str, tokens_per_image: int, template: "Template" = OWL) -> List[int]:
    """Ids of text (no BOS): text chunks tokenised separately, each image tag -> tokens_per_image placeholders. In
    Owl2 prompts each `</s>` is the EOS id, as HF's slow LLaMA tokenizer reads it (the official code's)."""
    tags = [template.image] + ([template.eos] if template.eos else [])
    ids, chunks = [], re.split("(" + "|".join(map(re.escape, tags)) + ")", text)
    for i, chunk in enumerate(chunks):
        if chunk == template.image:
            ids += [IMAGE_ID] * tokens_per_image
        elif template.eos and chunk == template.eos:
            ids.append(tokenizer.eos_id)
        elif chunk:
            after_eos = i > 0 and chunks[i - 1] == template.eos
            ids += encode_after_special(tokenizer, chunk) if after_eos and not tokenizer.legacy else tokenizer.encode(chunk)
    return ids


def encode_after_special(tokenizer: Tokenizer, text: str) -> List[int]:
    """Text right after a special token, as HF's slow LLaMA tokenizer spells it when tokenizer_config.json says
    "legacy": false (Llama-2's files do): without SentencePiece's leading space, unless the text starts with one."""
    text = text.replace("\u2581", " ")
    pieces = tokenizer.sp.encode(text, out_type=str)
    if pieces and not text.startswith(" ") and pieces[0].startswith("\u2581"):
        pieces = ([pieces[0][1:]] if len(pieces[0]) > 1 else []) + pieces[1:]
    return [tokenizer.sp.piece_to_id(p) for p in pieces]


class SquareFirst(ImageTransform):
    """mPLUG-Owl2's preprocessing (its README and evaluation scripts): RGB, a bicubic stretch to a square as wide as
    the longest edge, then the CLIP processor's bicubic resize to S x S and mean/std. For a non-square image these
    are not the pixels of one stretch straight to S x S."""

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        rgb = image.convert("RGB")
        side = max(rgb.size)
        return super().__call__(rgb.resize((side, side), resample=Image.BICUBIC))


# --------------------------------------------------------------------------------------------------------------
# The model


@dataclass
class OwlConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    abstractor: AbstractorConfig = field(default_factory=AbstractorConfig)
    text: LlamaConfig = field(default_factory=LlamaConfig)
    version: int = 1  # 1: mPLUG-Owl; 2: mPLUG-Owl2 (448-px images, sin-cos positions in f_K, modality-adaptive f_L)

    @property
    def tokens_per_image(self) -> int:
        return self.abstractor.num_queries + 1  # the queries plus vit_eos: 65 in the released models

    @property
    def template(self) -> Template:
        return OWL if self.version == 1 else OWL2

    @classmethod
    def preset(cls, name: str) -> "OwlConfig":
        presets = {"owl-7b": ("vit-l14", "owl-7b", "llama-7b", 1), "tiny": ("tiny", "tiny", "tiny", 1),
                   "owl2-7b": ("owl2-7b", "owl2-7b", "owl2-7b", 2), "owl2-tiny": ("owl2-tiny", "owl2-tiny", "owl2-tiny", 2)}
        if name not in presets:
            raise ValueError(f"unknown Owl preset {name!r}; choose from {sorted(presets)}")
        vision, abstractor, text, version = presets[name]
        return cls(ViTConfig.preset(vision), AbstractorConfig.preset(abstractor), LlamaConfig.preset(text), version)

    @classmethod
    def from_owl2(cls, d: dict) -> "OwlConfig":
        """From an mPLUG-Owl2 config.json (model_type 'mplug_owl2'): a LLaMA config at the top level, with
        `visual_config` holding `visual_model` (f_V) and `visual_abstractor` (f_K)."""
        visual = d.get("visual_config") or {"visual_model": {}, "visual_abstractor": {}}  # none: the 7B's defaults
        if not isinstance(visual, dict) or not all(isinstance(visual.get(k), dict)
                                                   for k in ("visual_model", "visual_abstractor")):
            raise ValueError("config.json's visual_config must hold visual_model and visual_abstractor objects")
        for key, ok in (("hidden_act", "silu"), ("tie_word_embeddings", False), ("attention_bias", False)):
            if d.get(key, ok) != ok:
                raise ValueError(f"config.json {key} is {d[key]!r}; Owl runs mPLUG-Owl2's LLaMA with {ok!r}")
        llama = {k: v for k, v in d.items() if k not in ("visual_config", "model_type", "architectures")}
        text = replace(LlamaConfig.from_hf({"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, **llama}),
                       modality_adaptive=True)
        vision = ViTConfig.from_owl2(visual["visual_model"])
        abstractor = AbstractorConfig.from_owl2(visual["visual_abstractor"], text.hidden_size)
        if abstractor.hidden_size != vision.hidden_size:
            raise ValueError("the abstractor's hidden_size must equal the vision model's hidden_size")
        return cls(vision, abstractor, text, version=2)

    @classmethod
    def from_official(cls, d: dict) -> "OwlConfig":
        """From an mPLUG-Owl config.json (model_type 'mplug-owl'), read as the official code reads it: its LLaMA
        (transformers 4.28) has RoPE with base 10000 and no scaling whatever text_config says, SiLU as the only
        activation we implement, untied lm_head and as many key/value heads as heads; a field that would make the
        official model another one is refused, never followed silently."""
        t = d.get("text_config")
        if not isinstance(t, dict):
            raise ValueError("config.json has no text_config (the official code cannot build its LLaMA without it)")
        for key, ok in (("hidden_act", "silu"), ("tie_word_embeddings", False)):
            if t.get(key, ok) != ok:
                raise ValueError(f"text_config.{key} is {t[key]!r}; mPLUG-Owl's LLaMA has {ok!r}")
        if t.get("num_key_value_heads") not in (None, t.get("num_attention_heads", 32)):
            raise ValueError("text_config.num_key_value_heads differs from num_attention_heads; mPLUG-Owl's LLaMA "
                             "has no grouped-query attention")
        ignored = ("rope_theta", "rope_scaling", "rope_parameters")  # not read by the official LLaMA
        text = LlamaConfig.from_hf({k: v for k, v in t.items() if k not in ignored})
        vision = ViTConfig.from_official(d.get("vision_config", {}))
        abstractor = AbstractorConfig.from_official(d.get("visual_abstractor_config", {}),
                                                    d.get("num_query_tokens", 64), text.hidden_size)
        if abstractor.hidden_size != vision.hidden_size:
            raise ValueError("the abstractor's hidden_size must equal the vision model's hidden_size")
        return cls(vision, abstractor, text)

    def to_official(self) -> dict:
        v, a = self.vision, self.abstractor
        if self.version == 2:
            return self.to_owl2()
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

    def to_owl2(self) -> dict:
        """mPLUG-Owl2's config.json: the LLaMA fields at the top level, f_V and f_K in visual_config, every field the
        official configuration classes write."""
        v, a = self.vision, self.abstractor
        llama = {k: x for k, x in self.text.to_hf().items() if k not in ("model_type", "architectures", "modality_adaptive")}
        return {
            "model_type": "mplug_owl2", "architectures": ["MPLUGOwl2LlamaForCausalLM"], **llama,
            "pretraining_tp": 1, "use_cache": True, "rope_scaling": None, "attention_bias": False,
            "visual_config": {
                "visual_model": {"hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                                 "projection_dim": v.hidden_size, "num_hidden_layers": v.num_layers,
                                 "num_attention_heads": v.num_heads, "num_channels": 3, "image_size": v.image_size,
                                 "patch_size": v.patch_size, "hidden_act": "quick_gelu",
                                 "layer_norm_eps": v.layer_norm_eps, "attention_dropout": 0.0,
                                 "initializer_range": 0.02, "initializer_factor": 1.0, "use_flash_attn": False,
                                 "use_post_layernorm": True, "use_cls_token": True},
                "visual_abstractor": {"add_v2t_pos_emb": False, "use_cls_token": True,
                                      "num_learnable_queries": a.num_queries, "hidden_size": a.hidden_size,
                                      "num_hidden_layers": a.num_layers, "num_attention_heads": a.num_heads,
                                      "intermediate_size": a.intermediate_size,
                                      "attention_probs_dropout_prob": a.attention_dropout, "initializer_range": 0.02,
                                      "layer_norm_eps": a.layer_norm_eps, "encoder_hidden_size": v.hidden_size,
                                      "grid_size": a.grid_size}},
        }


@dataclass
class Sampling:
    """How an answer is drawn: greedily at temperature 0, else at that temperature among the top_k most likely
    tokens (0 = all) that hold top_p of the probability; at most max_new_tokens. generator: the random stream (None:
    torch's global one); a Sampling used again goes on drawing where its stream stopped."""
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    generator: Optional[torch.Generator] = None


class Owl(nn.Module):
    """f_V + f_K + f_L. Attribute names follow the official checkpoint: vision_model, abstractor, language_model."""

    def __init__(self, cfg: OwlConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionTransformer(cfg.vision)
        self.abstractor = VisualAbstractor(cfg.abstractor)
        self.language_model = Llama(cfg.text)
        self.tokenizer: Optional[Tokenizer] = None
        self.image_transform = (ImageTransform if cfg.version == 1 else SquareFirst)(cfg.vision.image_size)

    def init_weights(self) -> None:
        for part in (self.vision_model, self.abstractor, self.language_model):
            part.init_weights()

    @property
    def device(self) -> torch.device:
        return self.language_model.lm_head.weight.device

    def check_context(self, ids: List[int], what: str = "the prompt") -> None:
        """Refuse a prompt that leaves no room for an answer: f_L has no position past max_position_embeddings."""
        context = self.cfg.text.max_position_embeddings
        if len(ids) >= context:
            raise ValueError(f"{what} is {len(ids)} tokens long, more than the context of {context} tokens")

    def encode_images(self, pixels: torch.Tensor, return_weights: bool = False):
        """pixels (N, 3, S, S) -> visual tokens (N, num_queries + 1, llm_hidden): f_V, then f_K."""
        patches = self.vision_model(pixels.to(self.vision_model.embeddings.patch_embed.weight.dtype))
        return self.abstractor(patches, return_weights=return_weights)

    def embed(self, input_ids: torch.Tensor, pixels: Optional[torch.Tensor] = None,
              visual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (B, T) with IMAGE_ID placeholders -> input embeddings (B, T, llm_hidden) with visual tokens in.
        visual: encode_images' output for the images, when the caller kept it (a chat asks about the same images
        turn after turn); else they are encoded from pixels here."""
        is_image = input_ids == IMAGE_ID
        x = self.language_model.model.embed_tokens(input_ids.clamp(min=0))
        n_slots = int(is_image.sum())
        if n_slots == 0:
            return x
        images = pixels if visual is None else visual
        if images is None or n_slots != len(images) * self.cfg.tokens_per_image:
            given = 0 if images is None else len(images)
            raise ValueError(f"the ids hold {n_slots // self.cfg.tokens_per_image} image slots but {given} images were given")
        visual = (self.encode_images(pixels) if visual is None else visual).to(x.dtype)  # (N, Q+1, D)
        # row-major fill: the first slot in the batch gets the first image's first token, and so on
        return x.masked_scatter(is_image.unsqueeze(-1), visual.reshape(-1, visual.shape[-1]))

    def modality(self, input_ids: torch.Tensor) -> Optional[torch.Tensor]:
        """Owl2's modality indicator (B, T): 1 at the visual tokens, 0 at text; f_L runs its text or its visual
        copy of the norms and of k/v per token. None for v1, whose f_L treats every position alike."""
        return (input_ids == IMAGE_ID).long() if self.cfg.version == 2 else None

    def forward(self, input_ids: torch.Tensor, pixels: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, T, vocab) for ids with image placeholders; images in the order their slots appear.
        targets (B, T), -100 where none: the summed cross-entropy instead (see Llama.forward)."""
        return self.language_model(inputs_embeds=self.embed(input_ids, pixels), targets=targets,
                                   modality=self.modality(input_ids))

    @torch.inference_mode()
    def generate(self, ids: List[int], pixels: Optional[torch.Tensor] = None, sampling: Optional[Sampling] = None,
                 *, visual: Optional[torch.Tensor] = None, **settings) -> Iterator[int]:
        """Yield the answer's token ids one by one (batch 1). ids: BOS + prompt ids with placeholders; the images
        as pixels, or as the visual tokens encode_images gave for them. sampling: a Sampling (default: greedy, 512
        tokens); Sampling's fields given as keywords, e.g. max_new_tokens=48, override it."""
        s = replace(sampling or Sampling(), **settings)
        self.check_context(ids)
        device = self.device
        input_ids = torch.tensor([ids], device=device)
        embeds = self.embed(input_ids, None if pixels is None else pixels.to(device),
                            None if visual is None else visual.to(device))
        yield from self.language_model.generate(inputs_embeds=embeds, max_new_tokens=s.max_new_tokens,
                                                eos_id=self.tokenizer.eos_id, temperature=s.temperature,
                                                top_k=s.top_k, top_p=s.top_p, generator=s.generator,
                                                modality=self.modality(input_ids))

    @torch.inference_mode()
    def generate_batch(self, prompts: List[tuple], sampling: Optional[Sampling] = None,
                       **settings) -> List[List[int]]:
        """The answers' token ids for several prompts at once; prompts: (ids, pixels or None) pairs, sampling and
        settings as `generate` takes them. The ids are left-padded into one batch (f_L hides the pads), every image
        in prompt order."""
        s = replace(sampling or Sampling(), **settings)
        for ids, _ in prompts:
            self.check_context(ids, "a prompt")
        T = max(len(ids) for ids, _ in prompts)
        padded = torch.tensor([[self.tokenizer.pad_id] * (T - len(ids)) + ids for ids, _ in prompts],
                              device=self.device)
        images = [pixels for _, pixels in prompts if pixels is not None and len(pixels)]
        embeds = self.embed(padded, torch.cat(images).to(self.device) if images else None)  # (B, T, D)
        return self.language_model.generate_batch(embeds, [len(ids) for ids, _ in prompts], s.max_new_tokens,
                                                  self.tokenizer.eos_id, s.temperature, s.top_k, s.top_p,
                                                  s.generator, modality=self.modality(padded))

    def answer_text(self, ids: List[int]) -> str:
        """The text of an answer's token ids, special tokens skipped, as the official code of this model gives it
        (Template.reply): what the CLI prints, --json and --questions write, and the server sends."""
        return self.cfg.template.reply(self.tokenizer.decode(ids))

    def prompt_ids(self, text: str) -> List[int]:
        """BOS + the ids of a prompt written in this model's template, with image placeholders."""
        return [self.tokenizer.bos_id] + tokenize(self.tokenizer, text, self.cfg.tokens_per_image, self.cfg.template)

    # ---- the official checkpoint format -------------------------------------------------------------------------

    def official_key_map(self) -> dict:
        """Official checkpoint key -> our state_dict key. v1: f_V and f_L already use the official names. Owl2: f_L's
        keys at the top level (model.layers..., lm_head), f_V and f_K under model.vision_model / model.visual_abstractor."""
        if self.cfg.version == 2:
            table = {k[len("language_model."):]: k for k in self.state_dict() if k.startswith("language_model.")}
            for part, prefix in ((self.vision_model, "vision_model."), (self.abstractor, "abstractor.")):
                table.update({theirs: prefix + ours for ours, theirs in part.owl2_key_map().items()})
            return table
        table = {}
        for name in self.state_dict():
            if name.startswith(("vision_model.", "language_model.")):
                table[name] = name
        for ours, theirs in self.abstractor.official_key_map().items():
            table[theirs] = "abstractor." + ours
        return table

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32, device="cpu") -> "Owl":
        """Read an official mPLUG-Owl or mPLUG-Owl2 checkpoint folder strictly, tensor by tensor into the target
        dtype: one safetensors or .bin file, or shards of either with their index."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
        for needed in ("config.json", "tokenizer.model"):
            if not (folder / needed).exists():
                raise FileNotFoundError(f"checkpoint folder {folder} has no {needed}")
        config = read_json(folder / "config.json")
        kind = config.get("model_type")
        if kind == "mplug_owl2_1":
            raise ValueError(f"{folder} holds mPLUG-Owl2.1 (model_type 'mplug_owl2_1', a Qwen language model), which "
                             "Owl does not run; it runs mPLUG-Owl ('mplug-owl') and mPLUG-Owl2 ('mplug_owl2')")
        if kind not in ("mplug-owl", "mplug_owl2"):
            raise ValueError(f"{folder} holds a {kind!r} checkpoint; config.json model_type must be 'mplug-owl' "
                             "(mPLUG-Owl) or 'mplug_owl2' (mPLUG-Owl2)")
        model = build_empty(cls, OwlConfig.from_official(config) if kind == "mplug-owl" else OwlConfig.from_owl2(config))
        # buffers, not weights: RoPE's inv_freq (old checkpoints) and, in Owl2 checkpoints saved by the official
        # code, f_K's sin-cos tables; both are computed at build
        tables = set(model.abstractor.owl2_table_keys()) if kind == "mplug_owl2" else set()
        ignore = lambda k: k.endswith("rotary_emb.inv_freq") or k in tables
        load_into(model, ((k, t) for k, t in iter_tensors(folder) if not ignore(k)), dtype, device,
                  key_map=model.official_key_map())
        model.to(device)  # the buffers built outside the loader (f_K's tables) join the weights
        model.tokenizer = Tokenizer(folder / "tokenizer.model")
        tok_config = folder / "tokenizer_config.json"
        if tok_config.exists():  # transformers 4.31 reads a missing "legacy" as true, and null as false
            model.tokenizer.legacy = bool(read_json(tok_config).get("legacy", True))
        if model.tokenizer.vocab_size > model.cfg.text.vocab_size:
            raise ValueError(f"tokenizer.model has {model.tokenizer.vocab_size} pieces, the model only "
                             f"{model.cfg.text.vocab_size} embeddings")
        pre = folder / "preprocessor_config.json"
        if pre.exists():
            model.image_transform = type(model.image_transform).from_preprocessor_config(read_json(pre),
                                                                            model.cfg.vision.image_size)
        return model.eval()

    def pack_for_inference(self) -> "Owl":
        """f_L's bf16 weights packed where that multiplies faster on this CPU (Llama.pack_for_inference): owl-7b
        decodes about twice as fast (2-core AMD EPYC; docs/speed.md). For answering only: a packed model cannot be
        trained or saved."""
        self.language_model.pack_for_inference(others=(self.vision_model, self.abstractor))
        return self

    def save_pretrained(self, folder, tokenizer_model=None, max_shard_bytes: int = 0, safe: bool = True) -> None:
        """Write the official format: config.json, weights (safetensors or .bin, sharded above max_shard_bytes),
        tokenizer.model and the small json files, so the official code can load what Owl trained."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        ours_to_official = {v: k for k, v in self.official_key_map().items()}
        save_shards({ours_to_official[k]: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                    folder, max_shard_bytes, safe)
        (folder / "config.json").write_text(json.dumps(self.cfg.to_official(), indent=2))
        src = tokenizer_model or (self.tokenizer.sp.serialized_model_proto() if self.tokenizer else None)
        if isinstance(src, (str, Path)):
            shutil.copyfile(src, folder / "tokenizer.model")
        elif src is not None:
            (folder / "tokenizer.model").write_bytes(src)
        t = self.image_transform
        S = t.image_size  # the official processors squash to a square first, then resize to size and crop to S
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": S},
            "do_center_crop": True, "crop_size": {"height": S, "width": S}, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(t.mean), "image_std": list(t.std),
            "do_convert_rgb": True}, indent=2))
        # v1's processor adds the BOS itself; Owl2's tokenizer_image_token keeps the BOS the tokenizer adds
        owl2 = {"add_bos_token": True, "legacy": self.tokenizer.legacy if self.tokenizer else False}
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "pad_token": "<unk>", "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": self.cfg.text.max_position_embeddings,
            **(owl2 if self.cfg.version == 2 else {})}, indent=2))
        (folder / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}, indent=2))
        generation = ({"max_length": 512, "do_sample": True, "top_k": 3} if self.cfg.version == 1 else {})
        (folder / "generation_config.json").write_text(json.dumps(
            {**generation, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2))


def save_shards(state: dict, folder: Path, max_shard_bytes: int = 0, safe: bool = True, fill=None) -> None:
    """Write state (official key -> tensor) as a checkpoint's weights, named as the hub names them: one file, or, above
    max_shard_bytes, shards in key order with an index. fill(path, shard), if given, returns the tensors to write for
    a shard in place of its own, so a caller can plan with meta tensors (shape and dtype only) and hold one shard's
    values at a time: bench.py writes a random owl-7b so."""
    from safetensors.torch import save_file

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
        shard = fill(folder / name, shard) if fill else shard
        save_file(shard, folder / name, metadata={"format": "pt"}) if safe else torch.save(shard, folder / name)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        (folder / f"{base}.{ext}.index.json").write_text(json.dumps(index, indent=2))


# --------------------------------------------------------------------------------------------------------------
# The command line


class UserError(Exception):
    """A problem with the user's input: reported as one sentence and exit status 2, never a traceback."""


MAX_PIXELS = 40_000_000  # larger images are refused from their header, before a pixel is decoded


def read_image(path: str, max_pixels: int = MAX_PIXELS):
    """A PIL image read fully (a truncated file fails here, not later), in any mode: the transform makes it RGB.
    Inference and training read their images here, so both refuse the same files in the same words."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"image file {path} does not exist")
    # Image.open reads only the header. PIL's own decompression-bomb check would warn or fail there in its own words
    # (above 89 and 179 megapixels); Owl's limit replaces it, so it is off while the header is read.
    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(p) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise UserError(f"{path} is {w}x{h} pixels, more than the limit of {max_pixels} (--max-pixels)")
            img.load()
            return img.copy()  # leaving `with` closes the file and frees the pixels of `img` itself
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path} is not an image Owl can read ({type(e).__name__})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


def load_image(path: str, transform: ImageTransform, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    return transform(read_image(path, max_pixels))


# the chat's commands (chat.py), named here because --help names them
CHAT_HELP = "/image PATH adds an image to your next question, /reset starts over, /quit (or Ctrl-D) ends"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Ask Owl (mPLUG-Owl or mPLUG-Owl2, told apart by the checkpoint's "
                                "config.json) about images: one question (--prompt), a chat (no --prompt), a file "
                                "of questions in batches (--questions), or OwlEval's answer file (--owleval).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="runs/owl-tiny/stage2",
                   help="an mPLUG-Owl or mPLUG-Owl2 checkpoint folder (official format: config.json, weights, "
                        "tokenizer.model)")
    p.add_argument("--image", action="append", default=[], help="an image file; repeat for several images, in order")
    p.add_argument("--prompt", default=None,
                   help="the question; wrapped in the model's template: mPLUG-Owl's with one 'Human: <image>' line "
                        "per image, mPLUG-Owl2's 'USER: <|image|>...question ASSISTANT:'. "
                        f"Without it, an interactive chat starts, with the history kept in the template: {CHAT_HELP}; "
                        "the oldest turns are forgotten, with a notice, when the history and the room for the answer "
                        "(--max-new-tokens, at most a quarter of the context) outgrow the context")
    p.add_argument("--raw-prompt", action="store_true",
                   help="use --prompt as the full prompt, as is, with one image tag per --image (<image> for "
                        "mPLUG-Owl, <|image|> for mPLUG-Owl2)")
    p.add_argument("--questions", metavar="FILE.jsonl", default=None,
                   help='answer a file of {"image": [paths], "prompt": "..."} lines ("image" may be missing or empty; '
                        "paths are relative to the file's folder) in batches, printing {\"image\", \"prompt\", "
                        '"answer"} lines in order. A malformed line or a missing or unreadable image stops the run '
                        "before any answer, naming the line (exit 2). Greedy answers (--temperature 0) equal "
                        "one-at-a-time ones; sampled ones, even with --seed, may not (the batches share one stream)")
    p.add_argument("--batch-size", type=int, default=8, help="questions generated together with --questions")
    p.add_argument("--owleval", metavar="DIR", default=None,
                   help="answer OwlEval, the mPLUG-Owl paper's evaluation set, as the official repository's "
                        'OwlEval/ holds it: DIR/questions.jsonl of {"image", "question_id", "question", "ability", '
                        '"category"} lines, the images they name ("4.jpg") in DIR/cases/ (or DIR, without cases/). '
                        'Prints the official answer file, {"image", "question_id", "question", "answer", "model_id"} '
                        'lines in order, each as it is answered. A question whose "category" (a list or a string) '
                        'holds "single_turn" starts a fresh conversation with its image; one only "multi_turn" '
                        "continues the one before it, which must be on the same image, its earlier questions and "
                        "answers in the template as the chat keeps them. "
                        "Every line and image is checked first: a malformed line or a missing or unreadable image "
                        "stops the run, naming it (exit 2). Greedy (--temperature 0) unless a sampling flag "
                        "(--temperature, --top-k, --top-p, --seed) is given; then the unset ones take the model's "
                        "defaults and each answer is drawn as a one-question run draws it. Not with --image, "
                        "--prompt, --questions, --json or --show-attention")
    p.add_argument("--model-id", default=None,
                   help='the "model_id" of every --owleval answer line; unset, the checkpoint folder\'s name')
    p.add_argument("--show-attention", metavar="OUT.png", default=None,
                   help="also draw where the abstractor's queries look in the first image (its last layer, averaged "
                        "over heads: all queries and a few single ones) as a PNG sheet of heat maps")
    p.add_argument("--json", action="store_true",
                   help="with --prompt: print one JSON object instead of the streamed answer: the answer, token "
                        "counts (prompt, image, generated) and timings (load, preprocessing, first token, generation, "
                        "tokens/s)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help="refuse images with more pixels than this, from their header, before decoding them")
    p.add_argument("--max-new-tokens", type=int, default=None, help="the most tokens to generate (512)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature; 0 = greedy decoding. Unset, the loaded model's official defaults "
                        "apply: temperature 1.0 and top-k 3 for mPLUG-Owl (its demo), temperature 0.2 and top-k 50 "
                        "for mPLUG-Owl2 (its serve/cli.py with HF generate's top-k); with --owleval, 0 unless --top-k, "
                        "--top-p or --seed is given")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (0 = all; default: "
                   "the model's, see --temperature)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set with this mass (1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and compute dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    return p


def check_args(args) -> None:
    """The flag values and combinations that cannot work, refused before the model is loaded."""
    if (args.max_new_tokens or 1) < 1 or args.batch_size < 1 or args.max_pixels < 1:
        raise UserError("--max-new-tokens, --batch-size and --max-pixels must be at least 1")
    top_p = 1.0 if args.top_p is None else args.top_p
    if (args.temperature or 0) < 0 or not 0 < top_p <= 1 or (args.top_k or 0) < 0:
        raise UserError("--temperature must be >= 0, --top-k >= 0 and --top-p in (0, 1]")
    if args.owleval is not None and (args.image or args.prompt is not None or args.questions is not None
                                     or args.json or args.show_attention):
        raise UserError("--owleval takes its images and questions from its folder: drop --image, --prompt, "
                        "--questions, --json and --show-attention")
    if args.model_id is not None and args.owleval is None:
        raise UserError("--model-id names the model in --owleval's answer file and needs --owleval")
    if args.questions is not None and (args.image or args.prompt is not None or args.show_attention or args.json):
        raise UserError("--questions takes its images and prompts from its file: drop --image, --prompt, "
                        "--show-attention and --json")
    if args.json and args.prompt is None:
        raise UserError("--json needs --prompt")
    if args.show_attention and not args.image:
        raise UserError("--show-attention needs an --image")
    if args.raw_prompt and args.prompt is None:
        raise UserError("--raw-prompt needs --prompt")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("the prompt is empty")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")


SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "seed")


def fill_defaults(args, template: Template) -> None:
    """The sampling flags left unset take the loaded model's official defaults; with --owleval and none of them
    given, the answers are greedy (temperature 0) instead."""
    if getattr(args, "owleval", None) is not None and all(getattr(args, f) is None for f in SAMPLING_FLAGS):
        args.temperature = 0.0
    for name, value in template.defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def load_model(args) -> Owl:
    try:
        return Owl.from_pretrained(args.checkpoint, getattr(torch, args.dtype), args.device).pack_for_inference()
    except (FileNotFoundError, KeyError, ValueError, OSError, RuntimeError) as e:
        raise UserError(f"cannot load checkpoint {args.checkpoint}: {e.args[0] if e.args else e}") from None
    except (pickle.UnpicklingError, EOFError, SafetensorError) as e:  # e.g. an interrupted download
        raise UserError(f"cannot load checkpoint {args.checkpoint}: a weights file is truncated, corrupt or holds "
                        f"more than tensors ({type(e).__name__})") from None


def main(argv=None) -> int:
    # chat.py imports this module at its top; imported here, at run time, the dependency stays one-way at load
    from chat import answer_owleval, answer_questions, ask

    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        start = time.perf_counter()
        model = load_model(args)
        fill_defaults(args, model.cfg.template)
        if args.questions is not None:
            answer_questions(model, args.questions, args)
        elif args.owleval is not None:
            answer_owleval(model, args.owleval, args)
        else:
            ask(model, args, load_s=time.perf_counter() - start)
        return 0
    except UserError as e:
        print(f"owl: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # run from the module chat.py and attention.py import, not from __main__ (a second copy): one UserError class
    import owl

    sys.exit(owl.main())

