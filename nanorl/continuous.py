"""Continuous batching: a fixed pool of decode slots kept full, so one long answer never holds a whole batch.

    comps = generate_continuous(model, prompts, n=8, max_new_tokens=256, slots=64, stop_ids=tok.eos_ids, seed=seeds)

    with Engine(model, slots=64, stop_ids=tok.eos_ids) as eng:     # the same, one decode step at a time
        eng.submit(prompt, n=8, budget=256, seed=s, tag=...)       # any time: its rows queue for free slots
        for tag, j, completion in eng.step(): ...                  # the rows that finished at this step

The static batch (sampler.generate) decodes a batch until its longest row is done; rows that finish early
are dropped from it, and the batch thins out into skinny, inefficient steps. Here (Orca, OSDI '22, "iteration-
level scheduling"; vLLM's scheduler) a row that finishes hands its slot to the next row waiting, at the same
decode step, so every step runs `slots` rows while rows wait. Rows are (prompt, sample) pairs, admitted in the
order submitted; a prompt is prefilled once, when its first row is admitted, and its cache rows are copied
into the slots its samples take (sampler.generate's fan-out, spread over time). Between two steps the caller
may submit more prompts (nanorl.async_loop's streaming rollout rank feeds it a prompt stream) or write new
weights into the model in place (then call repack(): the CPU path decodes on packed copies of the weights).

How rows of different ages share one KVCache: every row writes at the cache's common write position
`pos`; a new row's prompt is copied into the slots just before it, [pos - Lp, pos), and its `start` set to
pos - Lp, so attention and RoPE positions count from there (the cache's left-padding rule). When the write
position reaches the end of the cache, every row moves left by the smallest live `start` (positions are
relative to `start`, so nothing changes but the slot numbers); a cache twice the longest row makes that
rare, and a submitted row longer than the cache was made for reallocates it (copied, positions kept). When
nothing waits, finished rows are dropped as in generate (compaction); rows submitted later take the dropped
slots back.

Randomness is sampler.generate's: row j of prompt i draws its uniforms from prompt i's seed, its t-th token
from the t-th, so the samples do not depend on the slot count or on which rows share a step, and greedy
decoding returns generate's completions. Top-k / top-p as in generate (sampler.sample_token: logprobs of the
full softmax, sampling_logprobs of the truncated one). No multi-turn or CUDA graphs here.
"""

import contextlib
from collections import deque

import torch

from nanorl import UserError
from nanorl.linear import cpu_gemm_rows, logits as lm_logits, packed_cpu_weights
from nanorl.sampler import Completion, prompt_seeds, row_uniforms, sample_token


