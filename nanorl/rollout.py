"""Rollouts: prompts -> episodes (single- or multi-turn) -> rewards -> shaped, filtered groups.

    episodes = run_episodes(model, tok, task, examples, n, max_turns, max_new_tokens, temperature, seed)
    batch = rollout(sampler_model, tok, task, stream, args, cfg)        # one RL step's data (train.py)

An episode is token-in / token-out: prompt + a1 o1 a2 o2 ... aT, where the policy's turns `a` (each with
its sampled stop token) have mask 1 and the environment's observations `o` mask 0 and logprob 0.0. The
sampler (sampler.generate with on_turn_end) takes each observation in through the row's KV cache in chunks,
and rows in different turns share the batch. The environments of all rows that end a turn at the same
decode step are stepped at once, each contained (tool_pool.run_contained): one that raises or runs past
--env-timeout ends its episode as "env_error"; rollout() masks those out of the loss. The history is never
decoded and re-encoded: text observations are encoded on their own, chat observations are the chat template's
text for them on a fixed minimal base, never the live history (nanorl/observations.py: caps, special-token
strings as plain text, a completed end-of-turn; the template is probed before any sampling). A single-turn
task is the one-turn episode of the same code (env.SingleTurnEnv), stepped after generation so that the
sampler need not look at the host every token: tests/test_rollout.py checks it reproduces the plain sampler
bit for bit.

Rewards: an environment's step rewards, when it gives them (guess), else the task's reward of the
policy's own text: its turns joined by newlines, observations left out, so an answer only the
environment wrote scores nothing (a --reward-fn that asks for `messages` reads the whole episode).
score_episodes is the one place rewards are computed. Each episode keeps its per-turn rewards
(turn_rewards) and each turn's anchor state for GiGPO (state_keys: the environment's state_key, else the
observation the turn starts from).
"""

import functools
import hashlib
import time
from dataclasses import dataclass, field

import torch

from nanorl import TrainingStopped, UserError, algos
from nanorl import dist as D
from nanorl.env import Env, Step
from nanorl.observations import Observations
from nanorl.sampler import generate
from nanorl.tasks import score
from nanorl.tool_formats import tags_message, takes_tools
from nanorl.tool_pool import run_contained


@dataclass
class Episode:
    prompt: list[int]
    tokens: list[int]            # everything after the prompt
    mask: list[int]              # 1 = sampled by the policy, 0 = injected by the environment
    logprobs: list[float]        # the sampler's (full softmax at the temperature); 0.0 where mask is 0
    reward: float
    turns: int                   # policy turns
    finish_reason: str           # "stop" | "length" (a token budget) | "max_turns" | "env_error" (reset/step failed)
    sampling_logprobs: list[float] = field(default_factory=list)  # under top-k / top-p truncation
    text: str = ""               # the policy's own text, turns joined by "\n": what the task's reward reads
    correct: bool = False
    formatted: float = 0.0
    tool_calls: int = 0
    tool_errors: int = 0
    obs_truncated: int = 0       # observations cut in the middle to --max-obs-tokens
    turn_spans: list = field(default_factory=list)   # (start, end) of each policy turn in tokens
    state_keys: list = field(default_factory=list)   # GiGPO's anchor as each turn began (rollout._anchor)
    turn_rewards: list = field(default_factory=list)  # each turn's step reward (None: the environment gave none)
    env_rewarded: bool = False   # the reward came from the environment's steps
    messages: list = field(default_factory=list)  # the episode as chat messages: prompt, turns, observations


class PromptStream:
    """This rank's training examples, in a fixed order given the seed; `position` is saved in checkpoints."""

    def __init__(self, task, rank, world):
        self.task, self.rank, self.world, self.position = task, rank, world, 0

    def next(self, n_global):
        """This rank's share of the next n_global examples, with their global indices (the sampling seeds)."""
        idx = [self.position + i for i in range(self.rank, n_global, self.world)]
        self.position += n_global
        return idx, [self.task.train_example(i) for i in idx]


