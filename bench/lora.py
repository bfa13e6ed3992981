"""Memory of a GRPO step: full fine-tuning vs LoRA, side by side in one run (each configuration in its own process).

    python bench/lora.py                      # CPU: SmolLM2-135M fp32, train.py's GRPO step, full vs --lora-rank 16
    python bench/lora.py --device cuda        # GPU: a random model of Qwen2.5-7B's shape, full vs LoRA r=32
    python bench/lora.py --shape small        # the GPU path's code on a small random model on CPU (a smoke test)

CPU: each worker runs train.py itself (`train.main`) for one step of the grpo preset (its KL term included, so
full fine-tuning holds a reference copy and LoRA does not) on the same HF checkpoint, prompts and seed, and
reports the peak RSS of its process at the end of that step (before the final checkpoint is written), the
bytes of optimizer state (AdamW's exp_avg / exp_avg_sq / step, summed over its tensors) and the trainable
parameters. LoRA's sampler is a merged copy of the model (full fine-tuning on one CPU process samples from the
policy itself), so the model is held twice by both: LoRA saves the gradients and Adam's two moments.

GPU (--device cuda): nothing to download. The model is Qwen2.5-7B's configuration with random weights, laid out as
train.py lays it out: fp32 master weights, a bf16 sampler copy, and for full fine-tuning an fp32 reference copy
(KL) plus fp32 gradients and Adam states; for LoRA the frozen fp32 base, its bf16 merged sampler copy, and the
adapters. One update (bf16 autocast, gradient checkpointing, `--seqs` sequences of `--seq-len` tokens, one
micro-batch) then the sampler refresh; reported: torch.cuda.max_memory_allocated and whether it fit
(an out-of-memory error means it did not).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QWEN25_7B = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                 head_dim=128, intermediate_size=18944, rms_eps=1e-6, rope_theta=1e6, max_seq_len=32768,
                 tie_embeddings=False, attn_bias=True)
SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, n_layers=30, n_heads=9, n_kv_heads=3,
                    head_dim=64, intermediate_size=1536, rms_eps=1e-5, rope_theta=1e5, max_seq_len=8192,
                    tie_embeddings=True, attn_bias=False)
SHAPES = {"qwen2.5-7b": QWEN25_7B, "smollm2-135m": SMOLLM2_135M, "small": dict(QWEN25_7B, vocab_size=512, hidden_size=64, n_layers=2, n_heads=4,
                                                   n_kv_heads=2, head_dim=16, intermediate_size=128, max_seq_len=512)}


def optimizer_bytes(optimizers):
    import torch

    return sum(t.numel() * t.element_size() for opt in optimizers for st in opt.state.values()
               for t in st.values() if torch.is_tensor(t))


def cpu_worker(a):
    """One train.py GRPO step; peak RSS when the step ends, optimizer-state bytes, trainable parameters."""
    import torch

    import train

    optimizers, seen = [], {}

    class AdamW(torch.optim.AdamW):  # keeps a handle on train.py's optimizer to count its state
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            optimizers.append(self)

    torch.optim.AdamW = AdamW
    update = train.update

    def measured_update(*args, **kw):
        out = update(*args, **kw)
        if not seen:  # the first step: ru_maxrss is the process's peak so far (KiB on Linux)
            seen.update(peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, update_s=out["time_train"],
                        opt_bytes=optimizer_bytes(optimizers),
                        trainable=sum(p.numel() for o in optimizers for g in o.param_groups for p in g["params"]))
        return out

    train.update = measured_update
    argv = ["--model", a.model_dir, "--task", a.task, "--chat", "true", "--prompts-per-step", str(a.prompts),
            "-n", str(a.samples), "--max-new-tokens", str(a.max_new_tokens), "--micro-batch", str(a.prompts * a.samples),
            "--steps", "1", "--eval-n", "1", "--out", os.path.join(a.work, "out"), "--progress", "false",
            "--warm-start-steps", "0", "--device", "cpu"]
    argv += ["--lora-rank", str(a.rank)] if a.worker == "lora" else []
    assert train.main(argv) == 0
    print("RESULT " + json.dumps(seen), flush=True)


def synthetic_worker(a):
    """One update of a random model of `--shape` as train.py lays it out on a GPU, then the sampler refresh."""
    import copy

    import torch

    from nanorl import lora
    from nanorl.model import ModelConfig, Transformer, rope_inv_freq
    from nanorl.policy import Policy, autocast, collate

    dev = torch.device(a.device)
    res = {"fits": False}
    try:
        cfg = ModelConfig(**SHAPES[a.shape])
        with torch.device("meta"):
            model = Transformer(cfg)
        model.to_empty(device=dev)
        g = torch.Generator(dev).manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02, generator=g)
        model.inv_freq = rope_inv_freq(cfg).to(dev)  # to_empty leaves the buffer uninitialised
        sampler = copy.deepcopy(model).to(torch.bfloat16 if dev.type == "cuda" else torch.float32)
        ref = None
        if a.worker == "lora":
            lora.add_lora(model, a.rank)
        else:
            ref = copy.deepcopy(model).requires_grad_(False)
        model.gradient_checkpointing = True
        model.train()
        policy = Policy(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        g = torch.Generator().manual_seed(0)  # token ids on the CPU
        prompts = [torch.randint(0, cfg.vocab_size, (a.seq_len // 4,), generator=g).tolist() for _ in range(a.seqs)]
        comps = [torch.randint(0, cfg.vocab_size, (a.seq_len - a.seq_len // 4,), generator=g).tolist() for _ in range(a.seqs)]
        inp = collate(prompts, comps, 0, dev)
        with torch.no_grad(), autocast(dev), lora.disabled(model):
            ref_lp = Policy(ref if ref is not None else model)(inp)[0]
        with autocast(dev):
            logp = policy(inp)[0]
        m = inp["mask"]
        loss = (-(logp * m).sum() + 0.01 * ((logp - ref_lp) * m).sum()) / m.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sd = sampler.state_dict()
        for k, x in lora.merged_items(model):
            sd[k].copy_(x)
        res.update(fits=True, opt_bytes=optimizer_bytes([opt]),
                   trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    except torch.OutOfMemoryError:  # the answer to "does it fit": no
        pass
    if dev.type == "cuda":
        res["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["total_mb"] = torch.cuda.get_device_properties(0).total_memory / 2**20
    else:
        res["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model", default="smollm2-135m", help="CPU: the model")
    p.add_argument("--task", default="rg:basic_arithmetic")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: 16 on CPU, 32 on GPU)")
    p.add_argument("--shape", default=None, choices=list(SHAPES),
                   help="a synthetic update of a random model of this shape (default on cuda: qwen2.5-7b)")
    p.add_argument("--seqs", type=int, default=8, help="synthetic: sequences in the update")
    p.add_argument("--seq-len", type=int, default=1024, help="synthetic: tokens per sequence")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    a.shape = a.shape or ("qwen2.5-7b" if a.device == "cuda" else None)
    a.rank = a.rank or (16 if a.device == "cpu" else 32)
    if a.worker:
        return synthetic_worker(a) if a.shape else cpu_worker(a)
    import torch

    from nanorl.model import load_model
    from nanorl.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as work:
        model_dir = os.path.join(work, "model")
        if not a.shape:  # both read the same HF checkpoint: no GGUF dequantisation inside the measured process
            load_model(a.model).save_pretrained(model_dir, tokenizer=load_tokenizer(a.model))
            what = f"{a.model} fp32 on CPU, train.py grpo: {a.prompts} prompts x {a.samples} samples x {a.max_new_tokens} tokens"
        else:
            where = torch.cuda.get_device_name(0) if a.device == "cuda" else "CPU"
            what = f"random {a.shape} shape on {where}: {a.seqs} x {a.seq_len} tokens, update + sampler refresh"
        print(f"{what}; torch {torch.__version__}", flush=True)
        res = {}
        for name in ("full", "lora"):
            cmd = [sys.executable, __file__, "--worker", name, "--model-dir", model_dir, "--work",
                   os.path.join(work, name)] + sys.argv[1:] + ["--shape", a.shape] * bool(a.shape)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            res[name] = json.loads(line[0][7:])
            print(f"{name:4s}: {res[name]}", flush=True)
    f, lo = res["full"], res["lora"]
    print(f"\n| | full fine-tuning | LoRA r={a.rank} (all-linear) | LoRA / full |\n|---|---|---|---|")
    print(f"| peak memory (MiB) | {f['peak_mb']:.0f} | {lo['peak_mb']:.0f} | {lo['peak_mb'] / f['peak_mb']:.2f}x |")
    if "opt_bytes" in f and "opt_bytes" in lo:
        print(f"| optimizer state (MiB) | {f['opt_bytes'] / 2**20:.1f} | {lo['opt_bytes'] / 2**20:.2f} | "
              f"{lo['opt_bytes'] / f['opt_bytes']:.4f}x |")
        print(f"| trainable parameters | {f['trainable']:,} | {lo['trainable']:,} | "
              f"{lo['trainable'] / f['trainable']:.4f}x |")
    if "update_s" in f:
        print(f"| update time (s, shared CPU) | {f['update_s']:.2f} | {lo['update_s']:.2f} | {lo['update_s'] / f['update_s']:.2f}x |")
    if "total_mb" in f:
        print(f"| fits in {f['total_mb'] / 1024:.0f} GiB | {f['fits']} | {lo['fits']} | |")


if __name__ == "__main__":
    main()
