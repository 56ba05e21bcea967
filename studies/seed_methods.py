"""The seed's sibling methods in the study: LoPE on noisy data, MeTA-LoRA with few examples per task, ThanoRA at
matched trainable parameters (merged and unmerged). Runs through studies/run_study.py as `--part seed-methods`:

    python studies/run_study.py --out results/seed-methods/<date> --part seed-methods --workers 8
    python studies/seed_methods.py merged-eval --study results/seed-methods/<date>   # ThanoRA merged vs unmerged
    python studies/seed_methods.py report --study results/seed-methods/<date>        # the tables (markdown)

The derived training data (noisy and few-shot copies of the study mixture's training split; the test split is
always the clean original) is written once under <out>/seed-methods-data/ by `seed_method_parts`.

- noise: a stated fraction of the training examples made noisy, as LoPE's paper does with generated noise:
  'char' perturbs 10% of the prompt's characters (swaps, insertions, deletions) in 30% of the examples; 'label'
  replaces the answer of 30% of the examples by a wrong one. LoPE, HydraLoRA and LoRA on each, and on clean data.
- few-shot: 16, 32 and 64 training examples per task; MeTA-LoRA, LoRA and HydraLoRA on each, all for the same
  number of steps (fewer than the main study's: 16 per task is 192 examples).
- thanora: ThanoRA and LoRA at r = 16 and 32 (identical trainable parameters), and HydraLoRA at r=8 with 3 experts
  (about 1.1x LoRA-r16's parameters per layer: r*k + N*d*r + N*k against 2*r*k for d = k).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

NOISE_FRACTION = 0.3  # share of training examples made noisy
CHAR_RATE = 0.1  # share of a noisy prompt's characters perturbed
NOISE_KINDS = ("char", "label")  # build_noisy's kinds
FEW_SHOT = (16, 32, 64)  # training examples per task
FEW_SHOT_STEPS = 60  # every method the same; 60 steps of 64 is 20 epochs of 16 per task over 12 tasks

# name -> recipe overrides, for the derived data sets filled in by seed_method_parts
_NOISE_METHODS = {
    "lora-r8": {"method": "lora", "r": 8, "lora_alpha": 16},
    "hydralora-auto": {"method": "hydralora", "r": 8, "lora_alpha": 16, "num_experts": "auto"},
    "lope-auto": {"method": "lope", "r": 8, "lora_alpha": 16, "num_experts": "auto"},
}
_FEW_SHOT_METHODS = {
    "lora-r8": {"method": "lora", "r": 8, "lora_alpha": 16},
    "hydralora-auto": {"method": "hydralora", "r": 8, "lora_alpha": 16, "num_experts": "auto"},
    "meta-lora": {"method": "meta-lora", "r": 8, "lora_alpha": 16},
}
# ThanoRA gives every task at least one rank: r >= 12 for the study's 12 tasks.
_THANORA = {
    "thanora-r16": {"method": "thanora", "r": 16, "lora_alpha": 32},
    "thanora-r32": {"method": "thanora", "r": 32, "lora_alpha": 64},
    "lora-r16": {"method": "lora", "r": 16, "lora_alpha": 32},
    "lora-r32": {"method": "lora", "r": 32, "lora_alpha": 64},
    "hydralora-r8-N3": {"method": "hydralora", "r": 8, "lora_alpha": 16, "num_experts": 3},
}


def _write_once(rows: list[dict], dest: Path) -> Path:
    """Write JSONL rows to dest; an existing file must hold exactly these rows (never overwritten)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if dest.exists():
        if dest.read_text(encoding="utf-8") != text:
            raise FileExistsError(f"{dest} exists with other contents: remove it or choose another --out.")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text, encoding="utf-8")
    return dest


def _examples(source: Path):
    from hydralora.data.formats import load_examples

    examples = list(load_examples(source))
    train = [e for e in examples if e.split in ("train", None)]
    rest = [e for e in examples if e.split not in ("train", None)]
    if not train or not rest:
        raise ValueError(f"{source}: the study needs 'train' and 'test' rows in the split field.")
    return train, rest


