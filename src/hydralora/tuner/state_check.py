"""Refuse adapter weights that do not fit the model they are loaded into.

PEFT loads adapter weights with `load_state_dict(strict=False)`: a tensor whose module does not exist (an adapter
trained on a deeper model) is dropped without a word, and one of another shape fails with a raw size-mismatch
traceback. This pre-hook, registered on HydraLoraModel, checks every HydraLoRA tensor first and names what does
not fit.
"""

from __future__ import annotations

from torch import nn

from .layer import HydraLoraLayer

MARK = ".hydralora_"
SHOWN = 3  # examples quoted in the message


class AdapterMismatchError(ValueError):
    """Adapter weights that do not fit the model; the message says which, and how."""


def _describe(key: str) -> str:
    return key.removeprefix("base_model.model.").removeprefix("model.")


def check_adapter_state_dict(module: nn.Module, state_dict, prefix, local_metadata, strict, missing_keys,
                             unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: every `...hydralora_*` tensor must find its layer, adapter entry and shape."""
    keys = [k for k in state_dict if k.startswith(prefix) and MARK in k]
    if not keys:
        return
    homeless, mismatched = [], []
    for key in keys:
        path, _, rest = key[len(prefix):].partition(MARK)
        attr, _, entry = ("hydralora_" + rest).partition(".")
        try:
            layer = module.get_submodule(path)
        except AttributeError:
            layer = None
        store = getattr(layer, attr, None) if isinstance(layer, HydraLoraLayer) else None
        if store is None or entry not in store:
            homeless.append(key)
            continue
        have, got = tuple(store[entry].shape), tuple(state_dict[key].shape)
        if have != got:
            mismatched.append((key, got, have))
    if homeless:
        shown = ", ".join(_describe(k) for k in homeless[:SHOWN])
        raise AdapterMismatchError(
            f"the adapter does not fit this model: {len(homeless)} of its {len(keys)} HydraLoRA tensors find no "
            f"adapted module here (e.g. {shown}). It was trained on another architecture or number of layers; load "
            "it onto the base model it was trained on (adapter_config.json: base_model_name_or_path)."
        )
    if mismatched:
        shown = "; ".join(f"{_describe(k)}: adapter {list(g)} vs model {list(h)}" for k, g, h in mismatched[:SHOWN])
        raise AdapterMismatchError(
            f"the adapter does not fit this model: {len(mismatched)} of its {len(keys)} HydraLoRA tensors have "
            f"another shape ({shown}). The base model has another width, or adapter_config.json's r / "
            "num_experts / router_input differ from the ones the weights were trained with."
        )


def register(model: nn.Module) -> None:
    """Attach the check to `model` (a HydraLoraModel)."""
    public = getattr(model, "register_load_state_dict_pre_hook", None)  # torch >= 2.5
    if public is not None:
        public(check_adapter_state_dict)
    else:
        model._register_load_state_dict_pre_hook(check_adapter_state_dict, with_module=True)
