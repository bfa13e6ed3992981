"""Training throughput: model FLOPs utilisation of one RL train step, and tokens/s of rollout and of training.

    python bench/mfu.py --device cuda                  # Qwen2-0.5B-shaped, random weights, bf16 autocast
    python bench/mfu.py --device cpu --preset smollm2-135m --prompts 4 --prompt-len 150 --completion 64 --steps 2

One train step is what train.py does per micro-batch and optimizer step: the packed groups (policy.collate,
each prompt once, then its G completions) through Policy (transformer + fused LM-head log-probs), a
token-mean policy-gradient loss, backward, gradient clipping and a fused AdamW step. Rollout is nanorl's
`generate` of the same prompts and group size, on the bf16 sampler copy train.py makes on CUDA (CUDA-graph
decode), with no stop token so every completion has --completion tokens.

MFU counts the model's FLOPs (PaLM, Chowdhery et al. 2204.02311, appendix B), not the hardware's: 6 FLOPs
per matmul weight per token for forward + backward (the LM head only on completion tokens), plus attention,
12 x heads x head_dim per attended (query, key) pair, counting only the pairs the packed layout attends (a
prompt causally, each completion to its prompt and itself). The LM-head kernel's logits recompute is not
counted. Peak: bf16 dense tensor-core rate of the GPU (H100 / H200 SXM: 989 TFLOP/s), or --peak-tflops; on CPU
the fp32 rate of one large GEMM measured here, so CPU MFU reads as "fraction of this CPU's GEMM rate".
"""

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanorl.model import ModelConfig, Transformer  # noqa: E402
from nanorl.policy import Policy, autocast, collate  # noqa: E402
from nanorl.sampler import generate  # noqa: E402
from shapes import PRESETS  # noqa: E402  (bench/shapes.py: real models' shapes)

GPU_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4}  # bf16 dense, SXM


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_flops(device, given):
    if given:
        return given * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tf * 1e12
        sys.exit(f"unknown GPU {name!r}: pass its bf16 dense peak with --peak-tflops")
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048 ** 3 / (time.perf_counter() - t0)


def model_flops(cfg, prompt_len, comp_lens):
    """Forward + backward FLOPs of one packed group: matmul weights, LM head, attended pairs."""
    d, hd = cfg.hidden_size, cfg.head_dim
    per_layer = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * cfg.intermediate_size
    tokens = prompt_len + sum(n - 1 for n in comp_lens)  # packed: the prompt once, each completion's inputs
    pairs = prompt_len * (prompt_len + 1) // 2 + sum((n - 1) * prompt_len + (n - 1) * n // 2 for n in comp_lens)
    return (6 * cfg.n_layers * per_layer * tokens + 6 * cfg.vocab_size * d * sum(comp_lens)
            + 12 * cfg.n_heads * hd * cfg.n_layers * pairs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="qwen2-0.5b", choices=sorted(PRESETS))
    p.add_argument("--prompts", type=int, default=8, help="prompts per micro-batch (each one packed row)")
    p.add_argument("--samples", type=int, default=8, help="group size")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--completion", type=int, default=256, help="tokens per completion")
    p.add_argument("--steps", type=int, default=5, help="timed train steps after one warm-up step")
    p.add_argument("--peak-tflops", type=float, default=None)
    a = p.parse_args()
    device = torch.device(a.device)
    cfg = ModelConfig(**PRESETS[a.preset], max_seq_len=a.prompt_len + a.completion)
    torch.manual_seed(0)
    model = Transformer(cfg).init_weights().to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{a.preset}: {n_params / 1e6:.0f}M params, {a.prompts} prompts x {a.samples} samples, prompt {a.prompt_len} + "
          f"completion {a.completion} tokens, {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))

    prompts = torch.randint(0, cfg.vocab_size, (a.prompts, a.prompt_len)).tolist()
    # rollout, on the sampler copy train.py uses (bf16 on CUDA); the first call captures the CUDA graphs
    sampler = model if device.type == "cpu" else copy.deepcopy(model).to(torch.bfloat16)
    generate(sampler, prompts, n=a.samples, max_new_tokens=8, seed=0)
    sync(device)
    t0 = time.perf_counter()
    res = generate(sampler, prompts, n=a.samples, max_new_tokens=a.completion, seed=1)
    sync(device)
    t_roll = time.perf_counter() - t0
    n_roll = sum(len(c.tokens) for c in res)
    print(f"rollout: {n_roll} tokens in {t_roll:.2f} s = {n_roll / t_roll:.0f} tokens/s")
    del sampler

    comps = [c.tokens for c in res]
    rows = [p for p in prompts for _ in range(a.samples)]
    inp = collate(rows, comps, 0, device, a.samples)
    policy = Policy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda" or None)
    adv = torch.randn(len(comps), 1, device=device)

    def step():
        with autocast(device):
            logp, _, _ = policy(inp)
        loss = -(logp * adv * inp["mask"]).sum() / inp["mask"].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync(device)
    t_step = (time.perf_counter() - t0) / a.steps
    flops = sum(model_flops(cfg, a.prompt_len, [len(c) for c in comps[r * a.samples:(r + 1) * a.samples]])
                for r in range(a.prompts))
    n_train = inp["ids"].numel()
    peak = peak_flops(device, a.peak_tflops)
    print(f"train: {t_step:.3f} s/step, {n_train} packed tokens = {n_train / t_step:.0f} tokens/s "
          f"({int(inp['mask'].sum())} completion tokens), {flops / 1e9:.1f} GFLOP/step")
    print(f"MFU: {flops / t_step / 1e9:.0f} GFLOP/s of {peak / 1e9:.0f} peak = {100 * flops / t_step / peak:.1f}%"
          + (" (CPU: peak = this CPU's measured fp32 GEMM rate)" if device.type == "cpu" else ""))
    if device.type == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
