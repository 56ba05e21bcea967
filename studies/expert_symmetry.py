"""Do HydraLoRA's experts become different from each other? (why HydraLoRA as specified did not beat LoRA r=8)

With every expert B_i starting at zero and a router whose initial gate is close to uniform, all B_i receive the
same gradient up to the gate's small token-to-token differences, and the router's gradient is zero while the B_i
are equal (a softmax gets no gradient from equal per-expert signals). Adam then moves every B_i alike: the
experts stay near-copies and the layer acts as LoRA of rank r. This trains the same recipe with the default init
and with the two knobs that break the symmetry -- random non-zero experts whose initial update cancels exactly
(`init_b=rlora`) and a sharper router (`router_temperature`) -- then measures, from the saved adapters, the mean
cosine similarity between the learned parts of the experts of each layer (1: copies), and from the run, how far the gate moves from
uniform and the held-out accuracy.

    python studies/expert_symmetry.py --out results/symmetry                    # CPU schedule, about 30 min on 2 cores
    python studies/expert_symmetry.py --out results/symmetry --set schedule=gpu # the study's data at the GPU schedule
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

STUDIES = Path(__file__).resolve().parent
VARIANTS = {
    "default (B=0, router x0.1)": {},
    "init_b=rlora": {"init_b": "rlora"},
    "router_temperature=0.1": {"router_temperature": 0.1},
}


def expert_similarity(adapter_file: Path) -> dict:
    """Mean over layers of the mean pairwise cosine similarity between the experts' learned B (B - B at init;
    R-LoRA saves its init, zero init needs none), of their raw B, and the mean norm of the learned B."""
    from safetensors.numpy import load_file

    tensors = load_file(str(adapter_file))
    learned, raw, norms = [], [], []
    for name, B in tensors.items():
        if not name.endswith("hydralora_B"):
            continue
        prefix = name[: -len("hydralora_B")]
        init = [v for k, v in tensors.items() if k.startswith(prefix + "hydralora_init.") and k.endswith("_B")]
        B = B.astype(np.float64)  # (N, d, r)
        delta = B - init[0] if init else B
        learned.append(_mean_offdiag_cos(delta))
        raw.append(_mean_offdiag_cos(B))
        norms.append(np.linalg.norm(delta.reshape(len(delta), -1), axis=1).mean())
    return {"expert_cos": float(np.mean(learned)), "expert_cos_min_layer": float(np.min(learned)),
            "expert_cos_raw": float(np.mean(raw)), "learned_B_norm": float(np.mean(norms)), "layers": len(learned)}


def _mean_offdiag_cos(stack: np.ndarray) -> float:
    flat = stack.reshape(len(stack), -1)  # (N, d*r)
    u = flat / (np.linalg.norm(flat, axis=1, keepdims=True) + 1e-12)
    c = u @ u.T
    return float(c[~np.eye(len(c), dtype=bool)].mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/symmetry")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--only", type=int, nargs="+", help="Run only these variants (0-based, in the table's order).")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override a recipe field in every run.")
    args = ap.parse_args()
    sys.path.insert(0, str(STUDIES))
    from report_study import routing_analysis
    from study_common import STUDY_DATA, train_command

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = {"data": str(STUDY_DATA), "method": "hydralora", "num_experts": "auto", "r": 8, "lora_alpha": 16,
              "target_modules": "all-linear", "learning_rate": 1e-3, "eval_base": False, "report": False,
              "loraplus_lr_ratio": None, "router_temperature": 1.0,
              "seed": args.seed, **dict(s.split("=", 1) for s in args.set)}
    chosen = {i: label for i, label in enumerate(VARIANTS) if args.only is None or i in args.only}

    def train(i: int) -> int:
        run = out / f"v{i}-seed{args.seed}"
        if (run / "metrics.json").is_file():
            return 0
        with open(str(run) + ".log", "w") as log:
            cmd = train_command(run, {**common, **VARIANTS[chosen[i]]})
            return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode

    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(train, chosen))
    rows = {}
    for i, label in chosen.items():
        run = out / f"v{i}-seed{args.seed}"
        if not (run / "metrics.json").is_file():
            rows[label] = {"failed": str(run) + ".log"}
            continue
        m = json.loads((run / "metrics.json").read_text())
        routed = routing_analysis({label: {"runs": [m], "extra": {}}}, None)[label][0]["groups"]
        rows[label] = {"accuracy": m["adapted"]["mean_accuracy"], "num_experts": m["num_experts"],
                       "train_loss": m["train_loss"], **expert_similarity(run / "adapter" / "adapter_model.safetensors"),
                       "gate_max_dev": {g: v["max_dev"] for g, v in routed.items()}}
    (out / f"symmetry-seed{args.seed}.json").write_text(json.dumps(rows, indent=1))
    print("| variant | N | held-out acc | train loss | cosine between experts' learned B (mean / lowest layer) | raw B cosine | gate max deviation early/middle/late (x 1/N) |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        if "failed" in r:
            print(f"| {label} | failed: see {r['failed']} | | | | | |")
            continue
        dev = " / ".join(f"{r['gate_max_dev'][g]:.3f}" for g in ("early", "middle", "late") if g in r["gate_max_dev"])
        print(f"| {label} | {r['num_experts']} | {r['accuracy']:.3f} | {r['train_loss']:.4f} | "
              f"{r['expert_cos']:.3f} / {r['expert_cos_min_layer']:.3f} | {r['expert_cos_raw']:.3f} | {dev} |")
    return 0 if all("failed" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
