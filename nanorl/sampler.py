"""Batched, KV-cached generation for RL rollouts: `generate(model, prompts, n, ...)`.

How a call runs:
1. Prefill: the distinct prompts, left-padded into one batch, go through the model once. The cache
   records each row's first real slot, so padding never changes a row's numbers.
2. Fan-out: each prompt's cache rows are copied n times (the GRPO group): a shared prompt is
   never recomputed n times (cf. Prefix Grouper, 2506.05433, for the same idea in training).
3. Decode: one token per active row per step. Rows that finish (a stop token, or max_new_tokens)
   are dropped from the batch ("compaction") once enough of them have, so they stop costing compute.
4. Multi-turn (on_turn_end, used by nanorl.rollout): the rows that sample a stop token at one step hand
   their tokens to the environment together and, if they get observations back, stay in the batch. The
   cache is ragged then (model.KVCache: each row writes at its own slot), so a row takes its observation
   in through one forward of up to `obs_chunk` tokens (right-padded to the longest in the step) while the
   other rows take their one sampled token in the same forward: a 512-token tool result costs 5 forwards,
   not 512 decode steps, and rows in different turns still share every step. Injected tokens get mask 0
   and logprob 0.0.

Log-probabilities. `Completion.logprobs[t]` is log softmax(z_t / temperature)[token_t] over the FULL
vocabulary: exactly what the trainer's forward pass computes for the same token at the same
temperature, so old-policy logprobs need no second forward when the sampler and trainer weights agree.
A 16-bit sampler model still gets fp32 logits (linear.logits), as the trainer's LM-head kernel computes them.
With top-k / top-p the token is actually drawn from the truncated, renormalised distribution q;
`Completion.sampling_logprobs[t]` is log q(token_t) = logprobs[t] - log(kept probability mass).
The two differ only under truncation; pass `sampling_logprobs` as the rollout logprobs of the
importance-sampling correction (algos: is_level) to correct for the truncation exactly (TRL #6789).
temperature=0 is greedy decoding; its logprobs are those of the untempered (T=1) softmax.

Randomness is per prompt: `seed` is an int or one int per prompt, and sample j of prompt i draws its
uniforms from a generator seeded with prompt i's seed, so the same seed gives the same completions and a
prompt's samples do not depend on which other prompts share its batch (torchrun ranks, dynamic sampling). On CUDA the decode step is captured in a CUDA graph per batch-size bucket, once per
process (gpt-fast style, DecodeGraphs), and stop checks happen every `sync_every` tokens, so there is no host
sync per token.
"""

import secrets
import time
import weakref
from dataclasses import dataclass, field

import torch

from nanorl import UserError
from nanorl.linear import cpu_gemm_rows, logits as lm_logits, packed_cpu_weights


@dataclass
class Completion:
    prompt_index: int
    tokens: list[int]
    logprobs: list[float]  # full-vocabulary, temperature-scaled: what the trainer computes
    finish_reason: str  # "stop" | "length"
    sampling_logprobs: list[float] = field(default_factory=list)  # under the truncated (top-k/top-p) distribution
    mask: list[int] = field(default_factory=list)  # 1 = sampled, 0 = injected by on_turn_end (logprobs 0.0 there)


