"""metrics.jsonl, the run's record, and the optional sinks that mirror it: TensorBoard and Weights & Biases.

metrics.jsonl (one JSON object per step, in --out) is the source of truth: every row is written there
first, rounded to 6 significant digits, and that same rounded row goes to each sink, so a plot in
TensorBoard or wandb shows exactly the numbers in the file. Sinks live on rank 0 only (as in TRL, verl and
nanochat) and each is an optional extra: `pip install 'nanorl[tensorboard]'` / `'nanorl[wandb]'`.

Names are grouped the way TRL / verl dashboards group them: rollout/ (what sampling and scoring saw),
train/ (the update), eval/ (held-out), time/ (throughput and phase times), e.g. reward_mean ->
rollout/reward_mean, loss -> train/loss, eval_accuracy -> eval/accuracy, time_sample -> time/sample.

    tensorboard  events in OUT/tensorboard/ (tensorboard --logdir OUT); a resumed run purges the steps it redoes
    wandb        wandb.init(project=$WANDB_PROJECT or "nanorl", name=$WANDB_NAME or the --out folder's name,
                 dir=OUT); WANDB_MODE=offline writes a local run in OUT/wandb/ (`wandb sync` uploads it later).
                 Continue a wandb run after --resume the wandb way: WANDB_RUN_ID=<id> WANDB_RESUME=allow.

The run's configuration (run.json's content) is logged once: as wandb's run config, as a text summary
"config" in TensorBoard.
"""

import atexit
import importlib.util
import json
import os

from nanorl import UserError
from nanorl import dist as D
from nanorl.checkpoint import atomic_file

SINKS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}  # name -> (module, extra)

# metrics that describe the rollout (sampling and scoring) rather than the update
ROLLOUT = {"reward_mean", "reward_std", "accuracy", "response_len", "gen_batches", "groups_kept", "reward_errors",
           "reward_timeouts", "turns", "obs_truncated"}
TIME = {"tokens_per_s", "seconds"}


def tag(key):
    """The grouped name a sink shows for a metrics.jsonl key."""
    for prefix, group in (("eval_", "eval"), ("time_", "time")):
        if key.startswith(prefix):
            return f"{group}/{key[len(prefix):]}"
    if key in TIME:
        return f"time/{key}"
    if key in ROLLOUT or key.startswith(("reward_", "response_", "tool_")):
        return f"rollout/{key}"
    return f"train/{key}"


def check(names):
    """Fail before anything is written when a requested sink's extra is not installed (one line, the fix)."""
    for name in names:
        module, extra = SINKS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--log {name} needs the {module} package; pip install 'nanorl[{extra}]' "
                            f"(or pip install {module}), or drop --log {name}")


def append_metrics(out, row):
    """Append one row to OUT/metrics.jsonl (rank 0) and return it as written (floats to 6 significant digits)."""
    row = {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in row.items()}
    if D.is_main():
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def trim_metrics(out, step):
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


def read_metrics(out):
    """The rows of OUT/metrics.jsonl."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


class Metrics:
    """metrics.jsonl plus the sinks; `metrics(row)` appends a row (with its "step") everywhere.

    The sinks open at the first row, i.e. after every input check has passed and --out is being written;
    `start_step` is the step a resumed run continues from (TensorBoard drops its events after it).
    """

    def __init__(self, out, sinks=(), config=None, start_step=0):
        self.out, self.names, self.config, self.start_step = out, list(dict.fromkeys(sinks)), config, start_step
        self.writers = None

    def open(self):
        """Start the sinks (rank 0; once): train.py calls it when it writes run.json, else the first row does."""
        if D.is_main() and self.names and self.writers is None:
            self.writers = [_OPEN[name](self.out, self.config or {}, self.start_step) for name in self.names]
            atexit.register(self.close)  # a run that stops on an error still flushes what it logged

    def __call__(self, row):
        row = append_metrics(self.out, row)
        if D.is_main() and self.names:
            self.open()
            scalars = {tag(k): float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
            for w in self.writers:
                w.log(scalars, row["step"])
        return row

    def close(self):
        for w in self.writers or []:
            w.close()
        self.writers = None


class _TensorBoard:
    def __init__(self, out, config, start_step):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run redoes the steps after its checkpoint; drop their old events
        self.w = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.w.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, scalars, step):
        for k, v in scalars.items():
            self.w.add_scalar(k, v, step)
        self.w.flush()  # one small write a step: the events are on disk when the step's jsonl line is

    def close(self):
        self.w.close()


class _WandB:
    def __init__(self, out, config, start_step):
        import wandb

        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "nanorl"), dir=out, config=config,
                                  name=os.environ.get("WANDB_NAME", os.path.basename(os.path.abspath(out))))
        except wandb.errors.Error as e:  # not logged in, no network: say how to log offline instead
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
            raise UserError(f"--log wandb: {msg}; or set WANDB_MODE=offline to write a local run "
                            f"(wandb sync uploads it later)") from None

    def log(self, scalars, step):
        self.run.log(scalars, step=step)

    def close(self):
        self.run.finish()


_OPEN = {"tensorboard": _TensorBoard, "wandb": _WandB}
