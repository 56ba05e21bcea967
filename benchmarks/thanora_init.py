"""ThanoRA's initialisation on a real model and mixture, as `hydralora train --method thanora` runs it: the tasks'
heterogeneity (one pass of the model over each task's init examples), the rank split, and the per-task subspaces
of every LoRA A (a second pass). Prints the seconds of each part and, with --compare-to, how closely each task's
block of every A spans the same subspace as a saved init's (cosines of the principal angles).

    python benchmarks/thanora_init.py --json OUT.json --save-a OUT_A.pt                  # SmolLM2, bundled data
    python benchmarks/thanora_init.py --compare-to OTHER_A.pt                               # against another init
    PYTHONPATH=<another checkout's src> python benchmarks/thanora_init.py --save-a A.pt     # older code, same run
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import peft
import torch

from _common import base_parser, env_info, write_json
from hydralora.data.collate import SFTCollator, SFTDataset
from hydralora.data.formats import load_examples
from hydralora.methods.thanora import allocate_ranks, init_task_subspaces, task_heterogeneity
from hydralora.models import load_model_and_tokenizer
from hydralora.recipes.config import SCHEDULE_DEFAULTS, TrainConfig
from hydralora.recipes.train import resolve_data_path


def principal_cosines(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the row spaces of A and B (n, k)."""
    qa = torch.linalg.qr(A.double().T)[0]  # (k, n)
    qb = torch.linalg.qr(B.double().T)[0]  # (k, n)
    return torch.linalg.svdvals(qa.T @ qb)  # (n,)


def main() -> None:
    defaults = TrainConfig()
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", default="bundled")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--examples", type=int, default=defaults.thanora_init_examples, help="init examples per task")
    p.add_argument("--batch-size", type=int, default=defaults.eval_batch_size)
    p.add_argument("--max-length", type=int, default=SCHEDULE_DEFAULTS["gpu"]["max_seq_length"],
                   help="tokens per example (default: the gpu schedule's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--save-a", default=None, help="save every LoRA A after the init (torch.save) to this file")
    p.add_argument("--compare-to", default=None, help="an A file saved by --save-a: principal-angle cosines")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok = load_model_and_tokenizer(args.model, dtype=torch.float32, device=args.device)
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear"))
    by_task = defaultdict(list)
    for e in load_examples(resolve_data_path(args.data), tokenizer=tok):
        by_task[e.task].append(e)
    collate = SFTCollator(tok)
    batches = {}
    for task, rows in by_task.items():
        feats = SFTDataset(rows[: args.examples], tok, max_length=args.max_length).features
        batches[task] = [collate(feats[i:i + args.batch_size]) for i in range(0, len(feats), args.batch_size)]

    t0 = time.perf_counter()
    het = task_heterogeneity(model, batches)
    t1 = time.perf_counter()
    ranks = allocate_ranks(het, args.r)
    slices = init_task_subspaces(model, batches, ranks, seed=args.seed)
    t2 = time.perf_counter()
    out = {"env": env_info(args.device), "model": args.model, "data": args.data, "r": args.r,
           "tasks": len(batches), "examples_per_task": args.examples,
           "heterogeneity_s": round(t1 - t0, 3), "subspaces_s": round(t2 - t1, 3), "init_s": round(t2 - t0, 3),
           "heterogeneity": {t: round(h, 6) for t, h in het.items()}, "ranks": ranks}
    A = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if "lora_A" in n}
    if args.save_a:
        torch.save({"A": A, "slices": slices}, args.save_a)
    if args.compare_to:
        ref = torch.load(args.compare_to)
        cos = [float(principal_cosines(A[n][lo:hi], ref["A"][n][lo:hi]).min())
               for n in A for lo, hi in slices.values()]
        cos.sort()
        out["compare_to"] = {"blocks": len(cos), "min_cos": cos[0], "p1_cos": cos[len(cos) // 100],
                             "median_cos": statistics.median(cos), "same_slices": ref["slices"] == slices}
    print(f"heterogeneity {out['heterogeneity_s']} s, subspaces {out['subspaces_s']} s, init {out['init_s']} s; "
          f"ranks {ranks}")
    if "compare_to" in out:
        print("against", args.compare_to, out["compare_to"])
    write_json(args.json, out)


if __name__ == "__main__":
    main()
