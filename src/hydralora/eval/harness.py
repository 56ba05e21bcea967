"""lm-evaluation-harness (lm-eval 0.4): HydraLoRA's multi-task data as local lm-eval tasks, scored like `evaluate`.

Each task becomes one lm-eval task named ``hydralora_<task>``, built from the same held-out examples and the same
prompt text as :func:`hydralora.eval.scoring.evaluate`:

- multiple choice: ``output_type: multiple_choice`` with the choices as continuations (the separating space
  included, as training appends them), metric ``acc``: the choice with the highest summed log-likelihood, as
  ``evaluate`` picks it;
- generative: ``generate_until`` with greedy decoding for ``max_new_tokens`` tokens, scored by ``exact_match``
  computed like ``evaluate`` (first non-empty line, :func:`normalize_answer`, target or any alias).

Where the two can still differ: lm-eval tokenizes prompt + continuation as one string and splits it (``evaluate``
tokenizes the two apart; equal for tokenizers that split words at spaces), truncates over-long inputs by its own
rule (a window of max_length tokens), and batches with its own padding, so log-likelihoods agree to float rounding
and a near tie between two choices can flip. tests/test_harness.py shows both agreeing on the same examples.

The bundled BIG-bench mixture ships as task definitions in ``harness_tasks/`` (use them with
``TaskManager(include_path=harness_tasks_dir())``); ``hydralora eval --harness TASKS`` writes definitions for any
data file the same way and calls ``lm_eval.simple_evaluate`` with an ``HFLM`` over the PeftModel.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from ..data.collate import continuation_text, render_prompt
from ..data.formats import Example
from .scoring import first_line, normalize_answer

TASK_PREFIX = "hydralora_"
GROUP = "hydralora"
UTILS = "from hydralora.eval.harness import bundled_docs, process_results  # noqa: F401  (lm-eval's !function)\n"


def harness_tasks_dir() -> Path:
    """The shipped lm-eval task definitions of the bundled BIG-bench mixture."""
    return Path(__file__).with_name("harness_tasks")


def to_doc(example: Example, tokenizer=None, use_chat_template: bool = False) -> dict:
    """One lm-eval document: the rendered prompt, choices as continuations and the gold index, accepted answers."""
    prompt = render_prompt(example, tokenizer, use_chat_template)
    if example.is_multiple_choice:
        choices = [continuation_text(prompt, c) for c in example.choices]
        gold = example.choices.index(example.answer)
        answers: list[str] = []
    else:
        choices, gold = [], 0
        answers = sorted({normalize_answer(a) for a in [example.target, *(example.aliases or [])]})
    return {"task": example.task, "prompt": prompt, "choices": choices, "gold": gold, "answers": answers}


def process_results(doc: dict, results: Sequence[str]) -> dict:
    """Generative score as `evaluate` computes it: the first non-empty line, normalised, against every answer."""
    return {"exact_match": float(normalize_answer(first_line(results[0])) in set(doc["answers"]))}


def bundled_docs(task: str, **_metadata):
    """custom_dataset of the shipped task definitions: the bundled mixture's test rows of `task`."""
    import datasets

    from ..data import bundled_mixture_path
    from ..data.formats import load_examples

    rows = [to_doc(e) for e in load_examples(bundled_mixture_path(), split="test") if e.task == task]
    if not rows:
        raise ValueError(f"task={task!r}: the bundled mixture has no test rows of this task.")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _task_yaml(name: str, kind: str, dataset: str, max_new_tokens: int) -> str:
    # Field names, not Jinja templates: Jinja would drop a prompt's trailing newline.
    lines = [f"task: {TASK_PREFIX}{name}", dataset.rstrip("\n"), "test_split: test", "doc_to_text: prompt"]
    if kind == "mc":
        lines += ["output_type: multiple_choice", "doc_to_choice: choices", "doc_to_target: gold",
                  "target_delimiter: \"\"", "metric_list:", "  - metric: acc", "    aggregation: mean",
                  "    higher_is_better: true"]
    else:
        lines += ["output_type: generate_until", "doc_to_target: answers", "target_delimiter: \"\"",
                  "process_results: !function utils.process_results",
                  "generation_kwargs:", "  until: []", "  do_sample: false", f"  max_gen_toks: {int(max_new_tokens)}",
                  "metric_list:", "  - metric: exact_match", "    aggregation: mean", "    higher_is_better: true"]
    lines += ["metadata:", "  version: 1.0"]
    return "\n".join(lines) + "\n"


