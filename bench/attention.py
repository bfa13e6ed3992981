"""Training attention on packed GRPO groups: PrefixGroups' split form vs one dense masked SDPA, side by side.

    python bench/attention.py                 # SmolLM2-135M's attention shapes, 4 prompts x 8 samples (bench/step.py)
    python bench/attention.py --samples 4
    python bench/attention.py --device cuda   # fp32 on the GPU (its kernels, the training backend pin)

Both compute the same attention (checked here): each row is a 150-token prompt followed by its G completions
(40..67 tokens); prompt tokens attend causally among themselves, each completion to its prompt and causally
to itself. "dense" is one scaled_dot_product_attention over the whole [L, L] packed row under that mask (nanorl
before 2026-11-24); "split" is policy.PrefixGroups.attend. Times: forward and forward+backward of one layer
(9 query heads, 3 kv heads, head_dim 64, fp32), min of --reps after a warm-up, the two alternating.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanorl.model import training_attention  # noqa: E402
from nanorl.policy import collate  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=150)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    dev = torch.device(a.device)
    G, g = a.samples, torch.Generator().manual_seed(0)
    prompts, comps = [], []
    for _ in range(a.prompts):
        for i in range(G):
            prompts.append(list(range(a.prompt_len)))
            comps.append(list(range(40 + (28 * i) // G)))
    groups = collate(prompts, comps, 0, dev, G)["groups"]
    R, L = a.prompts, a.prompt_len + sum(len(c) - 1 for c in comps[:G])
    seg = torch.full((R, L), -2)  # -1: prompt, i: completion i, -2: padding
    for r in range(R):
        seg[r, :a.prompt_len], off = -1, a.prompt_len
        for i, c in enumerate(comps[r * G:(r + 1) * G]):
            seg[r, off:off + len(c) - 1], off = i, off + len(c) - 1
    k = torch.arange(L)
    dense = ((k[None, :] <= k[:, None])[None] & ((seg[:, None, :] == -1) | (seg[:, None, :] == seg[:, :, None])))[:, None]
    dense = dense.to(dev)
    q = torch.randn(R, 9, L, 64, generator=g).to(dev).requires_grad_()
    kv = [torch.randn(R, 3, L, 64, generator=g).to(dev).requires_grad_() for _ in range(2)]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def under_pin(f):  # the SDPA backends train.py's forward runs under (nanorl.model.training_attention)
        def run():
            with training_attention(q):
                return f()
        return run
    fns = {"dense": under_pin(lambda: F.scaled_dot_product_attention(q, *kv, attn_mask=dense, enable_gqa=True)),
           "split": under_pin(lambda: groups.attend(q, *kv))}
    real = (seg.flatten() != -2).to(dev)  # padding rows differ (zeros vs attention over the prompt): not compared
    y = {n: f().transpose(1, 2).flatten(0, 1)[real] for n, f in fns.items()}
    print(f"{R} rows x {L} tokens ({G} completions after a {a.prompt_len}-token prompt), "
          f"max |dense - split| = {(y['dense'] - y['split']).abs().max():.1e}")
    times = {n: {"fwd": [], "fwd+bwd": []} for n in fns}
    for rep in range(a.reps + 1):
        for n in (fns if rep % 2 else reversed(list(fns))):
            sync()
            t0 = time.perf_counter()
            out = fns[n]()
            sync()
            t1 = time.perf_counter()
            out.backward(torch.ones_like(out))
            sync()
            t2 = time.perf_counter()
            if rep:  # the first round is a warm-up
                times[n]["fwd"].append(t1 - t0)
                times[n]["fwd+bwd"].append(t2 - t0)
    for n, t in times.items():
        print(f"{n:5s}: fwd {1e3 * min(t['fwd']):.1f} ms, fwd+bwd {1e3 * min(t['fwd+bwd']):.1f} ms")
    print(f"split is {min(times['dense']['fwd+bwd']) / min(times['split']['fwd+bwd']):.2f}x faster (fwd+bwd)")


if __name__ == "__main__":
    main()
