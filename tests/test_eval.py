"""Evaluation: MC log-likelihood scoring, batched generation, accuracy tables."""

from __future__ import annotations

import pytest
import torch

from hydralora.data import Example
from hydralora.data.collate import encode_continuation, encode_prompt
from hydralora.eval import (choice_loglikelihoods, evaluate, format_table, generate_answers,
                            normalize_answer)

from conftest import tiny_tokenizer


def tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, vocab_size=vocab_size,
                      max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
                      bos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab_size, n_positions=256,
                     pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama(tok):
    return tiny_llama(len(tok))


MC = [
    Example("mc_a", "Q: How many apples do I have?\nA:", "three",
            choices=["three", "banana cherry apple", "True"], answer="three"),
    Example("mc_a", "Is it plausible?", "plausible", choices=["plausible", "implausible"],
            answer="plausible"),
    Example("mc_b", "Sort: cherry apple", "apple cherry",
            choices=["apple cherry", "cherry apple", "False", "banana"], answer="apple cherry"),
]


def manual_loglik(model, tok, ex: Example, choice: str) -> float:
    """Unbatched, unpadded reference: sum of log p(choice token | everything before)."""
    p = encode_prompt(tok, ex.prompt)
    c = encode_continuation(tok, ex.prompt, choice)
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
    return sum(float(logp[len(p) + t - 1, c[t]]) for t in range(len(c)))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_choice_loglikelihoods_match_manual(tok, arch):
    # GPT-2 has absolute positions: only right if left padding gets corrected position_ids.
    model = tiny_llama(len(tok)) if arch == "llama" else tiny_gpt2(len(tok))
    batched = choice_loglikelihoods(model, tok, MC, batch_size=4)
    for ex, scores in zip(MC, batched):
        manual = [manual_loglik(model, tok, ex, c) for c in ex.choices]
        assert scores == pytest.approx(manual, abs=1e-4)


def test_mc_picks_highest_likelihood(tok, llama):
    scores = choice_loglikelihoods(llama, tok, MC, batch_size=3)
    best = [ex.choices[max(range(len(s)), key=s.__getitem__)] for ex, s in zip(MC, scores)]
    worst = [ex.choices[min(range(len(s)), key=s.__getitem__)] for ex, s in zip(MC, scores)]
    right = [Example(e.task, e.prompt, b, choices=e.choices, answer=b) for e, b in zip(MC, best)]
    wrong = [Example(e.task, e.prompt, w, choices=e.choices, answer=w) for e, w in zip(MC, worst)]
    r = evaluate(llama, tok, right, batch_size=2, return_predictions=True)
    assert r["mean_accuracy"] == 1.0 and r["per_task"] == {"mc_a": 1.0, "mc_b": 1.0}
    assert [p["prediction"] for p in r["predictions"]] == best
    assert evaluate(llama, tok, wrong, batch_size=2)["mean_accuracy"] == 0.0


def test_generation_batched_matches_unbatched(tok, llama):
    prompts = ["Q: How many apples do I have?\nA:", "Sort the following words:", "apple"]
    exs = [Example("gen", p, "x") for p in prompts]
    batched = generate_answers(llama, tok, exs, batch_size=3, max_new_tokens=6)
    for ex, got in zip(exs, batched):
        ids = torch.tensor([encode_prompt(tok, ex.prompt)])
        out = llama.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        expected = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
        assert got == expected


def test_evaluate_mixed_macro_mean(tok, llama):
    gen_prompts = ["Q: How many apples do I have?\nA:", "Sort the following words:"]
    outputs = generate_answers(llama, tok, [Example("g", p, "x") for p in gen_prompts],
                               max_new_tokens=6)
    gen = [Example("gen", gen_prompts[0], outputs[0].upper() + " ."),  # normalised match
           Example("gen", gen_prompts[1], "definitely not this", aliases=["nor this"])]
    examples = gen + MC[:1]
    model_was_training = llama.training
    llama.train()
    r = evaluate(llama, tok, examples, batch_size=2, max_new_tokens=6)
    assert llama.training  # restored
    llama.train(model_was_training)
    assert r["tasks"]["gen"] == {"accuracy": 0.5, "n": 2, "correct": 1, "kind": "gen"}
    assert r["tasks"]["mc_a"]["kind"] == "mc" and r["n_examples"] == 3
    assert 0.0 <= r["mean_accuracy"] <= 1.0
    assert r["mean_accuracy"] == pytest.approx((0.5 + r["per_task"]["mc_a"]) / 2)
    assert r["micro_accuracy"] == pytest.approx((1 + r["tasks"]["mc_a"]["correct"]) / 3)


