"""nanorl's sampler vs transformers `generate`, same weights and settings, alternating in one run.

    python bench/sampler.py                       # CPU: SmolLM2-135M fp32, 8 prompts x 4 samples x 128 tokens
    python bench/sampler.py --device cuda --prompts 64 --samples 8 --max-new-tokens 512   # GPU, bf16
    python bench/sampler.py --device cuda --roofline                                      # + batch-1 bandwidth
    python bench/sampler.py --device cuda --model random:qwen2.5-0.5b   # a real shape, random weights (bench/shapes.py)
    python bench/sampler.py --sweep                # CPU: one decode step per batch size, F.linear vs nanorl.linear

Both sides sample at temperature 1 from the full vocabulary and stop at the tokenizer's end-of-turn ids.
Throughput counts useful tokens: each completion's tokens up to and including its stop token. The
transformers model is loaded from the HF directory that nanorl writes from the same GGUF weights.
The roofline check times batch-1 greedy decode and divides the weight bytes read per token by the
GPU's peak memory bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanorl.model import load_model  # noqa: E402
from nanorl.sampler import generate  # noqa: E402
from nanorl.tokenizer import load_tokenizer  # noqa: E402
from shapes import resolve  # noqa: E402

QUESTIONS = ["What is 12 + 30?", "Name three primary colors.", "Write a haiku about rain.", "What is the capital of Italy?",
             "Explain photosynthesis in one sentence.", "Give me a synonym for happy.", "How many legs does a spider have?",
             "What is 7 times 8?"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_nanorl(model, prompts, args, eos, seed):
    res = generate(model, prompts, n=args.samples, max_new_tokens=args.max_new_tokens, temperature=1.0,
                   stop_ids=eos, seed=seed)
    return sum(len(c.tokens) for c in res)


def run_hf(model, prompts, args, eos, seed, pad):
    L = max(map(len, prompts))
    ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    torch.manual_seed(seed)
    out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         num_return_sequences=args.samples, max_new_tokens=args.max_new_tokens,
                         eos_token_id=eos, pad_token_id=pad)[:, L:]
    total = 0
    for row in out.tolist():
        stop = [i for i, t in enumerate(row) if t in eos]
        total += stop[0] + 1 if stop else len(row)
    return total


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    n = fn()
    sync(device)
    return n, time.perf_counter() - t0


def roofline(model, tok, device, peak_gbs):
    prompt = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], tokenize=True)]
    generate(model, prompt, max_new_tokens=16, temperature=0)  # warm up (graph capture)
    stats = {}
    n, dt = timed(lambda: generate(model, prompt, max_new_tokens=256, temperature=0, stats=stats) and stats["decode_steps"], device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gbs = weight_bytes * n / dt / 1e9
    print(f"batch-1 decode: {n / dt:.0f} tokens/s, {gbs:.0f} GB/s of weights = {100 * gbs / peak_gbs:.0f}% of {peak_gbs} GB/s")


def sweep(model, device, sizes=range(1, 33), reps=3):
    """Time one decode step (after a 150-token prefill) per batch size with plain F.linear, with nanorl.linear's
    (W x^T)^T layout, and with nanorl.linear on oneDNN-packed weights (what generate uses above 4 rows),
    interleaved; prints the min over reps of the mean of 8 steps: the before/after of both (bench/RESULTS.md)."""
    import torch.nn.functional as F

    import nanorl.linear as L

    ours = L.linear

    def use(fn):  # Linear layers and the LM head (linear.logits) both call nanorl.linear's `linear`
        L.linear = fn

    variants = {"F.linear": (F.linear, ()), "(W x^T)^T": (ours, ()), "packed": (ours, model.matmul_weights())}

    def step_ms(B, fn, weights):
        use(fn)
        with L.packed_cpu_weights(weights):
            cache = model.new_cache(B, 200)
            model(torch.randint(0, 1000, (B, 150), device=device), kv_cache=cache)
            tok = torch.randint(0, 1000, (B, 1), device=device)
            for _ in range(2):
                model(tok, kv_cache=cache)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(8):
                model(tok, kv_cache=cache)
            sync(device)
        return (time.perf_counter() - t0) / 8 * 1e3

    try:
        with torch.inference_mode():
            for B in sizes:
                r = {k: [] for k in variants}
                for _ in range(reps):
                    for k, v in variants.items():
                        r[k].append(step_ms(B, *v))
                print(f"batch {B}: " + ", ".join(f"{k} {min(ms):.0f} ms" for k, ms in r.items()), flush=True)
    finally:
        use(ours)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m", help="alias, path, or random:NAME (bench/shapes.py)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--roofline", action="store_true")
    p.add_argument("--peak-gbs", type=float, default=3350.0)
    p.add_argument("--sweep", action="store_true", help="only the per-batch-size decode-step timing")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = resolve(args.model, tempfile.mkdtemp(prefix="nanorl-bench-"))  # random:NAME, as on the GPU machine
    tok = load_tokenizer(path)
    ours = load_model(path, dtype=dtype, device=device)
    if args.sweep:
        return sweep(ours, device)
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], tokenize=True)
               for i in range(args.prompts)]
    eos = tok.eos_ids
    print(f"{args.model} {dtype} on {device}: {args.prompts} prompts x {args.samples} samples x {args.max_new_tokens} "
          f"new tokens, torch {torch.__version__}, {torch.get_num_threads()} threads")
    run_nanorl(ours, prompts[:2], args, eos, 0)  # warm-up both (graph capture, allocator)
    run_hf(hf, prompts[:2], args, eos, 0, tok.pad_id)
    ours_tps, hf_tps = [], []
    for r in range(args.rounds):
        with torch.inference_mode():
            n, dt = timed(lambda: run_nanorl(ours, prompts, args, eos, r), device)
            ours_tps.append(n / dt)
            n2, dt2 = timed(lambda: run_hf(hf, prompts, args, eos, r, tok.pad_id), device)
            hf_tps.append(n2 / dt2)
        print(f"round {r}: nanorl {n} tokens in {dt:.2f}s = {n / dt:.1f} tok/s | "
              f"transformers {n2} tokens in {dt2:.2f}s = {n2 / dt2:.1f} tok/s | ratio {n / dt / (n2 / dt2):.2f}x")
    ratios = [a / b for a, b in zip(ours_tps, hf_tps)]
    print(f"median: nanorl {statistics.median(ours_tps):.1f} tok/s, transformers {statistics.median(hf_tps):.1f} tok/s, "
          f"ratio {statistics.median(ratios):.2f}x")
    if args.roofline:
        roofline(ours, tok, device, args.peak_gbs)


if __name__ == "__main__":
    main()
