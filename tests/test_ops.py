"""The fused HydraLoRA op (hydralora.ops) against the reference path (HydraLoraLayer.hydra_delta of a real HydraLinear).

CPU tests run the op's pure-PyTorch backend (the reference of the Triton kernels, same dropout mask); the GPU tests
(skipped without CUDA + Triton) run the Triton kernels against both.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hydralora
from hydralora import HydraLinear, HydraLoraConfig
from hydralora.ops import dispatch, reference
from hydralora.ops import fused as fops
from hydralora.ops import fused_supported, hydra_delta_fused, hydra_linear_fused
from hydralora.tuner import layer as hlayer

if fops.HAS_TRITON:
    from hydralora.ops import launch

CUDA_TRITON = torch.cuda.is_available() and fops.HAS_TRITON


def needs_gpu(fn):
    """A CUDA + Triton test: skipped elsewhere, selected by `-m gpu` (benchmarks/gpu_suite.sh)."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA_TRITON, reason="needs CUDA and Triton")(fn))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_layer(k=48, d=40, r=4, n=3, p=0.0, temp=1.0, dtype=torch.float32, device="cpu", seed=0, **extra):
    torch.manual_seed(seed)
    base = nn.Linear(k, d, bias=False)
    cfg = HydraLoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, num_experts=n, router_temperature=temp,
                          target_modules=["x"], **extra)
    layer = HydraLinear(base, "default", cfg)
    base.weight.requires_grad_(False)
    with torch.no_grad():  # non-zero experts and a router that does not give a uniform gate
        layer.hydralora_B["default"].normal_(0, 0.3)
        layer.hydralora_router["default"].normal_(0, 0.5)
    return layer.to(device=device, dtype=dtype)


def planned(layer, x, result=None):
    """Whether the layer's dispatch sends hydra_delta's call for x (on top of `result`) through the fused op."""
    plan = layer._fused_plan(x, "default")
    return plan is not None and (result is None or (result.dtype == plan.dtype and result.shape[:-1] == x.shape[:-1]))


def force_dispatch(monkeypatch):
    """The fused dispatch's device and rule checks forced to pass on the CPU (the op's PyTorch backend runs)."""
    monkeypatch.setenv("HYDRALORA_FUSED", "1")
    monkeypatch.setattr(dispatch, "kernel_device", lambda x: True)
    monkeypatch.setattr(fops, "supported", lambda *a, **k: True)


def switch_dispatch(monkeypatch, switch: str):
    """HYDRALORA_FUSED=0, or ('1') the fused dispatch forced on the CPU (force_dispatch)."""
    if switch == "1":
        force_dispatch(monkeypatch)
    else:
        monkeypatch.setenv("HYDRALORA_FUSED", "0")


def params(layer):
    return layer.hydralora_A["default"], layer.hydralora_router["default"], layer.hydralora_B["default"]


def grads(tensors):
    out = [t.grad.detach().clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


def run_reference(layer, x, dy, aux_coef=0.0):
    """Reference: base + hydra_delta, with an optional loss on the router logits (as a balance loss would be)."""
    out = layer(x)
    loss = (out.float() * dy.float()).sum()
    if aux_coef:
        A, G, _ = params(layer)
        loss = loss + aux_coef * (F.linear(x, G).float() ** 2).sum()
    loss.backward()
    return out.detach(), grads([x, *params(layer)])


def run_fused(layer, x, dy, aux_coef=0.0, backend="auto", own_base=False, p=0.0, training=False):
    A, G, B = params(layer)
    cfg = layer.hconfig["default"]
    if own_base:
        out, raw, gate = hydra_linear_fused(x, layer.base_layer.weight, None, A, G, B, layer.scaling["default"],
                                            p, training, cfg.router_temperature, backend=backend)
    else:
        res = layer.base_layer(x)
        out, raw, gate = hydra_delta_fused(x, A, G, B, res, layer.scaling["default"], p, training,
                                           cfg.router_temperature, backend=backend)
    loss = (out.float() * dy.float()).sum()
    if aux_coef:
        loss = loss + aux_coef * (raw ** 2).sum()
    loss.backward()
    return out.detach(), grads([x, A, G, B]), raw.detach(), gate


# ---------------------------------------------------------------------------------------------------------------
# CPU: PyTorch backend vs the layer
@pytest.mark.parametrize("own_base", [False, True])
@pytest.mark.parametrize("temp,aux", [(1.0, 0.0), (0.5, 0.3)])
def test_torch_backend_matches_layer(own_base, temp, aux):
    layer = make_layer(temp=temp)
    layer.train()  # dropout 0: training and eval compute the same function
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 48, generator=gen).requires_grad_()
    dy = torch.randn(2, 7, 40, generator=gen)
    ref_out, ref_g = run_reference(layer, x, dy, aux)
    out, g, raw, gate = run_fused(layer, x, dy, aux, backend="torch", own_base=own_base)
    assert rel(out, ref_out) < 1e-5
    for a, b in zip(g, ref_g):
        assert rel(a, b) < 1e-5
    assert torch.allclose(gate, layer.route(x.detach()), atol=1e-6)
    assert raw.shape == (2, 7, 3) and not gate.requires_grad