def test_evaluate_accepts_rows_and_peft(tok):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(len(tok)), LoraConfig(r=2, target_modules=["q_proj"]))
    rows = [{"task": "t", "input": "Is it plausible?", "choices": ["plausible", "implausible"],
             "answer": "plausible"}, {"task": "g", "input": "apple", "target": "banana"}]
    r = evaluate(model, tok, rows, batch_size=2, max_new_tokens=4)
    assert set(r["per_task"]) == {"t", "g"}
    assert all(0.0 <= v <= 1.0 for v in r["per_task"].values())
    with pytest.raises(ValueError, match="no examples"):
        evaluate(model, tok, [])


def test_long_prompts_are_truncated(tok, llama):
    ex = Example("t", "apple banana " * 200 + "Q:", "three", choices=["three", "True"],
                 answer="three")
    scores = choice_loglikelihoods(llama, tok, [ex], max_length=64)
    assert len(scores[0]) == 2 and all(s < 0 for s in scores[0])
    assert len(generate_answers(llama, tok, [ex], max_new_tokens=4, max_length=64)) == 1


def test_normalize_answer():
    assert normalize_answer("  The  Answer\tIS 3.  ") == "the answer is 3"
    assert normalize_answer("apple cherry!?") == "apple cherry"
    assert normalize_answer("(a)") == "(a)" and normalize_answer("] }") == "] }"


def test_format_table():
    adapted = {"mean_accuracy": 0.75, "n_examples": 4, "per_task": {"a": 1.0, "b": 0.5},
               "tasks": {"a": {"n": 2}, "b": {"n": 2}}}
    base = {"mean_accuracy": 0.5, "per_task": {"a": 0.5, "b": 0.5}}
    table = format_table(adapted, baseline=base)
    assert "base" in table and "adapted" in table
    row_a = next(line for line in table.splitlines() if line.startswith("a "))
    assert "50.0" in row_a and "100.0" in row_a and "+50.0" in row_a
    assert "+25.0" in table.splitlines()[-1]
    assert "75.0" in format_table(adapted)


def _mixed_lengths():
    """MC examples with 2-4 choices of different token lengths and prompts of different lengths."""
    return MC + [Example("mc_c", "apple " * (3 + k) + "Q:", "True",
                         choices=["True", "False", "banana cherry"][: 2 + k % 2], answer="True")
                 for k in range(4)]


def _count_prompt_cache_batches(monkeypatch) -> list:
    """Record every batch the prompt-cache path scores (a list that grows by one per batch it served)."""
    from hydralora.eval import scoring

    served, inner = [], scoring._score_with_prompt_cache

    def counted(*args):
        got = inner(*args)
        served.append(got is not None)
        return got

    monkeypatch.setattr(scoring, "_score_with_prompt_cache", counted)
    return served


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prompt_scores_equal_whole_sequences(tok, arch, monkeypatch):
    # One prompt pass and a cache per choice row must give each choice the same log-likelihood as scoring the
    # whole (prompt, choice) sequence; GPT-2 also checks the choices' absolute positions after left padding.
    model = tiny_llama(len(tok)) if arch == "llama" else tiny_gpt2(len(tok))
    exs = _mixed_lengths()
    served = _count_prompt_cache_batches(monkeypatch)
    shared = choice_loglikelihoods(model, tok, exs, batch_size=3)
    assert served == [True, True, True]  # 7 examples, 3 per batch, all through the cache
    whole = choice_loglikelihoods(model, tok, exs, batch_size=3, share_prompt=False)
    for s, w, ex in zip(shared, whole, exs):
        assert s == pytest.approx(w, abs=1e-4)
        assert s == pytest.approx([manual_loglik(model, tok, ex, c) for c in ex.choices], abs=1e-4)


def test_shared_prompt_with_hydralora_routing(tok, monkeypatch):
    import peft

    from hydralora import HydraLoraConfig, set_routing

    model = peft.get_peft_model(tiny_llama(len(tok)), HydraLoraConfig(r=4, num_experts=3, init_b="rlora"))
    model.eval()
    exs = _mixed_lengths()
    whole = choice_loglikelihoods(model, tok, exs, batch_size=4, share_prompt=False)
    served = _count_prompt_cache_batches(monkeypatch)
    assert choice_loglikelihoods(model, tok, exs, batch_size=4) == [pytest.approx(w, abs=1e-4) for w in whole]
    assert served == [True, True]
    # Sequence routing: the gate is the mean over the scored tokens, so every choice is scored whole.
    set_routing(model, "sequence")
    seq_whole = choice_loglikelihoods(model, tok, exs, batch_size=4, share_prompt=False)
    assert choice_loglikelihoods(model, tok, exs, batch_size=4) == seq_whole
    assert served == [True, True] and seq_whole != whole
