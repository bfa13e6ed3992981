"""The RL loop, end to end, on 1 CPU or N GPUs.

    python train.py                                         # the embedded default: tiny model, arith, GRPO, CPU
    python train.py --algo dapo --model smollm2-135m --task rg:basic_arithmetic --steps 4
    torchrun --nproc_per_node=8 train.py --algo grpo --model path/to/Qwen2.5-1.5B-Instruct --task gsm8k --data gsm8k/

One step (DESIGN.md): sample n completions per prompt with nanorl.sampler -> score them with the task's
verifiable reward -> shape rewards, drop constant groups (dynamic sampling draws more prompts) ->
advantages -> for each epoch, mini-batch and micro-batch: hidden states -> kernels.fused_logprobs ->
algos.loss with globally all-reduced normalising counts -> backward -> AdamW step -> metrics, eval,
checkpoint. Any field of the --algo preset can be overridden: --eps-high 0.28, --kl-coef 0, ...

The policy keeps fp32 master weights; on GPU the forward runs under bf16 autocast and the sampler uses
a bf16 copy refreshed after every optimizer step. On one CPU process the sampler uses the policy itself.
"""

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import sys
import time

import torch

from nanorl import UserError, algos
from nanorl import dist as D
from nanorl.checkpoint import atomic_file, latest_state, load_state, save_state
from nanorl.model import config_summary, load_model, param_count
from nanorl.policy import Policy, autocast, collate, forward_all, token_matrix
from nanorl.preference import train_preference
from nanorl.sampler import generate
from nanorl.tasks import make_task, score
from nanorl.tokenizer import load_tokenizer

# flags that may differ between a run and its --resume (everything else must match)
RESUMABLE = {"steps", "resume", "save_every", "eval_every", "eval_n", "out", "dist_timeout", "progress", "max_bad_steps"}


# Defaults for the flags a run leaves unset, by model. The tiny character model learns the embedded arith
# from its supervised warm start. A real (instruct) checkpoint starts from where it is, prompted with its
# chat template; full fine-tuning needs a smaller lr the larger the model is, and on a CPU small batches
# and short answers keep a step to seconds. Measured on SmolLM2-135M-Instruct: README, bench/RESULTS.md.
DEFAULTS = {  # flag: (tiny, real model on a CPU, real model on a GPU)
    "chat":             (False, True, True),
    "prompts_per_step": (32, 4, 32),       # x group_size 8 (the --algo preset's) samples per step
    "max_new_tokens":   (32, 64, 256),
    "temperature":      (1.0, 1.0, 1.0),
    "steps":            (80, 24, 100),
    "warmup_steps":     (10, 10, 10),      # linear warm-up, then a constant lr (verl, DAPO)
    "warm_start_steps": (300, 0, 0),       # a real instruct model needs no supervised warm start
}
REAL_LR = ((3e8, 1e-5), (1e9, 3e-6), (4e9, 2e-6), (float("inf"), 1e-6))  # real models: (up to N params, lr)
TINY_LR = 1e-4


class ArgParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, and a pointer to --help (argparse prints usage first)
        print(f"error: {message}; see python {self.prog} --help", file=sys.stderr)
        sys.exit(2)


def _parse_value(kind):
    def parse(s):
        if kind is bool:
            if s.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
            return s.lower() in ("1", "true", "yes")
        if s.lower() == "none":
            return None
        return kind(s)
    return parse


