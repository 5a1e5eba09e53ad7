"""Owl against HF transformers on the same random weights, timed side by side in one process.

    python bench.py              # the full run: a Markdown table for README (tens of minutes on 2 cores)
    python bench.py --quick      # smaller models, fewer repeats: every case and ratio in under 3 minutes
    python bench.py --load-7b    # also a full-size owl-7b checkpoint on disk (~14 GB): load time, memory, decode

Each case builds its model once with random weights, saves it in HF's format and loads Owl's part from that folder
with Owl's own loaders (VisionTransformer.from_clip, Llama.from_hf), checks that both give the same outputs (the
largest difference is printed), then runs the two in turn (Owl, HF, Owl, HF, ...) after a warm-up and reports the
medians and their ratio. Benchmark-only dependencies: transformers and peft (requirements-test.txt).

    stream   the machine's limits, always measured: the memory bandwidth (copying and summing a buffer far larger
             than the caches; the faster of the two) that decode is held to, and the rate of a large matrix
             product that f_V, prefill and training are held to (each of their rows shows its share of it).
    vit      f_V, ViT-L/14 at 224 px, batch 4, fp32 and bf16: seconds per batch. Target Owl <= 0.8 x HF.
    decode   f_L shaped hidden 1024, 24 layers, 16 heads, MLP 2816, vocab 32000 (374M parameters); a 100-token
             prompt, 64 new tokens, batch 1, greedy, fp32 and bf16: tokens/s after the first token, and the bytes of
             the weights read per token x tokens/s as a share of the stream bandwidth. Also, per weight shape, the
             rate of each matrix-vector kernel llama.Linear chooses from (F.linear, torch.mv, row blocks, and
             oneDNN's product on a packed weight, which Llama.pack_for_inference keeps where it is fastest; timed on
             copies of the weight that no cache holds, in the same rounds as the two decodes) and the one it chose:
             the fastest of them, over every shape of a step, is what PyTorch's kernels allow here; and the step's
             matrix products alone, each weight once in a step's order (what is left with nothing else of the step).
             Targets: >= 1.0 x HF's tokens/s on every CPU (>= 1.5 where the machine allows); weights read at >= 70%
             of the bandwidth or at the fastest kernels' rate, whichever is lower.
    prefill  the same f_L reading 65 image-token embeddings + 100 text tokens, up to the next token's logits (KV
             cache filled): seconds. Target Owl <= 0.8 x HF.
    lora     a stage-2 step on the same f_L: LoRA r 8, alpha 32, dropout 0.05 on q_proj and v_proj, batch 2 x 512,
             forward, backward and AdamW, fp32: tokens/s (target >= 1.3 x HF + peft), and the peak memory a step
             adds to the loaded model, to the MB, each side in a fresh process (target: no more than HF + peft).
             Twice: a loss on every token, then on the second half of each sequence only (an instruction's answer,
             its prompt masked). Owl's loss (train.summed_loss) makes logits for the positions with a target only,
             a block of rows at a time (llama.ChunkedCrossEntropy); HF's for every position at once.
    owl      the whole Owl (no HF counterpart): tiny (fp32), and owl-7b-shaped with fewer f_L layers (bf16): time
             to the first token and tokens/s for one image and a question.
    load-7b  (only with --load-7b) writes a random owl-7b checkpoint in the official format once (bf16, sharded
             safetensors), then in a fresh process: Owl.from_pretrained time and peak resident memory (target
             <= 1.15 x the weights' bytes) and bf16 decode tokens/s at full size (target >= 70% of the bandwidth).
"""
import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import llama
from llama import Llama, Tokenizer, build_empty, cpu_bf16_flags
from lora import apply_lora, mark_only_lora_trainable
from owl import Owl, OwlConfig, render_prompt, save_shards
from vit import VisionTransformer

GB = 1e9
LLAMA = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
             num_key_value_heads=16, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)


def sizes(quick: bool) -> dict:
    """What each case runs: the issue's sizes, or smaller ones that show every ratio within a few minutes."""
    if quick:
        return dict(repeats=3, stream_bytes=2 ** 28, vit_layers=4, vit_batch=4, llama_layers=4, new_tokens=16,
                    lora_layers=2, lora_seq=128, owl_vit_layers=2, owl_abstractor_layers=1, owl_llama_layers=2)
    return dict(repeats=5, stream_bytes=2 ** 30, vit_layers=24, vit_batch=4, llama_layers=24, new_tokens=64,
                lora_layers=24, lora_seq=512, owl_vit_layers=24, owl_abstractor_layers=6, owl_llama_layers=4)


