"""The main job's pipeline at toy size: a tiny local model folder, a small multi-task file, every shipped YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hydralora.cli import main as cli_main
from hydralora.recipes.config import ADAPTER_FIELDS, METHODS, TrainConfig, build_spec
from hydralora.recipes.train import run_train

REPO = Path(__file__).resolve().parents[1]
def toy_spec(toy, out, **over):
    values = dict(model=str(toy / "model"), data=str(toy / "mix.jsonl"), output_dir=str(out), max_steps=6,
                  per_device_batch_size=4, max_seq_length=32, save_steps=3, logging_steps=1, eval_batch_size=8,
                  max_new_tokens=3, learning_rate=5e-3, num_experts=2, r=4, lora_alpha=8, lora_dropout=0.0,
                  device="cpu", report=True, bf16=False)  # the same precision on any CPU; bf16 where a test asks
    values.update(over)
    return build_spec(values)


def test_pipeline_writes_adapter_metrics_and_report(toy, tmp_path):
    metrics = run_train(toy_spec(toy, tmp_path / "run", num_experts="auto", auto_n_k_max=3, balance_loss_coef=0.01,
                                 bf16=True))
    run = tmp_path / "run"
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "metrics.json", "report.md",
                 "accuracy.png", "loss.png", "routing.png", "elbow.png", "analysis.json", "config.json"):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "adapter/adapter_config.json").read_text())
    assert cfg["peft_type"] == "HYDRALORA" and cfg["num_experts"] in (2, 3) and cfg["auto_n"]["k"] == cfg["num_experts"]
    saved = json.loads((run / "metrics.json").read_text())
    assert set(saved["adapted"]["per_task"]) == {"color", "animal"}
    assert 0.0 <= saved["adapted"]["mean_accuracy"] <= 1.0 and "base" in saved and "mean_gain" in saved
    assert any("aux_loss" in h for h in saved["log_history"])
    assert list(tmp_path.glob("run/tensorboard/**/events.out.tfevents*"))
    assert metrics["routing_by_task"]["color"]
    assert saved["bf16"] is True  # trained and scored under CPU bf16 autocast
    assert "Held-out mean accuracy" in (run / "report.md").read_text()


def test_existing_output_dir_is_not_overwritten(toy, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--resume"):
        run_train(toy_spec(toy, tmp_path / "run"))
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(toy, tmp_path):
    run_train(toy_spec(toy, tmp_path / "full", eval_base=False, report=False, lora_dropout=0.1))
    interrupted = tmp_path / "part"
    run_train(toy_spec(toy, interrupted, eval_base=False, report=False, lora_dropout=0.1))
    # Simulate an interruption right after the step-3 checkpoint: drop everything written later.
    import shutil

    shutil.rmtree(interrupted / "checkpoints" / "checkpoint-6")
    shutil.rmtree(interrupted / "adapter")
    for f in ("metrics.json", "config.json"):
        (interrupted / f).unlink()
    run_train(toy_spec(toy, interrupted, eval_base=False, report=False, lora_dropout=0.1, resume=True))
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(interrupted / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "lora-split", "hydralora-uniform", "lora-moe"])
def test_every_method_trains_and_evaluates(toy, tmp_path, method):
    metrics = run_train(toy_spec(toy, tmp_path / method, method=method, max_steps=2, report=False, eval_base=False))
    assert metrics["trainable_params"] > 0 and "adapted" in metrics


def test_bad_rows_fail_with_file_and_line_or_are_skipped(toy, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = (toy / "mix.jsonl").read_text().splitlines()
    lines.insert(2, "{not json")
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl.*3"):
        run_train(toy_spec(toy, tmp_path / "r1", data=str(bad), max_steps=1))
    metrics = run_train(toy_spec(toy, tmp_path / "r2", data=str(bad), max_steps=1, skip_bad_rows=True, report=False, eval_base=False))
    assert metrics["adapted"]


def test_cli_train_eval_export(toy, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--output-dir", str(out), "--max-steps", "2", "--model", str(toy / "model"), "--data",
            str(toy / "mix.jsonl"), "--set", "num_experts=2", "--set", "device=cpu", "--set", "max_seq_length=32",
            "--set", "report=false", "--set", "eval_base=false", "--set", "max_new_tokens=3", "--set", "bf16=true"]
    assert cli_main(args) == 0
    res = tmp_path / "eval.json"
    assert cli_main(["eval", "--adapter", str(out / "adapter"), "--out", str(res), "--routing", "sequence", "--device", "cpu"]) == 0
    data = json.loads(res.read_text())
    assert set(data["per_task"]) == {"color", "animal"} and "base" in data and 0 <= data["mean"] <= 1
    # the run scored under CPU bf16 autocast; eval, reading the run record, scores the same way and matches it
    trained = json.loads((out / "metrics.json").read_text())["adapted"]
    again = tmp_path / "again.json"
    assert cli_main(["eval", "--adapter", str(out / "adapter"), "--out", str(again), "--device", "cpu", "--no-base"]) == 0
    assert json.loads(again.read_text())["adapted"]["per_task"] == trained["per_task"]
    assert cli_main(["export", str(out / "adapter"), str(tmp_path / "lora"), "--gate", "0.5,0.5"]) == 0
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert cli_main(["export", str(out / "adapter"), str(tmp_path / "merged"), "--gate", "mean", "--merge"]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    assert cli_main(["export", str(out / "adapter"), str(tmp_path / "lora"), "--gate", "mean"]) == 2
    assert "exists" in capsys.readouterr().err


def test_numbers_from_yaml_and_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 5e-4\nr: 16\nmodel: '1e3'\n")
    spec = build_spec({"max_steps": "7", "lora_dropout": "1e-1"}, str(path))
    assert spec.train.learning_rate == 5e-4 and spec.train.max_steps == 7 and spec.train.model == "1e3"
    assert spec.adapter["r"] == 16 and spec.adapter["lora_dropout"] == 0.1


def test_bad_config_keys_and_values(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['rank'\]"):
        build_spec({"rank": 8})
    with pytest.raises(ValueError, match="method='qlora' is invalid"):
        build_spec({"method": "qlora"})
    with pytest.raises(ValueError, match="max_steps=0"):
        build_spec({"max_steps": 0})


def test_loraplus_ratio_gives_every_expert_b_its_own_learning_rate(toy, tmp_path):
    """loraplus_lr_ratio: B (the stacked experts) at ratio x lr through PEFT's LoRA+ optimizer; A and router at lr."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from hydralora import HydraLoraConfig
    from hydralora.recipes.train import HydraTrainer

    spec = build_spec({"loraplus_lr_ratio": "8", "learning_rate": "1e-3"})
    assert spec.train.loraplus_lr_ratio == 8.0
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(toy / "model"),
                           HydraLoraConfig(r=4, num_experts=2, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, report_to=[], use_cpu=True)
    trainer = HydraTrainer(model=model, args=args, loraplus_lr_ratio=spec.train.loraplus_lr_ratio)
    opt = trainer.create_optimizer()
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert named and len(lr_of) == len(named)
    for name, p in named.items():
        assert lr_of[id(p)] == pytest.approx(8e-3 if "hydralora_B" in name else 1e-3), name
    plain = HydraTrainer(model=model, args=args).create_optimizer()
    assert {g["lr"] for g in plain.param_groups} == {1e-3}
    for bad in ("0", "-2", "true"):
        with pytest.raises(ValueError, match="loraplus_lr_ratio="):
            build_spec({"loraplus_lr_ratio": bad})


