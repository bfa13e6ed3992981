"""Multi-turn episodes (nanorl/rollout.py, env.py, the sampler's on_turn_end): the references are the plain
single-turn sampler, the trainer's own forward over the whole episode, hand-computed returns, and the chat
template applied to the final messages."""

import json
import os

import pytest
import torch
from conftest import scripted_generate

from nanorl import UserError, algos
from nanorl.advantages import reward_to_go
from nanorl.env import Step, ToolEnv, Tools, load_env, parse_calls
from nanorl.model import load_model
from nanorl.observations import Observations
from nanorl.policy import Policy, collate
from nanorl.rollout import Episode, reference_episode, run_episodes
from nanorl.sampler import generate
from nanorl.tasks import make_task, score
from nanorl.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", seed=0), load_tokenizer("tiny")


@pytest.fixture(scope="module")
def calc_model():
    """The tiny model after a short warm start on calc episodes that all call the tool (the call format)."""
    tok, task = load_tokenizer("tiny"), make_task("calc:tool_frac=1,digits=1,terms=3,ops=+*")
    model = load_model("tiny", seed=0)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    policy = Policy(model, impl="torch")
    for step in range(40):
        refs = [reference_episode(task, task.train_example(step * 16 + i), tok, False) for i in range(16)]
        inp = collate([r[0] for r in refs], [r[1] for r in refs], tok.pad_id, "cpu", masks=[r[2] for r in refs])
        logp, _, _ = policy(inp)
        loss, _ = algos.sft_loss(logp, inp["mask"])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), tok, task


def _trainer_logprobs(model, eps, group=1, temperature=1.0):
    inp = collate([e.prompt for e in eps], [e.tokens for e in eps], 0, "cpu", group, [e.mask for e in eps])
    with torch.no_grad():
        return Policy(model, impl="torch")(inp, temperature)[0], inp["mask"]


class OneTurn:
    """A user environment that ends after the first turn, whatever the policy wrote."""

    def reset(self, example):
        return example.meta["expr"] + "="

    def step(self, text):
        return Step(reward=None, done=True)