# ---------------------------------------------------------------------------------------------------------------
# Measuring

def alternate(runs: dict, repeats: int, warmup: int = 1) -> dict:
    """Median of each run, taken in turn (a, b, a, b, ...) after `warmup` calls each. A run that returns a float
    returns the seconds it measured itself (e.g. decode time per token after the first); any other run is timed
    whole."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            measured = run()
            seconds[name].append(measured if isinstance(measured, float) else time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Let the kernel's peak-RSS mark restart from the current RSS (Linux >= 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def in_fresh_process(call: str, threads: int, exact_rss: bool = False) -> dict:
    """Run `bench.<call>` in a new Python process (so its peak memory is its own) and return the JSON it prints.
    exact_rss: glibc's malloc gives every block of 64 KiB or more back to the system when it is freed, instead of
    keeping some for reuse, so that the resident memory follows the live tensors (peaks vary by tens of MB without)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if exact_rss else None
    code = f"import torch, bench; bench.quiet_hf(); torch.set_num_threads({threads}); bench.{call}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent,
                          env=env)
    if done.returncode != 0:
        raise RuntimeError(f"bench.{call} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class Table:
    """The rows of the final Markdown table; each is also printed as soon as it is measured."""

    def __init__(self):
        self.rows, self.start = [], time.perf_counter()

    def add(self, case, owl, hf="—", ratio="—", target="—", met="—"):
        self.rows.append((case, owl, hf, ratio, target, met))
        print(f"  [{time.perf_counter() - self.start:5.0f} s] {case}: Owl {owl} | HF {hf} | {ratio} | target {target} | "
              f"met: {met}", flush=True)

    def markdown(self) -> str:
        head = ["case", "Owl", "HF", "ratio", "target", "met"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in self.rows])


def yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def time_ratio(table, case, owl_s, hf_s, target, flops, peak):
    r = owl_s / hf_s
    table.add(case, f"{owl_s:.3f} s ({share(flops, owl_s, peak)})", f"{hf_s:.3f} s ({share(flops, hf_s, peak)})",
              f"Owl/HF time {r:.2f}", f"<= {target}", yes(r <= target))


# ---------------------------------------------------------------------------------------------------------------
# stream: the bandwidth limit