def build_noisy(source: Path, dest: Path, kind: str, fraction: float = NOISE_FRACTION, rate: float = CHAR_RATE,
                seed: int = 0) -> Path:
    """`source` with `fraction` of its training rows made noisy ('char' or 'label'); other splits untouched."""
    from hydralora.data.formats import example_to_row
    from hydralora.methods.lope import noisy_examples

    train, rest = _examples(source)
    noisy = noisy_examples(train, fraction, kind, rate=rate, seed=seed)
    return _write_once([example_to_row(e) for e in noisy + rest], dest)


def build_subset(source: Path, dest: Path, per_task: int, seed: int = 0) -> Path:
    """`source` with `per_task` seeded training rows of each task (all of a smaller task); other splits untouched."""
    from hydralora.data.formats import example_to_row

    train, rest = _examples(source)
    by_task: dict[str, list] = defaultdict(list)
    for e in train:
        by_task[e.task].append(e)
    rng = random.Random(seed)
    kept = []
    for task in sorted(by_task):
        rows = list(by_task[task])
        rng.shuffle(rows)
        kept += rows[:per_task]
    return _write_once([example_to_row(e) for e in kept + rest], dest)


def seed_method_parts(source: Path, data_dir: Path) -> dict[str, dict[str, dict]]:
    """{'seed-methods': {config name: recipe overrides}}, writing the derived data under data_dir first."""
    configs: dict[str, dict] = {}
    datasets = {"clean": Path(source),
                **{kind: build_noisy(source, data_dir / f"noisy-{kind}.jsonl", kind) for kind in NOISE_KINDS}}
    for variant, path in datasets.items():
        for name, ov in _NOISE_METHODS.items():
            configs[f"noise-{variant}/{name}"] = {**ov, "data": str(path)}
    for k in FEW_SHOT:
        path = build_subset(source, data_dir / f"few-{k}.jsonl", k)
        for name, ov in _FEW_SHOT_METHODS.items():
            configs[f"few-{k}/{name}"] = {**ov, "data": str(path), "max_steps": FEW_SHOT_STEPS}
    for name, ov in _THANORA.items():
        configs[f"thanora/{name}"] = {**ov, "data": str(source)}
    return {"seed-methods": configs}


def eval_merged(run_dir: Path, device: Optional[str] = None) -> dict:
    """Score a ThanoRA run's adapter on the run's test examples in fp32, unmerged and then merged into the base
    weights (merge_and_unload); writes run_dir/eval_merged.json. Both are scored in one precision: the run's own
    score (metrics.json, kept as `unmerged_mean`) may come from bf16 autocast, whose rounding alone moves a few
    answers."""
    import peft
    import torch

    from hydralora.data.formats import load_examples
    from hydralora.eval.scoring import evaluate
    from hydralora.models import load_model_and_tokenizer
    from hydralora.recipes.train import cap_per_task, resolve_data_path, split_examples

    run = json.loads((run_dir / "config.json").read_text())
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base, tok = load_model_and_tokenizer(run["model"], dtype=torch.float32, device=device)
    model = peft.PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    _, test = split_examples(list(load_examples(resolve_data_path(run["data"]), tokenizer=tok)), int(run["seed"]))
    test = cap_per_task(test, run.get("eval_max_per_task"))

    def score(m) -> dict:
        return evaluate(m, tok, test, batch_size=int(run.get("eval_batch_size", 16)),
                        max_new_tokens=int(run.get("max_new_tokens", 24)), device=device,
                        use_chat_template=bool(run.get("use_chat_template")), max_length=run.get("max_seq_length"))

    unmerged_fp32 = score(model)
    result = score(model.merge_and_unload().eval())
    unmerged = json.loads((run_dir / "metrics.json").read_text())["adapted"]["mean_accuracy"]
    record = {"merged": result, "merged_mean": result["mean_accuracy"], "unmerged_mean": unmerged,
              "unmerged_fp32": unmerged_fp32, "unmerged_fp32_mean": unmerged_fp32["mean_accuracy"]}
    (run_dir / "eval_merged.json").write_text(json.dumps(record, indent=1))
    return record


