"""The fair comparison of HydraLoRA against LoRA: configurations, twins at matched parameters, and the rule
that picks `hydralora-best` and its twin on validation data (never on the test split).

Every run holds out `validation_per_task` training examples per task as a validation set (the same carve for every
run of a seed), trains on the rest and scores both the validation set and the test split. Part `select` runs each
candidate once (seed 0); `select_configs` then takes, on mean validation accuracy:
  hydralora-best -- the best HydraLoRA candidate (any mechanism, any learning rate);
  lora-matched   -- the best LoRA twin with at least hydralora-best's trainable parameters and its LoRA+ setting;
  lora-r8        -- the best LoRA r=8 (its own learning rate).
Part `final` runs those three with seeds 0, 1, 2 (seed 0 is the select run itself) and reports test accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

from hydralora.recipes.config import CPU_FP32_MAX_STEPS, SCHEDULE_DEFAULTS

# SmolLM2-135M, all linear layers of the decoder: trainable parameters per unit of LoRA rank (30 layers x
# (q 576+576, k 576+192, v 576+192, o 576+576, gate 576+1536, up 576+1536, down 1536+576)) and HydraLoRA r=8, N=3's
# count (A 8 x k, B_i d x 8, router 3 x k per layer). `python studies/run_study.py --list` prints them all,
# counted on the model.
LORA_PARAMS_PER_RANK = 305_280
HYDRA_R8_N3_PARAMS = 5_379_840
MATCHED_RANK = 18  # the smallest LoRA rank with at least HydraLoRA r=8, N=3's parameters (5.49 M >= 5.38 M)
AUTO_TWIN_RANK = 50  # the same for HydraLoRA r=8 with N=10 experts (auto-N on the study mixture): 15.26 M >= 15.14 M

LEARNING_RATES = (1e-3, 3e-3, 1e-2)
MECHANISM_LR = 3e-3  # the sweep's middle value: mechanisms are compared with each other at one learning rate
VALIDATION_PER_TASK = 20

HYDRA = {"method": "hydralora", "r": 8, "lora_alpha": 16, "num_experts": 3}
LORA_R8 = {"method": "lora", "r": 8, "lora_alpha": 16}
LORA_MATCHED = {"method": "lora", "r": MATCHED_RANK, "lora_alpha": 2 * MATCHED_RANK}
# What breaks the experts' symmetry, each on HydraLoRA r=8, N=3.
MECHANISMS = {
    "svd-init": {"init_b": "svd", "init_a": "svd"},  # experts in disjoint singular subspaces of W0
    "route-warm": {"route_target_coef": 1.0, "route_target_ratio": 0.3},  # expert i starts on K-means cluster i
    "ortho": {"expert_ortho_coef": 0.1},  # B_i pushed apart
    "temp0.1": {"router_temperature": 0.1},  # sharper router
    "top2": {"top_k": 2},  # sparse router
    "route-warm-svd-temp": {"route_target_coef": 1.0, "route_target_ratio": 0.3, "init_b": "svd", "init_a": "svd",
                            "router_temperature": 0.1},
}


# What `select_configs` chose from the study's select runs (results/quality/2026-12-04/selection.json), fixed here so
# the comparison reruns by name (`--part best`) and ships as presets (configs/hydralora-best.yaml,
# configs/lora-matched.yaml).
HYDRALORA_BEST = {**HYDRA, **MECHANISMS["route-warm-svd-temp"], "learning_rate": 3e-3}
LORA_MATCHED_BEST = {**LORA_MATCHED, "learning_rate": 3e-3}
LORA_R8_BEST = {**LORA_R8, "learning_rate": 3e-3}


# The further attempt the evidence points to. Every token's update lies in the shared A's r dimensions: at r=8, N=3
# the experts cost LoRA r=18's parameters but the update keeps rank 8, and the specialised experts (entropy 0.09,
# cosine 0.30) gained nothing over the near-copies. r=16, N=2 doubles A's rank at about the same cost as LoRA r=26
# (7.67 M against 7.94 M), with hydralora-best's mechanisms and learning rate (3e-3, the select sweep's best for
# every method).
FURTHER_TWIN_RANK = 26
HYDRA_R16_N2 = {**HYDRA, "r": 16, "lora_alpha": 32, "num_experts": 2}
# The same step again: r=16, N=2 matched its twin (0.552 +- 0.033 against 0.549 +- 0.012), so r=32, N=2 (15.05 M)
# tests whether the experts pay once the twin's extra rank buys less (LoRA r=50, 15.26 M, the auto-N twin's rank).
HYDRA_R32_N2 = {**HYDRA, "r": 32, "lora_alpha": 64, "num_experts": 2}


def further_part() -> dict[str, dict]:
    """HydraLoRA with a larger shared A at N=2 (r=16, r=32) and hydralora-best's mechanisms, each against its LoRA
    twin, three seeds."""
    lr = lr_name(3e-3)
    part = {}
    for hydra, twin in ((HYDRA_R16_N2, FURTHER_TWIN_RANK), (HYDRA_R32_N2, AUTO_TWIN_RANK)):
        part[f"hydralora-r{hydra['r']}-n2-route-warm-svd-temp-{lr}"] = {**HYDRALORA_BEST, **hydra}
        part[f"lora-r{twin}-{lr}"] = {"method": "lora", "r": twin, "lora_alpha": 2 * twin, "learning_rate": 3e-3}
    return part


def best_part() -> dict[str, dict]:
    """The three named configurations of the final comparison, as chosen on validation."""
    return {"hydralora-best": HYDRALORA_BEST, "lora-matched": LORA_MATCHED_BEST, "lora-r8": LORA_R8_BEST}


def lr_name(lr: float) -> str:
    return f"lr{lr:.0e}".replace("e-0", "e-")


def select_part() -> dict[str, dict]:
    """The candidates, one seed each: both LoRAs and HydraLoRA over the learning rates, the mechanisms at one,
    and LoRA+ (B at 16x) on HydraLoRA and its twin."""
    part: dict[str, dict] = {}
    for lr in LEARNING_RATES:
        part[f"lora-r8-{lr_name(lr)}"] = {**LORA_R8, "learning_rate": lr}
        part[f"lora-r{MATCHED_RANK}-{lr_name(lr)}"] = {**LORA_MATCHED, "learning_rate": lr}
        part[f"hydralora-n3-{lr_name(lr)}"] = {**HYDRA, "learning_rate": lr}
    for name, over in MECHANISMS.items():
        part[f"hydralora-n3-{name}-{lr_name(MECHANISM_LR)}"] = {**HYDRA, **over, "learning_rate": MECHANISM_LR}
    part[f"hydralora-n3-loraplus16-{lr_name(1e-3)}"] = {**HYDRA, "loraplus_lr_ratio": 16, "learning_rate": 1e-3}
    part[f"lora-r{MATCHED_RANK}-loraplus16-{lr_name(1e-3)}"] = {**LORA_MATCHED, "loraplus_lr_ratio": 16, "learning_rate": 1e-3}
    return part


def mechanism_part() -> dict[str, dict]:
    """Every mechanism again (seeds 1 and 2; seed 0 ran in `select`)."""
    return {k: v for k, v in select_part().items() if any(f"-{m}-" in k for m in MECHANISMS)}


def auto_twin_part() -> dict[str, dict]:
    """The auto-N HydraLoRA (N=10) of the earlier study against its own LoRA twin, both at the earlier 1e-3."""
    return {f"hydralora-auto-{lr_name(1e-3)}": {**HYDRA, "num_experts": "auto", "learning_rate": 1e-3},
            f"lora-r{AUTO_TWIN_RANK}-{lr_name(1e-3)}": {"method": "lora", "r": AUTO_TWIN_RANK,
                                                          "lora_alpha": 2 * AUTO_TWIN_RANK, "learning_rate": 1e-3}}


# The default recipe's short CPU schedule as it runs in fp32 (CPU_FP32_MAX_STEPS = 110 steps of 8, the whole test
# split, adapter dropout 0.05 as the candidates first ran), run where it is fast, to choose the recipe's settings on
# a validation set carved from the bundled training split. Every candidate keeps the step count except: 200 steps,
# to see what a longer budget would buy; 140 length-grouped steps, which take the 2-core CPU less time than 110
# random ones (fewer padded tokens); and bf16 autocast without adapter dropout at 110-240 steps (on a CPU with
# native bf16 a step takes about half the time). The 200-step bf16 candidate is today's default on such a CPU; the
# fp32 candidate without dropout is what the default runs on a CPU without native bf16.
RECIPE_SCHEDULE = {"data": "bundled", "schedule": "cpu", **SCHEDULE_DEFAULTS["cpu"], "max_steps": CPU_FP32_MAX_STEPS,
                   "lora_dropout": 0.05, "gradient_accumulation_steps": 1,
                   "eval_batch_size": 32, "bf16": False, "validation_per_task": 16, "num_experts": "auto",
                   "method": "hydralora", "r": 8, "lora_alpha": 16, "router_temperature": 0.1,
                   "group_by_length": False}
RECIPE_CANDIDATES = {
    "recipe-loraplus16-temp0.1-lr1e-3": {"learning_rate": 1e-3, "loraplus_lr_ratio": 16},
    "recipe-loraplus16-temp0.1-lr2e-3": {"learning_rate": 2e-3, "loraplus_lr_ratio": 16},
    "recipe-loraplus4-temp0.1-lr3e-3": {"learning_rate": 3e-3, "loraplus_lr_ratio": 4},
    "recipe-temp0.1-lr3e-3": {"learning_rate": 3e-3},
    "recipe-temp0.1-lr3e-3-nodrop": {"learning_rate": 3e-3, "lora_dropout": 0.0},  # today's default on an fp32 CPU
    "recipe-temp0.1-lr1e-2": {"learning_rate": 1e-2},
    "recipe-loraplus16-temp0.1-route-warm-lr2e-3": {"learning_rate": 2e-3, "loraplus_lr_ratio": 16,
                                                    "route_target_coef": 1.0, "route_target_ratio": 0.3},
    "recipe-loraplus16-temp0.1-lr2e-3-steps200": {"learning_rate": 2e-3, "loraplus_lr_ratio": 16, "max_steps": 200},
    "recipe-temp0.1-lr3e-3-grouped-steps140": {"learning_rate": 3e-3, "group_by_length": True, "max_steps": 140},
    **{f"recipe-temp0.1-lr3e-3-bf16-nodrop-steps{n}": {"learning_rate": 3e-3, "bf16": True, "lora_dropout": 0.0,
                                                       "max_steps": n} for n in (110, 160, 200, 240)},
    "recipe-temp0.1-lr1e-3-bf16-nodrop-steps200": {"learning_rate": 1e-3, "bf16": True, "lora_dropout": 0.0,
                                                   "max_steps": 200},
}
RECIPE_SEEDS = (0, 1, 2)
# The default recipe's LoRA twin on the CPU schedule: the smallest LoRA rank with at least the default's trainable
# parameters (auto-N finds N=8 on the bundled mixture: 12.35 M; LoRA r=41: 12.52 M), the same schedule (bf16, no
# dropout, 200 steps), at three learning rates; does the default's multi-B structure beat LoRA where users run it?
RECIPE_TWIN_RANK = 41
RECIPE_DEFAULT = "recipe-temp0.1-lr3e-3-bf16-nodrop-steps200"


def recipe_part() -> dict[str, dict]:
    """Candidate settings for the default recipe, at its CPU schedule (each run also scores the base model)."""
    return {name: {**RECIPE_SCHEDULE, **over} for name, over in RECIPE_CANDIDATES.items()}


def recipe_twin_part() -> dict[str, dict]:
    """LoRA r=RECIPE_TWIN_RANK at the default recipe's CPU schedule, lr 1e-3, 3e-3 and 1e-2."""
    schedule = {**recipe_part()[RECIPE_DEFAULT], "method": "lora", "r": RECIPE_TWIN_RANK,
                "lora_alpha": 2 * RECIPE_TWIN_RANK, "num_experts": 1}
    return {f"recipe-lora-r{RECIPE_TWIN_RANK}-{lr_name(lr)}": {**schedule, "learning_rate": lr} for lr in LEARNING_RATES}


