"""``hydralora analyze DATA``: suggest N for a data file and write the evidence.

``hydralora/cli.py`` calls :func:`add_analyze_parser` on its subparsers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .methods import AUTO_N_METHODS, DEFAULT_METHOD, ClusteringError

# Fields tried, in order, when --field is not given.
TEXT_FIELDS = ("instruction", "input", "prompt", "messages", "text", "question")


def add_analyze_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "analyze", help="suggest the number of experts N for a data file",
        description="Cluster the texts of DATA for K in [k-min, k-max] and suggest N. "
                    "Writes DIR/analysis.json, DIR/labels.jsonl and DIR/elbow.png.")
    p.add_argument("data", metavar="DATA", help="JSONL, JSON, CSV or parquet file")
    p.add_argument("--field", default=None,
                   help="column holding the text (default: instruction(+input), input, "
                        "prompt, user messages, text or question)")
    p.add_argument("--out", default="analysis", metavar="DIR", help="output folder")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=AUTO_N_METHODS)
    p.add_argument("--k-min", type=int, default=2)
    p.add_argument("--k-max", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip unreadable rows and rows without text instead of stopping")
    p.set_defaults(func=run_analyze)
    return p


def _user_text(messages, where: str) -> str:
    if not isinstance(messages, list):
        raise ClusteringError(f"{where}: field 'messages' is {type(messages).__name__}; "
                              "allowed: a list of {'role', 'content'} objects")
    parts = [str(m.get("content", "")) for m in messages
             if isinstance(m, dict) and m.get("role") == "user"]
    return "\n".join(p for p in parts if p.strip())


def row_text(row: dict, field: str | None = None, where: str = "row") -> str:
    """The text to cluster of one row; raises ClusteringError naming ``where`` and the field."""
    if field is not None:
        if field not in row:
            raise ClusteringError(f"{where}: no field {field!r} (fields: {', '.join(map(str, row))})")
        value = row[field]
        text = _user_text(value, where) if isinstance(value, list) else value
        if not isinstance(text, str) or not text.strip():
            raise ClusteringError(f"{where}: field {field!r} is {text!r:.60}; "
                                  "allowed: a non-empty string")
        return text
    if isinstance(row.get("instruction"), str) and row["instruction"].strip():
        extra = row.get("input")
        return row["instruction"] + ("\n" + extra if isinstance(extra, str) and extra.strip() else "")
    for name in TEXT_FIELDS[1:]:
        if name not in row or row[name] is None:
            continue
        value = row[name]
        text = _user_text(value, where) if name == "messages" else value
        if isinstance(text, str) and text.strip():
            return text
        raise ClusteringError(f"{where}: field {name!r} is {value!r:.60}; "
                              "allowed: a non-empty string" +
                              (" (user messages)" if name == "messages" else ""))
    raise ClusteringError(f"{where}: no text field; looked for {', '.join(TEXT_FIELDS)} "
                          f"(fields: {', '.join(map(str, row))}); pass --field")


def load_texts(path, field: str | None = None, skip_bad_rows: bool = False):
    """Texts, line numbers and task names (None where a row has no "task") of a data file."""
    from ..data.io import read_rows  # here, not at the top: hydralora.data's package loads torch

    path = Path(path)
    texts, lines, tasks = [], [], []
    skipped = 0
    for line, row in read_rows(path, skip_bad_rows=skip_bad_rows):
        where = f"{path}:{line}"
        if not isinstance(row, dict):
            raise ClusteringError(f"{where}: row is {type(row).__name__}; allowed: an object")
        try:
            text = row_text(row, field, where)
        except ClusteringError:
            if not skip_bad_rows:
                raise
            skipped += 1
            continue
        texts.append(text)
        lines.append(line)
        tasks.append(str(row["task"]) if row.get("task") is not None else None)
    if not texts:
        raise ClusteringError(f"{path}: no rows with text" +
                              (f" ({skipped} rows without text skipped)" if skipped else ""))
    return texts, lines, tasks, skipped


def run_analyze(args) -> int:
    """Run ``hydralora analyze``; 0 on success, 2 (with one ``error:`` line) on bad input."""
    try:
        return _analyze(args)
    except (ValueError, OSError) as e:  # ClusteringError, DataError, unreadable files
        print(f"error: {e}", file=sys.stderr)
        return 2


def _analyze(args) -> int:
    from . import report
    from .select import suggest_num_experts

    t0 = time.perf_counter()
    data = Path(args.data)
    texts, lines, tasks, skipped = load_texts(data, args.field,
                                              getattr(args, "skip_bad_rows", False))
    if args.k_min > args.k_max:
        raise ClusteringError(f"--k-min {args.k_min} > --k-max {args.k_max}; "
                              "allowed: k-min <= k-max")
    if len(texts) <= args.k_max:
        raise ClusteringError(f"{data}: only {len(texts)} rows with text for K up to "
                              f"{args.k_max}; need more than {args.k_max} (or lower --k-max)")
    res = suggest_num_experts(texts, k_range=range(args.k_min, args.k_max + 1),
                              method=args.method, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "labels.jsonl", "w", encoding="utf-8") as f:
        for line, task, label in zip(lines, tasks, res.labels):
            rec = {"line": line, "cluster": int(label)}
            if task is not None:
                rec["task"] = task
            f.write(json.dumps(rec) + "\n")
    report.plot_scores(res, out / "elbow.png")
    summary = res.to_dict()
    summary.update({"data": str(data), "field": args.field, "labels_file": "labels.jsonl",
                    "plot_file": "elbow.png", "skipped_rows": skipped,
                    "seconds": round(time.perf_counter() - t0, 3),
                    "clustering_seconds": round(res.seconds, 3)})
    print(f"{data}: {len(texts)} texts, method {res.method}")
    print(report.score_table(res))
    print(f"chosen K = {res.k}")
    if all(t is not None for t in tasks):
        agree = report.task_agreement(res.labels, tasks)
        summary["task_agreement"] = agree
        print(f"\n{agree['num_tasks']} tasks in the data; adjusted Rand index clusters vs "
              f"tasks: {agree['adjusted_rand_index']:.3f}")
        print(report.contingency_text(agree))
    for note in res.notes:
        print(f"note: {note}")
    (out / "analysis.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'analysis.json'}, {out / 'labels.jsonl'}, {out / 'elbow.png'}")
    return 0