def check_prompts(task, tok, args, context, eval_examples):
    """A data file's prompts must leave room to answer: fail at the start, naming the line, not hours in.
    Chat episodes of several turns: the chat template must be able to extend them (Observations.probe)."""
    kw = episode_args(args, task)
    if kw["max_turns"] > 1:
        env = kw["env_cls"]() if kw["env_cls"] else task.make_env(tok, kw["chat"])
        if not isinstance(env.reset(task.train_example(0)), str):
            tools = getattr(env, "tools", None)
            Observations(tok, kw["max_obs_tokens"], kw["max_tool_output_chars"]).probe(tools)
    if task.n_train is None:  # procedural tasks draw short prompts
        return
    for ex in [task.train_example(i) for i in range(task.n_train)] + list(eval_examples):
        n = len(encode_prompt(task, ex, tok, args.chat))
        if n >= context:
            where = ex.meta.get("where", f"{task.name} example {ex.id}")
            raise UserError(f"{where}: the prompt has {n} tokens but the model's context is {context}; "
                            f"shorten or delete the line")


def encode_prompt(task, ex, tok, chat):
    ids = tok.encode(task.prompt(ex, tok, chat))
    if not ids:
        raise UserError(f"{ex.meta.get('where', task.name + ' example ' + ex.id)}: the prompt is empty; fix the data line")
    return ids


def prompt_ids(prompt, tok, tools=None):
    """Token ids of what env.reset returned: text as is, chat messages through the model's template."""
    text = prompt if isinstance(prompt, str) else tok.apply_chat_template(prompt, add_generation_prompt=True, tools=tools)
    return tok.encode(text)