def test_loraplus_run_trains_end_to_end(toy, tmp_path):
    metrics = run_train(toy_spec(toy, tmp_path / "run", max_steps=2, loraplus_lr_ratio=4, report=False, eval_base=False))
    assert metrics["train_loss"] > 0 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["loraplus_lr_ratio"] == 4


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    import yaml

    raw = yaml.safe_load(path.read_text())
    allowed = {f for f in TrainConfig.__dataclass_fields__} | set(ADAPTER_FIELDS)
    assert set(raw) <= allowed, set(raw) - allowed
    spec = build_spec(config_file=str(path))
    assert spec.train.method in METHODS


def test_trainer_projects_only_scored_positions_with_the_same_loss(toy, tmp_path):
    """response_logits_only: HydraTrainer's training loss through a PEFT-wrapped HydraLoRA model equals the full
    logits path (no dropout, so both passes compute the same function)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from hydralora import HydraLoraConfig
    from hydralora.recipes.train import HydraTrainer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(toy / "model"),
                           HydraLoraConfig(r=4, num_experts=2, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    model.train()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    ids = torch.randint(3, model.config.vocab_size, (3, 10))  # (B, T)
    labels = torch.full_like(ids, -100)
    labels[0, 6:9], labels[1, 2:4], labels[2, 8:] = ids[0, 6:9], ids[1, 2:4], ids[2, 8:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    kept = HydraTrainer(model=model, args=args, response_logits_only=True)
    full = HydraTrainer(model=model, args=args, response_logits_only=False)
    assert kept._logits_form in ("mask", "index") and full._logits_form is None
    loss_kept, out_kept = kept.compute_loss(model, dict(batch), return_outputs=True)
    loss_full, out_full = full.compute_loss(model, dict(batch), return_outputs=True)
    torch.testing.assert_close(loss_kept, loss_full, rtol=1e-5, atol=1e-6)
    assert out_kept.logits.numel() < out_full.logits.numel()
    assert build_spec({}).train.response_logits_only is True
    assert build_spec({"response_logits_only": "false"}).train.response_logits_only is False


def test_routing_warm_start_validation_split_and_specialisation_metrics(toy, tmp_path):
    metrics = run_train(toy_spec(toy, tmp_path / "run", num_experts=2, route_target_coef=1.0, route_target_ratio=0.5,
                                 expert_ortho_coef=0.1, init_b="svd", validation_per_task=2, max_steps=4,
                                 logging_steps=1, report=False, eval_base=True))
    assert sum(metrics["route_target_counts"]) > 0 and len(metrics["route_target_counts"]) == 2
    logged = [h for h in metrics["log_history"] if "loss" in h]
    assert all("route_loss" in h and "ortho_loss" in h for h in logged)
    assert 0.0 <= metrics["router_entropy"] <= 1.0 and -1.0 <= metrics["expert_cos"] <= 1.0
    # two validation examples per task, none of them trained on or in the test set
    assert metrics["validation"]["n_examples"] == 2 * len(metrics["validation"]["per_task"])
    # the base model is scored on the same validation examples, so a gain can be chosen without the test split
    assert metrics["base_validation"]["n_examples"] == metrics["validation"]["n_examples"]
    assert metrics["validation_gain"] == pytest.approx(
        metrics["validation"]["mean_accuracy"] - metrics["base_validation"]["mean_accuracy"])


def test_checkpointed_training_raises_no_future_warning(toy, tmp_path):
    """transformers deprecated the gradient-checkpointing names; the recipe and peft's wrapper must not trigger them."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        metrics = run_train(toy_spec(toy, tmp_path / "ckpt", max_steps=2, report=False, eval_base=False,
                                     gradient_checkpointing=True))
    assert metrics["trainable_params"] > 0


