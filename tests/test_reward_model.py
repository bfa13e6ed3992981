"""Learned rewards: RewardModel.scores against transformers' *ForSequenceClassification, the judge's P(yes) against
transformers' logits, the Scorer's sum, 2-step GRPO runs with --reward-model and --judge-model, and bad input."""

import json
import os
import sys

import pytest
import torch
from conftest import ROOT, TINY_HF, make_hf_model

from nanorl import UserError
from nanorl.reward_model import Judge, Scorer, load_judge, load_reward_model
from nanorl.tasks import make_task
from nanorl.tokenizer import CharTokenizer

sys.path.insert(0, ROOT)
import train  # noqa: E402

REWARD = os.path.join(ROOT, "tests", "reward_fns.py") + ":varied"
FAST = ["--model", "tiny", "--task", "arith", "--prompts-per-step", "2", "-n", "4", "--max-new-tokens", "4",
        "--eval-n", "4", "--warm-start-steps", "0", "--reward-fn", REWARD, "--progress", "false", "--lr", "1e-3"]
JUDGE_PROMPT = "Question: {question}\nReference answer: {answer}\nProposed answer: {completion}\nIs it right? Yes or no?"


def make_classifier(variant, path, vocab_size=TINY_HF["vocab_size"], num_labels=1, tokenizer=None, seed=0):
    """A tiny random transformers *ForSequenceClassification, saved to path (the independent reference)."""
    model = make_hf_model(variant, seed, "AutoModelForSequenceClassification", vocab_size=vocab_size,
                          num_labels=num_labels, pad_token_id=0)
    model.save_pretrained(str(path), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save(str(path))
    return model


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3"])
def test_scores_equal_transformers_classifier_at_the_last_real_token(tmp_path, variant):
    ref = make_classifier(variant, tmp_path)
    rm = load_reward_model(str(tmp_path))
    g = torch.Generator().manual_seed(1)
    lens = [5, 17, 1, 30, 9, 30]
    ids = [torch.randint(1, TINY_HF["vocab_size"], (n,), generator=g).tolist() for n in lens]
    batch = torch.zeros(len(ids), max(lens), dtype=torch.long)  # right padding with pad_token_id 0
    for i, row in enumerate(ids):
        batch[i, :len(row)] = torch.tensor(row)
    with torch.no_grad():
        want = ref(input_ids=batch, attention_mask=(batch != 0).long()).logits[:, 0]
    for max_tokens in (8192, 40):  # one padded batch, and several (rows sorted by length, scattered back)
        got = rm.scores(ids, max_tokens=max_tokens)
        assert got.dtype == torch.float32 and got.shape == (len(ids),)
        assert (got - want).abs().max().item() <= 1e-4, (max_tokens, got, want)
    assert rm.tok is None  # no tokenizer.json was saved


def test_bad_reward_model_paths_are_one_line(tmp_path, hf_ckpts, capsys):
    cases = {str(tmp_path / "nope"): "does not exist", hf_ckpts["llama"]: "no 'score' head", "tiny": "built-in causal LM"}
    make_classifier("llama", tmp_path / "two", num_labels=2)
    cases[str(tmp_path / "two")] = "2 labels"
    for path, words in cases.items():
        with pytest.raises(UserError, match=words):
            load_reward_model(path)
    out = tmp_path / "out"
    capsys.readouterr()  # transformers' progress bars while saving
    for path in (str(tmp_path / "nope"), hf_ckpts["llama"]):
        assert train.cli(FAST + ["--steps", "1", "--out", str(out), "--reward-model", path]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: --reward-model") and path in err, err
    prompt = tmp_path / "judge.txt"
    prompt.write_text("no placeholder here")
    for extra, words in ((["--judge-model", "tiny"], "--judge-prompt"), (["--judge-prompt", str(prompt)], "--judge-model"),
                         (["--judge-model", "tiny", "--judge-prompt", str(prompt)], "{completion}")):
        assert train.cli(FAST + ["--steps", "1", "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    assert not out.exists()


def test_scorer_adds_the_weighted_scores_of_the_rendered_conversation(tmp_path):
    tok = CharTokenizer()
    make_classifier("llama", tmp_path / "rm", vocab_size=tok.vocab_size, tokenizer=tok)
    rm = load_reward_model(str(tmp_path / "rm"))
    task = make_task("arith")
    exs = [task.train_example(i) for i in range(3)]
    texts = ["12", "7+8=15 #### 15", ""]
    conv = [tok.apply_chat_template(task.messages(ex) + [{"role": "assistant", "content": t}],
                                    add_generation_prompt=False, tokenize=True) for ex, t in zip(exs, texts)]
    assert tok.decode(conv[1]).endswith("assistant: 7+8=15 #### 15\n")
    s = rm.scores(conv).double()
    base = [1.0, 0.0, 0.5]
    for norm, r in (("none", s), ("sigmoid", torch.sigmoid(s)), ("batch", (s - s.mean()) / (s.std(correction=0) + 1e-6))):
        sc = Scorer(task, tok, False, rm, rm_weight=0.5, rm_norm=norm)
        got = sc(exs, texts, base)
        assert torch.allclose(torch.tensor(got, dtype=torch.float64), torch.tensor(base, dtype=torch.float64) + 0.5 * r,
                              atol=1e-6), norm
        assert sc.metrics() == {"reward_model_mean": pytest.approx(float(s.mean()), abs=1e-6)}
        assert sc.metrics() == {"reward_model_mean": 0.0}  # reset after reading


def test_grpo_with_reward_model_logs_its_score(tmp_path):
    tok = CharTokenizer()
    make_classifier("qwen3", tmp_path / "rm", vocab_size=tok.vocab_size, tokenizer=tok)
    rows = {}
    for w, steps in ((1.0, 2), (0.0, 1)):
        out = str(tmp_path / f"w{w}")
        assert train.main(FAST + ["--steps", str(steps), "--out", out, "--reward-model", str(tmp_path / "rm"),
                                  "--reward-model-weight", str(w)]) == 0
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows[w] = [json.loads(line) for line in f]
    assert len(rows[1.0]) == 2 and all(r["reward_model_mean"] == r["reward_model_mean"] for r in rows[1.0])
    # step 1 samples the same completions whatever the weight: the rewards differ by exactly the score's mean
    a, b = rows[1.0][0], rows[0.0][0]
    assert a["reward_model_mean"] == b["reward_model_mean"] != 0
    assert a["reward_mean"] - b["reward_mean"] == pytest.approx(a["reward_model_mean"], abs=1e-5)


def test_judge_probability_equals_transformers(smollm2, smollm2_hf, tmp_path):
    model, tok = smollm2
    ref, _ = smollm2_hf
    judge = Judge(model, tok, JUDGE_PROMPT)
    words = {tok.decode([t]).strip().lower() for t in judge.yes} | {tok.decode([t]).strip().lower() for t in judge.no}
    assert words == {"yes", "no"}
    ids = [judge.prompt("What is 2 + 2?", "4", c) for c in ("4", "The answer is 5.", "I think it is four, so 4.")]
    text = tok.decode(ids[0], skip_special_tokens=False)
    assert text.startswith("<|im_start|>") and "Proposed answer: 4\n" in text and text.endswith("<|im_start|>assistant\n")
    got = judge.probs(ids)
    want = []
    with torch.no_grad():
        for row in ids:
            p = torch.softmax(ref(torch.tensor([row])).logits[0, -1].double(), -1)
            want.append(float(p[judge.yes].sum() / (p[judge.yes].sum() + p[judge.no].sum())))
    assert (got.double() - torch.tensor(want, dtype=torch.float64)).abs().max() <= 1e-4, (got, want)


@pytest.mark.parametrize("judge", ["tiny", pytest.param("smollm2-135m", marks=pytest.mark.slow)])
def test_grpo_with_judge_logs_its_probability(tmp_path, judge):
    prompt = tmp_path / "judge.txt"
    prompt.write_text(JUDGE_PROMPT)
    out = str(tmp_path / "out")
    assert train.main(FAST + ["--steps", "2", "--out", out, "--judge-model", judge, "--judge-prompt", str(prompt),
                              "--judge-weight", "0.5"]) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 2 and all(0 < r["judge_mean"] < 1 for r in rows)
    assert all(0 <= r["reward_mean"] - 0.5 * r["judge_mean"] <= 1 + 1e-6 for r in rows)  # varied is in [0, 1]


def test_load_judge_reads_the_prompt_file(tmp_path):
    prompt = tmp_path / "j.txt"
    prompt.write_text("Is {completion} the answer to {question}?")
    judge = load_judge("tiny", str(prompt))
    tok = CharTokenizer()
    assert judge.yes == sorted({tok.encode("Y")[0], tok.encode("y")[0]})  # " Yes" starts with " ", as " No" does
    assert tok.decode(judge.prompt("1+1", "2", "3")) == "user: Is 3 the answer to 1+1?\nassistant: "
    assert tok.decode(judge.prompt("{answer}", "2", "{question}")) == "user: Is {question} the answer to {answer}?\nassistant: "
    with pytest.raises(UserError, match="does not exist"):
        load_judge("tiny", str(tmp_path / "nope.txt"))


@pytest.mark.slow  # a torchrun launch: ~35 s on the loaded 2-core machine
def test_two_ranks_score_their_shares_like_one(tmp_path):
    """torchrun with 2 gloo ranks: each scores its own samples; the logged means equal one process's."""
    import subprocess

    tok = CharTokenizer()
    make_classifier("llama", tmp_path / "rm", vocab_size=tok.vocab_size, tokenizer=tok)
    prompt = tmp_path / "judge.txt"
    prompt.write_text(JUDGE_PROMPT)
    extra = ["--steps", "1", "--reward-model", str(tmp_path / "rm"), "--judge-model", "tiny", "--judge-prompt", str(prompt)]
    assert train.main(FAST + extra + ["--out", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "29517",
           os.path.join(ROOT, "train.py"), *FAST, *extra, "--out", str(tmp_path / "two")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = ([json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")][0] for d in ("one", "two"))
    for k in ("reward_model_mean", "judge_mean", "reward_mean"):
        assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6), k
