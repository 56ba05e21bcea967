"""Normalise rows of the supported data formats into one :class:`Example`.

Recognised (checked in this order):

- chat: ``{"messages": [{"role", "content"}, ...]}``; the prompt is every turn before the last
  assistant turn, rendered with the tokenizer's chat template; the target is that last turn;
- Alpaca: ``{"instruction", "input"?, "output"}`` (Dolly's ``context``/``response`` too);
- prompt/completion: ``{"prompt", "completion"}``;
- multi-task: ``{"task", "input", "target"}`` (generative; ``target`` may be a list of accepted
  answers, the first is trained on) or ``{"task", "input", "choices", "answer"}`` (multiple
  choice; ``answer`` is one of ``choices`` or its integer index).

Every format may carry ``task`` (default :data:`DEFAULT_TASK`) and ``split``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .io import DataError, read_rows

logger = logging.getLogger(__name__)

DEFAULT_TASK = "default"
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    """One training/evaluation example.

    prompt: text given to the model (for chat rows already rendered with the chat template,
    ``templated=True``). target: the text to learn/produce; for multiple choice, the answer.
    choices/answer: set only for multiple choice. aliases: other accepted answers for
    generative exact match. split: "train"/"validation"/"test" when the data says so.
    """

    task: str
    prompt: str
    target: str
    choices: list[str] | None = None
    answer: str | None = None
    split: str | None = None
    aliases: list[str] | None = None
    templated: bool = False

    @property
    def is_multiple_choice(self) -> bool:
        return self.choices is not None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and v is not False}


@dataclass
class LoadedExamples:
    """Result of :func:`load_examples`: the examples plus how many rows were skipped."""

    examples: list[Example]
    skipped: int = 0
    errors: list[str] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self):
        return iter(self.examples)

    @property
    def tasks(self) -> list[str]:
        return sorted({e.task for e in self.examples})


class _Ctx:
    """Where a row came from, so every error names file, line and field."""

    def __init__(self, path, line, unit="line"):
        self.path, self.line, self.unit = path, line, unit

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(message, self.path, self.line, field=field, unit=self.unit)


def _text(row: dict, key: str, ctx: _Ctx, required: bool = True, allow_empty: bool = False):
    if key not in row or row[key] is None:
        if required:
            raise ctx.error("missing required field", key)
        return None
    value = row[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # CSV/JSON numbers such as an answer "3" are fine as text
    if not isinstance(value, str):
        raise ctx.error(f"expected a string, got {type(value).__name__} {_short(value)}", key)
    if not allow_empty and not value.strip():
        raise ctx.error("must not be empty", key)
    return value


def _short(value, n: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= n else r[: n - 3] + "..."


def normalize_row(row: dict, *, path=None, line: int | None = None, tokenizer=None,
                  default_task: str = DEFAULT_TASK, unit: str = "line") -> Example:
    """Turn one row dict into an :class:`Example`; raise :class:`DataError` when malformed.

    ``tokenizer`` is needed only for chat rows (its chat template renders the prompt; without
    one a plain "role: content" rendering is used).
    """
    ctx = _Ctx(path, line, unit)
    if not isinstance(row, dict):
        raise ctx.error(f"expected an object, got {type(row).__name__}")
    task = _text(row, "task", ctx, required=False) or default_task
    split = _text(row, "split", ctx, required=False)
    if "messages" in row:
        prompt, target, templated = _chat(row["messages"], ctx, tokenizer)
        return Example(task, prompt, target, split=split, templated=templated)
    if "instruction" in row:
        instruction = _text(row, "instruction", ctx)
        in_key = "input" if "input" in row else "context"
        extra = _text(row, in_key, ctx, required=False, allow_empty=True)
        out_key = "output" if "output" in row or "response" not in row else "response"
        target = _text(row, out_key, ctx)
        prompt = instruction.strip() + (f"\n\n{extra.strip()}" if extra and extra.strip() else "")
        return Example(task, prompt, target, split=split)
    if "prompt" in row:
        return Example(task, _text(row, "prompt", ctx), _text(row, "completion", ctx),
                       split=split)
    if "input" in row:
        prompt = _text(row, "input", ctx)
        if "choices" in row:
            choices, answer = _choices(row, ctx)
            return Example(task, prompt, answer, choices=choices, answer=answer, split=split)
        if "target" not in row:
            raise ctx.error("multi-task rows need 'target' (generative) or 'choices' and "
                            "'answer' (multiple choice)", "target")
        target, aliases = _target(row, ctx)
        return Example(task, prompt, target, split=split, aliases=aliases)
    raise ctx.error(
        f"unrecognised row format (keys {sorted(row)}); expected one of: "
        "task/input/target, task/input/choices/answer, instruction/input/output, "
        "prompt/completion, messages")


def _target(row: dict, ctx: _Ctx) -> tuple[str, list[str] | None]:
    value = row["target"]
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise ctx.error(f"expected a non-empty string or list of non-empty strings, got "
                            f"{_short(value)}", "target")
        return value[0], (list(value) if len(value) > 1 else None)
    target = _text(row, "target", ctx)
    aliases = row.get("aliases")
    if aliases is not None:
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise ctx.error(f"expected a list of strings, got {_short(aliases)}", "aliases")
        aliases = [target] + [a for a in aliases if a != target]
    return target, aliases


def _choices(row: dict, ctx: _Ctx) -> tuple[list[str], str]:
    choices = row["choices"]
    if not isinstance(choices, list) or len(choices) < 2:
        raise ctx.error(f"expected a list of at least 2 strings, got {_short(choices)}",
                        "choices")
    choices = [str(c) if isinstance(c, (int, float)) and not isinstance(c, bool) else c
               for c in choices]
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise ctx.error(f"every choice must be a non-empty string, got {_short(choices)}",
                        "choices")
    if len(set(choices)) != len(choices):
        raise ctx.error(f"choices must be distinct, got {_short(choices)}", "choices")
    if "answer" not in row or row["answer"] is None:
        raise ctx.error("missing required field (multiple-choice rows need the correct "
                        "choice)", "answer")
    answer = row["answer"]
    if isinstance(answer, int) and not isinstance(answer, bool) and answer not in choices:
        if not 0 <= answer < len(choices):
            raise ctx.error(f"index {answer} out of range for {len(choices)} choices", "answer")
        answer = choices[answer]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or answer not in choices:
        raise ctx.error(f"{_short(answer)} is not one of the choices {_short(choices, 120)}",
                        "answer")
    return choices, answer


def _chat(messages, ctx: _Ctx, tokenizer) -> tuple[str, str, bool]:
    if not isinstance(messages, list) or not messages:
        raise ctx.error(f"expected a non-empty list of {{role, content}} objects, got "
                        f"{_short(messages)}", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ctx.error(f"item {i} must be an object with 'role' and 'content', got "
                            f"{_short(m)}", "messages")
        if m["role"] not in ROLES:
            raise ctx.error(f"item {i} has role {m['role']!r}; allowed: {list(ROLES)}",
                            "messages")
        if not isinstance(m["content"], str):
            raise ctx.error(f"item {i} content must be a string, got "
                            f"{type(m['content']).__name__}", "messages")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ctx.error("no assistant turn to learn from", "messages")
    if last == 0:
        raise ctx.error("the assistant turn has no preceding turn to use as prompt", "messages")
    target = messages[last]["content"]
    if not target.strip():
        raise ctx.error(f"item {last} (the last assistant turn) is empty", "messages")
    history = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(history, tokenize=False,
                                               add_generation_prompt=True)
        return prompt, target, True
    # No chat template: a plain transcript that ends where the assistant should speak.
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in history) + "assistant:"
    return prompt, target, False


def load_examples(path: str | os.PathLike, *, tokenizer=None, skip_bad_rows: bool = False,
                  default_task: str = DEFAULT_TASK, split: str | None = None,
                  hf_split: str | None = None) -> LoadedExamples:
    """Read and normalise a whole data file.

    split: keep only examples whose ``split`` field equals it (rows without one are kept only
    when ``split`` is None). hf_split: which split of a saved DatasetDict to read.
    Bad rows raise :class:`DataError`, or with ``skip_bad_rows`` are counted in ``.skipped``.
    """
    rows = read_rows(path, skip_bad_rows=skip_bad_rows, split=hf_split)
    out: list[Example] = []
    seen_splits: set = set()
    for line, row in rows:
        try:
            ex = normalize_row(row, path=rows.path, line=line, tokenizer=tokenizer,
                               default_task=default_task, unit=rows.unit)
        except DataError as err:
            rows.bad_row(err)
            continue
        seen_splits.add(ex.split)
        if split is None or ex.split == split:
            out.append(ex)
    if not seen_splits:  # every row was bad (and skipped)
        raise DataError(f"no usable examples: all {rows.skipped} rows were bad (first error: "
                        f"{rows.errors[0]})", path)
    if split is not None and not out:
        present = sorted(s for s in seen_splits if s is not None)
        raise DataError(f"no examples with split {split!r}; splits present: {present}", path)
    return LoadedExamples(out, rows.skipped, rows.errors)


def write_jsonl(rows, path: str | os.PathLike) -> Path:
    """Write dicts (or Examples, as multi-task rows) to JSONL, one per line."""
    import json

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for r in rows:
            if isinstance(r, Example):
                r = example_to_row(r)
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return p


def example_to_row(ex: Example) -> dict:
    """An Example as a multi-task format row (the inverse of :func:`normalize_row`)."""
    row = {"task": ex.task, "input": ex.prompt}
    if ex.is_multiple_choice:
        row.update(choices=ex.choices, answer=ex.answer)
    else:
        row["target"] = ex.aliases if ex.aliases else ex.target
    if ex.split:
        row["split"] = ex.split
    return row