def test_one_turn_episode_reproduces_the_single_turn_sampler(tiny):
    model, tok = tiny
    task = make_task("arith:digits=2")
    exs = [task.train_example(i) for i in range(5)]
    seeds = [11, 12, 13, 14, 15]
    prompts = [tok.encode(task.prompt(ex, tok, False)) for ex in exs]
    ref = generate(model, prompts, n=4, max_new_tokens=12, temperature=1.0, stop_ids=tok.eos_ids, seed=seeds)
    ref_sc = score(task, [tok.decode(c.tokens) for c in ref], [ex for ex in exs for _ in range(4)])
    for kw in (dict(max_turns=1), dict(max_turns=3, env_cls=OneTurn, max_episode_tokens=12)):
        eps = run_episodes(model, tok, task, exs, 4, max_new_tokens=12, seed=seeds, **kw)
        assert [e.prompt for e in eps] == [prompts[i // 4] for i in range(20)]
        assert [e.tokens for e in eps] == [c.tokens for c in ref]
        assert [e.logprobs for e in eps] == [c.logprobs for c in ref]  # bit for bit
        assert [e.finish_reason for e in eps] == [c.finish_reason for c in ref]
        assert all(e.mask == [1] * len(e.tokens) and e.turns == 1 for e in eps)
        assert [e.reward for e in eps] == ref_sc.rewards
    # the update: the episode mask of a one-turn episode gives the same inputs, loss and gradients
    a = collate([e.prompt for e in eps], [e.tokens for e in eps], 0, "cpu", 4, [e.mask for e in eps])
    b = collate([e.prompt for e in eps], [e.tokens for e in eps], 0, "cpu", 4)
    for k in ("ids", "positions", "idx", "targets", "mask"):
        assert torch.equal(a[k], b[k]), k
    grads = []
    for inp in (a, b):
        model.zero_grad()
        logp, ent, _ = Policy(model, impl="torch")(inp)
        A = torch.linspace(-1, 1, 20)
        loss, _ = algos.loss(logp, logp.detach(), A, inp["mask"], algos.PRESETS["grpo"], logp.detach() - 0.1, ent)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(x, y) for x, y in zip(grads[0][1], grads[1][1]))
    model.zero_grad()


@pytest.mark.parametrize("name", ["calc", "guess"])
def test_sampler_logprobs_equal_the_trainer_forward_over_the_episode(calc_model, tiny, name):
    # the calc warm start ends its turns early, so guess episodes get several turns too
    model, tok, task = calc_model if name == "calc" else (*calc_model[:2], make_task("guess:n=16"))
    exs = [task.train_example(1000 + i) for i in range(4)]
    stats = {}
    eps = run_episodes(model, tok, task, exs, 4, max_turns=4, max_new_tokens=24, temperature=1.0, seed=3,
                       max_episode_tokens=90, stats=stats)
    turns = [e.turns for e in eps]
    assert max(turns) >= (2 if name == "calc" else 3), turns  # several turns, observations injected
    assert any(0 in e.mask for e in eps)
    if name == "calc":
        assert stats["tool_calls"] > 0
    for e in eps:
        assert len(e.tokens) == len(e.mask) == len(e.logprobs) <= 90
        assert all(lp == 0.0 for lp, m in zip(e.logprobs, e.mask) if m == 0)
    for group in (1, 4):  # Prefix Grouper packing works on episodes
        logp, mask = _trainer_logprobs(model, eps, group)
        for b, e in enumerate(eps):
            m = torch.tensor(e.mask, dtype=torch.bool)
            assert torch.equal(mask[b, :len(e.mask)] > 0, m)
            got = logp[b, :len(e.mask)][m]
            want = torch.tensor(e.logprobs)[m]
            assert (got - want).abs().max() <= 1e-4, (name, group, b)


def test_compaction_mid_episode_keeps_logprobs_exact(calc_model, monkeypatch):
    """Rows that end early leave the batch while others are still in later turns; the rest stays exact."""
    import nanorl.rollout as R

    model, tok, _ = calc_model
    task = make_task("guess:n=64")
    exs = [task.train_example(i) for i in range(4)]
    st = {}
    monkeypatch.setattr(R, "generate", lambda *a, **k: generate(*a, **k, stats=st))
    eps = run_episodes(model, tok, task, exs, 6, max_turns=6, max_new_tokens=6, temperature=1.0, seed=7,
                       max_episode_tokens=120)
    assert st["decode_rows"] < 24 * st["decode_steps"]  # rows were dropped from the batch mid-run
    late = max(len(e.tokens) for e in eps)
    assert min(len(e.tokens) for e in eps) < late and max(e.turns for e in eps) >= 3
    logp, _ = _trainer_logprobs(model, eps)
    for b, e in enumerate(eps):
        m = torch.tensor(e.mask, dtype=torch.bool)
        assert (logp[b, :len(e.mask)][m] - torch.tensor(e.logprobs)[m]).abs().max() <= 1e-4


def test_episodes_through_the_kept_decode_steps_equal_the_plain_decode(calc_model, monkeypatch):
    """On CUDA decode runs through DecodeGraphs' fixed-shape steps (bucketed batch, in-place compaction);
    forced observation tokens must go through them exactly as through the plain decode (run here on the
    CPU, where the same steps run uncaptured)."""
    import nanorl.rollout as R

    model, tok, _ = calc_model
    task = make_task("guess:n=64")
    exs = [task.train_example(i) for i in range(3)]
    kw = dict(max_turns=6, max_new_tokens=6, temperature=1.0, seed=11, max_episode_tokens=120)
    plain = run_episodes(model, tok, task, exs, 5, **kw)
    st = {}
    monkeypatch.setattr(R, "generate", lambda *a, **k: generate(*a, **k, cuda_graph=True, stats=st))
    kept = run_episodes(model, tok, task, exs, 5, **kw)
    assert st["decode_rows"] < 16 * st["decode_steps"]  # the bucket shrank: compaction ran mid-episode
    assert max(e.turns for e in plain) >= 3
    for a, b in zip(plain, kept):
        assert (a.tokens, a.mask, a.turns, a.reward) == (b.tokens, b.mask, b.turns, b.reward)
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-5


def test_injected_tokens_get_no_gradient_and_their_values_do_not_matter(calc_model):
    model, tok, task = calc_model
    eps = run_episodes(model, tok, task, [task.train_example(1000 + i) for i in range(4)], 4, max_turns=3,
                       max_new_tokens=24, seed=3, max_episode_tokens=90)
    assert any(0 in e.mask for e in eps)
    inp = collate([e.prompt for e in eps], [e.tokens for e in eps], 0, "cpu", 4, [e.mask for e in eps])
    hidden = model.hidden
    kept = {}

    def spy(*a, **k):
        h = hidden(*a, **k)
        h.retain_grad()
        kept["h"] = h
        return h
    model.hidden = spy
    torch.manual_seed(0)
    mask = inp["mask"]
    hole = torch.zeros_like(mask, dtype=torch.bool)
    for b, e in enumerate(eps):
        hole[b, :len(e.mask)] = torch.tensor(e.mask) == 0
    try:
        for preset in ("grpo", "dapo", "dr_grpo", "gspo", "cispo", "gmpo", "sapo", "kl_cov", "topr", "reg_grpo"):
            cfg = algos.make_config(preset, l_max=60) if algos.PRESETS[preset].agg == "token_sum_norm" else algos.PRESETS[preset]
            out = []
            for rnd in (False, True):
                model.zero_grad()
                logp, ent, _ = Policy(model, impl="torch")(inp)
                g = torch.Generator().manual_seed(1)
                old = logp.detach() + 0.1 * torch.randn(logp.shape, generator=g)
                A = torch.randn(logp.shape, generator=g)
                ref = logp.detach() - 0.1 * torch.rand(logp.shape, generator=g)
                if rnd:  # junk at injected positions must change nothing
                    old, A, ref = (torch.where(hole, torch.randn(logp.shape) * 5, x) for x in (old, A, ref))
                loss, _ = algos.loss(logp, old, A, mask, cfg, ref, ent, group_size=4)
                loss.backward()
                h = kept["h"].grad.flatten(0, 1)
                assert torch.count_nonzero(h[inp["idx"][hole]]) == 0  # the states predicting injected tokens
                out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
            assert torch.equal(out[0][0], out[1][0]), preset
            assert all(torch.equal(x, y) for x, y in zip(out[0][1], out[1][1])), preset
    finally:
        del model.hidden
        model.zero_grad()


def test_reward_to_go_carries_across_mask_holes():
    r = torch.tensor([[0.0, 0.0, 5.0, 5.0, 1.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]])
    got = reward_to_go(r, m, gamma=0.5)
    assert torch.equal(got, torch.tensor([[0.25, 0.5, 0.0, 0.0, 1.0, 0.0]]))  # hand-computed; rewards in holes ignored
    # the same as the row with its holes removed
    assert torch.equal(got[m > 0], reward_to_go(torch.tensor([[0.0, 0.0, 1.0]]), torch.ones(1, 3), 0.5)[0])
    cfg = algos.make_config("remax", gamma=1.0)  # undiscounted: the holes alone
    A = algos.advantages(torch.tensor([1.0]), 1, cfg, mask=m, baseline=torch.tensor([0.25]))
    assert torch.equal(A, torch.tensor([[0.75, 0.75, 0.0, 0.0, 0.75, 0.0]]))


def test_tool_errors_are_observations_never_crashes(tmp_path):
    def boom(**kw):
        raise RuntimeError("kaput")

    def hang(**kw):
        import time
        time.sleep(30)

    tools = Tools({"calc": lambda expr: eval(expr, {}), "boom": boom, "hang": hang}, timeout=0.5)
    env = ToolEnv(lambda ex: [], tools, "hermes")
    cases = [('<tool_call>{"name": "calc", "arguments": {"expr": "6*7"}}</tool_call>', "42", 0),
             ('<tool_call>{"name": "calc", "arguments": {"expr": "6*7"</tool_call>', "error: bad JSON", 1),
             ('<tool_call>{"name": "nope", "arguments": {}}</tool_call>', "error: unknown tool 'nope'", 1),
             ('<tool_call>{"name": "boom", "arguments": {}}</tool_call>', "error: RuntimeError: kaput", 1),
             ('<tool_call>{"name": "hang", "arguments": {}}</tool_call>', "error: hang timed out", 1),
             ('<tool_call>{"name": "calc", "arguments": {"expr": "1+1"}}</tool_call>', "2", 0),  # a fresh worker
             ('<tool_call>[1, 2]</tool_call>', "error: a tool call needs", 1)]
    for text, want, errors in cases:
        st = env.step(text)
        assert not st.done and st.info == {"tool_calls": 1, "tool_errors": errors}
        assert st.observation[0]["role"] == "tool" and st.observation[0]["content"].startswith(want), st.observation
    assert env.step("no call here, the answer is 42").done
    assert parse_calls("<calc>1+2</calc> and <calc>3</calc>", ["calc"], "tags") == [("calc", "1+2"), ("calc", "3")]


def test_budgets_and_truncated_observations(calc_model):
    model, tok, _ = calc_model
    task = make_task("guess:n=16")
    exs = [task.train_example(i) for i in range(3)]
    eps = run_episodes(model, tok, task, exs, 3, max_turns=2, max_new_tokens=5, seed=1, max_episode_tokens=200)
    for e in eps:
        assert e.turns <= 2
        for a, b in e.turn_spans:
            assert b - a <= 5 and all(e.mask[a:b])
        assert e.finish_reason in ("stop", "length", "max_turns")
        if e.turns == 2 and e.finish_reason != "length":
            assert e.finish_reason in ("max_turns", "stop")
    eps = run_episodes(model, tok, task, exs, 3, max_turns=8, max_new_tokens=5, seed=1, max_episode_tokens=30,
                       max_obs_tokens=6)
    for e in eps:
        assert len(e.tokens) <= 30
        holes = [len(list(g)) for k, g in __import__("itertools").groupby(e.mask) if k == 0]
        assert all(h <= 6 for h in holes)
    assert sum(e.obs_truncated for e in eps) > 0
    ids, cut = Observations(tok, max_tokens=10).ids("<result>" + "x" * 50 + "</result>")
    assert cut and len(ids) == 10 and tok.decode(ids).startswith("<resu") and tok.decode(ids).endswith("sult>")


def test_an_answer_only_the_tool_wrote_earns_nothing():
    task = make_task("calc")
    ex = task.train_example(0)
    assert task.reward(ex.answer, ex) == 1.0
    assert task.reward(f"<calc>{ex.meta['expr']}</calc>\n{ex.answer}", ex) == 1.0  # the policy copied the result
    assert task.reward(f"<calc>{ex.answer}</calc>", ex) == 0.0  # the number is only inside the call
    # episode text never holds observations: a policy that stops after the call scores 0
    tok = load_tokenizer("tiny")
    ep = Episode([1], [], [], [], 0.0, 0, "stop")
    ep.text = f"<calc>{ex.meta['expr']}</calc>"
    from nanorl.rollout import score_episodes
    score_episodes(task, [ep], [ex], 5.0)
    assert ep.reward == 0.0
    ex = make_task("calc:tool_frac=1").train_example(3)
    _, tokens, mask = reference_episode(task, ex, tok, False)  # the warm start: the observation is context
    assert tok.decode([t for t, m in zip(tokens, mask) if m == 0]) == f"<result>{ex.answer}</result>"
    assert tok.decode([t for t, m in zip(tokens, mask) if m == 1]) == f"<calc>{ex.meta['expr']}</calc>{ex.answer}"


def test_chat_warm_start_episode_on_smollm2(smollm2):
    """The warm start's reference episode in chat mode (SmolLM2-135M-Instruct, no `tools` in its template): the
    Hermes call the system prompt asks for, the calculator's own answer as a `tool` message, each policy turn
    ending on <|im_end|> (not <|endoftext|>, the tokenizer's first eos), mask 1 exactly on the turns."""
    _, tok = smollm2
    task = make_task("calc:tool_frac=1")
    ex = task.train_example(0)
    prompt, tokens, mask = reference_episode(task, ex, tok, True)
    call = f'<tool_call>\n{{"name": "calc", "arguments": {{"expr": "{ex.meta["expr"]}"}}}}\n</tool_call>'
    assert tok.decode(prompt, skip_special_tokens=False).endswith(
        f"{task.instruction.strip()}<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(tokens, skip_special_tokens=False) == (
        f"{call}<|im_end|>\n<|im_start|>tool\n{ex.answer}<|im_end|>\n<|im_start|>assistant\n{ex.answer}<|im_end|>")
    assert tok.decode([t for t, m in zip(tokens, mask) if m], skip_special_tokens=False) == \
        f"{call}<|im_end|>{ex.answer}<|im_end|>"


def test_chat_tool_episode_equals_the_template_of_the_final_messages(smollm2, monkeypatch):
    """SmolLM2-135M-Instruct's own template: decoded episode == template(final messages); mask-1 spans are
    exactly the assistant contents plus their end token. The policy's turns are scripted (the sampler's part
    is tested above): a stand-in for generate feeds them and injects what on_turn_end returns."""
    _, tok = smollm2
    task = make_task("calc:digits=2")
    ex = task.eval_examples(1)[0]
    script = [f'<tool_call>\n{{"name": "calc", "arguments": {{"expr": "{ex.meta["expr"]}"}}}}\n</tool_call>',
              '<tool_call>\n{"name": "calc", "arguments": {"expr": "1+"}}\n</tool_call>',
              f"The answer is {ex.answer}."]
    end = tok.eos_ids[0] if len(tok.eos_ids) == 1 else tok.encode("<|im_end|>")[0]
    from nanorl import rollout as R
    monkeypatch.setattr(R, "generate", scripted_generate(tok, script, end))
    e, = run_episodes(None, tok, task, [ex], 1, max_turns=4, max_new_tokens=64, chat=True)
    assert e.turns == 3 and e.tool_calls == 2 and e.tool_errors == 1 and e.reward == 1.0
    env = task.make_env(tok, True)
    msgs = env.reset(ex)
    msgs += [{"role": "assistant", "content": script[0]}, {"role": "tool", "content": ex.answer},
             {"role": "assistant", "content": script[1]}, {"role": "tool", "content": "error: ValueError: not an arithmetic expression: '1+'"},
             {"role": "assistant", "content": script[2]}]
    rendered = tok.apply_chat_template(msgs, add_generation_prompt=False, tools=env.tools)
    decoded = tok.decode(e.prompt + e.tokens, skip_special_tokens=False)
    assert rendered == decoded + "\n"  # the template's newline after the final <|im_end|> is not sampled
    spans = [tok.decode(e.tokens[a:b], skip_special_tokens=False) for a, b in e.turn_spans]
    assert spans == [s + "<|im_end|>" for s in script]
    ones = [i for i, m in enumerate(e.mask) if m]
    assert ones == [i for a, b in e.turn_spans for i in range(a, b)]


def test_env_plugin_errors_are_one_line(tmp_path):
    f = tmp_path / "myenv.py"
    f.write_text("class Good:\n    def reset(self, ex):\n        return 'x'\n    def step(self, t):\n        pass\n"
                 "def not_a_class():\n    pass\n")
    assert load_env(f"{f}:Good").__name__ == "Good"
    for spec, words in ((f"{f}:Missing", "has no Class 'Missing'"), (f"{f}:not_a_class", "not a class"),
                        ("nope.py:X", "does not exist"), ("justaname", "expected module:Class"),
                        ("no_such_module_xyz:X", "cannot import")):
        with pytest.raises(UserError) as e:
            load_env(spec)
        assert words in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("--env")


def test_gigpo_hand_computed():
    from nanorl.advantages import gigpo

    # G = 3 episodes of one prompt; turns starting from anchor "A" form one step group, "B" and "C" are alone
    R = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 1, 0], [1, 1, 0, 1, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.float64)
    steps = [(["A", "B"], [(0, 2), (3, 5)]), (["A", "C"], [(0, 2), (3, 4)]), (["A"], [(0, 3)])]
    A = gigpo(R, 3, steps, mask, gamma=0.5, w=1.0, eps=0.0)
    a = 1 / 3 ** 0.5  # episode z-scores: (R - 2/3) / std, std = sqrt(1/3) (Bessel): a, -2a, a
    # step returns at "A": 0.5 * 1, 0.5 * 0, 1 * 1 -> mean 0.5, std 0.5 -> z = 0, -1, 1
    want = torch.tensor([[a, a, 0, a, a, 0], [-2 * a - 1, -2 * a - 1, 0, -2 * a, 0, 0], [a + 1, a + 1, a + 1, 0, 0, 0]],
                        dtype=torch.float64)
    assert torch.allclose(A, want, atol=1e-12)
    # through advantages() with the preset; without anchors (None) it is GRPO's z-score on every token
    cfg = algos.make_config("gigpo", gamma=0.5, adv_eps=0.0)
    assert torch.allclose(algos.advantages(R, 3, cfg, mask=mask, steps=steps), want, atol=1e-12)
    plain = algos.advantages(R, 3, cfg, mask=mask, steps=[([None] * len(k), s) for k, s in steps])
    assert torch.allclose(plain, torch.tensor([a, -2 * a, a], dtype=torch.float64)[:, None] * mask, atol=1e-12)


