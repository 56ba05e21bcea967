"""Data layer: reading files, normalising formats, SFT tokenisation, BIG-bench mixtures."""

from __future__ import annotations

from pathlib import Path

from .collate import IGNORE_INDEX, SFTCollator, SFTDataset, encode_example, render_prompt
from .formats import DEFAULT_TASK, Example, LoadedExamples, load_examples, normalize_row, write_jsonl
from .io import DataError, Rows, read_rows

BUNDLED_MIXTURE = "bbh_mix.jsonl"


def bundled_mixture_path() -> Path:
    """Path of the bundled BIG-bench (BBH-source) mixture shipped with the package.

    Multi-task JSONL with a ``split`` field ("train"/"test"); see ``bundled/NOTICE``.
    """
    p = Path(__file__).parent / "bundled" / BUNDLED_MIXTURE
    if not p.is_file():
        raise DataError("the bundled mixture is missing from this install; rebuild it with "
                        "scripts/build_bundled_mix.py", p)
    return p


__all__ = [
    "DEFAULT_TASK", "DataError", "Example", "IGNORE_INDEX", "LoadedExamples", "Rows",
    "SFTCollator", "SFTDataset", "bundled_mixture_path", "encode_example", "load_examples",
    "normalize_row", "read_rows", "render_prompt", "write_jsonl",
]
