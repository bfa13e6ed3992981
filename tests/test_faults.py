"""Hardening: kills, signals, non-finite steps, bad rewards, hopeless groups, OOM, bad data, a failing rank."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import torch
from conftest import ROOT
from test_train import FAST, REWARD, metrics, run, weights

import train
from nanorl.checkpoint import latest_state, load_state

TRAIN = os.path.join(ROOT, "train.py")
TIMING = {"time_train", "time_sample", "time_score", "tokens_per_s", "seconds"}


def popen(*args, cwd=ROOT):
    return subprocess.Popen([sys.executable, TRAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1"))


def wait_for_metrics(out, n, proc, timeout=120):
    path = os.path.join(out, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if os.path.isfile(path) and sum(1 for _ in open(path)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} metric lines in {timeout}s: {proc.stderr.read() if proc.poll() is not None else ''}")


def test_kill_9_at_random_moments_then_resume_equals_straight_run(tmp_path):
    """SIGKILL mid-sampling / mid-update / mid-checkpoint: --resume continues from the last complete checkpoint,
    and the finished run equals one that was never killed."""
    args = [*FAST, "--steps", "6", "--save-every", "1"]
    straight = str(tmp_path / "straight")
    # the same thread count as the killed runs: CPU attention rounds differently with another one
    first = popen(*args, "--out", straight)
    assert first.communicate(timeout=300) and first.returncode == 0
    out = str(tmp_path / "killed")
    rng = random.Random(0)
    kills = 0
    proc = popen(*args, "--out", out)
    wait_for_metrics(out, 1, proc)
    for _ in range(3):  # kill a few times at random moments, resuming in between
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        ckpt = latest_state(out)
        assert ckpt is not None and load_state(ckpt)[2]["step"] >= 1  # the newest complete checkpoint reads back
        proc = popen(*args, "--out", out, "--resume")
        wait_for_metrics(out, 1, proc)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert kills >= 1
    a, b = weights(straight), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metrics(out)] == list(range(1, 7))
    assert not [n for n in os.listdir(os.path.join(out, "ckpt")) if n.startswith(".")]


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    out = str(tmp_path / "out")
    proc = popen(*FAST, "--steps", "200", "--save-every", "100", "--out", out)
    wait_for_metrics(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    done = len(metrics(out))
    assert load_state(latest_state(out))[2]["step"] == done  # a checkpoint of the step it finished
    assert "continue with --resume" in proc.stderr.read()
    assert train.main(FAST + ["--steps", str(done + 1), "--out", out, "--resume"]) == 0


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    run(tmp_path, "--steps", "2", "--save-every", "1")
    good = weights(out)
    real = train.algos.loss

    def nan_loss(*a, **k):
        loss, mets = real(*a, **k)
        return loss * float("nan"), mets

    monkeypatch.setattr(train.algos, "loss", nan_loss)
    assert train.cli(FAST + ["--steps", "10", "--out", out, "--resume", "--max-bad-steps", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "3 steps in a row had a non-finite loss" in err and "lower --lr" in err
    assert load_state(latest_state(out))[2]["step"] == 2  # the last good checkpoint, untouched
    assert all(torch.equal(good[k], weights(out)[k]) for k in good)
    assert [r["skipped_steps"] for r in metrics(out)[2:]] == [1, 2, 3][:len(metrics(out)) - 2]


def test_a_reward_function_that_raises_hangs_or_returns_junk(tmp_path):
    rf = tmp_path / "bad_reward.py"
    rf.write_text("import time\n"
                  "def reward(completion, example):\n"
                  "    k = sum(map(ord, completion)) % 4\n"
                  "    if k == 0: raise ValueError('boom')\n"
                  "    if k == 1: time.sleep(30)\n"
                  "    return None if k == 2 else 1.0\n")
    t0 = time.time()
    out = run(tmp_path, "--steps", "2", "--reward-fn", f"{rf}:reward", "--reward-timeout", "0.5")
    rows = metrics(out)
    assert sum(r["reward_errors"] for r in rows) > 0 and sum(r["reward_timeouts"] for r in rows) > 0
    assert time.time() - t0 < 120  # hung calls cost their timeout, not 30 s each


def test_all_groups_constant_stops_with_a_clear_message(tmp_path, capsys):
    """An untrained model never solves arith: every group scores 0 and DAPO's filter drops them all."""
    args = [a for a in FAST if a not in ("--reward-fn", REWARD)]
    code = train.cli(args + ["--algo", "dapo", "--steps", "3", "--max-gen-batches", "2", "--out", str(tmp_path / "o")])
    assert code == 1
    err = capsys.readouterr().err
    assert "every group had equal rewards in 2 generation batches" in err and "too hard for the model" in err


def test_out_of_memory_names_the_flags(tmp_path, monkeypatch, capsys):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(train, "update", oom)
    assert train.cli(FAST + ["--steps", "1", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: out of GPU memory") and "--micro-batch" in err and "--max-new-tokens" in err


def test_prompt_longer_than_the_context_names_the_line(tmp_path, capsys):
    data = tmp_path / "gsm.jsonl"
    good = json.dumps({"question": "What is 1+1?", "answer": "2\n#### 2"})
    long = json.dumps({"question": "9" * 400, "answer": "#### 1"})
    data.write_text("\n".join([good] * 3 + [long] + [good] * 6) + "\n")
    out = tmp_path / "o"
    assert train.cli(FAST + ["--task", "gsm8k", "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{data}:4" in err and "context is 256" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_same_seed_gives_bit_identical_metrics(tmp_path):
    a = run(tmp_path, "--steps", "3", name="a")
    b = run(tmp_path, "--steps", "3", name="b")
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(a)]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(b)]
    assert len(strip) == 3


def test_a_failing_rank_ends_the_job(tmp_path):
    """Rank 1 raises in its first update: torchrun stops rank 0 too, well within the timeout, and shows why."""
    script = tmp_path / "fail_rank1.py"
    script.write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\nimport train\nfrom nanorl import dist\n"
                      "real = train.update\n"
                      "def update(*a, **k):\n"
                      "    if dist.rank() == 1:\n"
                      "        raise RuntimeError('rank 1 exploded on purpose')\n"
                      "    return real(*a, **k)\n"
                      "train.update = update\n"
                      "sys.exit(train.cli())\n")
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "29531",
                          str(script), *FAST, "--steps", "3", "--out", str(tmp_path / "o"), "--dist-timeout", "60"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode != 0
    assert time.time() - t0 < 120
    assert "rank 1 exploded on purpose" in res.stderr + res.stdout
