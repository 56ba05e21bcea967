"""Accuracy of a causal LM on multi-task examples, BIG-bench/BBH style.

- Multiple choice: each choice is scored by the summed log-likelihood of its tokens after the
  prompt (as BIG-bench's ``multiple_choice_grade``); the top-scoring choice is the prediction.
  (prompt, choice) pairs are batched with left padding so every continuation ends at the last
  position and only the last few logits are materialised.
- Generative: greedy decoding (batched, left-padded), the first non-empty line of the output,
  exact match after :func:`normalize_answer` against the target or any alias.

Prompts are rendered exactly as for training (:mod:`hydralora.data.collate`). Works with any
Hugging Face causal LM and with a ``PeftModel`` wrapping one.
"""

from __future__ import annotations

import inspect
import re
from collections import defaultdict
from typing import Iterable, Sequence

import torch

from ..data.collate import (encode_continuation, encode_prompt, render_prompt,
                            truncate_left)
from ..data.formats import Example, normalize_row

# Sentence punctuation only: closing brackets are answers in themselves (dyck_languages "] }").
_PUNCT_END = re.compile(r"[\s.,;:!?]+$")


def normalize_answer(text: str) -> str:
    """strip, lower-case, collapse whitespace, drop trailing sentence punctuation (.,;:!?)."""
    text = " ".join(text.strip().lower().split())
    return _PUNCT_END.sub("", text)


def _as_examples(examples) -> list[Example]:
    out = []
    for i, e in enumerate(examples):
        out.append(e if isinstance(e, Example) else normalize_row(e, line=i + 1, unit="row"))
    if not out:
        raise ValueError("evaluate() got no examples")
    return out


def _forward_params(model) -> set[str]:
    """Keyword arguments the underlying transformers model's forward accepts."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def _device_of(model, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, device, left: bool = True):
    """(ids, attention mask), both (len(seqs), longest): every sequence padded on the left (or the right)."""
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            cols = slice(longest - len(s), longest) if left else slice(0, len(s))
            ids[i, cols] = torch.tensor(s, dtype=torch.long)
            mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def _lm_inputs(ids: torch.Tensor, mask: torch.Tensor, params: set[str], keep: int, **extra) -> dict:
    """Forward keyword arguments for left-padded ids: positions counted over real tokens only (absolute-position
    models such as GPT-2 need them; left padding would shift them) and only the last `keep` logits, where the
    model's forward takes those arguments."""
    kwargs = {"input_ids": ids, "attention_mask": mask, **extra}
    if "position_ids" in params:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = keep
    return kwargs


def _prompt_cache_ok(model) -> bool:
    """Whether one KV cache of a prompt may serve all of its choices: true unless a HydraLoRA layer routes by
    sequence (its gate is the mean over the scored tokens, prompt and choice, so it differs per choice)."""
    from ..routing import hydra_layers

    return all(layer.routing_mode != "sequence" for _, layer in hydra_layers(model))


