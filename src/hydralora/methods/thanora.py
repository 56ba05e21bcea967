"""ThanoRA: one plain LoRA whose rank is split into per-task subspaces at initialisation, each sized by the task's
heterogeneity, and kept apart during training by an orthogonality regulariser ("ThanoRA: Task
Heterogeneity-Aware Multi-Task Low-Rank Adaptation", arXiv:2505.18640). No router: the result is a stock PEFT LoRA
adapter that merges like any other.

What is ours where the paper is not specific to us:
- heterogeneity of a task = the entropy-based effective rank (exp of the entropy of the normalised eigenvalues) of
  the covariance of its inputs to each adapted layer, averaged over layers, divided by the layer's width;
- task t gets r_t of the r ranks in proportion to it (largest remainder, at least 1 each);
- the rows of A for task t are the top-r_t principal directions of task t's layer inputs, taken orthogonal to the
  rows already given to earlier tasks, scaled to the row norm of LoRA's default init; B starts at zero;
- the regulariser is the mean squared cosine between A's rows (and B's columns) of different tasks.
"""

from __future__ import annotations

import inspect
import math
from typing import Iterable, Mapping

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

# Row norm of LoRA's default A init, kaiming_uniform(a=sqrt(5)): U(-1/sqrt(k), 1/sqrt(k)) has k / (3k) per row.
_A_ROW_NORM = 1.0 / math.sqrt(3.0)


def lora_layers(model: nn.Module, adapter_name: str = "default") -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]


