"""The Markdown tables of docs/performance.md from the benchmarks' JSON: one table per benchmark, wall-clock first
and the GPU's busy time beside it, each with its command and machine, then the performance targets met or missed.

    python benchmarks/perf_tables.py results/perf/<date>/            # layer.json, train_step.json, generate.json
    python benchmarks/perf_tables.py DIR --out DIR/tables.md
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

# (file, title, columns (key, header, decimals)); the first numeric columns are wall-clock, GPU busy beside them
TABLES = [
    ("layer.json", "Layer: trainer step of one adapted projection", [
        ("variant", "variant", 0), ("ms", "ms", 3), ("x_base", "x base", 2), ("x_peft_r8", "x PEFT r8", 2),
        ("gpu_ms", "GPU busy ms", 3), ("gpu_x_base", "GPU x base", 2), ("gpu_x_peft_r8", "GPU x PEFT r8", 2),
        ("extra_mib", "peak extra MiB", 0)]),
    ("train_step.json", "Train step: LLaMA-7B-shaped, 8 layers", [
        ("targets", "targets", 0), ("checkpointing", "grad ckpt", 0), ("variant", "variant", 0),
        ("trainable_m", "trainable M", 2), ("ktok_s", "k tok/s", 1), ("vs_peft", "x PEFT", 2),
        ("step_ms", "step ms", 1), ("gpu_ms", "GPU busy ms", 1), ("gpu_vs_peft", "GPU speed x PEFT", 2),
        ("peak_gib", "peak GiB", 2), ("mem_vs_peft", "mem x PEFT", 2), ("mem_vs_r18", "mem x PEFT r18", 2)]),
    ("generate.json", "Decode", [
        ("model", "model", 0), ("batch", "batch", 0), ("variant", "variant", 0), ("decode_tok_s", "tok/s", 1),
        ("x_peft", "x PEFT", 2), ("x_base", "x base", 2), ("gpu_ms_step", "GPU busy ms/step", 3),
        ("gpu_x_peft", "GPU speed x PEFT", 2), ("peak_gib", "peak GiB", 2)]),
]


def fmt(v, nd: int) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def machine(env: dict) -> str:
    dev = env.get("gpu") or env.get("cpu") or env.get("device", "?")
    libs = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "transformers", "peft") if env.get(k))
    threads = f", {env['threads']} CPU threads" if env.get("device") == "cpu" else ""
    return f"{dev}{threads}; {libs}"


def table(payload: dict, title: str, cols) -> list[str]:
    rows = payload.get("rows", [])
    present = [c for c in cols if any(r.get(c[0]) is not None for r in rows)]
    out = [f"### {title}", "", f"`{payload.get('command', '?')}` on {machine(payload.get('env', {}))}, "
           f"{payload.get('env', {}).get('date', '?')}", "",
           "| " + " | ".join(h for _, h, _ in present) + " |", "|" + "|".join("---" for _ in present) + "|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r.get('variant', '?')} | error: {r['error']} |")
            continue
        out.append("| " + " | ".join(fmt(r.get(k), nd) for k, _, nd in present) + " |")
    return out + [""]


def _row(payload: Optional[dict], **match) -> Optional[dict]:
    for r in (payload or {}).get("rows", []):
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def targets(data: dict) -> list[tuple[str, Optional[float], str, bool]]:
    """(what, measured, target, met) for every target the JSON covers."""
    out = []

    def check(what, value, bound, higher):
        if value is not None:
            out.append((what, value, (">= " if higher else "<= ") + f"{bound:.2f}",
                        value >= bound if higher else value <= bound))

    layer = _row(data.get("layer.json"), variant="ours")
    if layer:
        check("layer step, x PEFT LoRA r8 (wall)", layer.get("x_peft_r8"), 1.00, False)
        check("layer step, x frozen base (wall, stretch)", layer.get("x_base"), 1.30, False)
    train = data.get("train_step.json")
    for tg, ck, bound in (("all-linear", "off", 1.10), ("qv", "off", 1.03), ("all-linear", "on", 1.00),
                          ("qv", "on", 1.00)):
        r = _row(train, targets=tg, checkpointing=ck, variant="ours")
        if r:
            check(f"train {tg}, ckpt {ck}: tok/s x PEFT", r.get("vs_peft"), bound, True)
            check(f"train {tg}, ckpt {ck}: peak memory x PEFT", r.get("mem_vs_peft"), 1.00, False)
    gen = data.get("generate.json")
    for r in (gen or {}).get("rows", []):
        if r["variant"] == "ours token":
            check(f"decode {r['model']} batch {r['batch']}: token routing tok/s x PEFT", r.get("x_peft"), 0.95, True)
        if r["variant"].startswith("ours merged"):
            check(f"decode {r['model']} batch {r['batch']}: merged tok/s x base", r.get("x_base"), 0.98, True)
    return out


def render(folder: str) -> str:
    data = {}
    for name, _, _ in TABLES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path) as f:
                data[name] = json.load(f)
    if not data:
        raise SystemExit(f"perf_tables: no {', '.join(n for n, _, _ in TABLES)} in {folder}")
    lines = []
    for name, title, cols in TABLES:
        if name in data:
            lines += table(data[name], title, cols)
    checks = targets(data)
    if checks:
        lines += ["### Targets", "", "| target | measured | bound | |", "|---|---|---|---|"]
        lines += [f"| {w} | {v:.2f} | {b} | {'met' if ok else 'MISSED'} |" for w, v, b, ok in checks]
        lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="where the suite's JSON files are")
    p.add_argument("--out", default=None, help="also write the Markdown here")
    args = p.parse_args()
    text = render(args.folder)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
