"""Data layer: file reading, formats, SFT tokenisation, BIG-bench mixtures, bundled data."""

from __future__ import annotations

import argparse
import io
import json
import tarfile

import pytest
import torch

from hydralora.data import (IGNORE_INDEX, DataError, Example, SFTCollator, SFTDataset,
                            bundled_mixture_path, encode_example, load_examples, normalize_row,
                            read_rows)
from hydralora.data import bigbench
from hydralora.data.cli import add_data_parser

from conftest import tiny_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


ROWS = [
    {"task": "count", "input": "How many?", "target": "three"},
    {"task": "sports", "input": "Is it plausible?", "choices": ["plausible", "implausible"],
     "answer": "implausible"},
]


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


# --------------------------------------------------------------------------- io


def test_read_jsonl_line_numbers_skip_blank(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert [line for line, _ in read_rows(p)] == [1, 3]


def test_read_bad_jsonl_names_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", ROWS, raw_lines=['{"task": "x", "input": '])
    with pytest.raises(DataError) as e:
        list(read_rows(p))
    assert "d.jsonl:3" in str(e.value) and "invalid JSON" in str(e.value)
    assert e.value.line == 3


def test_skip_bad_rows_counts(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", ROWS, raw_lines=["not json", "[1, 2]"])
    rows = read_rows(p, skip_bad_rows=True)
    assert len(list(rows)) == 2
    assert rows.skipped == 2 and "d.jsonl:3" in rows.errors[0] and "d.jsonl:4" in rows.errors[1]


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv"])
def test_non_utf8_bytes_name_file_line_and_byte(tmp_path, suffix):
    latin1 = "caf\u00e9".encode("latin-1")  # b"caf\xe9": valid Latin-1, not UTF-8
    p = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        p.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"task": "t", "input": "' + latin1 + b'", "target": "x"}\n')
    elif suffix == "json":
        p.write_bytes(b'[\n' + json.dumps(ROWS[0]).encode() + b',\n{"task": "t", "input": "' + latin1 + b'", "target": "x"}\n]')
    else:
        p.write_bytes(b"task,input,target\ncount,How many?,three\nt," + latin1 + b",x\n")
    with pytest.raises(DataError) as e:
        list(read_rows(p))
    line = {"jsonl": 2, "json": 3, "csv": 3}[suffix]
    assert f"d.{suffix}:{line}" in str(e.value) and "not UTF-8" in str(e.value) and "0xe9" in str(e.value)
    if suffix == "jsonl":  # one bad line can be skipped like any malformed row
        rows = read_rows(p, skip_bad_rows=True)
        assert len(list(rows)) == 1 and rows.skipped == 1


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        read_rows(tmp_path / "e.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        list(read_rows(tmp_path / "blank.jsonl"))
    with pytest.raises(DataError, match="not found"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type"):
        read_rows(tmp_path / "x.txt")


def test_read_json_csv_parquet_and_saved_dataset(tmp_path):
    import datasets
    import pandas as pd

    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    assert [r for _, r in read_rows(tmp_path / "d.json")] == ROWS

    df = pd.DataFrame([{**ROWS[0], "choices": "", "answer": ""},
                       {**ROWS[1], "choices": json.dumps(ROWS[1]["choices"]), "target": ""}])
    df.to_csv(tmp_path / "d.csv", index=False)
    csv_rows = list(read_rows(tmp_path / "d.csv"))
    assert [line for line, _ in csv_rows] == [2, 3]  # header is line 1
    assert [normalize_row(r) for _, r in csv_rows] == [normalize_row(r) for r in ROWS]

    pd.DataFrame([ROWS[0], {**ROWS[0], "task": "t2"}]).to_parquet(tmp_path / "d.parquet")
    assert [r["task"] for _, r in read_rows(tmp_path / "d.parquet")] == ["count", "t2"]

    ds = datasets.Dataset.from_list([ROWS[0]] * 3)
    ds.save_to_disk(str(tmp_path / "hf"))
    assert len(list(read_rows(tmp_path / "hf"))) == 3
    dd = datasets.DatasetDict(train=ds, test=datasets.Dataset.from_list([ROWS[0]]))
    dd.save_to_disk(str(tmp_path / "hfdict"))
    assert [r["split"] for _, r in read_rows(tmp_path / "hfdict")] == ["train"] * 3 + ["test"]
    assert len(list(read_rows(tmp_path / "hfdict", split="test"))) == 1
    with pytest.raises(DataError, match="split 'dev' not found"):
        list(read_rows(tmp_path / "hfdict", split="dev"))


# --------------------------------------------------------------------------- formats


def test_multitask_formats():
    gen = normalize_row(ROWS[0])
    assert (gen.task, gen.prompt, gen.target, gen.choices) == ("count", "How many?", "three", None)
    mc = normalize_row(ROWS[1])
    assert mc.choices == ["plausible", "implausible"] and mc.answer == mc.target == "implausible"
    by_index = normalize_row({**ROWS[1], "answer": 0})
    assert by_index.answer == "plausible"
    aliases = normalize_row({"input": "n?", "target": ["three", "3"]})
    assert aliases.target == "three" and aliases.aliases == ["three", "3"]
    assert aliases.task == "default"


def test_instruction_formats():
    a = normalize_row({"instruction": "Add.", "input": "1 and 2", "output": "3"})
    assert a.prompt == "Add.\n\n1 and 2" and a.target == "3" and a.task == "default"
    a2 = normalize_row({"instruction": "Say hi.", "input": "", "output": "hi", "task": "t"})
    assert a2.prompt == "Say hi." and a2.task == "t"
    dolly = normalize_row({"instruction": "Q", "context": "C", "response": "R"})
    assert (dolly.prompt, dolly.target) == ("Q\n\nC", "R")
    pc = normalize_row({"prompt": "2+2=", "completion": "4"})
    assert (pc.prompt, pc.target) == ("2+2=", "4")


def test_chat_format_uses_template():
    msgs = {"messages": [{"role": "system", "content": "be nice"},
                         {"role": "user", "content": "hello"},
                         {"role": "assistant", "content": "hi there"}]}
    templ = tiny_tokenizer(CHAT_TEMPLATE)
    ex = normalize_row(msgs, tokenizer=templ)
    assert ex.templated and ex.target == "hi there"
    assert ex.prompt == "<bos>system: be nice\n<bos>user: hello\nassistant:\n"
    plain = normalize_row(msgs)  # no tokenizer: plain transcript
    assert not plain.templated and plain.prompt.endswith("user: hello\nassistant:")


@pytest.mark.parametrize("row, field, text", [
    ({"input": "x", "choices": ["a", "b"], "answer": "c"}, "answer", "not one of the choices"),
    ({"input": "x", "choices": ["a"], "answer": "a"}, "choices", "at least 2"),
    ({"input": "x", "choices": ["a", "b"]}, "answer", "missing"),
    ({"input": "x"}, "target", "target"),
    ({"input": "", "target": "y"}, "input", "empty"),
    ({"instruction": "do", "input": "x"}, "output", "missing"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant turn"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages", "allowed"),
    ({"foo": 1}, None, "unrecognised row format"),
])
def test_format_errors_name_file_line_field(tmp_path, row, field, text):
    p = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], row])
    with pytest.raises(DataError) as e:
        load_examples(p)
    msg = str(e.value)
    assert "d.jsonl:2" in msg and text in msg
    if field:
        assert f"field {field!r}" in msg and e.value.field == field