def test_sample_transcript_marks_injected_spans():
    import sample

    tok = load_tokenizer("tiny")
    call, obs, ans = tok.encode("<calc>1+2</calc>") + [2], tok.encode("<result>3</result>"), tok.encode("3") + [2]
    e = Episode(tok.encode("1+2="), call + obs + ans, [1] * len(call) + [0] * len(obs) + [1] * len(ans),
                [0.0] * 30, 1.0, 2, "stop")
    assert sample.transcript(tok, e) == "1+2=<calc>1+2</calc><|eos|>⟪<result>3</result>⟫3<|eos|>"


def test_train_runs_a_multi_turn_task_with_gigpo(tmp_path):
    import train

    out = str(tmp_path / "out")
    assert train.main(["--model", "tiny", "--task", "guess:n=8", "--algo", "gigpo", "--steps", "2",
                       "--prompts-per-step", "2", "-n", "4", "--max-new-tokens", "4", "--max-turns", "3",
                       "--eval-n", "4", "--warm-start-steps", "2", "--out", out, "--progress", "false"]) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(rows) == 2
    for r in rows:
        assert 1 <= r["turns"] <= 3 and r["tool_calls"] == 0 and r["obs_truncated"] == 0
        assert r["response_len"] <= 3 * 4  # policy tokens only: at most max_turns x max_new_tokens
        assert r["step_group_size"] >= 1 and r["env_errors"] == 0  # GiGPO's step groups are logged