def test_length_grouped_batches_pad_less_and_every_example_is_drawn(toy, tmp_path):
    """group_by_length hands the Trainer transformers' length-grouped sampler: the same examples, batched by length."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from hydralora.data.collate import SFTCollator
    from hydralora.recipes.train import sampler_training_args

    tok = AutoTokenizer.from_pretrained(toy / "model")
    model = AutoModelForCausalLM.from_pretrained(toy / "model")
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 40, (96,), generator=g).tolist()
    features = [{"input_ids": list(range(4, 4 + n)), "labels": list(range(4, 4 + n))} for n in lengths]

    def padded_tokens(grouped: bool) -> tuple[int, list[int], type]:
        args = TrainingArguments(output_dir=str(tmp_path / str(grouped)), per_device_train_batch_size=8, use_cpu=True,
                                 report_to=[], seed=0, data_seed=0, **sampler_training_args(grouped))
        trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=SFTCollator(tok))
        loader = trainer.get_train_dataloader()
        batches = list(loader)
        drawn = sorted(int(m.sum()) for b in batches for m in b["attention_mask"])
        return sum(b["input_ids"].numel() for b in batches), drawn, type(trainer._get_train_sampler())

    random_pad, random_drawn, random_sampler = padded_tokens(False)
    grouped_pad, grouped_drawn, grouped_sampler = padded_tokens(True)
    assert grouped_sampler is LengthGroupedSampler and random_sampler is not LengthGroupedSampler
    assert grouped_drawn == random_drawn == sorted(lengths)
    assert grouped_pad < 0.8 * random_pad


def test_group_by_length_is_validated_and_trains(toy, tmp_path):
    assert build_spec({}).train.group_by_length is False  # random batches unless asked
    with pytest.raises(ValueError, match="group_by_length='yes please'"):
        build_spec({"group_by_length": "yes please"})
    metrics = run_train(toy_spec(toy, tmp_path / "grouped", max_steps=2, report=False, eval_base=False,
                                 group_by_length=True))
    assert metrics["trainable_params"] > 0


def test_cpu_schedule_steps_follow_the_training_precision():
    """The CPU schedule's step count assumes bf16; an fp32 run gets the fp32 count (same minutes); a set value stays."""
    from hydralora.recipes.config import CPU_FP32_MAX_STEPS, SCHEDULE_DEFAULTS, apply_schedule

    bf16_cfg, fp32_cfg, set_cfg = TrainConfig(), TrainConfig(), TrainConfig(max_steps=7)
    assert apply_schedule(bf16_cfg, on_gpu=False, bf16=True) == "cpu"
    assert bf16_cfg.max_steps == SCHEDULE_DEFAULTS["cpu"]["max_steps"]
    apply_schedule(fp32_cfg, on_gpu=False, bf16=False)
    assert fp32_cfg.max_steps == CPU_FP32_MAX_STEPS < SCHEDULE_DEFAULTS["cpu"]["max_steps"]
    apply_schedule(set_cfg, on_gpu=False, bf16=False)
    assert set_cfg.max_steps == 7
    gpu_cfg = TrainConfig()
    assert apply_schedule(gpu_cfg, on_gpu=True, bf16=False) == "gpu"
    assert gpu_cfg.max_steps == SCHEDULE_DEFAULTS["gpu"]["max_steps"]


@pytest.mark.parametrize("native", [True, False])
def test_bf16_auto_on_a_cpu_follows_native_bf16(monkeypatch, native):
    import hydralora.models as models
    from hydralora.recipes.train import training_in_bf16

    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)
    assert training_in_bf16("auto", "cpu") is native
    assert training_in_bf16(True, "cpu") is True and training_in_bf16(False, "cpu") is False


def test_cpu_bf16_runs_score_under_bf16_autocast():
    from hydralora.recipes.train import scoring_precision

    def evaluate(x):
        return x, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

    assert scoring_precision(evaluate, "cpu", use_bf16=True)(1) == (1, True, torch.bfloat16)
    assert scoring_precision(evaluate, "cpu", use_bf16=False)(1)[1] is False
    assert scoring_precision(evaluate, "cuda", use_bf16=True) is evaluate  # GPU runs score in fp32
