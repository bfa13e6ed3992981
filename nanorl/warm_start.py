"""The supervised warm start: SFT on a task's reference solutions (or reference episodes), cached on disk.

The tiny model cannot find a task's answer format by chance, so RL starts from a short SFT on reference
solutions that mix styles (arith: bare and worked answers; calc: with and without the calculator), and
RL discovers which style pays. The result is cached under ~/.cache/nanorl (or $NANORL_CACHE), keyed by
everything it depends on, so a second run starts RL at once.
"""

import hashlib
import json
import os
import time

import torch

from nanorl import algos
from nanorl import dist as D
from nanorl.model import load_model
from nanorl.policy import Policy, autocast, collate
from nanorl.rollout import PromptStream, reference_episode


def sft_steps(model, tok, task, args, device, steps, lr, log=None, desc="warm start", on_metrics=None):
    """Supervised fine-tuning on the task's reference solutions (+ EOS): -log pi of the solution tokens.

    A step sees as many sequences as an RL step trains on (prompts_per_step x group_size). The lr warms
    up, then stays constant: decaying it to zero would leave the model at a sharp point where the
    first RL steps (Adam's first updates are sign steps of size lr) do more harm than good.
    Multi-turn tasks train on their reference episodes: the policy's turns, never the observations
    (rollout.reference_episode). on_metrics(row) receives each step's nll and lr.
    """
    policy = Policy(model, impl=args.kernel_impl)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    stream = PromptStream(task, D.rank(), D.world_size())
    batch = args.prompts_per_step * args.cfg.group_size
    model.train()
    for step in range(steps):
        exs = stream.next(batch)[1]
        refs = [reference_episode(task, ex, tok, args.chat) for ex in exs]  # (prompt, tokens, mask): turns + EOS
        inp = collate([r[0] for r in refs], [r[1] for r in refs], tok.pad_id, device, masks=[r[2] for r in refs])
        n_tok = D.all_reduce(inp["mask"].sum())
        with autocast(device):
            logp, _, _ = policy(inp)
        loss, _ = algos.sft_loss(logp, inp["mask"], n_tokens=n_tok)
        (loss * D.world_size()).backward()
        for p in model.parameters():  # plain gradient averaging: this runs before DDP wraps the policy
            if p.grad is not None:
                D.all_reduce(p.grad)
                p.grad /= D.world_size()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, args.warmup_steps))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_metrics:
            on_metrics({"step": step + 1, "nll": float(loss.detach()), "lr": opt.param_groups[0]["lr"]})
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"{desc} step {step + 1}/{steps}: nll {loss.item():.3f}")
    model.eval()


def warm_start(model, tok, task, args, device, log):
    """Run (or load from the cache) the supervised warm start; the cache key covers everything it depends on."""
    key = json.dumps(["v1", args.model, args.task, args.data, args.chat, args.seed, args.warm_start_steps,
                      args.warm_start_lr, args.warmup_steps, args.prompts_per_step, args.cfg.group_size, D.world_size()]
                     + ([args.prompt_key, args.answer_key] if args.prompt_key or args.answer_key else []))
    cache = os.path.join(os.environ.get("NANORL_CACHE", os.path.expanduser("~/.cache/nanorl")),
                         "warm-" + hashlib.sha256(key.encode()).hexdigest()[:16])
    if os.path.isfile(os.path.join(cache, "model.safetensors")):
        log(f"warm start: loading the cached model from {cache}")
        return load_model(cache, device=device)
    t0 = time.time()
    sft_steps(model, tok, task, args, device, args.warm_start_steps, args.warm_start_lr, log)
    if D.is_main():
        model.save_pretrained(cache, tokenizer=tok)
    D.barrier()
    log(f"warm start: {args.warm_start_steps} SFT steps in {time.time() - t0:.0f}s, cached in {cache}")
    return model
