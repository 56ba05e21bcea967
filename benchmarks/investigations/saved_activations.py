"""What autograd keeps for backward (distinct storages, MiB) in one training forward of a small LLaMA: frozen base,
PEFT LoRA r=8 and HydraLoRA r=8 N=3, all-linear, dropout 0.05; device-independent, so it runs on the CPU.

    python benchmarks/investigations/saved_activations.py                  # hidden 256, 2 layers, 4 x 128 tokens, fp32
    # HydraLoRA's x + mask path on every input size:
    python benchmarks/investigations/saved_activations.py --project-min 0

--project-min sets hydralora.ops.project.MIN_NUMEL (default 2^20: only large inputs take that path).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # _common, bench_layer

import _common as C
import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hydralora
from hydralora.ops import project

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def saved_mib(model, ids) -> float:
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values()) / 2**20


def main():
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--project-min", type=int, default=project.MIN_NUMEL)
    args = p.parse_args()
    project.MIN_NUMEL = args.project_min
    dev, dt = args.device, C.resolve_dtype(args)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875), num_attention_heads=8,
                      num_key_value_heads=8, num_hidden_layers=args.layers, vocab_size=1000)
    ids = torch.randint(0, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed)).to(dev)
    rows = []
    for variant in ("base", "peft r8", "ours"):
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(cfg).to(dev, dt)
        if variant == "base":
            model.requires_grad_(False)
            model.model.embed_tokens.weight.requires_grad_(True)  # backward through the whole stack
        elif variant == "peft r8":
            model = C.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                            target_modules=TARGETS), args)
        else:
            model = C.get_peft_model(model, hydralora.HydraLoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                                      num_experts=3, target_modules=TARGETS), args)
        model.train()
        with C.autocast(args, dev, dt):
            rows.append({"variant": variant, "saved_mib": saved_mib(model, ids)})
    lora = next(r["saved_mib"] for r in rows if r["variant"] == "peft r8")
    for r in rows:
        r["x_peft"] = r["saved_mib"] / lora
    title = (f"Saved for backward: LLaMA hidden {args.hidden}, {args.layers} layers, {args.batch} x {args.seq} tokens, "
             f"{dt}, all-linear, project-min {args.project_min}")
    cols = [("variant", "variant", 0), ("saved_mib", "saved MiB", 1), ("x_peft", "x PEFT LoRA r=8", 2)]
    table = C.print_table(rows, cols, title)
    C.write_json(args.json, {"bench": "saved_activations", "env": C.env_info(dev), "config": vars(args), "rows": rows,
                             "table": table})


if __name__ == "__main__":
    main()
