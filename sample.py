"""Generate from any checkpoint, streaming the first sample; report tokens/s (and GPU memory bandwidth).

    python sample.py --model smollm2-135m --prompt "What is 12 + 30?" --chat -n 4 --max-new-tokens 64

Achieved bandwidth is reported as gpt-fast does: the bytes of weights read per decode step times
decode steps per second (the KV cache reads are left out, so it is a lower bound).
"""

import argparse
import sys
import time

import torch

from nanorl import UserError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to load
    p.add_argument("--model", default="tiny", help="HF directory, .gguf file, 'tiny' or 'smollm2-135m'")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on cuda, float32 on cpu)")
    # what to generate
    p.add_argument("--prompt", default=None, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    # sampling
    p.add_argument("-n", "--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load(args):
    from nanorl.model import config_summary, load_model
    from nanorl.tokenizer import load_tokenizer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    model = load_model(args.model, dtype=dtype, device=device)
    tok = load_tokenizer(args.model)
    print(f"loaded {args.model}: {config_summary(model)} on {device} in {dtype}", file=sys.stderr)
    return model, tok


def run_prompt(args, model, tok):
    from nanorl.sampler import generate

    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=True)
    else:
        ids = tok.encode(args.prompt)
    temperature = args.temperature
    streamed = []

    def stream(_, token):  # decode the whole prefix each time: multi-byte characters span tokens
        before = tok.decode(streamed)
        streamed.append(token)
        print(tok.decode(streamed)[len(before):], end="", flush=True)

    print(args.prompt if not args.chat else "", end="", flush=True)
    stats = {}
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = generate(model, [ids], n=args.num_samples, max_new_tokens=args.max_new_tokens, temperature=temperature,
                   top_p=args.top_p, top_k=args.top_k, stop_ids=tok.eos_ids, seed=args.seed, on_token=stream, stats=stats)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print()
    for i, c in enumerate(res[1:], 1):
        print(f"\n--- sample {i} ({c.finish_reason}) ---\n{tok.decode(c.tokens)}")
    n_tok = sum(len(c.tokens) for c in res)
    line = f"\n{n_tok} tokens in {dt:.2f}s: {n_tok / dt:.1f} tokens/s ({stats['decode_steps']} decode steps)"
    if model.device.type == "cuda":
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        line += f", {weight_bytes * stats['decode_steps'] / dt / 1e9:.0f} GB/s of weights read"
    print(line, file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    if args.prompt is None:
        raise UserError("pass --prompt TEXT")
    if args.num_samples < 1:
        raise UserError(f"-n {args.num_samples}: the number of samples must be >= 1")
    model, tok = load(args)
    run_prompt(args, model, tok)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