def parse_args(argv=None):
    p = ArgParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to train
    p.add_argument("--algo", default="grpo", help=f"preset: {', '.join(algos.PRESETS)}")
    p.add_argument("--model", default="tiny", help="HF directory, .gguf file, 'tiny' or 'smollm2-135m'")
    p.add_argument("--task", default="arith", help="arith | countdown | gsm8k | math | rg:NAME")
    p.add_argument("--data", default=None, help="data file/dir for gsm8k, math, and the dpo/ipo pairs jsonl")
    p.add_argument("--reward-fn", default=None, help="module:function or file.py:function replacing the task reward")
    p.add_argument("--chat", default=None, type=_parse_value(bool), help="use the chat template (default: DEFAULTS)")
    p.add_argument("--reward-timeout", type=float, default=10.0, help="seconds a reward call may take before it scores 0")
    # rollout
    p.add_argument("--prompts-per-step", type=int, default=None, help="prompts per step over all ranks (default: DEFAULTS)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: DEFAULTS")
    p.add_argument("--temperature", type=float, default=None, help="default: DEFAULTS")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    # optimisation
    p.add_argument("--steps", type=int, default=None, help="RL steps (default: DEFAULTS)")
    p.add_argument("--lr", type=float, default=None, help="default: TINY_LR, or REAL_LR by the model's size")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up, then a constant lr (default: DEFAULTS)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--mini-batches", type=int, default=1, help="optimizer steps per epoch over a rollout batch")
    p.add_argument("--micro-batch", type=int, default=64, help="sequences per forward/backward")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward: less memory")
    # supervised warm start (SFT on the task's reference solutions), cached on disk
    p.add_argument("--warm-start-steps", type=int, default=None, help="default: DEFAULTS")
    p.add_argument("--warm-start-lr", type=float, default=None, help="default: 2e-3 for tiny, --lr otherwise")
    # evaluation, logging, checkpoints
    p.add_argument("--out", default="out", help="run directory: policy (HF format), state, metrics")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=0, help="held-out eval every K steps (0: only before/after)")
    p.add_argument("--eval-n", type=int, default=200, help="held-out prompts per eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", default=None, type=_parse_value(bool), help="tqdm bar (default: when a tty)")
    # systems
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--fsdp", action="store_true", help="shard the policy with FSDP2 (fully_shard) under torchrun")
    p.add_argument("--kernel-impl", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument("--dist-timeout", type=int, default=600, help="seconds a rank waits for the others")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite steps in a row")
    # every field of the --algo preset, e.g. --eps-high 0.28 --kl-coef 0 --agg token_mean
    g = p.add_argument_group("algorithm settings (default: the --algo preset's)")
    for f in dataclasses.fields(algos.AlgoConfig):
        if f.name in ("name", "doc", "seed"):  # seed: the trainer seeds clip_cov from --seed
            continue
        kind = type(f.default) if f.default is not None else float
        flags = ["-n", "--group-size"] if f.name == "group_size" else [f"--{f.name.replace('_', '-')}"]
        g.add_argument(*flags, dest=f"algo_{f.name}", default=argparse.SUPPRESS, type=_parse_value(kind),
                       metavar=kind.__name__.upper())
    args = p.parse_args(argv)
    tiny = args.model == "tiny"
    gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    column, args.defaults = (0, "tiny") if tiny else (2, "real model on a GPU") if gpu else (1, "real model on a CPU")
    for name, values in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, values[column])
    if args.lr is None:
        n = 0 if tiny else param_count(args.model)
        args.lr = TINY_LR if tiny else next(lr for size, lr in REAL_LR if n <= size)
        args.defaults += "" if tiny else f", {n / 1e6:.0f}M parameters"
    if args.warm_start_lr is None:  # supervised steps on a real model take the RL lr: 2e-3 would wreck it
        args.warm_start_lr = 2e-3 if tiny else args.lr
    overrides = {k[5:]: v for k, v in vars(args).items() if k.startswith("algo_")}
    if overrides.get("agg", algos.PRESETS.get(args.algo, algos.AlgoConfig()).agg) == "token_sum_norm":
        overrides.setdefault("l_max", args.max_new_tokens)
    try:
        args.cfg = algos.make_config(args.algo, **overrides)
    except ValueError as e:
        raise UserError(str(e)) from None
    for name in ("prompts_per_step", "max_new_tokens", "micro_batch", "mini_batches", "eval_n"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    return args


# -----------------------------------------------------------------------------
# data, evaluation, warm start


class PromptStream:
    """This rank's training examples, in a fixed order given the seed; `position` is saved in checkpoints."""

    def __init__(self, task, rank, world):
        self.task, self.rank, self.world, self.position = task, rank, world, 0

    def next(self, n_global):
        """This rank's share of the next n_global examples, with their global indices (the sampling seeds)."""
        idx = [self.position + i for i in range(self.rank, n_global, self.world)]
        self.position += n_global
        return idx, [self.task.train_example(i) for i in idx]


def encode_prompt(task, ex, tok, chat):
    ids = tok.encode(task.prompt(ex, tok, chat))
    if not ids:
        raise UserError(f"{ex.meta.get('where', task.name + ' example ' + ex.id)}: the prompt is empty; fix the data line")
    return ids


def check_prompts(task, tok, args, context, eval_examples):
    """A data file's prompts must leave room to answer: fail at the start, naming the line, not hours in."""
    if task.n_train is None:  # procedural tasks draw short prompts
        return
    for ex in [task.train_example(i) for i in range(task.n_train)] + list(eval_examples):
        n = len(encode_prompt(task, ex, tok, args.chat))
        if n >= context:
            where = ex.meta.get("where", f"{task.name} example {ex.id}")
            raise UserError(f"{where}: the prompt has {n} tokens but the model's context is {context}; "
                            f"shorten or delete the line")


@torch.no_grad()
def evaluate(model, tok, task, args, device, examples=None):
    """Held-out greedy accuracy over eval_n examples (each rank does its share)."""
    examples = examples if examples is not None else task.eval_examples(args.eval_n)
    mine = examples[D.rank()::D.world_size()]
    correct = 0.0
    for s in range(0, len(mine), 256):
        chunk = mine[s:s + 256]
        prompts = [encode_prompt(task, ex, tok, args.chat) for ex in chunk]
        res = generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=0, stop_ids=tok.eos_ids)
        sc = score(task, [tok.decode(c.tokens) for c in res], chunk, args.reward_timeout)
        correct += sum(sc.correct)
    tot = D.all_reduce(torch.tensor([correct, float(len(mine))], dtype=torch.float64, device=device))
    return float(tot[0] / tot[1].clamp(min=1))


