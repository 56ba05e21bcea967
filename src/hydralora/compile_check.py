"""Refuse training under torch.compile(mode="reduce-overhead"), whose CUDA graphs crashed the process.

`torch.compile(model, mode="reduce-overhead")` (Inductor with CUDA graphs) of a HydraLoRA layer in training
segfaulted the process on an H200 (torch 2.11, a 4096 x 4096 layer, 8192 tokens); the default mode runs. Until
that is understood, a training forward traced for such a compile raises a clear error instead (inference is
allowed). HYDRALORA_ALLOW_CUDAGRAPH_TRAINING=1 lifts the refusal, to re-test on a newer torch
(benchmarks/qlora_check.py does).

Which backend a trace is for is known only to Dynamo: the check asks the trace's output graph for its compiler's
config while Dynamo traces (`assume_constant_result`: it runs once, at trace time, and the compiled graph keeps
nothing of it). Private API: where it is missing, the answer is "no" and nothing is refused.
"""

from __future__ import annotations

import os

import torch

CUDAGRAPH_TRAINING = (
    "torch.compile(mode='reduce-overhead') (CUDA graphs) is refused for training HydraLoRA layers: it crashed the "
    "process (segfault) on an H200 with torch 2.11. Compile with the default mode (torch.compile(model)) or "
    "mode='max-autotune-no-cudagraphs'; for inference, reduce-overhead is allowed. "
    "HYDRALORA_ALLOW_CUDAGRAPH_TRAINING=1 lifts this check (at your own risk)."
)


def _backend_wants_cudagraphs() -> bool:
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        fn = InstructionTranslator.current_tx().output.compiler_fn
        seen = set()
        while fn is not None and id(fn) not in seen:
            seen.add(id(fn))
            config = getattr(fn, "config", None)
            if isinstance(config, dict) and config.get("triton.cudagraphs"):
                return True
            if getattr(fn, "__name__", "") == "cudagraphs":  # torch.compile(backend="cudagraphs")
                return True
            fn = getattr(fn, "_torchdynamo_orig_backend", None) or getattr(fn, "compiler_fn", None)
    except Exception:  # noqa: BLE001 -- private API of this torch version: no answer, no refusal
        return False
    return False


def _refuse_cudagraphs() -> bool:
    # Raised here, at trace time: an exception raised by traced code would only make Dynamo fall back to running
    # the frame eagerly, where nothing is being compiled and the check no longer fires.
    if _backend_wants_cudagraphs():
        raise RuntimeError(CUDAGRAPH_TRAINING)
    return False


_refuse_cudagraphs_at_trace = torch._dynamo.assume_constant_result(_refuse_cudagraphs)


def check_training_compile() -> None:
    """Call from a training forward: raises under a CUDA-graph compile unless explicitly allowed."""
    if torch.compiler.is_compiling() and os.environ.get("HYDRALORA_ALLOW_CUDAGRAPH_TRAINING") != "1":
        _refuse_cudagraphs_at_trace()