def _cache_arg(params) -> str | None:
    """The forward's KV-cache argument: 'cache' (transformers 5.2x) or 'past_key_values' (earlier), else None."""
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _score_with_prompt_cache(model, params, prompts, conts, pad, device) -> list[list[float]] | None:
    """Summed log-likelihoods of every continuation of every prompt in one batch: the prompts run once (left-padded,
    their KV cache kept), then every (prompt, choice) row reads its prompt's cache. None where the model returns no
    cache that can be indexed by row (the caller then scores whole sequences)."""
    ids, mask = _pad(prompts, pad, device)  # (B, P)
    out = model(**_lm_inputs(ids, mask, params, 1, use_cache=True))
    cache = getattr(out, "cache", None)  # the name since transformers 5.2x
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None or not callable(getattr(cache, "batch_select_indices", None)):
        return None
    first = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # (B, V): predicts each choice's first token
    rows = [(b, j) for b, cs in enumerate(conts) for j in range(len(cs))]
    src = torch.tensor([b for b, _ in rows], dtype=torch.long, device=device)  # (R,) the prompt of each row
    cache.batch_select_indices(src)  # (R, ...) per layer: each row's prompt keys and values
    c_ids, c_mask = _pad([conts[b][j] for b, j in rows], pad, device, left=False)  # (R, L) right-padded choices
    longest = c_ids.shape[1]
    full = torch.cat([mask.index_select(0, src), c_mask], dim=1)  # (R, P + L)
    kwargs = {"input_ids": c_ids, "attention_mask": full, _cache_arg(params): cache, "use_cache": True}
    if "position_ids" in params:
        kwargs["position_ids"] = (full.cumsum(-1) - 1).clamp(min=0)[:, -longest:]  # (R, L)
    logprobs = torch.log_softmax(model(**kwargs).logits.float(), dim=-1)  # (R, L, V)
    scores = [[0.0] * len(cs) for cs in conts]
    for r, (b, j) in enumerate(rows):
        c = conts[b][j]
        # Token 0 is predicted by the prompt's last position, token t > 0 by the choice's position t - 1.
        tgt = torch.tensor(c[1:], dtype=torch.long, device=logprobs.device)
        pos = torch.arange(len(c) - 1, device=logprobs.device)
        scores[b][j] = float(first[b, c[0]]) + float(logprobs[r, pos, tgt].sum())
    return scores


@torch.no_grad()
def choice_loglikelihoods(model, tokenizer, examples: Sequence[Example], batch_size: int = 8,
                          device=None, use_chat_template: bool = False,
                          max_length: int = 1024, progress: bool = False,
                          share_prompt: bool = True) -> list[list[float]]:
    """Summed log-likelihood of every choice of every multiple-choice example.

    Returns one list per example, in choice order. The prompt is cut from the left when
    prompt + choice exceeds ``max_length``.

    share_prompt: an example whose choices all fit after its whole prompt runs its prompt once and
    scores every choice from the prompt's KV cache (``batch_size`` examples at a time): about
    1/C of the work for C choices, the same scores up to float rounding. Examples that need
    truncation, models without an indexable cache and HydraLoRA sequence routing score each
    (prompt, choice) sequence whole.
    """
    from tqdm.auto import tqdm

    device = _device_of(model, device)
    params = _forward_params(model)
    pad = _pad_id(tokenizer)
    encoded = []  # per example: (prompt ids, [choice ids])
    for i, ex in enumerate(examples):
        if not ex.choices:
            raise ValueError(f"example {i} (task {ex.task!r}) has no choices")
        prompt_text = render_prompt(ex, tokenizer, use_chat_template)
        conts = [encode_continuation(tokenizer, prompt_text, c)[: max_length - 1] for c in ex.choices]
        encoded.append((encode_prompt(tokenizer, prompt_text), conts))
    scores = [[0.0] * len(ex.choices) for ex in examples]
    whole = list(range(len(examples)))  # examples scored as whole (prompt, choice) sequences
    if share_prompt and "use_cache" in params and _cache_arg(params) and _prompt_cache_ok(model):
        fits = [i for i, (p, cs) in enumerate(encoded) if p and all(c and len(p) + len(c) <= max_length for c in cs)]
        fits.sort(key=lambda i: -len(encoded[i][0]))  # longest first: less padding, memory errors show early
        done = set()
        for start in tqdm(range(0, len(fits), batch_size), disable=not progress,
                          desc="multiple choice", unit="batch"):
            idx = fits[start:start + batch_size]
            got = _score_with_prompt_cache(model, params, [encoded[i][0] for i in idx],
                                           [encoded[i][1] for i in idx], pad, device)
            if got is None:
                break
            for i, s in zip(idx, got):
                scores[i] = s
            done.update(idx)
        whole = [i for i in whole if i not in done]
    requests = []  # (example index, choice index, prompt ids, continuation ids)
    for i in whole:
        p_ids, conts = encoded[i]
        for j, c_ids in enumerate(conts):
            requests.append((i, j, truncate_left(p_ids, max_length - len(c_ids), tokenizer.bos_token_id), c_ids))
    # Longest first: similar lengths share a batch (less padding), and an out-of-memory error
    # shows up on the first batch rather than at the end.
    order = sorted(range(len(requests)), key=lambda k: -(len(requests[k][2]) + len(requests[k][3])))
    for start in tqdm(range(0, len(order), batch_size), disable=not progress or not order,
                      desc="multiple choice", unit="batch"):
        batch = [requests[k] for k in order[start:start + batch_size]]
        ids, mask = _pad([p + c for _, _, p, c in batch], pad, device)
        keep = max(len(c) for *_, c in batch) + 1  # only the continuation's logits: saves memory
        logits = model(**_lm_inputs(ids, mask, params, keep)).logits[:, -keep:, :].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for b, (i, j, _, c) in enumerate(batch):
            n = len(c)
            # Token t of the continuation sits at kept index keep-n+t and is predicted by the
            # logits one position earlier.
            pos = torch.arange(keep - n - 1, keep - 1, device=logprobs.device)
            tgt = torch.tensor(c, dtype=torch.long, device=logprobs.device)
            scores[i][j] = float(logprobs[b, pos, tgt].sum())
    return scores