def sft_steps(model, tok, task, args, device, steps, lr, log=None, desc="warm start", metrics_out=None):
    """Supervised fine-tuning on the task's reference solutions (+ EOS): -log pi of the solution tokens.

    A step sees as many sequences as an RL step trains on (prompts_per_step x group_size). The lr warms
    up, then stays constant: decaying it to zero would leave the model at a sharp point where the
    first RL steps (Adam's first updates are sign steps of size lr) do more harm than good.
    """
    policy = Policy(model, impl=args.kernel_impl)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    eos = tok.eos_ids[0]
    stream = PromptStream(task, D.rank(), D.world_size())
    batch = args.prompts_per_step * args.cfg.group_size
    model.train()
    for step in range(steps):
        exs = stream.next(batch)[1]
        prompts = [encode_prompt(task, ex, tok, args.chat) for ex in exs]
        comps = [tok.encode(ex.solution) + [eos] for ex in exs]
        inp = collate(prompts, comps, tok.pad_id, device)
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
        if metrics_out:
            _append_metrics(metrics_out, {"step": step + 1, "nll": float(loss.detach()), "lr": opt.param_groups[0]["lr"]})
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"{desc} step {step + 1}/{steps}: nll {loss.item():.3f}")
    model.eval()


def warm_start(model, tok, task, args, device, log):
    """Run (or load from the cache) the supervised warm start; the cache key covers everything it depends on."""
    key = json.dumps(["v1", args.model, args.task, args.data, args.chat, args.seed, args.warm_start_steps,
                      args.warm_start_lr, args.warmup_steps, args.prompts_per_step, args.cfg.group_size, D.world_size()])
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


# -----------------------------------------------------------------------------
# one rollout: sample, score, shape, filter


