"""Held-out accuracy vs training wall-clock: nanorl vs TRL's GRPOTrainer, same model, task, preset and settings.

    python bench/learning.py                               # CPU: the warm-started tiny model on arith (~10 min)
    python bench/learning.py --model smollm2-135m          # CPU: SmolLM2-135M-Instruct with train.py's recipe
    python bench/learning.py --model path/to/hf_model --task gsm8k --device cuda --steps 200 --eval-every 20

The recipe (prompts per step, group size, max new tokens, lr, warm-up, steps, chat template) is train.py's
defaults for the model (flags.DEFAULTS, flags.REAL_LR) unless a flag here sets it; the task defaults to
arith for the tiny model and arith:digits=1,terms=3 for a real one.

Both train the same starting checkpoint with GRPO as its paper defines it (group z-scored advantages,
token-ratio clip 0.2, k3 KL to the initial policy with beta 0.04, seq-mean-token-mean: TRL's loss_type
"grpo"), the same prompts per step, group size, max new tokens, temperature, learning rate with a
warm-up then constant, one optimizer step per rollout, and are evaluated every `--eval-every` steps on
the same held-out problems by the same greedy decoder (nanorl's sampler, on a copy of the weights), the
evaluation time excluded from the clock. With --model tiny the starting point is nanorl's cached
supervised warm start of the embedded default; a real model starts from its own weights (a GGUF is
written out once as an fp32 HF checkpoint, which both load). Writes bench/learning.png (tiny),
bench/learning-smollm2.png (smollm2-135m) or bench/learning-<name>.png.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def held_out_accuracy(model, tok, task, a):
    """Greedy accuracy with nanorl's sampler (the same decoder for both frameworks)."""
    import train

    args = argparse.Namespace(eval_n=a.eval_n, chat=a.chat, max_new_tokens=a.max_new_tokens, reward_timeout=10.0)
    return train.evaluate(model, tok, task, args, model.device)


def run_nanorl(a):
    import train

    out = os.path.join(a.work, "nanorl")
    argv = ["--model", a.model_dir, "--task", a.task, "--chat", str(a.chat).lower(), "--algo", "grpo",
            "--prompts-per-step", str(a.prompts), "-n", str(a.samples), "--max-new-tokens", str(a.max_new_tokens),
            "--micro-batch", str(a.micro_batch), "--lr", str(a.lr), "--warmup-steps", str(a.warmup), "--steps", str(a.steps),
            "--eval-every", str(a.eval_every), "--eval-n", str(a.eval_n), "--out", out, "--progress", "false",
            "--save-every", "1000000", "--device", a.device,
            "--temperature", str(a.temperature), "--warm-start-steps", "0"]
    assert train.main(argv) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    summary = json.load(open(os.path.join(out, "summary.json")))
    curve, clock = [(0.0, summary["acc_before"])], 0.0
    for r in rows:  # the step's own time: sampling + scoring + training, no evaluation
        clock += r["time_sample"] + r["time_score"] + r["time_train"]
        if "eval_accuracy" in r:
            curve.append((clock, r["eval_accuracy"]))
    curve.append((clock, summary["acc_after"]))
    return curve


def run_trl(a):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nanorl.model import load_model
    from nanorl.tasks import make_task
    from nanorl.tokenizer import load_tokenizer

    task, tok = make_task(a.task), load_tokenizer(a.model_dir)
    exs = [task.train_example(i) for i in range(a.prompts * a.steps)]
    by_prompt = {task.prompt(ex, tok, a.chat): ex for ex in exs}
    ds = Dataset.from_list([{"prompt": task.prompt(ex, tok, a.chat)} for ex in exs])
    evaluator = load_model(a.model_dir, device=a.device)

    def reward(prompts, completions, **kw):
        return [task.reward(c, by_prompt[p]) for p, c in zip(prompts, completions)]

    curve = []

    class Clock(TrainerCallback):
        clock = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            if a.device == "cuda":
                torch.cuda.synchronize()
            self.clock += time.perf_counter() - self.t0
            if state.global_step % a.eval_every == 0 or state.global_step == a.steps:
                sd = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
                evaluator.load_state_dict({k: sd[k] for k in evaluator.state_dict()})
                curve.append((self.clock, held_out_accuracy(evaluator, tok, task, a)))

    n = a.prompts * a.samples
    cfg = GRPOConfig(output_dir=os.path.join(a.work, "trl"), report_to=[], use_cpu=a.device == "cpu",
                     bf16=a.device == "cuda", per_device_train_batch_size=n, generation_batch_size=n,
                     num_generations=a.samples, max_completion_length=a.max_new_tokens, learning_rate=a.lr,
                     lr_scheduler_type="constant_with_warmup", warmup_steps=a.warmup, max_steps=a.steps, logging_steps=10,
                     save_strategy="no", beta=0.04, epsilon=0.2, temperature=a.temperature, top_p=1.0, top_k=0, loss_type="grpo",
                     scale_rewards="group", seed=0, shuffle_dataset=False, max_grad_norm=1.0, weight_decay=0.0,
                     adam_beta2=0.999)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    curve.append((0.0, held_out_accuracy(evaluator, tok, task, a)))
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds,
                          processing_class=AutoTokenizer.from_pretrained(a.model_dir), callbacks=[Clock()])
    trainer.train()
    return curve


