"""``hydralora data ...`` subcommands; the top-level CLI calls :func:`add_data_parser`.

    hydralora data bigbench --tasks a,b,c --per-task N --out FILE [--seed S] [--splits ...]
    hydralora data check FILE [--skip-bad-rows]
"""

from __future__ import annotations

import argparse
import sys

from .io import DataError


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``data`` command (with ``bigbench`` and ``check``) to an argparse subparsers."""
    data = subparsers.add_parser("data", help="build and check data files",
                                 description="Build and check data files.")
    sub = data.add_subparsers(dest="data_command", metavar="{bigbench,check}")
    sub.required = True

    bb = sub.add_parser(
        "bigbench", help="write a BIG-bench task mixture as multi-task JSONL",
        description="Sample BIG-bench JSON tasks into one multi-task JSONL with a 'split' "
                    "field. Task names: 'logical_deduction' (all subtasks) or "
                    "'logical_deduction:three_objects'. The BIG-bench sdist is fetched with "
                    "pip once (358 MB) unless --sdist or HYDRALORA_BIGBENCH_SDIST names one.")
    bb.add_argument("--tasks", required=True,
                    help="comma-separated task names, or 'bbh' for all BBH-source tasks")
    bb.add_argument("--per-task", type=int, default=None,
                    help="examples per task (default: all)")
    bb.add_argument("--out", required=True, help="output JSONL file")
    bb.add_argument("--seed", type=int, default=0)
    bb.add_argument("--splits", default="train=0.8,test=0.2",
                    help="fractions 'train=0.8,validation=0.1,test=0.1' or counts per task "
                         "'test=50,train=-1' (-1: the rest); default %(default)s")
    bb.add_argument("--sdist", help="an existing bigbench-1.0.0.tar.gz to extract from")
    bb.add_argument("--cache-dir", help="where task files are extracted "
                                        "(default $HYDRALORA_CACHE/bigbench)")
    bb.set_defaults(func=_cmd_bigbench)

    ck = sub.add_parser("check", help="validate a data file and print per-task counts",
                        description="Read and normalise every row of a data file; report "
                                    "per-task/split counts and bad rows.")
    ck.add_argument("path", help="JSONL/JSON/CSV/parquet file or save_to_disk folder")
    ck.add_argument("--skip-bad-rows", action="store_true",
                    help="count and skip malformed rows instead of stopping at the first")
    ck.set_defaults(func=_cmd_check)
    return data


def _cmd_bigbench(args) -> int:
    from .bigbench import BBH_SOURCE_TASKS, build_mixture, ensure_bigbench, parse_splits, \
        summarize
    from .formats import write_jsonl

    try:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if tasks == ["bbh"]:
            tasks = list(BBH_SOURCE_TASKS)
        splits = parse_splits(args.splits)
        tasks_dir = ensure_bigbench(cache_dir=args.cache_dir, sdist=args.sdist)
        rows = build_mixture(tasks, per_task=args.per_task, seed=args.seed, splits=splits,
                             tasks_dir=tasks_dir)
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    path = write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} rows to {path}")
    _print_summary(summarize(rows))
    return 0


def _cmd_check(args) -> int:
    from collections import Counter

    from .formats import load_examples

    try:
        loaded = load_examples(args.path, skip_bad_rows=args.skip_bad_rows)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table: dict[str, Counter] = {}
    for ex in loaded.examples:
        c = table.setdefault(ex.task, Counter())
        c["mc" if ex.is_multiple_choice else "gen"] += 1
        c[ex.split or "-"] += 1
    print(f"{len(loaded.examples)} examples, {len(table)} tasks")
    for task, c in sorted(table.items()):
        print(f"  {task}: " + ", ".join(f"{k}={v}" for k, v in sorted(c.items())))
    if loaded.skipped:
        print(f"skipped {loaded.skipped} bad rows; first: {loaded.errors[0]}")
    return 0


def _print_summary(table: dict) -> None:
    for task, counts in table.items():
        kind = counts.get("kind")
        rest = ", ".join(f"{k}={v}" for k, v in counts.items() if k != "kind")
        print(f"  {task} ({kind}): {rest}")
