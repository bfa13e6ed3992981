"""nanorl/continuous.py: the continuous-batching sampler draws sampler.generate's samples (same seeds, any slot
count, rows of 10x different lengths sharing steps, the cache shifted when full), its logprobs are a full
forward's, and it keeps its slots full while rows wait."""

import pytest
import torch

from nanorl.continuous import Engine, generate_continuous
from nanorl.model import load_model
from nanorl.sampler import generate

PROMPTS = [[1 + (i * 7 + k) % 50 for k in range(3 + i % 5)] for i in range(12)]
BUDGETS = [4 if i % 2 else 40 for i in range(12)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_model("tiny")


@pytest.mark.parametrize("slots", [4, 5, 36])
def test_samples_equal_generate_per_prompt(model, slots):
    st = {}
    cb = generate_continuous(model, PROMPTS, 3, BUDGETS, temperature=1.0, seed=5, slots=slots, stats=st)
    ref = [c for i, p in enumerate(PROMPTS)
           for c in generate(model, [p], n=3, max_new_tokens=BUDGETS[i], seed=[(5 * 1000003 + i) % (1 << 63)])]
    assert [c.tokens for c in cb] == [c.tokens for c in ref]
    assert [c.finish_reason for c in cb] == [c.finish_reason for c in ref] == ["length"] * 36
    assert max(abs(x - y) for a, b in zip(cb, ref) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
    assert st["prefills"] == 12 and st["tokens"] == 3 * sum(BUDGETS)
    if slots < 36:
        assert st.get("shifts", 0) >= 1  # the write position reached the end of the cache and every row moved
        # full slots while rows wait: at most the tail's steps run below `slots` rows
        assert st["decode_rows"] >= slots * (st["tokens"] // slots - max(BUDGETS))


def test_stop_tokens_and_greedy_match_generate(model):
    ref = generate(model, PROMPTS, n=2, max_new_tokens=20, temperature=0, stop_ids=[2, 7], seed=1)
    cb = generate_continuous(model, PROMPTS, 2, 20, temperature=0, stop_ids=[2, 7], seed=1, slots=5)
    assert [c.tokens for c in cb] == [c.tokens for c in ref]
    assert [c.finish_reason for c in cb] == [c.finish_reason for c in ref]


def test_logprobs_equal_a_full_forward(model):
    """Teacher forcing of prompt + completion through a float64 copy of the model: log softmax(z / T) at each token."""
    T = 0.7
    cb = generate_continuous(model, PROMPTS[:6], 2, [30, 3, 30, 3, 30, 3], temperature=T, seed=3, slots=3)
    m64 = load_model("tiny").double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    for c in cb:
        p = PROMPTS[c.prompt_index]
        z = m64(torch.tensor([p + c.tokens]))[0, len(p) - 1:-1].double() / T
        want = torch.log_softmax(z, -1).gather(-1, torch.tensor(c.tokens)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(c.logprobs, dtype=torch.float64), want, atol=1e-4)


def test_engine_fed_over_time_equals_generate(model):
    """The incremental engine: prompts submitted while others decode (some after the tail was compacted, the last
    one longer than the cache was made for, so it grows with rows live), with top-k and top-p. Every row is
    sampler.generate's sample of its prompt and seed: the same tokens, logprobs and truncated logprobs."""
    subs = [(PROMPTS[i], BUDGETS[i], 100 + i) for i in range(12)] + [([5] * 30, 60, 7)]
    sampling = dict(temperature=0.9, top_k=20, top_p=0.9)
    st, got, todo, t = {}, {}, list(range(len(subs))), 0
    with Engine(model, 5, **sampling, room=47, stats=st) as eng:
        while todo or eng.busy:
            if todo and (t % 9 == 0 or not eng.busy):
                i = todo.pop(0)
                eng.submit(subs[i][0], 3, subs[i][1], subs[i][2], tag=i)
            got.update({(i, j): c for i, j, c in eng.step()})
            t += 1
        assert not eng.subs and not eng.prefilled  # nothing kept of a finished prompt (a stream never ends)
    assert st["grows"] == 1 and st["regrows"] >= 1 and st["prefills"] == 13
    for i, (p, m, sd) in enumerate(subs):
        ref = generate(model, [p], n=3, max_new_tokens=m, seed=[sd], **sampling)
        for j, r in enumerate(ref):
            c = got[(i, j)]
            assert c.tokens == r.tokens and c.finish_reason == r.finish_reason
            lps, want = c.logprobs + c.sampling_logprobs, r.logprobs + r.sampling_logprobs
            assert max(abs(x - y) for x, y in zip(lps, want)) < 1e-5
    assert any(c.logprobs != c.sampling_logprobs for c in got.values())  # the truncation was live


def test_in_flight_weight_update(model):
    """New weights written in place between two steps (then repack(): the CPU path decodes on packed copies): the
    rows go on over their cache, and each token's logprob is the probability it was drawn with. Reference: the old
    model over the prompt and the tokens before the update, then the new model decoding the rest over that cache."""
    import copy

    new = load_model("tiny", seed=1)
    live = copy.deepcopy(model)
    prompt, t_update, st = PROMPTS[3], 5, {}
    with Engine(live, 6, room=40, stats=st) as eng:  # 6 rows > 4: the packed oneDNN path
        eng.submit(prompt, 6, 20, 11)
        out = {}
        for t in range(20):
            if t == t_update:
                with torch.no_grad():
                    for p, q in zip(live.parameters(), new.parameters()):
                        p.copy_(q)
                eng.repack()
            out.update({j: c for _, j, c in eng.step()})
    with torch.no_grad():
        for c in out.values():
            ids = torch.tensor([prompt + c.tokens[:t_update]])
            cache = model.new_cache(1, len(prompt) + 20)
            z = model(ids, kv_cache=cache)[0, len(prompt) - 1:]  # the tokens before the update, and the next one
            want = torch.log_softmax(z, -1).gather(-1, torch.tensor(c.tokens[:t_update + 1])[:, None])[:, 0].tolist()
            for tok_, nxt in zip(c.tokens[t_update:-1], c.tokens[t_update + 1:]):
                z = new(torch.tensor([[tok_]]), kv_cache=cache)[0, -1]
                want.append(float(torch.log_softmax(z, -1)[nxt]))
            assert max(abs(x - y) for x, y in zip(c.logprobs, want)) < 1e-4