@pytest.mark.parametrize("own_base", [False, True])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_under_autocast_matches_layer(own_base, x_dtype):
    """fp32 adapter weights (PEFT's default) under a bf16 autocast: the op casts as autocast would and gives the
    layer's outputs, with gradients back in the weights' fp32."""
    layer = make_layer(temp=0.7).train()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 48, generator=gen).to(x_dtype).requires_grad_()
    dy = torch.randn(2, 9, 40, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out, ref_g = run_reference(layer, x, dy, aux_coef=0.2)
        out, g, raw, gate = run_fused(layer, x, dy, aux_coef=0.2, backend="torch", own_base=own_base)
    assert out.dtype == ref_out.dtype == torch.bfloat16 and raw.dtype == gate.dtype == torch.float32
    assert rel(out, ref_out) < 1e-2
    for name, a, b in zip(["x", "A", "W_g", "B"], g, ref_g):
        assert a.dtype == b.dtype, name
        assert rel(a, b) < 2e-2, name
    assert [t.dtype for t in g[1:]] == [torch.float32] * 3


def test_layer_under_autocast_equals_cast_input():
    """Under autocast the layer no longer casts a bf16 x up to its fp32 weights first (two passes over x saved);
    the GEMMs cast it back to bf16 anyway, so the output is bit for bit what the cast gave."""
    layer = make_layer().eval()
    x = torch.randn(3, 5, 48).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = layer(x)
        out_cast = layer(x.float())
    assert out.dtype == torch.bfloat16 and torch.equal(out, out_cast)


def test_torch_backend_dropout_matches_masked_reference():
    """With dropout, the op must equal the layer's function under the op's own (seed-derived) mask."""
    p = 0.3
    layer = make_layer()
    A, G, B = params(layer)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(11, 48, generator=gen).requires_grad_()
    dy = torch.randn(11, 40, generator=gen)
    torch.manual_seed(123)
    out, g, _, _ = run_fused(layer, x, dy, backend="torch", p=p, training=True)
    torch.manual_seed(123)
    seed = fops.new_seed(torch.device("cpu"))
    _, thr, inv_keep = reference.dropout_params(p, True)
    keep = reference.keep_mask(11, 48, seed, thr, "cpu")
    gate = torch.softmax(F.linear(x, G), -1)  # (T, N)
    h = F.linear(x * keep / (1 - p), A)  # (T, r)
    delta = torch.einsum("tn,ndr,tr->td", gate, B, h) * layer.scaling["default"]
    ref = layer.base_layer(x) + delta
    (ref * dy).sum().backward()
    ref_g = grads([x, A, G, B])
    assert rel(out, ref) < 1e-5
    for a, b in zip(g, ref_g):
        assert rel(a, b) < 1e-5
    # dropout really is on: a different seed gives a different output
    torch.manual_seed(124)
    out2, _, _, _ = run_fused(layer, x, dy, backend="torch", p=p, training=True)
    assert rel(out2, out) > 1e-4


@pytest.mark.parametrize("fused_backend", [None, "torch"])
def test_layer_B_flat_matrix_is_a_view_and_its_gradient_keeps_B_layout(fused_backend):
    """B (N, d, r) is stored (d, N, r): the stacked GEMM's (d, N*r) matrix is a view (no copy per call), and the
    gradient of B arrives in B's layout (no copy by autograd), through the eager layer and through the fused op."""
    layer = make_layer(dtype=torch.float64)
    A, G, B = params(layer)
    assert B.shape == (3, 40, 4) and reference.flat_B(B).data_ptr() == B.data_ptr()
    assert torch.equal(reference.flat_B(B), B.permute(1, 0, 2).reshape(40, 12))
    x = torch.randn(5, 48, dtype=torch.float64)
    if fused_backend is None:
        out = layer(x)
    else:
        out, _, _ = fops.hydra_delta_fused(x, A, G, B, layer.base_layer(x), layer.scaling["default"],
                                           backend=fused_backend)
    out.square().sum().backward()
    assert B.grad.stride() == B.stride() and B.grad.abs().sum() > 0
    # moved and cast (as get_peft_model and .to() do), B keeps the layout
    assert layer.to(torch.float32).hydralora_B["default"].stride() == B.stride()


def test_cuda_seed_follows_the_device_generator_state(monkeypatch):
    """On a CUDA device the seed comes from the device generator's seed and Philox offset, which it advances by 4
    (as one of torch's random ops): successive calls differ, and restoring the state (torch.manual_seed, or
    activation checkpointing's recompute) gives the same seeds again. A stand-in generator: no GPU needed."""

    class Gen:
        def __init__(self, seed):
            self.seed, self.offset = seed, 0

        def initial_seed(self):
            return self.seed

        def get_offset(self):
            return self.offset

        def set_offset(self, off):
            self.offset = off

    gens = (Gen(1234), Gen(99))
    monkeypatch.setattr(torch.cuda, "default_generators", gens)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    dev = torch.device("cuda", 0)
    first = [fops.new_seed(dev) for _ in range(50)]
    assert gens[0].offset == 200 and gens[1].offset == 0
    assert len(set(first)) == 50 and all(0 <= w < 2**31 for s in first for w in s)
    gens[0].offset = 0  # the state restored
    assert [fops.new_seed(dev) for _ in range(50)] == first
    gens[0].offset = 0
    assert fops.new_seed(torch.device("cuda", 1)) != first[0]  # another device's generator, another seed
    gens[0].seed = 1235  # another manual seed
    assert fops.new_seed(dev) != first[0]


def test_keep_mask_pairs_neighbouring_columns():
    """The mask's layout, element by element from its definition (pure Python ints): column k of row t belongs to
    the pair t * ceil(K / 2) + k // 2 and takes the low 16 bits of the pair's lowbias32 hash for even k, the high
    16 bits for odd k. The kernels compute this function (the interpreter test compares them with the PyTorch
    backend, which uses this one)."""
    M = 0xFFFFFFFF

    def bits16(t, k, K, s1, s2):
        v = t * ((K + 1) // 2) + k // 2
        v = (((v ^ s1) * 0x9E3779B1) + s2) & M
        v ^= v >> 16
        v = (v * 0x7FEB352D) & M
        v ^= v >> 15
        v = (v * 0x846CA68B) & M
        v ^= v >> 16
        return v & 0xFFFF if k % 2 == 0 else v >> 16

    T, K, seed, thr = 3, 201, (12345, 678), 20000  # odd K: the last pair has one column
    keep = reference.keep_mask(T, K, seed, thr, "cpu")
    ref = torch.tensor([[bits16(t, k, K, *seed) >= thr for k in range(K)] for t in range(T)])
    assert keep.shape == (T, K) and torch.equal(keep, ref)


def test_keep_mask_statistics():
    _, thr, _ = reference.dropout_params(0.05, True)
    m1 = reference.keep_mask(512, 256, (1, 2), thr, "cpu")
    m2 = reference.keep_mask(512, 256, (3, 4), thr, "cpu")
    assert abs(1 - m1.float().mean().item() - 0.05) < 0.003
    assert abs(1 - m2.float().mean().item() - 0.05) < 0.003
    both_dropped = (~m1 & ~m2).float().mean().item()  # independent masks: about p^2
    assert both_dropped < 0.0045
    assert (m1 == reference.keep_mask(512, 256, (1, 2), thr, "cpu")).all()  # a seed regenerates its mask
    assert reference.dropout_params(0.05, False)[0] is False and reference.dropout_params(0.0, True)[0] is False


def test_eval_and_no_grad():
    layer = make_layer(p=0.2).eval()
    x = torch.randn(5, 48)
    A, G, B = params(layer)
    with torch.no_grad():
        out, _, _ = hydra_delta_fused(x, A, G, B, layer.base_layer(x), layer.scaling["default"], 0.2, False,
                                      backend="torch")
        ref = layer(x)
    assert rel(out, ref) < 1e-6


def test_layer_helper_records_usage_like_the_layer(monkeypatch):
    layer = make_layer().eval()
    x = torch.randn(3, 6, 48)
    with torch.no_grad():
        ref = layer(x)
        usage_ref = layer._usage("default").clone()
        layer.reset_usage()
        force_dispatch(monkeypatch)
        out = layer._run_fused(layer._fused_plan(x, "default"), x, layer.base_layer(x))
    assert rel(out, ref) < 1e-6
    assert torch.allclose(layer._usage("default"), usage_ref, atol=1e-6)


def test_fused_supported_rules(monkeypatch):
    monkeypatch.setenv("HYDRALORA_FUSED", "1")
    layer = make_layer()
    x = torch.randn(4, 48)
    assert not fused_supported(x, *params(layer))  # CPU
    assert not planned(layer, x)
    if CUDA_TRITON:
        lay = make_layer(dtype=torch.bfloat16, device="cuda")
        xc = torch.randn(4, 48, device="cuda", dtype=torch.bfloat16)
        assert planned(lay, xc)
        for extra in ({"top_k": 2}, {"router_input": "lora_a"}, {"init_b": "rlora"}, {"expert_dropout": True}):
            other = make_layer(dtype=torch.bfloat16, device="cuda", **extra)
            assert not planned(other, xc), extra
        hydralora.set_routing(nn.Sequential(lay), "fixed", "mean")
        assert not planned(lay, xc)
        assert not fused_supported(xc.float(), *params(lay))
        monkeypatch.setenv("HYDRALORA_FUSED", "0")
        assert not planned(make_layer(dtype=torch.bfloat16, device="cuda"), xc)


def test_fused_supported_rules_past_the_device_check(monkeypatch):
    """The rules behind the device check, on the CPU (x reports is_cuda): bf16 GEMMs with dense token routing by a
    router on x qualify, and so do fp32 weights under a bf16 autocast; fp32 without autocast, a weight in another
    dtype, top-k, a router on A's output, expert dropout and fixed routing do not. An init offset (R-LoRA, SVD init)
    qualifies while its stacked rank 2r fits the kernels (<= 64)."""
    lay, f32 = make_layer(dtype=torch.bfloat16), make_layer()
    others = [make_layer(dtype=torch.bfloat16, **extra) for extra in
              ({"top_k": 2}, {"router_input": "lora_a"}, {"expert_dropout": True}, {"init_b": "rlora", "r": 33})]
    x = torch.randn(4, 48, dtype=torch.bfloat16)
    monkeypatch.setenv("HYDRALORA_FUSED", "1")
    monkeypatch.setattr(fops, "HAS_TRITON", True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert planned(lay, x) and fused_supported(x, *params(lay))
    assert planned(lay, x, torch.zeros(4, 40, dtype=torch.bfloat16))
    assert not planned(lay, x, torch.zeros(4, 40))  # result in another dtype
    assert not fused_supported(x.float(), *params(lay))
    assert not planned(f32, x)
    A, G, B = params(lay)
    assert not fused_supported(x, A, G.float(), B)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert planned(f32, x.float())
    for other in others:
        assert not planned(other, x), other.hconfig["default"]
    assert planned(make_layer(dtype=torch.bfloat16, init_b="rlora", r=32), x)
    hydralora.set_routing(nn.Sequential(lay), "fixed", "mean")
    assert not planned(lay, x)


def test_fused_path_steps_aside_under_torch_compile(monkeypatch):
    """Inside a torch.compile trace the layer keeps its eager formulation (the kernel launch cache is not
    traceable), and so it does for an empty input."""
    force_dispatch(monkeypatch)
    layer = make_layer()
    x = torch.randn(4, 48)
    assert planned(layer, x) and not planned(layer, x[:0])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not planned(layer, x)


def test_compiled_layer_traces_the_eager_path_with_the_dispatch_on(monkeypatch):
    """torch.compile (Dynamo, eager backend) of a layer whose dispatch would take the op: the trace sees the eager
    formulation, makes no plan, and gives the eager outputs and gradients."""
    force_dispatch(monkeypatch)
    layer = make_layer().train()
    x = torch.randn(2, 3, 48, requires_grad=True)
    dy = torch.randn(2, 3, 40)
    monkeypatch.setenv("HYDRALORA_FUSED", "0")
    ref_out, ref_g = run_reference(layer, x, dy)
    monkeypatch.setenv("HYDRALORA_FUSED", "1")
    layer._fused_plans.clear()
    torch._dynamo.reset()
    out, g = run_reference(torch.compile(layer, backend="eager"), x, dy)
    assert not layer._fused_plans
    torch.testing.assert_close(out, ref_out)
    for a_, b_ in zip(g, ref_g):
        torch.testing.assert_close(a_, b_)


def test_fused_switch_values(monkeypatch):
    monkeypatch.delenv("HYDRALORA_FUSED", raising=False)
    assert dispatch.fused_enabled()  # auto: every call the kernels support
    monkeypatch.setenv("HYDRALORA_FUSED", "1")
    assert dispatch.fused_enabled()
    monkeypatch.setenv("HYDRALORA_FUSED", "0")
    assert not dispatch.fused_enabled()
    monkeypatch.setenv("HYDRALORA_FUSED", "yes")
    with pytest.raises(ValueError, match="HYDRALORA_FUSED='yes'.*auto, 0, 1"):
        dispatch.fused_enabled()
    monkeypatch.setattr(dispatch, "kernel_device", lambda x: True)
    with pytest.raises(ValueError, match="HYDRALORA_FUSED='yes'"):  # a layer call on a kernel device reads it too
        make_layer()(torch.randn(2, 48))


def test_dispatch_is_decided_once_per_layer_state(monkeypatch):
    """The plan is made on the first call for a state and reused by later calls; a new training mode, dtype,
    autocast state, switch value, routing mode, a cast and a new adapter each make a new one."""
    force_dispatch(monkeypatch)
    made = []
    real = dispatch.plan_fused
    monkeypatch.setattr(hlayer, "plan_fused", lambda *a, **k: made.append(1) or real(*a, **k))
    layer = make_layer().eval()
    x = torch.randn(2, 3, 48)

    def plans_made(call, x=x, times=3):
        made.clear()
        with torch.no_grad():
            for _ in range(times):
                call(x)
        return len(made)

    assert plans_made(layer) == 1  # the base inside the op: one plan, reused
    assert plans_made(lambda x: layer.train()(x)) == 1
    assert plans_made(lambda x: layer.eval()(x)) == 0  # the eval plan is still held
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plans_made(layer) == 1
    layer.double()  # a cast drops every plan
    assert plans_made(layer, x.double()) == 1
    monkeypatch.setenv("HYDRALORA_FUSED", "0")
    assert plans_made(layer, x.double()) == 2  # no plan for the base form nor for the delta form: both eager
    monkeypatch.setenv("HYDRALORA_FUSED", "1")
    hydralora.set_routing(nn.Sequential(layer), "fixed", "mean")
    assert plans_made(layer, x.double()) == 1  # (the rules are forced to pass here: a plan, not eager)
    hydralora.set_routing(nn.Sequential(layer), "token")
    assert plans_made(layer, x.double()) == 0
    layer.update_layer("other", HydraLoraConfig(r=2, num_experts=2, target_modules=["x"]))
    layer.double().set_adapter("other")
    assert plans_made(layer, x.double()) == 1


def test_cached_plan_follows_replaced_or_recast_weights(monkeypatch):
    """A plan holds the adapter's parameters: weights loaded with load_state_dict(assign=True) (new Parameter
    objects) or recast through .data are what the next call uses, as the eager path does."""
    force_dispatch(monkeypatch)
    layer = make_layer().eval()
    x = torch.randn(2, 3, 48)

    def both():
        with torch.no_grad():
            out = layer(x.to(layer.hydralora_A["default"].dtype))
            monkeypatch.setenv("HYDRALORA_FUSED", "0")
            ref = layer(x.to(layer.hydralora_A["default"].dtype))
            monkeypatch.setenv("HYDRALORA_FUSED", "1")
        return out, ref

    both()
    sd = {k: (v * 2 if "hydralora" in k else v) for k, v in layer.state_dict().items()}
    layer.load_state_dict(sd, assign=True)
    out, ref = both()
    torch.testing.assert_close(out, ref)
    assert layer._fused_plan(x).A is layer.hydralora_A["default"]
    for p in layer.parameters():
        p.data = p.data.double()
    out, ref = both()
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)  # (the op keeps h and the gate in fp32)


def test_cached_plan_follows_a_cast_of_the_adapter(monkeypatch):
    """A plan holds the adapter's parameters: after the layer is cast, calls use the new dtype (the plan is made
    again), and the results equal the eager path's."""
    force_dispatch(monkeypatch)
    layer = make_layer().eval()
    x = torch.randn(2, 3, 48)
    with torch.no_grad():
        layer(x)
        layer.to(torch.float64)
        out = layer(x.double())
        monkeypatch.setenv("HYDRALORA_FUSED", "0")
        ref = layer(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_layer_dispatch_plumbing(monkeypatch):
    """The layer's plumbing of the fast path, on the CPU: with the kernels' rules forced to pass, hydra_delta goes
    through the fused op with the base layer's output (PyTorch backend) and the layer's output, gradients, balance
    loss and recorded usage are the eager path's."""
    calls = []
    real = dispatch.fused_apply
    monkeypatch.setattr(dispatch, "fused_apply", lambda *a, **k: calls.append(a[1] is not None) or real(*a, **k))
    force_dispatch(monkeypatch)
    layer = make_layer(temp=0.5, balance_loss_coef=0.1).train()
    # A hook keeps base_layer(x) + delta (a plain base would run inside hydra_linear_fused: tested below).
    layer.base_layer.register_forward_hook(lambda module, args, output: None)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 48, generator=gen).requires_grad_()
    dy = torch.randn(2, 6, 40, generator=gen)
    res = {}
    for switch in ("0", "1"):
        monkeypatch.setenv("HYDRALORA_FUSED", switch)
        layer.reset_usage()
        out, g = run_reference(layer, x, dy)
        res[switch] = (out, g, layer.last_aux_loss["default"].detach(), layer._usage("default"))
    assert calls == [True]  # one call, given the base output (the delta form)
    (o0, g0, aux0, u0), (o1, g1, aux1, u1) = res["0"], res["1"]
    assert rel(o1, o0) < 1e-5 and rel(aux1, aux0) < 1e-5 and torch.allclose(u1, u0, atol=1e-6)
    for name, a, b in zip(["x", "A", "W_g", "B"], g1, g0):
        assert rel(a, b) < 1e-5, name


@pytest.mark.parametrize("init_b,own_base,amp", [("svd", False, False), ("svd", True, False),
                                                 ("rlora", True, False), ("svd", True, True)])
def test_layer_with_an_init_offset_runs_the_fused_op_on_stacked_factors(init_b, own_base, amp, monkeypatch):
    """An adapter with a frozen init offset (update sum_i w_i (B_i A - B0_i A0)) runs the fused op (PyTorch backend,
    forced on the CPU) on A and B stacked with the offset: the eager layer's output, gradients and usage in a train
    step (fp32 weights under a bf16 autocast too), and its output in no-grad calls, small (decode) and large, whose
    stacked factors are built once, also under torch.inference_mode (which a first generate may run before training)."""
    layer = make_layer(temp=0.1, init_b=init_b, init_a="svd" if init_b == "svd" else "kaiming").train()
    assert layer._init_offset("default") is not None
    if not own_base:  # a hooked base keeps base_layer(x) + delta
        layer.base_layer.register_forward_hook(lambda module, args, output: None)
    ranks = []
    real = dispatch.fused_apply

    def stacked_rank(*a):  # A's rows, and the offset's A0 rows where the op stacks them itself (graph calls)
        ranks.append(a[4].shape[0] + (a[12][0].shape[0] if a[12] is not None else 0))
        return real(*a)

    monkeypatch.setattr(dispatch, "fused_apply", stacked_rank)
    force_dispatch(monkeypatch)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 48, generator=gen).to(torch.bfloat16 if amp else torch.float32).requires_grad_()
    dy = torch.randn(2, 6, 40, generator=gen)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        layer.eval()(x)  # the offset's constants made here serve the training calls below
    layer.train()
    ranks.clear()
    res = {}
    for switch in ("0", "1"):
        monkeypatch.setenv("HYDRALORA_FUSED", switch)
        layer.reset_usage()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out, g = run_reference(layer, x, dy)
        res[switch] = (out, g, layer._usage("default"))
    assert ranks == [8], ranks  # one fused call, on the stacked rank 2r
    (o0, g0, u0), (o1, g1, u1) = res["0"], res["1"]
    tol = 2e-2 if amp else 1e-5
    assert rel(o1, o0) < tol and torch.allclose(u1, u0, atol=1e-2 if amp else 1e-6)
    for name, a, b in zip(["x", "A", "W_g", "B"], g1, g0):
        assert a.shape == b.shape and a.dtype == b.dtype and rel(a, b) < tol, name
    assert all(t.grad is None for t in layer.hydralora_init.values())
    layer.eval()
    for T in (1, 40):  # a decode-sized call (one projection-and-mix) and the general no-grad path
        xe = torch.randn(2, T, 48, generator=gen)
        outs = {}
        for switch in ("0", "1"):
            monkeypatch.setenv("HYDRALORA_FUSED", switch)
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                outs[switch] = layer(xe)
        assert rel(outs["1"], outs["0"]) < tol, T
    assert ranks == [8, 8, 8], ranks
    if not amp:  # (under autocast the op casts the stacked factors per call)
        kept = layer._weight_cache["default.AB+offset"][1]
        with torch.inference_mode():
            layer(xe)
        assert layer._weight_cache["default.AB+offset"][1] is kept


@pytest.mark.parametrize("hooked", [False, True])
def test_small_calls_without_a_graph_take_one_projection_and_mix(hooked, monkeypatch):
    """Eval calls without an autograd graph of at most SMALL_CALL_TOKENS tokens (decode steps) go through proj_mix
    (the PyTorch backend's, forced on the CPU): the eager path's output and usage statistics (padding tokens left out),
    with the base inside the op or, on a hooked base, added to the base's output, which stays untouched. A larger
    call takes the general path."""
    torch.manual_seed(0)
    layer = make_layer(k=48, d=40, r=4, n=3, temp=0.7).eval()
    layer.base_layer.bias = nn.Parameter(torch.randn(40), requires_grad=False)
    seen = []
    if hooked:
        # the base's output itself and a copy made when the hook ran: the op must not write into the former
        layer.base_layer.register_forward_hook(lambda module, args, output: seen.append((output, output.clone())))
    mixes = []
    real_mix = reference.proj_mix
    monkeypatch.setattr(reference, "proj_mix", lambda *a: mixes.append(a[0].shape[0]) or real_mix(*a))
    n_max = fops.SMALL_CALL_TOKENS
    for B, T in ((1, 1), (4, 1), (2, n_max // 2), (1, n_max + 1)):
        x = torch.randn(B, T, 48)
        layer._token_mask = (torch.arange(B * T).view(B, T) % 3 != 1)
        runs = {}
        for switch in ("0", "1"):
            switch_dispatch(monkeypatch, switch)
            layer.reset_usage()
            seen.clear()
            with torch.inference_mode():
                out = layer(x)
            if hooked and switch == "1":  # (the eager reference may update it in place: see HydraLoraLayer._mix)
                (base_out, at_hook), = seen
                assert torch.equal(base_out, at_hook), "the small call wrote into the base's output"
            runs[switch] = (out, layer._usage("default"))
        (o0, u0), (o1, u1) = runs["0"], runs["1"]
        torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(u1, u0, rtol=1e-5, atol=1e-6)
    assert mixes == [1, 4, n_max], mixes


@pytest.mark.parametrize("hooked", [False, True])
def test_sequence_routing_decode_steps_take_the_small_call_with_the_prompts_gate(hooked, monkeypatch):
    """Under sequence routing the prompt's call (eager) keeps each sequence's gate; decode-sized calls that reuse it
    (no graph, at most SMALL_CALL_TOKENS tokens) run the small-call kernel (the PyTorch backend's, forced on the
    CPU) with that gate given: the eager path's output and usage statistics, padding left out. Larger calls and
    calls that do not reuse the gate stay eager."""
    torch.manual_seed(0)
    layer = make_layer(k=48, d=40, r=4, n=3, temp=0.7).eval()
    hydralora.set_routing(nn.Sequential(layer), "sequence")
    if hooked:
        layer.base_layer.register_forward_hook(lambda module, args, output: None)
    given = []
    real_mix = reference.proj_mix
    monkeypatch.setattr(reference, "proj_mix",
                        lambda *a: given.append((a[0].shape[0], a[-1] is not None)) or real_mix(*a))
    prompt = torch.randn(4, 6, 48)
    steps = [(torch.randn(4, 1, 48), True), (torch.randn(4, 3, 48), True), (torch.randn(4, 9, 48), True),
             (torch.randn(4, 1, 48), False)]
    runs = {}
    for switch in ("0", "1"):
        switch_dispatch(monkeypatch, switch)
        layer.reset_usage()
        layer._sequence_gate.clear()
        outs = []
        with torch.inference_mode():
            layer._reuse_sequence_gate = False
            layer._token_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]] * 2)  # left padding
            outs.append(layer(prompt))
            for x, reuse in steps:
                layer._reuse_sequence_gate = reuse
                layer._token_mask = torch.ones(x.shape[:2], dtype=torch.long)
                outs.append(layer(x))
        runs[switch] = (outs, layer._usage("default"))
    (o0, u0), (o1, u1) = runs["0"], runs["1"]
    for a, b in zip(o1, o0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u1, u0, rtol=1e-5, atol=1e-6)
    # the two reusing calls of at most 32 tokens, with the gate given; the prompt, the 36-token call and the call
    # that does not reuse the gate stay eager
    assert given == [(4, True), (12, True)], given


