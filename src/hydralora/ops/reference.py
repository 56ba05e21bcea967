"""The fused op's math in PyTorch: the reference of the Triton kernels (same dropout mask), and the backend that
runs on the CPU, on any float dtype and in CI.

    proj:   z = scaling * gate (x) h,  h = A dropout(x) / (1 - p),  gate = softmax(W_g x / temperature)
    proj_mix: res + z B_flat^T without dropout, for calls of a few tokens (decode steps)
    bwd_x:  dx, dA, dW_g from dz = dout B_flat (softmax backward included)

The dropout mask is a counter-based hash of (seed, index of a pair of neighbouring columns), never stored: backward
regenerates it from the seed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

M32 = 0xFFFFFFFF
GOLD, C1, C2 = 0x9E3779B1, 0x7FEB352D, 0x846CA68B  # the hash's constants (the Triton kernels use the same)


def dropout_params(p: float, training: bool) -> tuple[bool, int, float]:
    """(dropout active, 16-bit threshold, 1/(1-p)). An element is kept when its 16 bits of hash >= threshold: the
    drop rate is p to within 2**-17 (0.05 drops 3277 / 65536 = 0.050003)."""
    if not training or p <= 0.0:
        return False, 0, 1.0
    thr = min(int(round(p * 65536.0)), 65536)
    return True, thr, 1.0 / (1.0 - p)


def keep_mask(T: int, K: int, seed, thr: int, device) -> torch.Tensor:
    """(T, K) bool keep mask: the function the Triton kernels compute, in int64 arithmetic. One hash per pair of
    neighbouring columns (pair index t * ceil(K/2) + k // 2): its low 16 bits decide column 2j, its high 16 bits
    column 2j + 1. seed: two ints or a (2,) int64 tensor on `device`."""
    s1, s2 = seed[0], seed[1]
    kh = (K + 1) // 2
    v = torch.arange(T * kh, device=device, dtype=torch.int64)  # (T * kh,) pair index
    v = (((v ^ s1) * GOLD) + s2) & M32
    v = v ^ (v >> 16)
    v = (v * C1) & M32
    v = v ^ (v >> 15)
    v = (v * C2) & M32
    v = v ^ (v >> 16)
    bits = torch.stack((v & 0xFFFF, v >> 16), -1).view(T, 2 * kh)[:, :K]  # (T, K): lo for even, hi for odd columns
    return bits >= thr  # (T, K)


def flat_B(B: torch.Tensor) -> torch.Tensor:
    """(d, N*r), expert-major along the rank: a view of the layer's B (stored (d, N, r)), a copy of any other."""
    n, d, r = B.shape
    return B.permute(1, 0, 2).reshape(d, n * r)  # (d, N*r)


def add_usage(sums: torch.Tensor, count: torch.Tensor, gate: torch.Tensor, weights: Optional[torch.Tensor]) -> None:
    """sums (N,) += sum_t w_t gate[t] and count () += sum_t w_t, in place: what the projection kernel's COUNT does
    (the PyTorch backend's and the eager layer's usage statistics). gate: (T, N); weights: T values of any dtype
    (a 0/1 mask of real tokens) or None (every token weight 1)."""
    if weights is None:
        sums.add_(gate.sum(0))  # (N,)
        count.add_(gate.shape[0])  # ()
        return
    w = weights.reshape(-1, 1).to(gate.dtype)  # (T, 1)
    sums.add_((gate * w).sum(0))  # (N,)
    count.add_(w.sum())  # ()


def proj(x2, A, G, seed, thr, inv_keep, scaling, inv_temp, dropout, usage=None, weights=None, stats=True,
         given_gate=None):
    """The projection kernel's function: (z (T, N*R) in x's dtype, h (T, R) fp32, gate (T, N) fp32, raw logits
    (T, N) fp32), the last three None with stats=False; usage (N + 1,) fp32 gets the gate sums and the token count
    added in place (see add_usage). given_gate (T, N) fp32: applied instead of the router's (raw logits None)."""
    T, K = x2.shape
    N, R = G.shape[0], A.shape[0]
    xd = x2
    if dropout:
        xd = x2.masked_fill(~keep_mask(T, K, seed, thr, x2.device), 0)  # (T, K)
    h = F.linear(xd, A).float() * inv_keep  # (T, R)
    raw = None
    if given_gate is None:
        raw = F.linear(x2, G).float()  # (T, N)
        gate = torch.softmax(raw * inv_temp, -1)  # (T, N)
    else:
        gate = given_gate  # (T, N)
    z = ((gate * scaling).unsqueeze(-1) * h.unsqueeze(1)).reshape(T, N * R).to(x2.dtype)  # (T, N*R)
    if usage is not None:
        add_usage(usage[:N], usage[N], gate, weights)
    return (z, h, gate, raw) if stats else (z, None, None, None)


def proj_mix(x2, res, A, G, Bf, out, scaling, inv_temp, usage=None, weights=None, gate=None):
    """The small-call kernel's function: out (T, d) = res + scaling * sum_n gate_n B_n A x2 (no dropout), z rounded
    to x's dtype before the B product; out may be res; gate (T, N) fp32: applied instead of the router's. Returns
    out."""
    z = proj(x2, A, G, None, 0, 1.0, scaling, inv_temp, False, usage, weights, stats=False,
             given_gate=gate)[0]  # (T, N*R)
    return torch.add(res, F.linear(z, Bf).to(res.dtype), out=out)  # (T, d)


def bwd_x(x2, dz, h, gate, gl, A, G, seed, thr, inv_keep, scaling, inv_temp, dropout, need_dx):
    """The backward kernel's function: (dx (T, K) or None, dA (R, K) fp32, dW_g (N, K) fp32) from dz (T, N*R) and
    gl, the gradient reaching the raw logits (T, N) or None."""
    T, K = x2.shape
    N, R = G.shape[0], A.shape[0]
    dz3 = dz.float().view(T, N, R)  # (T, N, R)
    dh = ((gate * scaling).unsqueeze(-1) * dz3).sum(1)  # (T, R)
    dgate = (dz3 * h.unsqueeze(1)).sum(2) * scaling  # (T, N)
    dlog = gate * (dgate - (gate * dgate).sum(1, keepdim=True)) * inv_temp  # (T, N)
    if gl is not None:
        dlog = dlog + gl.float()  # (T, N)
    dh = dh * inv_keep  # (T, R)
    keep = keep_mask(T, K, seed, thr, x2.device) if dropout else None  # (T, K)
    dx = None
    if need_dx:
        dxa = dh.to(x2.dtype) @ A  # (T, K)
        if keep is not None:
            dxa = dxa.masked_fill(~keep, 0)  # (T, K)
        dx = dxa + dlog.to(x2.dtype) @ G  # (T, K)
    xd = x2 if keep is None else x2.masked_fill(~keep, 0)  # (T, K)
    dA = dh.t() @ xd.float()  # (R, K)
    dG = dlog.t() @ x2.float()  # (N, K)
    return dx, dA, dG
