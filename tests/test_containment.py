"""Environments and tools that raise, hang, leak or spin never stop a run (issue 23 item 3, execution side), and
steps and tool calls run concurrently (item 4): nanorl/tool_pool.py, env.Tools / ToolEnv, rollout's containment."""

import json
import os
import time

import pytest

from nanorl import UserError
from nanorl.env import Step, ToolEnv, Tools
from nanorl.rollout import run_episodes
from nanorl.tasks import make_task
from nanorl.tokenizer import load_tokenizer
from nanorl.tool_pool import ToolPool, run_contained
from test_credit import scripted


def test_run_contained_statuses():
    def boom():
        raise RuntimeError("kaput")

    out = run_contained([lambda: 1, boom, lambda: time.sleep(30)], timeout=0.5)
    assert out == [(1, "ok"), ("RuntimeError: kaput", "error"), (None, "timeout")]


def _interval(seconds):
    t0 = time.time()
    time.sleep(seconds)
    return t0, time.time()


def test_tool_calls_run_concurrently_in_the_pool():
    pool = ToolPool(lambda op, ep, name, args: _interval(1.0), workers=4, timeout=30)
    pool.ensure(4)
    spans = [v for v, st in run_contained([lambda i=i: pool.call(i, ("call", i, "t", {}))[0] for i in range(4)])]
    # every call started before any ended: the four overlapped (one at a time would take 4 x 1 s, in sequence)
    assert max(s for s, _ in spans) < min(e for _, e in spans)
    pool.close()


def _count(text, state):  # tags format: the text between the tags, then the state
    state["n"] = state.get("n", 0) + 1
    return state["n"]


def test_calls_one_after_another_reuse_one_worker():
    """A fork pins the trainer's memory as it was (copy-on-write): sequential calls (the warm start's reference
    episodes, one per training step) must not fork a new worker each time."""
    pool = ToolPool(lambda op, ep, name, args: os.getpid(), workers=8, timeout=30)
    try:
        pids = {pool.call(k, ("call", k, "f", None))[0] for k in range(6)}
        assert len(pids) == 1 and sum(w is not None for w in pool.workers) == 1
    finally:
        pool.close()


def test_stateful_tools_have_per_episode_state_and_close(tmp_path):
    closed = tmp_path / "closed"

    def on_close(state):  # runs in the worker: a file is how the test sees it
        with open(closed, "a") as f:
            f.write(f"{state['n']}\n")
    tools = Tools({"count": _count}, close=on_close, workers=2)
    a, b = (ToolEnv(lambda ex: "", tools, "tags") for _ in range(2))
    call = "<count></count>"
    assert a.step(call).observation == "<result>1</result>"
    assert a.step(call + call).observation == "<result>2</result><result>3</result>"
    assert b.step(call).observation == "<result>1</result>"  # its own state
    a.close()
    assert closed.read_text() == "3\n"
    assert a.step(call).observation == "<result>1</result>"  # a closed episode's state is gone


def test_resource_limits_in_the_tool_worker():
    def hog(n):
        return len(bytearray(int(n) * 2 ** 20))

    def spin(n):
        while True:
            pass
    tools = Tools({"hog": hog, "spin": spin}, timeout=30, memory_mb=256, cpu_s=1)
    text, ok = tools.call("hog", "1024")  # 1 GiB past a 256 MiB cap
    assert not ok and "MemoryError" in text
    assert tools.call("hog", "16") == (str(16 * 2 ** 20), True)  # within the cap, and the worker lives on
    text, ok = tools.call("spin", "0")
    assert not ok and "CPU-time limit" in text, text  # SIGXCPU, long before the 30 s timeout
    assert tools.call("hog", "1") == (str(2 ** 20), True)  # a fresh worker


def test_max_tool_calls_per_turn():
    env = ToolEnv(lambda ex: "", Tools({"calc": lambda expr: eval(expr, {})}), "tags", max_calls=2)
    st = env.step("<calc>1+1</calc><calc>2+2</calc><calc>3+3</calc>")
    assert st.observation == "<result>2</result><result>4</result><result>error: not run, at most 2 tool calls per turn</result>"
    assert st.info == {"tool_calls": 3, "tool_errors": 1}


class Flaky:
    """Episodes by their row: 0 fine, 1 raises in step, 2 hangs in step, 3 raises in reset, 4 returns junk."""
    made = 0

    def __init__(self):
        self.row, Flaky.made = Flaky.made, Flaky.made + 1
        self.closed = False

    def reset(self, ex):
        if self.row % 5 == 3:
            raise ValueError("no reset")
        return "q:"

    def step(self, text):
        kind = self.row % 5
        if kind == 1:
            raise RuntimeError("broken step")
        if kind == 2:
            time.sleep(30)
        if kind == 4:
            return "not a Step"
        return Step("<ok>", 1.0, text == "done")


