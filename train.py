"""The RL loop, end to end, on 1 CPU or N GPUs.

    python train.py                                         # the embedded default: tiny model, arith, GRPO, CPU
    python train.py --algo dapo --model smollm2-135m --task rg:basic_arithmetic --steps 4
    python train.py --task calc                             # multi-turn: the tiny model learns to call a calculator
    torchrun --nproc_per_node=8 train.py --algo grpo --model path/to/Qwen2.5-1.5B-Instruct --task gsm8k --data gsm8k/

One step (DESIGN.md): sample n episodes per prompt with nanorl.rollout (one turn, or several with tool
results / environment feedback injected between them) -> score them with the task's verifiable reward ->
shape rewards, drop constant groups (dynamic sampling draws more prompts) -> advantages -> for each epoch,
mini-batch and micro-batch: hidden states -> kernels.fused_logprobs -> algos.loss with globally all-reduced
normalising counts -> backward -> AdamW step -> metrics, eval, checkpoint. Any field of the --algo preset can be overridden: --eps-high 0.28, --kl-coef 0, ...

The policy keeps fp32 master weights; on GPU the forward runs under bf16 autocast (with --fsdp, FSDP2's bf16
MixedPrecisionPolicy) and the sampler uses a bf16 copy refreshed after every optimizer step, whose KV storage is
freed before each update. On one CPU process the sampler uses the policy itself. The update of every kind of
training (this RL loop, --algo sft, the warm start, --algo dpo|ipo) is nanorl/update.py's micro-batched step.
"""

import copy
import dataclasses
import json
import os
import shutil
import signal
import sys
import time

import torch

from nanorl import TrainingStopped, UserError, algos, async_loop, flags, lora, memplan, sinks
from nanorl import dist as D
from nanorl import update as U
from nanorl.checkpoint import atomic_file, latest_state, load_state, save_state
from nanorl.env import load_env
from nanorl.flags import RESUMABLE
from nanorl.model import config_summary, load_model
from nanorl.plot import plot
from nanorl.policy import autocast, collate, forward_all, token_matrix
from nanorl.preference import train_preference
from nanorl.reward_model import make_scorer
from nanorl.rollout import PromptStream, check_prompts, evaluate, policy_token_budget, rollout
from nanorl.sampler import DecodeGraphs
from nanorl.tasks import make_task
from nanorl.tokenizer import load_tokenizer, parse_template_kwargs
from nanorl.warm_start import sft_steps, warm_start

def parse_args(argv=None):
    """The run's settings (nanorl/flags.py: the flags, their defaults by model, --config files)."""
    return flags.parse_args(argv, __doc__)


# -----------------------------------------------------------------------------
# LoRA: adapters on the frozen base, saved as a PEFT adapter (nanorl/lora.py)


def apply_lora(model, tok, args, log, base_dir=None, fresh=True):
    """--lora-rank: freeze `model` and add adapters (or --lora-init's, to continue them). Returns the HF directory
    the saved adapter names as its base: base_dir (the warm-started init/), --model when it is an HF directory,
    else the base written once into OUT/base (an alias, a GGUF, a LoRA run), rewritten unless resuming."""
    if base_dir is None:
        hf = os.path.isfile(os.path.join(args.model, "config.json")) and not lora.is_adapter_dir(args.model)
        base_dir = args.model if hf else os.path.join(args.out, "base")
        if not hf and D.is_main() and (fresh or not os.path.isdir(base_dir)):
            model.save_pretrained(base_dir, tokenizer=tok)
        D.barrier()
    if args.lora_init:
        if not lora.is_adapter_dir(args.lora_init):
            raise UserError(f"--lora-init {args.lora_init}: no adapter_config.json there; pass a PEFT adapter directory")
        lora.load_adapter(model, args.lora_init, seed=args.seed)
        if model.lora_config["r"] != args.lora_rank:
            raise UserError(f"--lora-init {args.lora_init} has rank {model.lora_config['r']}; pass --lora-rank "
                            f"{model.lora_config['r']}")
    else:
        lora.add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_dropout, seed=args.seed)
    model.train()  # LoRA dropout in the trainer's forwards; the sampler's merged copy stays in eval mode
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    c = model.lora_config
    log(f"LoRA r={c['r']} alpha={c['lora_alpha']:g} on {','.join(c['target_modules'])}: {n / 1e6:.2f}M trainable "
        f"parameters, lr {args.lr:g}")
    return os.path.abspath(base_dir)


