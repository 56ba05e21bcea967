"""The options that make HydraLoRA's experts differ: SVD-subspace init, the routing-target loss (cluster-guided
warm-start) and the expert-diversity penalty, with the diagnostics that say whether the experts specialised."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

import hydralora
from hydralora import HydraLoraConfig
from hydralora.recipes.train import RouteTargetSchedule, carve_validation
from hydralora.data.formats import Example

from conftest import batch, make_model


def build(extra=None, seed=0, targets=("q_proj", "v_proj")):
    cfg = HydraLoraConfig(r=4, lora_alpha=8, num_experts=3, target_modules=list(targets), task_type="CAUSAL_LM",
                          **(extra or {}))
    base = make_model("llama", seed)
    return base, get_peft_model(copy.deepcopy(base), cfg)


def test_svd_init_puts_experts_in_disjoint_singular_subspaces_and_starts_equal_to_base():
    base, model = build({"init_b": "svd", "init_a": "svd"})
    w_before = {n: p.detach().clone() for n, p in base.named_parameters()}
    inputs = batch("llama")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base(**inputs).logits, rtol=1e-5, atol=1e-6)
    for _, layer in hydralora.hydra_layers(model):
        B = layer.hydralora_B["default"].detach()  # (N, d, r)
        W = layer.get_base_layer().weight.detach()
        U, _, Vh = torch.linalg.svd(W, full_matrices=False)
        n, d, r = B.shape
        for i in range(n):
            # expert i spans exactly singular block i; blocks are orthogonal to each other
            proj = U[:, i * r:(i + 1) * r] @ (U[:, i * r:(i + 1) * r].T @ B[i])
            torch.testing.assert_close(proj, B[i], rtol=1e-4, atol=1e-5)
            for j in range(i + 1, n):
                assert (B[i].T @ B[j]).abs().max() < 1e-5
        A = layer.hydralora_A["default"].detach()
        torch.testing.assert_close((A @ Vh[:r].T).abs(), torch.eye(r) * (1 / 3) ** 0.5, rtol=1e-4, atol=1e-5)
        assert torch.equal(layer.get_base_layer().weight, W)
    # the base weights were never modified
    for n, p in model.get_base_model().named_parameters():
        key = n.replace(".base_layer", "")
        if key in w_before:
            assert torch.equal(p, w_before[key]), n


def test_svd_init_rejects_more_directions_than_the_layer_has():
    with pytest.raises(ValueError, match="init_b='svd' needs num_experts \\* r = 48"):
        cfg = HydraLoraConfig(r=16, num_experts=3, target_modules=["q_proj"], init_b="svd")
        get_peft_model(make_model("llama", 0), cfg)


@pytest.mark.parametrize("field,value", [("init_a", "gaussian"), ("init_b", "pissa"), ("route_target_coef", -1.0),
                                         ("expert_ortho_coef", float("nan")), ("route_target_coef", True)])
def test_new_options_are_validated(field, value):
    with pytest.raises(ValueError, match=f"HydraLoraConfig.{field}="):
        HydraLoraConfig(**{field: value})


def test_route_labels_pull_each_sequence_gate_towards_its_target_expert():
    _, model = build({"route_target_coef": 1.0})
    inputs = batch("llama")
    b = inputs["input_ids"].shape[0]
    labels = torch.arange(b) % 3
    model.train()
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if "router" in n], lr=0.05)

    first = None
    for step in range(30):
        opt.zero_grad()
        res = model(**inputs, labels=inputs["input_ids"], route_labels=labels)
        route = hydralora.get_route_loss(model)
        assert route is not None and route.requires_grad
        if first is None:
            first = float(route.detach())
            # the loss model returns = LM loss + coef * route loss
            plain = model(**inputs, labels=inputs["input_ids"]).loss
            torch.testing.assert_close(res.loss, plain + route, rtol=1e-5, atol=1e-5)
            assert hydralora.get_route_loss(model) is None  # no labels, no routing loss
            res = model(**inputs, labels=inputs["input_ids"], route_labels=labels)
        res.loss.backward()
        opt.step()
    assert float(hydralora.get_route_loss(model)) < 0.5 * first
    # after the warm-start, the sequence-mean gate favours each sequence's target expert
    hydralora.set_routing(model, "sequence")
    model.eval()
    hits = 0
    for _, layer in hydralora.hydra_layers(model):
        with torch.no_grad():
            model(**inputs)
        seq = layer._sequence_gate["default"]  # (B, N)
        hits += int((seq.argmax(-1) == labels).all())
    assert hits == len(hydralora.hydra_layers(model))


def test_route_target_weight_zero_turns_the_loss_off_and_schedule_decays_it():
    _, model = build({"route_target_coef": 2.0})
    inputs = batch("llama")
    labels = torch.zeros(inputs["input_ids"].shape[0], dtype=torch.long)
    model.train()
    plain = model(**inputs, labels=inputs["input_ids"]).loss
    hydralora.set_route_target_weight(model, 0.0)
    res = model(**inputs, labels=inputs["input_ids"], route_labels=labels)
    torch.testing.assert_close(res.loss, plain)
    sched = RouteTargetSchedule(model, 2.0, 0.5, 100)
    assert sched.weight(0) == 2.0 and sched.weight(25) == 1.0 and sched.weight(50) == 0.0 and sched.weight(90) == 0.0
    with pytest.raises(ValueError, match="weight=-1"):
        hydralora.set_route_target_weight(model, -1)


def test_ortho_penalty_is_one_for_copies_zero_for_orthogonal_and_separates_experts():
    _, model = build({"expert_ortho_coef": 1.0})
    _, layer = hydralora.hydra_layers(model)[0]
    B = layer.hydralora_B["default"]
    with torch.no_grad():
        B.copy_(torch.randn(1, *B.shape[1:]).expand_as(B))
    torch.testing.assert_close(layer.expert_ortho_penalty("default"), torch.tensor(1.0))
    with torch.no_grad():
        eye = torch.zeros_like(B)
        for i in range(B.shape[0]):
            eye[i, i, 0] = 1.0
        B.copy_(eye)
    torch.testing.assert_close(layer.expert_ortho_penalty("default"), torch.tensor(0.0))
    # in training the penalty is added to the loss and its gradient moves near-copies apart
    with torch.no_grad():
        for _, lay in hydralora.hydra_layers(model):
            b = lay.hydralora_B["default"]
            b.copy_(torch.randn(1, *b.shape[1:]).expand_as(b) + 0.01 * torch.randn_like(b))
    inputs = batch("llama")
    model.train()
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if "hydralora_B" in n], lr=0.05)
    start = None
    for _ in range(20):
        opt.zero_grad()
        res = model(**inputs, labels=inputs["input_ids"])
        start = float(hydralora.get_ortho_loss(model)) if start is None else start
        res.loss.backward()
        opt.step()
    assert float(hydralora.get_ortho_loss(model)) < 0.5 * start


def test_diagnostics_entropy_and_expert_similarity():
    _, model = build()
    inputs = batch("llama")
    for _, layer in hydralora.hydra_layers(model):
        with torch.no_grad():
            layer.hydralora_router["default"].zero_()  # uniform gate
            B = layer.hydralora_B["default"]
            B.copy_(torch.randn(1, *B.shape[1:]).expand_as(B))  # copies
    ent = hydralora.router_entropy(model, [inputs])
    assert ent == pytest.approx(1.0, abs=1e-5)
    sim = hydralora.expert_similarity(model)
    assert sim["expert_cos"] == pytest.approx(1.0, abs=1e-5) and sim["layers"] == 4
    for _, layer in hydralora.hydra_layers(model):
        with torch.no_grad():
            layer.hydralora_router["default"].normal_(std=50.0)  # near one-hot gates
            layer.hydralora_B["default"].normal_()
    assert hydralora.router_entropy(model, [inputs]) < 0.3
    assert abs(hydralora.expert_similarity(model)["expert_cos"]) < 0.5


def test_carve_validation_holds_out_per_task_and_never_the_last_example():
    rows = [Example(task=t, prompt=f"{t} {i}", target="x") for t, n in (("a", 10), ("b", 3), ("c", 1)) for i in range(n)]
    train, val = carve_validation(rows, 4, seed=0)
    by = lambda xs, t: [e for e in xs if e.task == t]
    assert len(by(val, "a")) == 4 and len(by(val, "b")) == 2 and len(by(val, "c")) == 0
    assert len(train) + len(val) == len(rows) and not {e.prompt for e in train} & {e.prompt for e in val}
    assert carve_validation(rows, 4, seed=0) == (train, val)
    assert carve_validation(rows, 0, seed=0) == (rows, [])


def test_cluster_labels_follow_the_corpus_structure():
    from hydralora.clustering import cluster_labels

    texts = [f"Question: is {w} a fruit? Answer yes or no." for w in ("apple", "pear", "plum", "fig")] * 5 + \
            [f"Sort the words: {w} zebra cat" for w in ("dog", "ant", "eel", "bee")] * 5
    labels = cluster_labels(texts, 2)
    assert len(set(labels[:20])) == 1 and len(set(labels[20:])) == 1 and labels[0] != labels[20]
    assert set(cluster_labels(texts, 1)) == {0}
    with pytest.raises(ValueError, match="k=0"):
        cluster_labels(texts, 0)
