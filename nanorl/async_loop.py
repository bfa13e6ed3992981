"""Asynchronous RL: rollout ranks sample while trainer ranks train, with bounded staleness.

    torchrun --nproc_per_node=N train.py --rollout-ranks R --max-staleness K ...

The last R ranks only sample (nanorl.rollout, on their own copy of the policy); the first N - R only train
(train.py's loop, with DDP or FSDP2 among themselves: dist.use_group points every collective at their
group). The trainers' step j trains on batch j, which the R rollout ranks make together, each its share
of the prompts, exactly as R synchronous ranks would. Three channels connect the two sides (1-3), and a
rollout rank keeps its decode slots full (4):

1. Samples. A rollout rank puts its share of batch j, pickled, into the job's TCP store (key batch/j/r),
   with the policy version of each group, its exact behaviour logprobs (Episode.sampling_logprobs) and its
   prompt stream's position just after batch j's prompts. A write never waits for a reader, so the rollout
   side runs ahead.
2. Admission (AReaL, arXiv 2505.24298, `max_head_offpolicyness`). A rollout rank starts batch j only with
   weights of version >= j - K, where version v = the weights after v training steps. So the step that
   trains batch j sees a staleness j - v in [0, K] for every group, and the trainers check it. K = 0 is the
   synchronous loop with its two halves on different ranks: the same samples, the same update, bit for bit.
3. Weights. After every step (one batch: its --mini-batches x ppo_epochs optimizer steps, 1 by default)
   the trainers gather the weights the same way on every rank (the sampler copy that train.py's
   _copy_weights refreshes from the FSDP shards; with LoRA the LoRA model's own parameters), and trainer
   0 broadcasts version v over the group [trainer 0] + rollout ranks, asynchronously: a header (v, layout,
   checksum), then one flat buffer per dtype. Between two batches (streaming: between two decode steps) a
   rollout rank takes every announced version, in order, checks its checksum and finds it in place: its
   sampler's parameters are views into the flat buffers it receives into, so their storage never moves
   (captured CUDA graphs stay valid).
   With LoRA only the adapters travel after the first version, and the rollout rank merges them into its
   sampler itself. (Tested with gloo on CPUs only: under NCCL trainer 0's broadcast stays pending on the
   GPU until the rollout ranks reach their next batch boundary or decode step.)

4. Streaming (K >= 1 on single-turn tasks, without DAPO's dynamic sampling or ReMax's greedy baseline; the
   rank logs which path runs). Batch by batch, a rollout rank's longest answer would hold its whole batch;
   instead (Streamer) it keeps --rollout-slots decode slots full (nanorl/continuous.py's Engine, Orca's
   continuous batching): the prompts come group by group from its PromptStream, a group of batch j is
   admitted (queued for free slots) once the weights have version >= j - K, and when a row finishes the next
   row waiting takes its slot, at the same decode step, so batch j + 1's groups decode beside batch j's
   longest rows (stream_overlap_steps counts those steps). Between decode steps the rank takes every version
   announced, in place (PipelineRL's in-flight update, arXiv 2509.19128), each rollout rank on its own: the
   store tells it the version and the stop flag, no collective among the rollout ranks. The rows decoding go
   on with the new weights over their cache as the old weights wrote it, as in PipelineRL: a row's later
   tokens come from newer weights attending to keys and values of older ones, and its behaviour logprobs are
   exactly the probabilities each token was drawn with (so the IS weight below sees this mixture as it is).
   A group's version is the weights its first row was admitted with (the oldest that produced any of its
   tokens), so 0 <= trained step - version <= K holds per group. When all of batch j's rows are done (and
   batch j - 1's share is out) the rank scores them and builds the batch as rollout.rollout does
   (rollout.make_batch), then pushes the share.

The loss corrects the staleness with the rollout importance weight pi_old / mu (algos.token_weights:
is_level, is_mode, is_threshold; truncated token-level IS, threshold 2, by default when K >= 1: Yao et al.'s
TIS). nanorl's sampler logprobs equal the trainer's, so that ratio measures staleness alone, never an
inference engine's numerical mismatch. With ppo_epochs > 1 the proximal policy is recomputed and the same
weight makes it decoupled PPO (AReaL). Each step logs the staleness histogram, the fraction of tokens whose
weight was truncated or masked (is_clip_frac) and the effective sample size (is_ess, in (0, 1]).

Resume: only the trainers checkpoint. The checkpoint's `position` is each rollout rank's prompt-stream
position after the last trained batch's prompts (a streaming rank has drawn further: each share carries
the position just after its own batch), so a restarted job drops whatever was in flight and the rollout
ranks re-dispatch those prompts: none skipped, none trained twice. A rank that dies takes the job down
(torchrun); a rank that hangs is named by the one waiting on it within --dist-timeout.
"""

