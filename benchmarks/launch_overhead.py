"""Host time to issue one fused HydraLoRA op call (forward + backward of hydralora.ops.hydra_delta_fused), with the
cached launch of the compiled kernels and with every call going through Triton's autotuner and JIT front end.
CUDA only: the Triton kernels do not run elsewhere.

    python benchmarks/launch_overhead.py --device cuda
"""

from __future__ import annotations

import statistics
import time

import torch

import _common as C


def main():
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args()
    from hydralora.ops import fused as F

    if args.device != "cuda" or not (torch.cuda.is_available() and F.HAS_TRITON):
        print("launch_overhead: needs CUDA and Triton (the kernels' launch path); nothing to measure here")
        return
    T, K, R, N, dt = args.tokens, args.features, 8, 3, C.resolve_dtype(args)
    gen = torch.Generator().manual_seed(args.seed)

    def rnd(*shape, std=1.0, grad=False):
        return (torch.randn(*shape, generator=gen) * std).to("cuda", dt).requires_grad_(grad)

    x, A, G = rnd(T, K, grad=True), rnd(R, K, std=0.01, grad=True), rnd(N, K, std=0.01, grad=True)
    B, res, dy = rnd(N, K, R, std=0.01, grad=True), rnd(T, K), rnd(T, K)

    def step():
        out, _, _ = F.hydra_delta_fused(x, A, G, B, res, 2.0, dropout_p=0.05, training=True)
        out.backward(dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    rows = []
    for mode in ("cached launch", "through the autotuner", "cached launch (again)"):
        host = []
        for _ in range(args.calls):
            if mode == "through the autotuner":
                F._COMPILED.clear()  # the call then takes the autotuner's path (and caches again)
            t0 = time.perf_counter()
            step()
            host.append((time.perf_counter() - t0) * 1e3)
            torch.cuda.synchronize()
        rows.append({"launch": mode, "host_ms": statistics.median(host)})
    C.print_table(rows, [("launch", "launch", 0), ("host_ms", "host ms per fwd+bwd call (median)", 3)],
                  f"Fused op, {T} x {K}, {dt}, {C.env_info('cuda').get('gpu')}")
    C.write_json(args.json, {"bench": "launch_overhead", "env": C.env_info("cuda"), "rows": rows})


if __name__ == "__main__":
    main()
