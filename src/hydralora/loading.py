"""Loading a saved adapter folder with errors that name the file: `load_adapter(base, path)`."""

from __future__ import annotations

import json
from pathlib import Path

from .tuner.state_check import AdapterMismatchError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def read_adapter_config(path: str | Path) -> dict:
    """adapter_config.json of an adapter folder as a dict; ValueError naming the file when missing or corrupt."""
    folder = Path(path)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise ValueError(f"adapter {folder}: no {CONFIG_FILE} there (expected a folder written by save_pretrained).")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); the file is "
                         "damaged: restore it from the run's checkpoints or re-export the adapter.") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{cfg_path}: not UTF-8 text (byte {err.start}); the file is damaged.") from None
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        raise ValueError(f"{cfg_path}: not a PEFT adapter config (expected a JSON object with a 'peft_type' field).")
    return cfg


def check_adapter_weights(path: str | Path) -> None:
    """The folder's adapter_model.safetensors exists and its header and tensors read back; else ValueError naming it."""
    from safetensors import safe_open

    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"adapter {path}: no {WEIGHTS_FILE} there (adapters load only from safetensors, never from "
                         "pickles such as adapter_model.bin).")
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                f.get_slice(key)  # checks that the tensor's byte range lies inside the file
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) for damaged files
        raise ValueError(f"{weights}: not a readable safetensors file ({err}); the file is damaged or truncated: "
                         "restore it from the run's checkpoints.") from None


def load_adapter(base, path: str | Path, **kwargs):
    """`peft.PeftModel.from_pretrained(base, path)` after checking the folder's files; errors name the file and what
    does not fit (an adapter whose tensors find no module, or have another shape, is refused)."""
    import peft

    from ._peft_compat import quiet_peft_checkpointing_probe

    read_adapter_config(path)
    check_adapter_weights(path)
    try:
        with quiet_peft_checkpointing_probe():
            return peft.PeftModel.from_pretrained(base, str(path), **kwargs)
    except AdapterMismatchError as err:
        raise AdapterMismatchError(f"{Path(path) / WEIGHTS_FILE}: {err}") from None