class Engine:
    """`slots` decode slots over one KVCache; see the module docstring. Use it as a context manager (it holds
    the CPU's packed weights). stats: a dict that receives decode_steps, decode_rows (the work: the batch size
    summed over steps), tokens, prefills, shifts, grows (cache reallocations), regrows (compacted slots taken back)."""

    def __init__(self, model, slots, temperature=1.0, top_k=0, top_p=1.0, stop_ids=(), room=1, stats=None):
        if slots < 1 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
            raise UserError(f"Engine: slots {slots} >= 1, temperature {temperature} >= 0, top_k {top_k} >= 0 and "
                            f"top_p {top_p} in (0, 1] please")
        self.model, self.B, self.device = model, slots, model.device
        self.sampling = (temperature, top_k, top_p)
        self.stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=self.device)
        self.stats = stats if stats is not None else {}
        self.subs, self.n_subs = {}, 0  # submission id -> [prompt, n, budget, uniforms [n][budget], tag, rows left]
        self.queue = deque()    # rows waiting, in order: (submission id, sample index)
        self.prefilled = {}     # submission id -> (k, v, last logits) until its last row is admitted
        self.slot_row = [None] * slots  # slot -> [submission id, sample index, tokens, logprobs, logqs], or None
        self.admitted = []      # the tags whose first row took a slot at the last step
        self.logits = torch.zeros(slots, model.cfg.vocab_size, device=self.device)
        self.cache, self.room = None, 0
        self._grow(room)
        self._pack = contextlib.ExitStack()

    # -- the caller's side

    def __enter__(self):
        self.repack()
        return self

    def __exit__(self, *exc):
        self._pack.close()

    def repack(self):
        """(Re)take the CPU's packed copies of the weights: at the start, and after the weights changed in place."""
        self._pack.close()
        if self.device.type == "cpu" and self.B > 4:  # skinny matmuls through oneDNN (linear.packed_cpu_weights)
            self._pack.enter_context(packed_cpu_weights(self.model.matmul_weights()))

    def submit(self, prompt, n, budget, seed, tag=None):
        """Queue n rows of `prompt` (token ids), each of at most `budget` new tokens, with uniforms from `seed`
        (generate's per-prompt seed); the rows come back from step() with `tag`."""
        if not prompt or budget < 1 or n < 1:
            raise UserError("Engine.submit: a non-empty prompt, n >= 1 and a budget >= 1 please")
        if len(prompt) + budget > self.model.cfg.max_seq_len:
            raise UserError(f"continuous batching: a prompt plus its answer has {len(prompt) + budget} tokens, over "
                            f"the model's context {self.model.cfg.max_seq_len}")
        if len(prompt) + budget > self.room:  # geometric: a stream of ever longer prompts reallocates rarely
            self._grow(max(len(prompt) + budget, self.room * 5 // 4))
        U = row_uniforms(seed, n, budget).tolist()
        i, self.n_subs = self.n_subs, self.n_subs + 1
        self.subs[i] = [prompt, n, budget, U, tag, n]
        self.queue.extend((i, j) for j in range(n))
        return i

    @property
    def busy(self):
        """Rows waiting or decoding."""
        return bool(self.queue) or any(r is not None for r in self.slot_row)

    def live_tags(self):
        """The tag of each row decoding now (one per live slot)."""
        return [self.subs[r[0]][4] for r in self.slot_row if r is not None]

    @torch.no_grad()
    def step(self):
        """Admit waiting rows into free slots, draw one token for every live row, forward the rows still live.
        Returns [(tag, sample index, Completion)] of the rows that finished (Completion.prompt_index: the
        submission's id)."""
        cache, stats = self.cache, self.stats
        free = [s for s in range(cache.batch_size) if self.slot_row[s] is None]
        if len(free) == cache.batch_size:  # nothing live: any write position will do
            cache.pos_t.fill_(self.room)
            cache.pos = self.room
        if self.queue and cache.batch_size < self.B:  # rows came after the tail was compacted: take the slots back
            free += self._regrow()
        self.admitted = []
        for s in free:
            if self.queue and cache.pos >= len(self.subs[self.queue[0][0]][0]):  # else it waits: pos grows every step
                self._admit(s)
        dead = self.slot_row.count(None)
        B = cache.batch_size
        if not self.queue and dead and (cpu_gemm_rows(B - dead) < cpu_gemm_rows(B) if self.device.type == "cpu"
                                        else dead >= max(1, B // 8)):
            # the tail, nothing left to admit: drop finished rows as generate does (CPU: when matmuls get cheaper)
            keep = cache.drop(torch.tensor([r is None for r in self.slot_row], device=self.device))
            self.slot_row, self.logits = [self.slot_row[k] for k in keep.tolist()], self.logits[keep]
        live = [s for s in range(cache.batch_size) if self.slot_row[s] is not None]
        if not live:
            return []
        u = [0.0] * cache.batch_size
        for s in live:
            i, j, toks = self.slot_row[s][:3]
            u[s] = self.subs[i][3][j][len(toks)]
        u = torch.tensor(u, dtype=torch.float64, device=self.device)
        tok, lp, lq = sample_token(self.logits, *self.sampling, u)
        hit = torch.isin(tok, self.stop).tolist()
        tok_l, lp_l, lq_l = tok.tolist(), lp.tolist(), lq.tolist()
        done = []
        for s in live:
            i, j, toks, lps, lqs = self.slot_row[s]
            toks.append(tok_l[s])
            lps.append(lp_l[s])
            lqs.append(lq_l[s])
            if hit[s] or len(toks) == self.subs[i][2]:
                c = Completion(prompt_index=i, tokens=toks, logprobs=lps, sampling_logprobs=lqs,
                               finish_reason="stop" if hit[s] else "length", mask=[1] * len(toks))
                done.append((self.subs[i][4], j, c))
                self.slot_row[s] = None
                self.subs[i][5] -= 1
                if not self.subs[i][5]:  # a stream of prompts: keep only the ones with rows to come
                    del self.subs[i]
        stats["tokens"] = stats.get("tokens", 0) + len(live)
        if all(r is None for r in self.slot_row):
            return done
        if cache.pos + 1 > cache.max_len:
            self._make_room()
        self.logits = self.model(tok[:, None], kv_cache=cache)[:, -1]
        stats["decode_steps"] = stats.get("decode_steps", 0) + 1
        stats["decode_rows"] = stats.get("decode_rows", 0) + cache.batch_size
        return done

    # -- the slots

    def _admit(self, s):
        i, j = self.queue.popleft()
        prompt, n = self.subs[i][:2]
        if i not in self.prefilled:
            c = self.model.new_cache(1, len(prompt))
            h = self.model.hidden(torch.tensor([prompt], device=self.device), kv_cache=c)[:, -1]
            self.prefilled[i] = (c.k, c.v, lm_logits(h, self.model.lm_head_weight)[0])
            self.stats["prefills"] = self.stats.get("prefills", 0) + 1
            self.admitted.append(self.subs[i][4])
        k, v, first = self.prefilled[i]
        if j == n - 1:
            del self.prefilled[i]
        cache, Lp = self.cache, len(prompt)
        for dst, src in ((cache.k, k), (cache.v, v)):
            for d, s_ in zip(dst, src):  # the slot's old keys from pos on: overwritten before the new row reads them
                d[s, :, cache.pos - Lp:cache.pos] = s_[0]
        cache.start[s] = cache.pos - Lp
        self.logits[s] = first
        self.slot_row[s] = [i, j, [], [], []]

    def _make_room(self):
        """Move every row left by the smallest live start once the write position reaches the cache's end."""
        cache = self.cache
        shift = min(int(cache.start[s]) for s in range(cache.batch_size) if self.slot_row[s] is not None)
        L = cache.pos - shift
        for layer in cache.k + cache.v:
            layer[:, :, :L] = layer[:, :, shift:cache.pos].clone()
        cache.start.sub_(shift).clamp_(min=0)
        cache.pos_t.sub_(shift)
        cache.pos -= shift
        self.stats["shifts"] = self.stats.get("shifts", 0) + 1

    def _grow(self, room):
        """A cache of 2 x room slots for all B rows (the first: positions start at room, so any prompt fits
        before the first write); the rows decoding now are copied over at their slots."""
        old, new = self.cache, self.model.new_cache(self.B, 2 * room)
        if old is None:
            new.pos_t.fill_(room)
            new.pos = room
        else:
            self._regrow()
            old = self.cache
            for dst, src in zip(new.k + new.v, old.k + old.v):
                dst[:, :, :old.pos] = src[:, :, :old.pos]
            new.start.copy_(old.start)
            new.pos_t.fill_(old.pos)
            new.pos = old.pos
            self.stats["grows"] = self.stats.get("grows", 0) + 1
        self.cache, self.room, self.full = new, room, (list(new.k), list(new.v))

    def _regrow(self):
        """Undo compaction: the cache back to B rows (its tensors' first rows are the live ones: KVCache.drop
        keeps views of the same storage). Returns the slots that came back."""
        cache, b = self.cache, self.cache.batch_size
        if b < self.B:
            self.stats["regrows"] = self.stats.get("regrows", 0) + 1
        cache.k, cache.v = list(self.full[0]), list(self.full[1])
        pad = torch.zeros(self.B - b, dtype=torch.long, device=self.device)
        cache.start, cache.row_pos = torch.cat([cache.start, pad]), torch.cat([cache.row_pos, pad])
        self.logits = torch.cat([self.logits, self.logits.new_zeros(self.B - b, self.logits.shape[1])])
        self.slot_row += [None] * (self.B - b)
        return list(range(b, self.B))


def generate_continuous(model, prompts, n=1, max_new_tokens=128, temperature=1.0, stop_ids=(), seed=0, slots=None,
                        stats=None, top_k=0, top_p=1.0):
    """len(prompts) * n Completions, grouped by prompt, decoded in `slots` slots (default: every row at once).

    max_new_tokens: an int or one per prompt. seed: an int (prompt i gets a seed from (seed, i), as in
    generate) or one per prompt. stats: see Engine.
    """
    P = len(prompts)
    budgets = [max_new_tokens] * P if isinstance(max_new_tokens, int) else list(max_new_tokens)
    seeds = prompt_seeds(seed, P)
    if len(budgets) != P or len(seeds) != P or min(budgets) < 1 or not all(prompts):
        raise UserError("generate_continuous: one budget >= 1 and one seed per non-empty prompt")
    longest = max(len(p) + m for p, m in zip(prompts, budgets))
    out = [None] * (P * n)
    with Engine(model, min(slots or P * n, P * n), temperature, top_k, top_p, stop_ids, longest, stats) as eng:
        for i, (p, m, sd) in enumerate(zip(prompts, budgets, seeds)):
            eng.submit(p, n, m, sd, tag=i)
        while eng.busy:
            for i, j, c in eng.step():
                out[i * n + j] = c
    return out
