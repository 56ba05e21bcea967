"""Bad inputs and faults a new user runs into: each gets an error naming the field, value or file and what is
allowed, or a documented safe behaviour; nothing saved is lost."""

from __future__ import annotations

import json
import shutil
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import hydralora
from hydralora import HydraLoraConfig
from hydralora.cli import main as cli_main
from hydralora.recipes.config import build_spec
from hydralora.recipes.train import (last_complete_checkpoint, run_train, run_train_loss, split_examples)
from hydralora.data.formats import Example
from hydralora.tuner.state_check import AdapterMismatchError

from test_recipe import toy_spec


# ------------------------------------------------------------------------------------------------ config values
@pytest.mark.parametrize("key,value,match", [
    ("warmup_ratio", 5, r"warmup_ratio=5 is invalid: a share of the steps, 0 <= warmup_ratio < 1"),
    ("warmup_ratio", -0.1, r"warmup_ratio=-0.1 is invalid"),
    ("gradient_accumulation_steps", 0, r"gradient_accumulation_steps=0 is invalid: must be an integer >= 1"),
    ("eval_batch_size", 0, r"eval_batch_size=0 is invalid: must be an integer >= 1"),
    ("save_steps", 0, r"save_steps=0 is invalid"),
    ("logging_steps", -1, r"logging_steps=-1 is invalid"),
    ("max_new_tokens", 0, r"max_new_tokens=0 is invalid"),
    ("auto_n_k_max", 2, r"auto_n_k_max=2 is invalid: must be an integer >= 3"),
    ("weight_decay", -1.0, r"weight_decay=-1.0 is invalid"),
])
def test_bad_training_values_fail_when_the_config_is_built(key, value, match):
    with pytest.raises(ValueError, match=match):
        build_spec({key: value})


def test_a_ratio_within_range_is_kept():
    assert build_spec({"warmup_ratio": "0.1"}).train.warmup_ratio == 0.1


