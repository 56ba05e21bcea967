"""Tests for hydralora.clustering (choosing N from the corpus) and `hydralora analyze`."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hydralora.clustering import (DEFAULT_METHOD, ClusteringError, METHODS,
                                  resolve_num_experts, select_k, suggest_num_experts)
from hydralora.clustering.cli import add_analyze_parser, row_text, run_analyze

DATA = Path(__file__).parent / "data" / "bbh_mix4.jsonl"
ROWS = [json.loads(line) for line in DATA.read_text().splitlines()]
TEXTS = [r["input"] for r in ROWS]
TASKS = [r["task"] for r in ROWS]


def ari(a, b):
    from sklearn.metrics import adjusted_rand_score

    return adjusted_rand_score(a, b)


@pytest.fixture(scope="module")
def default_result():
    return suggest_num_experts(TEXTS, k_range=range(2, 9), seed=0)


def parse(argv):
    parser = argparse.ArgumentParser(prog="hydralora")
    add_analyze_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["analyze", *map(str, argv)])


def test_fixture_is_four_real_tasks():
    assert len(ROWS) == 160 and len(set(TASKS)) == 4


def test_result_fields(default_result):
    r = default_result
    assert r.method == DEFAULT_METHOD and r.k_values == list(range(2, 9))
    assert r.k in r.k_values and r.num_texts == len(TEXTS) and r.seconds > 0
    assert set(r.scores) == {"sse", "silhouette", "stability", "prediction_strength"}
    assert all(0.0 <= v <= 1.0 for v in r.scores["prediction_strength"])
    assert all(len(v) == len(r.k_values) for v in r.scores.values())
    assert r.sse == r.scores["sse"]
    assert r.labels.shape == (len(TEXTS),) and len(np.unique(r.labels)) == r.k
    d = json.loads(json.dumps(r.to_dict(include_labels=True)))
    assert d["k"] == r.k and set(d["scores"]) == {str(k) for k in r.k_values}
    assert len(d["labels"]) == len(TEXTS)


def test_default_recovers_the_tasks(default_result):
    assert default_result.k == 4
    assert ari(TASKS, default_result.labels) > 0.9


def test_deterministic_for_a_seed(default_result):
    again = suggest_num_experts(TEXTS, k_range=range(2, 9), seed=0)
    assert again.k == default_result.k
    assert again.scores == default_result.scores
    np.testing.assert_array_equal(again.labels, default_result.labels)


def test_paper_method_selectable():
    r = suggest_num_experts(TEXTS, k_range=range(2, 9), method="tfidf-elbow", seed=0)
    r2 = suggest_num_experts(TEXTS, k_range=range(2, 9), method="tfidf-elbow", seed=0)
    assert r.method == "tfidf-elbow" and set(r.scores) == {"sse"}
    assert r.k in r.k_values and r.k == r2.k and r.sse == r2.sse
    assert all(a >= b for a, b in zip(r.sse, r.sse[1:]))  # SSE falls with K
    assert set(METHODS) >= {"tfidf-elbow", "lsa-stability", "lsa-consensus", "lsa-silhouette",
                            "lsa-elbow"}
    assert DEFAULT_METHOD in METHODS


def test_select_k_rules():
    ks = [2, 3, 4, 5]
    scores = {"stability": [1.0, 1.0, 0.7, 0.6], "silhouette": [0.1, 0.3, 0.2, 0.1],
              "sse": [100.0, 40.0, 35.0, 33.0]}
    assert select_k(ks, scores, "stability") == 3  # ties go to the larger K
    assert select_k(ks, scores, "silhouette") == 3
    assert select_k(ks, scores, "elbow") == 3
    # consensus: stability + prediction strength, ties to the larger K
    scores["prediction_strength"] = [0.2, 0.9, 0.9, 0.3]
    assert select_k(ks, scores, "consensus") == 3
    scores["prediction_strength"] = [0.2, 0.7, 1.0, 0.3]  # 1.0+0.7 ties 1.0+0.7
    assert select_k(ks, scores, "consensus") == 4
    # prediction strength: the largest K at or above the threshold, not the best one
    scores["prediction_strength"] = [0.95, 0.6, 0.75, 0.4]
    assert select_k(ks, scores, "pstrength") == 4
    scores["prediction_strength"] = [0.5, 0.6, 0.3, 0.2]  # none passes: the best one
    assert select_k(ks, scores, "pstrength") == 3
    with pytest.raises(ValueError, match="rule"):
        select_k(ks, scores, "gap")


def test_resolve_num_experts_is_json():
    k, info = resolve_num_experts(TEXTS, k_range=range(2, 7), seed=1)
    assert k == info["k"] and info["method"] == DEFAULT_METHOD
    assert set(info) >= {"k", "method", "scores", "seconds", "num_texts"}
    json.dumps(info)


@pytest.mark.parametrize("texts,kw,match", [
    ([], {}, "empty"),
    (["a b", 3, "c"], {}, r"texts\[1\]"),
    (["a b", "   ", "c"], {}, r"texts\[1\] is empty"),
    (["one", "two", "three", "four"], {"k_range": range(2, 11)}, "only 4 documents"),
    (TEXTS, {"method": "kmeans-magic"}, "allowed"),
    (TEXTS, {"k_range": [1, 2, 3]}, ">= 2"),
    (TEXTS, {"k_range": [2, 3], "method": "tfidf-elbow"}, "at least 3"),
])
def test_bad_input_function(texts, kw, match):
    with pytest.raises(ClusteringError, match=match):
        suggest_num_experts(texts, **kw)
    assert issubclass(ClusteringError, ValueError)


def test_row_text_formats():
    assert row_text({"task": "t", "input": "x?", "target": "y"}) == "x?"
    assert row_text({"instruction": "Do it", "input": "on this", "output": "ok"}) == "Do it\non this"
    assert row_text({"prompt": "p", "completion": "c"}) == "p"
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}]
    assert row_text({"messages": msgs}) == "hi"
    assert row_text({"q": "custom"}, field="q") == "custom"


def test_analyze_writes_outputs(tmp_path, capsys):
    out = tmp_path / "an"
    rc = run_analyze(parse([DATA, "--out", out, "--k-max", 8]))
    assert rc == 0
    a = json.loads((out / "analysis.json").read_text())
    assert a["k"] == 4 and a["method"] == DEFAULT_METHOD and a["num_texts"] == 160
    assert set(a["scores"]) == {str(k) for k in range(2, 9)} and a["seconds"] > 0
    assert a["labels_file"] == "labels.jsonl"
    assert a["task_agreement"]["adjusted_rand_index"] > 0.9
    assert set(a["task_agreement"]["contingency"]) == set(TASKS)
    labels = [json.loads(x) for x in (out / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == 160 and labels[0]["line"] == 1 and "cluster" in labels[0]
    assert (out / "elbow.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stdout = capsys.readouterr().out
    assert "chosen K = 4" in stdout and "adjusted Rand index" in stdout


def test_analyze_paper_method_and_csv(tmp_path):
    import pandas as pd

    csv = tmp_path / "mix.csv"
    pd.DataFrame({"text": TEXTS}).to_csv(csv, index=False)
    rc = run_analyze(parse([csv, "--field", "text", "--out", tmp_path / "o",
                            "--method", "tfidf-elbow", "--k-max", 6]))
    a = json.loads((tmp_path / "o" / "analysis.json").read_text())
    assert rc == 0 and a["method"] == "tfidf-elbow" and "task_agreement" not in a


def _bad(tmp_path, capsys, content, *extra, name="bad.jsonl"):
    p = tmp_path / name
    p.write_text(content)
    rc = run_analyze(parse([p, "--out", tmp_path / "o", *extra]))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err
    assert "Traceback" not in err and str(p) in err
    return err


def test_analyze_empty_file(tmp_path, capsys):
    assert "empty" in _bad(tmp_path, capsys, "")


def test_analyze_missing_field(tmp_path, capsys):
    content = "".join(json.dumps(r) + "\n" for r in ROWS[:30])
    err = _bad(tmp_path, capsys, content, "--field", "question")
    assert "'question'" in err and ":1" in err


def test_analyze_row_without_text(tmp_path, capsys):
    rows = ROWS[:20] + [{"task": "x", "target": "only a target"}] + ROWS[20:30]
    err = _bad(tmp_path, capsys, "".join(json.dumps(r) + "\n" for r in rows))
    assert ":21" in err and "no text field" in err


def test_analyze_empty_text(tmp_path, capsys):
    rows = ROWS[:5] + [{"task": "x", "input": "  "}] + ROWS[5:30]
    err = _bad(tmp_path, capsys, "".join(json.dumps(r) + "\n" for r in rows))
    assert ":6" in err and "'input'" in err


def test_analyze_skip_bad_rows(tmp_path):
    rows = ROWS[:40] + [{"task": "x", "target": "t"}] + ROWS[40:]
    p = tmp_path / "skip.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = run_analyze(parse([p, "--out", tmp_path / "o", "--k-max", 6, "--skip-bad-rows"]))
    a = json.loads((tmp_path / "o" / "analysis.json").read_text())
    assert rc == 0 and a["num_texts"] == 160 and a["skipped_rows"] == 1


def test_analyze_fewer_docs_than_k(tmp_path, capsys):
    err = _bad(tmp_path, capsys, "".join(json.dumps(r) + "\n" for r in ROWS[:6]))
    assert "6 rows" in err and "--k-max" in err


def test_clustering_package_does_not_import_torch():
    # Load the clustering modules without running hydralora/__init__ (which loads the PEFT
    # layer and torch), as a CPU-only data-prep job would, and check they stay torch-free.
    src = Path(__file__).resolve().parents[1] / "src" / "hydralora"
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('hydralora'); pkg.__path__ = [{str(src)!r}]\n"
        "sys.modules['hydralora'] = pkg\n"
        "import hydralora.clustering as c, hydralora.clustering.cli, hydralora.clustering.report\n"
        "texts = ['a b c %d' % i for i in range(20)] + ['x y z %d' % i for i in range(20)]\n"
        "c.suggest_num_experts(texts, k_range=range(2, 5))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("method", ["lsa-stability", "lsa-consensus"])
def test_lsa_methods_recover_the_tasks_and_share_the_sweep(method):
    r = suggest_num_experts(TEXTS, k_range=range(2, 9), method=method, seed=0)
    assert r.method == method and r.k == 4 and ari(TASKS, r.labels) > 0.9
    # the rules read the same sweep: select_k on the scores reproduces the choice
    assert select_k(r.k_values, r.scores, method.split("-", 1)[1]) == r.k


def test_feature_defaults_per_method_and_override():
    a = suggest_num_experts(TEXTS, k_range=range(2, 5), method="lsa-consensus", seed=0)
    b = suggest_num_experts(TEXTS, k_range=range(2, 5), method="lsa-consensus", seed=0,
                            n_components=20, min_df=0.05)
    c = suggest_num_experts(TEXTS, k_range=range(2, 5), method="lsa-consensus", seed=0,
                            n_components=50, min_df=0.02)
    assert a.scores == b.scores and a.scores != c.scores


def test_stability_scores_do_not_depend_on_prediction_strength():
    a = suggest_num_experts(TEXTS, k_range=range(2, 6), method="lsa-stability", seed=3,
                            ps_rounds=1)
    b = suggest_num_experts(TEXTS, k_range=range(2, 6), method="lsa-stability", seed=3,
                            ps_rounds=3)
    assert a.scores["stability"] == b.scores["stability"]


@pytest.mark.parametrize("method", ["lsa-consensus", "tfidf-elbow"])
def test_identical_documents_give_one_expert_with_a_note(method, tmp_path):
    # Every K ties on such data (SSE 0, stability 1); the sweep's tie rule would pick the largest K.
    texts = ["Q: Is the sky blue? A:"] * 30
    res = suggest_num_experts(texts, k_range=range(2, 11), method=method)
    assert res.k == 1
    assert res.notes and "identical" in res.notes[0]
    assert (res.labels == 0).all()
    k, info = resolve_num_experts(texts, k_range=range(2, 11))
    assert k == 1 and info["notes"]
    json.dumps(info)


def test_same_template_documents_give_one_expert():
    # Distinct strings, but the template features (numbers and rare words stripped) coincide.
    texts = [f"Compute {i} plus {i + 1}." for i in range(60)]  # each number is in < 5% of texts
    res = suggest_num_experts(texts, k_range=range(2, 6))
    assert res.k == 1 and "same features" in res.notes[0]


def test_analyze_identical_documents(tmp_path, capsys):
    data = tmp_path / "same.jsonl"
    data.write_text("".join(json.dumps({"task": "t", "input": "same prompt", "target": "x"}) + "\n" for _ in range(20)))
    assert run_analyze(parse([data, "--out", tmp_path / "an", "--k-max", 5])) == 0
    summary = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert summary["k"] == 1 and summary["notes"]
    assert (tmp_path / "an" / "elbow.png").stat().st_size > 0
