"""torch.compile: the default mode trains and matches eager; reduce-overhead (CUDA graphs) training is refused with a
clear error (it crashed the process on the GPU), inference under it is allowed."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

from hydralora import HydraLoraConfig


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.q_proj(x)


def _model():
    torch.manual_seed(0)
    cfg = HydraLoraConfig(r=2, num_experts=2, target_modules=["q_proj"], init_b="rlora")
    return peft.get_peft_model(_Block(), cfg)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_reduce_overhead_training_is_refused_with_a_clear_error(monkeypatch):
    monkeypatch.delenv("HYDRALORA_ALLOW_CUDAGRAPH_TRAINING", raising=False)
    model = _model().train()
    with pytest.raises(RuntimeError, match=r"mode='reduce-overhead'\) \(CUDA graphs\) is refused for training"):
        torch.compile(model, mode="reduce-overhead")(torch.randn(2, 3, 16))


def test_default_compile_trains_like_eager():
    model = _model().train()
    x = torch.randn(2, 3, 16)
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager")(x)  # the refusal is Dynamo-level: any backend shows it
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "hydralora_B" in n)


def test_inference_under_reduce_overhead_is_allowed():
    model = _model().eval()
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.compile(model, mode="reduce-overhead")(x), expected)
