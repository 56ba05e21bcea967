"""The `hydralora` command line: train, eval, export, analyze, data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from ._extras import RUN_MODULES, MissingExtraError, require_extra
from .tuner.config import ROUTING_MODES


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="Fine-tune with HydraLoRA (no arguments: the default recipe on the packaged SmolLM2).")
    p.add_argument("--config", help="YAML file whose keys are TrainConfig / HydraLoraConfig field names.")
    p.add_argument("--output-dir", dest="output_dir")
    p.add_argument("--max-steps", dest="max_steps", type=int)
    p.add_argument("--method")
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", default=None, help="Continue from the last checkpoint in --output-dir.")
    p.add_argument("--skip-bad-rows", dest="skip_bad_rows", action="store_true", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override any config field, e.g. --set r=16.")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    require_extra("hydralora train", *RUN_MODULES)
    from .recipes.config import build_spec
    from .recipes.train import run_train

    overrides = {k: getattr(args, k) for k in ("output_dir", "max_steps", "method", "model", "data", "seed", "resume", "skip_bad_rows")}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE.")
        key, value = item.split("=", 1)
        overrides[key.strip().replace("-", "_")] = value
    run_train(build_spec(overrides, args.config))
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="Held-out accuracy of an adapter (and of its base model).")
    p.add_argument("--adapter", required=True, help="Adapter folder (a run's adapter/ or any saved HydraLoRA/LoRA adapter).")
    p.add_argument("--data", help="Data file; default: the test split of the run's data.")
    p.add_argument("--out", help="Write the JSON result here.")
    p.add_argument("--model", help="Base model; default: the run's model or the adapter's base_model_name_or_path.")
    p.add_argument("--routing", choices=ROUTING_MODES, default="token")
    p.add_argument("--gate", default="mean", help="Gate for --routing fixed: mean | usage | INDEX | w1,w2,...")
    p.add_argument("--max-per-task", type=int, default=None,
                   help="Cap held-out examples per task (0: all; default: all with --data, else the run's own cap, so scores compare).")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-base", action="store_true", help="Skip the base model's score.")
    p.add_argument("--device", default="auto")
    p.add_argument("--harness", metavar="TASKS",
                   help="Also score with lm-evaluation-harness (pip install 'hydralora[eval]'): 'all' or comma-separated "
                        "task names of the evaluated data, run as local lm-eval tasks on the same examples.")
    p.set_defaults(func=_run_eval)


def parse_gate(text: str):
    text = str(text).strip()
    if text in ("mean", "usage"):
        return text
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--gate {text!r} is invalid: allowed are mean, usage, an expert index or comma-separated weights.") from None


def _load_adapter(adapter: str, model_name: Optional[str], device: str):
    """(PeftModel, tokenizer, run record) for a saved adapter folder."""
    from .loading import check_adapter_weights, load_adapter, read_adapter_config
    from .models import load_model_and_tokenizer, pick_device
    from .recipes.config import RUN_FILE

    path = Path(adapter)
    cfg = read_adapter_config(path)  # both files checked before the base model is loaded
    check_adapter_weights(path)
    try:
        run = json.loads((path / RUN_FILE).read_text()) if (path / RUN_FILE).is_file() else {}
    except ValueError as err:
        raise ValueError(f"{path / RUN_FILE}: not valid JSON ({err}); delete it to load the adapter without the run's settings.") from None
    name = model_name or run.get("model") or cfg.get("base_model_name_or_path") or "smollm2"
    device = pick_device(device)
    base, tok = load_model_and_tokenizer(name, dtype=None, device=device)
    model = load_adapter(base, path).eval()
    return model, tok, run, device


def _run_eval(args) -> int:
    require_extra("hydralora eval", *RUN_MODULES)
    from . import hydra_layers, set_routing
    from .data.formats import load_examples
    from .eval.scoring import evaluate, format_table
    from .recipes.train import cap_per_task, resolve_data_path, scoring_precision, split_examples, training_in_bf16

    model, tok, run, device = _load_adapter(args.adapter, args.model, args.device)
    # score in the precision the run scored in (on a CPU, a bf16 run scores under bf16 autocast), so numbers compare
    evaluate = scoring_precision(evaluate, device, training_in_bf16(run.get("bf16", False), device))
    use_chat = bool(run.get("use_chat_template", False))
    if args.data:
        examples = list(load_examples(args.data, tokenizer=tok))
        if any(e.split == "test" for e in examples):
            examples = [e for e in examples if e.split == "test"]
    else:
        data = resolve_data_path(run.get("data", "bundled"))
        _, examples = split_examples(list(load_examples(data, tokenizer=tok)), int(run.get("seed", 42)))
    cap = args.max_per_task if args.max_per_task is not None else (0 if args.data else int(run.get("eval_max_per_task") or 0))
    examples = cap_per_task(examples, cap)
    kw = {"batch_size": args.batch_size, "max_new_tokens": int(run.get("max_new_tokens", 24)), "device": device,
          "use_chat_template": use_chat, "max_length": int(run.get("max_seq_length") or 1024)}
    result = {"adapter": args.adapter, "routing": args.routing}
    if not args.no_base:
        with model.disable_adapter():
            result["base"] = evaluate(model, tok, examples, **kw)
    if hydra_layers(model):
        set_routing(model, args.routing, parse_gate(args.gate) if args.routing == "fixed" else None)
    result["adapted"] = evaluate(model, tok, examples, **kw)
    result["per_task"] = result["adapted"]["per_task"]
    result["mean"] = result["adapted"]["mean_accuracy"]
    print(format_table(result["adapted"], baseline=result.get("base")))
    if args.harness:
        result["harness"] = _run_harness(args.harness, model, tok, examples, use_chat, kw)
        print(format_table(result["harness"], title="harness"))
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


def _run_harness(spec: str, model, tok, examples, use_chat: bool, kw: dict) -> dict:
    """lm-eval on the examples `hydralora eval` scored: task definitions written to a temporary folder."""
    import tempfile

    from .eval.harness import run_harness, write_tasks

    present = sorted({e.task for e in examples})
    wanted = present if spec.strip() == "all" else [t.strip() for t in spec.split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(present))
    if unknown or not wanted:
        raise ValueError(f"--harness {spec!r}: unknown task(s) {unknown}; allowed: 'all' or names among {present}.")
    chosen = [e for e in examples if e.task in set(wanted)]
    with tempfile.TemporaryDirectory(prefix="hydralora-harness-") as tmp:
        names = write_tasks(chosen, tmp, tokenizer=tok, use_chat_template=use_chat, max_new_tokens=kw["max_new_tokens"])
        out = run_harness(model, tok, names, tmp, batch_size=kw["batch_size"], max_length=kw["max_length"])
    counts = {t: sum(e.task == t for e in chosen) for t in names}
    out["tasks"] = {t: {"accuracy": out["per_task"][t], "n": counts[t]} for t in names}
    out["n_examples"] = len(chosen)
    return out


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="Write a stock PEFT LoRA adapter (or, with --merge, a merged model) for a fixed gate.")
    p.add_argument("adapter_dir")
    p.add_argument("out_dir")
    p.add_argument("--gate", default="mean", help="mean | usage | INDEX | w1,w2,...")
    p.add_argument("--merge", action="store_true", help="Write a full model folder with the update merged in.")
    p.add_argument("--model", help="Base model (default: from the adapter).")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from . import export_lora, merge_and_unload

    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite or choose another OUT_DIR.")
    model, tok, _, _ = _load_adapter(args.adapter_dir, args.model, "cpu")
    gate = parse_gate(args.gate)
    if args.merge:
        merged = merge_and_unload(model, gate)
        merged.save_pretrained(out)
        tok.save_pretrained(out)
        print(f"merged model written to {out}")
    else:
        export_lora(model, str(out), gate, overwrite=args.overwrite)
        print(f"stock PEFT LoRA adapter written to {out} (loads with peft.PeftModel.from_pretrained, no hydralora needed)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hydralora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_export(sub)
    from .clustering.cli import add_analyze_parser
    from .data.cli import add_data_parser

    add_analyze_parser(sub)
    add_data_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError, MissingExtraError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
