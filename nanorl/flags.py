"""train.py's command line: the flags, their defaults by model (tiny / real on a CPU / real on a GPU, and
the lr by model size), a --config file's values (nanorl/config.py), and the checks that turn a bad value
into one error line before anything runs.

    args = parse_args(["--algo", "dapo", "--eps-high", "0.3"])   # args.cfg: the resolved AlgoConfig
"""

import argparse
import dataclasses
import sys

import torch

from nanorl import UserError, algos, config, sinks
from nanorl.model import param_count

# flags that may differ between a run and its --resume (everything else must match)
RESUMABLE = {"steps", "resume", "save_every", "eval_every", "eval_n", "out", "dist_timeout", "progress", "max_bad_steps",
             "log", "config", "merge_lora", "plan", "plan_memory", "plan_ranks", "plan_prompt_tokens"}


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


def parse_args(argv=None, description=None):
    """The run's settings from argv (default sys.argv); description: the --help text (train.py's docstring)."""
    p = ArgParser(prog="train.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="TOML file of flag values, e.g. recipes/dapo.toml (or a run.json); "
                   "flags given here win (nanorl/config.py)")
    # what to train
    p.add_argument("--algo", default="grpo", help=f"preset: {', '.join(algos.PRESETS)}")
    p.add_argument("--model", default="tiny", help="HF directory, .gguf file, 'tiny' or 'smollm2-135m'")
    p.add_argument("--task", default="arith", help="arith | countdown | gsm8k | math | rg:NAME")
    p.add_argument("--data", default=None, help="gsm8k / math data: .jsonl, .parquet (verl's too), a save_to_disk "
                   "dir or a dir with train.jsonl; the dpo/ipo pairs")
    p.add_argument("--prompt-key", default=None, help="the data's prompt field (default: the task's, else verl's prompt)")
    p.add_argument("--answer-key", default=None, help="the data's answer field, dotted if nested (default: the task's, "
                   "else reward_model.ground_truth)")
    p.add_argument("--reward-fn", default=None, help="module:function or file.py:function replacing the task reward")
    p.add_argument("--chat", default=None, type=_parse_value(bool), help="use the chat template (default: DEFAULTS)")
    p.add_argument("--chat-template", default=None, help="a .jinja file replacing the model's chat template")
    p.add_argument("--chat-template-kwargs", action="append", default=[], metavar="KEY=VALUE",
                   help="a variable for the chat template, e.g. enable_thinking=false (repeatable)")
    p.add_argument("--reward-timeout", type=float, default=10.0, help="seconds a reward call may take before it scores 0")
    # learned rewards (nanorl/reward_model.py): reward = task reward + weight * learned reward
    p.add_argument("--reward-model", default=None, help="HF *ForSequenceClassification dir (score head, num_labels=1)")
    p.add_argument("--reward-model-weight", type=float, default=1.0)
    p.add_argument("--reward-model-norm", default="none", choices=("none", "sigmoid", "batch"),
                   help="raw score, sigmoid(score), or z-score over each scored batch")
    p.add_argument("--judge-model", default=None, help="any causal LM: reward += weight * P(yes) to --judge-prompt")
    p.add_argument("--judge-prompt", default=None, help="text file with {completion} (and {question}, {answer})")
    p.add_argument("--judge-weight", type=float, default=1.0)
    # rollout
    p.add_argument("--prompts-per-step", type=int, default=None, help="prompts per step over all ranks (default: DEFAULTS)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: DEFAULTS")
    p.add_argument("--temperature", type=float, default=None, help="default: DEFAULTS")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    # multi-turn episodes (nanorl/rollout.py, env.py): tools and environment feedback
    p.add_argument("--env", default=None, help="module:Class or file.py:Class: your environment (nanorl/env.py)")
    p.add_argument("--max-turns", type=int, default=None, help="policy turns per episode (default: the task's; 1 for plain tasks)")
    p.add_argument("--max-episode-tokens", type=int, default=None, help="policy + injected tokens (default: 2 x turns x --max-new-tokens)")
    p.add_argument("--max-obs-tokens", type=int, default=None, help="cut observations' contents in the middle to fit")
    p.add_argument("--max-tool-output-chars", type=int, default=4000,
                   help="cut longer tool results / observations in the middle, with a marker, before templating")
    p.add_argument("--env-timeout", type=float, default=60.0, help="seconds an environment's reset / step may take; "
                   "one that raises or runs longer ends its episode as env_error (masked out of the loss)")
    p.add_argument("--tool-workers", type=int, default=32, help="tool calls run at once (forked worker processes)")
    p.add_argument("--max-tool-calls-per-turn", type=int, default=8, help="tool calls run per turn; the rest get an error")
    p.add_argument("--tool-memory-mb", type=float, default=1024.0, help="memory a tool worker may allocate (MiB)")
    p.add_argument("--tool-cpu-s", type=float, default=10.0, help="CPU seconds a tool call may use; past it its worker dies")
    # optimisation
    p.add_argument("--steps", type=int, default=None, help="RL steps (default: DEFAULTS)")
    p.add_argument("--lr", type=float, default=None, help="default: TINY_LR, or REAL_LR by the model's size")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up, then a constant lr (default: DEFAULTS)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--mini-batches", type=int, default=1, help="optimizer steps per epoch over a rollout batch")
    p.add_argument("--micro-batch", type=int, default=64, help="sequences per forward/backward")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward: less memory")
    # LoRA (nanorl/lora.py): adapters on the frozen base, saved as a PEFT adapter; 0 = full fine-tuning
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank r (0: full fine-tuning); lr default x10")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="the update is scaled by alpha / r")
    p.add_argument("--lora-targets", default="all-linear", help="all-linear (q k v o gate up down) or a comma list")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-init", default=None, help="a PEFT adapter dir to continue training (its base is --model)")
    p.add_argument("--merge-lora", action="store_true", help="also write the merged full HF model to OUT/merged")
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
    p.add_argument("--log", action="append", default=[], choices=tuple(sinks.SINKS),
                   help="also log metrics.jsonl's rows to tensorboard / wandb (repeatable; nanorl/sinks.py)")
    # systems
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--fsdp", action="store_true", help="shard the policy with FSDP2 (fully_shard) under torchrun")
    p.add_argument("--kernel-impl", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument("--dist-timeout", type=int, default=600, help="seconds a rank waits for the others")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite steps in a row")
    # the memory plan (nanorl/memplan.py): predicted peak memory per rank from the config alone, then exit
    p.add_argument("--plan", action="store_true", help="print the memory plan of these flags and exit; loads no weights "
                   "(an HF directory holding only config.json will do)")
    p.add_argument("--plan-memory", default=None, help="device memory per rank to plan for, e.g. 80GB or 80GiB "
                   "(default: this machine's GPU, or its RAM with --device cpu)")
    p.add_argument("--plan-ranks", type=int, default=None, help="ranks to plan for, e.g. 8 for a torchrun job not yet "
                   "started (default: WORLD_SIZE, else 1)")
    p.add_argument("--plan-prompt-tokens", type=int, default=None, help="prompt length the plan assumes "
                   "(default: 256, or a quarter of a shorter context)")
    # asynchronous RL (nanorl/async_loop.py): R of the torchrun ranks only generate, the others only train
    p.add_argument("--rollout-ranks", type=int, default=0, help="R ranks that only sample (0: every rank samples "
                   "then trains, the synchronous loop)")
    p.add_argument("--max-staleness", type=int, default=None, help="K: a sample's policy is at most K steps older "
                   "than the step that trains on it (default 1 with --rollout-ranks; 0 = synchronous)")
    p.add_argument("--rollout-slots", type=int, default=None, help="decode slots of a streaming rollout rank "
                   "(continuous batching, K >= 1; default: its rows per step, prompts-per-step / R x group size)")
    # every field of the --algo preset, e.g. --eps-high 0.28 --kl-coef 0 --agg token_mean
    g = p.add_argument_group("algorithm settings (default: the --algo preset's)")
    for f in dataclasses.fields(algos.AlgoConfig):
        if f.name in ("name", "doc", "seed"):  # seed: the trainer seeds clip_cov from --seed
            continue
        kind = type(f.default) if f.default is not None else float
        flags = ["-n", "--group-size"] if f.name == "group_size" else [f"--{f.name.replace('_', '-')}"]
        g.add_argument(*flags, dest=f"algo_{f.name}", default=argparse.SUPPRESS, type=_parse_value(kind),
                       metavar=kind.__name__.upper())
    config.apply(p, argv)  # the --config file's values become the defaults
    args = p.parse_args(argv)
    tiny = args.model == "tiny"
    lora_lr = args.lora_rank > 0 and args.lr is None  # LoRA Without Regret: ~10x the full fine-tuning lr
    # --plan without --device plans a GPU run (nanorl/memplan.py), with the GPU's defaults
    gpu = (args.device or ("cuda" if torch.cuda.is_available() or args.plan else "cpu")).startswith("cuda")
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
    args.lr *= 10 if lora_lr else 1
    if args.lora_rank < 0 or (args.lora_rank == 0 and (args.lora_init or args.merge_lora)):
        raise UserError(f"--lora-rank {args.lora_rank}: use r >= 1 with --lora-init / --merge-lora (0 = full fine-tuning)")
    overrides = {k[5:]: v for k, v in vars(args).items() if k.startswith("algo_")}
    # Dr.GRPO's L_max: the most policy tokens an episode holds (train.py makes it turns x --max-new-tokens once
    # the task is known, unless --l-max is given)
    args.l_max_auto = "l_max" not in overrides
    if args.rollout_ranks < 0:
        raise UserError(f"--rollout-ranks {args.rollout_ranks} must be >= 0 (0: the synchronous loop)")
    if args.max_staleness is not None and (args.max_staleness < 0 or not args.rollout_ranks):
        raise UserError(f"--max-staleness {args.max_staleness} needs --rollout-ranks R >= 1 and K >= 0 (asynchronous "
                        f"RL); drop it for the synchronous loop")
    if args.rollout_slots is not None and (args.rollout_slots < 1 or not args.rollout_ranks):
        raise UserError(f"--rollout-slots {args.rollout_slots} needs --rollout-ranks R >= 1 and S >= 1 (a streaming "
                        f"rollout rank's decode slots); drop it for the synchronous loop")
    if args.rollout_ranks and args.max_staleness is None:
        args.max_staleness = 1
    if args.max_staleness:  # stale samples: truncated importance sampling pi_old / pi_sampler unless set otherwise
        overrides.setdefault("is_level", "token")
    if overrides.get("agg", algos.PRESETS.get(args.algo, algos.AlgoConfig()).agg) == "token_sum_norm":
        overrides.setdefault("l_max", args.max_new_tokens)
    try:
        args.cfg = algos.make_config(args.algo, **overrides)
    except ValueError as e:
        raise UserError(str(e)) from None
    for name in ("prompts_per_step", "max_new_tokens", "micro_batch", "mini_batches", "eval_n", "max_turns",
                 "max_episode_tokens", "max_obs_tokens", "max_tool_output_chars", "tool_workers",
                 "max_tool_calls_per_turn"):
        if getattr(args, name) is None:
            continue
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    for name in ("env_timeout", "tool_memory_mb", "tool_cpu_s"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be > 0 (or none: no limit)")
    sinks.check(args.log)
    return args
