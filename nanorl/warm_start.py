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
from nanorl import update as U
from nanorl.model import load_model
from nanorl.policy import autocast, collate
from nanorl.rollout import PromptStream, reference_episode


def sft_steps(model, tok, task, args, device, steps, lr, log=None, desc="warm start", on_metrics=None):
    """Supervised fine-tuning on the task's reference solutions (+ EOS): -log pi of the solution tokens.

    A step sees as many sequences as an RL step trains on (prompts_per_step x group_size), each rank its
    share, through the same micro-batched update as RL (nanorl/update.py: --micro-batch, --grad-checkpointing,
    DDP / FSDP2). The lr warms up, then stays constant: decaying it to zero would leave the model at a sharp
    point where the first RL steps (Adam's first updates are sign steps of size lr) do more harm than good.
    Multi-turn tasks train on their reference episodes: the policy's turns, never the observations
    (rollout.reference_episode). on_metrics(row) receives each step's nll and lr. Returns the policy (under
    FSDP2 the sharded module around `model`).
    """
    policy, wrapped = U.prepare(model, args)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    stream = PromptStream(task, D.rank(), D.world_size())
    batch = args.prompts_per_step * args.cfg.group_size
    model.train()
    shown = time.time()
    for step in range(steps):
        exs = stream.next(batch)[1]
        refs = [reference_episode(task, ex, tok, args.chat) for ex in exs]  # (prompt, tokens, mask): turns + EOS
        n_tok = D.all_reduce(torch.tensor(float(sum(sum(r[2]) for r in refs)), device=device))

        def loss_of(span):
            part = refs[span[0]:span[1]]
            inp = collate([r[0] for r in part], [r[1] for r in part], tok.pad_id, device, masks=[r[2] for r in part])
            with autocast(device):
                logp, _, _ = wrapped(inp)
            return algos.sft_loss(logp, inp["mask"], n_tokens=n_tok)

        sums = {}
        U.step(wrapped, opt, U.spans(0, len(refs), args.micro_batch), loss_of, U.lr_at(lr, step, args.warmup_steps),
               1.0, sums)
        nll = float(D.all_reduce(sums["nll"].to(device)))  # each micro-batch's share of the global mean
        if on_metrics:
            on_metrics({"step": step + 1, "nll": nll, "lr": opt.param_groups[0]["lr"]})
        if log and (step % 50 == 0 or step == steps - 1 or time.time() - shown > 30):  # a real model: every 30 s
            log(f"{desc} step {step + 1}/{steps}: nll {nll:.3f}")
            shown = time.time()
    model.eval()
    return policy


def warm_start(model, tok, task, args, device, log):
    """Run (or load from the cache) the supervised warm start; the cache key covers everything it depends on."""
    key = json.dumps(["v3", args.model, args.task, args.data, args.chat, args.seed, args.warm_start_steps,
                      args.warm_start_lr, args.warmup_steps, args.prompts_per_step, args.cfg.group_size, D.world_size(),
                      args.micro_batch]
                     + ([args.prompt_key, args.answer_key] if args.prompt_key or args.answer_key else []))
    cache = os.path.join(os.environ.get("NANORL_CACHE", os.path.expanduser("~/.cache/nanorl")),
                         "warm-" + hashlib.sha256(key.encode()).hexdigest()[:16])
    if os.path.isfile(os.path.join(cache, "model.safetensors")):
        log(f"warm start: loading the cached model from {cache}")
        return load_model(cache, device=device)
    t0 = time.time()
    policy = sft_steps(model, tok, task, args, device, args.warm_start_steps, args.warm_start_lr, log)
    state = U.full_state(policy)  # gathers FSDP2 shards to rank 0's CPU; the trained weights as they are otherwise
    if D.is_main():
        model.save_pretrained(cache, tokenizer=tok, state=U.model_state(state))
    D.barrier()
    log(f"warm start: {args.warm_start_steps} SFT steps in {time.time() - t0:.0f}s, cached in {cache}")
    # under FSDP2 `model` is now a set of shards inside the trainer's wrapper: the RL run starts from the full copy
    return load_model(cache, device=device) if args.fsdp and D.world_size() > 1 else model