def report(study: Path, lr_study: Optional[Path] = None) -> str:
    """The study's tables as markdown, from the runs' metrics.json (and eval_merged.json): test mean accuracy, mean
    ± sample standard deviation over the seeds present, and their count. `lr_study`: the same configurations run at
    another learning rate (`--set learning_rate=...`), shown as extra rows of the ThanoRA table."""
    from report_quality import stat

    def runs(root: Path, name: str) -> list[dict]:
        out = []
        for m in sorted(root.glob(f"seed-methods/{name}/seed*/metrics.json")):
            if m.parent.name[4:].isdigit():
                merged, config = m.parent / "eval_merged.json", m.parent / "config.json"
                rec = json.loads(merged.read_text()) if merged.is_file() else {}
                out.append({**json.loads(m.read_text()), "merged_mean": rec.get("merged_mean"),
                            "unmerged_fp32_mean": rec.get("unmerged_fp32_mean"),
                            "learning_rate": json.loads(config.read_text()).get("learning_rate") if config.is_file() else None})
        return out

    def cell(ms: list[dict], key=lambda m: m["adapted"]["mean_accuracy"]) -> str:
        return f"{stat([key(m) for m in ms])} ({len(ms)})" if ms else "-"

    def params(ms: list[dict]) -> str:
        values = sorted({m["trainable_params"] for m in ms})
        return "-" if not values else " / ".join(f"{v / 1e6:.2f} M" for v in values)

    out = ["Test mean accuracy on the clean test split, mean ± sd (seeds).\n",
           "| training data | " + " | ".join(f"{n} ({params(runs(study, f'noise-clean/{n}'))})" for n in _NOISE_METHODS) + " |",
           "|---|" + "---|" * len(_NOISE_METHODS)]
    for kind in ("clean",) + NOISE_KINDS:
        out.append(f"| {kind} | " + " | ".join(cell(runs(study, f"noise-{kind}/{n}")) for n in _NOISE_METHODS) + " |")
    out += ["", "| examples per task | " + " | ".join(_FEW_SHOT_METHODS) + " | training seconds (same order) |",
            "|---|" + "---|" * (len(_FEW_SHOT_METHODS) + 1)]
    for k in FEW_SHOT:
        cols = [runs(study, f"few-{k}/{n}") for n in _FEW_SHOT_METHODS]
        secs = " / ".join(stat([m["train_seconds"] for m in ms], 0) for ms in cols)
        out.append(f"| {k} | " + " | ".join(cell(ms) for ms in cols) + f" | {secs} |")
    out += ["", "| configuration | learning rate | trainable | test | merged (fp32) | merged - unmerged, both fp32 |",
            "|---|---|---|---|---|---|"]
    for root in [study] + ([lr_study] if lr_study else []):
        for n in _THANORA:
            ms = runs(root, f"thanora/{n}")
            if ms:
                lr = " / ".join(f"{v:g}" for v in sorted({m["learning_rate"] for m in ms if m["learning_rate"]})) or "-"
                merged = [m for m in ms if m["merged_mean"] is not None]
                paired = [m for m in merged if m["unmerged_fp32_mean"] is not None]
                diff = cell(paired, lambda m: m["merged_mean"] - m["unmerged_fp32_mean"])
                out.append(f"| {n} | {lr} | {params(ms)} | {cell(ms)} | {cell(merged, lambda m: m['merged_mean'])} "
                           f"| {diff} |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("merged-eval", help="Score every finished ThanoRA run of a study merged (eval_merged.json).")
    p.add_argument("--study", required=True, help="The study's --out folder.")
    p.add_argument("--device")
    p = sub.add_parser("report", help="The study's tables as markdown.")
    p.add_argument("--study", required=True, help="The study's --out folder.")
    p.add_argument("--lr-study", help="A --out folder of the ThanoRA configurations at another learning rate.")
    args = ap.parse_args()
    if args.cmd == "report":
        print(report(Path(args.study), Path(args.lr_study) if args.lr_study else None), end="")
        return 0
    runs = sorted(Path(args.study).glob("seed-methods/thanora/thanora-*/seed*/metrics.json"))
    if not runs:
        print(f"no finished ThanoRA runs under {args.study}/seed-methods/thanora", file=sys.stderr)
        return 1
    for metrics in runs:
        if (metrics.parent / "eval_merged.json").is_file():
            continue
        if not (metrics.parent / "adapter").is_dir():  # a run copied without its adapter cannot be merged
            print(f"{metrics.parent}: no adapter folder, skipped", flush=True)
            continue
        rec = eval_merged(metrics.parent, args.device)
        print(f"{metrics.parent}: unmerged {rec['unmerged_mean']:.4f} (the run's), {rec['unmerged_fp32_mean']:.4f} "
              f"(fp32); merged {rec['merged_mean']:.4f} (fp32)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