def case_stream(table, z, dtypes) -> tuple:
    """The machine's limits: memory bandwidth (GB/s) for decode, and the rate of a large matrix product (GFLOPS,
    per dtype) for what is bound by arithmetic (f_V, prefill, training)."""
    src = torch.ones(z["stream_bytes"] // 4)
    dst = torch.empty_like(src)
    s = alternate({"copy": lambda: dst.copy_(src), "sum": lambda: src.sum()}, z["repeats"])
    copy_bw, read_bw = 2 * src.numel() * 4 / s["copy"] / GB, src.numel() * 4 / s["sum"] / GB
    limit = max(copy_bw, read_bw)
    del src, dst
    table.add("memory bandwidth (the limit for decode)", f"{limit:.1f} GB/s (copy {copy_bw:.1f}, read {read_bw:.1f})")
    peak = {}
    for dtype in dtypes:
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        peak[dtype] = 2 * 2048 ** 3 / alternate({"mm": lambda: a @ b}, z["repeats"])["mm"] / GB
        table.add(f"matrix product 2048^3, {dtype_name(dtype)} (the limit for f_V, prefill, training)",
                  f"{peak[dtype]:.0f} GFLOPS")
    return limit, peak


def share(flops: float, seconds: float, peak: float) -> str:
    return f"{flops / seconds / GB:.0f} GFLOPS = {flops / seconds / GB / peak:.0%}"


def dtype_name(dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


# ---------------------------------------------------------------------------------------------------------------
# vit: f_V against HF's CLIPVisionModel

def vit_flops(layers: int, batch: int, D=1024, I=4096, T=257, patch=14) -> float:
    per_layer = 2 * T * (4 * D * D + 2 * D * I) + 2 * 2 * T * T * D  # projections and MLP; QK^T and AV
    return batch * (2 * (T - 1) * 3 * patch * patch * D + layers * per_layer)


def case_vit(table, z, dtypes, peak):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=z["vit_layers"],
                           num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu")
    torch.manual_seed(0)
    hf = CLIPVisionModel(cfg).eval()
    tower = getattr(hf, "vision_model", hf)  # transformers 4.x nests the tower, 5.x does not
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        owl = VisionTransformer.from_clip(folder).eval()
    pixels = torch.randn(z["vit_batch"], 3, 224, 224)
    for dtype in dtypes:
        hf.to(dtype), owl.to(dtype)
        x = pixels.to(dtype)
        runs = {"owl": lambda: owl(x),  # HF's last_hidden_state stops before post_layernorm; f_V's output is after it
                "hf": lambda: tower.post_layernorm(hf(pixel_values=x).last_hidden_state)}
        with torch.inference_mode():
            check("vit", dtype, runs["owl"]().float(), runs["hf"]().float())
            s = alternate(runs, z["repeats"])
        flops = vit_flops(z["vit_layers"], z["vit_batch"])
        time_ratio(table, f"f_V ViT-L/14 ({z['vit_layers']} layers), batch {z['vit_batch']}, {dtype_name(dtype)}",
                   s["owl"], s["hf"], 0.8, flops, peak[dtype])


def check(case, dtype, ours, ref, tol=None):
    """Print the largest difference relative to the reference's scale; stop if they plainly disagree."""
    diff = (ours - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
    tol = tol or (1e-4 if dtype == torch.float32 else 5e-2)
    print(f"  {case} {dtype_name(dtype)}: max |Owl - HF| / max |HF| = {diff:.2e}", flush=True)
    if not diff <= tol:
        raise SystemExit(f"bench: Owl and HF disagree in {case} ({dtype_name(dtype)}): {diff:.2e} > {tol:.0e}")


# ---------------------------------------------------------------------------------------------------------------
# decode, prefill, lora: f_L against HF's LlamaForCausalLM

def save_random_llama(layers: int, folder: Path) -> None:
    """A random HF LLaMA of the benchmark's shape, saved into folder: both sides load it from there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA, num_hidden_layers=layers)).save_pretrained(folder)


def both_llamas(folder: Path, dtype):
    """Owl's f_L through Llama.from_hf, packed for inference as owl.py and serve.py run it, and HF's
    LlamaForCausalLM, the same weights in the same dtype."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return Llama.from_hf(folder, dtype=dtype).eval().pack_for_inference(), hf


def decode_bytes(model: Llama) -> int:
    """Bytes a decode step reads: every weight but the embedding table, of which it reads one row."""
    return nbytes(p for name, p in model.named_parameters() if "embed_tokens" not in name)


def kernel_runs(shapes, dtype) -> tuple:
    """For each weight shape and each of llama.Linear's decode kernels that applies to it, and oneDNN's product on
    the packed weight where it can be packed: a run that multiplies copies of a random weight of that shape (256 MB
    in all, so none comes from a cache) by one vector; and the bytes each run reads."""
    runs, read = {}, {}
    for shape in shapes:
        w = torch.randn(shape).to(dtype)
        ws = [w] + [w.clone() for _ in range(max(0, 2 ** 28 // nbytes([w]) - 1))]
        x = torch.randn(shape[1], dtype=dtype)
        for k in llama.DECODE_KERNELS:
            if k != "row blocks" or shape[0] % torch.get_num_threads() == 0:
                runs[shape, k] = lambda k=k, ws=ws, x=x: [llama.DECODE_KERNELS[k](v, x) for v in ws]
                read[shape, k] = nbytes(ws)
        if "packed" in llama.decode_times(w):  # this build and CPU can pack this dtype
            packed = [llama.pack(v) for v in ws]
            runs[shape, "packed"] = lambda ps=packed, x=x.view(1, -1): [llama.packed_linear(x, p) for p in ps]
            read[shape, "packed"] = nbytes(ws)
    return runs, read


def step_products(owl: Llama, dtype):
    """A run that makes a decode step's matrix products and nothing else: every Linear of owl (packed or not, as
    the decode runs it) on one vector, in the order a step calls them. Seconds per step. It shows how much of
    the gap between a decode step and the kernels timed one shape at a time lies outside Owl's code."""
    order = [m for m in owl.modules() if isinstance(m, llama.Linear)]  # module order: the layers, then lm_head
    xs = {m.in_features: torch.randn(1, 1, m.in_features, dtype=dtype) for m in order}

    def run(steps: int = 8) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            for m in order:
                m(xs[m.in_features])
        return (time.perf_counter() - start) / steps
    return run


def case_decode(table, z, dtype, owl, hf, limit):
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):  # generate() calls put() with the prompt, then once per new token
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    n = z["new_tokens"]
    prompt = torch.randint(3, LLAMA["vocab_size"], (1, 100), generator=torch.Generator().manual_seed(0))

    def owl_tokens():
        tokens, times = [], []
        for token in owl.generate(prompt, max_new_tokens=n, eos_id=-1):  # -1: never stop early
            tokens.append(token)
            times.append(time.perf_counter())
        return tokens, times

    def hf_tokens():
        stamps = Stamps()
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, streamer=stamps, pad_token_id=0)
        return out[0, prompt.shape[1]:].tolist(), stamps.times[1:]

    def per_token(times):  # seconds per token after the first one
        return (times[-1] - times[0]) / (len(times) - 1)

    with torch.inference_mode():
        ours, ref = owl_tokens()[0], hf_tokens()[0]
        same = sum(a == b for a, b in zip(ours, ref))
        print(f"  decode {dtype_name(dtype)}: {same}/{n} greedy tokens equal to HF's", flush=True)
        if dtype == torch.float32 and ours[:4] != ref[:4]:
            raise SystemExit("bench: Owl and HF choose different greedy tokens in fp32")
        shapes, chosen = {}, {}  # every weight a step multiplies by a vector: shape -> count, and its kernel
        for m in owl.modules():
            if isinstance(m, llama.Linear):
                shape = tuple(m.weight.shape)
                shapes[shape] = shapes.get(shape, 0) + 1
                chosen[shape] = "packed" if m.weight.is_mkldnn else llama.decode_kernel(m.weight)
        kernels, read = kernel_runs(shapes, dtype)  # timed in the same rounds as the two decodes, side by side
        s = alternate({"owl": lambda: per_token(owl_tokens()[1]), "hf": lambda: per_token(hf_tokens()[1]),
                       "products": step_products(owl, dtype), **kernels}, z["repeats"])
        del kernels
    name = f"f_L decode ({z['llama_layers']} layers), {dtype_name(dtype)}"
    r = s["hf"] / s["owl"]
    table.add(f"{name}: tokens/s", f"{1 / s['owl']:.1f}", f"{1 / s['hf']:.1f}", f"Owl/HF tokens/s {r:.2f}",
              ">= 1.0; >= 1.5", f"{yes(r >= 1.0)}; {yes(r >= 1.5)}")
    rates = {shape: {k: read[shape, k] / s[shape, k] / GB for sk, k in read if sk == shape} for shape in shapes}
    for shape, rate in rates.items():
        table.add(f"{name}: one {shape[0]} x {shape[1]} matrix x vector (x {shapes[shape]} a step), GB/s",
                  ", ".join(f"{k} {v:.1f}" for k, v in rate.items()) + f"; Linear chose {chosen[shape]}")
    step_bytes = {shape: count * shape[0] * shape[1] * dtype.itemsize for shape, count in shapes.items()}
    fastest = sum(step_bytes.values()) / sum(b / max(rates[shape].values()) for shape, b in step_bytes.items())
    weights = decode_bytes(owl)
    owl_bw, hf_bw = weights / s["owl"] / GB, weights / s["hf"] / GB
    goal = min(0.7 * limit, fastest)
    table.add(f"{name}: weights read per second", f"{owl_bw:.1f} GB/s = {owl_bw / limit:.0%} of the bandwidth, "
              f"{owl_bw / fastest:.0%} of the fastest kernels' {fastest:.1f} GB/s",
              f"{hf_bw:.1f} GB/s = {hf_bw / limit:.0%}", "share of the stream bandwidth",
              f">= min(70% = {0.7 * limit:.1f}, fastest kernels {fastest:.1f} GB/s)", yes(owl_bw >= goal))
    products_bw = sum(step_bytes.values()) / s["products"] / GB
    table.add(f"{name}: a step's matrix products alone, each weight once, in a step's order, GB/s",
              f"{products_bw:.1f} = {products_bw / limit:.0%} of the bandwidth (nothing else of the step)")


def llama_flops(layers: int, tokens: int, logits: int, D=1024, I=2816, V=32000) -> float:
    """A causal forward pass over `tokens` positions of one sequence, with the lm_head on `logits` of them."""
    return 2 * tokens * layers * (4 * D * D + 3 * D * I) + 2 * tokens * tokens * D * layers + 2 * logits * D * V


def case_prefill(table, z, dtype, owl, hf, peak):
    torch.manual_seed(1)
    text = torch.randint(3, LLAMA["vocab_size"], (1, 100))
    image = torch.randn(1, 65, LLAMA["hidden_size"]) * 0.02  # stands in for f_K's 65 visual tokens
    with torch.inference_mode():
        embeds = owl.model.embed_tokens(text)
        x = torch.cat([embeds[:, :35], image.to(dtype), embeds[:, 35:]], dim=1)  # (1, 165, hidden)

        def owl_prefill():
            owl.setup_cache(1, x.shape[1])
            try:
                return owl(inputs_embeds=x, last_only=True)[:, -1]
            finally:
                owl.clear_cache()

        def hf_prefill():
            return hf(inputs_embeds=x, use_cache=True, logits_to_keep=1).logits[:, -1].float()

        check("prefill", dtype, owl_prefill(), hf_prefill())
        s = alternate({"owl": owl_prefill, "hf": hf_prefill}, z["repeats"])
    time_ratio(table, f"f_L prefill 65 image + 100 text tokens ({z['llama_layers']} layers), {dtype_name(dtype)}",
               s["owl"], s["hf"], 0.8, llama_flops(z["llama_layers"], x.shape[1], 1), peak[dtype])


def lora_model(impl: str, folder: str, seq: int, answers: bool):
    """Owl's f_L with lora.py ("owl") or HF's LLaMA with peft ("hf"), from folder, in training mode, and its loss on
    one batch of 2 x seq random tokens: a target at every position, or (answers) on the second half of each
    sequence only, as in an instruction whose prompt is masked. Returns (model, loss function, step function)."""
    ids = torch.randint(3, LLAMA["vocab_size"], (2, seq), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    if answers:
        labels[:, : seq // 2] = -100
    if impl == "owl":
        model = Llama.from_hf(folder)
        apply_lora(model, ("q_proj", "v_proj"), r=8, alpha=32, dropout=0.05)
        mark_only_lora_trainable(model)
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # as train.summed_loss: position t predicts t + 1
        n_targets = int((targets != -100).sum())

        def loss_fn():
            return model(ids, targets=targets) / n_targets  # the mean, as HF's loss
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM

        model = get_peft_model(LlamaForCausalLM.from_pretrained(folder),
                               LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))

        def loss_fn():
            return model(input_ids=ids, labels=labels).loss
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model.train(), loss_fn, step


def copy_lora_into_peft(owl, hf):
    """The same (non-zero) LoRA weights on both sides, so their losses can be compared."""
    theirs = dict(hf.named_parameters())
    with torch.no_grad():
        for name, p in owl.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                p.normal_(std=0.02)
                module, _, which = name.rpartition(".")
                theirs[f"base_model.model.{module}.{which}.default.weight"].copy_(p)


def lora_memory(impl: str, folder: str, seq: int, answers: bool):
    """(In a fresh process.) The peak memory one LoRA step adds to the loaded model, printed as JSON."""
    _, loss_fn, step = lora_model(impl, folder, seq, answers)
    with torch.no_grad():  # a forward pass first: Owl's loader maps the weights from disk, page by page on first use,
        loss_fn()  # and both sides build some tables on first use (Owl its RoPE table)
    before = rss_bytes()
    reset = reset_peak_rss()
    for _ in range(2):
        step()
    print(json.dumps({"before": before, "peak": peak_rss_bytes(), "reset": reset}))


def case_lora(table, z, folder, threads, peak, answers: bool):
    seq = z["lora_seq"]
    (owl, owl_loss, owl_step), (hf, hf_loss, hf_step) = (lora_model(impl, folder, seq, answers) for impl in ("owl", "hf"))
    copy_lora_into_peft(owl, hf)
    owl.eval(), hf.eval()  # no dropout for the comparison
    with torch.no_grad():
        check("lora loss", torch.float32, owl_loss().reshape(1), hf_loss().reshape(1), tol=1e-4)
    owl.train(), hf.train()
    s = alternate({"owl": owl_step, "hf": hf_step}, max(2, z["repeats"] - 2))
    del owl, hf, owl_step, hf_step
    r = s["hf"] / s["owl"]
    # the backward pass computes gradients of activations only (the base weights are frozen): about the forward's
    # cost. With answers only, Owl runs the lm_head on the targets' positions, HF on every position.
    flops = {impl: 2 * 2 * llama_flops(z["lora_layers"], seq, seq // 2 if answers and impl == "owl" else seq)
             for impl in ("owl", "hf")}
    what = "loss on the second half of each sequence" if answers else "loss on every token"
    table.add(f"LoRA step q,v r 8, batch 2 x {seq} ({z['lora_layers']} layers), fp32, {what}: tokens/s",
              *(f"{2 * seq / s[impl]:.1f} ({share(flops[impl], s[impl], peak[torch.float32])})"
                for impl in ("owl", "hf")), f"Owl/HF tokens/s {r:.2f}", ">= 1.3", yes(r >= 1.3))
    mem = {impl: in_fresh_process(f"lora_memory({impl!r}, {str(folder)!r}, {seq}, {answers})", threads,
                                  exact_rss=True) for impl in ("owl", "hf")}
    added = {impl: round((m["peak"] - m["before"]) / 1e6) for impl, m in mem.items()}  # to the MB: Python's own
    # heap moves by a fraction of one
    whole = "" if all(m["reset"] for m in mem.values()) else " (whole process: this kernel keeps its peak mark)"
    table.add(f"LoRA step, {what}: peak memory added to the loaded model{whole}", f"{added['owl']:.0f} MB",
              f"{added['hf']:.0f} MB", f"Owl/HF {added['owl'] / added['hf']:.2f}", "<= 1.0",
              yes(added["owl"] <= added["hf"]))


# ---------------------------------------------------------------------------------------------------------------
# owl: the whole model, one image and a question

def tiny_tokenizer(folder: Path) -> Path:
    """A small LLaMA-style SentencePiece model (unk 0, bos 1, eos 2), enough to render Owl's prompt."""
    import sentencepiece as spm

    path = folder / "tokenizer.model"
    text = [render_prompt(q, 1) + a for q, a in (("What is in the picture?", "A red cat sits on a blue mat."),
                                                 ("How many people are there?", "Three people walk by the river."),
                                                 ("Describe the image in detail.", "Two dogs play in a green park."))]
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(text * 20), model_writer=f, vocab_size=400,
                                       model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
                                       hard_vocab_limit=False, minloglevel=2)
    return path


def random_owl(cfg: OwlConfig, dtype, tokenizer: Path) -> Owl:
    torch.manual_seed(0)
    model = Owl(cfg)
    model.init_weights()
    with torch.no_grad():  # EOS never wins the argmax, so every run generates the same number of tokens
        model.language_model.lm_head.weight[2] = 0.0
    model.tokenizer = Tokenizer(tokenizer)
    return model.to(dtype).eval()


def case_owl(table, z):
    n = z["new_tokens"]
    seven = OwlConfig.preset("owl-7b")
    seven.vision.num_layers = z["owl_vit_layers"]
    seven.abstractor.num_layers = z["owl_abstractor_layers"]
    seven.text.num_layers = z["owl_llama_layers"]
    shapes = [("tiny", OwlConfig.preset("tiny"), torch.float32),
              (f"owl-7b-shaped (f_V {z['owl_vit_layers']}, f_K {z['owl_abstractor_layers']}, "
               f"f_L {z['owl_llama_layers']} layers)", seven, torch.bfloat16)]
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = tiny_tokenizer(Path(folder))
        for name, cfg, dtype in shapes:
            model = random_owl(cfg, dtype, tokenizer).pack_for_inference()  # as owl.py and serve.py run it
            ids = model.prompt_ids(render_prompt("What is in the picture?", 1))
            pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
            firsts, per_token = [], []
            for i in range(1 + z["repeats"]):  # the first run warms up
                start, times = time.perf_counter(), []
                for _ in model.generate(ids, pixels, max_new_tokens=n, temperature=0.0):
                    times.append(time.perf_counter())
                if i:
                    firsts.append(times[0] - start)
                    per_token.append((times[-1] - times[0]) / (len(times) - 1))
            first, tps = statistics.median(firsts), 1 / statistics.median(per_token)
            table.add(f"Owl {name}, {dtype_name(dtype)}, 1 image + question ({len(ids)} positions)",
                      f"first token {first:.3f} s, then {tps:.1f} tokens/s")
            del model


# ---------------------------------------------------------------------------------------------------------------
# load-7b: the real size, from disk

def write_random_checkpoint(folder: Path, layers: int, preset: str = "owl-7b") -> None:
    """A random owl-7b (or owl2-7b) checkpoint in the official format (bf16, safetensors shards of at most 2 GB with an index),
    written by Owl.save_pretrained's own shard writer, a shard at a time so that the writer never holds more than a
    shard. Done once: a finished folder is reused."""
    if (folder / "complete").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    cfg = OwlConfig.preset(preset)
    cfg.text.num_layers = layers
    model = build_empty(Owl, cfg)  # shapes and names only, on the meta device
    official = {ours: theirs for theirs, ours in model.official_key_map().items()}
    plan = {official[name]: torch.empty(p.shape, dtype=torch.bfloat16, device="meta")
            for name, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)

    def fill(path: Path, shard: dict) -> dict:
        print(f"  writing {path}", flush=True)
        is_norm_weight = lambda key, t: t.dim() == 1 and "norm" in key and key.endswith("weight")
        return {key: torch.ones(t.shape, dtype=t.dtype) if is_norm_weight(key, t) else
                torch.randn(t.shape, generator=gen, dtype=t.dtype).mul_(0.02) for key, t in shard.items()}

    save_shards(plan, folder, max_shard_bytes=2 * GB, fill=fill)
    (folder / "config.json").write_text(json.dumps(cfg.to_official(), indent=2))
    tiny_tokenizer(folder)
    (folder / "complete").write_text("")


def load_and_decode(folder: str, new_tokens: int):
    """(In a fresh process.) Owl.from_pretrained in bf16, then one image and a question (so every weight is used)
    and new_tokens greedy tokens; prints the timings and the process's peak resident memory as JSON. new_tokens 0:
    the load alone (bf16 matrix products are slow on a CPU without bf16 instructions)."""
    start = time.perf_counter()
    model = Owl.from_pretrained(folder, dtype=torch.bfloat16)
    load_s = time.perf_counter() - start
    if not new_tokens:
        with torch.no_grad():  # every weight read once, so that a lazily mapped file is counted as it would be in use
            for p in model.parameters():
                p.sum()
        print(json.dumps({"load_s": load_s, "weights": nbytes(model.parameters()), "peak": peak_rss_bytes()}))
        return
    with torch.no_grad():
        model.language_model.lm_head.weight[model.tokenizer.eos_id] = 0.0  # EOS never wins: new_tokens every run
    start = time.perf_counter()
    model.pack_for_inference()  # as owl.py and serve.py run it
    pack_s = time.perf_counter() - start
    ids = model.prompt_ids(model.cfg.template.prompt("What is in the picture? Describe it in detail.", 1))
    pixels = torch.randn(1, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    times = []
    start = time.perf_counter()
    for _ in model.generate(ids, pixels, max_new_tokens=new_tokens, temperature=0.0):
        times.append(time.perf_counter())
    print(json.dumps({"load_s": load_s, "pack_s": pack_s, "first_token_s": times[0] - start,
                      "weights": nbytes(model.parameters()), "decode_weights": decode_bytes(model.language_model),
                      "positions": len(ids),
                      "per_token_s": (times[-1] - times[0]) / (len(times) - 1), "peak": peak_rss_bytes()}))


def case_load_7b(table, z, folder: Path, layers: int, limit: float, threads: int, preset: str = "owl-7b",
                 decode: bool = True):
    write_random_checkpoint(folder, layers, preset)
    m = in_fresh_process(f"load_and_decode({str(folder)!r}, {max(8, z['new_tokens'] // 2) if decode else 0})",
                         threads)
    name = preset if layers == 32 else f"{preset} with {layers} f_L layers"
    if not decode:
        table.add(f"{name} bf16: Owl.from_pretrained", f"load {m['load_s']:.1f} s")
    else:
        table.add(f"{name} bf16: Owl.from_pretrained, then 1 image + question ({m['positions']} positions)",
                  f"load {m['load_s']:.1f} s, packing {m['pack_s']:.1f} s, first token after "
                  f"{m['first_token_s']:.1f} s more")
    times = m["peak"] / m["weights"]
    table.add(f"{name} bf16: peak resident memory", f"{m['peak'] / GB:.2f} GB = {times:.2f} x the weights' "
              f"{m['weights'] / GB:.2f} GB", target="<= 1.15 x", met=yes(times <= 1.15))
    if not decode:
        return
    bw = m["decode_weights"] / m["per_token_s"] / GB
    table.add(f"{name} bf16: decode", f"{1 / m['per_token_s']:.2f} tokens/s, {bw:.1f} GB/s = {bw / limit:.0%}",
              target=">= 70% of bandwidth", met=yes(bw / limit >= 0.7))


# ---------------------------------------------------------------------------------------------------------------

def quiet_hf() -> None:
    """No progress bars or deprecation notes from transformers and peft between the measurements."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    bf16 = cpu_bf16_flags()
    import transformers

    return (f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} threads), bf16 instructions: "
            f"{', '.join(bf16) or 'none'}; torch {torch.__version__}, transformers {transformers.__version__}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smaller models (ViT and f_L with fewer layers, shorter LoRA batches, 16 new tokens) and "
                        "fewer repeats: every case and ratio in under 3 minutes on 2 cores; the targets are the "
                        "full run's")
    p.add_argument("--cases", default="stream,vit,decode,prefill,lora,owl",
                   help="comma-separated cases to run, of stream, vit, decode, prefill, lora, owl (stream is always "
                        "measured: decode is held to it)")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="comma-separated dtypes for vit, decode and prefill: float32, bfloat16 or both")
    p.add_argument("--repeats", type=int, default=0, help="timed runs per side (0: 5, or 3 with --quick)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all cores)")
    p.add_argument("--load-7b", action="store_true",
                   help="also the full-size owl-7b: write a random official-format checkpoint (bf16, ~14 GB) into "
                        "--load-7b-dir once, then measure Owl.from_pretrained and bf16 decode in a fresh process")
    p.add_argument("--load-7b-dir", default="runs/bench/owl-7b-random",
                   help="where the random owl-7b checkpoint is written and reused")
    p.add_argument("--load-7b-model", choices=["owl-7b", "owl2-7b"], default="owl-7b",
                   help="with --load-7b: mPLUG-Owl's 7B or mPLUG-Owl2's (8.2 B; 448-px f_V, modality-adaptive f_L)")
    p.add_argument("--load-7b-no-decode", action="store_true",
                   help="with --load-7b: measure the load and its memory only, no image or decode")
    p.add_argument("--load-7b-layers", type=int, default=32,
                   help="f_L layers of that checkpoint (32 is owl-7b; fewer makes a small one to try the path)")
    args = p.parse_args(argv)
    quiet_hf()
    torch.set_num_threads(args.threads)
    z = sizes(args.quick)
    z["repeats"] = args.repeats or z["repeats"]
    cases = set(args.cases.split(","))
    unknown = cases - {"stream", "vit", "decode", "prefill", "lora", "owl"}
    if unknown:
        p.error(f"unknown case(s) {', '.join(sorted(unknown))}")
    if not set(args.dtypes.split(",")) <= {"float32", "bfloat16"}:
        p.error("--dtypes takes float32 and/or bfloat16")
    dtypes = sorted({getattr(torch, d) for d in args.dtypes.split(",")}, key=lambda d: d != torch.float32)

    command = "python bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started, table = time.perf_counter(), Table()
    print(f"{command}\n{machine()}\n{datetime.date.today()}", flush=True)
    limit, peak = case_stream(table, z, sorted(set(dtypes) | {torch.float32}, key=lambda d: d != torch.float32))
    if "vit" in cases:
        case_vit(table, z, dtypes, peak)
    if cases & {"decode", "prefill", "lora"}:
        with tempfile.TemporaryDirectory() as folder:
            if cases & {"decode", "prefill"}:
                save_random_llama(z["llama_layers"], Path(folder) / "llama")
                for dtype in dtypes:
                    owl, hf = both_llamas(Path(folder) / "llama", dtype)
                    if "decode" in cases:
                        case_decode(table, z, dtype, owl, hf, limit)
                    if "prefill" in cases:
                        case_prefill(table, z, dtype, owl, hf, peak)
                    del owl, hf
            if "lora" in cases:
                save_random_llama(z["lora_layers"], Path(folder) / "lora")
                for answers in (False, True):
                    case_lora(table, z, Path(folder) / "lora", args.threads, peak, answers)
    if "owl" in cases:
        case_owl(table, z)
    if args.load_7b:
        folder = Path(args.load_7b_dir.replace("owl-7b", args.load_7b_model))
        case_load_7b(table, z, folder, args.load_7b_layers, limit, args.threads, args.load_7b_model,
                     decode=not args.load_7b_no_decode)
    print(f"\n{command} ({time.perf_counter() - started:.0f} s), {datetime.date.today()}\n{machine()}\n")
    print(table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
