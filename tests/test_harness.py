"""lm-evaluation-harness: the bundled tasks as local lm-eval tasks, and the harness agreeing with `evaluate`."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval")
import peft  # noqa: E402

import hydralora  # noqa: E402
from hydralora.cli import main as cli_main  # noqa: E402
from hydralora.data import bundled_mixture_path  # noqa: E402
from hydralora.data.formats import load_examples  # noqa: E402
from hydralora.eval.harness import (TASK_PREFIX, harness_tasks_dir, run_harness, write_bundled_tasks,  # noqa: E402
                                    write_tasks)
from hydralora.eval.scoring import evaluate, first_line  # noqa: E402
from hydralora.models import load_model_and_tokenizer  # noqa: E402

from test_recipe import toy_spec  # noqa: E402


def test_shipped_task_definitions_are_current_and_load_offline(tmp_path):
    """Every shipped YAML is what write_bundled_tasks writes, and lm-eval builds each task from the bundled JSONL."""
    from lm_eval.tasks import TaskManager, get_task_dict

    fresh = tmp_path / "tasks"
    names = write_bundled_tasks(fresh)
    shipped = sorted(p.name for p in harness_tasks_dir().iterdir() if p.suffix in (".yaml", ".py"))
    assert shipped == sorted(p.name for p in fresh.iterdir())
    for name in shipped:
        assert (harness_tasks_dir() / name).read_text() == (fresh / name).read_text(), name
    tasks = get_task_dict(["hydralora"], TaskManager(include_path=str(harness_tasks_dir()), include_defaults=False))
    flat = {}
    for value in tasks.values():
        flat.update(value if isinstance(value, dict) else {})
    test_rows = list(load_examples(bundled_mixture_path(), split="test"))
    assert {getattr(t, "config").task for t in flat.values()} == {TASK_PREFIX + n for n in names}
    for task in flat.values():
        name = task.config.task[len(TASK_PREFIX):]
        assert len(task.test_docs()) == sum(e.task == name for e in test_rows)


def test_harness_and_evaluate_agree_on_the_same_examples(toy, tmp_path):
    """Same prompts, same continuations: per-choice log-likelihoods equal to float rounding, the same picks, the same
    greedy answers, the same per-task accuracy."""
    model, tok = load_model_and_tokenizer(str(toy / "model"), dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    cfg = hydralora.HydraLoraConfig(r=4, num_experts=2, target_modules=["q_proj", "v_proj"], init_b="rlora",
                                    init_b_std=0.5)
    model = peft.get_peft_model(model, cfg).eval()
    examples = list(load_examples(toy / "mix.jsonl"))
    assert {e.is_multiple_choice for e in examples} == {True, False}
    native = evaluate(model, tok, examples, batch_size=5, max_new_tokens=3, return_predictions=True)
    names = write_tasks(examples, tmp_path / "tasks", max_new_tokens=3)
    harness = run_harness(model, tok, names, tmp_path / "tasks", batch_size=3, log_samples=True)
    assert harness["per_task"] == pytest.approx(native["per_task"])
    samples = {(task, s["doc_id"]): s for task, rows in harness["samples"].items() for s in rows}
    assert len(samples) == len(examples)
    seen: dict[str, int] = {}
    for ex, pred in zip(examples, native["predictions"]):
        index = seen[ex.task] = seen.get(ex.task, -1) + 1  # documents keep the input order within a task
        sample = samples[(ex.task, index)]
        assert sample["doc"]["prompt"] == ex.prompt
        if ex.is_multiple_choice:
            lls = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in sample["resps"]]
            torch.testing.assert_close(torch.tensor(lls), torch.tensor(pred["scores"]), rtol=1e-4, atol=1e-4)
        else:
            assert first_line(sample["resps"][0][0]) == pred["prediction"]


def test_cli_eval_harness(toy, tmp_path, capsys):
    from hydralora.recipes.train import run_train

    run = tmp_path / "run"
    run_train(toy_spec(toy, run, max_steps=2, eval_base=False, report=False))
    out = tmp_path / "eval.json"
    assert cli_main(["eval", "--adapter", str(run / "adapter"), "--device", "cpu", "--no-base", "--harness", "all",
                     "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["harness"]["per_task"] == pytest.approx(result["per_task"])
    assert cli_main(["eval", "--adapter", str(run / "adapter"), "--device", "cpu", "--harness", "nope"]) == 2
    assert "unknown task(s) ['nope']" in capsys.readouterr().err
