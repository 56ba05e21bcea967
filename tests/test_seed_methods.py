"""LoPE, ThanoRA and MeTA-LoRA: each method's defining property on tiny random models."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

import hydralora
from hydralora.data.collate import SFTCollator, SFTDataset
from hydralora.data.formats import Example, load_examples
from hydralora.methods import (allocate_ranks, init_task_subspaces, meta_step, noisy_examples, perturb_text,
                               subspace_overlap, thanora_penalty)
from hydralora.methods.meta_lora import train_meta_lora
from hydralora.methods.thanora import task_heterogeneity
from hydralora.recipes.config import build_spec
from hydralora.recipes.methods import build_model, run_lope
from hydralora.recipes.train import HydraTrainer, run_train, split_examples

from test_recipe import toy_spec


def _toy_parts(toy):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy / "model")
    train, _ = split_examples(list(load_examples(toy / "mix.jsonl", tokenizer=tok)), seed=0)
    return tok, train


def _task_batches(train, tok, per_batch=6):
    collate = SFTCollator(tok)
    out = {}
    for task in sorted({e.task for e in train}):
        feats = SFTDataset([e for e in train if e.task == task], tok, max_length=32).features
        out[task] = [collate(feats[i:i + per_batch]) for i in range(0, len(feats), per_batch)]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# generated noise


def test_character_noise_is_seeded_and_at_the_rate():
    gen = random.Random(5)
    text = "".join(gen.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(800))
    assert perturb_text(text, 0.0, random.Random(0)) == text
    a, b = perturb_text(text, 0.1, random.Random(1)), perturb_text(text, 0.1, random.Random(1))
    assert a == b and a != text
    # about 10% of the characters touched: the edit leaves most of the text in place
    import difflib

    ratio = difflib.SequenceMatcher(None, text, a, autojunk=False).ratio()
    assert 0.75 < ratio < 0.97, ratio
    with pytest.raises(ValueError, match="rate=1.5"):
        perturb_text(text, 1.5, random.Random(0))


def test_noisy_examples_perturb_the_stated_fraction_and_labels_become_wrong():
    rows = [Example(task="mc", prompt=f"question {i} about colours", target="red", choices=["red", "blue", "green"], answer="red")
            for i in range(20)]
    rows += [Example(task="gen", prompt=f"name {i}", target=t) for i, t in enumerate(["cat", "dog"] * 10)]
    char = noisy_examples(rows, 0.25, "char", rate=0.3, seed=0)
    changed = [i for i, (a, b) in enumerate(zip(rows, char)) if a.prompt != b.prompt]
    assert len(changed) == 10 and all(char[i].target == rows[i].target for i in range(len(rows)))
    label = noisy_examples(rows, 0.5, "label", seed=0)
    flipped = [i for i, (a, b) in enumerate(zip(rows, label)) if a.target != b.target]
    assert len(flipped) == 20
    for i in flipped:
        e = label[i]
        assert e.prompt == rows[i].prompt
        if e.is_multiple_choice:
            assert e.answer == e.target and e.answer in e.choices and e.answer != "red"
        else:
            assert e.target in ("cat", "dog") and e.target != rows[i].target
    with pytest.raises(ValueError, match="kind='typo'"):
        noisy_examples(rows, 0.1, "typo")


# ---------------------------------------------------------------------------------------------------------------------
# LoPE


class _Snapshots(TrainerCallback):
    """Every HydraLoRA B (N, d, r) at the end of each Trainer run (one per LoPE stage)."""

    def __init__(self):
        self.after = []

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after.append([B.detach().clone() for _, layer in hydralora.hydra_layers(model) for B in layer.hydralora_B.values()])


def test_lope_poison_expert_trained_in_stage_one_frozen_in_stage_two_and_masked_at_inference(toy, tmp_path):
    tok, train = _toy_parts(toy)
    spec = toy_spec(toy, tmp_path / "run", method="lope", max_steps=3, lope_poison_steps=3, weight_decay=0.1,
                    lora_dropout=0.0, lope_embedding_noise=0.05)
    model = build_model(AutoModelForCausalLM.from_pretrained(toy / "model"), "lope", spec.adapter)
    poison = spec.adapter["num_experts"]  # 2 normal experts, the poisoning expert is index 2
    cfg = model.peft_config["default"]
    assert cfg.num_experts == 3 and cfg.masked_experts == [poison]
    snaps = _Snapshots()
    args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), per_device_train_batch_size=4, learning_rate=5e-2,
                             weight_decay=0.1, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = HydraTrainer(model=model, args=args, train_dataset=SFTDataset(train, tok, max_length=32),
                           data_collator=SFTCollator(tok), callbacks=[snaps])
    out = run_lope(trainer, train, spec, tok)
    stage_one, stage_two = snaps.after
    for B1 in stage_one:  # stage one: only the poisoning expert moved (all B start at zero)
        assert B1[poison].abs().sum() > 0
        assert torch.equal(B1[:poison], torch.zeros_like(B1[:poison]))
    for B1, B2 in zip(stage_one, stage_two):  # stage two: the poisoning expert exactly as stage one left it
        assert torch.equal(B2[poison], B1[poison])
        assert B2[:poison].abs().sum() > 0
    assert out.metrics["stages"]["poison_steps"] == 3 and {h["stage"] for h in trainer.state.log_history} == {"poison", "clean"}

    # inference: the poisoning expert contributes nothing (any values of B_D give the same output) ...
    batch = SFTCollator(tok)([SFTDataset(train[:3], tok, max_length=32)[i] for i in range(3)])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model.eval()
    with torch.no_grad():
        before = model(**inputs).logits
        for _, layer in hydralora.hydra_layers(model):
            layer.hydralora_B["default"][poison].normal_(std=1.0)
        after = model(**inputs).logits
        torch.testing.assert_close(before, after)
        model.train()  # ... while in training it takes part in the forward
        assert not torch.allclose(model(**inputs).logits, before)
    model.eval()
    # and it stays masked after save_pretrained / PeftModel.from_pretrained
    model.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy / "model"), tmp_path / "adapter").eval()
    assert loaded.peft_config["default"].masked_experts == [poison]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, after)


def test_lope_runs_from_the_recipe(toy, tmp_path):
    metrics = run_train(toy_spec(toy, tmp_path / "run", method="lope", max_steps=2, report=False, eval_base=False))
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "HYDRALORA" and cfg["num_experts"] == 3 and cfg["masked_experts"] == [2]
    assert metrics["stages"]["poison_steps"] == 1 and metrics["stages"]["clean_steps"] == 2 and "adapted" in metrics


# ---------------------------------------------------------------------------------------------------------------------
# ThanoRA


def test_rank_allocation_follows_heterogeneity():
    ranks = allocate_ranks({"a": 0.1, "b": 0.3, "c": 0.6}, 16)
    assert sum(ranks.values()) == 16 and min(ranks.values()) >= 1
    assert ranks["a"] < ranks["b"] < ranks["c"]
    assert allocate_ranks({"a": 1.0, "b": 1.0}, 4) == {"a": 2, "b": 2}
    with pytest.raises(ValueError, match="r=2 is invalid for ThanoRA"):
        allocate_ranks({"a": 1, "b": 1, "c": 1}, 2)


def _thanora_model(toy, r=6):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(toy / "model")
    return peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"]))


def test_thanora_subspaces_orthogonal_at_init_and_kept_apart_by_the_regulariser(toy):
    tok, train = _toy_parts(toy)
    batches = _task_batches(train, tok)
    model = _thanora_model(toy)
    het = task_heterogeneity(model, batches)
    assert set(het) == {"animal", "color"} and all(0 < h <= 1 for h in het.values())
    slices = init_task_subspaces(model, batches, allocate_ranks(het, 6))
    assert subspace_overlap(model, slices) < 1e-5
    A = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    torch.testing.assert_close(A.norm(dim=-1), torch.full((6,), 3 ** -0.5), rtol=1e-4, atol=1e-5)
    overlaps = {}
    for coef in (0.0, 1.0):
        trained = copy.deepcopy(model)
        handle = hydralora.methods.add_loss_penalty(trained, thanora_penalty(trained, slices), coef)
        opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=5e-2)
        trained.train()
        for step in range(6):
            for task in batches:
                trained(**batches[task][step % len(batches[task])]).loss.backward()
                opt.step()
                opt.zero_grad()
        handle.remove()
        overlaps[coef] = subspace_overlap(trained, slices)
    assert overlaps[0.0] > 0.05, overlaps  # training alone mixes the subspaces ...
    assert overlaps[1.0] < 0.5 * overlaps[0.0], overlaps  # ... the regulariser keeps them near-orthogonal


def _input_covariances(model, batches) -> dict[str, torch.Tensor]:
    """Per LoRA layer, the uncentred covariance of its inputs over the batches' real tokens, one hook per layer."""
    sums, counts, mask, handles = {}, {}, {}, []
    for name, m in model.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            def hook(mod, args, name=name):
                x = args[0][mask["m"].bool()].double()  # (T', k)
                sums[name] = sums.get(name, 0) + x.T @ x
                counts[name] = counts.get(name, 0) + x.shape[0]
            handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad(), model.disable_adapter():
        for b in batches:
            mask["m"] = b["attention_mask"]
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in handles:
        h.remove()
    return {n: sums[n] / counts[n] for n in sums}