def rollout(sampler_model, tok, task, stream, args, cfg, step):
    """Sample until this rank has its share of kept groups (DAPO dynamic sampling) or gives up.

    Groups the filter drops are replaced by fresh prompts; if fewer than needed survive after
    cfg.max_gen_batches generations, the batch is topped up with dropped groups whose rows are masked
    out (every rank must run the same number of micro-batches). Returns per-row data and counters.
    """
    G, n_local = cfg.group_size, args.prompts_per_step // D.world_size()
    kept, dropped, rewards, correct = [], [], [], []
    st = {"gen_batches": 0, "reward_errors": 0, "reward_timeouts": 0, "score_s": 0.0}
    while len(kept) < n_local:
        idx, exs = stream.next(args.prompts_per_step)
        prompts = [encode_prompt(task, ex, tok, args.chat) for ex in exs]
        # one seed per example, from its global index: the samples do not depend on the number of ranks,
        # and a resumed run draws exactly the samples the uninterrupted run would have
        seeds = [int.from_bytes(hashlib.sha256(f"{args.seed}/{i}".encode()).digest()[:7], "little") for i in idx]
        res = generate(sampler_model, prompts, n=G, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, top_k=args.top_k, stop_ids=tok.eos_ids, seed=seeds)
        t0 = time.time()
        sc = score(task, [tok.decode(c.tokens) for c in res], [ex for ex in exs for _ in range(G)], args.reward_timeout)
        st["score_s"] += time.time() - t0
        st["reward_errors"] += sc.errors
        st["reward_timeouts"] += sc.timeouts
        rewards.append(torch.tensor(sc.rewards, dtype=torch.float32))
        correct.append(torch.tensor(sc.correct, dtype=torch.float32))
        lengths = torch.tensor([len(c.tokens) for c in res])
        R = algos.shape_rewards(rewards[-1], lengths, args.max_new_tokens, cfg, torch.tensor(sc.formatted))
        # filter on the task reward, not the shaped one (DAPO filters on accuracy: verl's metric=acc)
        keep = algos.filter_groups(rewards[-1], G, cfg.filter_groups, cfg.reward_max)
        for gi, ex in enumerate(exs):
            (kept if keep[gi] else dropped).append((ex, prompts[gi], res[gi * G:(gi + 1) * G], R[gi * G:(gi + 1) * G]))
        st["gen_batches"] += 1
        if cfg.filter_groups == "none" or 0 < cfg.max_gen_batches <= st["gen_batches"]:
            break
    st["groups_kept"] = min(len(kept), n_local)
    if cfg.filter_groups != "none" and int(D.all_reduce(torch.tensor(len(kept)))) == 0:
        mean = float(torch.cat(rewards).mean())
        verdict = "too hard for the model" if mean <= 0.5 else "too easy for the model"
        raise TrainingStopped(f"dynamic sampling: every group had equal rewards in {st['gen_batches']} generation "
                              f"batches (mean reward {mean:.2f}): the task is {verdict}; pick another task or model, "
                              f"raise --max-gen-batches, or set --filter-groups none")
    groups = (kept + dropped)[:n_local]
    rows = [(ex, p, c) for ex, p, comps, _ in groups for c in comps]
    batch = dict(prompts=[p for _, p, _ in rows], comps=[c.tokens for _, _, c in rows], ex=[ex for ex, _, _ in rows],
                 sampler_logp=[c.sampling_logprobs for _, _, c in rows], R=torch.cat([g[3] for g in groups]),
                 truncated=torch.tensor([c.finish_reason == "length" for _, _, c in rows]),
                 valid=torch.arange(len(groups)).repeat_interleave(G) < st["groups_kept"],
                 rewards=torch.cat(rewards), correct=torch.cat(correct), stats=st)
    if cfg.needs_greedy_baseline:  # ReMax: each prompt's greedy response, scored, is its baseline
        greedy = generate(sampler_model, [g[1] for g in groups], max_new_tokens=args.max_new_tokens, temperature=0,
                          stop_ids=tok.eos_ids)
        texts = [tok.decode(c.tokens) for c in greedy]
        batch["baseline"] = torch.tensor(score(task, texts, [g[0] for g in groups], args.reward_timeout).rewards)
    return batch


# -----------------------------------------------------------------------------
# the update of one rollout batch


def _spans(start, end, size):
    return [(s, min(s + size, end)) for s in range(start, end, size)]


