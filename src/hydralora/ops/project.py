"""A and the router over one input, with dropout on A's side only, keeping x instead of the dropped copy of x.

The eager layer used to run ``F.linear(dropout(x), A)`` and ``F.linear(x, W_g)``: autograd then keeps x (for the
router's weight gradient), the dropped copy of x (for A's) and the mask, 5 bytes per element of x in bf16, where
PEFT LoRA keeps 3 (dropped copy and mask). This Function keeps x and the boolean mask (3 bytes; x is often kept
by a neighbour anyway, e.g. q/k/v share it) and rebuilds the dropped copy in backward, one elementwise pass.
Pure PyTorch: the same code runs on the CPU, in CI and on the GPU.
"""

from __future__ import annotations

import torch

# Below this many elements of x the saved copy is small and the Function's extra small ops cost more than they save
# (CPU, 64 x 576: 1.38x vs 1.29x PEFT LoRA per training call); above it memory is what matters.
MIN_NUMEL = 1 << 20


class _DropoutProject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor, W_g: torch.Tensor, p: float):
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # run the GEMMs in the autocast dtype, as F.linear would
            dt = torch.get_autocast_dtype(dev)
            x, A, W_g = x.to(dt), A.to(dt), W_g.to(dt)
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)  # (T, k)
        keep = torch.rand_like(x2) >= p  # (T, k) bool
        scale = 1.0 / (1.0 - p)
        with torch.autocast(dev, enabled=False):
            h = torch.mm(x2 * keep, A.t()).mul_(scale)  # (T, m); the dropped copy is a temporary
            logits = torch.mm(x2, W_g.t())  # (T, N)
        ctx.save_for_backward(x2, keep, A, W_g)
        ctx.scale, ctx.lead = scale, lead
        return h.view(*lead, -1), logits.view(*lead, -1)

    @staticmethod
    def backward(ctx, dh: torch.Tensor, dlogits: torch.Tensor):
        x2, keep, A, W_g = ctx.saved_tensors
        m, n = A.shape[0], W_g.shape[0]
        dh2 = dh.reshape(-1, m).to(x2.dtype)  # (T, m)
        dl2 = dlogits.reshape(-1, n).to(x2.dtype)  # (T, N)
        dx = dA = dW = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(dh2, A).mul_(keep).mul_(ctx.scale)  # (T, k): back through the mask
            dx.addmm_(dl2, W_g)  # (T, k): + the router's part, in the same buffer
            dx = dx.view(*ctx.lead, -1)
        if ctx.needs_input_grad[1]:
            dA = torch.mm(dh2.t(), x2 * keep).mul_(ctx.scale)  # (m, k): the dropped copy rebuilt here
        if ctx.needs_input_grad[2]:
            dW = torch.mm(dl2.t(), x2)  # (N, k)
        return dx, dA, dW, None


def use_dropout_project(x: torch.Tensor) -> bool:
    """Whether the layer should take this path for x (large inputs only, see MIN_NUMEL)."""
    return x.numel() >= MIN_NUMEL


def dropout_project(x: torch.Tensor, A: torch.Tensor, W_g: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h = A dropout_p(x) and logits = W_g x (the router sees x undropped), in training.

    x: (..., k); A: (m, k); W_g: (N, k); 0 < p < 1. Returns h (..., m) and logits (..., N) with x's dtype.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout_project: p={p!r} must be in (0, 1); use F.linear without dropout otherwise")
    return _DropoutProject.apply(x, A, W_g, p)