def test_thanora_init_follows_its_definition_layer_by_layer(toy):
    """Heterogeneity = mean over layers of effective rank / width (layers sharing an input counted each); block t of
    every A spans the top principal directions of task t's inputs off the earlier blocks (exact eigendecomposition
    here, against the init's iterative solver)."""
    tok, train = _toy_parts(toy)
    batches = _task_batches(train, tok)
    model = _thanora_model(toy)
    model.eval()
    covs = {t: _input_covariances(model, batches[t]) for t in sorted(batches)}
    het = task_heterogeneity(model, batches)
    for t, c in covs.items():
        eff = []
        for cov in c.values():
            p = torch.linalg.eigvalsh(cov).clamp_min(0)
            p = p[p > 0] / p.sum()
            eff.append(float(torch.exp(-(p * p.log()).sum())) / cov.shape[0])
        assert het[t] == pytest.approx(sum(eff) / len(eff), rel=1e-4)
    ranks = {"animal": 2, "color": 4}
    slices = init_task_subspaces(model, batches, ranks)
    layers = dict(hydralora.methods.thanora.lora_layers(model))
    assert len(layers) == 6
    for name, layer in layers.items():
        A = layer.lora_A["default"].weight.double()  # (6, k)
        k = A.shape[1]
        U = torch.zeros(0, k, dtype=torch.float64)
        for t in sorted(ranks):
            P = torch.eye(k, dtype=torch.float64) - U.T @ U
            _, vecs = torch.linalg.eigh(P @ covs[t][name] @ P)  # ascending
            want = vecs[:, -ranks[t]:]  # (k, r_t)
            lo, hi = slices[t]
            got = torch.linalg.qr(A[lo:hi].T)[0]  # (k, r_t)
            cos = torch.linalg.svdvals(want.T @ got)  # cosines of the principal angles
            assert cos.min() > 0.999, (name, t, cos)
            U = torch.cat([U, want.T], 0)


