"""Activation checkpointing under the names the installed transformers wants.

transformers renamed `gradient_checkpointing*` to `activation_checkpointing*` (model methods and TrainingArguments
fields) and warns (FutureWarning) on the old names; the versions this package supports have one or the other.
"""

from __future__ import annotations

from typing import Any


def _renamed() -> bool:
    from transformers import PreTrainedModel

    return hasattr(PreTrainedModel, "activation_checkpointing_enable")


def checkpointing_training_args(enabled: bool, use_reentrant: bool = False) -> dict[str, Any]:
    """TrainingArguments keyword arguments that turn checkpointing on (non-reentrant by default) or off."""
    prefix = "activation" if _renamed() else "gradient"
    kwargs = {"use_reentrant": use_reentrant} if enabled else None
    return {f"{prefix}_checkpointing": enabled, f"{prefix}_checkpointing_kwargs": kwargs}


def enable_checkpointing(model, use_reentrant: bool = False) -> None:
    """Turn on activation checkpointing of a transformers model (or a PeftModel wrapping one)."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_checkpointing(model) -> bool:
    """Whether activation checkpointing is on for a transformers model."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))