def update(wrapped, policy, ref, batch, args, cfg, pad_id, device, ctl, tracker, step, opt):
    """Advantages, then ppo_epochs x mini_batches optimizer steps over the batch; returns metrics."""
    t0 = time.time()
    prompts, comps = batch["prompts"], batch["comps"]
    B, T, G = len(comps), max(map(len, comps)), cfg.group_size
    # micro-batches hold whole groups: each group is one packed row (collate), and reg / disco compare them
    mb = -(-args.micro_batch // G) * G
    valid = batch["valid"].to(device)
    mask = token_matrix([[1.0] * len(c) for c in comps], T, device) * valid[:, None]
    truncated, R = batch["truncated"].to(device), batch["R"].to(device)
    n_updates = cfg.ppo_epochs * args.mini_batches
    old_lp = ent0 = values = ref_lp = None
    kl_reward = cfg.kl_in == "reward" and cfg.kl_coef > 0
    if (n_updates > 1 and not cfg.on_policy) or cfg.needs_value or cfg.top_entropy_quantile < 1 or kl_reward:
        old_lp, ent0, values = forward_all(policy, prompts, comps, pad_id, device, mb, args.temperature, G)
    if ref is not None:
        ref_lp = forward_all(ref, prompts, comps, pad_id, device, mb, args.temperature, G)[0]
    rollout_lp = token_matrix(batch["sampler_logp"], T, device)
    token_rewards = None
    if kl_reward:
        token_rewards = algos.kl_reward(R, old_lp, ref_lp, mask, ctl["kl"].value, cfg.kl_estimator)
    A = algos.advantages(R, G, cfg, mask=mask, token_rewards=token_rewards, values=values,
                         baseline=batch.get("baseline"), lengths=mask.sum(-1), prompt_ids=[ex.id for ex in batch["ex"]],
                         tracker=tracker, all_reduce=D.all_reduce)
    A = A * (valid[:, None] if A.dim() == 2 else valid)  # padding groups carry no signal
    returns = None
    if cfg.needs_value:
        tr = token_rewards if token_rewards is not None else algos.last_token_rewards(R, mask)
        returns = algos.gae(tr, values, mask, cfg.gamma, cfg.lam)[1]
    sums, metrics, skipped = {}, {}, False
    per_mini = -(-(B // G) // args.mini_batches) * G  # rows per mini-batch, whole groups
    for epoch in range(cfg.ppo_epochs):
        for s0, e0 in _spans(0, B, per_mini):
            chunks = _spans(s0, e0, mb)
            counts = D.all_reduce(sum(algos.loss_counts(mask[s:e], cfg, truncated[s:e]) for s, e in chunks))
            thr = None
            if cfg.top_entropy_quantile < 1:  # one threshold for the whole mini-batch, over all ranks
                h = D.all_gather_cat(ent0[s0:e0][mask[s0:e0] > 0])
                thr = algos.entropy_quantile_threshold(h, torch.ones_like(h), cfg.top_entropy_quantile)
            for ci, (s, e) in enumerate(chunks):
                inp = collate(prompts[s:e], comps[s:e], pad_id, device, G)
                Tc = inp["mask"].shape[1]
                m = inp["mask"] = inp["mask"] * valid[s:e, None]

                def cut(x):
                    return None if x is None else x[s:e, :Tc]
                last = ci == len(chunks) - 1
                with (wrapped.no_sync() if hasattr(wrapped, "no_sync") and not last else contextlib.nullcontext()):
                    with autocast(device):
                        logp, ent, v = wrapped(inp, args.temperature)
                    loss, mets = algos.loss(
                        logp, cut(old_lp), A[s:e] if A.dim() == 1 else A[s:e, :Tc], m, cfg, cut(ref_lp), ent,
                        rollout_logp=cut(rollout_lp), truncated=truncated[s:e], n_tokens=counts[0], n_seqs=counts[1],
                        entropy_threshold=thr, kl_coef=ctl["kl"].value, entropy_coef=ctl["entropy"].value, group_size=G,
                        generator=torch.Generator(device=device).manual_seed(args.seed * 100003 + step))
                    if cfg.needs_value:
                        vl, vm = algos.value_loss(v, cut(values), cut(returns), m, cfg, n_tokens=counts[0])
                        loss, mets = loss + vl, mets | vm
                    (loss * D.world_size()).backward()  # DDP averages over ranks; the counts are already global
                for k, x in mets.items():
                    x = x.detach().float()
                    sums[k] = torch.maximum(sums[k], x) if k.endswith("_max") and k in sums else sums.get(k, 0) + x
            norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            if not torch.isfinite(norm):  # skip the step, keep the weights; the caller counts these
                opt.zero_grad(set_to_none=True)
                skipped = True
                continue
            for group in opt.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))
            opt.step()
            opt.zero_grad(set_to_none=True)
            metrics["grad_norm"] = float(norm)
    for k, x in sums.items():  # each micro-batch's metric is its share of the mini-batch: sum, then average
        x = D.all_reduce(torch.as_tensor(x, device=device).clone(), "max" if k.endswith("_max") else "sum")
        metrics[k] = float(x) / (1 if k.endswith("_max") else n_updates)
    if "kl" in metrics and not skipped:  # a non-finite step must not poison the controllers
        ctl["kl"].update(metrics["kl"], args.prompts_per_step * G)
    if "entropy" in metrics and not skipped:
        ctl["entropy"].update(metrics["entropy"])
    metrics.update(skipped=skipped, time_train=time.time() - t0)
    return metrics


# -----------------------------------------------------------------------------
# small helpers: copies, state, metrics, plot


def _copy_model(model, dtype=None):
    out = copy.deepcopy(model)
    return out.to(dtype) if dtype is not None else out


@torch.no_grad()
def _copy_weights(dst, src):
    """Refresh the sampler's copy of the policy (FSDP shards are gathered); no-op when they are one."""
    if dst is src:
        return
    sd = src.state_dict()
    for k, v in dst.state_dict().items():
        x = sd[k]
        v.copy_(x.full_tensor() if hasattr(x, "full_tensor") else x)


def _states(policy, opt):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(policy, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_states(policy, opt, model_state, optim_state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(policy, opt, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))


def _append_metrics(out, row):
    if D.is_main():
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in row.items()}) + "\n")