def _check(model, prompts, n, max_new_tokens, temperature, top_p, top_k):
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise UserError("generate: prompts must be a non-empty list of token-id lists")
    if not isinstance(n, int) or n < 1:
        raise UserError(f"generate: n={n!r} must be an integer >= 1 (samples per prompt)")
    if max_new_tokens < 1:
        raise UserError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise UserError(f"generate: temperature={temperature} must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise UserError(f"generate: top_p={top_p} must be in (0, 1]")
    if top_k < 0:
        raise UserError(f"generate: top_k={top_k} must be >= 0 (0 = off)")
    ctx, V = model.cfg.max_seq_len, model.cfg.vocab_size
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise UserError(f"generate: prompt {i} is empty; every prompt needs at least one token")
        if len(p) >= ctx:
            raise UserError(f"generate: prompt {i} has {len(p)} tokens but the model's context is {ctx}; "
                            "shorten the prompt (or truncate the data)")
        if min(p) < 0 or max(p) >= V:
            raise UserError(f"generate: prompt {i} has a token id outside [0, {V}); wrong tokenizer for this model?")


def sample_token(logits, temperature, top_k, top_p, u):
    """Draw one token per row with uniforms u [B]. Returns (token [B], logp [B] full softmax, logq [B] truncated)."""
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(-1)
        logp = logits.gather(-1, tok[:, None])[:, 0] - torch.logsumexp(logits, -1)
        return tok, logp, logp
    z = logits / temperature
    if not (top_k or top_p < 1):  # the common case in as few passes over [B, V] as it takes: no log_softmax
        lse = torch.logsumexp(z, -1)
        tok = inverse_cdf(torch.exp(z - lse[:, None]), u)
        logp = z.gather(-1, tok[:, None])[:, 0] - lse
        return tok, logp, logp
    logp_all = torch.log_softmax(z, -1)
    logq_all = logp_all
    if top_k or top_p < 1:
        masked = logp_all
        if top_k and top_k < masked.shape[-1]:
            kth = masked.topk(top_k, -1).values[:, -1:]
            masked = masked.masked_fill(masked < kth, float("-inf"))
        if top_p < 1:
            sorted_lp, idx = masked.sort(-1, descending=True)
            cum = sorted_lp.exp().cumsum(-1)
            drop = cum - sorted_lp.exp() >= top_p  # tokens whose predecessors already cover top_p
            masked = masked.scatter(-1, idx, sorted_lp.masked_fill(drop, float("-inf")))
        logq_all = torch.log_softmax(masked, -1)
    tok = inverse_cdf(logq_all.exp(), u)
    return tok, logp_all.gather(-1, tok[:, None])[:, 0], logq_all.gather(-1, tok[:, None])[:, 0]


def inverse_cdf(p, u, block=1024):
    """The token i with CDF(i - 1) <= u * total < CDF(i) of each row of unnormalised probabilities p [B, V].

    One uniform per row (a [B, V] noise tensor for the Gumbel trick costs more than the LM head on a CPU).
    The CDF is accumulated in float64, which keeps the tail of a 150k vocabulary exact, but in two
    levels to keep the float64 work small: the sums of blocks of `block` tokens, then the cumulative sum
    inside the one block the draw falls in. side="right" never lands on a zero-probability (truncated) token.
    """
    B, V = p.shape
    full = V // block * block  # the whole blocks are a view of p; a partial last one is summed on its own
    sums = p[:, :full].view(B, -1, block).sum(-1, dtype=torch.float64)  # no padded copy of p (V = 151936)
    if full < V:
        sums = torch.cat([sums, p[:, full:].sum(-1, dtype=torch.float64, keepdim=True)], 1)
    cum_blocks = sums.cumsum(-1)  # [B, ceil(V / block)]
    target = u.double() * cum_blocks[:, -1]
    j = torch.searchsorted(cum_blocks, target[:, None], right=True)[:, 0].clamp(max=cum_blocks.shape[1] - 1)
    before = torch.where(j > 0, cum_blocks.gather(1, (j - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    cols = j[:, None] * block + torch.arange(block, device=p.device)  # block j's columns, past V read as 0
    inner = p.gather(1, cols.clamp(max=V - 1)).double().masked_fill(cols >= V, 0).cumsum(-1)  # [B, block]
    k = torch.searchsorted(inner, (target - before)[:, None], right=True)[:, 0]
    # rounding (a block's sum and its cumulative sum can differ in the last bit) may step past the block:
    # the block's last token of nonzero probability is the right answer then
    k = torch.minimum(k, (inner < inner[:, -1:]).sum(-1))
    return (j * block + k).clamp(max=V - 1)


PREFILL_MASK_ELEMS = 1 << 28  # the most attention-mask elements one prefill forward builds (512 MB of bf16)


class _StaticStep:
    """One decode step of fixed shapes for a fixed batch size: the cache attends over all its slots under
    the mask and the write position advances on the device, so the step has no Python-side state. On CUDA
    it is captured once as a CUDA graph and replayed every token (gpt-fast style); elsewhere it runs
    eagerly, the same computation, which is how the tests check it on a CPU."""

    def __init__(self, model, cache, pool=None):
        self.cache, self.graph = cache, None  # no reference to the model: DecodeGraphs must not keep it alive
        cache.static = True  # fixed shapes: attend over every slot under the mask
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=model.device)
        if model.device.type != "cuda":
            return
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm up kernels outside the capture, then undo the warm-up's write
            self._run(model)
            cache.pos_t -= 1
            cache.pos -= 1
            if cache.ragged:
                cache.row_pos -= 1
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA call during the capture (NCCL's watchdog polling its events)
        # must not invalidate it, as the default global mode lets it
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.logits = self._run(model)
        cache.pos -= 1  # capture records the device-side advance without running it; undo the host one

    def _run(self, model):
        return model(self.tokens, kv_cache=self.cache)[:, -1]

    def __call__(self, model, tokens):
        self.tokens[:len(tokens)].copy_(tokens)  # rows past the live ones (bucket padding) decode stale tokens
        if self.graph is None:
            logits = self._run(model)
        else:
            self.graph.replay()  # pos_t advances inside the graph
            self.cache.pos += 1
            logits = self.logits
        return logits[:len(tokens)]


def _bucket(rows):
    """The batch size a decode step of `rows` rows is captured for: the next power of two."""
    return 1 << (rows - 1).bit_length()


class DecodeGraphs:
    """Fixed-shape decode steps (_StaticStep) kept across generate calls, so a run captures a CUDA graph
    only the first time it meets a (batch bucket, slot bucket): each capture synchronises the device and
    empties PyTorch's CUDA cache, and capturing per call and per compaction cost 10-20 captures a rollout
    (gpt-fast and nano-vllm likewise capture a few batch sizes once and pad up to the next one).

    One KV storage [rows, kv heads, slots, head_dim] per layer serves every bucket: the step of bucket
    (b, S) reads and writes its views [:b, :, :S], so after compaction (live rows moved to the front, in
    place) a smaller bucket's step continues on the same tensors without a copy. The storage grows (and
    the steps are dropped) when a call needs more rows or slots; it stays allocated between calls, as a
    serving engine's KV cache does: `DecodeGraphs.release(model)` frees it (and the graphs).
    """

    SLOT_ALIGN = 256  # slot buckets: prompt lengths vary per call, S = Lp + max_new_tokens with them
    _pools = {}  # id(model) -> DecodeGraphs (not an attribute: deepcopy of the model must not copy graphs)

    def __init__(self, model):
        self.model_ref, self.cache, self.steps, self.slots = weakref.ref(model), None, {}, None
        self.captures, self.capture_s = 0, 0.0  # counters for tests and bench/gpu.sh
        self.pool = torch.cuda.graph_pool_handle() if model.device.type == "cuda" else None
        self.weights = self._weights_key()

    @property
    def model(self):
        return self.model_ref()

    def _weights_key(self):
        # the graphs read these tensors' memory: weights replaced (not updated in place) need new graphs
        return tuple((p.data_ptr(), p.dtype) for p in self.model.parameters())

    @classmethod
    def of(cls, model):
        g = cls._pools.get(id(model))
        if g is None or g.model is not model or g.weights != g._weights_key():
            if g is None or g.model is not model:  # free the storage and graphs when the model goes
                weakref.finalize(model, cls._pools.pop, id(model), None)
            g = cls._pools[id(model)] = cls(model)
        return g

    @classmethod
    def release(cls, model):
        cls._pools.pop(id(model), None)

    def load(self, prefill, rows, S, ragged=False):
        """Take over the prefill cache's rows `rows` (the fan-out to n samples); returns the slot bucket.
        ragged: rows write at their own slots (multi-turn, KVCache._begin_ragged)."""
        B, Lp = len(rows), prefill.pos
        slots = max(S, min(-(-S // self.SLOT_ALIGN) * self.SLOT_ALIGN, self.model.cfg.max_seq_len))
        c = self.cache
        if c is None or _bucket(B) > c.batch_size or slots > c.max_len:
            size = max(_bucket(B), c.batch_size if c else 0), max(slots, c.max_len if c else 0)
            # free the old storage before allocating the new: the kept steps and this call's step hold views of it
            c = self.cache = self.steps = self.step = None
            self.cache = self.model.new_cache(*size)
            self.steps = {}
        c = self.cache
        for dst, src in ((c.k, prefill.k), (c.v, prefill.v)):
            for d, s_ in zip(dst, src):
                d[:B, :, :Lp] = s_[rows, :, :Lp]
        c.start[:B] = prefill.start[rows]
        c.row_pos.fill_(Lp)
        c.pos_t.fill_(Lp)
        c.pos, c.ragged, self.slots, self.step = Lp, ragged, slots, None
        return slots

    def __call__(self, tokens, stats):
        """One decode step of the live rows' tokens [B_now, 1]; returns their logits [B_now, V]."""
        key = (_bucket(len(tokens)), self.slots, self.cache.ragged)  # a ragged step is another graph
        if self.step is None or self.step.key != key:
            if key not in self.steps:
                t0 = time.perf_counter()
                view = self.cache.view(*key[:2])
                view.pos = self.cache.pos
                self.steps[key] = _StaticStep(self.model, view, self.pool)
                self.steps[key].key = key
                self.captures += 1
                self.capture_s += time.perf_counter() - t0
                stats["graph_captures"] = stats.get("graph_captures", 0) + 1
                stats["capture_s"] = stats.get("capture_s", 0.0) + time.perf_counter() - t0
            self.step = self.steps[key]
        self.step.cache.pos = self.cache.pos  # a chunk (forward) may have moved it
        logits = self.step(self.model, tokens)
        self.cache.pos = self.step.cache.pos
        stats["decode_rows"] = stats.get("decode_rows", 0) + key[0]  # work done, bucket padding included
        return logits

    def forward(self, ids, advance):
        """An eager forward of ids [B_now, W] on the storage (ragged; `advance` real tokens per row): the chunks
        of observations that multi-turn rows take in at once. Returns the hidden states [B_now, W, d]."""
        view = self.cache.view(len(ids), self.slots, static=False)
        view.pos, view.advance = self.cache.pos, advance
        h = self.model.hidden(ids, kv_cache=view)
        self.cache.pos = view.pos
        return h

    def drop(self, done):
        """Compaction in place: the live rows move to the front of the storage; returns `keep`."""
        view = self.cache.view(len(done), self.slots)
        view.pos = self.cache.pos
        return view.drop(done, in_place=True)


def prompt_seeds(seed, P):
    """One sampling seed per prompt: a list as given; one int: prompt i gets a seed derived from (seed, i); None:
    a fresh base from the OS (torch.seed() would reseed the global CPU generator and every CUDA one)."""
    if seed is not None and not isinstance(seed, int):
        return list(seed)
    base = seed if seed is not None else secrets.randbits(62)
    return [(base * 1000003 + i) % (1 << 63) for i in range(P)]


def row_uniforms(seed, n, steps):
    """[n, steps] float64 uniforms of a prompt's n rows from its seed: a row's t-th token uses its t-th."""
    return torch.rand(n, steps, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate(model, prompts, n=1, max_new_tokens=128, temperature=1.0, top_p=1.0, top_k=0, stop_ids=(),
             seed=None, cuda_graph=None, sync_every=None, on_token=None, stats=None, on_turn_end=None,
             max_total_tokens=None, obs_chunk=128):
    """Sample `n` completions for each prompt; returns len(prompts) * n Completions, grouped by prompt.

    Multi-turn (nanorl.rollout): on_turn_end(rows, tokens) is called with the rows that sampled a stop token
    at this step and all their tokens so far (one list each); it returns, per row, the token ids to inject
    (an observation) or None to end the row. Injected ids go in through the row's KV cache, up to obs_chunk
    of them per forward (see the module docstring); they get mask 0 and logprob 0.0. max_new_tokens then
    bounds each turn and max_total_tokens (default max_new_tokens) the whole row, injected tokens included;
    an observation that does not fit ends the row ("length"). The row's sampled tokens are the ones the
    single-turn loop would draw from the same logits (its k-th token uses its k-th uniform).

    seed: an int, or a list with one int per prompt (see the module docstring); None draws a fresh seed.
    cuda_graph: decode with fixed-shape steps (_StaticStep), captured as CUDA graphs on CUDA and kept for later
    calls (DecodeGraphs); default: on CUDA.
    sync_every: look at the host for finished rows every this many tokens (default: 16 on CUDA, where each
    look is a host sync, 1 elsewhere); rows that stopped in between keep decoding and are cut at their stop.

    obs_chunk: the most observation tokens a row takes in per forward (multi-turn).
    on_token(row, token) streams the tokens of row 0 (prompt 0, sample 0) as they are produced.
    stats, if a dict, receives counters: prefill_calls, decode_steps (forwards after the prefill), decode_rows
    (the sum of the batch size over decode steps: the work done), tokens (returned), host_reads (decode steps
    at which the host waited for the device: every sync_every-th, and every step with on_turn_end), obs_chunks
    (the decode steps that took observations in); with cuda_graph also graph_captures and capture_s (the steps
    this call captured, and the seconds that took). Multi-turn observation chunks run eagerly on the kept storage.
    """
    _check(model, prompts, n, max_new_tokens, temperature, top_p, top_k)
    device = model.device
    P, B = len(prompts), len(prompts) * n
    lens = torch.tensor([len(p) for p in prompts])
    Lp = int(lens.max())
    budget = max_total_tokens or max_new_tokens
    S = min(Lp + budget, model.cfg.max_seq_len)
    seeds = prompt_seeds(seed, P)
    if len(seeds) != P:
        raise UserError(f"generate: {len(seeds)} seeds for {P} prompts; pass one int or one per prompt")
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    sync_every = 1 if on_turn_end else sync_every or (16 if device.type == "cuda" else 1)  # turn ends need the host
    stats = stats if stats is not None else {}

    # skinny CPU matmuls through oneDNN on packed weights (linear.packed_cpu_weights): worth its ~0.3 s
    # reorder of SmolLM2-135M only for a batch above 4 rows and enough tokens
    pack = device.type == "cpu" and B > 4 and max_new_tokens >= 16
    graphs = DecodeGraphs.of(model) if use_graph else None
    with packed_cpu_weights(model.matmul_weights() if pack else ()):
        # 1. prefill the distinct prompts once, left-padded (with graphs: into the prompt's slots only, as the
        # decode steps' own storage takes over from there)
        ids = torch.zeros(P, Lp, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, Lp - len(p):] = torch.tensor(p)
        scratch = int(on_turn_end is not None)  # a ragged cache's padding slot (KVCache._begin_ragged)
        cache = model.new_cache(P, Lp if graphs else S + scratch)
        cache.start.copy_((Lp - lens).to(device))
        # a padded prefill's mask has P x group x Lp^2 elements (15 GB of bf16 for Qwen2.5-0.5B's group of 7 at
        # 256 prompts x 2048 tokens): the prompts go through in chunks that bound it (rows are independent)
        per = max(1, PREFILL_MASK_ELEMS // (cache.group * Lp * Lp))
        if per >= P:
            h = model.hidden(ids.to(device), kv_cache=cache)[:, -1]
        else:
            hs = []
            for s in range(0, P, per):
                part = cache.view(slice(s, s + per), cache.max_len, static=False)
                part.pos_t = part.pos_t.clone()  # each chunk writes the same slots, from the same position
                hs.append(model.hidden(ids[s:s + per].to(device), kv_cache=part)[:, -1])
            cache.end(Lp)
            h = torch.cat(hs)
        logits = lm_logits(h, model.lm_head_weight)  # only the last position needs the LM head
        stats["prefill_calls"] = stats.get("prefill_calls", 0) + 1

        # 2. fan out each prompt's cache to its n samples
        rows = torch.arange(P, device=device).repeat_interleave(n)
        if graphs:
            graphs.load(cache, rows, S + scratch, ragged=bool(scratch))
            cache = None
        else:
            if n > 1:
                cache.select(rows)
            cache.ragged = bool(scratch)
            cache.row_pos.fill_(Lp)
        logits = logits[rows] if n > 1 else logits

        # 3. decode; buffers stay on the device, rows are identified by `row_id` through compaction
        steps = min(budget, S - Lp)
        U = torch.cat([row_uniforms(sd, n, steps) for sd in seeds]).to(device)  # [B, steps]: row i*n+j's, any batch
        out_tok = torch.zeros(B, steps, dtype=torch.long, device=device)
        out_lp = torch.zeros(B, steps, device=device)
        out_lq = torch.zeros(B, steps, device=device)
        sampled = torch.ones(B, steps, dtype=torch.bool, device=device)  # the mask: False where injected
        out = (out_tok, out_lp, out_lq, sampled)
        if on_turn_end is not None:
            length, stopped = _decode_turns(model, graphs, cache, logits, U, out, set(stop.tolist()), on_turn_end,
                                            max_new_tokens, (temperature, top_k, top_p), obs_chunk, on_token, stats)
        else:
            length, stopped = _decode(model, graphs, cache, logits, U, out, stop, (temperature, top_k, top_p),
                                      sync_every, on_token, stats)

    out_tok, out_lp, out_lq, length, stopped, sampled = (torch.as_tensor(x).cpu() for x in
                                                         (out_tok, out_lp, out_lq, length, stopped, sampled))
    stats["tokens"] = stats.get("tokens", 0) + int(length.sum())
    res = []
    for r in range(B):
        L = int(length[r])
        res.append(Completion(prompt_index=r // n, tokens=out_tok[r, :L].tolist(), logprobs=out_lp[r, :L].tolist(),
                              finish_reason="stop" if stopped[r] else "length",
                              sampling_logprobs=out_lq[r, :L].tolist(), mask=sampled[r, :L].int().tolist()))
    return res


def _compact_now(graphs, device, B_now, n_done):
    """Drop finished rows from the batch now? With graphs when the live rows fit a smaller bucket; else on
    CPU as soon as the matmuls get cheaper, elsewhere once an eighth are done."""
    if graphs:
        return _bucket(B_now - n_done) < _bucket(B_now)
    if device.type == "cpu":
        return cpu_gemm_rows(B_now - n_done) < cpu_gemm_rows(B_now)
    return n_done >= max(1, B_now // 8)


def _decode(model, graphs, cache, logits, U, out, stop, sampling, sync_every, on_token, stats):
    """Single-turn decode: one token per live row per step, stop checks every sync_every steps.
    Returns (length [B], stopped [B])."""
    out_tok, out_lp, out_lq, _ = out
    B, steps = U.shape
    device = U.device
    length = torch.full((B,), steps, dtype=torch.long, device=device)  # tokens kept per row
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    row_id = torch.arange(B, device=device)  # batch position -> original row
    done = torch.zeros(B, dtype=torch.bool, device=device)  # per batch position
    for t in range(steps):
        tok, lp, lq = sample_token(logits, *sampling, U[row_id, t])
        live = ~done
        out_tok[row_id, t], out_lp[row_id, t], out_lq[row_id, t] = tok, lp, lq  # kept up to each row's length
        hit = live & torch.isin(tok, stop)
        length[row_id] = torch.where(hit, t + 1, length[row_id])
        stopped[row_id] |= hit
        done |= hit
        if on_token is not None and row_id[0] == 0 and live[0]:  # compaction keeps order: row 0 stays first
            on_token(0, int(tok[0]))
        if t == steps - 1:
            break
        if (t + 1) % sync_every == 0:
            stats["host_reads"] = stats.get("host_reads", 0) + 1  # the host waits for the device here
            n_done = int(done.sum())
            if n_done == len(done):
                break
            if _compact_now(graphs, device, len(done), n_done):
                keep = graphs.drop(done) if graphs else cache.drop(done)
                row_id, done, tok = row_id[keep], done[keep], tok[keep]
        if graphs:
            logits = graphs(tok[:, None], stats)
        else:
            logits = model(tok[:, None], kv_cache=cache)[:, -1]
            stats["decode_rows"] = stats.get("decode_rows", 0) + cache.batch_size  # work done
        stats["decode_steps"] = stats.get("decode_steps", 0) + 1
    return length, stopped


def _decode_turns(model, graphs, cache, logits, U, out, stop, on_turn_end, max_new_tokens, sampling, obs_chunk,
                  on_token, stats):
    """Multi-turn decode (see generate): the cache is ragged (each row writes at its own slot), so a row that
    gets an observation takes it in through one forward of up to obs_chunk tokens per step, right-padded,
    while the other rows take their one sampled token in the same forward. Bookkeeping is on the host (turn
    ends need it every step). A row's k-th output token uses its uniform U[row, k], as in the single-turn
    loop. Returns (length [B], stopped [B]) as lists."""
    out_tok, out_lp, out_lq, sampled = out
    B, steps = U.shape
    device = U.device
    n_out, turn_len, stopped = [0] * B, [0] * B, [False] * B  # per original row
    pending = [[] for _ in range(B)]  # per original row: observation ids still to feed
    row_id, done = list(range(B)), [False] * B  # per batch position
    store = graphs.cache if graphs else cache
    while True:
        cols = torch.tensor([min(n_out[r], steps - 1) for r in row_id])
        tok, lp, lq = sample_token(logits, *sampling, U[torch.tensor(row_id, device=device), cols.to(device)])
        toks = tok.tolist()  # the host sync of the step
        stats["host_reads"] = stats.get("host_reads", 0) + 1
        feeds, rec, ends = [], [], []
        for i, r in enumerate(row_id):
            if done[i]:  # a finished row idles (on its scratch slot) until compaction drops it
                feeds.append([toks[i]])
            elif pending[r]:  # still taking in an observation: its sample is not used
                feeds.append(pending[r][:obs_chunk])
                pending[r] = pending[r][obs_chunk:]
            else:
                rec.append((i, r, n_out[r]))
                n_out[r] += 1
                turn_len[r] += 1
                feeds.append([toks[i]])
                if toks[i] in stop:
                    ends.append(i)
                elif turn_len[r] >= max_new_tokens or n_out[r] >= steps:  # a budget ends the row ("length")
                    done[i] = True
        if rec:
            i_t, r_t, c_t = (torch.tensor(x, device=device) for x in zip(*rec))
            out_tok[r_t, c_t], out_lp[r_t, c_t], out_lq[r_t, c_t] = tok[i_t], lp[i_t], lq[i_t]
            if on_token is not None and row_id[0] == 0 and rec[0][0] == 0:
                on_token(0, toks[0])
        rs = [row_id[i] for i in ends]
        for i, r, obs in zip(ends, rs, on_turn_end(rs, [out_tok[r, :n_out[r]].tolist() for r in rs]) if rs else ()):
            if obs is None or n_out[r] + len(obs) >= steps:  # the episode ends, or no room for it and one more token
                stopped[r], done[i] = obs is None, True
                continue
            k = n_out[r]
            out_tok[r, k:k + len(obs)] = torch.tensor(obs, dtype=torch.long, device=device)
            sampled[r, k:k + len(obs)] = False  # logprobs stay 0.0 there
            n_out[r], turn_len[r] = k + len(obs), 0
            feeds[i] = feeds[i] + list(obs[:obs_chunk - 1])
            pending[r] = list(obs[obs_chunk - 1:])
        n_done = sum(done)
        if n_done == len(done):
            break
        if _compact_now(graphs, device, len(done), n_done):
            keep = (graphs.drop if graphs else cache.drop)(torch.tensor(done, device=device)).tolist()
            row_id, done, feeds = [row_id[k] for k in keep], [done[k] for k in keep], [feeds[k] for k in keep]
        width = [len(f) for f in feeds]
        if max(width) == 1:
            x = torch.tensor(feeds, device=device)
            if graphs:
                logits = graphs(x, stats)
            else:
                logits = model(x, kv_cache=cache)[:, -1]
                stats["decode_rows"] = stats.get("decode_rows", 0) + cache.batch_size
        else:  # observations go in as chunks: one forward, each row's logits at its last real token
            ids = torch.zeros(len(feeds), max(width), dtype=torch.long)
            for i, f in enumerate(feeds):
                ids[i, :len(f)] = torch.tensor(f)
            adv = torch.tensor(width, device=device)
            if graphs:
                h = graphs.forward(ids.to(device), adv)
            else:
                cache.advance = adv
                h = model.hidden(ids.to(device), kv_cache=cache)
            logits = lm_logits(h[torch.arange(len(feeds), device=device), adv - 1], model.lm_head_weight)
            store.pos = int(store.row_pos[:len(feeds)].max())  # the exact bound again (a chunk moved only some rows)
            stats["obs_chunks"] = stats.get("obs_chunks", 0) + 1
            stats["decode_rows"] = stats.get("decode_rows", 0) + len(feeds)
        stats["decode_steps"] = stats.get("decode_steps", 0) + 1
    return n_out, stopped