def test_env_that_raises_or_hangs_ends_its_episode_not_the_run(monkeypatch):
    import nanorl.rollout as R

    tok = load_tokenizer("tiny")
    monkeypatch.setattr(R, "generate", scripted(tok, lambda r: ["go", "done"]))
    task = make_task("arith")
    Flaky.made = 0
    stats = {}
    t0 = time.time()
    eps = run_episodes(None, tok, task, [task.train_example(0)], 5, max_turns=3, max_new_tokens=8, env_cls=Flaky,
                       env_timeout=1.0, stats=stats)
    assert time.time() - t0 < 30  # the hanging step was abandoned at its timeout, not waited for
    assert [e.finish_reason for e in eps] == ["stop", "env_error", "env_error", "env_error", "env_error"]
    assert stats["env_errors"] == 4
    assert eps[0].reward == 2.0 and eps[0].turns == 2
    assert all(e.reward == 0.0 and not e.correct for e in eps[1:])


ENV_FILE = '''
from nanorl.env import Step

class Sometimes:
    """Every third episode's reset raises (reset runs for every episode, whatever the model writes)."""
    n = 0

    def __init__(self):
        Sometimes.n += 1
        self.bad = Sometimes.n % 3 == 0

    def reset(self, ex):
        if self.bad:
            raise RuntimeError("env bug")
        return "guess:"

    def step(self, text):
        return Step("<result>higher</result>", 1.0, True)
'''


def test_train_goes_on_and_counts_env_errors(tmp_path):
    import train

    f = tmp_path / "envs.py"
    f.write_text(ENV_FILE)
    out = str(tmp_path / "out")
    assert train.main(["--model", "tiny", "--task", "arith", "--env", f"{f}:Sometimes", "--algo", "grpo",
                       "--steps", "2", "--prompts-per-step", "2", "-n", "3", "--max-new-tokens", "4", "--max-turns", "2",
                       "--eval-n", "2", "--warm-start-steps", "0", "--out", out, "--progress", "false"]) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    # 2 eval episodes first (1, 2), then 6 a step: episodes 3..8 and 9..14, of which 3, 6 and 9, 12 fail
    assert [r["env_errors"] for r in rows] == [2, 2]


def test_evaluate_reports_the_held_out_tool_call_rate(monkeypatch):
    """train.py prints evaluate's tool-call rate beside the accuracy: the fraction of held-out episodes (all
    ranks) that called a tool. Scripted: episodes 0 and 2 call the calculator, 1 and 3 answer bare."""
    from conftest import scripted_generate

    from nanorl import rollout as R
    from nanorl.rollout import evaluate

    tok, task = load_tokenizer("tiny"), make_task("calc")
    exs = task.eval_examples(4)
    script = lambda r: ([f"<calc>{exs[r].meta['expr']}</calc>", exs[r].answer] if r % 2 == 0  # noqa: E731
                        else [exs[r].answer])
    monkeypatch.setattr(R, "generate", scripted_generate(tok, script, tok.eos_ids[0]))
    args = type("Args", (), dict(max_turns=3, max_new_tokens=16, chat=False, eval_n=4))()
    ev = {}
    assert evaluate(None, tok, task, args, None, exs, ev) == 1.0
    assert ev["tool_call_rate"] == 0.5
    ev = {}
    evaluate(None, tok, make_task("guess"), args, None, make_task("guess").eval_examples(2), ev)
    assert "tool_call_rate" not in ev  # no tools: no rate


def test_tool_flags_reach_the_tool_set():
    from nanorl.flags import parse_args
    from nanorl.rollout import episode_args, _configure_tools

    args = parse_args(["--task", "calc", "--tool-workers", "3", "--tool-memory-mb", "64", "--tool-cpu-s", "2",
                       "--max-tool-calls-per-turn", "1", "--env-timeout", "7"])
    task = make_task("calc")
    kw = episode_args(args, task)
    assert (kw["env_timeout"], kw["tool_workers"], kw["max_tool_calls"]) == (7.0, 3, 1)
    env = task.make_env(load_tokenizer("tiny"), False)
    pool, = _configure_tools([env], kw["tool_workers"], kw["max_tool_calls"], kw["tool_limits"])
    assert (pool.n, pool.limits, env.max_calls) == (3, {"memory_mb": 64.0, "cpu_s": 2.0}, 1)
    with pytest.raises(UserError):
        parse_args(["--env-timeout", "0"])
