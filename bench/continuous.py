"""Continuous batching vs the static batch: tokens/s on prompts whose answer lengths vary 10x (issue 26).

    python bench/continuous.py                              # tiny model, 64 prompts x 4 samples, 32 slots
    python bench/continuous.py --model smollm2-135m --prompts 16 --samples 4 --slots 16 --short 8 --long 80
    python bench/continuous.py --rank 1 --prompts 8 --samples 4 --batches 8 --long 120   # a rollout rank (below)

Each prompt's answer budget is --short or --long tokens (every 4th prompt long, so every static batch holds
long answers), and no stop token ends a row early, so both sides do the same work (the same seeds give
the same tokens, up to rounding that depends on which rows share a step: a real model's rows may differ).
Static: the rows go in batches of --slots (whole prompts); a batch runs until its longest row is done, its
finished rows dropped as they finish (compaction, as sampler.generate does). Continuous
(nanorl/continuous.py): one pool of --slots rows, a finished row's slot taken by the next row at once.
Both run through generate_continuous (static: one call per batch), so only the scheduling differs; they
alternate --repeats times and the best of each is reported, with the work done (rows decoded over steps).

--rank K: a rollout rank of asynchronous RL (nanorl/async_loop.py) over --batches batches of --prompts x
--samples rows, with fixed weights (the trainers keep up, so batch j may start once batch j - K - 1 is done).
Per batch: sampler.generate on one batch after another (rollout.rollout, the K = 0 path); streaming: one
Engine of --slots slots (default a batch's rows) fed group by group, at most K + 1 batches in flight, as the
streaming rollout rank does. Answers end at any of --stop-tokens stop tokens (a random model: geometric
lengths, capped at --long), so lengths vary as an RL batch's do; the same seeds draw the same rows.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanorl.continuous import Engine, generate_continuous  # noqa: E402
from nanorl.model import load_model  # noqa: E402
from nanorl.sampler import generate  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--slots", type=int, default=None, help="default 32; with --rank: a batch's rows")
    p.add_argument("--short", type=int, default=12)
    p.add_argument("--long", type=int, default=120)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rank", type=int, default=None, metavar="K", help="a rollout rank, per batch vs streaming at K")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--stop-tokens", type=int, default=2)
    a = p.parse_args()
    if a.rank is not None:
        torch.manual_seed(0)
        return rank(a, load_model(a.model))
    a.slots = a.slots or 32
    if a.slots % a.samples:
        sys.exit("--slots must be a multiple of --samples (a static batch holds whole prompts)")
    torch.manual_seed(0)
    model = load_model(a.model)
    V = model.cfg.vocab_size
    prompts = [torch.randint(3, V, (a.prompt_len,)).tolist() for _ in range(a.prompts)]
    budgets = [a.long if i % 4 == 3 else a.short for i in range(a.prompts)]
    seeds = list(range(a.prompts))
    per = a.slots // a.samples

    def static():
        st, out = {}, []
        for k in range(0, a.prompts, per):
            out += generate_continuous(model, prompts[k:k + per], a.samples, budgets[k:k + per], seed=seeds[k:k + per],
                                       slots=a.slots, stats=st)
        return out, st

    def continuous():
        st = {}
        return generate_continuous(model, prompts, a.samples, budgets, seed=seeds, slots=a.slots, stats=st), st

    best = {}
    for _ in range(a.repeats):
        for name, fn in (("static batch", static), ("continuous batching", continuous)):
            t0 = time.perf_counter()
            out, st = fn()
            dt = time.perf_counter() - t0
            if name not in best or dt < best[name][0]:
                best[name] = (dt, st, [c.tokens for c in out])
    rows_s, rows_c = best["static batch"][2], best["continuous batching"][2]
    assert [len(r) for r in rows_s] == [len(r) for r in rows_c], "the two sides produced different amounts of work"
    same = sum(x == y for x, y in zip(rows_s, rows_c)) / len(rows_s)
    tokens = best["static batch"][1]["tokens"]
    print(f"{a.model}: {a.prompts} prompts x {a.samples} samples, answers of {a.short} or {a.long} tokens, "
          f"{a.slots} slots, {tokens} tokens, best of {a.repeats}, torch threads {torch.get_num_threads()}; "
          f"identical rows {same:.0%} (same seeds: rows differ only where batch-dependent rounding flips a token)")
    print("| side | seconds | tokens/s | decode steps | rows decoded per step |")
    print("|---|---|---|---|---|")
    base = best["static batch"][0]
    for name, (dt, st, _) in best.items():
        print(f"| {name} | {dt:.2f} | {tokens / dt:.0f} ({base / dt:.2f}x) | {st['decode_steps']} | "
              f"{st['decode_rows'] / st['decode_steps']:.1f} |")


def rank(a, model):
    """--rank K: a rollout rank's sampling, batch after batch, per batch (sampler.generate, as rollout.rollout)
    vs streaming (one Engine fed group by group, at most K + 1 batches in flight: async_loop.Streamer when the
    trainers keep up). Answer lengths come from stop tokens (geometric, capped at --long), as in RL."""
    V, P, G, K = model.cfg.vocab_size, a.prompts, a.samples, a.rank
    gen = torch.Generator().manual_seed(1)
    batches = [[torch.randint(3, V, (a.prompt_len,), generator=gen).tolist() for _ in range(P)]
               for _ in range(a.batches)]
    seeds = [[1000 * j + g for g in range(P)] for j in range(a.batches)]
    stop = list(range(3, 3 + a.stop_tokens))

    def per_batch():
        st, out = {}, []
        for j in range(a.batches):
            out += generate(model, batches[j], n=G, max_new_tokens=a.long, stop_ids=stop, seed=seeds[j], stats=st)
        return out, st

    def streaming():
        st, out, left, admitted, pushed = {}, {}, {}, 0, 0
        with Engine(model, a.slots or P * G, stop_ids=stop, room=a.prompt_len + a.long, stats=st) as eng:
            while pushed < a.batches:
                while admitted < min(a.batches, pushed + K + 1):  # version >= j - K, the trainers one step behind
                    for g, p in enumerate(batches[admitted]):
                        eng.submit(p, G, a.long, seeds[admitted][g], tag=(admitted, g))
                    left[admitted], admitted = P * G, admitted + 1
                for (j, g), k, c in eng.step():
                    out[j, g, k] = c
                    left[j] -= 1
                while pushed < a.batches and left.get(pushed) == 0:
                    pushed += 1
        return [out[j, g, k] for j in range(a.batches) for g in range(P) for k in range(G)], st

    best = {}
    for _ in range(a.repeats):
        for name, fn in (("per batch", per_batch), (f"streaming, K = {K}", streaming)):
            t0 = time.perf_counter()
            out, st = fn()
            dt = time.perf_counter() - t0
            if name not in best or dt < best[name][0]:
                best[name] = (dt, st, out)
    (t_b, _, out_b), (_, _, out_s) = best.values()
    lens = sorted(len(c.tokens) for c in out_b)
    q = lambda f: lens[int(f * (len(lens) - 1))]  # noqa: E731
    same = sum(x.tokens == y.tokens for x, y in zip(out_b, out_s)) / len(out_b)
    print(f"{a.model}: a rollout rank's {a.batches} batches of {P} prompts x {G} samples, {a.slots or P * G} slots, "
          f"answers up to {a.long} tokens ended by {a.stop_tokens} stop tokens: lengths p10 {q(0.1)}, median "
          f"{q(0.5)}, p90 {q(0.9)}, max {lens[-1]}; best of {a.repeats}, torch threads {torch.get_num_threads()}; "
          f"identical rows {same:.0%}")
    print("| side | seconds | tokens | tokens/s | decode steps | rows decoded per step |")
    print("|---|---|---|---|---|---|")
    base = sum(lens) / t_b
    for name, (dt, st, out) in best.items():
        tokens = sum(len(c.tokens) for c in out)
        print(f"| {name} | {dt:.2f} | {tokens} | {tokens / dt:.0f} ({tokens / dt / base:.2f}x) | "
              f"{st['decode_steps']} | {st['decode_rows'] / st['decode_steps']:.1f} |")


if __name__ == "__main__":
    main()
