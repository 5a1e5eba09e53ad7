"""LoRA's claims, checked on a toy attention-shaped block (q_proj/k_proj/v_proj/o_proj) built here."""
import re

import pytest
import torch
import torch.nn as nn

from conftest import assert_close
from lora import (LoRALinear, apply_lora, load_lora, load_lora_state_dict, lora_state_dict, mark_only_lora_trainable,
                  merge_lora, remove_lora, save_lora, unmerge_lora)

D = 16


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.v_proj, self.o_proj = nn.Linear(D, D, bias=False), nn.Linear(D, D)  # v_proj without bias, like LLaMA

    def forward(self, x):
        return x + self.o_proj(torch.tanh(self.q_proj(x)) * self.k_proj(x) + self.v_proj(x))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block() for _ in range(2)])
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def toy(seed=0):
    torch.manual_seed(seed)
    return Toy()


def x_batch():
    return torch.randn(3, 5, D, generator=torch.Generator().manual_seed(1))


def randomize_lora_B(model, seed=2):  # as if trained a little; A keeps its kaiming init
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=g))


def test_lora_with_B_zero_changes_nothing():
    model = toy()
    base_keys, y_before = set(model.state_dict()), model(x_batch())
    names = apply_lora(model)  # released defaults, dropout 0.05, in train mode: B = 0 still adds exactly nothing
    assert names == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
    assert isinstance(model.layers[0].q_proj, LoRALinear) and model.layers[0].q_proj.scaling == 32 / 8
    assert isinstance(model.layers[0].k_proj, nn.Linear) and not isinstance(model.layers[0].k_proj, LoRALinear)
    assert torch.equal(model(x_batch()), y_before)
    assert set(model.state_dict()) - set(lora_state_dict(model)) == base_keys  # base keys unchanged


def test_apply_lora_with_no_matching_name_is_an_error():
    with pytest.raises(ValueError, match="no nn.Linear named"):
        apply_lora(toy(), targets=("query",))


def test_the_formula_by_hand():
    torch.manual_seed(0)
    linear = nn.Linear(D, 7)
    layer = LoRALinear.from_linear(linear, r=4, alpha=12, dropout=0.0)  # scaling 3, neither alpha nor 1/r
    nn.init.normal_(layer.lora_B)
    x = x_batch()
    W, b, A, B = linear.weight, linear.bias, layer.lora_A, layer.lora_B
    y_hand = x @ W.T + b + (12 / 4) * (x @ A.T @ B.T)
    assert_close(layer(x), y_hand, ops=16)


def test_dropout_is_on_the_lora_path_only():
    torch.manual_seed(0)
    linear = nn.Linear(D, D)
    layer = LoRALinear.from_linear(linear, dropout=1.0)  # p = 1 drops the whole LoRA input, never the base input
    nn.init.normal_(layer.lora_B)
    assert torch.equal(layer.train()(x_batch()), linear(x_batch()))
    assert not torch.equal(layer.eval()(x_batch()), linear(x_batch()))


def test_from_linear_shares_the_weight_and_keeps_lora_params_float32():
    linear = nn.Linear(D, D, dtype=torch.bfloat16)
    layer = LoRALinear.from_linear(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert layer(x_batch().bfloat16()).dtype == torch.bfloat16


def test_merge_gives_the_same_outputs_and_unmerge_restores_the_weights():
    model = toy().eval()
    apply_lora(model)
    randomize_lora_B(model)
    weights = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight")}
    y_lora = model(x_batch())
    merge_lora(model)
    assert not torch.allclose(model.layers[0].q_proj.weight, weights["layers.0.q_proj.weight"])
    assert_close(model(x_batch()), y_lora, ops=64)  # path not added twice
    unmerge_lora(model)
    for k, w in model.state_dict().items():
        if k.endswith("weight"):
            assert_close(w, weights[k], ops=16)


def test_only_lora_parameters_train():
    model = toy()
    apply_lora(model)
    mark_only_lora_trainable(model, extra=("norm.",))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    lora = {f"layers.{i}.{proj}.lora_{ab}" for i in (0, 1) for proj in ("q_proj", "v_proj") for ab in "AB"}
    assert trainable == lora | {"norm.weight", "norm.bias"}
    with pytest.raises(ValueError, match="nrom"):  # a misspelt prefix is an error, not a silent no-op
        mark_only_lora_trainable(model, extra=("nrom.",))

    mark_only_lora_trainable(model)
    q = model.layers[0].q_proj
    model(x_batch()).square().sum().backward()
    assert q.lora_B.grad.abs().sum() > 0
    assert torch.count_nonzero(q.lora_A.grad) == 0  # B = 0 blocks A's gradient, as in the paper's init
    assert all(p.grad is None for name, p in model.named_parameters() if "lora_" not in name)

    with torch.no_grad():
        q.lora_B.normal_()
    model.zero_grad()
    model(x_batch()).square().sum().backward()
    assert q.lora_A.grad.abs().sum() > 0 and q.lora_B.grad.abs().sum() > 0
    assert all(p.grad is None for name, p in model.named_parameters() if "lora_" not in name)


def test_save_and_load_give_identical_outputs_on_a_fresh_model(tmp_path):
    model = toy().eval()
    apply_lora(model, r=4, alpha=16)
    randomize_lora_B(model)
    save_lora(model, tmp_path / "lora.safetensors", meta={"step": 3})

    fresh = toy().eval()
    torch.manual_seed(99)  # different lora_A init than the saved one
    apply_lora(fresh, r=4, alpha=16)
    assert not torch.equal(fresh(x_batch()), model(x_batch()))
    meta = load_lora(fresh, tmp_path / "lora.safetensors")
    assert torch.equal(fresh(x_batch()), model(x_batch()))
    assert meta == {"r": "4", "alpha": "16", "targets": "q_proj,v_proj", "step": "3"}

    other_alpha = toy()
    apply_lora(other_alpha, r=4, alpha=32)
    with pytest.raises(ValueError, match="alpha"):
        load_lora(other_alpha, tmp_path / "lora.safetensors")


def test_loading_a_bad_lora_state_dict_names_the_key():
    model = toy()
    apply_lora(model)
    sd = lora_state_dict(model)
    assert len(sd) == 8

    missing = dict(sd)
    del missing["layers.1.v_proj.lora_B"]
    with pytest.raises(ValueError, match=re.escape("missing key(s) layers.1.v_proj.lora_B")):
        load_lora_state_dict(model, missing)

    with pytest.raises(ValueError, match=re.escape("unexpected key(s) layers.0.k_proj.lora_A")):
        load_lora_state_dict(model, {**sd, "layers.0.k_proj.lora_A": torch.zeros(8, D)})

    with pytest.raises(ValueError, match=re.escape("layers.0.q_proj.lora_A has shape (4, 16)")):
        load_lora_state_dict(model, {**sd, "layers.0.q_proj.lora_A": torch.zeros(4, D)})


def test_remove_lora_leaves_plain_linears_with_the_same_outputs():
    model = toy().eval()
    base_keys = set(model.state_dict())
    apply_lora(model)
    randomize_lora_B(model)
    y_lora = model(x_batch())
    remove_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.layers[0].q_proj) is nn.Linear and type(model.layers[1].v_proj) is nn.Linear
    assert set(model.state_dict()) == base_keys  # the official, merged checkpoint format
    assert_close(model(x_batch()), y_lora, ops=64)
