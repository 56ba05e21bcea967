"""Multi-process training: two processes over gloo (torchrun, DDP through Trainer/accelerate) on the CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hydralora

TORCHRUN = shutil.which("torchrun")


def _train_args(toy, out, batch, coef=0.0):
    return [
        "train", "--output-dir", str(out), "--model", str(toy / "model"), "--data", str(toy / "mix.jsonl"),
        "--max-steps", "4", "--seed", "0", "--set", "num_experts=2", "--set", "lora_dropout=0", "--set", "device=cpu",
        "--set", "max_seq_length=32", "--set", "report=false", "--set", "eval_base=false", "--set", "max_new_tokens=2",
        "--set", "learning_rate=0.01", "--set", "save_steps=100", "--set", "eval_max_per_task=2",
        "--set", f"balance_loss_coef={coef}", "--set", f"per_device_batch_size={batch}",
        "--set", "bf16=false",  # fp32 on every CPU, so the one- and two-process sums round alike
    ]


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(toy, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    single = subprocess.run([sys.executable, "-m", "hydralora.cli", *_train_args(toy, tmp_path / "one", 4)],
                            env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    two = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "hydralora.cli",
                          *_train_args(toy, tmp_path / "two", 2)], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    # saved once, by rank 0, and loadable in a single process
    assert len(list((tmp_path / "two").glob("adapter/adapter_model.safetensors"))) == 1
    base = AutoModelForCausalLM.from_pretrained(toy / "model")
    model = peft.PeftModel.from_pretrained(base, tmp_path / "two" / "adapter")
    assert hydralora.hydra_layers(model)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_two_process_ddp_with_the_balance_loss_logs_it_reduced_over_ranks(toy, tmp_path):
    """The balance loss is computed per rank over that rank's tokens (as MoE codes do), so the adapter is not the
    one-process one bit for bit; the run must work, log the loss and save once."""
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    two = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "hydralora.cli",
                          *_train_args(toy, tmp_path / "aux", 2, coef=0.05), "--set", "logging_steps=1"], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    metrics = json.loads((tmp_path / "aux" / "metrics.json").read_text())
    assert [h["aux_loss"] for h in metrics["log_history"] if "aux_loss" in h]


@pytest.mark.parametrize("path", sorted((__import__("pathlib").Path(__file__).resolve().parents[1] / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.num_processes >= 2 and cfg.mixed_precision == "bf16"