import datetime
import pickle
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nanorl import TrainingStopped, UserError, lora
from nanorl import dist as D
from nanorl.continuous import Engine
from nanorl.env import SingleTurnEnv
from nanorl.rollout import (PromptStream, encode_prompt, episode_args, example_seed, make_batch, rollout, run_episodes,
                            shaped_groups)


@dataclass
class Layout:
    """Who this rank is: role "sync" (no --rollout-ranks), "train" or "rollout"; index on its side."""
    role: str
    R: int = 0
    T: int = 0
    K: int = 0
    index: int = 0
    timeout: float = 600.0
    wsync: object = None   # process group [trainer 0] + rollout ranks: weights
    store: object = None   # the job's TCP store: samples, versions, the stop flag


def split(args, rank, world):
    """Make the trainer / rollout process groups (every rank, in the same order) and point nanorl.dist at ours."""
    R = args.rollout_ranks
    if not R:
        return Layout("sync")
    if args.cfg.kind in ("sft", "pref"):
        raise UserError(f"--rollout-ranks: --algo {args.cfg.name} does not sample; drop --rollout-ranks")
    if R >= world:
        raise UserError(f"--rollout-ranks {R} leaves no trainer among {world} rank(s); launch more with "
                        f"torchrun --nproc_per_node=N, N > {R}")
    T = world - R
    for n, side in ((T, "trainer"), (R, "rollout")):
        if args.prompts_per_step % n:
            raise UserError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {n} {side} ranks")
    timeout = datetime.timedelta(seconds=args.dist_timeout)
    groups = [dist.new_group(list(r), timeout=timeout) for r in (range(T), range(T, world), [0, *range(T, world)])]
    role = "train" if rank < T else "rollout"
    D.use_group(groups[0] if role == "train" else groups[1])
    store = dist.PrefixStore("nanorl-async/", dist.distributed_c10d._get_default_store())
    return Layout(role, R, T, args.max_staleness, rank if role == "train" else rank - T, args.dist_timeout,
                  groups[2], store)


# -----------------------------------------------------------------------------
# weights: named tensors <-> one flat buffer per dtype