def _kinds(examples: Sequence[Example]) -> dict[str, str]:
    kinds: dict[str, set] = defaultdict(set)
    for e in examples:
        kinds[e.task].add("mc" if e.is_multiple_choice else "gen")
    mixed = sorted(t for t, k in kinds.items() if len(k) > 1)
    if mixed:
        raise ValueError(f"task(s) {mixed} mix multiple-choice and generative rows; an lm-eval task has one "
                         "output type: give them different task names.")
    return {t: k.pop() for t, k in kinds.items()}


def _write_common(out: Path, names: list[str]) -> None:
    (out / "utils.py").write_text(UTILS)
    group = [f"group: {GROUP}", "task:", *[f"  - {TASK_PREFIX}{n}" for n in names], "metadata:", "  version: 1.0"]
    (out / "_hydralora.yaml").write_text("\n".join(group) + "\n")


def write_bundled_tasks(out_dir: str | Path, max_new_tokens: int = 24) -> list[str]:
    """The shipped definitions (harness_tasks/): one YAML per bundled task, read through `bundled_docs`."""
    from ..data import bundled_mixture_path
    from ..data.formats import load_examples

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kinds = _kinds(list(load_examples(bundled_mixture_path(), split="test")))
    for name, kind in sorted(kinds.items()):
        dataset = f"custom_dataset: !function utils.bundled_docs\ndataset_kwargs:\n  task: {name}\n"
        (out / f"{name}.yaml").write_text(_task_yaml(name, kind, dataset, max_new_tokens))
    _write_common(out, sorted(kinds))
    return sorted(kinds)


def write_tasks(examples: Sequence[Example], out_dir: str | Path, tokenizer=None, use_chat_template: bool = False,
                max_new_tokens: int = 24) -> list[str]:
    """lm-eval task definitions for exactly `examples` (rendered as `evaluate` renders them) in `out_dir`: one
    YAML and one JSONL of documents per task, read with the `json` dataset builder (no hub access)."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    kinds = _kinds(examples)
    by_task: dict[str, list[dict]] = defaultdict(list)
    for e in examples:
        by_task[e.task].append(to_doc(e, tokenizer, use_chat_template))
    for name, docs in sorted(by_task.items()):
        docs_path = out / f"{name}.docs.jsonl"
        docs_path.write_text("".join(json.dumps(d) + "\n" for d in docs))
        dataset = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(docs_path))}\n"
        (out / f"{name}.yaml").write_text(_task_yaml(name, kinds[name], dataset, max_new_tokens))
    _write_common(out, sorted(by_task))
    return sorted(by_task)


def harness_metric(task_result: dict) -> Optional[float]:
    """The accuracy of one lm-eval task result: `acc` (multiple choice) or `exact_match` (generative)."""
    for key in ("acc,none", "exact_match,none"):
        if key in task_result:
            return float(task_result[key])
    return None


def run_harness(model, tokenizer, task_names: Sequence[str], include_path: str | Path, *, batch_size: int = 8,
                max_length: int = 1024, log_samples: bool = False) -> dict:
    """`lm_eval.simple_evaluate` over `model` (a PeftModel or any causal LM) on the named local tasks.

    Returns ``{"per_task": {task: accuracy}, "mean_accuracy": macro mean, "lm_eval": the harness's own results}``
    (plus ``"samples"`` with `log_samples`). Task names are the data's (without the ``hydralora_`` prefix).
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ValueError("--harness needs lm-evaluation-harness: pip install 'hydralora[eval]' "
                         f"(lm-eval>=0.4,<0.5); import failed: {err}") from None
    # add_bos_token=True: the tokenizer's own special tokens, as `evaluate` encodes prompts (a no-op for tokenizers
    # that add none)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, add_bos_token=True)
    manager = TaskManager(include_path=str(include_path), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=[TASK_PREFIX + t for t in task_names], task_manager=manager,
                          log_samples=log_samples, bootstrap_iters=0)
    per_task = {}
    for t in task_names:
        per_task[t] = harness_metric(out["results"][TASK_PREFIX + t])
    result = {"per_task": per_task, "mean_accuracy": sum(per_task.values()) / len(per_task),
              "lm_eval": out["results"]}
    if log_samples:
        result["samples"] = {t: out["samples"][TASK_PREFIX + t] for t in task_names}
    return result