# ---------------------------------------------------------------------------------------------------------------
# GPU: Triton kernels
SHAPES = [(37, 200, 96, 8, 3), (256, 512, 384, 8, 3), (1024, 1024, 640, 16, 4), (1, 576, 576, 8, 3)]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("own_base", [False, True])
def test_triton_matches_layer(shape, dtype, own_base):
    T, k, d, r, n = shape
    layer = make_layer(k=k, d=d, r=r, n=n, temp=0.7, dtype=dtype, device="cuda").train()
    x = torch.randn(T, k, device="cuda", dtype=dtype).requires_grad_()
    dy = torch.randn(T, d, device="cuda", dtype=dtype)
    ref_out, ref_g = run_reference(layer, x, dy, aux_coef=0.1)
    out, g, _, _ = run_fused(layer, x, dy, aux_coef=0.1, backend="triton", own_base=own_base)
    assert rel(out, ref_out) < 1e-2
    for name, a, b in zip(["x", "A", "W_g", "B"], g, ref_g):
        assert rel(a, b) < 2e-2, name


@needs_gpu
@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("own_base", [False, True])
def test_triton_dropout_matches_torch_backend(shape, own_base):
    """Same seed, same mask: the Triton kernels compute the function the PyTorch backend computes. The reference is
    the PyTorch backend in fp32 on the same (bf16) values: in bf16 it rounds h and the router logits to bf16 where
    the kernels keep fp32, and at T = K = 1024 that alone moved W_g's gradient by 2.2% (a bf16-against-bf16
    comparison failed there on the H200 with one seed and passed with another)."""
    import copy

    T, k, d, r, n = shape
    layer = make_layer(k=k, d=d, r=r, n=n, p=0.1, dtype=torch.bfloat16, device="cuda").train()
    ref = copy.deepcopy(layer).float()
    x = torch.randn(T, k, device="cuda", dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    x32 = x.detach().float().requires_grad_()
    torch.manual_seed(7)
    o1, g1, _, _ = run_fused(ref, x32, dy.float(), backend="torch", own_base=own_base, p=0.1, training=True)
    torch.manual_seed(7)
    o2, g2, _, _ = run_fused(layer, x, dy, backend="triton", own_base=own_base, p=0.1, training=True)
    assert rel(o2, o1) < 1e-2
    for name, a, b in zip(["x", "A", "W_g", "B"], g2, g1):
        assert rel(a, b) < 2e-2, name
    torch.manual_seed(8)  # the mask matters: another seed, other gradients
    assert rel(run_fused(layer, x, dy, backend="triton", own_base=own_base, p=0.1, training=True)[1][1], g2[1]) > 1e-2


@needs_gpu
@pytest.mark.parametrize("own_base", [False, True])
def test_triton_under_autocast_with_fp32_adapter(own_base, monkeypatch):
    """What Trainer(bf16=True) runs: a bf16 base, fp32 adapter weights, autocast on. The layer dispatches to the
    kernels and matches its eager path."""
    T, k, d, r, n = SHAPES[1]
    layer = make_layer(k=k, d=d, r=r, n=n, temp=0.7, device="cuda").train()
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(T, k, device="cuda", dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        monkeypatch.setenv("HYDRALORA_FUSED", "1")
        assert planned(layer, x, layer.base_layer(x))
        monkeypatch.setenv("HYDRALORA_FUSED", "0")
        ref_out, ref_g = run_reference(layer, x, dy, aux_coef=0.1)
        out, g, _, _ = run_fused(layer, x, dy, aux_coef=0.1, backend="triton", own_base=own_base)
    assert rel(out, ref_out) < 1e-2
    for name, a, b in zip(["x", "A", "W_g", "B"], g, ref_g):
        assert a.dtype == b.dtype and rel(a, b) < 2e-2, name


@needs_gpu
@pytest.mark.parametrize("amp,init", [(False, "zeros"), (True, "zeros"), (False, "svd"), (True, "svd")])
def test_layer_dispatch_on_gpu_matches_eager(amp, init, monkeypatch):
    """HydraLinear's own forward with the dispatch on (HYDRALORA_FUSED=1) and off, each against a float64 copy of the
    layer: the fused path must be about as accurate as the eager path it replaces. (Comparing the two bf16 paths
    with each other measured rel 0.0248 on x's gradient on an H100 and 0.0258 on W_g's on an H200: two bf16 errors
    of ~1-2% each, not a fault of either; the float64 reference tells them apart.)"""
    import copy

    T, k, d, r, n = SHAPES[2]
    offset = dict(init_b="svd", init_a="svd") if init == "svd" else {}  # SVD init: the op runs on stacked factors
    layer = make_layer(k=k, d=d, r=r, n=n, temp=0.7, device="cuda", dtype=torch.float32 if amp else torch.bfloat16,
                       **offset).train()
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(T, k, device="cuda", dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    res, usage = {}, {}
    for switch in ("0", "1"):
        monkeypatch.setenv("HYDRALORA_FUSED", switch)
        layer.reset_usage()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            assert planned(layer, x, layer.base_layer(x)) == (switch == "1")
            res[switch] = run_reference(layer, x, dy)
        usage[switch] = layer._usage("default")
        assert float(layer.usage_acc["default"][-1]) + layer._usage_tokens_host.get("default", 0.0) == T
    # the fused path's usage comes from the kernel's atomics: the same mean gate as the eager statistics
    torch.testing.assert_close(usage["1"], usage["0"], rtol=0, atol=1e-2)
    monkeypatch.setenv("HYDRALORA_FUSED", "0")
    x64 = x.detach().double().requires_grad_()
    res["fp64"] = run_reference(copy.deepcopy(layer).double(), x64, dy.double())
    (o0, g0), (o1, g1), (o_ref, g_ref) = res["0"], res["1"], res["fp64"]
    assert rel(o1, o_ref) <= 2 * rel(o0, o_ref) + 2e-3
    for name, fused, eager, ref in zip(["x", "A", "W_g", "B"], g1, g0, g_ref):
        assert fused.dtype == eager.dtype
        e_fused, e_eager = rel(fused, ref), rel(eager, ref)
        assert e_fused < 3e-2 and e_fused <= 2 * e_eager + 2e-3, (name, e_fused, e_eager)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "token-mask"])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_runs_a_plain_linear_base_inside_the_op_where_the_dispatch_applies(bias, masked, monkeypatch):
    """Where the fused dispatch applies (forced here on the CPU, where the op's PyTorch backend runs) and the base is a
    plain frozen nn.Linear, HydraLinear runs base and adapter in one op (hydra_linear_fused's path): the same outputs,
    gradients and usage statistics (counted inside the op, padding tokens left out) as base_layer(x) + delta. A
    hooked base stays on base_layer(x) + delta."""
    torch.manual_seed(0)
    layer = make_layer(k=48, d=40, r=4, n=3, temp=0.7).train()
    if bias:
        layer.base_layer.bias = nn.Parameter(torch.randn(40), requires_grad=False)
    if masked:
        layer._token_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])  # (B, T), as the model hook sets it
    x = torch.randn(2, 5, 48, requires_grad=True)
    dy = torch.randn(2, 5, 40)
    ref_out, ref_g = run_reference(layer, x, dy)
    ref_usage = layer._usage("default").clone()
    calls = []
    real = dispatch.fused_apply
    force_dispatch(monkeypatch)
    monkeypatch.setattr(dispatch, "fused_apply", lambda *a: calls.append(a[2] is not None) or real(*a))
    layer.reset_usage()
    counted = []
    monkeypatch.setattr(type(layer), "_count_usage", lambda *a: counted.append(1))
    for _ in range(2):  # two calls: the counts add up
        out, g = run_reference(layer, x, dy)
    assert calls == [True, True], "the layer did not take the fused base+adapter op"
    assert not counted  # the op counted the usage, not the layer's eager statistics
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer._usage("default"), ref_usage)
    assert float(layer.usage_acc["default"][-1]) + layer._usage_tokens_host.get("default", 0.0) == (14 if masked else 20)
    calls.clear()
    hook = layer.base_layer.register_forward_hook(lambda module, args, output: None)
    run_reference(layer, x, dy)
    hook.remove()
    assert calls == [False]  # a base with hooks is called as base_layer(x); the delta op runs after it
    calls.clear()
    layer.base_layer.weight.requires_grad_(True)  # unfrozen after the plan was made: its gradient must come
    out, g = run_reference(layer, x, dy)
    assert calls == [False] and layer.base_layer.weight.grad is not None


