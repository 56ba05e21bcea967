"""Observation II of the paper: do the A matrices of LoRAs trained on different tasks converge while B differs?

One LoRA (r=8, all-linear, the same seed and so the same initial A) per task of the bundled mixture, plus two
LoRAs on IID halves of one task. Per adapted module: cosine similarity between runs of A, of the learned part of
A (A - A0, with A0 rebuilt from the seed) and of B (B starts at zero, so B is all learned). Writes
OUT/observation2.json and PNGs (similarity matrices, PCA of the flattened matrices of one module).
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SEED = 0
STEPS = 50  # x 64 sequences (2 micro-batches of 32, as run_study: 64 at once peaks at 24 GiB): ~10 passes over a task
IID_TASK = "sports_understanding"


def _write_task_files(out: Path, data: Path | None = None, iid_task: str = IID_TASK) -> dict[str, Path]:
    from hydralora.data import bundled_mixture_path

    rows = [json.loads(line) for line in (data or bundled_mixture_path()).read_text().splitlines() if line.strip()]
    tasks = sorted({r["task"] for r in rows})
    files = {}
    (out / "data").mkdir(parents=True, exist_ok=True)
    for t in tasks:
        files[t] = out / "data" / f"{t}.jsonl"
        files[t].write_text("\n".join(json.dumps(r) for r in rows if r["task"] == t) + "\n")
    iid = [r for r in rows if r["task"] == iid_task]
    train = [r for r in iid if r.get("split") == "train"]
    test = [r for r in iid if r.get("split") == "test"]
    for half in (0, 1):
        name = f"{iid_task}-iid{half}"
        files[name] = out / "data" / f"{name}.jsonl"
        files[name].write_text("\n".join(json.dumps(r) for r in train[half::2] + test) + "\n")
    return files


def _train(out: Path, name: str, data: Path, extra: dict, slots) -> int:
    run = out / "runs" / name
    if (run / "adapter" / "adapter_model.safetensors").is_file():
        return 0
    from study_common import train_command

    cmd = train_command(run, {"data": str(data), "method": "lora", "seed": SEED, "schedule": "gpu", "max_steps": STEPS,
                              "r": 8, "lora_alpha": 16, "target_modules": "all-linear", "learning_rate": 1e-3,
                              "per_device_batch_size": 32, "gradient_accumulation_steps": 2, "save_steps": 10_000, "eval_batch_size": 64, "eval_base": "false",
                              "report": "false", "eval_max_per_task": 10, "loraplus_lr_ratio": None, **extra})
    run.parent.mkdir(parents=True, exist_ok=True)
    with slots.env() as env, open(str(run) + ".log", "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def _initial_A(model_name: str) -> dict[str, np.ndarray]:
    """LoRA's A at initialisation for SEED (run_train seeds right before building the adapter)."""
    from transformers import set_seed

    from hydralora.models import load_model_and_tokenizer
    from hydralora.recipes.methods import build_model

    base, _ = load_model_and_tokenizer(model_name, dtype="float32")
    set_seed(SEED)
    model = build_model(base, "lora", {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"})
    return {k.replace(".default", ""): v.detach().float().numpy() for k, v in model.state_dict().items() if "lora_A" in k}


def _cos_matrix(vectors: list[np.ndarray]) -> np.ndarray:
    m = np.stack([v.ravel() / (np.linalg.norm(v) + 1e-12) for v in vectors])
    return m @ m.T


def run_observation2(out: Path, workers: int = 8, extra: dict | None = None, iid_task: str = IID_TASK, slots=None) -> dict:
    """`extra` overrides recipe fields of every run (model=..., data=... for the toy test); `slots`: run_study's
    WorkerSlots (CPU threads and GPU per run), built for `workers` when not given."""
    from safetensors.numpy import load_file

    from study_common import WorkerSlots

    slots = slots or WorkerSlots(workers)
    extra = dict(extra or {})
    data = Path(extra.pop("data")) if "data" in extra else None
    out.mkdir(parents=True, exist_ok=True)
    files = _write_task_files(out, data, iid_task)
    with ThreadPoolExecutor(workers) as pool:
        rcs = dict(zip(files, pool.map(lambda kv: _train(out, kv[0], kv[1], extra, slots), files.items())))
    names = [n for n, rc in rcs.items() if rc == 0]
    adapters = {n: load_file(str(out / "runs" / n / "adapter" / "adapter_model.safetensors")) for n in names}
    A0 = _initial_A(extra.get("model", "smollm2"))
    modules = sorted(k[: -len(".lora_A.weight")] for k in adapters[names[0]] if k.endswith(".lora_A.weight"))
    sims = {"A": [], "dA": [], "B": []}
    for mod in modules:
        A = [adapters[n][mod + ".lora_A.weight"] for n in names]
        B = [adapters[n][mod + ".lora_B.weight"] for n in names]
        a0 = A0.get(mod + ".lora_A.weight")
        sims["A"].append(_cos_matrix(A))
        sims["B"].append(_cos_matrix(B))
        if a0 is not None:
            sims["dA"].append(_cos_matrix([a - a0 for a in A]))
    mean = {k: np.mean(v, 0) for k, v in sims.items() if v}
    off = ~np.eye(len(names), dtype=bool)
    task_names = [n for n in names if "-iid" not in n]
    ti = [names.index(n) for n in task_names]
    cross_task = ~np.eye(len(ti), dtype=bool)
    summary = {
        "runs": names, "steps": STEPS, "seed": SEED, "modules": len(modules),
        "mean_offdiag_cos": {k: float(v[off].mean()) for k, v in mean.items()},
        "mean_cross_task_cos": {k: float(v[np.ix_(ti, ti)][cross_task].mean()) for k, v in mean.items()},
        "iid_pair_cos": {k: float(v[names.index(f"{iid_task}-iid0"), names.index(f"{iid_task}-iid1")]) for k, v in mean.items()}
        if f"{iid_task}-iid0" in names and f"{iid_task}-iid1" in names else None,
        "matrices": {k: v.tolist() for k, v in mean.items()},
        "relative_A_change": float(np.mean([np.linalg.norm(adapters[n][m + ".lora_A.weight"] - A0[m + ".lora_A.weight"])
                                            / np.linalg.norm(A0[m + ".lora_A.weight"]) for n in names for m in modules
                                            if m + ".lora_A.weight" in A0])),
    }
    (out / "observation2.json").write_text(json.dumps(summary, indent=1))
    _plot(out, names, mean, adapters, modules)
    return summary


def _plot(out: Path, names, mean, adapters, modules) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("A", "dA", "B") if k in mean]
    titles = {"A": "A (as trained)", "dA": "A - A_init (learned part)", "B": "B"}
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.6))
    for ax, k in zip(np.atleast_1d(axes), keys):
        im = ax.imshow(mean[k], vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(f"cosine similarity: {titles[k]}")
    fig.colorbar(im, ax=axes, fraction=0.02)
    fig.savefig(out / "obs2_similarity.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    mod = next((m for m in modules if "layers.15.self_attn.q_proj" in m), modules[len(modules) // 2])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, part in zip(axes, ("lora_A", "lora_B")):
        X = np.stack([adapters[n][f"{mod}.{part}.weight"].ravel() for n in names])
        X = X - X.mean(0)
        u, s, _ = np.linalg.svd(X, full_matrices=False)
        P = u[:, :2] * s[:2]
        ax.scatter(P[:, 0], P[:, 1])
        for (x, y), n in zip(P, names):
            ax.annotate(n, (x, y), fontsize=7)
        ax.set_title(f"PCA of {part} across runs ({mod.split('model.')[-1]})")
    fig.tight_layout()
    fig.savefig(out / "obs2_pca.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    summary = run_observation2(Path(sys.argv[1] if len(sys.argv) > 1 else "results/obs2"))
    print(json.dumps({k: v for k, v in summary.items() if k != "matrices"}, indent=1))