def prepare(a, path):
    """The starting checkpoint: --model as given, or for 'tiny' nanorl's (cached) supervised warm start."""
    import torch

    import train
    from nanorl.model import load_model
    from nanorl.tasks import make_task
    from nanorl.tokenizer import load_tokenizer

    tok = load_tokenizer(a.model)
    model = load_model(a.model, device=a.device)
    if a.model == "tiny":
        args = train.parse_args(["--task", a.task])
        model = train.warm_start(model, tok, make_task(a.task), args, torch.device(a.device), print)
    model.save_pretrained(path, tokenizer=tok)


def recipe(a):
    """Fill the settings left unset with train.py's defaults for the model: the recipe a user gets."""
    import train

    a.task = a.task or ("arith" if a.model == "tiny" else "arith:digits=1,terms=3")
    d = train.parse_args(["--model", a.model, "--task", a.task, "--device", a.device])
    for mine, theirs in (("chat", "chat"), ("prompts", "prompts_per_step"), ("max_new_tokens", "max_new_tokens"),
                         ("temperature", "temperature"), ("lr", "lr"), ("warmup", "warmup_steps"), ("steps", "steps")):
        if getattr(a, mine) is None:
            setattr(a, mine, getattr(d, theirs))
    a.samples = a.samples or d.cfg.group_size


def plot_path(model):
    name = {"tiny": "", "smollm2-135m": "-smollm2"}.get(model, "-" + os.path.basename(os.path.normpath(model)))
    return os.path.join(ROOT, "bench", f"learning{name}.png")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--task", default=None, help="default: arith (tiny), arith:digits=1,terms=3 (a real model)")
    p.add_argument("--chat", default=None, type=lambda s: s.lower() in ("1", "true", "yes"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--micro-batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    recipe(a)
    if a.worker:
        curve = run_nanorl(a) if a.worker == "nanorl" else run_trl(a)
        print("RESULT " + json.dumps(curve), flush=True)
        return
    curves = {}
    with tempfile.TemporaryDirectory() as work:
        model_dir = os.path.join(work, "model")
        prepare(a, model_dir)
        for name in ("nanorl", "trl"):  # separate processes: neither inherits the other's threads or memory
            cmd = [sys.executable, __file__, "--worker", name, "--model-dir", model_dir, "--work", work] + sys.argv[1:]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            curves[name] = json.loads(line[0][7:])
            print(name, " ".join(f"{t:.0f}s:{acc:.3f}" for t, acc in curves[name]), flush=True)
    trl_final = curves["trl"][-1][1]
    reach = next((t for t, acc in curves["nanorl"] if acc >= trl_final), None)
    trl_time = curves["trl"][-1][0]
    if reach is None:
        print(f"TRL final accuracy {trl_final:.3f} in {trl_time:.0f}s; nanorl never reached it "
              f"(final {curves['nanorl'][-1][1]:.3f} in {curves['nanorl'][-1][0]:.0f}s)")
    else:
        print(f"TRL final accuracy {trl_final:.3f} in {trl_time:.0f}s; nanorl reached it in {reach:.0f}s "
              f"({reach / trl_time:.2f} of TRL's time); nanorl final {curves['nanorl'][-1][1]:.3f}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot(*zip(*curve), "o-", label=name)
    ax.set_xlabel("training wall-clock seconds (evaluation excluded)")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title(f"GRPO on {a.task}, {a.model}, {a.device}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(plot_path(a.model), dpi=100)


if __name__ == "__main__":
    main()