@pytest.mark.parametrize("hooked", [False, True])
def test_no_grad_fused_calls_reuse_the_flat_B_until_B_changes(hooked, monkeypatch):
    """Without an autograd graph (generation) the fused op gets B's flat copy from the layer's weight cache: built
    once, reused by later calls, rebuilt after B changes in place; outputs stay the eager layer's. With grad enabled
    the op takes its own view of B."""
    torch.manual_seed(0)
    layer = make_layer(k=48, d=40, r=4, n=3).eval()
    if hooked:
        layer.base_layer.register_forward_hook(lambda module, args, output: None)  # the delta form of the op
    x = torch.randn(2, 5, 48)
    force_dispatch(monkeypatch)
    built = []
    real_flat = hlayer._flat_B
    monkeypatch.setattr(hlayer, "_flat_B", lambda B: built.append(1) or real_flat(B))

    def eager():
        monkeypatch.setenv("HYDRALORA_FUSED", "0")
        with torch.no_grad():
            out = layer(x)
        monkeypatch.setenv("HYDRALORA_FUSED", "1")
        return out

    with torch.no_grad():
        outs = [layer(x) for _ in range(3)]
    assert len(built) == 1
    for out in outs:
        torch.testing.assert_close(out, eager(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.hydralora_B["default"].mul_(-2.0)
        out = layer(x)
    assert len(built) == 2
    torch.testing.assert_close(out, eager(), rtol=1e-5, atol=1e-5)
    layer(x)  # grad enabled: the op takes its own view of B (training changes B every step), not the cache's
    layer(x)
    assert len(built) == 2


def test_fused_op_checks_its_usage_arguments():
    layer = make_layer()
    A, G, B = params(layer)
    x = torch.randn(2, 5, 48)
    res = layer.base_layer(x)
    with pytest.raises(ValueError, match=r"usage: expected a contiguous \(4,\) float32"):
        hydra_delta_fused(x, A, G, B, res, 2.0, usage=torch.zeros(3))
    with pytest.raises(ValueError, match="token_weights: expected 10 values"):
        hydra_delta_fused(x, A, G, B, res, 2.0, usage=torch.zeros(4), token_weights=torch.ones(2, 4))
    usage = torch.zeros(4)
    with torch.no_grad():
        _, _, gate = hydra_delta_fused(x, A, G, B, res, 2.0, usage=usage, token_weights=torch.tensor([1, 0] * 5))
    torch.testing.assert_close(usage[:3], gate.reshape(10, 3)[::2].sum(0))
    assert usage[3] == 5


class _FakeKernel:
    """Stands in for an autotuned Triton kernel: kernel[grid](...) is the autotuner's path and returns a compiled
    kernel whose [grid](...) is Triton's runner and, with `launcher`, whose .run(...) is its launcher (the two direct
    launches launch.launch caches)."""

    def __init__(self, direct_fails=False, launcher=False):
        self.fn = type("fn", (), {"__name__": "_fake", "arg_names": ["X", "T", "K", "BT"]})()
        self.best_config = type("cfg", (), {"kwargs": {"BT": 16}})()
        self.tuned, self.direct, self.launched, self.direct_fails = [], [], [], direct_fails
        outer = self

        class Compiled:
            def __getitem__(self, grid):
                def run(*args):
                    if outer.direct_fails:
                        raise TypeError("runner signature changed")
                    outer.direct.append((grid, args))
                return run

        self.compiled = Compiled()
        if launcher:
            self.compiled.function, self.compiled.packed_metadata = "fn-handle", (4, 1, 0)
            self.compiled.run = lambda *a: self.launched.append(a)

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.tuned.append((grid({**dict(zip(self.fn.arg_names, args)), **kw, "BT": 16}), args))
            return self.compiled
        return run


@pytest.mark.parametrize("direct_fails", [False, True])
def test_launch_caches_the_compiled_kernel_and_falls_back_when_it_cannot(direct_fails, monkeypatch):
    """launch.launch: the first call for a key goes through the autotuner, later ones launch the cached compiled
    kernel with every argument in order (the config's included); a new alignment or divisibility is a new key; a
    direct launch that fails warns, launches through the autotuner and stops caching."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("HYDRALORA_AUTOTUNE", raising=False)
    monkeypatch.setattr(launch, "_COMPILED", {})
    monkeypatch.setattr(launch, "_DIRECT", {"ok": True})
    k = _FakeKernel(direct_fails)
    grid = lambda META: (64 // META["BT"],)  # noqa: E731  (T from the closure, as the op's grids take it)
    x = torch.zeros(64)
    launch.launch(k, grid, (x, 64, 32), {}, {"BT": 16}, (32,))
    assert len(k.tuned) == 1 and not k.direct
    if direct_fails:
        with pytest.warns(RuntimeWarning, match="direct Triton launch failed"):
            launch.launch(k, grid, (x, 64, 32), {}, {"BT": 16}, (32,))
        assert len(k.tuned) == 2 and not launch._COMPILED and launch._DIRECT["ok"] is False
        launch.launch(k, grid, (x, 64, 32), {}, {"BT": 16}, (32,))
        assert len(k.tuned) == 3  # no caching any more
        return
    launch.launch(k, grid, (x, 64, 32), {}, {"BT": 16}, (32,))
    assert len(k.tuned) == 1 and k.direct == [((4, 1, 1), (x, 64, 32, 16))]
    launch.launch(k, grid, (x[1:], 64, 32), {}, {"BT": 16}, (32,))  # 4 bytes off 16-byte alignment: a new key
    launch.launch(k, grid, (x, 64, 33), {}, {"BT": 16}, (32,))  # K no longer divisible by 16: a new key
    assert len(k.tuned) == 3 and len(launch._COMPILED) == 3


class _Hooks:
    def __init__(self, calls):
        self.calls = calls


@pytest.mark.parametrize("hooked", [False, True])
def test_cached_launch_calls_the_launcher_unless_a_launch_hook_is_set(hooked, monkeypatch):
    """Without launch hooks a cached launch calls the compiled kernel's launcher with what Triton's runner passes it
    (grid, the device's current stream, function, packed metadata, no launch metadata, no hooks, the arguments with
    tensors as data pointers);
    with a hook registered (a profiler) it goes through Triton's runner, which calls the hooks."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("HYDRALORA_AUTOTUNE", raising=False)
    monkeypatch.setattr(launch, "_COMPILED", {})
    monkeypatch.setattr(launch, "_DIRECT", {"ok": True})
    monkeypatch.setattr(launch, "_raw_stream", lambda device: 1000 + (device or 0))
    runtime = type("rt", (), {"launch_enter_hook": _Hooks([print] if hooked else []),
                              "launch_exit_hook": _Hooks([])})()
    monkeypatch.setattr(launch, "_knobs", type("knobs", (), {"runtime": runtime})())
    k = _FakeKernel(launcher=True)
    grid = lambda META: (64 // META["BT"], 2)  # noqa: E731
    x = torch.zeros(64)
    for _ in range(3):
        launch.launch(k, grid, (x, 64, 32), {}, {"BT": 16}, (32,))
    assert len(k.tuned) == 1
    if hooked:
        assert not k.launched and k.direct == [((4, 2, 1), (x, 64, 32, 16))] * 2
    else:
        assert not k.direct
        # tensors as their data pointers (the launcher takes an int as is; a tensor costs a call and a driver query)
        assert k.launched == [(4, 2, 1, 1000, "fn-handle", (4, 1, 0), None, None, None, x.data_ptr(), 64, 32, 16)] * 2


def test_site_launch_keeps_the_direct_launch_for_aligned_pointers_only(monkeypatch):
    """A call site's short key keeps the direct launch of the kernel the full key selected, once every pointer is
    16-byte aligned; _site_launch then calls the launcher with the site's flat arguments and the config's constexprs.
    It declines (the full path runs) with a pointer off 16-byte alignment, a launch hook set, or a launcher that fails
    (then it forgets every entry)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("HYDRALORA_AUTOTUNE", raising=False)
    for name, value in [("_COMPILED", {}), ("_SITES", {}), ("_DIRECT", {"ok": True}),
                        ("_raw_stream", lambda device: 1000 + (device or 0))]:
        monkeypatch.setattr(launch, name, value)
    hooks = _Hooks([])
    runtime = type("rt", (), {"launch_enter_hook": hooks, "launch_exit_hook": _Hooks([])})()
    monkeypatch.setattr(launch, "_knobs", type("knobs", (), {"runtime": runtime})())
    k = _FakeKernel(launcher=True)
    grid = lambda META: (64 // META["BT"],)  # noqa: E731
    x = torch.zeros(64)
    launch.launch(k, grid, (x[1:], 64, 32), {}, {"BT": 16}, (32,), ("unaligned",))
    launch.launch(k, grid, (x[1:], 64, 32), {}, {"BT": 16}, (32,), ("unaligned",))  # a cached full-key launch
    assert "unaligned" not in {s[0] for s in launch._SITES}
    launch.launch(k, grid, (x, 64, 32), {}, {"BT": 16}, (32,), ("aligned",))
    assert list(launch._SITES) == [("aligned",)] and launch._SITES[("aligned",)][3]["BT"] == 16
    hit, ptrs = launch._SITES[("aligned",)], (x.data_ptr(),)
    before = len(k.tuned)
    assert launch._site_launch(hit, 4, 1, 0, ptrs, (x.data_ptr(), 64, 32))
    assert len(k.tuned) == before
    assert k.launched[-1] == (4, 1, 1, 1000, "fn-handle", (4, 1, 0), None, None, None, x.data_ptr(), 64, 32, 16)
    assert not launch._site_launch(hit, 4, 1, 0, (x[1:].data_ptr(),), (x[1:].data_ptr(), 64, 32))  # 4 bytes off
    hooks.calls = [print]  # a profiler's hook: Triton's runner must call it
    assert not launch._site_launch(hit, 4, 1, 0, ptrs, (x.data_ptr(), 64, 32))
    hooks.calls = []

    def broken(*a):
        raise TypeError("launcher signature changed")

    assert not launch._site_launch((broken, *hit[1:]), 4, 1, 0, ptrs, (x.data_ptr(), 64, 32))
    assert not launch._SITES


def test_hooks_idle_reads_triton_launch_hooks(monkeypatch):
    """hooks_idle: empty hook chains or None are idle; a registered hook or a plain callable (older Triton) is not;
    without Triton's knobs the runner is used."""
    def knobs(enter, exit_):
        return type("knobs", (), {"runtime": type("rt", (), {"launch_enter_hook": enter, "launch_exit_hook": exit_})()})()
    for enter, exit_, idle in [(_Hooks([]), _Hooks([]), True), (None, None, True), (_Hooks([print]), None, False),
                               (None, _Hooks([print]), False), (print, None, False)]:
        monkeypatch.setattr(launch, "_knobs", knobs(enter, exit_))
        assert launch.hooks_idle() is idle, (enter, exit_)
    monkeypatch.setattr(launch, "_knobs", None)
    assert launch.hooks_idle() is False


def test_int_helpers_match_triton():
    """pow2 / cdiv replace triton.next_power_of_2 / triton.cdiv on the host (same values, cheaper calls)."""
    for n in [1, 2, 3, 7, 8, 9, 16, 17, 1000, 1024, 1025, 8192, 8193]:
        assert launch.pow2(n) == 2 ** math.ceil(math.log2(n))
        for b in (1, 16, 32, 64, 128):
            assert launch.cdiv(n, b) == math.ceil(n / b)


def _cuda_op_inputs(T, K, d, R, N, seed):
    """Random bf16 x (T, K), A (R, K), W_g (N, K), B (N, d, R) on the GPU, for the fused op."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g).to("cuda", torch.bfloat16)
    A = (torch.randn(R, K, generator=g) * 0.1).to("cuda", torch.bfloat16)
    G = (torch.randn(N, K, generator=g) * 0.3).to("cuda", torch.bfloat16)
    B = (torch.randn(N, d, R, generator=g) * 0.1).to("cuda", torch.bfloat16)
    return x, A, G, B


@needs_gpu
@pytest.mark.parametrize("masked", [False, True])
def test_autotuned_first_call_counts_usage_once(masked, monkeypatch):
    """The first call for a new shape autotunes: the autotuner runs every config several times, and the usage
    accumulator must come out counted once (restore_value), as the PyTorch backend counts it."""
    monkeypatch.delenv("HYDRALORA_AUTOTUNE", raising=False)  # (the GPU suite runs the other tests without tuning)
    T, K, d, R, N = 384, 320 + 16 * masked, 64, 8, 3  # K used by no other test: this call tunes
    x, A, G, B = _cuda_op_inputs(T, K, d, R, N, seed=11)
    res = torch.zeros(T, d, device="cuda", dtype=torch.bfloat16)
    w = (torch.arange(T, device="cuda") % 4 != 0).long() if masked else None
    usage = {}
    for be in ("triton", "torch"):
        usage[be] = torch.zeros(N + 1, device="cuda")
        with torch.no_grad():
            hydra_delta_fused(x, A, G, B, res, 2.0, backend=be, usage=usage[be], token_weights=w)
    torch.testing.assert_close(usage["triton"], usage["torch"], rtol=2e-3, atol=1e-2)
    assert float(usage["triton"][:N].sum()) == pytest.approx(T * 3 / 4 if masked else T, rel=1e-3)


@needs_gpu
def test_cached_launch_computes_what_the_first_launch_computed(monkeypatch):
    """The first call for a key autotunes and compiles; later calls launch the cached compiled kernel directly
    (launch.launch). Both must compute the PyTorch backend's function with the same dropout seed, and an input that is
    not 16-byte aligned must not reuse a kernel compiled for aligned pointers."""
    monkeypatch.delenv("HYDRALORA_AUTOTUNE", raising=False)
    T, K, d, R, N = 256, 128, 96, 8, 3
    launch._COMPILED.clear()
    launch._SITES.clear()
    for i, offset in enumerate([0, 0, 0, 3]):  # offset: bf16 elements before x's first (3 -> 6 bytes off)
        g = torch.Generator().manual_seed(i)
        x = torch.randn(T * K + offset, generator=g).to("cuda", torch.bfloat16)[offset:].view(T, K)
        A = (torch.randn(R, K, generator=g) * 0.1).to("cuda", torch.bfloat16)
        G = (torch.randn(N, K, generator=g) * 0.3).to("cuda", torch.bfloat16)
        B = (torch.randn(N, d, R, generator=g) * 0.1).to("cuda", torch.bfloat16)
        res = torch.randn(T, d, generator=g).to("cuda", torch.bfloat16)
        dy = torch.randn(T, d, generator=g).to("cuda", torch.bfloat16)
        outs = {}
        for be in ("torch", "triton"):
            # x.detach() keeps x's storage offset (a clone would be a fresh, aligned allocation)
            leaves = [x.detach().requires_grad_(), *(t.detach().clone().requires_grad_() for t in (A, G, B))]
            torch.manual_seed(100 + i)  # the same dropout seed for both backends
            out, raw, gate = hydra_delta_fused(*leaves[:3], leaves[3], res, 2.0, dropout_p=0.1, training=True,
                                               temperature=0.7, backend=be)
            (out.float() * dy.float()).sum().backward()
            outs[be] = [out, *(t.grad for t in leaves)]
        for name, a, b in zip(["out", "x", "A", "W_g", "B"], outs["triton"], outs["torch"]):
            assert rel(a, b) < 2e-2, (i, name)
    kinds = [k for k in launch._COMPILED if k[0] == "_proj_fwd"]
    assert len(kinds) == 2  # aligned and unaligned x: two compiled variants, not one reused for both


@needs_gpu
def test_triton_keep_mask_is_the_torch_mask():
    """With A = identity rows, h exposes the kernel's mask: compare it with the PyTorch mask element by element."""
    T, k = 64, 16
    x = torch.ones(T, k, device="cuda", dtype=torch.bfloat16)
    A = torch.eye(k, device="cuda", dtype=torch.bfloat16)  # r = k = 16
    G = torch.zeros(2, k, device="cuda", dtype=torch.bfloat16)
    _, thr, inv_keep = reference.dropout_params(0.5, True)
    for seed in [(11, 22), torch.tensor([11, 22], device="cuda")]:  # host ints, or read on the device (graphs)
        z, h, gate, raw = launch.proj(x, A, G, seed, thr, inv_keep, 1.0, 1.0, True)
        assert torch.equal(h > 0, reference.keep_mask(T, k, (11, 22), thr, "cuda"))


# ---------------------------------------------------------------------------------------------------------------
# CPU, where Triton is installed: the Triton kernels through Triton's interpreter vs the PyTorch backend
_INTERP_SCRIPT = r"""
import torch
import triton, triton.language as tl
from triton.runtime import interpreter as _interp

# Triton 3.6's interpreter turns a scalar argument into an int with int() of a 1-element array, which numpy >= 2.4
# refuses (a `range(0, K, BK)` in a kernel then fails): the same conversion through the array's one element.
if hasattr(_interp, "_patch_lang_tensor"):
    _patch_tensor = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor

@triton.jit
def _probe(y, K, BK: tl.constexpr):
    acc = tl.zeros([BK], tl.float32)
    for k0 in range(0, K, BK):
        acc += 1.0
    tl.store(y + tl.arange(0, BK), acc)

try:
    _probe[(1,)](torch.zeros(8), 16, BK=8)
except Exception:
    print("INTERPRETER-UNUSABLE")
    raise SystemExit(0)

from hydralora.ops import fused as f
torch.manual_seed(0)
worst = 0.0
for T, K, d, R, N, p, dt in [(37, 200, 96, 8, 3, 0.0, torch.float32), (37, 200, 96, 8, 3, 0.3, torch.float32),
                             (64, 128, 32, 4, 5, 0.1, torch.float16), (19, 201, 40, 8, 3, 0.3, torch.float32)]:
    x = torch.randn(T, K, dtype=dt, requires_grad=True)
    A = (torch.randn(R, K) * 0.1).to(dt).requires_grad_()
    G = (torch.randn(N, K) * 0.1).to(dt).requires_grad_()
    B = (torch.randn(N, d, R) * 0.1).to(dt).requires_grad_()
    res = torch.randn(T, d, dtype=dt, requires_grad=True)
    dy = torch.randn(T, d).to(dt)
    weights = None if p == 0.0 else (torch.arange(T) % 3 != 0).long()  # usage counted over a token mask
    outs = {}
    for be in ("torch", "triton"):
        for t in (x, A, G, B, res):
            t.grad = None
        torch.manual_seed(5)
        usage = torch.zeros(N + 1)
        out, raw, gate = f.hydra_delta_fused(x, A, G, B, res, 2.0, dropout_p=p, training=True, temperature=0.7,
                                             backend=be, usage=usage, token_weights=weights)
        ((out.float() * dy.float()).sum() + (raw ** 2).sum()).backward()
        outs[be] = [out.detach().float(), raw.detach(), gate, x.grad.float(), A.grad.float(), G.grad.float(),
                    B.grad.float(), res.grad.float(), usage]
    for a, b in zip(outs["torch"], outs["triton"]):
        worst = max(worst, ((a - b).norm() / (a.norm() + 1e-12)).item())
# the seed read on the device (calls captured in a CUDA graph) drops what the same two ints drop
T, K, R, N = 37, 200, 8, 3
x, A, G = torch.randn(T, K), torch.randn(R, K) * 0.1, torch.randn(N, K) * 0.1
from hydralora.ops import launch, reference
_, thr, inv_keep = reference.dropout_params(0.3, True)
fwd = [launch.proj(x, A, G, s, thr, inv_keep, 2.0, 1.0, True) for s in [(5, 9), torch.tensor([5, 9])]]
dz = torch.randn(T, N * R)
bwd = [launch.bwd_x(x, dz, fwd[0][1], fwd[0][2], None, A, G, s, thr, inv_keep, 2.0, 1.0, True, True)
       for s in [(5, 9), torch.tensor([5, 9])]]
for a, b in [*zip(fwd[0], fwd[1]), *zip(bwd[0], bwd[1])]:
    assert torch.equal(a, b), "device seed differs from host seed"
# without its routing outputs (eval without a graph) the projection writes the same z and usage, every token counted
for w in (None, torch.arange(T) % 3 != 0):
    usage = [torch.zeros(N + 1), torch.zeros(N + 1)]
    full, bare = (launch.proj(x, A, G, None, 0, 1.0, 2.0, 1.0, False, u, w, stats=st)
                  for u, st in zip(usage, (True, False)))
    assert bare[1:] == (None, None, None) and torch.equal(full[0], bare[0]), "stats=False changed z"
    assert torch.equal(usage[0], usage[1]) and usage[0][N] == (T if w is None else int(w.sum())), usage
# the small-call kernel: the experts' update added into the base output in place, usage counted by one program
d = 200  # more than one block of output columns
Bf = torch.randn(d, N * R) * 0.1
for Tm, w in [(1, None), (5, torch.arange(5) % 2 == 0), (20, None)]:
    xs, res = x[:Tm].contiguous(), torch.randn(Tm, d)
    usage = [torch.zeros(N + 1), torch.zeros(N + 1)]
    ref = reference.proj_mix(xs, res, A, G, Bf, torch.empty_like(res), 2.0, 0.7, usage[0], w)
    got = res.clone()
    assert launch.proj_mix(xs, got, A, G, Bf, got, 2.0, 0.7, usage[1], w) is got
    assert torch.allclose(usage[1], usage[0], rtol=1e-5), "usage counted more than once or not at all"
    worst = max(worst, ((got - ref).norm() / ref.norm()).item())
    # a given gate (sequence routing's) in place of the router's
    gate = torch.softmax(torch.randn(Tm, N), -1)
    usage = [torch.zeros(N + 1), torch.zeros(N + 1)]
    ref = reference.proj_mix(xs, res, A, G, Bf, torch.empty_like(res), 2.0, 0.7, usage[0], w, gate)
    got = launch.proj_mix(xs, res.clone(), A, G, Bf, torch.empty_like(res), 2.0, 0.7, usage[1], w, gate)
    assert torch.allclose(usage[1], usage[0], rtol=1e-5), "given gate: usage"
    h = xs @ A.t()
    by_hand = res + 2.0 * torch.einsum("tn,dnr,tr->td", gate, Bf.view(d, N, R), h)
    assert ((ref - by_hand).norm() / by_hand.norm()).item() < 1e-5, "the reference ignores the given gate"
    worst = max(worst, ((got - ref).norm() / ref.norm()).item())
print("WORST", worst)
"""


def test_triton_kernels_in_interpreter_match_torch_backend():
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _INTERP_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    if "INTERPRETER-UNUSABLE" in proc.stdout:
        pytest.skip("Triton's interpreter does not run here (version mismatch with numpy)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = float(proc.stdout.split("WORST")[-1])
    assert worst < 2e-3, worst  # fp32 cases ~1e-7, fp16 ~5e-4


@pytest.mark.parametrize("dropout", [False, True])
def test_triton_kernels_compile_for_hopper(dropout):
    """Triton's compiler (no GPU needed) builds the kernels for sm_90, with and without the dropout hash (and the
    usage statistics' atomics), the projection with and without its routing outputs, the small-call kernel with
    and without them and a given gate.

    Catches what the interpreter cannot: Triton 3.x refuses non-constexpr globals inside jit code at compile time.
    """
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hydralora.ops import _triton_kernels as tk

    scalars = {"seed_ptr": "i32", "s1": "i32", "s2": "i32", "T": "i32", "K": "i32", "TB": "i32", "thr": "i32",
               "inv_keep": "fp32", "scaling": "fp32", "inv_temp": "fp32"}
    fwd = {"X": "*bf16", "A": "*bf16", "G": "*bf16", "Z": "*bf16", "H": "*fp32", "P": "*fp32", "L": "*fp32",
           "U": "*fp32", "W": "*i64", "S": "*i64"}
    fwd_c = {"R": 8, "N": 3, "RP": 16, "NP": 16, "DROPOUT": dropout, "COUNT": dropout, "HAS_W": dropout,
             "STATS": not dropout, "BT": 64, "BK": 64}
    bwd = {"X": "*bf16", "DZ": "*bf16", "H": "*fp32", "P": "*fp32", "GL": "*fp32", "A": "*bf16", "G": "*bf16",
           "DX": "*bf16", "PART": "*fp32", "S": "*i64"}
    bwd_c = {"R": 8, "N": 3, "RP": 16, "NP": 16, "BT": 64, "DROPOUT": dropout, "HAS_GL": True, "NEED_DX": True,
             "BK": 64, "KSPLIT": 2}
    sums = {"PART": "*fp32", "DA": "*bf16", "DG": "*bf16", "NB": "i32", "K": "i32", "RN": "i32"}
    mix = {"X": "*bf16", "A": "*bf16", "G": "*bf16", "BF": "*bf16", "RES": "*bf16", "OUT": "*bf16", "U": "*fp32",
           "W": "*i1", "P": "*fp32", "T": "i32", "K": "i32", "D": "i32", "scaling": "fp32", "inv_temp": "fp32"}
    mix_c = {"R": 8, "N": 3, "RP": 16, "NP": 16, "COUNT": dropout, "HAS_W": dropout, "GIVEN": dropout, "BT": 16,
             "BK": 128, "BD": 64}
    for kernel, args, const in [(tk._proj_fwd, {**fwd, **scalars}, fwd_c), (tk._bwd_x, {**bwd, **scalars}, bwd_c),
                                (tk._sum_parts, sums, {"R": 8, "BE": 512}), (tk._proj_mix, mix, mix_c)]:
        sig = {**args, **{k: "constexpr" for k in const}}
        src = ASTSource(fn=kernel.fn, signature=sig, constexprs=const)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert "ptx" in compiled.asm and compiled.asm["ptx"]


def _checkpointed_runs_agree(layer, x):
    """A fused layer's output and gradients under non-reentrant checkpointing equal the plain run's with the same
    seed (the recompute regenerates the forward's dropout mask), and a different seed gives other gradients."""
    from torch.utils.checkpoint import checkpoint

    plan = layer._fused_plan(x)
    assert plan is not None and plan.base is not None  # the fused path (base inside the op) is the one under test

    def run(ckpt, seed=11):
        for t in (x, *params(layer)):
            t.grad = None
        torch.manual_seed(seed)
        out = checkpoint(layer, x, use_reentrant=False) if ckpt else layer(x)
        out.float().square().sum().backward()
        return [out.detach(), x.grad.clone(), *[t.grad.clone() for t in params(layer)]]

    plain, ckpt = run(False), run(True)
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)
    assert not torch.equal(run(False, seed=12)[2], plain[2])  # dA depends on the mask


@pytest.mark.parametrize("init", ["zeros", "svd"])
def test_checkpointed_fused_layer_recomputes_the_same_forward_on_the_cpu(init, monkeypatch):
    """The fused op (PyTorch backend, forced on the CPU) under non-reentrant checkpointing: its seed comes from the
    CPU generator, which checkpointing restores, so the recompute matches, with and without an init offset (whose
    stacked factors are made again in the recompute)."""
    force_dispatch(monkeypatch)
    offset = dict(init_b="svd", init_a="svd") if init == "svd" else {}
    layer = make_layer(k=48, d=40, r=4, p=0.3, **offset).train()
    _checkpointed_runs_agree(layer, torch.randn(16, 48, requires_grad=True))


@needs_gpu
@pytest.mark.parametrize("init", ["zeros", "svd"])
def test_checkpointed_fused_layer_recomputes_the_same_dropout_mask(init, monkeypatch):
    """On the GPU the fused path's seed comes from the CUDA generator's state, which non-reentrant activation
    checkpointing saves and restores: the recompute regenerates the forward's mask (_checkpointed_runs_agree)."""
    monkeypatch.setenv("HYDRALORA_FUSED", "1")
    offset = dict(init_b="svd", init_a="svd") if init == "svd" else {}
    layer = make_layer(k=256, d=128, r=8, p=0.3, dtype=torch.bfloat16, device="cuda", **offset).train()
    _checkpointed_runs_agree(layer, torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True))


@needs_gpu
def test_cuda_graph_replays_draw_fresh_dropout_masks():
    """While a CUDA graph is captured the dropout seed is drawn on the device: each replay of a captured fused
    forward drops other elements (a seed drawn on the host would be frozen into the graph); without dropout a replay
    equals the eager call."""
    T, K, d, R, N = 256, 128, 64, 8, 3
    x, A, G, B = _cuda_op_inputs(T, K, d, R, N, seed=3)
    res = torch.zeros(T, d, device="cuda", dtype=torch.bfloat16)
    for p in (0.0, 0.3):
        def call():
            with torch.no_grad():
                return hydra_delta_fused(x, A, G, B, res, 2.0, dropout_p=p, training=True)[0]
        eager = call()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call()
        replays = []
        for _ in range(2):
            graph.replay()
            replays.append(out.clone())
        if p == 0.0:
            assert torch.equal(replays[0], eager) and torch.equal(replays[1], eager)
        else:
            assert rel(replays[0], replays[1]) > 1e-2


@needs_gpu
@pytest.mark.parametrize("given", [False, True], ids=["router", "given-gate"])
@pytest.mark.parametrize("T,K,d,R,N", [(1, 4096, 4096, 8, 3), (7, 576, 600, 8, 3), (32, 1024, 640, 16, 4)])
def test_small_call_kernel_matches_the_pytorch_backend(T, K, d, R, N, given, monkeypatch):
    """proj_mix on the GPU (first launch through the autotuner, then direct launches): the PyTorch backend's output,
    in place into the base output or into a new one, and the usage counted once, masked tokens left out; with the
    router's gate and with a given one (sequence routing's)."""
    monkeypatch.delenv("HYDRALORA_AUTOTUNE", raising=False)
    x, A, G, B = _cuda_op_inputs(T, K, d, R, N, seed=6)
    Bf = reference.flat_B(B).contiguous()
    w = torch.arange(T, device="cuda") % 3 != 1
    res = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    gate = torch.softmax(torch.randn(T, N, device="cuda"), -1) if given else None
    u_ref = torch.zeros(N + 1, device="cuda")
    ref = reference.proj_mix(x, res, A, G, Bf, torch.empty_like(res), 2.0, 0.8, u_ref, w, gate)
    for in_place in (True, False, True):
        u = torch.zeros(N + 1, device="cuda")
        out = res.clone() if in_place else torch.empty_like(res)
        got = launch.proj_mix(x, out if in_place else res, A, G, Bf, out, 2.0, 0.8, u, w, gate)
        assert got is out
        assert rel(got, ref) < 1e-2, rel(got, ref)
        assert float(u[N]) == float(w.sum())  # the real tokens, counted once
        # the gate sums: the reference's gate comes from bf16-rounded logits, the kernel's from fp32 ones
        torch.testing.assert_close(u[:N], u_ref[:N], rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(u[:N].sum(), u[N], rtol=1e-4, atol=1e-4)  # each counted token's gate sums to 1


@needs_gpu
def test_layer_usage_statistics_follow_cuda_graph_replays():
    """A layer captured in a CUDA graph: each replay adds its gate sums and its token count on the device, so the
    mean usage after replays is the eager calls' mean and the token count grows with every replay."""
    layer = make_layer(k=64, d=48, r=8, n=3, dtype=torch.bfloat16, device="cuda").eval()
    x = torch.randn(4, 16, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x)
    eager_mean = layer._usage("default").clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        layer(x)
    torch.cuda.current_stream().wait_stream(side)
    layer.reset_usage()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        layer(x)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    acc = layer.usage_acc["default"]
    assert float(acc[-1]) + layer._usage_tokens_host.get("default", 0.0) == 3 * 64  # the replays' tokens only
    torch.testing.assert_close(layer._usage("default"), eager_mean, rtol=1e-3, atol=1e-3)


def test_fused_decode_call_costs_few_python_calls_more_than_peft_lora(monkeypatch):
    """Host cost of the fused dispatch, on a CPU stand-in (every check as on the GPU, the PyTorch reference for the
    kernels): one decode-sized layer call makes at most 12 Python-level calls more than a PEFT LoRA r=8 layer's
    (9 more when written; benchmarks/investigations/dispatch_host_cost.py measures the same)."""
    import cProfile
    import pstats

    import peft

    monkeypatch.setattr(fops, "HAS_TRITON", True)
    monkeypatch.setattr(fops, "use_triton", lambda x, dtype, backend: False)
    monkeypatch.setattr(dispatch, "kernel_device", lambda x: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.delenv("HYDRALORA_FUSED", raising=False)
    calls = {}
    for kind in ("peft", "ours"):
        base = nn.Sequential(nn.Linear(16, 16, bias=False))
        cfg = (peft.LoraConfig(r=8, lora_dropout=0.05, target_modules=["0"]) if kind == "peft" else
               HydraLoraConfig(r=8, num_experts=3, lora_dropout=0.05, target_modules=["0"]))
        layer = peft.get_peft_model(base, cfg).to(torch.bfloat16).eval().base_model.model[0]
        x = torch.randn(1, 1, 16, dtype=torch.bfloat16)
        with torch.inference_mode():
            layer(x)
            if kind == "ours":
                assert layer._fused_plan(x) is not None  # the fused path is the one counted
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(20):
                layer(x)
            prof.disable()
        calls[kind] = pstats.Stats(prof).total_calls / 20
    assert calls["ours"] <= calls["peft"] + 12, calls