def _trim_metrics(out, step):
    """Drop metric lines after `step` (a crash after the last checkpoint left them; the resumed run redoes them)."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = []
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                pass
    with atomic_file(path) as f:
        f.writelines(keep)


def _plot(out):
    """reward.png: training reward and accuracy per step (and held-out evals), when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("reward_mean", "reward (train)"), ("accuracy", "accuracy (train samples)"),
                       ("eval_accuracy", "held-out greedy accuracy")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), "o-" if key == "eval_accuracy" else "-", label=label)
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(os.path.join(out, "reward.png"), "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def _summary(out, **kw):
    if D.is_main():
        with atomic_file(os.path.join(out, "summary.json")) as f:
            json.dump(kw, f, indent=2)


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    args = parse_args(argv)
    cfg = args.cfg
    rank, world, device = D.init(args.dist_timeout)
    device = torch.device(args.device) if args.device else device
    t_start = time.time()
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
    log(f"settings (defaults: {args.defaults}; flags override): lr {args.lr:g}, warm-up {args.warmup_steps}, "
        f"steps {args.steps}, prompts/step {args.prompts_per_step} x group {cfg.group_size}, max new tokens "
        f"{args.max_new_tokens}, temperature {args.temperature:g}, chat {str(args.chat).lower()}, warm start "
        f"{args.warm_start_steps} steps")
    if args.prompts_per_step % world:
        raise UserError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {world} ranks")
    run_args = {k: v for k, v in vars(args).items() if k != "cfg"} | {"cfg": dataclasses.asdict(cfg)}
    state_dir = latest_state(args.out) if args.resume else None
    if args.resume and state_dir is None:
        raise UserError(f"--resume: no checkpoint in {args.out}/ckpt; drop --resume to start a new run")
    saved = load_state(state_dir)[2] if state_dir else None
    if saved is not None:  # a different configuration would not continue the same run
        for k in sorted(set(saved["args"]) | set(run_args)):
            if k not in RESUMABLE and saved["args"].get(k) != run_args.get(k):
                raise UserError(f"--resume: {k} is {run_args.get(k)!r} but the run in {args.out} used "
                                f"{saved['args'].get(k)!r}; use the same settings or another --out")

    # everything that can fail on bad input happens before --out is written
    tok = load_tokenizer(args.model)
    if cfg.kind == "pref":
        model = load_model(args.model, device=device, seed=args.seed)
        acc_before, acc_after, steps, secs = train_preference(model, tok, args, cfg, device, log, _append_metrics)
        if D.is_main():
            model.save_pretrained(args.out, tokenizer=tok)
        _summary(args.out, acc_before=acc_before, acc_after=acc_after, steps=steps, seconds=round(secs, 1), algo=cfg.name)
        log(f"held-out preference accuracy: before {acc_before:.3f} -> after {acc_after:.3f}")
        return 0
    task = make_task(args.task, data=args.data, seed=args.seed, reward_fn=args.reward_fn)
    eval_examples = task.eval_examples(args.eval_n)
    init_dir = os.path.join(args.out, "init")  # the warm-started model: the RL start and the KL reference
    model = load_model(init_dir if saved and args.warm_start_steps else args.model, device=device, seed=args.seed)
    check_prompts(task, tok, args, model.cfg.max_seq_len, eval_examples)
    if cfg.kind == "sft":  # --algo sft: the warm start's supervised loop as the whole run
        acc_before = evaluate(model, tok, task, args, device, eval_examples)
        sft_steps(model, tok, task, args, device, args.steps, args.lr, log, desc="sft", metrics_out=args.out)
        acc_after = evaluate(model, tok, task, args, device, eval_examples)
        if D.is_main():
            model.save_pretrained(args.out, tokenizer=tok)
        _summary(args.out, acc_before=acc_before, acc_after=acc_after, steps=args.steps,
                 seconds=round(time.time() - t_start, 1), algo=cfg.name)
        log(f"held-out greedy accuracy: before {acc_before:.3f} -> after SFT {acc_after:.3f}")
        return 0
    if args.warm_start_steps and saved is None:
        model = warm_start(model, tok, task, args, device, log)
        if rank == 0:
            model.save_pretrained(init_dir, tokenizer=tok)
    ref = Policy(_copy_model(model).requires_grad_(False), impl=args.kernel_impl) if cfg.needs_ref else None
    model.gradient_checkpointing = args.grad_checkpointing
    # the sampler's weights: the policy itself on one CPU process, else a copy (bf16 on GPU) refreshed each step
    sampler_model = model if device.type == "cpu" and not args.fsdp else \
        _copy_model(model, torch.bfloat16 if device.type == "cuda" else None)
    value_head = algos.ValueHead(model.cfg.hidden_size).to(device) if cfg.needs_value else None
    policy = Policy(model, value_head, args.kernel_impl)
    wrapped = D.wrap(policy, fsdp=args.fsdp)
    # fused: one kernel over all parameters (SmolLM2-135M on the CI CPU: 0.08 s a step instead of 0.42 s)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay, fused=not args.fsdp)
    ctl = {"kl": algos.AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon),
           "entropy": algos.AdaptiveEntropy(cfg.entropy_coef, cfg.entropy_target, cfg.entropy_delta, cfg.entropy_coef_max)}
    tracker = algos.make_tracker(cfg)
    stream = PromptStream(task, rank, world)
    step, acc_before, bad_steps, skipped_total = 0, None, 0, 0
    if saved is not None:
        model_state, optim_state, _ = load_state(state_dir)
        _load_states(policy, opt, model_state, optim_state)
        _copy_weights(sampler_model, model)
        step, acc_before, stream.position = saved["step"], saved["acc_before"], saved["position"]
        skipped_total = saved["skipped"]
        for k, c in ctl.items():
            c.load_state_dict(saved["ctl"][k])
        if tracker is not None:
            tracker.load_state_dict(saved["tracker"])
        log(f"resumed from {state_dir} at step {step}")
        for name in os.listdir(os.path.join(args.out, "ckpt")) if rank == 0 else []:
            if name.startswith((".tmp-", ".old-")):  # a checkpoint write that was killed: never complete
                shutil.rmtree(os.path.join(args.out, "ckpt", name), ignore_errors=True)
    log(f"nanorl: {config_summary(model)} | task {task.name} | algo {cfg.name} | {world} rank(s) on {device}")
    if acc_before is None:
        acc_before = evaluate(sampler_model, tok, task, args, device, eval_examples)
        log(f"held-out greedy accuracy before RL: {acc_before:.3f}")
    if rank == 0:
        if saved is None and os.path.isdir(os.path.join(args.out, "ckpt")):
            log(f"{args.out} held a previous run: starting over (continue a run with --resume instead)")
            shutil.rmtree(os.path.join(args.out, "ckpt"))
        os.makedirs(args.out, exist_ok=True)
        _trim_metrics(args.out, step)
        with atomic_file(os.path.join(args.out, "run.json")) as f:  # how to prompt the policy: sample.py reads it
            json.dump(run_args, f, indent=2)
    stop = {"signal": None}
    for s in (signal.SIGINT, signal.SIGTERM):  # finish the step, checkpoint, exit cleanly
        signal.signal(s, lambda signum, frame: stop.__setitem__("signal", signum))

    def checkpoint(step):
        msd, osd = _states(policy, opt)
        st = dict(step=step, acc_before=acc_before, position=stream.position, args=run_args, skipped=skipped_total,
                  ctl={k: c.state_dict() for k, c in ctl.items()},
                  tracker=tracker.state_dict() if tracker is not None else None)
        if rank == 0:
            save_state(args.out, step, msd, osd, st)
            (model if device.type == "cpu" and not args.fsdp else _fp32(sampler_model, msd)).save_pretrained(
                args.out, tokenizer=tok)
        D.barrier()

    bar = None
    if rank == 0 and (args.progress if args.progress is not None else sys.stderr.isatty()):
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=step, desc="rl", dynamic_ncols=True)
    while step < args.steps and stop["signal"] is None:
        t0 = time.time()
        batch = rollout(sampler_model, tok, task, stream, args, cfg, step)
        t_rollout = time.time() - t0
        metrics = update(wrapped, policy, ref, batch, args, cfg, tok.pad_id, device, ctl, tracker, step, opt)
        bad_steps = bad_steps + 1 if metrics["skipped"] else 0
        skipped_total += metrics["skipped"]
        if bad_steps >= args.max_bad_steps:
            raise TrainingStopped(f"{bad_steps} steps in a row had a non-finite loss or gradient; the last "
                                  f"checkpoint in {args.out} is intact: lower --lr or check the rewards")
        _copy_weights(sampler_model, model)
        step += 1
        st, r = batch["stats"], batch["rewards"]
        tot = D.all_reduce(torch.tensor([r.sum(), (r * r).sum(), r.numel(), batch["correct"].sum(),
                                         sum(map(len, batch["comps"])), len(batch["comps"]), st["groups_kept"],
                                         st["reward_errors"], st["reward_timeouts"]], dtype=torch.float64, device=device))
        mean = float(tot[0] / tot[2])
        metrics.update(step=step, reward_mean=mean, reward_std=max(float(tot[1] / tot[2]) - mean ** 2, 0.0) ** 0.5,
                       accuracy=float(tot[3] / tot[2]), response_len=float(tot[4] / tot[5]),
                       gen_batches=st["gen_batches"], groups_kept=int(tot[6]), reward_errors=int(tot[7]),
                       reward_timeouts=int(tot[8]), skipped_steps=skipped_total, lr=opt.param_groups[0]["lr"],
                       time_sample=t_rollout - st["score_s"], time_score=st["score_s"],
                       tokens_per_s=float(tot[4]) / max(time.time() - t0, 1e-9), seconds=time.time() - t_start)
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            metrics["eval_accuracy"] = evaluate(sampler_model, tok, task, args, device, eval_examples)
        _append_metrics(args.out, metrics)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{metrics['accuracy']:.3f}")
        elif step % 10 == 0 or step == args.steps:
            log(f"step {step}/{args.steps}: reward {metrics['reward_mean']:.3f} acc {metrics['accuracy']:.3f} "
                f"len {metrics['response_len']:.1f} {metrics['tokens_per_s']:.0f} tok/s")
        if step % args.save_every == 0 or step == args.steps or stop["signal"] is not None:
            checkpoint(step)
    if bar is not None:
        bar.close()
    if stop["signal"] is not None:
        log(f"stopped by signal {stop['signal']}: checkpoint saved at step {step}; continue with --resume")
        return 0
    acc_after = evaluate(sampler_model, tok, task, args, device, eval_examples)
    seconds = time.time() - t_start
    _summary(args.out, acc_before=acc_before, acc_after=acc_after, steps=step, seconds=round(seconds, 1),
             algo=cfg.name, task=task.name, model=args.model)
    if rank == 0:
        _plot(args.out)
    log(f"held-out greedy accuracy: before RL {acc_before:.3f} -> after RL {acc_after:.3f} "
        f"({step} steps, {seconds:.0f}s); policy saved in {args.out}/")
    return 0


def _fp32(sampler_model, model_state):
    """An fp32 Transformer holding the full policy weights, for save_pretrained from a copy or FSDP shards."""
    out = _copy_model(sampler_model, torch.float32)
    out.load_state_dict({k[len("model."):]: v for k, v in model_state.items() if k.startswith("model.")})
    return out


class TrainingStopped(RuntimeError):
    """The run cannot go on (it diverged); the last checkpoint is intact."""


def cli(argv=None):
    """main() with the failure modes a user can meet turned into one clear line and an exit code."""
    try:
        return main(argv)
    except UserError as e:  # bad input: nothing was written
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # the run cannot go on; its last checkpoint is intact
        print(f"error: {e}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:
        print(f"error: out of GPU memory on rank {D.rank()}; lower --micro-batch (sequences per forward), "
              f"--max-new-tokens or --prompts-per-step, or add --grad-checkpointing (or --fsdp on several GPUs)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before RL started (warm start, first eval); during RL a signal checkpoints
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        D.shutdown()


if __name__ == "__main__":
    sys.exit(cli())
