"""Asynchronous RL (nanorl/async_loop.py) on 2-3 gloo ranks on the CPU: K = 0 is the synchronous run bit for bit,
the staleness bound holds under random delays on both sides, the rollout ranks' weights equal the trainers'
after every sync (LoRA: from the adapters alone), resume re-dispatches in-flight prompts, and failures are short."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

from nanorl import async_loop

sys.path.insert(0, ROOT)
from test_faults import TIMING  # noqa: E402
from test_train import FAST, cli, metrics, run, weights  # noqa: E402

PROBE = os.path.join(ROOT, "tests", "async_probe.py")
PORTS = iter(range(29640, 29700))


def torchrun(nproc, out, *extra, probe=None, delay=0.0, fail=0, script=PROBE, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
           str(next(PORTS)), script, *FAST, "--out", out, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", NANORL_PROBE=probe or os.path.join(out, "probe"),
               NANORL_PROBE_DELAY=str(delay), NANORL_PROBE_FAIL=str(fail))
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def events(probe, role):
    rows = []
    for name in sorted(os.listdir(probe)):
        if name.startswith(role):
            with open(os.path.join(probe, name)) as f:
                rows += [json.loads(line) for line in f]
    return rows


def test_staleness_0_equals_the_synchronous_run(tmp_path):
    """1 rollout + 1 trainer rank at K = 0: the metrics and the weights of the one-process synchronous run (that one
    also under torchrun, for its one thread per process: a CPU matmul's rounding depends on the thread count)."""
    sync = str(tmp_path / "sync")
    assert torchrun(1, sync, "--steps", "3").returncode == 0
    res = torchrun(2, str(tmp_path / "async"), "--steps", "3", "--rollout-ranks", "1", "--max-staleness", "0")
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = weights(sync), weights(str(tmp_path / "async"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_a, rows_b = metrics(sync), metrics(str(tmp_path / "async"))
    assert len(rows_a) == len(rows_b) == 3
    for x, y in zip(rows_a, rows_b):
        assert {k: v for k, v in x.items() if k not in TIMING} == {k: y[k] for k in x if k not in TIMING}
        assert y["staleness_0"] == 1.0
    assert "rollout ranks: per batch" in res.stderr  # K = 0 keeps the per-batch path (bit for bit)


@pytest.mark.parametrize("nproc,extra", [(2, []), (2, ["--lora-rank", "4"]), (2, ["--algo", "remax"]),
                                         pytest.param(3, ["--fsdp"], marks=pytest.mark.long)],
                         ids=["full", "lora", "per-batch", "fsdp"])
def test_staleness_bound_and_weight_sync_under_random_delays(tmp_path, nproc, extra):
    """Random sleeps before every sample batch (streaming: every share pushed) and every update: 0 <= step -
    version <= K for every group trained (streaming: each group's own version, the weights its first row was
    admitted with, in-flight updates taken while it decodes), and after every sync the rollout rank's sampler
    weights hash equal to the trainer's (LoRA: merged there from the adapters alone; fsdp: 2 trainer ranks gather
    the shards). ReMax's greedy baseline needs whole batches: that one runs the per-batch path at K = 2."""
    K, out = 2, str(tmp_path / "o")
    res = torchrun(nproc, out, "--steps", "8", "--rollout-ranks", "1", "--max-staleness", str(K), *extra, delay=0.3)
    assert res.returncode == 0, res.stderr[-3000:]
    assert ("rollout ranks: per batch" if "remax" in extra else "rollout ranks: streaming") in res.stderr
    took = [e for e in events(os.path.join(out, "probe"), "train") if e["event"] == "take"]
    assert sorted(e["step"] for e in took) == sorted(list(range(8)) * (nproc - 1))  # every trainer takes every step
    assert all(len(e["versions"]) == 4 for e in took)  # one per group: 4 prompts a step
    lags = [e["step"] - v for e in took for v in e["versions"]]
    assert all(0 <= lag <= K for lag in lags), lags
    published = {e["version"]: e for e in events(os.path.join(out, "probe"), "train") if e["event"] == "publish"}
    received = {e["version"]: e["hash"] for e in events(os.path.join(out, "probe"), "rollout")}
    assert sorted(published) == sorted(received) == list(range(9))
    assert all(received[v] == published[v]["hash"] for v in published)
    layouts = [published[v]["layout"] for v in sorted(published)]
    assert layouts == [async_loop.FULL] + [async_loop.ADAPTERS if "--lora-rank" in extra else async_loop.FULL] * 8
    rows = metrics(out)
    assert all(sum(r[f"staleness_{k}"] for k in range(K + 1)) == 1.0 for r in rows)
    assert all(0 < r["is_ess"] <= 1 and 0 <= r["is_clip_frac"] <= 1 for r in rows)


def test_streaming_admits_the_next_batch_while_one_decodes(tmp_path):
    """K = 1 with room for two batches' rows (--rollout-slots 64): batch j + 1's groups take slots while batch j's
    rows decode (stream_overlap_steps: the decode steps that held rows of both, logged per step), every group's
    version stays within K, and the prompts trained are the per-batch run's, step for step (the same stream)."""
    flags = ["--steps", "4", "--rollout-ranks", "1", "--max-staleness", "1", "--max-new-tokens", "12"]
    out, ref = str(tmp_path / "o"), str(tmp_path / "ref")
    res = torchrun(2, out, *flags, "--rollout-slots", "64")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rollout ranks: streaming (continuous batching in 64 slots" in res.stderr
    rows = metrics(out)
    assert rows[0]["stream_overlap_steps"] > 0 and sum(r["stream_overlap_steps"] for r in rows) >= 4
    took = [e for e in events(os.path.join(out, "probe"), "train") if e["event"] == "take"]
    assert all(0 <= e["step"] - v <= 1 for e in took for v in e["versions"])
    # batches 0 and 1 were admitted at once, yet each share's resume point is the stream just after its own prompts
    assert [e["position"] for e in took] == [4 * (e["step"] + 1) for e in took]
    assert torchrun(2, ref, *flags, "--algo", "remax").returncode == 0  # per batch
    want = {e["step"]: list(dict.fromkeys(e["ids"])) for e in events(os.path.join(ref, "probe"), "train")
            if e["event"] == "take"}  # ReMax samples one row per prompt
    assert {e["step"]: list(dict.fromkeys(e["ids"])) for e in took} == want


@pytest.mark.slow
@pytest.mark.parametrize("victim", [pytest.param(0, marks=pytest.mark.long), 1], ids=["trainer", "rollout"])
def test_kill_9_then_resume_skips_no_prompt(tmp_path, victim):
    """K = 2, checkpoints every 2 steps; one side is killed (kill -9) after step 3 with batches in flight. The
    rollout rank streams with slots for three batches' rows: it admits batches 0-2 at once, so when it pushes
    batch 0 its prompt stream is past batch 2, and each share's position (what a checkpoint keeps) must be the
    one just after its own batch. The resumed job trains exactly the straight run's prompts, step for step:
    none lost, none twice."""
    flags = ["--steps", "6", "--save-every", "2", "--rollout-ranks", "1", "--max-staleness", "2", "--rollout-slots", "96"]
    straight = str(tmp_path / "straight")
    assert torchrun(2, straight, *flags).returncode == 0
    out, probe = str(tmp_path / "killed"), str(tmp_path / "probe")
    p = torchrun(2, out, *flags, probe=probe, delay=0.5, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and len([e for e in _safe_events(probe, "train") if e["event"] == "take"]) < 4:
        time.sleep(0.05)
    ranks = sorted(int(x) for x in subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split())
    os.kill(ranks[victim], signal.SIGKILL)  # torchrun's children in start order: rank 0 trains, rank 1 samples
    p.communicate(timeout=300)
    n_before = len(events(probe, "train"))
    res = torchrun(2, out, *flags, "--resume", probe=probe)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rollout ranks: streaming" in res.stderr
    resumed = [e for e in events(probe, "train")[n_before:] if e["event"] == "take"]
    first = resumed[0]["step"]
    assert first in (2, 4)  # the last checkpoint
    took = [e for e in events(os.path.join(straight, "probe"), "train") if e["event"] == "take"]
    assert [e["position"] for e in took] == [4 * (e["step"] + 1) for e in took]  # not the stream's, ahead
    expect = {e["step"]: e["ids"] for e in took}
    assert [e["step"] for e in resumed] == list(range(first, 6))
    assert all(e["ids"] == expect[e["step"]] for e in resumed)
    assert [r["step"] for r in metrics(out)] == list(range(1, 7))


@pytest.mark.long
def test_two_nodes_on_one_machine(tmp_path):
    """Multi-node is the same command with torchrun's rendezvous: two 'nodes' of one rank each, K = 0, equal
    the one-process synchronous run."""
    sync = run(tmp_path, "--steps", "2", name="sync")
    out, port = str(tmp_path / "nodes"), next(PORTS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=nanorl-test", PROBE, *FAST, "--out", out, "--steps", "2",
           "--rollout-ranks", "1", "--max-staleness", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", NANORL_PROBE=os.path.join(out, "probe"))
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    a, b = weights(sync), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _safe_events(probe, role):
    try:
        return events(probe, role)
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_a_failing_rollout_rank_ends_the_job(tmp_path):
    t0 = time.time()
    res = torchrun(2, str(tmp_path / "o"), "--steps", "6", "--rollout-ranks", "1", "--dist-timeout", "60", fail=3)
    assert res.returncode != 0
    assert time.time() - t0 < 120
    assert "the rollout rank failed on purpose" in res.stderr and "rank      : 1" in res.stderr


@pytest.mark.parametrize("args,words", [
    (["--rollout-ranks", "1"], ["--rollout-ranks 1", "no trainer", "nproc_per_node"]),
    (["--max-staleness", "1"], ["--max-staleness", "--rollout-ranks"]),
    (["--rollout-ranks", "-1"], ["--rollout-ranks -1"]),
    (["--rollout-ranks", "1", "--algo", "sft"], ["--rollout-ranks", "sft"]),
    (["--rollout-slots", "8"], ["--rollout-slots 8", "--rollout-ranks"]),
    (["--rollout-ranks", "1", "--rollout-slots", "0"], ["--rollout-slots 0", "S >= 1"]),
])
def test_bad_async_flags_are_one_line(tmp_path, args, words):
    res = cli(*FAST, "--out", str(tmp_path / "o"), "--steps", "1", *args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), res.stderr
    assert not (tmp_path / "o").exists()


def test_merge_slices_groups_and_counts_each_share_once():
    """Two rollout shares of 2 groups (G = 2) for 2 trainers: trainer t gets groups 2t, 2t + 1 and share t's counters."""
    def share(r):
        rows = list(range(4 * r, 4 * r + 4))
        return dict(prompts=rows, comps=rows, masks=rows, ex=rows, episodes=rows, steps=rows, sampler_logp=rows,
                    R=torch.tensor(rows, dtype=torch.float), truncated=torch.zeros(4, dtype=torch.bool),
                    valid=torch.ones(4, dtype=torch.bool), rewards=torch.full((6,), float(r)),
                    correct=torch.zeros(6), stats={"gen_batches": r + 1, "groups_kept": 2, "score_s": 0.5})
    shares = [share(0), share(1)]
    for t in range(2):
        b = async_loop.merge(shares, t, 2)
        assert b["comps"] == b["steps"] == list(range(4 * t, 4 * t + 4)) and b["R"].tolist() == list(range(4 * t, 4 * t + 4))
        assert b["rewards"].tolist() == [float(t)] * 6 and b["stats"] == {"gen_batches": t + 1, "groups_kept": 2,
                                                                          "score_s": 0.5}
    one = async_loop.merge(shares, 0, 1)
    assert one["comps"] == list(range(8)) and len(one["rewards"]) == 12 and one["stats"]["groups_kept"] == 4


def test_flat_buffers_round_trip_and_checksum():
    named = [("a", torch.randn(3, 5)), ("b", torch.randn(7).to(torch.bfloat16)), ("c", torch.randn(2, 2))]
    flat = async_loop.Flat(named)
    bufs = flat.pack(named, torch.device("cpu"))
    assert sorted(bufs, key=str) == [torch.bfloat16, torch.float32]
    views = flat.views(bufs)
    assert all(torch.equal(views[n], t) for n, t in named)
    assert all(off % async_loop.Flat.ALIGN == 0 for _, _, off, _ in flat.slots)
    c = async_loop.checksum(bufs)
    bufs[torch.float32][0] += 1e-6  # a single flipped bit's worth changes it
    assert async_loop.checksum(bufs) != c


def test_sigterm_to_torchrun_checkpoints_and_both_sides_exit(tmp_path):
    """torchrun forwards SIGTERM: the trainer finishes its step and checkpoints, the rollout rank takes the last
    weights and exits, well inside torchrun's 30 s grace (no SIGKILL); --resume continues."""
    from nanorl.checkpoint import latest_state, load_state

    out = str(tmp_path / "o")
    p = torchrun(2, out, "--steps", "300", "--save-every", "100", "--rollout-ranks", "1", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and (not os.path.isfile(os.path.join(out, "metrics.jsonl")) or len(metrics(out)) < 2):
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert "stopped by signal 15" in err and "forcefully" not in err, err[-3000:]
    done = len(metrics(out))
    assert load_state(latest_state(out))[2]["step"] == done
    res = torchrun(2, out, "--steps", str(done + 1), "--rollout-ranks", "1", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["step"] for r in metrics(out)] == list(range(1, done + 2))


def test_weights_land_in_place_and_decode_graphs_stay_valid():
    """The rollout side's sampler parameters are views into the receive buffers: writing a new version there
    changes what the sampler computes (equal to a fresh model with those weights) without moving any storage,
    so DecodeGraphs (CUDA graphs on a GPU; the same static steps run eagerly here) keeps its captured steps."""
    from types import SimpleNamespace

    from nanorl.model import load_model
    from nanorl.sampler import DecodeGraphs, generate

    model, new = load_model("tiny"), load_model("tiny", seed=1)
    w = async_loop.Weights(None, model, SimpleNamespace(lora_rank=0), torch.device("cpu"))
    kw = dict(n=2, max_new_tokens=8, seed=3, cuda_graph=True)
    generate(w.sampler, [[5, 6, 7]], **kw)
    graphs, ptrs = DecodeGraphs.of(w.sampler), [p.data_ptr() for p in w.sampler.parameters()]
    views = async_loop.Flat(w.sampler.named_parameters()).views(w.bufs[async_loop.FULL])
    new_params = dict(new.named_parameters())
    for name, v in views.items():  # what receive() does: the broadcast writes the buffers
        v.copy_(new_params[name].detach())
    assert [p.data_ptr() for p in w.sampler.parameters()] == ptrs and DecodeGraphs.of(w.sampler) is graphs
    got = generate(w.sampler, [[5, 6, 7]], **kw)
    want = generate(new, [[5, 6, 7]], **kw)
    assert [c.tokens for c in got] == [c.tokens for c in want]
    assert [c.logprobs for c in got] == [c.logprobs for c in want]


def test_importance_weight_metrics_by_hand():
    """rho = pi_old / mu = [1, 2, 0.25] at threshold 1.5: one token of three truncated, the moments of rho, the ESS."""
    from nanorl import algos

    cfg = algos.make_config("grpo", is_level="token", is_threshold=1.5, kl_coef=0.0)
    logp = torch.zeros(1, 3, requires_grad=True)
    mu = torch.log(torch.tensor([[1.0, 0.5, 4.0]]))
    _, m = algos.loss(logp, None, torch.ones(1), torch.ones(1, 3), cfg, rollout_logp=mu)
    assert float(m["is_clip_frac"]) == pytest.approx(1 / 3)
    assert float(m["is_rho_mean"]) == pytest.approx((1 + 2 + 0.25) / 3)
    assert float(m["is_rho2_mean"]) == pytest.approx((1 + 4 + 0.0625) / 3)
    assert float(m["token_weight"]) == pytest.approx((1 + 1.5 + 0.25) / 3)  # truncated at 1.5