def test_thanora_penalty_is_the_per_layer_mean_of_cross_task_squared_cosines(toy):
    """The penalty stacks layers of one shape into a batch; it must equal the plain per-layer definition, in value
    and in gradient, on a model whose LoRA layers come in several shapes."""
    model = _thanora_model(toy)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    slices = {"a": (0, 2), "b": (2, 3), "c": (3, 6)}
    owner = torch.tensor([0, 0, 1, 2, 2, 2])
    cross = (owner[:, None] != owner[None, :]).float()  # (6, 6)

    def cos2(M):  # (6, n): mean squared cosine over pairs of rows of different tasks
        Mh = torch.nn.functional.normalize(M.float(), dim=-1)
        return ((Mh @ Mh.T) ** 2 * cross).sum() / cross.sum()

    layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len({(m.lora_A["default"].weight.shape, m.lora_B["default"].weight.shape) for m in layers}) > 1
    expected = torch.stack([cos2(m.lora_A["default"].weight) + cos2(m.lora_B["default"].weight.T) for m in layers]).mean()
    params = [p for p in model.parameters() if p.requires_grad]
    want = torch.autograd.grad(expected, params)
    got_value = thanora_penalty(model, slices)()
    got = torch.autograd.grad(got_value, params)
    torch.testing.assert_close(got_value, expected, rtol=1e-5, atol=1e-7)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