def save_policy(model, tok, args, lora_base, state):
    """The run's policy in --out: a PEFT adapter over lora_base (LoRA), else the full model in HF format,
    written from `state`, the policy's full state dict on the CPU (update.full_state; FSDP2 shards gathered),
    so no copy of the model is made on the device. Rank 0 only."""
    if lora_base is not None:
        lora.save_adapter(args.out, lora.adapter_tensors(state, "model."), model.lora_config, lora_base, tok)
    else:
        lora.remove_adapter(args.out)  # a LoRA run's leftovers would make load_model(OUT) load those
        model.save_pretrained(args.out, tokenizer=tok, state=U.model_state(state))


# -----------------------------------------------------------------------------
# the update of one rollout batch


def update(wrapped, policy, ref, batch, args, cfg, pad_id, device, ctl, tracker, step, opt):
    """Advantages, then ppo_epochs x mini_batches optimizer steps over the batch; returns metrics."""
    t0 = time.time()
    prompts, comps = batch["prompts"], batch["comps"]
    B, T, G = len(comps), max(map(len, comps)), cfg.group_size
    # micro-batches hold whole groups: each group is one packed row (collate), and reg / disco compare them
    mb = -(-args.micro_batch // G) * G
    valid = batch["valid"].to(device)
    masks = batch["masks"]  # the episode mask: injected tokens are context, never targets or counted
    mask = token_matrix(masks, T, device) * valid[:, None]
    truncated, R = batch["truncated"].to(device), batch["R"].to(device)
    n_updates = cfg.ppo_epochs * args.mini_batches
    old_lp = ent0 = values = ref_lp = None
    kl_reward = cfg.kl_in == "reward" and cfg.kl_coef > 0
    if (n_updates > 1 and not cfg.on_policy) or cfg.needs_value or cfg.top_entropy_quantile < 1 or kl_reward:
        old_lp, ent0, values = forward_all(policy, prompts, comps, pad_id, device, mb, args.temperature, G, masks)
    if ref is not None:
        with lora.disabled(ref.model):  # with LoRA the reference is the policy itself, adapters off
            ref_lp = forward_all(ref, prompts, comps, pad_id, device, mb, args.temperature, G, masks)[0]
    rollout_lp = token_matrix(batch["sampler_logp"], T, device)
    token_rewards, adv_info = None, {}
    if kl_reward:
        token_rewards = algos.kl_reward(R, old_lp, ref_lp, mask, ctl["kl"].value, cfg.kl_estimator)
    A = algos.advantages(R, G, cfg, mask=mask, token_rewards=token_rewards, values=values,
                         baseline=batch.get("baseline"), lengths=mask.sum(-1), prompt_ids=[ex.id for ex in batch["ex"]],
                         steps=batch["steps"], tracker=tracker, all_reduce=D.all_reduce, info=adv_info)
    A = A * (valid[:, None] if A.dim() == 2 else valid)  # padding groups carry no signal
    returns = None
    if cfg.needs_value:
        tr = token_rewards if token_rewards is not None else algos.last_token_rewards(R, mask)
        returns = algos.gae(tr, values, mask, cfg.gamma, cfg.lam)[1]
    sums, metrics, skipped = {}, {}, False
    per_mini = -(-(B // G) // args.mini_batches) * G  # rows per mini-batch, whole groups
    for epoch in range(cfg.ppo_epochs):
        for s0, e0 in U.spans(0, B, per_mini):
            chunks = U.spans(s0, e0, mb)
            counts = D.all_reduce(sum(algos.loss_counts(mask[s:e], cfg, truncated[s:e]) for s, e in chunks))
            thr = None
            if cfg.top_entropy_quantile < 1:  # one threshold for the whole mini-batch, over all ranks
                h = D.all_gather_cat(ent0[s0:e0][mask[s0:e0] > 0])
                thr = algos.entropy_quantile_threshold(h, torch.ones_like(h), cfg.top_entropy_quantile)

            def loss_of(span):  # one micro-batch: whole groups, normalised by the mini-batch's global counts
                s, e = span
                inp = collate(prompts[s:e], comps[s:e], pad_id, device, G, masks[s:e])
                Tc = inp["mask"].shape[1]
                m = inp["mask"] = inp["mask"] * valid[s:e, None]

                def cut(x):
                    return None if x is None else x[s:e, :Tc]
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
                return loss, mets

            lr = U.lr_at(args.lr, step, args.warmup_steps)
            norm = U.step(wrapped, opt, chunks, loss_of, lr, args.grad_clip, sums)
            if norm is None:  # not finite: the step was skipped, the weights kept; the caller counts these
                skipped = True
                continue
            metrics["grad_norm"] = norm
    for k, x in sums.items():  # each micro-batch's metric is its share of the mini-batch: sum, then average
        x = D.all_reduce(torch.as_tensor(x, device=device).clone(), "max" if k.endswith("_max") else "sum")
        metrics[k] = float(x) / (1 if k.endswith("_max") else n_updates)
    if "kl" in metrics and not skipped:  # a non-finite step must not poison the controllers
        ctl["kl"].update(metrics["kl"], args.prompts_per_step * G)
    if "entropy" in metrics and not skipped:
        ctl["entropy"].update(metrics["entropy"])
    metrics.update(adv_info)  # gigpo: step_group_size
    metrics.update(skipped=skipped, time_train=time.time() - t0)
    return metrics


# -----------------------------------------------------------------------------
# small helpers: copies, state, summary


def _copy_model(model, dtype=None):
    """A copy of model, its parameters in `dtype`: cast one by one, never a second full-precision model."""
    memo = {} if dtype is None else {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
                                     for p in model.parameters()}
    return copy.deepcopy(model, memo)


@torch.no_grad()
def _copy_weights(dst, src):
    """Refresh the sampler's copy of the policy (FSDP shards are gathered); no-op when they are one."""
    if dst is src:
        return
    dst_sd = dst.state_dict()
    for k, x in lora.merged_items(src):  # LoRA: W + (alpha / r) B A from the unmerged base, every time
        dst_sd[k].copy_(x.full_tensor() if hasattr(x, "full_tensor") else x)


def _states(policy, opt):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(policy, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_states(policy, opt, model_state, optim_state, strict=True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(policy, opt, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True, strict=strict))


def _merge_lora(args, tok):
    """--merge-lora: the run's merged full model (base + adapter) in HF format, in OUT/merged."""
    if args.merge_lora and D.is_main():
        load_model(args.out).save_pretrained(os.path.join(args.out, "merged"), tokenizer=tok)


def _tool_rate(ev):
    return f", tool-call rate {ev['tool_call_rate']:.2f}" if "tool_call_rate" in ev else ""


def _summary(out, **kw):
    if D.is_main():
        with atomic_file(os.path.join(out, "summary.json")) as f:
            json.dump(kw, f, indent=2)


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    args = parse_args(argv)
    if args.plan:  # the memory plan from the config alone: no weights, no processes, no --out
        return memplan.main(args)
    cfg, l_max_auto = args.cfg, vars(args).pop("l_max_auto", False)  # not a setting of the run (run.json)
    rank, world, device = D.init(args.dist_timeout)
    device = torch.device(args.device) if args.device else device
    t_start = time.time()
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
    lay = async_loop.split(args, rank, world)  # --rollout-ranks: this rank only trains or only samples
    if args.prompts_per_step % D.world_size():
        raise UserError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {D.world_size()} ranks")
    run_args = {k: v for k, v in vars(args).items() if k != "cfg"} | {"cfg": dataclasses.asdict(cfg)}
    state_dir = latest_state(args.out) if args.resume else None
    if args.resume and state_dir is None:
        raise UserError(f"--resume: no checkpoint in {args.out}/ckpt; drop --resume to start a new run")
    saved = load_state(state_dir, weights=False)[2] if state_dir else None  # the weights are read once, below
    if saved is not None:  # a different configuration would not continue the same run
        for k in sorted(set(saved["args"]) | set(run_args)):
            if k not in RESUMABLE and saved["args"].get(k) != run_args.get(k):
                raise UserError(f"--resume: {k} is {run_args.get(k)!r} but the run in {args.out} used "
                                f"{saved['args'].get(k)!r}; use the same settings or another --out")
    metrics_log = sinks.Metrics(args.out, args.log, run_args, saved["step"] if saved else 0)  # jsonl + --log sinks

    # everything that can fail on bad input happens before --out is written
    tok = load_tokenizer(args.model, args.chat_template, parse_template_kwargs(args.chat_template_kwargs))
    if cfg.kind == "pref":
        model = load_model(args.model, device=device, seed=args.seed)
        lora_base = apply_lora(model, tok, args, log) if args.lora_rank else None
        acc_before, acc_after, steps, secs, policy = train_preference(model, tok, args, cfg, device, log, metrics_log)
        state = U.full_state(policy)
        if D.is_main():
            save_policy(model, tok, args, lora_base, state)
        _merge_lora(args, tok)
        _summary(args.out, acc_before=acc_before, acc_after=acc_after, steps=steps, seconds=round(secs, 1), algo=cfg.name)
        log(f"held-out preference accuracy: before {acc_before:.3f} -> after {acc_after:.3f}")
        metrics_log.close()
        return 0
    task = make_task(args.task, data=args.data, seed=args.seed, reward_fn=args.reward_fn, prompt_key=args.prompt_key,
                     answer_key=args.answer_key)
    args.env_cls = load_env(args.env) if args.env else None
    if cfg.agg == "token_sum_norm" and l_max_auto:  # Dr.GRPO's L_max: an episode's policy-token budget
        cfg.l_max = policy_token_budget(args, task)
    eval_examples = task.eval_examples(args.eval_n)
    init_dir = os.path.join(args.out, "init")  # the warm-started model: the RL start and the KL reference
    model = load_model(init_dir if saved and args.warm_start_steps else args.model, device=device, seed=args.seed)
    check_prompts(task, tok, args, model.cfg.max_seq_len, eval_examples)
    if cfg.kind == "sft":  # --algo sft: the warm start's supervised loop as the whole run
        acc_before = evaluate(model, tok, task, args, device, eval_examples)
        DecodeGraphs.release(model)  # the sampler's KV storage is not kept through training
        lora_base = apply_lora(model, tok, args, log) if args.lora_rank else None
        policy = sft_steps(model, tok, task, args, device, args.steps, args.lr, log, desc="sft", on_metrics=metrics_log)
        state = U.full_state(policy)
        if D.is_main():
            save_policy(model, tok, args, lora_base, state)
        D.barrier()  # under FSDP2 the trained model is in shards: evaluate the saved policy (bf16 on GPU)
        sampler = load_model(args.out, torch.bfloat16 if device.type == "cuda" else None, device) \
            if args.fsdp and world > 1 else model
        acc_after = evaluate(sampler, tok, task, args, device, eval_examples)
        _merge_lora(args, tok)
        _summary(args.out, acc_before=acc_before, acc_after=acc_after, steps=args.steps,
                 seconds=round(time.time() - t_start, 1), algo=cfg.name)
        log(f"held-out greedy accuracy: before {acc_before:.3f} -> after SFT {acc_after:.3f}")
        metrics_log.close()
        return 0
    scorer = make_scorer(args, task, tok, device)  # learned rewards, loaded before anything is written
    if lay.role == "rollout":  # sample batches for the trainer ranks until they stop (nanorl/async_loop.py)
        return async_loop.rollout_rank(lay, model, tok, task, args, cfg, scorer, device)
    log(f"settings (defaults: {args.defaults}; flags override): lr {args.lr:g}, warm-up {args.warmup_steps}, "
        f"steps {args.steps}, prompts/step {args.prompts_per_step} x group {cfg.group_size}, max new tokens "
        f"{args.max_new_tokens}, temperature {args.temperature:g}, chat {str(args.chat).lower()}, warm start "
        f"{args.warm_start_steps} steps")
    if args.warm_start_steps and saved is None:
        model = warm_start(model, tok, task, args, device, log)
        if rank == 0:
            model.save_pretrained(init_dir, tokenizer=tok)
    # the KL reference: a frozen copy of the start, sharded like the policy under --fsdp
    ref = U.frozen(_copy_model(model), args) if cfg.needs_ref and not args.lora_rank else None
    # the sampler's weights: the policy itself on one CPU process, else a copy (bf16 on GPU) refreshed each step;
    # with LoRA always a copy, made before the adapters: a plain model that receives the merged weights
    sampler_model = model if device.type == "cpu" and not args.fsdp and not args.lora_rank else \
        _copy_model(model, torch.bfloat16 if device.type == "cuda" else None)
    lora_base = None
    if args.lora_rank:
        lora_base = apply_lora(model, tok, args, log, init_dir if args.warm_start_steps else None, fresh=saved is None)
        _copy_weights(sampler_model, model)  # --lora-init: the first evaluation and rollout sample base + adapter
    value_head = algos.ValueHead(model.cfg.hidden_size).to(device) if cfg.needs_value else None
    policy, wrapped = U.prepare(model, args, value_head)  # --grad-checkpointing, DDP / FSDP2
    if args.lora_rank and cfg.needs_ref:  # the reference is the same model with its adapters off: no copy
        ref = policy
    # fused: one kernel over all parameters (SmolLM2-135M on the CI CPU: 0.08 s a step instead of 0.42 s)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay, fused=not args.fsdp)
    ctl = {"kl": algos.AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon),
           "entropy": algos.AdaptiveEntropy(cfg.entropy_coef, cfg.entropy_target, cfg.entropy_delta, cfg.entropy_coef_max)}
    tracker = algos.make_tracker(cfg)
    stream = async_loop.Trainer(lay, sampler_model, model) if lay.role == "train" else PromptStream(task, rank, world)
    step, acc_before, bad_steps, skipped_total = 0, None, 0, 0
    if saved is not None:
        model_state, optim_state, _ = load_state(state_dir)
        _load_states(policy, opt, model_state, optim_state, strict=not args.lora_rank)
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
    ev = {}  # the held-out tool-call rate of tool tasks
    if acc_before is None:
        acc_before = evaluate(sampler_model, tok, task, args, device, eval_examples, ev)
        log(f"held-out greedy accuracy before RL: {acc_before:.3f}" + _tool_rate(ev))
    if rank == 0:
        if saved is None and os.path.isdir(os.path.join(args.out, "ckpt")):
            log(f"{args.out} held a previous run: starting over (continue a run with --resume instead)")
            shutil.rmtree(os.path.join(args.out, "ckpt"))
        os.makedirs(args.out, exist_ok=True)
        sinks.trim_metrics(args.out, step)
        with atomic_file(os.path.join(args.out, "run.json")) as f:  # how to prompt the policy: sample.py reads it
            json.dump(run_args, f, indent=2)
        metrics_log.open()
    stop = {"signal": None}
    for s in (signal.SIGINT, signal.SIGTERM):  # finish the step, checkpoint, exit cleanly
        signal.signal(s, lambda signum, frame: stop.__setitem__("signal", signum))

    def checkpoint(step):
        msd, osd = _states(policy, opt)
        if args.lora_rank:  # the frozen base is --model (or OUT/init, OUT/base): the checkpoint holds what trains
            msd = lora.trainable_state(msd, policy)
        st = dict(step=step, acc_before=acc_before, position=stream.position, args=run_args, skipped=skipped_total,
                  ctl={k: c.state_dict() for k, c in ctl.items()},
                  tracker=tracker.state_dict() if tracker is not None else None)
        if rank == 0:  # both written from the CPU state dicts: no second model on the device
            save_state(args.out, step, msd, osd, st)
            save_policy(model, tok, args, lora_base, msd)
        D.barrier()

    bar = None
    if rank == 0 and (args.progress if args.progress is not None else sys.stderr.isatty()):
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=step, desc="rl", dynamic_ncols=True)
    if lay.role == "train":
        stream.start(step)
    while step < args.steps and stop["signal"] is None:
        t0 = time.time()
        if lay.role == "train":  # the rollout ranks' samples, at most --max-staleness steps old
            batch = stream.next(step)
        else:
            batch = rollout(sampler_model, tok, task, stream, args, cfg, scorer)
        t_rollout = time.time() - t0
        if device.type == "cuda":  # its KV storage goes to the update (bench/RESULTS.md: memory vs re-capture)
            DecodeGraphs.release(sampler_model)
        metrics = update(wrapped, policy, ref, batch, args, cfg, tok.pad_id, device, ctl, tracker, step, opt)
        bad_steps = bad_steps + 1 if metrics["skipped"] else 0
        skipped_total += metrics["skipped"]
        if bad_steps >= args.max_bad_steps:
            raise TrainingStopped(f"{bad_steps} steps in a row had a non-finite loss or gradient; the last "
                                  f"checkpoint in {args.out} is intact: lower --lr or check the rewards")
        _copy_weights(sampler_model, model)
        step += 1
        if lay.role == "train":  # the new weights to the rollout ranks
            stream.publish(step)
        st, r, eps = batch["stats"], batch["rewards"], batch["episodes"]
        tot = D.all_reduce(torch.tensor([r.sum(), (r * r).sum(), r.numel(), batch["correct"].sum(),
                                         sum(sum(e.mask) for e in eps), len(eps), st["groups_kept"],
                                         st["reward_errors"], st["reward_timeouts"], sum(e.turns for e in eps),
                                         sum(e.tool_calls for e in eps), sum(e.tool_errors for e in eps),
                                         sum(e.obs_truncated for e in eps), sum(e.tool_calls > 0 for e in eps),
                                         sum(e.finish_reason == "env_error" for e in eps)],
                                        dtype=torch.float64, device=device))
        mean = float(tot[0] / tot[2])
        metrics.update(step=step, reward_mean=mean, reward_std=max(float(tot[1] / tot[2]) - mean ** 2, 0.0) ** 0.5,
                       accuracy=float(tot[3] / tot[2]), response_len=float(tot[4] / tot[5]),  # policy tokens only
                       turns=float(tot[9] / tot[5]), tool_calls=int(tot[10]), tool_errors=int(tot[11]),
                       obs_truncated=int(tot[12]), tool_call_rate=float(tot[13] / tot[5]), env_errors=int(tot[14]),
                       gen_batches=st["gen_batches"], groups_kept=int(tot[6]), reward_errors=int(tot[7]),
                       reward_timeouts=int(tot[8]), skipped_steps=skipped_total, lr=opt.param_groups[0]["lr"],
                       time_sample=t_rollout - st["score_s"], time_score=st["score_s"],
                       tokens_per_s=float(tot[4]) / max(time.time() - t0, 1e-9), seconds=time.time() - t_start)
        metrics.update(scorer.metrics(device) if scorer else {})
        metrics.update(stream.metrics(batch, metrics) if lay.role == "train" else {})  # staleness, ESS
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            metrics["eval_accuracy"] = evaluate(sampler_model, tok, task, args, device, eval_examples)
        metrics_log(metrics)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{metrics['accuracy']:.3f}")
        elif step % 10 == 0 or step == args.steps:
            log(f"step {step}/{args.steps}: reward {metrics['reward_mean']:.3f} acc {metrics['accuracy']:.3f} "
                f"len {metrics['response_len']:.1f} {metrics['tokens_per_s']:.0f} tok/s")
        if step % args.save_every == 0 or step == args.steps or stop["signal"] is not None:
            checkpoint(step)
    if lay.role == "train":
        stream.finish()
    if bar is not None:
        bar.close()
    metrics_log.close()
    if stop["signal"] is not None:
        log(f"stopped by signal {stop['signal']}: checkpoint saved at step {step}; continue with --resume")
        return 0
    acc_after = evaluate(sampler_model, tok, task, args, device, eval_examples, ev)
    _merge_lora(args, tok)
    seconds = time.time() - t_start
    _summary(args.out, acc_before=acc_before, acc_after=acc_after, steps=step, seconds=round(seconds, 1),
             algo=cfg.name, task=task.name, model=args.model,
             **({"tool_call_rate_after": ev["tool_call_rate"]} if "tool_call_rate" in ev else {}))
    if rank == 0:
        plot(args.out)
    log(f"held-out greedy accuracy: before RL {acc_before:.3f} -> after RL {acc_after:.3f} "
        f"({step} steps, {seconds:.0f}s){_tool_rate(ev)}; policy saved in {args.out}/")
    return 0


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
        print(f"error: out of GPU memory on rank {D.rank()}; {U.OOM_HINT}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before RL started (warm start, first eval); during RL a signal checkpoints
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        D.shutdown()


if __name__ == "__main__":
    sys.exit(cli())
