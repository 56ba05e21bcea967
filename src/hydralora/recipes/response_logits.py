"""Vocabulary logits only where the loss reads them.

Supervised fine-tuning scores response tokens only (prompt labels are -100), yet a causal LM's forward
projects every position onto the vocabulary: for SmolLM2 on the study's mixture about 3% of the
(batch x 49k) logits, the largest activation of a step, are ever read. transformers' ``logits_to_keep``
takes the positions to project; we pass the positions whose next token is a response token and hand the
model its own loss function the matching targets as ``shift_labels``, so the loss (and Trainer's
``num_items_in_batch`` normalisation) is the same as with full logits.

Two forms, chosen per model class:
- a boolean (B, T) mask, exactly the scored positions (transformers' ``slice_logits_to_keep`` with 2-D
  support: logits come back flattened to (M, V));
- else a 1-D index of the positions scored in any row of the batch (every version that has
  ``logits_to_keep``; about a third to a half of the positions on our data).
Models whose forward has no ``logits_to_keep`` keep the full path.
"""

from __future__ import annotations

import inspect
import sys

import torch

IGNORE_INDEX = -100


def logits_to_keep_support(model) -> str | None:
    """'mask' (2-D boolean), 'index' (1-D positions) or None (forward has no logits_to_keep).

    ``model``: a transformers causal LM or a PeftModel around one (Trainer wraps for DDP/FSDP only later)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    if "logits_to_keep" not in params or not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None  # shift_labels travels through **kwargs to the model's loss function
    slicer = getattr(sys.modules.get(type(base).__module__), "slice_logits_to_keep", None)
    if slicer is not None:
        try:
            probe = slicer(torch.zeros(1, 2, 1), torch.tensor([[True, False]]))
            if tuple(probe.shape) == (1, 1):
                return "mask"
        except Exception:  # an older slicer: 1-D positions only
            pass
    return "index"


def keep_response_logits(inputs: dict, form: str) -> dict:
    """``inputs`` (with right- or left-padded ``labels``) rewritten to project only the scored positions.

    Position t is scored when the label of token t+1 is not -100. Returns ``inputs`` unchanged when no
    token is scored (the full path then reports the same empty loss).
    """
    labels = inputs.get("labels")
    if labels is None or form is None:
        return inputs
    next_labels = labels[:, 1:]  # (B, T-1): the target of position t
    scored = next_labels != IGNORE_INDEX  # (B, T-1)
    if form == "mask":
        if not bool(scored.any()):
            return inputs
        keep = torch.nn.functional.pad(scored, (0, 1), value=False)  # (B, T): the last position predicts nothing
        targets = next_labels[scored]  # (M,) row-major, the order the model flattens kept logits in
    elif form == "index":
        positions = scored.any(0).nonzero().squeeze(1)  # (K,) positions scored in any row
        if positions.numel() == 0:
            return inputs
        keep = positions
        targets = next_labels.index_select(1, positions)  # (B, K); -100 where a row does not score it
    else:
        raise ValueError(f"form={form!r} is invalid: allowed are 'mask', 'index' or None.")
    return {**inputs, "labels": targets, "shift_labels": targets, "logits_to_keep": keep}
