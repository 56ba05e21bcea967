# Host cost of one adapted layer call at decode (1 token, no grad, bf16) through the fused dispatch's Python on a
# CPU: every check as on the GPU (x reports is_cuda), the PyTorch backend's kernels in place of Triton's; tiny
# features make the compute negligible. Prints {variant: (us per call, Python function calls per call)}.
#   python3 docs/perf-gpu-2026-12-02d/cpu_dispatch.py [--features 16] [--profile tottime]
#   (PYTHONPATH=<an older src/> for another version)
import argparse
import cProfile
import io
import pstats
import time
import warnings

import peft
import torch

import hydralora
from hydralora.ops import fused as F

warnings.filterwarnings("ignore")
ap = argparse.ArgumentParser()
ap.add_argument("--features", type=int, default=16)
ap.add_argument("--profile", default=None, help="also print ours' cProfile table sorted by this key")
args = ap.parse_args()
torch.set_num_threads(1)
F._kernel_device = lambda x: True
F.HAS_TRITON = True
torch.Tensor.is_cuda = property(lambda self: True)  # every check as on the GPU ...
F._use_triton = lambda x, backend: False  # ... but the PyTorch backend's kernels
d = args.features


def make(kind):
    base = torch.nn.Sequential(torch.nn.Linear(d, d, bias=False))
    if kind == "peft":
        cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["0"])
    else:
        cfg = hydralora.HydraLoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, num_experts=3, target_modules=["0"])
    m = peft.get_peft_model(base, cfg)
    m.to(torch.bfloat16).eval()
    return m.base_model.model[0]


x = torch.randn(1, 1, d, dtype=torch.bfloat16)
res = {}
for kind in ["peft", "ours", "peft", "ours"]:
    layer = make(kind)
    if kind == "ours":
        assert F.layer_linear_fused(layer, x) is not None  # the fused dispatch is the path measured
    with torch.inference_mode():
        for _ in range(200):
            layer(x)
        best = 1e9
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(2000):
                layer(x)
            best = min(best, (time.perf_counter() - t) / 2000 * 1e6)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(100):
            layer(x)
        pr.disable()
    res[kind] = (round(best, 1), pstats.Stats(pr).total_calls // 100)
print(res)
if args.profile:
    layer = make("ours")
    with torch.inference_mode():
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(3000):
            layer(x)
        pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats(args.profile).print_stats(45)
    print(s.getvalue())
