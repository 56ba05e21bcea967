"""BIG-bench JSON tasks as multi-task rows.

The task files come from the ``bigbench==1.0.0`` sdist (Apache-2.0), fetched once with
``pip download`` (or taken from an sdist you already have: argument ``sdist=`` or env
``HYDRALORA_BIGBENCH_SDIST``); only ``benchmark_tasks/*/task.json`` and subtask
``benchmark_tasks/*/*/task.json`` are extracted, into ``$HYDRALORA_CACHE/bigbench`` (default
``~/.cache/hydralora/bigbench``). Env ``HYDRALORA_BIGBENCH_DIR`` may point at an existing
``benchmark_tasks`` folder (e.g. a BIG-bench git checkout) instead.

Task names: ``logical_deduction`` reads all its subtasks; ``logical_deduction:three_objects``
(or ``logical_deduction/three_objects``) reads one. The row's ``task`` is the name as given.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from .._fs import staged_dir
from .io import DataError

logger = logging.getLogger(__name__)

BIGBENCH_VERSION = "1.0.0"
_DONE_MARKER = ".complete"

# The BIG-bench tasks that BIG-Bench Hard (BBH) was drawn from.
BBH_SOURCE_TASKS = (
    "causal_judgment", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies_syllogisms_negation", "geometric_shapes", "hyperbaton",
    "logical_deduction", "movie_recommendation", "navigate", "object_counting",
    "penguins_in_a_table", "reasoning_about_colored_objects", "ruin_names",
    "salient_translation_error_detection", "snarks", "sports_understanding",
    "temporal_sequences", "tracking_shuffled_objects", "word_sorting",
)

# BIG-bench's own defaults for JSON tasks (bigbench/api/json_task.py).
_DEFAULT_INPUT_PREFIX = "\nQ: "
_DEFAULT_OUTPUT_PREFIX = "\nA: "
_DEFAULT_CHOICE_PREFIX = "\n  choice: "


def bigbench_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from ..models import cache_root

    return cache_root() / "bigbench"


def ensure_bigbench(cache_dir: str | os.PathLike | None = None,
                    sdist: str | os.PathLike | None = None) -> Path:
    """Return the ``benchmark_tasks`` folder, downloading/extracting it on first use.

    Order: env ``HYDRALORA_BIGBENCH_DIR``; the extracted cache; the sdist given by ``sdist``
    or env ``HYDRALORA_BIGBENCH_SDIST``; else ``pip download`` (358 MB, once).
    """
    env_dir = os.environ.get("HYDRALORA_BIGBENCH_DIR")
    if env_dir and cache_dir is None and sdist is None:
        d = Path(env_dir).expanduser()
        if not d.is_dir():
            raise DataError(f"HYDRALORA_BIGBENCH_DIR={env_dir!r} is not a directory; it must "
                            f"point at BIG-bench's bigbench/benchmark_tasks folder")
        return d
    root = bigbench_cache_dir(cache_dir)
    tasks_dir = root / "benchmark_tasks"
    if (root / _DONE_MARKER).is_file() and tasks_dir.is_dir():
        return tasks_dir
    root.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(root / ".lock")):
        if (root / _DONE_MARKER).is_file() and tasks_dir.is_dir():
            return tasks_dir
        sdist = sdist or os.environ.get("HYDRALORA_BIGBENCH_SDIST")
        downloaded = None
        if sdist:
            sdist_path = Path(sdist).expanduser()
            if not sdist_path.is_file():
                raise DataError(f"BIG-bench sdist {str(sdist_path)!r} does not exist; expected "
                                f"bigbench-{BIGBENCH_VERSION}.tar.gz")
        else:
            downloaded = Path(tempfile.mkdtemp(prefix="download-", dir=root))
            sdist_path = _pip_download(downloaded)
        try:
            n = _extract_task_files(sdist_path, root)
        finally:
            if downloaded is not None:  # the 358 MB archive is not needed once extracted
                shutil.rmtree(downloaded, ignore_errors=True)
        (root / _DONE_MARKER).write_text(f"bigbench {BIGBENCH_VERSION}: {n} task files\n")
        logger.info("extracted %d BIG-bench task files to %s", n, tasks_dir)
    return tasks_dir


def _pip_download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"bigbench=={BIGBENCH_VERSION}", "-d", str(dest)]
    logger.info("downloading the BIG-bench sdist (358 MB, once): %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(dest.glob("bigbench-*.tar.gz"))
    if proc.returncode != 0 or not archives:
        raise DataError(
            "could not download the BIG-bench sdist with pip "
            f"(exit {proc.returncode}): {proc.stderr.strip()[-500:]}\nIf you have the file, "
            "set HYDRALORA_BIGBENCH_SDIST=/path/to/bigbench-1.0.0.tar.gz")
    return archives[0]


def _extract_task_files(sdist: Path, root: Path) -> int:
    """Extract only benchmark_tasks/<task>[/<subtask>]/task.json into root/benchmark_tasks."""
    n = 0
    with staged_dir(root / "benchmark_tasks") as staging:
        with tarfile.open(sdist, "r:*") as tar:
            for member in tar:  # streaming: never holds the archive's index in memory
                if not member.isfile():
                    continue
                parts = member.name.split("/")
                try:
                    i = parts.index("benchmark_tasks")
                except ValueError:
                    continue
                rel = parts[i + 1:]
                if rel[-1] != "task.json" or len(rel) not in (2, 3) or ".." in rel:
                    continue
                out = staging.joinpath(*rel)
                out.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                n += 1
        if n == 0:
            raise DataError(f"{sdist} contains no benchmark_tasks/*/task.json; is it the "
                            f"bigbench sdist?")
    return n


def list_tasks(tasks_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the JSON tasks available (subtasks as ``task:subtask``)."""
    d = Path(tasks_dir) if tasks_dir else ensure_bigbench()
    names = []
    for p in sorted(d.glob("*/task.json")):
        names.append(p.parent.name)
        names.extend(f"{p.parent.name}:{s.parent.name}" for s in sorted(p.parent.glob("*/task.json")))
    return names


