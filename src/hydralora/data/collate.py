"""Tokenisation for causal-LM SFT with the loss on response tokens only.

One prompt rendering is shared by training (:func:`encode_example`) and evaluation
(:mod:`hydralora.eval.scoring`), so a model is scored on exactly the format it was trained on:

- ``use_chat_template=True`` and the tokenizer has a chat template: the prompt becomes one user
  turn followed by the generation prompt; the target is the assistant's reply;
- otherwise the plain format ``prompt + " " + target`` (no space when the prompt already ends
  in whitespace, e.g. a newline).

Prompt and target are tokenised separately and concatenated, which fixes the boundary between
them (labels are exact) and matches how multiple-choice continuations are scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .formats import Example

IGNORE_INDEX = -100


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(example: Example, tokenizer, use_chat_template: bool = False) -> str:
    """The prompt text the model sees (before the target/choice)."""
    if example.templated:  # chat rows were rendered with the template when loaded
        return example.prompt
    if use_chat_template and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": example.prompt}], tokenize=False,
            add_generation_prompt=True)
    return example.prompt


def continuation_text(prompt_text: str, target: str) -> str:
    """The target as appended to the prompt: a separating space unless the prompt ends in one."""
    if not prompt_text or prompt_text[-1].isspace():
        return target
    return " " + target


def encode_prompt(tokenizer, prompt_text: str) -> list[int]:
    """Prompt ids with the tokenizer's usual special tokens (e.g. BOS) - unless the text already
    comes from a chat template, which carries its own."""
    ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    # Chat templates often start with BOS already; don't double it.
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def encode_continuation(tokenizer, prompt_text: str, target: str) -> list[int]:
    return tokenizer(continuation_text(prompt_text, target), add_special_tokens=False)["input_ids"]


def truncate_left(prompt_ids: list[int], keep: int, bos_token_id: int | None) -> list[int]:
    """Keep the last ``keep`` prompt tokens (the ones next to the answer); keep a leading BOS."""
    if len(prompt_ids) <= keep:
        return prompt_ids
    if keep <= 0:
        return []
    if bos_token_id is not None and prompt_ids and prompt_ids[0] == bos_token_id and keep > 1:
        return [bos_token_id] + prompt_ids[len(prompt_ids) - keep + 1:]
    return prompt_ids[len(prompt_ids) - keep:]


def encode_example(example: Example, tokenizer, max_length: int = 1024,
                   use_chat_template: bool = False, add_eos: bool = True) -> dict:
    """input_ids / attention_mask / labels for one example; labels are -100 on the prompt.

    Over ``max_length``: the prompt is cut from the left (its end, nearest the answer, stays);
    the target is only cut (from the right) if it alone leaves no room for one prompt token.
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length} is too small; need at least 2")
    prompt_text = render_prompt(example, tokenizer, use_chat_template)
    prompt_ids = encode_prompt(tokenizer, prompt_text)
    target_ids = encode_continuation(tokenizer, prompt_text, example.target)
    if add_eos and tokenizer.eos_token_id is not None:
        # EOS teaches the model to stop; with a chat template it is the end-of-turn token.
        target_ids = target_ids + [tokenizer.eos_token_id]
    if len(prompt_ids) + len(target_ids) > max_length:
        target_ids = target_ids[: max_length - 1]
        prompt_ids = truncate_left(prompt_ids, max_length - len(target_ids),
                                   tokenizer.bos_token_id)
    input_ids = prompt_ids + target_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(target_ids)
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


class SFTDataset(torch.utils.data.Dataset):
    """Examples tokenised once up front, for ``Trainer``/DataLoader with :class:`SFTCollator`.

    ``examples[i]`` stays available (e.g. its task) next to ``features[i]``.
    ``route_labels`` (one int per example, -1 for none) adds each example's target expert for
    HydraLoRA's routing-target loss; the collator passes them on as ``route_labels`` (B,).
    """

    def __init__(self, examples: Sequence[Example], tokenizer, max_length: int = 1024,
                 use_chat_template: bool = False, route_labels: Sequence[int] | None = None):
        self.examples = list(examples)
        self.features = [encode_example(e, tokenizer, max_length, use_chat_template)
                         for e in self.examples]
        if route_labels is not None:
            if len(route_labels) != len(self.examples):
                raise ValueError(f"route_labels has {len(route_labels)} entries for {len(self.examples)} examples; "
                                 "give one target expert per example.")
            for f, label in zip(self.features, route_labels):
                f["route_labels"] = int(label)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return self.features[i]


@dataclass
class SFTCollator:
    """Pads a list of encoded examples to the longest in the batch (right padding).

    input_ids are padded with the pad id (EOS when the tokenizer has no pad token), labels with
    -100, attention_mask with 0. ``pad_to_multiple_of`` helps tensor-core GEMMs on GPU.
    """

    tokenizer: object
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            n = longest - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [pad_id] * n)
            batch["attention_mask"].append(list(f.get("attention_mask", [1] * len(f["input_ids"])))
                                           + [0] * n)
            labels = f.get("labels", f["input_ids"])
            batch["labels"].append(list(labels) + [IGNORE_INDEX] * n)
        if all("route_labels" in f for f in features):
            batch["route_labels"] = [int(f["route_labels"]) for f in features]
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
