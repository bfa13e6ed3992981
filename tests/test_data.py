"""--data beyond jsonl: GSM8K as verl's parquet and as a datasets.save_to_disk directory loads and trains exactly
as the jsonl does; field mapping, chat-message prompts, and one-line errors for bad files and missing columns."""

import json
import os
import sys

import pytest
from conftest import ROOT, SHARED

from nanorl import UserError
from nanorl.tasks import make_task
from nanorl.tokenizer import CharTokenizer

sys.path.insert(0, ROOT)
import train  # noqa: E402

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

GSM8K = os.environ.get("NANORL_GSM8K", os.path.join(SHARED, "data", "gsm8k"))  # ../shared next to the repo
REWARD = os.path.join(ROOT, "tests", "reward_fns.py") + ":varied"
FAST = ["--model", "tiny", "--task", "gsm8k", "--prompts-per-step", "2", "--max-new-tokens", "4", "--eval-n", "4",
        "-n", "4", "--warm-start-steps", "0", "--reward-fn", REWARD, "--progress", "false", "--lr", "1e-3", "--steps", "2"]


def gsm8k_rows(split, n):
    """The first n real GSM8K rows of a split whose questions fit the tiny model's 256-token context (short ones: a faster test)."""
    with open(os.path.join(GSM8K, f"{split}.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if len(r["question"]) < 120][:n]


def verl_row(r, i, split):
    """verl's examples/data_preprocess/gsm8k.py layout. verl appends an instruction to the user message; it is
    left out here so that the raw prompts equal the jsonl's (the question alone)."""
    return {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": r["question"]}], "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": r["answer"].split("####")[-1].strip()},
            "extra_info": {"split": split, "index": i, "answer": r["answer"], "question": r["question"]}}


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def gsm8k_layouts(tmp_path_factory):
    """{layout: --data path} of the same GSM8K subset as jsonl, verl parquet and a save_to_disk DatasetDict."""
    if not os.path.isdir(GSM8K):
        pytest.skip("../shared/data/gsm8k is absent (a fresh clone)")
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("gsm8k")
    splits = {"train": gsm8k_rows("train", 40), "test": gsm8k_rows("test", 8)}
    out = {k: root / k for k in ("jsonl", "verl", "disk")}
    for d in out.values():
        d.mkdir()
    for split, rows in splits.items():
        write_jsonl(out["jsonl"] / f"{split}.jsonl", rows)
        pq.write_table(pa.Table.from_pylist([verl_row(r, i, split) for i, r in enumerate(rows)]),
                       out["verl"] / f"{split}.parquet")
    datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s, rows in splits.items()}).save_to_disk(str(out["disk"]))
    return {k: str(v) for k, v in out.items()}


def test_gsm8k_layouts_load_the_same_examples(gsm8k_layouts):
    tasks = {k: make_task("gsm8k", data=p) for k, p in gsm8k_layouts.items()}
    ref = tasks["jsonl"]
    assert ref.n_train == 40 and len(ref.eval_examples(100)) == 8
    for k, task in tasks.items():
        assert task.n_train == ref.n_train, k
        for i in range(2 * ref.n_train):  # two epochs: the same seeded order
            a, b = task.train_example(i), ref.train_example(i)
            assert (a.question, a.answer) == (b.question, b.answer), (k, i)
            assert task.prompt(a, None, chat=False) == ref.prompt(b, None, chat=False)
        assert [(e.question, e.answer) for e in task.eval_examples(8)] == \
            [(e.question, e.answer) for e in ref.eval_examples(8)], k
    ex = tasks["verl"].train_example(0)
    assert ex.id.startswith("train.parquet:row ") and ex.meta["where"].startswith(gsm8k_layouts["verl"])
    assert tasks["disk"].eval_examples(1)[0].id == "test:row 0"


def test_gsm8k_layouts_train_and_evaluate_the_same(gsm8k_layouts, tmp_path):
    runs = {}
    for k, data in gsm8k_layouts.items():
        out = str(tmp_path / k)
        assert train.main(FAST + ["--data", data, "--out", out]) == 0
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        clock = ("seconds", "tokens_per_s")  # wall-clock numbers differ between any two runs
        runs[k] = ([{m: v for m, v in r.items() if m not in clock and not m.startswith("time_")} for r in rows],
                   {m: v for m, v in json.load(open(os.path.join(out, "summary.json"))).items() if m != "seconds"})
    assert len(runs["jsonl"][0]) == 2 and runs["jsonl"][0][0]["reward_mean"] > 0
    assert runs["verl"] == runs["jsonl"]
    assert runs["disk"] == runs["jsonl"]