def _task_files(name: str, tasks_dir: Path) -> list[Path]:
    task, _, sub = name.replace("/", ":").partition(":")
    base = tasks_dir / task
    if not base.is_dir():
        close = difflib.get_close_matches(task, [p.name for p in tasks_dir.iterdir()
                                                 if p.is_dir()], n=3)
        raise DataError(f"unknown BIG-bench task {task!r}" +
                        (f"; did you mean {close}?" if close else ""), tasks_dir)
    if sub:
        f = base / sub / "task.json"
        if not f.is_file():
            subs = sorted(p.parent.name for p in base.glob("*/task.json"))
            raise DataError(f"task {task!r} has no subtask {sub!r}; subtasks: {subs}", base)
        return [f]
    subs = sorted(base.glob("*/task.json"))
    if subs:  # a parent task.json of a task with subtasks holds no examples
        return subs
    f = base / "task.json"
    if not f.is_file():
        raise DataError(f"task {task!r} has no task.json (a programmatic task.py task?); "
                        f"only JSON tasks are supported", base)
    return [f]


def _choice_rng(text: str) -> random.Random:
    # Seeded by the example text (not by Python's salted hash()) so choice order is the same
    # on every run and machine.
    return random.Random(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big"))


def format_example(spec: Mapping, example: Mapping, shuffle_choices: bool = True) -> dict | None:
    """One BIG-bench example as a multi-task row (without ``task``), or None if unusable.

    Follows BIG-bench's JSON-task formatting: task_prefix + example_input_prefix + input
    (+ the choices, when ``append_choices_to_input``) + example_output_prefix. The prompt is
    right-stripped of spaces; the collator puts one space before the answer.
    Choices are shuffled deterministically (as BIG-bench permutes them): several tasks list the
    correct answer first (date_understanding: 364 of 369), which a model would learn.
    """
    text = example.get("input")
    if not isinstance(text, str) or not text.strip():
        return None
    input_prefix = spec.get("example_input_prefix", _DEFAULT_INPUT_PREFIX)
    output_prefix = spec.get("example_output_prefix", _DEFAULT_OUTPUT_PREFIX)
    choice_prefix = spec.get("choice_prefix", _DEFAULT_CHOICE_PREFIX)
    task_prefix = spec.get("task_prefix", "")
    scores = example.get("target_scores")
    row: dict = {}
    body = text
    if isinstance(scores, dict) and scores:
        choices = [str(c) for c in scores]
        if shuffle_choices:
            _choice_rng(text).shuffle(choices)
        best = max(scores.values())
        answers = [str(c) for c, s in scores.items() if s == best]
        if len(answers) != 1 or len(set(choices)) != len(choices):
            return None  # ties or duplicates: no single correct choice to score against
        if spec.get("append_choices_to_input", True) and choice_prefix:
            body = body + choice_prefix + choice_prefix.join(choices)
        row.update(choices=choices, answer=str(answers[0]))
    else:
        target = example.get("target")
        if isinstance(target, list):
            target = [t for t in target if isinstance(t, str) and t.strip()]
            if not target:
                return None
            row["target"] = target[0]
            if len(target) > 1:
                row["aliases"] = target
        elif isinstance(target, str) and target.strip():
            row["target"] = target
        else:
            return None
    prompt = (task_prefix + input_prefix + body + output_prefix).strip(" ").lstrip("\n")
    row["input"] = prompt
    return row


def load_task(name: str, tasks_dir: str | os.PathLike | None = None) -> list[dict]:
    """All usable examples of a BIG-bench JSON task as multi-task rows.

    Multiple choice (``target_scores``): ``choices`` = its keys, ``answer`` = the top-scoring
    key (examples with tied top scores are dropped). Generative: ``target`` (first of a list;
    all listed answers go to ``aliases``). Rows carry ``task`` = ``name`` and, for subtasks,
    ``subtask``.
    """
    d = Path(tasks_dir) if tasks_dir else ensure_bigbench()
    rows = []
    for f in _task_files(name, d):
        try:
            spec = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"invalid JSON ({err.msg})", f, err.lineno) from err
        examples = spec.get("examples")
        if not isinstance(examples, list):
            raise DataError("task.json has no 'examples' list", f, field="examples")
        sub = f.parent.name if f.parent.parent != d else None
        dropped = 0
        for ex in examples:
            row = format_example(spec, ex) if isinstance(ex, dict) else None
            if row is None:
                dropped += 1
                continue
            row = {"task": name, **row}
            if sub:
                row["subtask"] = sub
            rows.append(row)
        if dropped:
            logger.info("%s: dropped %d examples without a single answer", f, dropped)
    if not rows:
        raise DataError(f"task {name!r} has no usable examples", d / name.split(":")[0])
    return rows