def recipe_thanora_part() -> dict[str, dict]:
    """ThanoRA r=16 against LoRA r=16 (identical trainable parameters) at the default recipe's CPU schedule, lr
    1e-3, 3e-3 and 1e-2: the router-free sibling against plain LoRA where users run the recipe."""
    schedule = {**recipe_part()[RECIPE_DEFAULT], "r": 16, "lora_alpha": 32, "num_experts": 1}
    return {f"recipe-{method}-r16-{lr_name(lr)}": {**schedule, "method": method, "learning_rate": lr}
            for method in ("thanora", "lora") for lr in LEARNING_RATES}


def select_recipe(recipe_dir: Path) -> dict:
    """The recipe candidate with the best mean validation accuracy over RECIPE_SEEDS, among the candidates that
    finished every seed (a candidate with a failed seed is left out, not compared on fewer seeds):
    {"from": name, "config": overrides, "validation": mean, "seeds": [...], "incomplete": [names]}."""
    seeds = list(RECIPE_SEEDS)
    scores = {n: [validation_score(recipe_dir / n / f"seed{s}") for s in seeds] for n in RECIPE_CANDIDATES}
    complete = {n: sum(v) / len(v) for n, v in scores.items() if None not in v}
    if not complete:
        raise ValueError(f"no recipe candidate finished seeds {seeds} under {recipe_dir}")
    pick = max(complete, key=lambda n: (complete[n], n))
    return {"from": pick, "config": recipe_part()[pick], "validation": complete[pick], "seeds": seeds,
            "incomplete": sorted(set(scores) - set(complete))}