def test_chat_messages_render_as_they_are_and_keys_map_other_fields(tmp_path):
    tok = CharTokenizer()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]
    rows = [{"query": msgs, "meta": {"gold": 5 + k}} for k in range(10)]
    path = str(tmp_path / "q.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(UserError, match=r"no column 'question' or 'prompt' \(columns: query, meta\); pass --prompt-key"):
        make_task("gsm8k", data=path)
    task = make_task("gsm8k", data=path, prompt_key="query", answer_key="meta.gold")
    ex = task.train_example(0)
    assert ex.question == "What is 2+3?" and ex.answer in {str(5 + k) for k in range(9)}
    assert task.prompt(ex, tok, chat=True) == tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert task.prompt(ex, tok, chat=False) == "Question: What is 2+3?\nAnswer:\n"
    # the same mapping on jsonl, where each line has its own keys: the error names the line
    write_jsonl(tmp_path / "q.jsonl", [{"query": "a?", "meta": {"gold": 1}}, {"query": "b?", "meta": {}}])
    with pytest.raises(UserError, match=r"q\.jsonl:2: missing field 'meta\.gold'"):
        make_task("gsm8k", data=str(tmp_path / "q.jsonl"), prompt_key="query", answer_key="meta.gold")
    with pytest.raises(UserError, match="--prompt-key"):
        make_task("arith", prompt_key="q")


def test_math_reads_verl_ground_truth(tmp_path):
    pytest.importorskip("math_verify")
    rows = [{"prompt": [{"role": "user", "content": f"Compute {k}^2."}], "reward_model": {"ground_truth": str(k * k)}}
            for k in range(1, 11)]
    path = str(tmp_path / "m.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    task = make_task("math", data=path)
    ex = task.eval_examples(1)[0]
    assert (ex.question, ex.answer) == ("Compute 10^2.", "100")
    assert task.reward("so \\boxed{100}", ex) == 1.0 and task.reward("\\boxed{99}", ex) == 0.0


def _one_line_error(capsys, argv):
    assert train.cli(FAST + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_parquet_missing_column_and_bad_files_are_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    path = tmp_path / "g.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "1+1?", "solution": "#### 2"}] * 5), path)
    err = _one_line_error(capsys, ["--data", str(path), "--out", str(out)])
    assert f"{path}: no column 'answer' or 'reward_model.ground_truth'" in err and "--answer-key" in err
    # a null in one row: the row is named
    pq.write_table(pa.Table.from_pylist([{"question": "1+1?", "answer": "#### 2"}] * 3 + [{"question": None, "answer": "#### 2"}]), path)
    assert f"{path}:row 3: missing field 'question'" in _one_line_error(capsys, ["--data", str(path), "--out", str(out)])
    path.write_bytes(b"not a parquet file at all")
    assert f"{path}: not a readable parquet file" in _one_line_error(capsys, ["--data", str(path), "--out", str(out)])
    d = tmp_path / "dd"
    d.mkdir()
    (d / "dataset_dict.json").write_text(json.dumps({"splits": ["validation"]}))
    assert "no 'train' split" in _one_line_error(capsys, ["--data", str(d), "--out", str(out)])
    assert not out.exists()


def test_dpo_pairs_from_parquet_equal_the_jsonl(tmp_path):
    from nanorl.preference import read_pairs

    rows = [{"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(2 * a + 1)} for a in range(5)]
    write_jsonl(tmp_path / "p.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    assert read_pairs(str(tmp_path / "p.parquet")) == read_pairs(str(tmp_path / "p.jsonl")) == rows
    pq.write_table(pa.Table.from_pylist(rows[:2] + [{"prompt": "x", "chosen": "", "rejected": "y"}]), tmp_path / "b.parquet")
    with pytest.raises(UserError, match=r"b\.parquet:row 2: needs non-empty string fields"):
        read_pairs(str(tmp_path / "b.parquet"))