def _split_counts(n: int, splits) -> dict[str, int]:
    """Turn ``splits`` into per-split counts for ``n`` rows.

    ``splits``: a mapping name -> fraction (floats) or count (ints), or a 3-tuple for
    (train, validation, test). Fractions must sum to 1; with counts, a split given as -1 (or
    None) takes the rest. Empty splits are dropped.
    """
    if not isinstance(splits, Mapping):
        if len(splits) != 3:
            raise ValueError(f"splits={splits!r}: a tuple must be (train, validation, test)")
        splits = dict(zip(("train", "validation", "test"), splits))
    if not splits:
        raise ValueError("splits must name at least one split")
    values = list(splits.values())
    if any(isinstance(v, float) for v in values):  # fractions; (0.8, 0, 0.2) included
        if any(v is None or v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
            raise ValueError(f"split fractions {dict(splits)} must be >= 0 and sum to 1")
        counts = {k: int(v * n) for k, v in splits.items()}
        first = next(iter(counts))  # rounding leftovers go to the first split (train)
        counts[first] += n - sum(counts.values())
    else:
        rest = [k for k, v in splits.items() if v is None or v == -1]
        if len(rest) > 1:
            raise ValueError(f"splits={dict(splits)}: only one split may take the rest (-1)")
        fixed = {k: int(v) for k, v in splits.items() if k not in rest}
        if any(v < 0 for v in fixed.values()):
            raise ValueError(f"split counts {dict(splits)} must be >= 0 (or -1 for the rest)")
        if sum(fixed.values()) > n:
            raise ValueError(f"split counts {fixed} need {sum(fixed.values())} rows but only "
                             f"{n} are available")
        counts = {k: (n - sum(fixed.values()) if k in rest else fixed[k]) for k in splits}
    return {k: v for k, v in counts.items() if v > 0}


def build_mixture(tasks: Sequence[str], per_task: int | None = None, seed: int = 0,
                  splits=(0.8, 0.0, 0.2), tasks_dir: str | os.PathLike | None = None,
                  dedupe: bool = True,
                  row_filter: Callable[[dict], bool] | None = None) -> list[dict]:
    """A deterministic multi-task mixture with a ``split`` field per row.

    For each task independently (so adding a task never changes another's rows): drop
    duplicate prompts (a duplicate across train/test would leak), shuffle with a RNG seeded by
    ``(seed, task)``, keep ``per_task`` rows (all if None or fewer exist), then assign splits
    in order. Hold-out rows come first in the shuffled order, so with split counts (not
    fractions) a larger ``per_task`` only adds training rows and the test rows stay the same.
    """
    if not tasks:
        raise ValueError("tasks must name at least one BIG-bench task")
    if per_task is not None and per_task <= 0:
        raise ValueError(f"per_task={per_task} must be positive (or None for all)")
    d = Path(tasks_dir) if tasks_dir else ensure_bigbench()
    out: list[dict] = []
    for name in tasks:
        rows = load_task(name, d)
        if row_filter is not None:  # applied before sampling, so per_task still holds
            rows = [r for r in rows if row_filter(r)]
        if dedupe:
            seen, unique = set(), []
            for r in rows:
                if r["input"] not in seen:
                    seen.add(r["input"])
                    unique.append(r)
            rows = unique
        rng = random.Random(f"hydralora:{seed}:{name}")
        rng.shuffle(rows)
        if per_task is not None:
            if len(rows) < per_task:
                logger.warning("%s has only %d usable examples (< per_task=%d)", name,
                               len(rows), per_task)
            rows = rows[:per_task]
        counts = _split_counts(len(rows), splits)
        # Hold-out splits are taken from the front so they do not move when per_task grows.
        order = sorted(counts, key=lambda k: (k == "train", k))
        i = 0
        for split in order:
            for r in rows[i:i + counts[split]]:
                out.append({**r, "split": split})
            i += counts[split]
    return out


def parse_splits(text: str) -> dict:
    """CLI form ``train=0.8,test=0.2`` or ``test=50,train=-1`` -> mapping for build_mixture."""
    out = {}
    for part in text.split(","):
        name, eq, value = part.partition("=")
        if not eq or not name.strip():
            raise ValueError(f"--splits item {part!r} must look like name=value")
        value = value.strip()
        try:
            out[name.strip()] = int(value)
        except ValueError:
            try:
                out[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"--splits value {value!r} for {name!r} is not a number") \
                    from None
    return out


def summarize(rows: Iterable[dict]) -> dict[str, dict[str, int]]:
    """task -> split -> count (plus "kind": mc/gen), for printing."""
    table: dict[str, dict] = {}
    for r in rows:
        t = table.setdefault(r["task"], {"kind": "mc" if "choices" in r else "gen"})
        t[r.get("split", "-")] = t.get(r.get("split", "-"), 0) + 1
    return table