def validation_score(run_dir: Path) -> float | None:
    m = run_dir / "metrics.json"
    if not m.is_file():
        return None
    metrics = json.loads(m.read_text())
    return metrics.get("validation", {}).get("mean_accuracy")


def select_configs(select_dir: Path, candidates: dict[str, dict]) -> dict:
    """The three named configurations from the `select` runs' validation accuracy (see the module docstring):
    {name: {"from": candidate, "config": overrides, "validation": score}}."""
    scores = {n: validation_score(select_dir / n / "seed0") for n in candidates}
    scores = {n: s for n, s in scores.items() if s is not None}

    def best(pred):
        pool = [n for n in scores if pred(n, candidates[n])]
        if not pool:
            raise ValueError(f"no finished select run matches; finished: {sorted(scores)}")
        return max(pool, key=lambda n: (scores[n], n))

    hydra = best(lambda n, c: c["method"] == "hydralora")
    ratio = candidates[hydra].get("loraplus_lr_ratio")
    twin = best(lambda n, c: c["method"] == "lora" and c["r"] >= MATCHED_RANK and c.get("loraplus_lr_ratio") == ratio)
    r8 = best(lambda n, c: c["method"] == "lora" and c["r"] == 8 and c.get("loraplus_lr_ratio") is None)
    return {name: {"from": pick, "config": candidates[pick], "validation": scores[pick]}
            for name, pick in (("hydralora-best", hydra), ("lora-matched", twin), ("lora-r8", r8))}