def test_thanora_run_is_a_stock_lora_that_merges_to_the_same_model(toy, tmp_path):
    metrics = run_train(toy_spec(toy, tmp_path / "run", method="thanora", r=4, lora_alpha=8, max_steps=3,
                                 learning_rate=2e-2, report=False, eval_base=False))
    stages = metrics["stages"]
    assert sum(stages["ranks"].values()) == 4 and set(stages["ranks"]) == {"animal", "color"}
    assert stages["overlap_init"] < 1e-5
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy / "model"), adapter).eval()
    assert isinstance(model.peft_config["default"], peft.LoraConfig)
    ids = torch.randint(4, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    assert not torch.allclose(unmerged, base)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# MeTA-LoRA


def _lora(toy):
    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(toy / "model"),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # non-zero B, so every LoRA parameter has a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    return model


def test_meta_step_aggregates_the_query_gradients_of_the_task_adapted_copies(toy):
    tok, train = _toy_parts(toy)
    batches = _task_batches(train, tok, per_batch=4)
    tasks = {t: (b[:2], b[2]) for t, b in batches.items()}  # two support batches, one query batch
    model = _lora(toy)
    model.train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    shared = [p.detach().clone() for p in params]
    result = meta_step(params, lambda b: model(**b).loss, tasks, inner_lr=0.1, inner_steps=2, keep_adapters=True)
    for p, w in zip(params, shared):  # the shared adapter is left as it was
        assert torch.equal(p, w)
    # by hand: copy the model per task, two SGD steps on the support batches, the query gradient, the mean
    expected = [torch.zeros_like(p) for p in params]
    for task, (support, query) in tasks.items():
        copy_ = copy.deepcopy(model)
        own = dict(copy_.named_parameters())
        for batch in support:
            copy_.zero_grad()
            copy_(**batch).loss.backward()
            with torch.no_grad():
                for n in names:
                    own[n] -= 0.1 * own[n].grad
        for n, adapted in zip(names, result.task_adapters[task]):  # stage one's per-task adapter
            torch.testing.assert_close(adapted, own[n].detach())
        copy_.zero_grad()
        copy_(**query).loss.backward()
        for e, n in zip(expected, names):
            e += own[n].grad / len(tasks)
    for g, e in zip(result.grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    a, c = result.task_adapters["animal"], result.task_adapters["color"]
    assert any(not torch.equal(x, y) for x, y in zip(a, c)) and any(not torch.equal(x, w) for x, w in zip(a, shared))


def test_meta_training_changes_only_the_shared_adapter(toy):
    tok, train = _toy_parts(toy)
    model = _lora(toy)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    feats = {t: SFTDataset([e for e in train if e.task == t], tok, max_length=32).features for t in ("animal", "color")}
    history = train_meta_lora(model, feats, SFTCollator(tok), max_steps=2, learning_rate=1e-2, inner_lr=1e-2,
                              inner_steps=1, support_size=3, query_size=3, logging_steps=1)
    assert [h["step"] for h in history] == [1, 2] and all(h["loss"] > 0 for h in history)
    assert list(model.peft_config) == ["default"]  # no task adapter left in the model
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n


def test_meta_lora_run_saves_a_stock_lora(toy, tmp_path):
    metrics = run_train(toy_spec(toy, tmp_path / "run", method="meta-lora", max_steps=2, meta_lora_support_size=2,
                                 meta_lora_query_size=2, report=True, eval_base=False))
    assert metrics["stages"]["tasks"] == ["animal", "color"] and len(metrics["log_history"]) == 2
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy / "model"), adapter)
    assert isinstance(model.peft_config["default"], peft.LoraConfig)


# ---------------------------------------------------------------------------------------------------------------------
# configuration


def test_method_fields_are_validated():
    for key, value, message in [("lope_char_noise", 0, "lope_char_noise=0 is invalid"),
                                ("lope_poison_steps", 0, "lope_poison_steps=0 is invalid"),
                                ("thanora_ortho_coef", -1, "thanora_ortho_coef=-1 is invalid"),
                                ("meta_lora_inner_steps", 0, "meta_lora_inner_steps=0 is invalid"),
                                ("meta_lora_inner_lr", -0.1, "meta_lora_inner_lr=-0.1 is invalid")]:
        with pytest.raises(ValueError, match=message):
            build_spec({key: value})
    with pytest.raises(ValueError, match="resume=True is invalid with method='lope'"):
        build_spec({"method": "lope", "resume": True})
    spec = build_spec({"method": "meta-lora", "meta_lora_inner_lr": "5e-4"})
    assert spec.train.meta_lora_inner_lr == 5e-4
    # every staged method has a runner, and only those
    from hydralora.recipes.config import METHODS, STAGED_METHODS
    from hydralora.recipes.methods import staged_training

    assert {m for m in METHODS if staged_training(m) is not None} == set(STAGED_METHODS)