class _StopAtNewline:
    """Stop a row once its generated text has a line break after some content."""

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        done = []
        for row in input_ids[:, self.prompt_len:]:
            text = self.tokenizer.decode(row, skip_special_tokens=True).lstrip()
            done.append("\n" in text)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


@torch.no_grad()
def generate_answers(model, tokenizer, examples: Sequence[Example], batch_size: int = 8,
                     max_new_tokens: int = 32, device=None, use_chat_template: bool = False,
                     max_length: int = 1024, progress: bool = False) -> list[str]:
    """Greedy answers (first non-empty line of the generated text), one per example."""
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    device = _device_of(model, device)
    room = max(max_length - max_new_tokens, 1)
    prompts = []
    for ex in examples:
        ids = encode_prompt(tokenizer, render_prompt(ex, tokenizer, use_chat_template))
        prompts.append(truncate_left(ids, room, tokenizer.bos_token_id))
    order = sorted(range(len(prompts)), key=lambda k: -len(prompts[k]))
    answers = [""] * len(prompts)
    pad = _pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    for start in tqdm(range(0, len(order), batch_size), disable=not progress,
                      desc="generation", unit="batch"):
        idx = order[start:start + batch_size]
        ids, mask = _pad([prompts[k] for k in idx], pad, device)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=pad,
            **({"eos_token_id": eos} if eos is not None else {}),
            stopping_criteria=StoppingCriteriaList([_StopAtNewline(tokenizer, ids.shape[1])]),
        )
        for row, k in zip(out[:, ids.shape[1]:], idx):
            answers[k] = first_line(tokenizer.decode(row, skip_special_tokens=True))
    return answers


