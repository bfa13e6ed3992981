"""train.py under torchrun with probes for tests/test_async.py: random delays on both sides of asynchronous RL,
and a record of what each side saw, one JSON line per event in $NANORL_PROBE/<role>-<rank>.jsonl.

    NANORL_PROBE=dir NANORL_PROBE_DELAY=0.3 torchrun --nproc_per_node=2 tests/async_probe.py <train.py flags>

Records: "take" (trainer: step, the sample's version, the example ids it trains), "publish" (trainer 0: version,
layout, a hash of its sampler's weights), "receive" (rollout: version, a hash of its sampler's weights).
NANORL_PROBE_FAIL=N: the rollout rank raises in its N-th batch (per batch or streaming: its N-th share pushed).
"""

import hashlib
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from nanorl import async_loop  # noqa: E402
from nanorl import dist as D  # noqa: E402

OUT, DELAY = os.environ["NANORL_PROBE"], float(os.environ.get("NANORL_PROBE_DELAY", "0"))
FAIL = int(os.environ.get("NANORL_PROBE_FAIL", "0"))
rng = random.Random(int(os.environ.get("RANK", "0")))


def record(role, **kw):
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"{role}-{os.environ.get('RANK', '0')}.jsonl"), "a") as f:
        f.write(json.dumps(kw) + "\n")


def weights_hash(model):
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def delayed(fn):
    def run(*a, **k):
        time.sleep(rng.uniform(0, DELAY))
        return fn(*a, **k)
    return run


batches = [0]
real_rollout = async_loop.rollout


def rollout(*a, **k):
    batches[0] += 1
    if batches[0] == FAIL:
        raise RuntimeError("the rollout rank failed on purpose")
    time.sleep(rng.uniform(0, DELAY))
    return real_rollout(*a, **k)


real_push = async_loop.Streamer.push


def push(self, j, b):  # a streaming rollout rank: the same delays and failure, per batch pushed
    batches[0] += 1
    if batches[0] == FAIL:
        raise RuntimeError("the rollout rank failed on purpose")
    time.sleep(rng.uniform(0, DELAY))
    return real_push(self, j, b)


async_loop.rollout, async_loop.Streamer.push = rollout, push
train.update = delayed(train.update)

real_next, real_take = async_loop.Trainer.next, async_loop.Trainer._take
real_publish, real_receive = async_loop.Trainer.publish, async_loop.Weights.receive


def take(self, step, r):
    share = real_take(self, step, r)
    record("train", event="take", step=step, version=share["version"], versions=share["versions"],
           ids=[e.id for e in share["batch"]["ex"]], stream=share.get("stream"), position=share["position"])
    return share


def publish(self, version, first=False):
    real_publish(self, version, first)
    if D.rank() == 0:
        record("train", event="publish", version=version, hash=weights_hash(self.sampler_model),
               layout=async_loop.FULL if first or not async_loop.lora.has_lora(self.model) else async_loop.ADAPTERS)


def receive(self):
    version = real_receive(self)
    record("rollout", event="receive", version=version, hash=weights_hash(self.sampler))
    return version


async_loop.Trainer._take, async_loop.Trainer.publish, async_loop.Weights.receive = take, publish, receive
sys.exit(train.cli())
