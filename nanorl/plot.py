"""reward.png of a run directory: what the policy learned (top) and how its answers changed (bottom).

    python -m nanorl.plot OUT          # redraw OUT/reward.png from OUT/metrics.jsonl and OUT/summary.json

Top: held-out greedy accuracy from step 0 (summary.json's acc_before) through the --eval-every points to
the last step (acc_after); the per-step train reward, faint, with its trailing moving average (a 0/1
reward over a few dozen samples is mostly noise step to step); train accuracy only where it differs from
the reward (with a 0/1 reward the two are the same line). Bottom: mean response length in tokens, and
the tool-call rate when the metrics have one (`tool_call_rate`, else `tool_calls`). Needs matplotlib (the [plot] extra); without it
nothing is drawn.
"""

import json
import os
import sys

from nanorl.checkpoint import atomic_file


def moving_average(xs, window):
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, x in enumerate(xs):
        total += x - (xs[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def held_out_curve(rows, summary):
    """[(step, held-out accuracy)]: step 0 (acc_before), the --eval-every points, the last step (acc_after)."""
    held = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    if summary.get("acc_before") is not None:
        held.insert(0, (0, summary["acc_before"]))
    if summary.get("acc_after") is not None:
        held.append((summary.get("steps", rows[-1]["step"] if rows else 0), summary["acc_after"]))
    return held


def plot(out):
    """Draw OUT/reward.png; returns its path, or None without matplotlib or metrics."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "reward_mean" in r]
    if not rows:
        return None
    summary = {}
    if os.path.isfile(os.path.join(out, "summary.json")):
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))

    held = held_out_curve(rows, summary)
    if held:
        top.plot(*zip(*held), "o-", color="C0", label="held-out greedy accuracy")
    reward = [r["reward_mean"] for r in rows]
    window = max(2, min(25, len(rows) // 10))
    top.plot(steps, reward, color="C1", alpha=0.25, lw=1)
    top.plot(steps, moving_average(reward, window), color="C1", label=f"train reward (mean of last {window} steps)")
    acc = [r.get("accuracy") for r in rows]
    if any(a is not None and a != r for a, r in zip(acc, reward)):
        top.plot(steps, moving_average([a or 0.0 for a in acc], window), color="C2", ls="--",
                 label=f"train accuracy (mean of last {window} steps)")
    top.set_ylabel("accuracy / reward")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)

    bottom.plot(steps, [r.get("response_len", 0.0) for r in rows], color="C3", label="response length (tokens)")
    bottom.set_ylabel("tokens")
    bottom.set_xlabel("RL step")
    bottom.grid(alpha=0.3)
    handles = bottom.get_legend_handles_labels()
    tool = next((k for k in ("tool_call_rate", "tool_calls") if any(k in r for r in rows)), None)
    if tool:  # multi-turn runs with tools (nanorl/rollout.py): the fraction of episodes that called one
        twin = bottom.twinx()
        twin.plot(steps, [r.get(tool, 0.0) for r in rows], color="C4",
                  label="tool-call rate (episodes calling a tool)" if tool == "tool_call_rate" else "tool calls")
        twin.set_ylabel(tool.replace("_", " "))
        if tool == "tool_call_rate":
            twin.set_ylim(-0.02, 1.02)
        h2 = twin.get_legend_handles_labels()
        handles = (handles[0] + h2[0], handles[1] + h2[1])
    bottom.legend(*handles, fontsize=8)
    title = " | ".join(str(summary[k]) for k in ("model", "task", "algo") if summary.get(k))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png = os.path.join(out, "reward.png")
    with atomic_file(png, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return png


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m nanorl.plot OUT")
    print(plot(sys.argv[1]) or "nothing drawn (no matplotlib, or no RL metrics in OUT/metrics.jsonl)")
