#!/usr/bin/env python3
"""Build src/hydralora/data/bundled/bbh_mix.jsonl and its NOTICE from BIG-bench.

Eight BBH-source BIG-bench tasks with short inputs (so a 135M model trains on CPU quickly),
six multiple choice and two generative, up to PER_TASK examples each, TEST_PER_TASK of them held
out as "test" and the rest "train". Deterministic for a given BIG-bench version and seed.

    python scripts/build_bundled_mix.py [--sdist bigbench-1.0.0.tar.gz] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hydralora.data.bigbench import BIGBENCH_VERSION, build_mixture, ensure_bigbench, summarize

TASKS = [
    "sports_understanding",   # mc, 2 choices
    "navigate",               # mc, True/False
    "hyperbaton",             # mc, a/b
    "date_understanding",     # mc, 6 dates
    "disambiguation_qa",      # mc, 3 antecedents
    "ruin_names",             # mc, 4 edits
    "object_counting",        # generative, a number word
    "word_sorting",           # generative, a sorted word list (<= 8 words, see below)
]
# BIG-bench's word_sorting has 2..20 words per list (100 of each); longer lists need 50+ new
# tokens per answer, so keep the short ones: fast CPU evaluation, learnable at 135M.
MAX_SORT_WORDS = 8
PER_TASK = 300
TEST_PER_TASK = 60
OUT_DIR = Path(__file__).resolve().parents[1] / "src" / "hydralora" / "data" / "bundled"

NOTICE = """\
bbh_mix.jsonl: examples from BIG-bench (Beyond the Imitation Game benchmark),
https://github.com/google/BIG-bench, version {version} (PyPI sdist bigbench=={version}).

Copyright 2020 Google LLC and the BIG-bench authors.
Licensed under the Apache License, Version 2.0; you may obtain a copy of the License at
http://www.apache.org/licenses/LICENSE-2.0. Distributed on an "AS IS" BASIS, WITHOUT
WARRANTIES OR CONDITIONS OF ANY KIND.

Changes: examples were sampled (seed {seed}, at most {per_task} per task, duplicate prompts
removed; word_sorting lists of at most {max_words} words), formatted with each task's prefixes into the hydralora multi-task format
({{"task","input","target"}} or {{"task","input","choices","answer"}}) and given a
"split" field ({test} test per task, the rest train) by scripts/build_bundled_mix.py.
BIG-bench asks that its canary string accompany its data so it stays out of web-scale
pretraining corpora:
{canary}

Tasks (BIG-bench name: kind, train/test examples):
{table}
"""


def _short_enough(row: dict) -> bool:
    return row["task"] != "word_sorting" or len(row["target"].split()) <= MAX_SORT_WORDS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", help="an existing bigbench-1.0.0.tar.gz (else pip downloads it)")
    ap.add_argument("--cache-dir", help="where to extract BIG-bench task files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)

    tasks_dir = ensure_bigbench(cache_dir=args.cache_dir, sdist=args.sdist)
    rows = build_mixture(TASKS, per_task=PER_TASK, seed=args.seed,
                         splits={"test": TEST_PER_TASK, "train": -1}, tasks_dir=tasks_dir,
                         row_filter=_short_enough)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "bbh_mix.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for r in rows:
            r = {k: v for k, v in r.items() if k != "subtask"}
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    table = summarize(rows)
    lines = [f"  {t}: {v['kind']}, {v.get('train', 0)}/{v.get('test', 0)}"
             for t, v in table.items()]
    canary = json.loads((tasks_dir / TASKS[0] / "task.json").read_text())["canary"]
    (args.out_dir / "NOTICE").write_text(NOTICE.format(
        canary=canary, max_words=MAX_SORT_WORDS, version=BIGBENCH_VERSION, seed=args.seed, per_task=PER_TASK, test=TEST_PER_TASK,
        table="\n".join(lines)))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {len(rows)} rows)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