@pytest.mark.parametrize("over,match", [
    ({"router_input": "y"}, r"HydraLoraConfig.router_input='y' is invalid"),
    ({"lora_dropout": 1.5}, r"HydraLoraConfig.lora_dropout=1.5 is invalid"),
    ({"num_experts": 0}, r"HydraLoraConfig.num_experts=0 is invalid"),
    ({"method": "lora", "r": 0}, r"r=0 is invalid: must be an integer >= 1"),
])
def test_adapter_fields_fail_before_the_model_or_data_load(tmp_path, capsys, over, match):
    with pytest.raises(ValueError, match=match):
        build_spec(over)
    # Through the command line, with a model and data that do not exist: the adapter field is what is reported.
    args = ["train", "--output-dir", str(tmp_path / "run"), "--model", str(tmp_path / "no-model"),
            "--data", str(tmp_path / "no.jsonl")]
    for k, v in over.items():
        args += ["--method", v] if k == "method" else ["--set", f"{k}={v}"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "no-model" not in err and "no.jsonl" not in err
    assert not (tmp_path / "run").exists()


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("r: 8\nlearning_rate: [1e-3\nmax_steps: 3\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: not valid YAML \(line \d+, column \d+\)"):
        build_spec({}, str(path))
    assert cli_main(["train", "--config", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_unwritable_output_dir_is_a_clear_error(toy, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    with pytest.raises(ValueError, match=r"output_dir .*a-file/run cannot be written"):
        run_train(toy_spec(toy, blocker / "run"))
    assert blocker.read_text() == "mine"


def test_another_ranks_write_probe_does_not_make_the_output_dir_look_used(tmp_path):
    """Ranks of a multi-process run probe the same folder at once; rank 0 must not take a peer's probe for a
    user's file, and each rank's probe is its own (one rank's cleanup cannot break another's check)."""
    from hydralora.recipes.train import WRITE_PROBE, prepare_output_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / f"{WRITE_PROBE}-999999").write_text("")
    assert prepare_output_dir(str(out), "hydralora", resume=False) == out
    assert sorted(p.name for p in out.iterdir()) == [f"{WRITE_PROBE}-999999"]
    (out / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        prepare_output_dir(str(out), "hydralora", resume=False)


# ------------------------------------------------------------------------------------------------ data splits
def _ex(task, i):
    return Example(task=task, prompt=f"q{i}", target="a")


def test_a_single_example_task_trains_and_is_not_scored_with_a_warning():
    rows = [_ex("big", i) for i in range(20)] + [_ex("lonely", 0)]
    with pytest.warns(UserWarning, match=r"\['lonely'\] have a single example"):
        train, test = split_examples(rows, seed=0)
    assert [e.task for e in train].count("lonely") == 1 and all(e.task == "big" for e in test)


def test_one_row_file_fails_before_training_and_leaves_the_folder_empty(toy, tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"task": "t", "input": "red is a", "target": "color"}) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"one\.jsonl: no held-out examples to score .*at least 2 per task"):
            run_train(toy_spec(toy, tmp_path / "run", data=str(one)))
    assert not any((tmp_path / "run").iterdir())


def test_a_late_failure_leaves_the_folder_reusable(toy, tmp_path, monkeypatch):
    """A run that fails before its first complete checkpoint removes what it wrote (analysis.json, tensorboard/):
    the corrected rerun into the same --output-dir is not refused."""
    import hydralora.eval.scoring as scoring

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(scoring, "evaluate", broken)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run_train(toy_spec(toy, run, num_experts="auto", auto_n_k_max=3, report=False))
    assert run.is_dir() and not any(run.iterdir())
    monkeypatch.undo()
    metrics = run_train(toy_spec(toy, run, max_steps=2, report=False, eval_base=False))
    assert metrics["adapted"] and (run / "adapter" / "adapter_model.safetensors").is_file()


def test_a_failure_after_a_checkpoint_keeps_it_for_resume(toy, tmp_path, monkeypatch):
    import hydralora.eval.scoring as scoring

    monkeypatch.setattr(scoring, "evaluate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("late")))
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="late"):
        run_train(toy_spec(toy, run, max_steps=3, eval_base=False, report=False))
    assert last_complete_checkpoint(run / "checkpoints") is not None


# ------------------------------------------------------------------------------------------------ resume
def test_run_train_loss_weights_each_logged_window_by_its_steps():
    history = [{"loss": 4.0, "step": 1}, {"loss": 2.0, "step": 3}, {"learning_rate": 0.1, "step": 3},
               {"loss": 1.0, "step": 6}, {"train_loss": 9.0, "step": 6}]
    assert run_train_loss(history) == pytest.approx((4.0 + 2 * 2.0 + 3 * 1.0) / 6)
    assert run_train_loss([]) is None


def test_resume_after_a_kill_while_writing_a_checkpoint(toy, tmp_path):
    """The newest checkpoint is damaged (killed while written): --resume falls back to the last complete one, and the
    adapter and the whole run's train_loss equal the uninterrupted run's."""
    kw = dict(eval_base=False, report=False, lora_dropout=0.1, logging_steps=2)
    full = run_train(toy_spec(toy, tmp_path / "full", **kw))
    part = tmp_path / "part"
    run_train(toy_spec(toy, part, **kw))
    last = part / "checkpoints" / "checkpoint-6"
    (last / "trainer_state.json").unlink()  # written last: a kill before it leaves the rest
    data = (last / "adapter_model.safetensors").read_bytes()
    (last / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    shutil.rmtree(part / "adapter")
    for f in ("metrics.json", "config.json"):
        (part / f).unlink()
    assert last_complete_checkpoint(part / "checkpoints").name == "checkpoint-3"
    resumed = run_train(toy_spec(toy, part, resume=True, **kw))
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(part / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    losses = [e["loss"] for e in full["log_history"] if "loss" in e]
    assert full["train_loss"] == pytest.approx(run_train_loss(full["log_history"]))
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)
    after_restart = [e["loss"] for e in resumed["log_history"] if "loss" in e and e["step"] > 3]
    assert len(losses) >= 2 and resumed["train_loss"] != pytest.approx(sum(after_restart) / len(after_restart))


# ------------------------------------------------------------------------------------------------ adapters
def _llama(layers=2, hidden=32, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=48, vocab_size=50))


@pytest.fixture
def saved_adapter(tmp_path):
    cfg = HydraLoraConfig(r=4, num_experts=2, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(_llama(layers=4), cfg)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_adapter_from_a_deeper_model_is_refused_not_dropped(saved_adapter):
    with pytest.raises(AdapterMismatchError, match=r"12 of its 24 HydraLoRA tensors find no adapted module here "
                                                   r"\(e\.g\. layers\.2\.self_attn"):
        peft.PeftModel.from_pretrained(_llama(layers=2), str(saved_adapter))
    with pytest.raises(AdapterMismatchError, match=r"adapter_model\.safetensors: the adapter does not fit"):
        hydralora.load_adapter(_llama(layers=2), saved_adapter)
    model = hydralora.load_adapter(_llama(layers=4), saved_adapter)  # the right base loads
    assert len(hydralora.hydra_layers(model)) == 8


def test_adapter_on_another_width_or_edited_num_experts_names_the_shapes(saved_adapter):
    with pytest.raises(AdapterMismatchError, match=r"another shape \(layers\.0\.self_attn\.q_proj\.hydralora_A\.default: "
                                                   r"adapter \[4, 32\] vs model \[4, 64\]"):
        peft.PeftModel.from_pretrained(_llama(layers=4, hidden=64), str(saved_adapter))
    path = saved_adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["num_experts"] = 3
    path.write_text(json.dumps(cfg))
    with pytest.raises(AdapterMismatchError, match=r"adapter \[2, 32, 4\] vs model \[3, 32, 4\].*num_experts"):
        hydralora.load_adapter(_llama(layers=4), saved_adapter)


@pytest.mark.parametrize("damage,match", [
    ("truncate", r"adapter_model\.safetensors: not a readable safetensors file"),
    ("random", r"adapter_model\.safetensors: not a readable safetensors file"),
    ("config", r"adapter_config\.json: not valid JSON \(line \d+, column \d+"),
])
def test_damaged_adapter_files_are_named(saved_adapter, capsys, damage, match):
    weights, config = saved_adapter / "adapter_model.safetensors", saved_adapter / "adapter_config.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "random":
        weights.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                          dtype=torch.uint8).numpy().tobytes())
    else:
        config.write_text(config.read_text()[:40])
    with pytest.raises(ValueError, match=match):
        hydralora.load_adapter(_llama(layers=4), saved_adapter)
    assert cli_main(["eval", "--adapter", str(saved_adapter), "--device", "cpu"]) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_eval_on_another_base_is_refused(toy, tmp_path, capsys):
    out = tmp_path / "run"
    run_train(toy_spec(toy, out, max_steps=1, eval_base=False, report=False))
    other = tmp_path / "other"
    tok_files = [p for p in (toy / "model").iterdir() if "token" in p.name]
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(toy / "model", num_hidden_layers=1))
    model.save_pretrained(other)
    for p in tok_files:
        shutil.copy(p, other / p.name)
    assert cli_main(["eval", "--adapter", str(out / "adapter"), "--model", str(other), "--device", "cpu"]) == 2
    assert "find no adapted module" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ model cache
