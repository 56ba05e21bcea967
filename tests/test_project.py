"""hydralora.ops.project: A and the router over one input, keeping x and the mask instead of the dropped copy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from hydralora import HydraLinear, HydraLoraConfig
from hydralora._checkpointing import enable_checkpointing
from hydralora.ops import project
from hydralora.ops.project import dropout_project


def test_matches_dropout_then_linear_with_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    W = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    dh, dl = torch.randn(2, 7, 4, dtype=torch.float64), torch.randn(2, 7, 3, dtype=torch.float64)
    torch.manual_seed(1)
    h, logits = dropout_project(x, A, W, 0.3)
    torch.autograd.backward([h, logits], [dh, dl])
    got = [h, logits, x.grad, A.grad, W.grad]
    x2, A2, W2 = (t.detach().clone().requires_grad_() for t in (x, A, W))
    torch.manual_seed(1)
    keep = torch.rand_like(x2.reshape(-1, 12)).reshape(x2.shape) >= 0.3  # the same draw as the Function's
    h_ref, l_ref = F.linear(x2 * keep / 0.7, A2), F.linear(x2, W2)
    torch.autograd.backward([h_ref, l_ref], [dh, dl])
    for a, b in zip(got, [h_ref, l_ref, x2.grad, A2.grad, W2.grad]):
        torch.testing.assert_close(a, b)
    assert 0 < (~keep).sum() < keep.numel()  # the mask did drop something, and not everything


def test_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    W = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)

    def f(x, A, W):
        torch.manual_seed(3)  # the same mask on every evaluation
        return dropout_project(x, A, W, 0.25)

    assert torch.autograd.gradcheck(f, (x, A, W))


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1])
def test_bad_p_is_refused(p):
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="p="):
        dropout_project(x, torch.randn(2, 4), torch.randn(3, 4), p)


def _saved_of_size(fn, numel: int) -> list[tuple[torch.dtype, int]]:
    """(dtype, bytes) of the distinct storages of `numel` elements that autograd saves while fn() runs."""
    seen: dict[int, tuple[torch.dtype, int]] = {}

    def pack(t):
        if t.numel() == numel:
            seen.setdefault(t.untyped_storage().data_ptr(), (t.dtype, t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sorted(seen.values(), key=str)


def test_training_layer_keeps_x_and_a_bool_mask_only(monkeypatch):
    """Per element of x, a training HydraLinear keeps x and a bool mask (PEFT LoRA: the dropped copy and the
    mask), not the dropped copy as well: at most PEFT LoRA's bytes of x's size."""
    T, k, d = 64, 96, 80
    monkeypatch.setattr(project, "MIN_NUMEL", T * k)  # the layer takes this path from x's size on
    torch.manual_seed(0)
    x = torch.randn(T, k).requires_grad_()

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(k, d, bias=False)

    lora = get_peft_model(One(), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["proj"]))
    lora.train()
    base = nn.Linear(k, d, bias=False).requires_grad_(False)
    hydra = HydraLinear(base, "default", HydraLoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, num_experts=3,
                                                         target_modules=["x"])).train()
    ours = _saved_of_size(lambda: hydra(x), T * k)
    peft_saved = _saved_of_size(lambda: lora.base_model.model.proj(x), T * k)
    assert [dt for dt, _ in ours] == [torch.bool, torch.float32], ours
    assert sum(b for _, b in ours) <= sum(b for _, b in peft_saved), (ours, peft_saved)


def test_small_inputs_keep_the_plain_path():
    """Below MIN_NUMEL the layer keeps dropout + two GEMMs (fewer small ops), so the dropped copy is saved too."""
    assert project.use_dropout_project(torch.empty(project.MIN_NUMEL)) and not project.use_dropout_project(torch.empty(8, 8))


def test_checkpointed_training_recomputes_the_same_mask(monkeypatch):
    """Through a whole model: with non-reentrant gradient checkpointing the recompute draws the same dropout mask,
    so loss and every adapter gradient equal those of the plain run with the same seed."""
    import copy

    from peft import get_peft_model as gpm

    from conftest import batch, make_model, randomize_adapters

    monkeypatch.setattr(project, "MIN_NUMEL", 0)
    cfg = HydraLoraConfig(r=4, lora_alpha=8, num_experts=3, lora_dropout=0.2, target_modules="all-linear",
                          task_type="CAUSAL_LM")
    base = make_model("llama")
    inputs = batch("llama")
    results = []
    # The first adapted forward in a process differs from later ones (seen with PEFT LoRA too, without
    # checkpointing): a warm-up run, dropped, keeps that out of the comparison.
    for checkpointing in (False, False, True):
        model = gpm(copy.deepcopy(base), copy.deepcopy(cfg))
        randomize_adapters(model)
        model.train()
        if checkpointing:
            enable_checkpointing(model)
            model.enable_input_require_grads()
        torch.manual_seed(11)
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results[1:]
    torch.testing.assert_close(l1, l0)
    assert g0.keys() == g1.keys() and any("hydralora_A" in n for n in g0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6)