def _forward_kwargs(model: nn.Module) -> dict:
    """Keyword arguments that spare the inputs' forward pass work no adapted layer reads: a causal LM that takes
    `logits_to_keep` computes its vocabulary projection for one position instead of every token."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):  # a forward without an introspectable signature
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


@torch.no_grad()
def _covariances(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], adapter_name: str) -> dict[str, torch.Tensor]:
    """Uncentred covariance (k, k), fp32, of every LoRA layer's input over the real tokens of `batches`.

    Layers that read the very same input tensor one after another (a block's q, k and v projections; gate and up)
    get one product x^T x per batch, computed once. Where that holds on every batch their covariances are one
    tensor object under each name, so callers can do the per-matrix work once."""
    layers = lora_layers(model, adapter_name)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    sources: dict[str, set] = {}  # layer -> the layers whose product it took, over all batches
    state: dict = {}
    handles = []
    for name, layer in layers:
        def pre_hook(module, args, name=name):
            x = args[0]
            last = state.get("last")
            if last is not None and last[0] is x:  # the same input as the layer just before: its product
                _, src, prod, n = last
            else:
                mask = state.get("mask")
                xs = x
                if mask is not None and xs.dim() == 3 and tuple(mask.shape) == tuple(xs.shape[:2]):
                    xs = xs[mask.bool()]  # (T', k): real tokens only
                xs = xs.reshape(-1, xs.shape[-1]).float()  # (T', k)
                src, prod, n = name, xs.T @ xs, xs.shape[0]  # (k, k)
                state["last"] = (x, name, prod, n)
            sums[name] = prod.clone() if name not in sums else sums[name].add_(prod)
            counts[name] = counts.get(name, 0) + n
            sources.setdefault(name, set()).add(src)
        handles.append(layer.register_forward_pre_hook(pre_hook))
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    kwargs = _forward_kwargs(model)
    try:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                state["mask"], state["last"] = batch.get("attention_mask"), None
                model(**batch, **kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        state.clear()
    covs = {}
    for name in sums:
        (src,) = sources[name] if len(sources[name]) == 1 else (name,)
        covs[name] = covs[src] if src != name and src in covs else sums[name].div_(max(1, counts[name]))
    return covs


def _effective_rank(cov: torch.Tensor) -> float:
    """exp(entropy of the normalised eigenvalues): 1 for one direction, k for an isotropic spread."""
    eig = torch.linalg.eigvalsh(cov.float()).double().clamp_min(0.0)  # (k,): fp32 is enough for an entropy
    total = eig.sum()
    if total <= 0:
        return 1.0
    p = eig / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(entropy.exp())


def task_heterogeneity(model: nn.Module, task_batches: Mapping[str, list], adapter_name: str = "default") -> dict[str, float]:
    """Per task: mean over adapted layers of effective rank / width of the task's layer inputs, in (0, 1]."""
    out = {}
    for task in sorted(task_batches):
        covs = _covariances(model, task_batches[task], adapter_name)
        ranks: dict[int, float] = {}  # one eigendecomposition per distinct matrix (layers sharing an input)
        for c in covs.values():
            if id(c) not in ranks:
                ranks[id(c)] = _effective_rank(c) / c.shape[0]
        out[task] = sum(ranks[id(c)] for c in covs.values()) / max(1, len(covs))
    return out


def allocate_ranks(heterogeneity: Mapping[str, float], r: int) -> dict[str, int]:
    """Split rank r over the tasks in proportion to their heterogeneity: at least 1 each, largest remainder."""
    tasks = sorted(heterogeneity)
    if r < len(tasks):
        raise ValueError(f"r={r} is invalid for ThanoRA: each of the {len(tasks)} tasks needs at least one rank, so r must be >= {len(tasks)}.")
    h = torch.tensor([max(float(heterogeneity[t]), 1e-12) for t in tasks], dtype=torch.float64)
    share = h / h.sum() * (r - len(tasks))  # the ranks beyond the first of each task
    base = share.floor().long()
    rest = (r - len(tasks)) - int(base.sum())
    order = torch.argsort(share - base, descending=True, stable=True)
    base[order[:rest]] += 1
    return {t: 1 + int(b) for t, b in zip(tasks, base)}


@torch.no_grad()
def init_task_subspaces(model: nn.Module, task_batches: Mapping[str, list], ranks: Mapping[str, int],
                        adapter_name: str = "default", seed: int = 0) -> dict[str, tuple[int, int]]:
    """Write every LoRA A as stacked per-task blocks (task order: sorted): block t holds the top-ranks[t] principal
    directions of task t's inputs orthogonal to the earlier blocks. Returns the row slice of each task."""
    tasks = sorted(ranks)
    r_total = sum(ranks.values())
    slices, start = {}, 0
    for t in tasks:
        slices[t] = (start, start + ranks[t])
        start += ranks[t]
    layers = dict(lora_layers(model, adapter_name))
    for name, layer in layers.items():
        if layer.r[adapter_name] != r_total:
            raise ValueError(f"ranks sum to {r_total} but layer {name} has r={layer.r[adapter_name]}.")
        k = layer.lora_A[adapter_name].weight.shape[1]
        if k < r_total:
            raise ValueError(f"layer {name} has {k} input features, fewer than r={r_total}: ThanoRA needs r <= {k}.")
    gen = torch.Generator().manual_seed(seed)
    empty: dict[tuple, torch.Tensor] = {}
    basis: dict[str, torch.Tensor] = {}  # layer -> (m, k) orthonormal rows given so far, fp64
    for t in tasks:
        covs = _covariances(model, task_batches[t], adapter_name)
        done: dict[tuple[int, int], torch.Tensor] = {}  # (covariance, basis so far) objects -> the new basis
        for name, cov in covs.items():
            k, dev = cov.shape[0], cov.device
            U = basis.get(name)
            if U is None:
                U = empty.setdefault((k, dev), torch.zeros(0, k, dtype=torch.float64, device=dev))  # (0, k)
            key = (id(cov), id(U))  # layers sharing both their input and their earlier blocks get the same block
            if key not in done:
                done[key] = torch.cat([U, _next_block(cov, U, ranks[t], gen)], 0)  # (m + r_t, k)
            basis[name] = done[key]
    for name, layer in layers.items():
        W = layer.lora_A[adapter_name].weight  # (r, k)
        W.copy_((basis[name] * _A_ROW_NORM).to(device=W.device, dtype=W.dtype))
        nn.init.zeros_(layer.lora_B[adapter_name].weight)
    return slices


def _project_off(U: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """(I - U^T U) M for orthonormal rows U (m, k) and M (k, n), in O(k m n) (no (k, k) projector)."""
    return M - U.T @ (U @ M)


def _next_block(cov: torch.Tensor, U: torch.Tensor, n: int, gen: torch.Generator, iters: int = 8) -> torch.Tensor:
    """The top-n principal directions (n, k), orthonormal rows, of cov (k, k) restricted to the complement of the
    rows of U (m, k): the top eigenvectors of C = P cov P, P = I - U^T U.

    Randomized subspace iteration with n + 8 columns and a Rayleigh-Ritz step (Halko, Martinsson and Tropp,
    arXiv:0909.4061): O(k^2 (n + 8)) per iteration where a full eigendecomposition of C is O(k^3) (it took most of
    the init on wide layers). torch.svd_lowrank computes the same but draws its start from torch's global
    generator, which would move the training's random stream; the start here comes from `gen`. Directions with
    zero variance (C's null space) come out as the start's projection off U, orthonormalised: any of them will do.
    """
    k = cov.shape[0]
    C = cov.double()  # (k, k)

    def apply(M: torch.Tensor) -> torch.Tensor:  # C M = P cov P M for M (k, q)
        return _project_off(U, C @ _project_off(U, M))  # (k, q)

    q = min(k - U.shape[0], n + 8)
    Q = torch.randn(k, q, generator=gen, dtype=torch.float64).to(C.device)  # (k, q)
    Q = torch.linalg.qr(_project_off(U, Q))[0]  # (k, q)
    for _ in range(iters):
        Q = torch.linalg.qr(apply(Q))[0]  # (k, q)
    _, vecs = torch.linalg.eigh(Q.T @ apply(Q))  # (q, q), ascending
    top = Q @ vecs[:, -n:].flip(-1)  # (k, n)
    # against round-off and C's null space: project off U again and orthonormalise
    return torch.linalg.qr(_project_off(U, top))[0].T  # (n, k)


def _cross_mask(slices: Mapping[str, tuple[int, int]], r: int, device) -> torch.Tensor:
    """(r, r) mask: 1 where the two ranks belong to different tasks."""
    owner = torch.empty(r, dtype=torch.long)
    for i, (a, b) in enumerate(slices.values()):
        owner[a:b] = i
    return (owner[:, None] != owner[None, :]).float().to(device)


def _cross_cos2(M: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine between the rows of M (..., r, n) that belong to different tasks, per leading index."""
    Mh = M.float() / M.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (..., r, n)
    G = Mh @ Mh.transpose(-1, -2)  # (..., r, r)
    return (G.pow(2) * mask).sum((-2, -1)) / mask.sum().clamp_min(1.0)  # (...)


def thanora_penalty(model: nn.Module, slices: Mapping[str, tuple[int, int]], adapter_name: str = "default"):
    """A callable: mean over LoRA layers of the cross-task squared cosines of A's rows plus those of B's columns.

    Layers whose A and B have the same shapes are stacked and computed as one batch (a decoder's LoRA layers come
    in a handful of shapes, e.g. 210 layers in 7 shapes for SmolLM2-135M): a few dozen tensor ops per step instead
    of ten per layer, each of which costs host time on a GPU and dominates the penalty on a CPU."""
    layers = [layer for _, layer in lora_layers(model, adapter_name)]
    r = max(b for _, b in slices.values())
    masks: dict = {}

    def penalty() -> torch.Tensor:
        groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for layer in layers:  # the weights are read each call: a move, cast or reload replaces them
            A = layer.lora_A[adapter_name].weight  # (r, k)
            B = layer.lora_B[adapter_name].weight  # (d, r)
            groups.setdefault((A.shape, B.shape, A.device, A.dtype, B.dtype), []).append((A, B))
        terms = []
        for (_, _, device, _, _), pairs in groups.items():
            mask = masks.get(device)
            if mask is None:
                mask = masks[device] = _cross_mask(slices, r, device)
            As = torch.stack([a for a, _ in pairs])  # (L, r, k)
            Bs = torch.stack([b for _, b in pairs]).transpose(1, 2)  # (L, r, d)
            terms.append(_cross_cos2(As, mask) + _cross_cos2(Bs, mask))  # (L,)
        return torch.cat(terms).mean()

    return penalty


@torch.no_grad()
def subspace_overlap(model: nn.Module, slices: Mapping[str, tuple[int, int]], adapter_name: str = "default") -> float:
    """Largest |cosine| between rows of A that belong to different tasks, over all LoRA layers (0: orthogonal)."""
    worst = 0.0
    for _, layer in lora_layers(model, adapter_name):
        A = layer.lora_A[adapter_name].weight.float()  # (r, k)
        mask = _cross_mask(slices, A.shape[0], A.device)
        Ah = A / A.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (r, k)
        worst = max(worst, float(((Ah @ Ah.T).abs() * mask).max()))
    return worst