def test_load_examples_skip_and_split(tmp_path):
    rows = [{**ROWS[0], "split": "train"}, {**ROWS[1], "split": "test"},
            {"input": "x", "choices": ["a", "b"], "answer": "z"}]
    p = write_jsonl(tmp_path / "d.jsonl", rows, raw_lines=["{oops"])
    loaded = load_examples(p, skip_bad_rows=True)
    assert len(loaded) == 2 and loaded.skipped == 2 and loaded.tasks == ["count", "sports"]
    assert [e.task for e in load_examples(p, skip_bad_rows=True, split="test")] == ["sports"]
    with pytest.raises(DataError, match="splits present"):
        load_examples(p, skip_bad_rows=True, split="validation")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"input": "x"}, {"foo": 1}])
    with pytest.raises(DataError, match="all 2 rows were bad"):
        load_examples(bad, skip_bad_rows=True)


# --------------------------------------------------------------------------- collate


def test_labels_mask_prompt_and_append_eos(tok):
    ex = Example("t", "Q: How many apples do I have?\nA:", "three")
    f = encode_example(ex, tok, max_length=128)
    n_prompt = len(tok(ex.prompt)["input_ids"])
    target = tok(" three", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert f["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert f["labels"][n_prompt:] == target == f["input_ids"][n_prompt:]
    assert tok.decode(f["input_ids"]).startswith(ex.prompt + " three")


def test_no_space_after_newline_prompt(tok):
    f = encode_example(Example("t", "Sorted:\n", "apple"), tok, max_length=64, add_eos=False)
    kept = [i for i, lab in zip(f["input_ids"], f["labels"]) if lab != IGNORE_INDEX]
    assert tok.decode(kept) == "apple"


def test_truncation_keeps_target_and_prompt_end(tok):
    ex = Example("t", "apple banana cherry " * 40 + "Sorted:", "apple banana cherry")
    f = encode_example(ex, tok, max_length=24)
    assert len(f["input_ids"]) == 24
    target = tok(" apple banana cherry", add_special_tokens=False)["input_ids"]
    labelled = [i for i, lab in zip(f["input_ids"], f["labels"]) if lab != IGNORE_INDEX]
    assert labelled == target + [tok.eos_token_id]
    assert tok.decode(f["input_ids"]).rstrip().endswith("Sorted: apple banana cherry<eos>")
    # Target longer than max_length: keep its beginning and one prompt token.
    long = encode_example(Example("t", "Q:", "apple " * 50), tok, max_length=10)
    assert len(long["input_ids"]) == 10 and long["labels"][0] == IGNORE_INDEX
    assert all(lab != IGNORE_INDEX for lab in long["labels"][1:])


def test_chat_template_flag(tok):
    templ = tiny_tokenizer(CHAT_TEMPLATE)
    ex = Example("t", "hello", "hi there")
    with_t = encode_example(ex, templ, use_chat_template=True)
    assert templ.decode(with_t["input_ids"]).startswith("<bos>user: hello\nassistant:\nhi there")
    without = encode_example(ex, templ, use_chat_template=False)
    assert templ.decode(without["input_ids"]).startswith("hello hi there")
    # No template on the tokenizer: the flag falls back to the plain format.
    assert encode_example(ex, tok, use_chat_template=True) == encode_example(ex, tok)


def test_collator_pads_right(tok):
    ds = SFTDataset([Example("t", "Q: one", "three"), Example("t", "Q: a much longer prompt "
                     "with words", "apple banana")], tok, max_length=64)
    batch = SFTCollator(tok)([ds[0], ds[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    n0 = len(ds[0]["input_ids"])
    assert (batch["input_ids"][0, n0:] == tok.pad_token_id).all()
    assert (batch["labels"][0, n0:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][0].sum() == n0 and batch["attention_mask"][1].all()
    padded = SFTCollator(tok, pad_to_multiple_of=8)([ds[0]])
    assert padded["input_ids"].shape[1] % 8 == 0 and padded["input_ids"].dtype == torch.long


# --------------------------------------------------------------------------- bigbench


def make_fake_bigbench(root):
    """A tiny benchmark_tasks folder: one MC task, one generative task, one with subtasks."""
    d = root / "benchmark_tasks"
    mc = {"name": "mc_task", "task_prefix": "Decide.", "append_choices_to_input": True,
          "examples": [{"input": f"item {i}", "target_scores": {"yes": int(i % 2 == 0),
                                                               "no": int(i % 2 == 1)}}
                       for i in range(30)]
          + [{"input": "tie", "target_scores": {"yes": 1, "no": 1}}]}
    gen = {"name": "gen_task", "example_input_prefix": "\nList: ", "example_output_prefix":
           "\nSorted: ", "examples": [{"input": f"w{i} a", "target": [f"a w{i}", "x"]}
                                      for i in range(20)] + [{"input": "w0 a", "target": "dup"}]}
    for name, spec in (("mc_task", mc), ("gen_task", gen)):
        (d / name).mkdir(parents=True)
        (d / name / "task.json").write_text(json.dumps(spec))
    (d / "parent").mkdir()
    (d / "parent" / "task.json").write_text(json.dumps({"name": "parent"}))
    for sub in ("three", "five"):
        (d / "parent" / sub).mkdir()
        (d / "parent" / sub / "task.json").write_text(json.dumps({
            "examples": [{"input": f"{sub} {i}", "target_scores": {"a": 1, "b": 0, "c": 0}}
                         for i in range(5)]}))
    (d / "programmatic").mkdir()
    return d


def test_load_task_formats(tmp_path):
    d = make_fake_bigbench(tmp_path)
    mc = bigbench.load_task("mc_task", d)
    assert len(mc) == 30  # the tied example is dropped
    r = mc[0]
    assert r["task"] == "mc_task" and sorted(r["choices"]) == ["no", "yes"] and r["answer"] == "yes"
    assert r["input"].startswith("Decide.\nQ: item 0\n  choice: ") and r["input"].endswith("\nA:")
    g = bigbench.load_task("gen_task", d)[0]
    assert g["input"] == "List: w0 a\nSorted:" and g["target"] == "a w0"
    assert g["aliases"] == ["a w0", "x"]
    assert normalize_row(g).aliases == ["a w0", "x"]
    assert len(bigbench.load_task("parent", d)) == 10
    sub = bigbench.load_task("parent:three", d)
    assert len(sub) == 5 and sub[0]["task"] == "parent:three" and sub[0]["subtask"] == "three"
    assert bigbench.load_task("parent/five", d)[0]["subtask"] == "five"
    with pytest.raises(DataError, match="did you mean"):
        bigbench.load_task("mc_tsk", d)
    with pytest.raises(DataError, match="no subtask 'seven'"):
        bigbench.load_task("parent:seven", d)
    with pytest.raises(DataError, match="programmatic"):
        bigbench.load_task("programmatic", d)
    assert "parent:three" in bigbench.list_tasks(d)


def test_build_mixture_deterministic_splits(tmp_path):
    d = make_fake_bigbench(tmp_path)
    kw = dict(tasks_dir=d, splits={"test": 5, "train": -1})
    a = bigbench.build_mixture(["mc_task", "gen_task"], per_task=15, seed=3, **kw)
    assert a == bigbench.build_mixture(["mc_task", "gen_task"], per_task=15, seed=3, **kw)
    assert a != bigbench.build_mixture(["mc_task", "gen_task"], per_task=15, seed=4, **kw)
    summary = bigbench.summarize(a)
    assert summary["mc_task"] == {"kind": "mc", "test": 5, "train": 10}
    assert summary["gen_task"]["kind"] == "gen"
    # gen_task's duplicate prompt "w0 a" is removed: 20 unique rows.
    assert len(bigbench.build_mixture(["gen_task"], tasks_dir=d)) == 20
    # A task's rows do not depend on the other tasks, and test rows stay put as per_task grows.
    alone = bigbench.build_mixture(["mc_task"], per_task=15, seed=3, **kw)
    assert alone == [r for r in a if r["task"] == "mc_task"]
    bigger = bigbench.build_mixture(["mc_task"], per_task=25, seed=3, **kw)
    test = lambda rows: [r["input"] for r in rows if r["split"] == "test"]  # noqa: E731
    assert test(bigger) == test(alone)
    frac = bigbench.build_mixture(["mc_task"], seed=0, tasks_dir=d, splits=(0.6, 0.2, 0.2))
    assert bigbench.summarize(frac)["mc_task"] == {"kind": "mc", "test": 6, "validation": 6,
                                                   "train": 18}
    with pytest.raises(ValueError, match="sum to 1"):
        bigbench.build_mixture(["mc_task"], tasks_dir=d, splits=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="only 30 are available"):
        bigbench.build_mixture(["mc_task"], tasks_dir=d, splits={"test": 40, "train": -1})
    assert bigbench.parse_splits("train=0.8,test=0.2") == {"train": 0.8, "test": 0.2}
    assert bigbench.parse_splits("test=50,train=-1") == {"test": 50, "train": -1}


def test_ensure_bigbench_extracts_only_task_json(tmp_path, monkeypatch):
    monkeypatch.delenv("HYDRALORA_BIGBENCH_DIR", raising=False)
    src = make_fake_bigbench(tmp_path / "src")
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for f in src.rglob("task.json"):
            tar.add(f, arcname=f"bigbench-1.0.0/bigbench/benchmark_tasks/"
                               f"{f.relative_to(src).as_posix()}")
        data = b"print('not a task file')"
        info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/mc_task/extra.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    cache = tmp_path / "cache"
    tasks_dir = bigbench.ensure_bigbench(cache_dir=cache, sdist=sdist)
    assert tasks_dir == cache / "benchmark_tasks"
    assert (tasks_dir / "parent" / "three" / "task.json").is_file()
    assert not (tasks_dir / "mc_task" / "extra.py").exists()
    sdist.unlink()  # second call: cached, the sdist is not needed
    assert bigbench.ensure_bigbench(cache_dir=cache) == tasks_dir
    monkeypatch.setenv("HYDRALORA_BIGBENCH_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="HYDRALORA_BIGBENCH_DIR"):
        bigbench.ensure_bigbench()
    with pytest.raises(DataError, match="does not exist"):
        bigbench.ensure_bigbench(cache_dir=tmp_path / "c2", sdist=tmp_path / "none.tar.gz")


def test_data_cli(tmp_path, monkeypatch, capsys):
    d = make_fake_bigbench(tmp_path)
    monkeypatch.setenv("HYDRALORA_BIGBENCH_DIR", str(d))
    parser = argparse.ArgumentParser()
    add_data_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "mix.jsonl"
    args = parser.parse_args(["data", "bigbench", "--tasks", "mc_task,parent:five",
                              "--per-task", "10", "--splits", "test=2,train=-1",
                              "--out", str(out)])
    assert args.func(args) == 0
    loaded = load_examples(out)
    assert loaded.tasks == ["mc_task", "parent:five"]
    assert sum(e.split == "test" for e in loaded) == 4
    args = parser.parse_args(["data", "check", str(out)])
    assert args.func(args) == 0 and "15 examples, 2 tasks" in capsys.readouterr().out
    args = parser.parse_args(["data", "bigbench", "--tasks", "nope", "--out", str(out)])
    assert args.func(args) == 2 and "unknown BIG-bench task" in capsys.readouterr().err


# --------------------------------------------------------------------------- bundled


def test_bundled_mixture():
    loaded = load_examples(bundled_mixture_path())
    kinds = {e.task: e.is_multiple_choice for e in loaded}
    assert len(kinds) >= 6
    assert any(kinds.values()) and not all(kinds.values())  # both MC and generative tasks
    assert {e.split for e in loaded} == {"train", "test"}
    for task in kinds:
        assert sum(e.task == task and e.split == "test" for e in loaded) >= 40
    assert (bundled_mixture_path().parent / "NOTICE").read_text().count("Apache") >= 1
    # Held-out prompts never appear in training.
    train = {e.prompt for e in loaded if e.split == "train"}
    assert not any(e.prompt in train for e in loaded if e.split == "test")


def test_staged_dir_publishes_whole_or_not_at_all(tmp_path):
    from hydralora._fs import staged_dir

    target = tmp_path / "cache" / "thing"
    with staged_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with staged_dir(target) as tmp:
            (tmp / "a.txt").write_text("half-written")
            raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "one"  # the earlier folder is untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["thing"]  # no leftover staging folder
    with staged_dir(target) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced whole, not merged