def test_interrupted_conversion_leftovers_are_removed_on_the_next_one(tmp_path, monkeypatch):
    from hydralora import models

    target = tmp_path / "models" / "smollm2-135m-instruct"
    stale = target.parent / (target.name + ".tmp-killed")
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    monkeypatch.setattr(models, "smollm2_package_dir", lambda: tmp_path)

    class Stop(Exception):
        pass

    import transformers

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", stop)
    with pytest.raises(Stop):
        models.ensure_smollm2(target)
    assert not stale.exists()


# ------------------------------------------------------------------------------------------------ 4-bit bases
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_4bit_on_a_machine_without_cuda_is_a_clear_error(toy, tmp_path):
    from hydralora.models import load_model_and_tokenizer

    with pytest.raises(ValueError, match=r"load_in_4bit=True needs a CUDA GPU \(torch sees no CUDA device\)"):
        load_model_and_tokenizer(str(toy / "model"), load_in_4bit=True)
    with pytest.raises(ValueError, match=r"load_in_4bit=True needs a CUDA GPU"):
        run_train(toy_spec(toy, tmp_path / "run", load_in_4bit="true"))
    assert not (tmp_path / "run").exists()


def test_merge_into_a_quantized_base_is_refused_and_export_still_works(tmp_path):
    """A base layer whose weight is not floating point (as bitsandbytes' Linear4bit / Linear8bitLt store it) is never
    merged into; a stock LoRA export, which leaves the base alone, still works."""
    model = peft.get_peft_model(_llama(layers=1), HydraLoraConfig(r=4, num_experts=2, target_modules=["q_proj"],
                                                                  init_b="rlora"))
    layer = hydralora.hydra_layers(model)[0][1]
    base = layer.get_base_layer()
    base.weight = torch.nn.Parameter(torch.zeros_like(base.weight, dtype=torch.uint8), requires_grad=False)
    before = base.weight.clone()
    with pytest.raises(ValueError, match=r"cannot merge into a quantized base layer \(Linear, weight dtype torch.uint8\)"
                                         r".*export_lora"):
        hydralora.merge_and_unload(model, "mean")
    assert torch.equal(base.weight, before) and not layer.merged
    assert len(model.base_model._hydra_hooks) == 2  # the refused merge left the model as it was
    hydralora.export_lora(model, str(tmp_path / "lora"), "mean")
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