@torch.no_grad()
def run_episodes(model, tok, task, examples, n, max_turns, max_new_tokens, temperature=1.0, seed=None, *,
                 top_p=1.0, top_k=0, chat=False, max_episode_tokens=None, max_obs_tokens=None, max_tool_output_chars=4000,
                 reward_timeout=10.0, env_cls=None, stats=None, scorer=None, env_timeout=None, tool_workers=None,
                 max_tool_calls=None, tool_limits=None, completions=None):
    """len(examples) * n episodes, grouped by example; see the module docstring.

    max_new_tokens bounds each turn, max_episode_tokens (default max_turns * max_new_tokens, plus as many
    observation tokens) the whole episode, injected tokens included; max_obs_tokens and max_tool_output_chars
    cap each observation's contents (observations.Observations). env_cls: a user environment class
    (--env), built once per episode; default task.make_env(tok, chat). env_timeout: seconds an environment's
    reset / step may take (None: no limit); one that raises or runs past it ends its episode as "env_error".
    tool_workers, max_tool_calls, tool_limits: the tool pool's size, the calls run per turn (ToolEnv) and the
    workers' limits ({"memory_mb": .., "cpu_s": ..}; None: the tool set's own). stats: a dict
    that receives reward_errors, reward_timeouts, score_s, tool_calls, tool_errors, obs_truncated, env_errors
    (summed). scorer: learned rewards added to the task's (reward_model.make_scorer; see score_episodes).
    completions: single-turn rows sampled already (the streaming rollout rank's continuous batching,
    nanorl/async_loop.py), one per episode, from the prompts the environments' resets give: no sampling here.
    """
    if max_turns < 1:
        raise UserError(f"--max-turns {max_turns} must be >= 1")
    budget = max_episode_tokens or (max_new_tokens if max_turns == 1 else 2 * max_turns * max_new_tokens)
    envs = [env_cls() if env_cls else task.make_env(tok, chat) for _ in range(len(examples) * n)]
    pools = _configure_tools(envs, tool_workers, max_tool_calls, tool_limits)
    # every reset at once, contained: a group's members share the prompt of the first whose reset worked
    resets = run_contained([functools.partial(env.reset, examples[i // n]) for i, env in enumerate(envs)], env_timeout)
    env_error = [status != "ok" for _, status in resets]
    prompts, histories, messages = [], [], []
    for g, ex in enumerate(examples):
        ids = None
        for i in range(g * n, (g + 1) * n):
            if not env_error[i] and ids is None:
                try:
                    ids = prompt_ids(resets[i][0], tok, getattr(envs[i], "tools", None))
                except UserError:
                    raise
                except Exception:  # noqa: BLE001  (reset returned something that is neither text nor messages)
                    env_error[i] = True
        if ids is None:  # every reset of the group failed: the task's prompt stands in, the rows end as env_error
            ids = encode_prompt(task, ex, tok, chat)
        if not ids:
            raise UserError(f"{ex.meta.get('where', task.name + ' example ' + ex.id)}: the prompt is empty; fix the data line")
        prompts.append(ids)
    for i, (p, _) in enumerate(resets):
        chat_p = not env_error[i] and not isinstance(p, str)
        histories.append(list(p) if chat_p else None)
        messages.append(list(p) if chat_p else [{"role": "user", "content": p if isinstance(p, str) else ""}])
    eps = [Episode(prompts[i // n], [], [], [], 0.0, 0, "stop", state_keys=[_anchor(env, prompts[i // n])],
                   messages=messages[i]) for i, env in enumerate(envs)]
    start, cut = [0] * len(envs), [False] * len(envs)
    success = [False] * len(envs)
    observe = Observations(tok, max_obs_tokens, max_tool_output_chars)
    chat_rows = [i for i, h in enumerate(histories) if h is not None]
    if chat_rows and max_turns > 1:  # chat episodes: the template can extend them, before any sampling
        observe.probe(getattr(envs[chat_rows[0]], "tools", None))

    def after_step(r, tokens, text, st):
        """The row's observation ids after its environment's step st, or None to end the row."""
        e, env = eps[r], envs[r]
        e.tool_calls += st.info.get("tool_calls", 0)
        e.tool_errors += st.info.get("tool_errors", 0)
        success[r] |= bool(st.info.get("success"))
        e.turn_rewards.append(None if st.reward is None else float(st.reward))
        if st.done:
            return None
        if len(e.turn_spans) >= max_turns:
            cut[r] = True
            return None
        ids, trunc = [], False
        if st.observation is not None:
            if histories[r] is not None:
                histories[r].append({"role": "assistant", "content": text})
            ids, trunc = observe.ids(st.observation, tokens[-1], getattr(env, "tools", None))
            if histories[r] is not None:
                histories[r].extend(st.observation)
            e.messages.extend(st.observation if isinstance(st.observation, list) else
                              [{"role": "observation", "content": st.observation}])
        e.obs_truncated += trunc
        e.state_keys.append(_anchor(env, ids))
        start[r] = len(tokens) + len(ids)
        return ids

    def on_turn_end(rows, tokens):
        """The sampler's batched callback: every row that ended a turn at this decode step, stepped at once."""
        texts = [tok.decode(t[start[r]:]) for r, t in zip(rows, tokens)]
        for r, t, text in zip(rows, tokens, texts):
            eps[r].turn_spans.append((start[r], len(t)))
            eps[r].messages.append({"role": "assistant", "content": text})
        live = [k for k, r in enumerate(rows) if not env_error[r]]
        for pool in pools:  # fork the workers here, before the step threads start
            pool.ensure(len(live) * (max_tool_calls or 1))
        res = run_contained([functools.partial(envs[rows[k]].step, texts[k]) for k in live], env_timeout)
        out = [None] * len(rows)
        for k, (st, status) in zip(live, res):
            r = rows[k]
            try:
                if status != "ok" or not isinstance(st, Step):
                    raise TypeError(f"step returned {type(st).__name__}, not env.Step" if status == "ok" else st)
                out[k] = after_step(r, tokens[k], texts[k], st)
            except UserError:  # a configuration error (the chat template): one line, the run stops
                raise
            except Exception:  # noqa: BLE001  (the environment's fault: this episode ends, the run goes on)
                env_error[r] = True
        return out

    # one turn: the environment steps after generation, so the sampler looks at the host only every sync_every
    # tokens (on_turn_end needs it every token); it returns None at a single turn's end either way
    single = max_turns == 1
    assert completions is None or (single and len(completions) == len(envs)), "completions: single-turn, one a row"
    res = completions or generate(model, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, top_k=top_k, stop_ids=tok.eos_ids, seed=seed,
                                  on_turn_end=None if single else on_turn_end, max_total_tokens=budget)
    if single:
        stopped = [r for r, c in enumerate(res) if c.finish_reason == "stop"]
        on_turn_end(stopped, [res[r].tokens for r in stopped])
    closing = [env.close for env in envs if callable(getattr(env, "close", None)) and type(env).close is not Env.close]
    run_contained(closing, env_timeout) if closing else None  # a close that fails or hangs changes no episode
    for r, (e, c) in enumerate(zip(eps, res)):
        e.tokens, e.mask, e.logprobs, e.sampling_logprobs = c.tokens, c.mask, c.logprobs, c.sampling_logprobs
        if start[r] < len(c.tokens) and (not e.turn_spans or e.turn_spans[-1][1] <= start[r]):
            e.turn_spans.append((start[r], len(c.tokens)))  # a last turn cut by a budget
            e.messages.append({"role": "assistant", "content": tok.decode(c.tokens[start[r]:])})
        e.state_keys = e.state_keys[:len(e.turn_spans)]
        e.turn_rewards = e.turn_rewards[:len(e.turn_spans)]
        e.turns = len(e.turn_spans)
        e.text = "\n".join(tok.decode(c.tokens[a:b]) for a, b in e.turn_spans)
        e.finish_reason = "env_error" if env_error[r] else "length" if c.finish_reason == "length" else \
            "max_turns" if cut[r] else "stop"
        known = [x for x in e.turn_rewards if x is not None]
        if env_error[r]:  # no reward: the rollout masks the episode out of the loss
            e.env_rewarded, e.reward, e.turn_rewards = True, 0.0, [None] * e.turns
        elif known:
            e.env_rewarded, e.reward = True, float(sum(known))
            e.correct = success[r] and e.finish_reason == "stop"
    score_episodes(task, eps, [ex for ex in examples for _ in range(n)], reward_timeout, stats, scorer,
                   track=temperature > 0)
    if stats is not None:
        for k in ("tool_calls", "tool_errors", "obs_truncated", "turns"):
            stats[k] = stats.get(k, 0) + sum(getattr(e, k) for e in eps)
        stats["env_errors"] = stats.get("env_errors", 0) + sum(env_error)
    return eps


def _anchor(env, obs_ids):
    """GiGPO's anchor state of the turn that starts now: the environment's state_key, else the observation
    the turn starts from (its token ids; the prompt for turn 0)."""
    key = getattr(env, "state_key", None)
    return key if key is not None else ("obs", tuple(obs_ids))


def _configure_tools(envs, workers, max_calls, limits=None):
    """Apply --tool-workers, --max-tool-calls-per-turn and the tool limits ({"memory_mb", "cpu_s"}: --tool-memory-mb,
    --tool-cpu-s) to the episodes' tool sets; returns their pools."""
    sets = {}
    for env in envs:
        ts = getattr(env, "tool_set", None)
        if ts is None:
            continue
        for k, v in (limits or {}).items():
            setattr(ts, k, v)
        if workers:
            ts.workers = workers
        if max_calls and hasattr(env, "max_calls"):
            env.max_calls = max_calls
        sets[id(ts)] = ts
    return [ts.pool for ts in sets.values()]


def score_episodes(task, episodes, examples, timeout, stats=None, scorer=None, track=True):
    """The task's reward of each episode the environment did not reward (the one place rewards are scored);
    then scorer's learned rewards (reward_model.py), added by weight, on every episode. A --reward-fn with a
    `messages` parameter, fn(completion, example, messages), and a reward model with a chat template read the
    whole episode as chat messages (prompt, policy turns, observations: Episode.messages). track=False keeps a
    greedy baseline (ReMax) out of the scorer's running statistics."""
    todo = [i for i, e in enumerate(episodes) if not e.env_rewarded]
    t0 = time.time()
    sc = score(task, [episodes[i].text for i in todo], [examples[i] for i in todo], timeout,
               [episodes[i].messages for i in todo])
    for k, i in enumerate(todo):
        e = episodes[i]
        e.reward, e.correct, e.formatted = sc.rewards[k], sc.correct[k], sc.formatted[k]
    for e in episodes:
        if e.env_rewarded:
            e.formatted = float(e.turns > 0)
    if scorer is not None:
        for e, r in zip(episodes, scorer(examples, [e.text for e in episodes], [e.reward for e in episodes], track=track,
                                         messages=[e.messages for e in episodes])):
            e.reward = float(r)
    if stats is not None:
        stats["reward_errors"] = stats.get("reward_errors", 0) + sc.errors
        stats["reward_timeouts"] = stats.get("reward_timeouts", 0) + sc.timeouts
        stats["score_s"] = stats.get("score_s", 0.0) + time.time() - t0


def reference_episode(task, ex, tok, chat):
    """(prompt ids, tokens, mask) of an example's reference solution, the warm start's target.

    ex.meta["turns"] (multi-turn tasks): [(policy text, observation text or None), ...], each policy turn
    plus its stop token with mask 1, each observation with mask 0; plain tasks: the solution plus its stop
    token. Tool calls in the turns are written in the tags syntax; in a chat ToolEnv a turn is the text the chat
    template writes for the assistant message with those calls (Observations.turn_text). In chat episodes the observations are the environment's own answers to
    the turns, templated as the rollout templates them (observations.py), and a turn ends with the
    template's end-of-turn marker (<|im_end|>), so the warm start teaches exactly the episodes RL samples.
    """
    env = task.make_env(tok, chat)
    p = env.reset(ex)
    turns = ex.meta.get("turns") or [(ex.solution, None)]
    tools, fmt = getattr(env, "tools", None), getattr(env, "fmt", "tags")
    stop = tok.eos_ids[0]
    if not isinstance(p, str):
        observe = Observations(tok)
        marker = observe.end_marker(tools)
        end = tok.encode(marker, add_bos=False) if marker else []
        stop = end[0] if len(end) == 1 and end[0] in tok.eos_ids else stop  # <|im_end|>, not <|endoftext|>
    tokens, mask = [], []
    try:
        for text, obs in turns:
            if fmt != "tags":
                msg = tags_message(text, list(env.tool_set.fns), env.tool_set.schemas, takes_tools(tok.chat_template))
                text = observe.turn_text(msg, tools)
            ids = tok.encode(text, add_bos=False) + [stop]
            tokens, mask = tokens + ids, mask + [1] * len(ids)
            if obs is None:
                continue
            if not isinstance(p, str):  # the environment's answer, templated as in a rollout
                st = env.step(text)
                if st.done or st.observation is None:
                    raise UserError(f"the {task.name} reference episode ended before its last turn ({text!r}): "
                                    f"the environment did not answer it; add --warm-start-steps 0")
                ids = observe.ids(st.observation, stop, tools)[0]
            else:
                ids = tok.encode(obs, add_bos=False)
            tokens, mask = tokens + ids, mask + [0] * len(ids)
    finally:
        env.close()
    return prompt_ids(p, tok, tools), tokens, mask


def episode_args(args, task):
    """run_episodes' keyword arguments from train.py / sample.py flags."""
    get = lambda name: getattr(args, name, None)  # noqa: E731  (scripts that predate the multi-turn flags)
    return dict(max_turns=get("max_turns") or task.max_turns, max_new_tokens=args.max_new_tokens, chat=args.chat,
                max_episode_tokens=get("max_episode_tokens"), max_obs_tokens=get("max_obs_tokens"),
                max_tool_output_chars=get("max_tool_output_chars") or 4000,
                reward_timeout=get("reward_timeout") or 10.0, env_cls=get("env_cls"), env_timeout=get("env_timeout"),
                tool_workers=get("tool_workers"), max_tool_calls=get("max_tool_calls_per_turn"),
                tool_limits={"memory_mb": get("tool_memory_mb"), "cpu_s": get("tool_cpu_s")}  # None: no limit
                if hasattr(args, "tool_cpu_s") else None)


def example_seed(seed, i):
    """One sampling seed per example, from its global index: the samples do not depend on the number of
    ranks, and a resumed run draws exactly the samples the uninterrupted run would have."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{i}".encode()).digest()[:7], "little")


def rollout(sampler_model, tok, task, stream, args, cfg, scorer=None):
    """Sample until this rank has its share of kept groups (DAPO dynamic sampling) or gives up.

    Groups the filter drops are replaced by fresh prompts; if fewer than needed survive after
    cfg.max_gen_batches generations, the batch is topped up with dropped groups whose rows are masked
    out (every rank must run the same number of micro-batches). Returns per-row data and counters.
    """
    G, n_local = cfg.group_size, args.prompts_per_step // D.world_size()
    kept, dropped, generated = [], [], []
    st = {"gen_batches": 0, "reward_errors": 0, "reward_timeouts": 0, "score_s": 0.0}
    kw = episode_args(args, task) | dict(scorer=scorer)
    while len(kept) < n_local:
        idx, exs = stream.next(args.prompts_per_step)
        eps = run_episodes(sampler_model, tok, task, exs, G, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k, seed=[example_seed(args.seed, i) for i in idx], stats=st, **kw)
        generated += eps
        for ex, g_eps, R, keep in shaped_groups(eps, exs, args, cfg):
            (kept if keep else dropped).append((ex, g_eps, R))
        st["gen_batches"] += 1
        if cfg.filter_groups == "none" or 0 < cfg.max_gen_batches <= st["gen_batches"]:
            break
    st["groups_kept"] = min(len(kept), n_local)
    if cfg.filter_groups != "none" and int(D.all_reduce(len(kept))) == 0:
        mean = sum(e.reward for e in generated) / len(generated)
        verdict = "too hard for the model" if mean <= 0.5 else "too easy for the model"
        raise TrainingStopped(f"dynamic sampling: every group had equal rewards in {st['gen_batches']} generation "
                              f"batches (mean reward {mean:.2f}): the task is {verdict}; pick another task or model, "
                              f"raise --max-gen-batches, or set --filter-groups none")
    groups = (kept + dropped)[:n_local]
    batch = make_batch(groups, generated, st, cfg)
    if cfg.needs_greedy_baseline:  # ReMax: each prompt's greedy response, scored, is its baseline
        greedy = run_episodes(sampler_model, tok, task, [g[0] for g in groups], 1, temperature=0, **kw)
        batch["baseline"] = torch.tensor([e.reward for e in greedy])
    return batch


def shaped_groups(eps, exs, args, cfg):
    """One generation's groups: [(example, its episodes, their shaped rewards R, kept by the group filter)]."""
    G = cfg.group_size
    rewards = torch.tensor([e.reward for e in eps], dtype=torch.float32)
    # DAPO's overlong penalty: the policy tokens of the longest turn (--max-new-tokens is a per-turn budget)
    R = algos.shape_rewards(rewards, longest_turns(eps), args.max_new_tokens, cfg,
                            torch.tensor([e.formatted for e in eps]), torch.tensor([e.finish_reason != "stop" for e in eps]))
    R = _exclude_env_errors(R, eps, G)
    # filter on the task reward, not the shaped one (DAPO filters on accuracy: verl's metric=acc)
    keep = algos.filter_groups(rewards, G, cfg.filter_groups, cfg.reward_max)
    return [(ex, eps[gi * G:(gi + 1) * G], R[gi * G:(gi + 1) * G], keep[gi]) for gi, ex in enumerate(exs)]


def make_batch(groups, generated, st, cfg):
    """One RL step's data: per-row lists and tensors of `groups` [(example, episodes, R)], of which the first
    st["groups_kept"] count (the rest are masked out); the task rewards of every episode `generated` (the
    metrics); the counters st. rollout() and the streaming rollout rank (nanorl/async_loop.py) both build it here."""
    rows = [(ex, e) for ex, eps, _ in groups for e in eps]
    R = torch.cat([g[2] for g in groups])
    zero = cfg.zero_truncated
    return dict(prompts=[e.prompt for _, e in rows], comps=[e.tokens for _, e in rows],
                masks=[[0] * len(e.mask) if e.finish_reason == "env_error" else e.mask for _, e in rows],
                ex=[ex for ex, _ in rows], episodes=[e for _, e in rows],
                steps=[_steps(e, float(r), zero) for (_, e), r in zip(rows, R)],
                sampler_logp=[e.sampling_logprobs for _, e in rows], R=R,
                truncated=torch.tensor([e.finish_reason != "stop" for _, e in rows]),
                valid=torch.arange(len(groups)).repeat_interleave(cfg.group_size) < st["groups_kept"],
                rewards=torch.tensor([e.reward for e in generated], dtype=torch.float32),
                correct=torch.tensor([e.correct for e in generated], dtype=torch.float32), stats=st)


def longest_turns(eps):
    """[B] the policy tokens of each episode's longest turn (a single-turn episode: its length)."""
    return torch.tensor([max((b - a for a, b in e.turn_spans), default=0) for e in eps])


def _exclude_env_errors(R, eps, G):
    """An env_error episode (masked out of the loss) takes its group's mean reward over the other episodes, so
    it moves neither the group's baseline nor anyone's advantage by a reward it never had."""
    bad = torch.tensor([e.finish_reason == "env_error" for e in eps])
    if not bad.any():
        return R
    g, b = R.view(-1, G), bad.view(-1, G)
    ok = (~b).to(R.dtype)
    mean = (g * ok).sum(1, keepdim=True) / ok.sum(1, keepdim=True).clamp(min=1)
    return torch.where(b, mean.expand_as(g), g).flatten()


def turn_rewards(e, R, zero_truncated=False):
    """Each turn's reward r_t for GiGPO's step returns, summing to the episode's shaped reward R: the
    environment's step rewards (None counts 0), and what shaping or the task's end-of-episode score adds on
    the last turn; all 0 for a truncated episode under zero_truncated (R is 0 then too)."""
    if e.turns == 0:
        return []
    if zero_truncated and e.finish_reason != "stop":
        return [0.0] * e.turns
    r = [0.0 if x is None else float(x) for x in e.turn_rewards][:e.turns]
    r += [0.0] * (e.turns - len(r))
    r[-1] += R - sum(r)
    return r


def _steps(e, R, zero_truncated):
    """(anchors, turn spans, turn rewards) of an episode for GiGPO; an env_error episode joins no step group."""
    if e.finish_reason == "env_error":
        return [None] * e.turns, e.turn_spans, [0.0] * e.turns
    return e.state_keys, e.turn_spans, turn_rewards(e, R, zero_truncated)


def policy_token_budget(args, task):
    """The most policy tokens an episode can hold: --max-new-tokens per turn times the turns, within
    --max-episode-tokens (Dr.GRPO's L_max for multi-turn tasks; max_new_tokens for single-turn ones)."""
    turns = getattr(args, "max_turns", None) or task.max_turns
    cap = getattr(args, "max_episode_tokens", None)
    return min(turns * args.max_new_tokens, cap) if cap else turns * args.max_new_tokens


@torch.no_grad()
def evaluate(model, tok, task, args, device, examples=None, stats=None):
    """Held-out greedy accuracy over eval_n examples (each rank does its share); stats: see run_episodes, plus
    `tool_call_rate` (all ranks: the fraction of episodes that called a tool) for multi-turn tasks."""
    examples = examples if examples is not None else task.eval_examples(args.eval_n)
    mine = examples[D.rank()::D.world_size()]
    correct = tools = 0.0
    kw = episode_args(args, task)
    for s in range(0, len(mine), 256):
        eps = run_episodes(model, tok, task, mine[s:s + 256], 1, temperature=0, stats=stats, **kw)
        correct += sum(e.correct for e in eps)
        tools += sum(e.tool_calls > 0 for e in eps)
    tot = D.all_reduce([correct, float(len(mine)), tools])
    if stats is not None and kw["max_turns"] > 1 and (hasattr(task, "tool_set") or tot[2] > 0):
        stats["tool_call_rate"] = float(tot[2] / tot[1].clamp(min=1))
    return float(tot[0] / tot[1].clamp(min=1))
