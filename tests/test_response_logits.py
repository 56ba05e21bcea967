"""Projecting only the scored positions onto the vocabulary gives the loss and gradients of the full path."""

from __future__ import annotations

import pytest
import torch

from conftest import MODELS
from hydralora.recipes.response_logits import keep_response_logits, logits_to_keep_support


def _batch(vocab: int, seed: int = 0):
    """Right-padded rows with prompts of different lengths and answers of 1-4 tokens (labels -100 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    lengths, answers = [12, 7, 15, 9], [1, 3, 2, 4]
    T = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), T), generator=g)  # (B, T)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (n, a) in enumerate(zip(lengths, answers)):
        mask[b, :n] = 1
        labels[b, n - a:n] = ids[b, n - a:n]
        ids[b, n:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("form", ["mask", "index"])
def test_loss_and_grads_equal_the_full_logits_path(family, form):
    if form == "mask" and logits_to_keep_support(MODELS[family]()) != "mask":
        pytest.skip("this transformers version slices logits_to_keep by 1-D positions only")
    torch.manual_seed(0)
    model = MODELS[family]().eval()  # eval: no dropout, so both passes see the same function
    batch = _batch(model.config.vocab_size)
    full = model(**batch).loss
    full.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    kept = keep_response_logits(batch, form)
    out = model(**kept)
    out.loss.backward()
    scored = int((batch["labels"][:, 1:] != -100).sum())
    assert out.logits.shape[-2 if form == "index" else 0] < batch["input_ids"].numel()
    if form == "mask":
        assert out.logits.shape[0] == scored  # exactly the scored positions
    torch.testing.assert_close(out.loss, full, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_forms_and_fallbacks():
    assert logits_to_keep_support(MODELS["llama"]()) in ("mask", "index")
    assert logits_to_keep_support(MODELS["bert"]()) is None  # no logits_to_keep: the full path
    batch = _batch(50)
    assert keep_response_logits(batch, None) is batch
    empty = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    assert keep_response_logits(empty, "mask") is empty and keep_response_logits(empty, "index") is empty
    with pytest.raises(ValueError, match="form='rows'"):
        keep_response_logits(batch, "rows")
