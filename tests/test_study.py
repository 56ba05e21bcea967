"""The study's code at toy size: two configs, one seed, then the tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

STUDIES = Path(__file__).resolve().parents[1] / "studies"


def test_study_runner_and_report_at_toy_size(toy, tmp_path):
    out = tmp_path / "study"
    sets = [f"model={toy / 'model'}", f"data={toy / 'mix.jsonl'}", "max_steps=2", "schedule=cpu", "device=cpu",
            "max_seq_length=32", "max_new_tokens=2", "eval_max_per_task=3", "auto_n_k_max=3", "report=false",
            "target_modules=all-linear"]
    cmd = [sys.executable, str(STUDIES / "run_study.py"), "--out", str(out), "--part", "main", "--seeds", "0",
           "--workers", "2", "--only", "lora-r8", "hydralora-auto"]
    for s in sets:
        cmd += ["--set", s]
    unfinished = out / "main" / "lora-r8" / "seed0"  # an earlier try that died (no metrics.json)
    unfinished.mkdir(parents=True)
    (unfinished / "train.log").write_text("CUDA out of memory")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "main" / "lora-r8" / "seed0.failed-1" / "train.log").read_text() == "CUDA out of memory"
    runs = json.loads((out / "main_runs.json").read_text())["runs"]
    assert len(runs) == 2 and all(r["rc"] == 0 for r in runs)
    assert (out / "main" / "hydralora-auto" / "seed0" / "eval_sequence.json").is_file()
    # a second call resumes: nothing left to run
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0 and all(r.get("skipped") for r in json.loads((out / "main_runs.json").read_text())["runs"])
    rep = subprocess.run([sys.executable, str(STUDIES / "report_study.py"), "--study", str(out), "--out", str(tmp_path / "docs"),
                          "--data", str(toy / "mix.jsonl")], capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr[-2000:]
    summary = json.loads((tmp_path / "docs" / "summary.json").read_text())
    assert set(summary["summary"]) == {"lora-r8", "hydralora-auto"} and summary["base"] is not None
    assert (tmp_path / "docs" / "means.png").is_file()
    (routed,) = summary["routing"]["hydralora-auto"]  # one seed; the router's use per layer group
    for group in routed["groups"].values():
        assert group["max_dev"] >= group["spread"] >= 0
        assert group["cluster_agreement"] is None  # two tasks are one pair: no correlation to compute
    assert "hydralora-auto" in (tmp_path / "docs" / "tables.md").read_text()


def test_observation2_at_toy_size(toy, tmp_path):
    sys.path.insert(0, str(STUDIES))
    from observation2 import run_observation2

    summary = run_observation2(tmp_path / "obs2", workers=2, iid_task="color", extra={
        "model": str(toy / "model"), "data": str(toy / "mix.jsonl"), "max_steps": 4, "learning_rate": 0.05, "schedule": "cpu", "device": "cpu",
        "max_seq_length": 32, "max_new_tokens": 2, "eval_max_per_task": 2})
    assert set(summary["runs"]) == {"animal", "color", "color-iid0", "color-iid1"}
    for key in ("A", "dA", "B"):
        assert -1.0 <= summary["mean_cross_task_cos"][key] <= 1.0
    assert summary["relative_A_change"] > 0
    assert (tmp_path / "obs2" / "obs2_similarity.png").is_file() and (tmp_path / "obs2" / "obs2_pca.png").is_file()


def test_study_mixture_has_ten_plus_tasks_with_held_out_examples():
    """The study's data: at least 10 BBH-source tasks, several hundred training examples and 60 held-out
    test examples each, mixed kinds, and no test prompt also in training."""
    from collections import Counter

    from hydralora.data import load_examples

    sys.path.insert(0, str(STUDIES))
    from run_study import COMMON

    examples = load_examples(COMMON["data"]).examples
    train = Counter(e.task for e in examples if e.split == "train")
    test = Counter(e.task for e in examples if e.split == "test")
    assert len(test) >= 10 and set(train) == set(test)
    assert min(test.values()) == 60 and min(train.values()) >= 190
    assert any(e.choices for e in examples) and any(not e.choices for e in examples)
    train_prompts = {(e.task, e.prompt) for e in examples if e.split == "train"}
    assert not any((e.task, e.prompt) in train_prompts for e in examples if e.split == "test")


def test_router_cluster_agreement_ignores_how_experts_are_numbered():
    sys.path.insert(0, str(STUDIES))
    import numpy as np
    from report_study import agreement

    rng = np.random.default_rng(0)
    hist = rng.dirichlet(np.ones(4) * 0.3, size=6)  # 6 tasks over 4 clusters
    routed = hist[:, [2, 0, 3, 1]] - 0.25  # the router found the same grouping under other expert numbers
    assert agreement(routed, hist) > 0.5
    unrelated = rng.dirichlet(np.ones(4) * 0.3, size=6) - 0.25
    assert agreement(unrelated, hist) < agreement(routed, hist)
    assert agreement(routed[:2], hist[:2]) is None


def test_expert_similarity_measures_the_learned_part(tmp_path):
    """Copies of one learned update score 1 whatever their (R-LoRA) init; opposite updates score -1."""
    sys.path.insert(0, str(STUDIES))
    import numpy as np
    from safetensors.numpy import save_file

    from expert_symmetry import expert_similarity

    rng = np.random.default_rng(0)
    init = rng.normal(size=(3, 6, 2)).astype(np.float32)  # (N, d, r): three different random experts
    step = rng.normal(size=(1, 6, 2)).astype(np.float32)
    save_file({"m.layers.0.q.hydralora_B": init + step, "m.layers.0.q.hydralora_init.default_B": init,
               "m.layers.0.q.hydralora_A": rng.normal(size=(2, 4)).astype(np.float32)}, str(tmp_path / "a.safetensors"))
    same = expert_similarity(tmp_path / "a.safetensors")
    assert same["layers"] == 1 and abs(same["expert_cos"] - 1.0) < 1e-6 and same["expert_cos_raw"] < 0.99
    save_file({"m.q.hydralora_B": np.concatenate([step, -step])}, str(tmp_path / "b.safetensors"))  # zero init
    assert abs(expert_similarity(tmp_path / "b.safetensors")["expert_cos"] + 1.0) < 1e-6


def test_expert_symmetry_runs_at_toy_size(toy, tmp_path):
    sets = [f"model={toy / 'model'}", f"data={toy / 'mix.jsonl'}", "max_steps=2", "schedule=cpu", "device=cpu",
            "max_seq_length=32", "max_new_tokens=2", "eval_max_per_task=2", "auto_n_k_max=3"]
    cmd = [sys.executable, str(STUDIES / "expert_symmetry.py"), "--out", str(tmp_path), "--only", "0", "2", "--workers", "2"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "symmetry-seed0.json").read_text())
    assert list(rows) == ["default (B=0, router x0.1)", "router_temperature=0.1"]
    for r in rows.values():
        assert -1.0 <= r["expert_cos"] <= 1.0 and r["layers"] > 0 and r["gate_max_dev"]


def test_worker_slots_spread_runs_over_gpus():
    sys.path.insert(0, str(STUDIES))
    from run_study import WorkerSlots

    slots = WorkerSlots(4, gpus=["2", "5"])
    with slots.env() as a, slots.env() as b, slots.env() as c:
        held = [a["CUDA_VISIBLE_DEVICES"], b["CUDA_VISIBLE_DEVICES"], c["CUDA_VISIBLE_DEVICES"]]
        assert held.count("2") == 2 and held.count("5") == 1  # round-robin over the listed devices
        assert all(int(e["OMP_NUM_THREADS"]) >= 1 for e in (a, b, c))
    with slots.env() as a, slots.env() as b:  # released slots come back first-in first-out: the GPUs stay balanced
        assert {a["CUDA_VISIBLE_DEVICES"], b["CUDA_VISIBLE_DEVICES"]} == {"2", "5"}
    one = WorkerSlots(2, gpus=["0"])  # one GPU: nothing pinned, the process' own view is kept
    with one.env() as e:
        assert e.get("CUDA_VISIBLE_DEVICES") == __import__("os").environ.get("CUDA_VISIBLE_DEVICES")


def test_paired_comparison_applies_the_spread_rule():
    sys.path.insert(0, str(STUDIES))
    from report_study import paired

    def cfg(*accs):
        return {"runs": [{"seed": s, "adapted": {"mean_accuracy": a}} for s, a in enumerate(accs)]}

    data = {"ref": cfg(0.40, 0.42, 0.41), "up": cfg(0.45, 0.47, 0.44), "mixed": cfg(0.45, 0.40, 0.43),
            "small": cfg(0.405, 0.425, 0.415), "one_seed": cfg(0.9)}
    out = paired(data, "ref")
    assert set(out) == {"up", "mixed", "small"}  # the reference itself and single-seed configs are left out
    assert out["up"]["real"] and out["up"]["above"] == 3 and abs(out["up"]["diff"] - 0.0433) < 1e-3
    assert not out["mixed"]["real"]  # seeds on both sides
    assert not out["small"]["real"]  # every seed above, but by less than the spread over seeds
    assert paired(data, "absent") == {}


def test_select_then_final_picks_on_validation_and_reuses_seed0(toy, tmp_path):
    out = tmp_path / "q"
    sets = [f"model={toy / 'model'}", f"data={toy / 'mix.jsonl'}", "max_steps=2", "schedule=cpu", "device=cpu",
            "max_seq_length=32", "max_new_tokens=2", "eval_max_per_task=3", "report=false", "validation_per_task=2",
            "target_modules=all-linear"]
    only = ["lora-r8-lr1e-3", "lora-r18-lr1e-3", "hydralora-n3-lr1e-3", "hydralora-best", "lora-matched", "lora-r8"]
    cmd = [sys.executable, str(STUDIES / "run_study.py"), "--out", str(out), "--part", "select", "final",
           "--seeds", "0", "1", "--workers", "2", "--only", *only]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    chosen = json.loads((out / "selection.json").read_text())
    assert chosen["hydralora-best"]["from"] == "hydralora-n3-lr1e-3"
    assert chosen["lora-matched"]["from"] == "lora-r18-lr1e-3" and chosen["lora-r8"]["from"] == "lora-r8-lr1e-3"
    for name in ("hydralora-best", "lora-matched", "lora-r8"):
        seed0 = json.loads((out / "final" / name / "seed0" / "metrics.json").read_text())
        picked = json.loads((out / "select" / chosen[name]["from"] / "seed0" / "metrics.json").read_text())
        assert seed0["validation"] == picked["validation"] and seed0["seed"] == 0
        assert json.loads((out / "final" / name / "seed1" / "metrics.json").read_text())["seed"] == 1
    assert not (out / "select" / "lora-r8-lr1e-3" / "seed1").exists()  # select runs one seed


def test_a_run_that_ran_out_of_gpu_memory_is_queued_again(tmp_path, monkeypatch):
    sys.path.insert(0, str(STUDIES))
    import run_study

    calls = []

    def fake_run_one(out, part, name, ov, seed, log, extra=None, slots=None):
        calls.append((part, name, seed))
        oom = calls.count((part, name, seed)) == 1 and name == "lora-r8"
        return {"run": name, "rc": 1 if oom else 0, **({"oom": True} if oom else {})}

    monkeypatch.setattr(run_study, "run_one", fake_run_one)
    logs = []
    sched = run_study.Scheduler(tmp_path, ["main"], [0], ["lora-r8", "lora-r16"], {}, run_study.WorkerSlots(1, []), logs.append)
    results = sched.run(2)
    assert calls.count(("main", "lora-r8", 0)) == 2 and all(r["rc"] == 0 for _, r in results) and len(results) == 2
    assert any("out of memory" in m and "queued again" in m for m in logs)


def test_matched_twin_ranks_hold_at_least_hydralora_parameters():
    sys.path.insert(0, str(STUDIES))
    import quality

    assert quality.LORA_PARAMS_PER_RANK * quality.MATCHED_RANK >= quality.HYDRA_R8_N3_PARAMS
    assert quality.LORA_PARAMS_PER_RANK * (quality.MATCHED_RANK - 1) < quality.HYDRA_R8_N3_PARAMS
    auto_n10 = 15_137_280  # HydraLoRA r=8, N=10 on SmolLM2 all-linear
    assert quality.LORA_PARAMS_PER_RANK * (quality.AUTO_TWIN_RANK - 1) < auto_n10 <= quality.LORA_PARAMS_PER_RANK * quality.AUTO_TWIN_RANK
    bundled_n8 = 12_349_440  # the default recipe: HydraLoRA r=8, N=8 (auto-N on the bundled mixture)
    rank = quality.RECIPE_TWIN_RANK
    assert quality.LORA_PARAMS_PER_RANK * (rank - 1) < bundled_n8 <= quality.LORA_PARAMS_PER_RANK * rank
    for config in quality.recipe_twin_part().values():  # the default's schedule, LoRA's rank and alpha
        assert config["r"] == rank and config["method"] == "lora" and config["max_steps"] == 200 and config["bf16"]
    thanora = quality.recipe_thanora_part()  # ThanoRA and LoRA of one rank differ only in the method
    for name, config in thanora.items():
        twin = thanora[name.replace("recipe-thanora-", "recipe-lora-")]
        assert {k: v for k, v in config.items() if k != "method"} == {k: v for k, v in twin.items() if k != "method"}
        assert config["max_steps"] == 200 and config["bf16"] and config["validation_per_task"] > 0


def test_shipped_presets_are_the_study_named_configurations():
    sys.path.insert(0, str(STUDIES))
    import quality
    from hydralora.recipes.config import build_spec

    root = STUDIES.parent / "configs"
    for preset, named in (("hydralora-best.yaml", quality.HYDRALORA_BEST), ("lora-matched.yaml", quality.LORA_MATCHED_BEST)):
        spec = build_spec(config_file=str(root / preset)).to_dict()
        for key, value in named.items():
            assert spec[key] == value, (preset, key)
        assert spec["validation_per_task"] == quality.VALIDATION_PER_TASK


def test_the_default_recipe_is_the_chosen_cpu_candidate():
    """`hydralora train` with no arguments, on a CPU with native bf16, runs the recipe candidate it was chosen as."""
    sys.path.insert(0, str(STUDIES))
    from quality import RECIPE_CANDIDATES, RECIPE_DEFAULT, RECIPE_SCHEDULE

    from hydralora.recipes.config import apply_schedule, build_spec

    chosen = {**RECIPE_SCHEDULE, **RECIPE_CANDIDATES[RECIPE_DEFAULT]}
    spec = build_spec({})
    apply_schedule(spec.train, on_gpu=False, bf16=True)
    default = {**vars(spec.train), **spec.adapter}
    skip = {"schedule", "bf16", "eval_batch_size", "validation_per_task", "gradient_accumulation_steps"}
    for key, value in chosen.items():
        if key not in skip:
            assert default[key] == value, (key, default[key], value)
    assert spec.train.bf16 == "auto" and chosen["bf16"] is True