def evaluate(model, tokenizer, examples: Iterable, batch_size: int = 8,
             max_new_tokens: int = 32, device=None, *, use_chat_template: bool = False,
             max_length: int = 1024, progress: bool = False,
             return_predictions: bool = False) -> dict:
    """Per-task and mean accuracy of ``model`` on ``examples`` (Examples or row dicts).

    Returns ``{"mean_accuracy": macro mean over tasks, "micro_accuracy": over examples,
    "n_examples": N, "per_task": {task: accuracy}, "tasks": {task: {"accuracy", "n",
    "correct", "kind": "mc"|"gen"|"mixed"}}}`` plus ``"predictions"`` (one dict per example, in
    input order) when ``return_predictions``. The model is put in eval mode and restored.
    """
    examples = _as_examples(examples)
    was_training = model.training
    model.eval()
    try:
        mc_idx = [i for i, e in enumerate(examples) if e.is_multiple_choice]
        gen_idx = [i for i, e in enumerate(examples) if not e.is_multiple_choice]
        preds: list[dict] = [{} for _ in examples]
        if mc_idx:
            ll = choice_loglikelihoods(model, tokenizer, [examples[i] for i in mc_idx],
                                       batch_size, device, use_chat_template, max_length,
                                       progress)
            for i, scores in zip(mc_idx, ll):
                ex = examples[i]
                pick = ex.choices[max(range(len(scores)), key=scores.__getitem__)]
                preds[i] = {"task": ex.task, "prediction": pick, "answer": ex.answer,
                            "correct": pick == ex.answer, "scores": scores}
        if gen_idx:
            outs = generate_answers(model, tokenizer, [examples[i] for i in gen_idx],
                                    batch_size, max_new_tokens, device, use_chat_template,
                                    max_length, progress)
            for i, text in zip(gen_idx, outs):
                ex = examples[i]
                accepted = {normalize_answer(a) for a in (ex.aliases or [ex.target])}
                accepted.add(normalize_answer(ex.target))
                preds[i] = {"task": ex.task, "prediction": text, "answer": ex.target,
                            "correct": normalize_answer(text) in accepted}
    finally:
        if was_training:
            model.train()
    tasks: dict[str, dict] = defaultdict(lambda: {"n": 0, "correct": 0, "kinds": set()})
    for ex, p in zip(examples, preds):
        t = tasks[ex.task]
        t["n"] += 1
        t["correct"] += int(p["correct"])
        t["kinds"].add("mc" if ex.is_multiple_choice else "gen")
    table = {}
    for name in sorted(tasks):
        t = tasks[name]
        kinds = t.pop("kinds")
        table[name] = {"accuracy": t["correct"] / t["n"], "n": t["n"], "correct": t["correct"],
                       "kind": kinds.pop() if len(kinds) == 1 else "mixed"}
    result = {
        "mean_accuracy": sum(v["accuracy"] for v in table.values()) / len(table),
        "micro_accuracy": sum(v["correct"] for v in table.values()) / len(examples),
        "n_examples": len(examples),
        "per_task": {k: v["accuracy"] for k, v in table.items()},
        "tasks": table,
    }
    if return_predictions:
        result["predictions"] = preds
    return result


def format_table(results: dict, baseline: dict | None = None, title: str = "adapted",
                 baseline_title: str = "base") -> str:
    """A plain-text table of per-task accuracy; with ``baseline``, base vs adapted and delta."""
    tasks = sorted(set(results["per_task"]) | set((baseline or {}).get("per_task", {})))
    name_w = max([len("task"), len("mean (macro)")] + [len(t) for t in tasks])
    counts = results.get("tasks", {})

    def pct(v):
        return "   -  " if v is None else f"{100 * v:6.1f}"

    if baseline is None:
        lines = [f"{'task':<{name_w}}  {'n':>5}  {title:>8}", "-" * (name_w + 17)]
        for t in tasks:
            lines.append(f"{t:<{name_w}}  {counts.get(t, {}).get('n', ''):>5}  "
                         f"{pct(results['per_task'].get(t)):>8}")
        lines.append("-" * (name_w + 17))
        lines.append(f"{'mean (macro)':<{name_w}}  {results['n_examples']:>5}  "
                     f"{pct(results['mean_accuracy']):>8}")
        return "\n".join(lines)
    width = name_w + 39
    lines = [f"{'task':<{name_w}}  {'n':>5}  {baseline_title:>8}  {title:>8}  {'delta':>8}",
             "-" * width]

    def row(name, n, b, a):
        d = "" if a is None or b is None else f"{100 * (a - b):+8.1f}"
        return f"{name:<{name_w}}  {n:>5}  {pct(b):>8}  {pct(a):>8}  {d:>8}"

    for t in tasks:
        lines.append(row(t, counts.get(t, {}).get("n", ""), baseline["per_task"].get(t),
                         results["per_task"].get(t)))
    lines.append("-" * width)
    lines.append(row("mean (macro)", results["n_examples"], baseline["mean_accuracy"],
                     results["mean_accuracy"]))
    return "\n".join(lines)
