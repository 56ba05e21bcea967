"""What the study scripts share: the study's data, the `hydralora train` command line, and side-by-side workers."""

from __future__ import annotations

import json
import os
import queue
import sys
from contextlib import contextmanager
from pathlib import Path

# The study's mixture: 12 BBH-source BIG-bench tasks (10 multiple choice, 2 generative), up to 300 train and
# 60 held-out test examples each, built with `hydralora data bigbench` (the command is in studies/data/NOTICE).
STUDY_DATA = Path(__file__).resolve().parent / "data" / "bbh12.jsonl"
# A run of the study's schedule at 32 sequences per micro-batch peaks at about 14 GiB of GPU memory.
GIB_PER_RUN = 14
OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError")


def train_command(run_dir: Path, sets: dict) -> list[str]:
    """`hydralora train` into run_dir with every recipe field of `sets` as --set KEY=VALUE (JSON for non-strings)."""
    cmd = [sys.executable, "-m", "hydralora.cli", "train", "--output-dir", str(run_dir)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
    return cmd


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (none without torch or a driver)."""
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # no torch / no driver
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:n] if listed else [str(i) for i in range(n)]


def fit_workers(workers: int) -> int:
    """Cap the side-by-side runs to what the GPUs' free memory holds (GIB_PER_RUN each)."""
    try:
        import torch

        gpus = len(visible_gpus())
        if not gpus:
            return workers
        free = min(torch.cuda.mem_get_info(i)[0] for i in range(gpus))
        fit = gpus * max(1, int(free / 2**30 // GIB_PER_RUN))
    except Exception:  # no torch / no driver: leave the request as it is
        return workers
    if workers > fit:
        print(f"--workers {workers} does not fit {gpus} GPU(s) ({GIB_PER_RUN} GiB per run): running {fit} at a time", flush=True)
    return min(workers, fit)


class WorkerSlots:
    """One environment per side-by-side run: the CPU cores split among the workers (each torch process would
    otherwise take them all) and, on a host with several GPUs, one GPU per slot, round-robin. A job holds a slot
    while it runs, so every GPU carries the same number of runs at any time."""

    def __init__(self, workers: int, gpus: list[str] | None = None):
        gpus = visible_gpus() if gpus is None else gpus
        threads = max(1, (os.cpu_count() or 1) // workers)
        self._free: queue.Queue = queue.Queue()
        for i in range(workers):
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
            if len(gpus) > 1:
                env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            self._free.put(env)

    @contextmanager
    def env(self):
        env = self._free.get()
        try:
            yield env
        finally:
            self._free.put(env)


def ran_out_of_memory(log_file: Path) -> bool:
    """Whether a failed run's log shows a CUDA out-of-memory error (the run is retried, not reported as failed)."""
    try:
        text = log_file.read_text(errors="replace")[-20000:]
    except OSError:
        return False
    return any(m in text for m in OOM_MARKERS)
