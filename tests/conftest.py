"""Tiny random models built in code, one per architecture family, shared by the tests."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 101


def tiny_tokenizer(chat_template: str | None = None):
    """A byte-level BPE tokenizer trained on a few sentences: offline and fast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Q: How many apples do I have?\nA: three", "plausible implausible True False",
              "Sort the following words alphabetically: apple banana cherry",
              "user: hello\nassistant: hi there"] * 4
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>",
                                  bos_token="<bos>", unk_token="<unk>")
    if chat_template:
        tok.chat_template = chat_template
    return tok


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


COLORS = ["red", "blue", "green", "yellow"]
ANIMALS = ["cat", "dog", "bird", "fish"]


def _rows(seed=0, n=24):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        c, a = rng.choice(COLORS), rng.choice(ANIMALS)
        split = "test" if i % 4 == 0 else "train"
        rows.append({"task": "color", "input": f"what color is the {a} ? the {a} is {c}", "choices": COLORS, "answer": c, "split": split})
        rows.append({"task": "animal", "input": f"name the animal : {c} {a}", "target": a, "split": split})
    return rows


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """A tiny Llama + word-level tokenizer saved as a local HF folder, and a multi-task JSONL."""
    return make_toy(tmp_path_factory.mktemp("toy"))


def make_toy(root):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rows = _rows()
    words = sorted({w for r in rows for w in (r["input"] + " " + r.get("target", r.get("answer", ""))).split()})
    vocab = {t: i for i, t in enumerate(dict.fromkeys(["<pad>", "<unk>", "<s>", "</s>"] + words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        vocab_size=len(vocab), max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    ))
    model.save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    data = root / "mix.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root
