"""Optional dependencies: which extra installs them, and the error that says so.

The core (`import hydralora`, the PEFT layer, save/load/merge/export) needs torch, transformers, peft, safetensors
and aenum only. The recipe, analysis and data tools need the `train` extra.
"""

from __future__ import annotations

import importlib.util

# Module name -> pip distribution, per extra.
EXTRAS: dict[str, dict[str, str]] = {
    "train": {
        "accelerate": "accelerate", "sklearn": "scikit-learn", "kneed": "kneed", "datasets": "datasets",
        "tqdm": "tqdm", "tensorboard": "tensorboard", "matplotlib": "matplotlib", "pandas": "pandas",
        "pyarrow": "pyarrow", "gguf": "gguf", "yaml": "pyyaml",
    },
}

# What `hydralora train` and `hydralora eval` import themselves; the readers of parquet, CSV and saved datasets
# folders (pandas, pyarrow, datasets) check for their own module when such a file is read.
RUN_MODULES = ("accelerate", "sklearn", "kneed", "tqdm", "tensorboard", "matplotlib", "yaml")


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names it and the extra that installs it."""


def missing_extra(module: str | None, feature: str, extra: str = "train") -> MissingExtraError:
    """The error to raise when `module` (an import name such as "sklearn") is missing for `feature`."""
    top = (module or "").split(".")[0]
    package = EXTRAS[extra].get(top, top or "an optional dependency")
    return MissingExtraError(
        f"{feature} needs {package}, which is not installed. Install the extra that provides it: "
        f'pip install "hydralora[{extra}]"'
    )


def is_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_extra(feature: str, *modules: str, extra: str = "train") -> None:
    """Raise MissingExtraError naming the first of `modules` (default: all of the extra's) that is not installed."""
    for module in modules or tuple(EXTRAS[extra]):
        if not is_installed(module):
            raise missing_extra(module, feature, extra)