# ---------------------------------------------------------------------------------------------------------------------
# the study's part (studies/seed_methods.py)

STUDIES = Path(__file__).resolve().parents[1] / "studies"


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_study_data_builders_keep_the_test_split_clean(toy, tmp_path):
    sys.path.insert(0, str(STUDIES))
    from seed_methods import build_noisy, build_subset, seed_method_parts

    src = toy / "mix.jsonl"
    rows = _rows(src)
    train = [r for r in rows if r["split"] == "train"]
    for kind in ("char", "label"):
        noisy = _rows(build_noisy(src, tmp_path / f"{kind}.jsonl", kind, fraction=0.5))
        assert [r for r in noisy if r["split"] == "test"] == [r for r in rows if r["split"] == "test"]
        changed = [a for a, b in zip([r for r in noisy if r["split"] == "train"], train) if a != b]
        assert 0 < len(changed) <= len(train) // 2
    few = _rows(build_subset(src, tmp_path / "few.jsonl", 5))
    counts = {t: sum(1 for r in few if r["split"] == "train" and r["task"] == t) for t in ("color", "animal")}
    assert counts == {"color": 5, "animal": 5} and sum(r["split"] == "test" for r in few) == sum(r["split"] == "test" for r in rows)
    build_subset(src, tmp_path / "few.jsonl", 5)  # the same contents again: kept
    with pytest.raises(FileExistsError, match="other contents"):
        build_subset(src, tmp_path / "few.jsonl", 4)
    parts = seed_method_parts(src, tmp_path / "derived")["seed-methods"]
    assert {ov["method"] for ov in parts.values()} >= {"lope", "thanora", "meta-lora", "lora", "hydralora"}
    assert all(os.path.isfile(ov["data"]) for ov in parts.values())


def test_seed_methods_part_runs_in_the_study_at_toy_size(toy, tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, str(STUDIES / "run_study.py"), "--out", str(out), "--part", "seed-methods", "--seeds", "0",
           "--workers", "1", "--only", "thanora/thanora-r16"]
    for s in (f"model={toy / 'model'}", f"data={toy / 'mix.jsonl'}", "max_steps=2", "schedule=cpu", "device=cpu",
              "max_seq_length=32", "max_new_tokens=2", "eval_max_per_task=3", "auto_n_k_max=3", "report=false"):
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in (out / "seed-methods-data").iterdir()) == [
        "few-16.jsonl", "few-32.jsonl", "few-64.jsonl", "noisy-char.jsonl", "noisy-label.jsonl"]
    run0 = out / "seed-methods" / "thanora" / "thanora-r16" / "seed0"
    run1 = run0.parent / "seed1"  # a run kept without its adapter (as results folders keep them) cannot be merged
    run1.mkdir()
    for name in ("metrics.json", "config.json"):
        (run1 / name).write_text((run0 / name).read_text())
    merged = subprocess.run([sys.executable, str(STUDIES / "seed_methods.py"), "merged-eval", "--study", str(out),
                             "--device", "cpu"], capture_output=True, text=True, env=env)
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert "seed1: no adapter folder, skipped" in merged.stdout and not (run1 / "eval_merged.json").exists()
    rec = json.loads((run0 / "eval_merged.json").read_text())
    assert rec["merged_mean"] == pytest.approx(rec["unmerged_mean"])  # a merged LoRA scores as the unmerged one
    assert rec["merged"]["per_task"] == rec["unmerged_fp32"]["per_task"]  # task by task, in the same precision
    table = subprocess.run([sys.executable, str(STUDIES / "seed_methods.py"), "report", "--study", str(out)],
                           capture_output=True, text=True, env=env)
    assert table.returncode == 0, table.stderr[-2000:]
    row = next(line for line in table.stdout.splitlines() if line.startswith("| thanora-r16 |"))
    acc = rec["unmerged_mean"]
    # two seeds of the same score: mean, sd 0, (2); the merged score from the one run that has it
    assert f"| {acc:.3f} ± 0.000 (2) | {rec['merged_mean']:.3f} (1) | 0.000 (1) |" in row