class Flat:
    """Named tensors laid out in one flat buffer per dtype, in the order given, each at an offset aligned to
    64 elements (the allocator's alignment: a view computes like a fresh tensor). Both sides build it from
    the same module structure, so a buffer means the same thing on both."""

    ALIGN = 64

    def __init__(self, named):
        self.slots, self.sizes = [], {}
        for name, t in named:
            dt = t.dtype
            off = self.sizes.get(dt, 0)
            self.slots.append((name, dt, off, tuple(t.shape)))
            self.sizes[dt] = off + -(-t.numel() // self.ALIGN) * self.ALIGN
        self.dtypes = sorted(self.sizes, key=str)

    def empty(self, device):
        return {dt: torch.zeros(self.sizes[dt], dtype=dt, device=device) for dt in self.dtypes}

    def views(self, bufs):
        return {name: bufs[dt][off:off + _numel(shape)].view(shape) for name, dt, off, shape in self.slots}

    @torch.no_grad()
    def pack(self, named, device):
        bufs = self.empty(device)
        for (name, t), (view_name, v) in zip(named, self.views(bufs).items()):
            assert name == view_name, (name, view_name)
            v.copy_(t)
        return bufs


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def checksum(bufs):
    """An int64 over the buffers' bits (their words summed, and every other one again, times a prime)."""
    total = 0
    for dt in sorted(bufs, key=str):
        b = bufs[dt].detach()
        w = b.view(torch.int16 if b.element_size() == 2 else torch.int32 if b.element_size() == 4 else torch.int64)
        total += int(w.sum(dtype=torch.int64)) + 1000003 * int(w[1::2].sum(dtype=torch.int64))
    return total % (1 << 62)


FULL, ADAPTERS = 0, 1  # the header's layout: every weight, or (LoRA, after the first version) the adapters


def _ship(sampler_model, model, full):
    """What goes to the rollout ranks: the sampler's weights (gathered, merged), or the LoRA model's own
    parameters (all of them the first time, then the adapters: all that changes). Every trainer calls it."""
    if not lora.has_lora(model):
        return list(sampler_model.named_parameters())
    return [(n, lora._full(p)) for n, p in model.named_parameters() if full or p.requires_grad]


# -----------------------------------------------------------------------------
# the trainers' side: train.py's loop takes batch j from next(j) and calls publish(j + 1) after its step


class Trainer:
    def __init__(self, lay, sampler_model, model):
        self.lay, self.sampler_model, self.model = lay, sampler_model, model
        self.position = [0] * lay.R  # checkpointed: the rollout ranks' stream positions after the last trained batch
        self.flat = {}               # layout -> Flat
        self.pending = []            # broadcasts in flight: (works, tensors they read)

    def start(self, step):
        """Tell the rollout ranks where to begin (a fresh run, or the resumed step), then send version `step`."""
        if self.lay.index == 0:
            self.lay.store.set("start", pickle.dumps((step, self.position)))
        self.publish(step, first=True)

    def publish(self, version, first=False):
        """Broadcast the weights after `version` steps (trainer 0 sends; every trainer gathers)."""
        layout = FULL if first or not lora.has_lora(self.model) else ADAPTERS
        named = _ship(self.sampler_model, self.model, layout == FULL)
        if self.lay.index != 0:
            return
        if layout not in self.flat:
            self.flat[layout] = Flat(named)
        device = named[0][1].device
        bufs = self.flat[layout].pack(named, device)  # a fresh copy: the previous broadcast may still be reading its own
        header = torch.tensor([version, layout, checksum(bufs)], dtype=torch.int64, device=device)
        works = [D.broadcast(t, 0, self.lay.wsync, async_op=True) for t in [header, *bufs.values()]]
        self.pending = [p for p in self.pending if not all(w.is_completed() for w in p[0])] + [(works, [header, bufs])]
        self.lay.store.set("version", str(version))

    def next(self, step):
        """Batch `step`: every rollout rank's share, staleness checked, this trainer's groups of it."""
        t0 = time.time()
        shares = [self._take(step, r) for r in range(self.lay.R)]
        versions = [v for s in shares for v in s["versions"]]  # one per group (G rows each)
        lags = [step - v for v in versions]
        if not all(0 <= lag <= self.lay.K for lag in lags):
            raise RuntimeError(f"batch {step} holds groups sampled by policy versions {sorted(set(versions))}: "
                               f"outside [step - {self.lay.K}, step]")
        self.position = [s["position"] for s in shares]
        batch = merge([s["batch"] for s in shares], self.lay.index, self.lay.T)
        batch["async"] = {f"staleness_{k}": lags.count(k) / len(lags) for k in range(self.lay.K + 1)}
        batch["async"].update(staleness_mean=sum(lags) / len(lags), time_wait=time.time() - t0,
                              time_generate=max(s["seconds"] for s in shares))
        for k in shares[0].get("stream", {}):  # a streaming rollout rank's counters, summed over the ranks
            batch["async"][f"stream_{k}"] = sum(s["stream"][k] for s in shares)
        return batch

    def _take(self, step, r):
        key = f"batch/{step}/{r}"
        # polled, not store.wait: a SIGTERM's handler must get to run (a dead rank ends the job sooner: torchrun)
        poll(lambda: self.lay.store.check([key]), self.lay.timeout,
             f"rollout rank {self.lay.T + r} sent no samples for step {step}")
        share = pickle.loads(self.lay.store.get(key))
        if self.lay.store.add(f"taken/{step}/{r}", 1) == self.lay.T:  # the last trainer to read it frees it
            self.lay.store.delete_key(key)
        return share

    def metrics(self, batch, metrics):
        """The step's staleness histogram, and the effective sample size of the rollout importance weights."""
        out = dict(batch["async"])
        out["time_sample"] = out["time_generate"] - batch["stats"].get("score_s", 0.0)  # on the rollout ranks
        if metrics.get("is_rho2_mean"):
            out["is_ess"] = metrics["is_rho_mean"] ** 2 / metrics["is_rho2_mean"]
        return out

    def finish(self):
        """Stop the rollout ranks (they take every announced version first), then let the broadcasts end."""
        if self.lay.index == 0:
            self.lay.store.set("stop", "1")
            for works, _ in self.pending:
                for w in works:
                    w.wait()
        self.pending = []


def merge(shares, index, T):
    """The trainer `index` of T's part of a batch made of the rollout ranks' shares (rollout.rollout's dicts):
    its slice of the groups in rank order; the counters (generated rewards, stats) of the shares r with
    r % T == index, so the trainers' all-reduced metrics count each share once."""
    rows = sum(len(s["comps"]) for s in shares)
    per = rows // T
    lo, hi = index * per, (index + 1) * per
    out = {}
    for k in ("prompts", "comps", "masks", "ex", "episodes", "steps", "sampler_logp"):
        out[k] = [x for s in shares for x in s[k]][lo:hi]
    for k in ("R", "truncated", "valid"):
        out[k] = torch.cat([s[k] for s in shares])[lo:hi]
    if "baseline" in shares[0]:  # ReMax: one per group
        groups = torch.cat([s["baseline"] for s in shares])
        g = rows // len(groups)
        out["baseline"] = groups[lo // g:hi // g]
    mine = [s for r, s in enumerate(shares) if r % T == index]
    out["rewards"] = torch.cat([s["rewards"] for s in mine]) if mine else torch.zeros(0)
    out["correct"] = torch.cat([s["correct"] for s in mine]) if mine else torch.zeros(0)
    out["stats"] = {k: sum(s["stats"][k] for s in mine) for k in shares[0]["stats"]}
    if mine:
        out["stats"]["gen_batches"] = max(s["stats"]["gen_batches"] for s in mine)
    return out


# -----------------------------------------------------------------------------
# the rollout ranks' side


class Weights:
    """A rollout rank's sampler and the versions it receives. Without LoRA the sampler's parameters are views
    into the flat buffers the broadcasts land in; with LoRA a LoRA copy of the model receives its parameters
    (then its adapters) and the sampler gets their merged weights, in place."""

    def __init__(self, lay, model, args, device):
        self.lay, self.version = lay, None
        self.sampler = model.to(torch.bfloat16) if device.type == "cuda" else model
        self.lora_model, self.flat, self.bufs = None, {}, {}
        if args.lora_rank:
            import copy

            self.lora_model = copy.deepcopy(model).float()
            lora.add_lora(self.lora_model, args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_dropout)
            self.flat[FULL] = Flat(self.lora_model.named_parameters())
            self.flat[ADAPTERS] = Flat([(n, p) for n, p in self.lora_model.named_parameters() if p.requires_grad])
            self.targets = dict(self.lora_model.named_parameters())
        else:
            self.flat[FULL] = Flat(self.sampler.named_parameters())
            self.bufs[FULL] = self.flat[FULL].empty(device)
            views = self.flat[FULL].views(self.bufs[FULL])
            with torch.no_grad():
                for name, p in self.sampler.named_parameters():
                    views[name].copy_(p)
                    p.data = views[name]  # the same Parameter, its storage now the buffer's
        self.device = device

    def receive(self):
        """Take the next broadcast version: header, buffers, checksum, then the sampler's weights."""
        header = torch.zeros(3, dtype=torch.int64, device=self.device)
        D.broadcast(header, 0, self.lay.wsync)
        version, layout, csum = header.tolist()
        if layout not in self.bufs:
            self.bufs[layout] = self.flat[layout].empty(self.device)
        bufs = self.bufs[layout]
        for dt in self.flat[layout].dtypes:
            D.broadcast(bufs[dt], 0, self.lay.wsync)
        if checksum(bufs) != csum:
            raise RuntimeError(f"weights version {version}: checksum {checksum(bufs)} != the trainer's {csum}")
        if self.lora_model is not None:
            with torch.no_grad():
                for name, v in self.flat[layout].views(bufs).items():
                    self.targets[name].copy_(v)
                sd = self.sampler.state_dict()
                for k, x in lora.merged_items(self.lora_model):
                    sd[k].copy_(x)
        self.version = version
        return version

    def poll(self):
        """Take every version the trainers have announced, on this rollout rank's own (the streaming loop, between
        decode steps: no collective among the rollout ranks). Returns (versions taken, whether they stopped)."""
        store = self.lay.store
        stop = store.check(["stop"])  # first: the version read after a stop is the last one
        v = int(store.get("version")) if self.version is not None or store.check(["version"]) else -1
        return self._take_to(v), stop

    def _take_to(self, v):
        """Receive the versions up to v (the first one at least), in order; returns how many."""
        taken = 0
        while self.version is None or self.version < v:
            self.receive()
            taken += 1
        return taken

    def catch_up(self, need):
        """Take every announced version; first wait (rollout rank 0 polls the store) until one is >= need,
        or the trainers stop (need None: until they stop). Returns False once they have."""
        store, seen = self.lay.store, {}

        def ready():
            seen["stop"] = store.check(["stop"])
            seen["v"] = int(store.get("version")) if store.check(["version"]) else -1
            return seen["stop"] or (need is not None and seen["v"] >= need)
        if self.lay.index == 0:
            poll(ready, None if need is None else self.lay.timeout, f"trainer 0 sent no weights of version {need}")
        v, stop = D.broadcast_object((seen["v"], seen["stop"]) if self.lay.index == 0 else None)  # all agree
        self._take_to(v)
        return not stop


def poll(ready, timeout, what):
    """Wait until ready() (checked at 1 ms, backing off to 20 ms); after timeout seconds (None: never) stop,
    naming what did not come."""
    deadline, pause = time.time() + (timeout or float("inf")), 0.001
    while not ready():
        if time.time() > deadline:
            raise TrainingStopped(f"{what} within --dist-timeout {timeout:g} s")
        time.sleep(pause)
        pause = min(2 * pause, 0.02)


def rollout_rank(lay, model, tok, task, args, cfg, scorer, device):
    """The whole life of a rollout rank: batches start, start + 1, ... each once its weights are recent enough."""
    for s in (signal.SIGINT, signal.SIGTERM):  # the trainers decide when to stop (they checkpoint first)
        signal.signal(s, lambda signum, frame: None)
    weights = Weights(lay, model, args, device)
    lay.store.wait(["start"], datetime.timedelta(seconds=lay.timeout))
    step, positions = pickle.loads(lay.store.get("start"))
    stream = PromptStream(task, lay.index, lay.R)
    stream.position = positions[lay.index]
    streamer = Streamer(lay, weights, tok, task, args, cfg, scorer, stream) if streams(args, cfg, task, tok) else None
    if lay.index == 0:
        print("rollout ranks: " + (f"streaming (continuous batching in {streamer.slots} slots, admission per group, "
              f"in-flight weight updates)" if streamer else f"per batch (K = {lay.K}, or a task, filter or baseline "
              f"that needs whole batches)"), file=sys.stderr, flush=True)
    if streamer:
        streamer.run(step)
        return 0
    for j in range(step, args.steps):
        if not weights.catch_up(max(j - lay.K, step)):  # the first batch: the trainers' weights at the start
            break
        t0 = time.time()
        batch = rollout(weights.sampler, tok, task, stream, args, cfg, scorer)
        share = dict(version=weights.version, versions=[weights.version] * (len(batch["comps"]) // cfg.group_size),
                     position=stream.position, batch=batch, seconds=time.time() - t0)
        lay.store.set(f"batch/{j}/{lay.index}", pickle.dumps(share))
    weights.catch_up(None)  # the trainers wait for their last broadcasts: take them all, then stop
    return 0


def streams(args, cfg, task, tok):
    """Does a rollout rank stream (Streamer)? At K >= 1, on single-turn episodes of the task's own environment,
    without DAPO's dynamic sampling (it draws prompts until groups survive) or ReMax's greedy baseline (a second
    pass per batch). Else it samples batch by batch (rollout.rollout), and K = 0 stays the synchronous run."""
    kw = episode_args(args, task)
    return (args.max_staleness >= 1 and kw["max_turns"] == 1 and kw["env_cls"] is None and cfg.filter_groups == "none"
            and not cfg.needs_greedy_baseline and isinstance(task.make_env(tok, args.chat), SingleTurnEnv))


@dataclass
class InFlight:
    """A batch on a streaming rollout rank, from its admission until its share is pushed."""
    idx: list          # the examples' global indices (their sampling seeds)
    exs: list
    prompts: list      # their token ids
    position: int      # the prompt stream's position just after this batch's prompts: the resume point
    comps: list        # the completions, grouped by example, as they finish
    versions: list     # per group: the weights' version when its first row took a slot
    left: int          # rows still decoding or waiting
    t0: float
    counters: dict = field(default_factory=lambda: dict(overlap_steps=0, inflight_updates=0))


class Streamer:
    """A streaming rollout rank: one continuous-batching Engine fed group by group from the prompt stream; see
    the module docstring (4.)."""

    def __init__(self, lay, weights, tok, task, args, cfg, scorer, stream):
        self.lay, self.weights, self.tok, self.task, self.args, self.cfg = lay, weights, tok, task, args, cfg
        self.scorer, self.stream, self.G = scorer, stream, cfg.group_size
        self.kw = episode_args(args, task)
        self.budget = self.kw["max_episode_tokens"] or args.max_new_tokens  # run_episodes' single-turn budget
        self.slots = args.rollout_slots or args.prompts_per_step // lay.R * self.G
        self.batches = {}  # batch index -> InFlight, until its share is pushed

    def run(self, first):
        """Batches first, first + 1, ..., each group admitted once the weights have version >= its batch - K,
        each batch pushed (in order) once all its rows are done; until the trainers stop."""
        lay, w, args = self.lay, self.weights, self.args
        admit, push = first, first  # the next batch to admit, the next to push
        pause, deadline = 0.001, time.time() + lay.timeout
        with Engine(w.sampler, self.slots, args.temperature, args.top_k, args.top_p, self.tok.eos_ids,
                    room=self.budget + 64) as eng:
            while True:
                taken, stop = w.poll()
                if taken:  # in flight: the rows decoding go on with the new weights (PipelineRL)
                    eng.repack()
                    for j in {tag[0] for tag in eng.live_tags()}:
                        self.batches[j].counters["inflight_updates"] += taken
                if stop:
                    return
                while admit < args.steps and w.version is not None and w.version >= max(admit - lay.K, first):
                    self.admit(eng, admit)
                    admit += 1
                if not eng.busy:  # wait for weights recent enough (or, all pushed, for the trainers to stop)
                    if admit < args.steps and time.time() > deadline:
                        raise TrainingStopped(f"trainer 0 sent no weights of version {admit - lay.K} within "
                                              f"--dist-timeout {lay.timeout:g} s")
                    time.sleep(pause)
                    pause = min(2 * pause, 0.02)
                    continue
                pause, deadline = 0.001, time.time() + lay.timeout
                done = eng.step()
                for j, g in eng.admitted:
                    self.batches[j].versions[g] = w.version
                live = {tag[0] for tag in eng.live_tags()}
                if len(live) > 1:  # this step's forward held rows of two batches or more
                    for j in live:
                        self.batches[j].counters["overlap_steps"] += 1
                for (j, g), k, c in done:
                    b = self.batches[j]
                    b.comps[g * self.G + k] = c
                    b.left -= 1
                while push in self.batches and self.batches[push].left == 0:
                    self.push(push, self.batches.pop(push))
                    push += 1

    def admit(self, eng, j):
        """Batch j's prompts from the stream, its groups queued for free slots in order."""
        args, G = self.args, self.G
        idx, exs = self.stream.next(args.prompts_per_step)
        prompts = [encode_prompt(self.task, ex, self.tok, args.chat) for ex in exs]
        self.batches[j] = InFlight(idx, exs, prompts, self.stream.position, [None] * (len(exs) * G),
                                   [None] * len(exs), len(exs) * G, time.time())
        ctx = self.weights.sampler.cfg.max_seq_len
        for g, (i, p) in enumerate(zip(idx, prompts)):
            eng.submit(p, G, min(self.budget, ctx - len(p)), example_seed(args.seed, i), tag=(j, g))

    def push(self, j, b):
        """Batch j's share, scored and laid out as rollout.rollout lays out a batch, into the store."""
        st = {"gen_batches": 1, "reward_errors": 0, "reward_timeouts": 0, "score_s": 0.0}
        eps = run_episodes(self.weights.sampler, self.tok, self.task, b.exs, self.G, temperature=self.args.temperature,
                           stats=st, scorer=self.scorer, completions=b.comps, **self.kw)
        assert [e.prompt for e in eps[::self.G]] == b.prompts, "the environment's prompts are the streamed ones"
        groups = shaped_groups(eps, b.exs, self.args, self.cfg)
        st["groups_kept"] = len(groups)
        batch = make_batch([g[:3] for g in groups], eps, st, self.cfg)
        share = dict(version=min(b.versions), versions=b.versions, position=b.position, batch=batch,
                     seconds=time.time() - b.t0, stream=b.counters)
        self.lay.store.set(f"batch/{j}/{self.lay.index}", pickle.dumps(share))
