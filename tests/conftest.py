"""Tiny random models built in code, one per architecture family, shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 101


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, pad_token_id=0))


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=VOCAB,
        max_position_embeddings=64, num_labels=3,
    )
    return BertForSequenceClassification(cfg)


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
    )
    return Qwen2ForCausalLM(cfg)


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "qwen2": tiny_qwen2}
# Which modules each family calls what (attention projections and all-linear).
TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "bert": ["query", "value"],
    "qwen2": ["q_proj", "v_proj"],
}
TASK_TYPES = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "qwen2": "CAUSAL_LM"}


def make_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = MODELS[family]()
    model.eval()
    return model


def randomize_adapters(model, seed: int = 1, std: float = 0.2) -> None:
    """Give every HydraLoRA B and router non-zero values, so comparisons are not trivially zero."""
    import hydralora

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in hydralora.hydra_layers(model):
            for store in (layer.hydralora_B, layer.hydralora_router):
                for p in store.values():
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def batch(family: str, seed: int = 0, b: int = 2, t: int = 9, pad: bool = True):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, t), generator=gen)
    mask = torch.ones(b, t, dtype=torch.long)
    if pad and b > 1:
        mask[1, :3] = 0  # left padding on the second row
        ids[1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def llama():
    return make_model("llama")
