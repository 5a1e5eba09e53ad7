"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), written by hand.

A frozen Linear W gets a trainable low-rank update: y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, with A (r, in)
and B (out, r). B starts at zero, so a freshly wrapped model computes exactly what it did before. Stage 2 of mPLUG-Owl
(joint instruction tuning) trains LoRA on the LLM f_L; released defaults: r 8, alpha 32, dropout 0.05, on LLaMA's
q_proj and v_proj.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file


class LoRALinear(nn.Linear):
    """An nn.Linear plus lora_A/lora_B; .weight and .bias keep their names, so base state_dict keys are unchanged."""
    def __init__(self, in_features, out_features, bias=True, r=8, alpha=32, dropout=0.05, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.r, self.alpha, self.scaling, self.merged = r, alpha, alpha / r, False
        self.dropout = nn.Dropout(dropout)  # on the LoRA input path only; the base path stays deterministic
        self._make_lora_params()

    def _make_lora_params(self):
        # At least float32 even for a bf16/fp16 W: lr * grad falls below bf16's precision, so they would barely train.
        kw = dict(device=self.weight.device, dtype=torch.promote_types(self.weight.dtype, torch.float32))
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as in the LoRA paper's code (nn.Linear's own init)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r=8, alpha=32, dropout=0.05) -> "LoRALinear":
        """Wrap `linear`, sharing (not copying) its weight and bias, whatever their device and dtype."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, r, alpha, dropout, device="meta")
        m.weight, m.bias = linear.weight, linear.bias
        m._make_lora_params()  # again, now on the real weight's device (the first ones were on "meta")
        return m.train(linear.training)  # a new module is in train mode: keep an eval model's dropout off

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:  # the update already lives in weight; adding the path again would count it twice
            return y
        lora = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T  # (..., r) first: cheap
        return y + (self.scaling * lora).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += (self.scaling * self.lora_B @ self.lora_A).to(self.weight.dtype)  # (out, in)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:  # exact up to rounding in weight's dtype (bf16 weights do not come back bit for bit)
            self.weight -= (self.scaling * self.lora_B @ self.lora_A).to(self.weight.dtype)
            self.merged = False


def _children(model):  # (parent, attribute, child, full name), listed up front so children can be replaced
    return [(parent, attr, child, f"{prefix}.{attr}" if prefix else attr)
            for prefix, parent in model.named_modules() for attr, child in parent.named_children()]


def apply_lora(model: nn.Module, targets=("q_proj", "v_proj"), r=8, alpha=32, dropout=0.05) -> list[str]:
    """Replace every nn.Linear whose attribute name is in `targets` by a LoRALinear; return the replaced names.
    A target that is a pair of modality copies (mPLUG-Owl2's `k_proj.multiway.0` and `.1`) gets LoRA on each copy."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    replaced = []
    for parent, attr, child, name in _children(model):
        parts = name.split(".")
        named = attr in targets or (len(parts) >= 3 and parts[-2] == "multiway" and parts[-3] in targets)
        if named and isinstance(child, nn.Linear) and not isinstance(child, LoRALinear):
            setattr(parent, attr, LoRALinear.from_linear(child, r, alpha, dropout))
            replaced.append(name)
    if not replaced:
        raise ValueError(f"apply_lora: no nn.Linear named any of {targets} (wrong names, or LoRA already applied).")
    return replaced


def merge_lora(model: nn.Module):
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()


def unmerge_lora(model: nn.Module):
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()


def remove_lora(model: nn.Module):
    """Merge, then put back plain nn.Linear modules: the state_dict is then in the official (merged) format."""
    for parent, attr, child, _ in _children(model):
        if isinstance(child, LoRALinear):
            child.merge()
            plain = nn.Linear(child.in_features, child.out_features, child.bias is not None, device="meta")
            plain.weight, plain.bias = child.weight, child.bias
            setattr(parent, attr, plain)


def mark_only_lora_trainable(model: nn.Module, extra=()):
    """requires_grad only on lora_A/lora_B and on parameters whose name starts with a prefix in `extra`."""
    extra = (extra,) if isinstance(extra, str) else tuple(extra)
    for prefix in extra:  # a misspelt prefix would silently train nothing extra
        if not any(name.startswith(prefix) for name, _ in model.named_parameters()):
            raise ValueError(f"mark_only_lora_trainable: no parameter name starts with {prefix!r}.")
    for name, p in model.named_parameters():
        p.requires_grad = name.rsplit(".", 1)[-1] in ("lora_A", "lora_B") or name.startswith(extra)


def lora_state_dict(model: nn.Module) -> dict:
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, sd: dict):
    """Strict: a missing, unexpected or wrongly shaped key is an error that names the key."""
    if any(isinstance(m, LoRALinear) and m.merged for m in model.modules()):  # new A, B over an old merged update
        raise ValueError("load_lora_state_dict: the model has merged LoRA weights; unmerge_lora(model) first.")
    own = lora_state_dict(model)
    if missing := sorted(own.keys() - sd.keys()):
        raise ValueError(f"load_lora_state_dict: missing key(s) {', '.join(missing)}.")
    if unexpected := sorted(sd.keys() - own.keys()):
        raise ValueError(f"load_lora_state_dict: unexpected key(s) {', '.join(unexpected)} (not in this model).")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise ValueError(f"load_lora_state_dict: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}.")
        model.get_parameter(k).copy_(v)  # copy_ casts to the parameter's device and dtype


def save_lora(model: nn.Module, path, meta: dict | None = None):
    """Only the LoRA tensors, in safetensors; r, alpha and targets go into its (string-only) metadata."""
    mods = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if len(settings := {(m.r, m.alpha) for m in mods.values()}) != 1:
        raise ValueError(f"save_lora: expected one LoRA setting (r, alpha), found {sorted(settings)}.")
    (r, alpha), = settings
    info = {k: str(v) for k, v in (meta or {}).items()}
    info.update(r=str(r), alpha=str(alpha), targets=",".join(sorted({n.rsplit(".", 1)[-1] for n in mods})))
    save_file({k: v.contiguous() for k, v in lora_state_dict(model).items()}, str(path), metadata=info)


def load_lora(model: nn.Module, path) -> dict:
    """Load a save_lora file into a model that already has LoRA applied; returns the file's metadata."""
    with safe_open(str(path), framework="pt") as f:
        info = f.metadata() or {}
    for m in model.modules():  # r is checked by the shapes; a different alpha would silently rescale
        if isinstance(m, LoRALinear) and m.alpha != float(info.get("alpha", "nan")):
            raise ValueError(f"load_lora: {path} has alpha {info.get('alpha')}, the model has alpha {m.alpha}.")
    load_lora_state_dict(model, load_file(str(path)))
    return info
