"""The sampler against transformers' generate and against our own full forward pass."""

import pytest
import torch
from conftest import make_hf_model

from nanorl import UserError
from nanorl.model import load_model
from nanorl.sampler import generate, inverse_cdf

PROMPTS = [[5, 17, 33, 2, 9, 41, 8], [60, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]]


def _hf_greedy(ref, prompt, max_new, eos):
    out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                       do_sample=False, max_new_tokens=max_new, eos_token_id=eos,
                       pad_token_id=eos[0] if isinstance(eos, list) else eos)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3"])
def test_greedy_equals_transformers_generate(hf_ckpts, variant):
    ours = load_model(hf_ckpts[variant])
    ref = make_hf_model(variant)
    res = generate(ours, PROMPTS, max_new_tokens=24, temperature=0, stop_ids=[2])
    for prompt, c in zip(PROMPTS, res):
        expect = _hf_greedy(ref, prompt, 24, 2)
        assert c.tokens == expect
        assert c.finish_reason == ("stop" if expect[-1] == 2 else "length")


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_greedy_equals_transformers_with_packed_cpu_weights(hf_ckpts, variant):
    # 3 prompts x 2 samples x 20 tokens: above 4 rows, so generate packs the weights for oneDNN
    ours = load_model(hf_ckpts[variant])
    ref = make_hf_model(variant)
    res = generate(ours, PROMPTS, n=2, max_new_tokens=20, temperature=0, stop_ids=[2])
    for c in res:
        assert c.tokens == _hf_greedy(ref, PROMPTS[c.prompt_index], 20, 2)


def test_greedy_equals_transformers_on_smollm2(smollm2, smollm2_hf):
    model, tok = smollm2
    ref, _ = smollm2_hf
    prompts = [tok.encode("The capital of France is"),
               tok.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}], tokenize=True)]
    res = generate(model, prompts, max_new_tokens=32, temperature=0, stop_ids=tok.eos_ids)
    for p, c in zip(prompts, res):
        assert c.tokens == _hf_greedy(ref, p, 32, tok.eos_ids)


def _forward_logprobs(model, prompt, tokens, temperature=1.0):
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 0.9)])
def test_logprobs_equal_full_forward(hf_ckpts, temperature, top_k, top_p):
    model = load_model(hf_ckpts["qwen3"])
    res = generate(model, PROMPTS, n=3, max_new_tokens=20, temperature=temperature, top_k=top_k, top_p=top_p,
                   stop_ids=[2], seed=0)
    worst = 0.0
    for c in res:
        ref = _forward_logprobs(model, PROMPTS[c.prompt_index], c.tokens, temperature)
        worst = max(worst, (torch.tensor(c.logprobs) - ref).abs().max().item())
        lq = torch.tensor(c.sampling_logprobs)
        if top_k or top_p < 1:  # q renormalises a subset: every drawn token is at least as likely under q
            assert (lq >= torch.tensor(c.logprobs) - 1e-6).all()
        else:
            assert torch.allclose(lq, torch.tensor(c.logprobs))
    assert worst <= 1e-4, worst


def test_top_k_1_is_greedy(hf_ckpts):
    model = load_model(hf_ckpts["llama"])
    a = generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, top_k=1, seed=3)
    b = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    assert all(abs(x) < 1e-6 for c in a for x in c.sampling_logprobs)  # q is a point mass


def test_top_p_keeps_smallest_covering_set():
    from nanorl.sampler import sample_token

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    u = torch.rand(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    draws = torch.tensor([int(sample_token(logits, 1.0, 0, 0.8, u[i:i + 1])[0]) for i in range(1000)])
    assert set(draws.tolist()) == {0, 1}  # 0.5 + 0.3 covers 0.8; tokens 2 and 3 are never drawn
    assert abs((draws == 0).float().mean() - 0.5 / 0.8) < 0.05  # renormalised over the kept set
    tok, lp, lq = sample_token(logits, 1.0, 0, 0.8, u[:1])
    assert torch.allclose(lq - lp, -torch.log(torch.tensor(0.8)))


@pytest.mark.parametrize("V", [7, 1024, 5000])
def test_two_level_inverse_cdf_equals_one_float64_cumsum(V):
    g = torch.Generator().manual_seed(V)
    for scale, truncate in ((1.0, False), (8.0, False), (3.0, True)):
        logits = torch.randn(256, V, generator=g) * scale
        if truncate:  # zero-probability tokens, as top-k / top-p leave them
            logits[:, torch.randperm(V, generator=g)[:V // 2]] = float("-inf")
        p = torch.softmax(logits, -1)
        u = torch.rand(256, dtype=torch.float64, generator=g)
        cdf = p.double().cumsum(-1)
        expect = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0].clamp(max=V - 1)
        tok = inverse_cdf(p, u)
        assert torch.equal(tok, expect) and (p.gather(1, tok[:, None]) > 0).all()


def test_samples_follow_the_distribution():
    from nanorl.sampler import sample_token

    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    u = torch.rand(4000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    draws = torch.stack([sample_token(p.log()[None], 1.0, 0, 1.0, u[i:i + 1])[0] for i in range(4000)])[:, 0]
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert (freq - p).abs().max() < 0.03


def test_fan_out_prefills_once_and_samples_differ(hf_ckpts):
    model = load_model(hf_ckpts["llama"])
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    stats = {}
    res = generate(model, PROMPTS, n=4, max_new_tokens=12, temperature=1.0, seed=0, stats=stats)
    assert stats["prefill_calls"] == 1
    # forward() only runs for decode steps; the single prefill went through hidden(): no other full-prompt pass
    assert all(shape[1] == 1 for shape in calls)
    assert [c.prompt_index for c in res] == [i for i in range(3) for _ in range(4)]
    for i in range(3):
        group = [tuple(c.tokens) for c in res if c.prompt_index == i]
        assert len(set(group)) > 1


def test_prefill_is_one_forward_of_the_prompts(hf_ckpts, monkeypatch):
    model = load_model(hf_ckpts["llama"])
    seen = []
    real = model.hidden
    monkeypatch.setattr(model, "hidden", lambda ids, *a, **k: (seen.append(tuple(ids.shape)), real(ids, *a, **k))[1])
    generate(model, PROMPTS, n=5, max_new_tokens=6, temperature=1.0, seed=0)
    prefills = [s for s in seen if s[1] > 1]
    assert prefills == [(3, 13)]  # 3 distinct prompts once, not 15 rows


def test_ragged_batch_equals_alone(hf_ckpts):
    model = load_model(hf_ckpts["qwen2"])
    batch = generate(model, PROMPTS, max_new_tokens=16, temperature=0, stop_ids=[2])
    for i, p in enumerate(PROMPTS):
        alone = generate(model, [p], max_new_tokens=16, temperature=0, stop_ids=[2])[0]
        assert batch[i].tokens == alone.tokens
        assert torch.allclose(torch.tensor(batch[i].logprobs), torch.tensor(alone.logprobs), atol=1e-5)


def test_sampling_does_not_depend_on_the_batch(hf_ckpts):
    """Per-prompt seeds: a prompt's samples are the same alone or batched with others."""
    model = load_model(hf_ckpts["llama"])
    both = generate(model, PROMPTS[:2], n=3, max_new_tokens=10, temperature=1.0, seed=[11, 22])
    alone = generate(model, PROMPTS[1:2], n=3, max_new_tokens=10, temperature=1.0, seed=[22])
    assert [c.tokens for c in both[3:]] == [c.tokens for c in alone]


def test_seed_reproduces(hf_ckpts):
    model = load_model(hf_ckpts["llama"])
    kw = dict(n=3, max_new_tokens=10, temperature=1.0, top_p=0.95, seed=123)
    a, b = generate(model, PROMPTS, **kw), generate(model, PROMPTS, **kw)
    c = generate(model, PROMPTS, **{**kw, "seed": 124})
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]


def test_stop_tokens_max_tokens_and_compaction(hf_ckpts):
    """Rows stop at their first stop token (included), others run to max_new_tokens."""
    model = load_model(hf_ckpts["llama"])
    stats = {}
    res = generate(model, PROMPTS, n=8, max_new_tokens=30, temperature=1.5, seed=0, stop_ids=list(range(0, 97, 17)),
                   stats=stats)
    assert stats["decode_rows"] < len(res) * stats["decode_steps"]  # the batch did shrink
    reasons = {c.finish_reason for c in res}
    assert reasons == {"stop", "length"}
    for c in res:
        stops = [i for i, t in enumerate(c.tokens) if t % 17 == 0]
        if c.finish_reason == "stop":
            assert stops == [len(c.tokens) - 1]
        else:
            assert not stops and len(c.tokens) == 30
        assert len(c.logprobs) == len(c.tokens) == len(c.sampling_logprobs)
    # compaction (which moves rows around in the cache) must not change any row's numbers
    for c in res:
        ref = _forward_logprobs(model, PROMPTS[c.prompt_index], c.tokens, 1.5)
        assert (torch.tensor(c.logprobs) - ref).abs().max() <= 1e-4


def test_static_steps_and_late_stop_checks_change_nothing(hf_ckpts):
    """The CUDA path's decode, run on the CPU: fixed-shape steps over every cache slot (what a CUDA graph
    captures, _StaticStep) and stop checks only every 5 tokens, so stopped rows keep decoding for a while
    and compaction happens late. Every row's tokens and logprobs must be those of the default path."""
    model = load_model(hf_ckpts["llama"])
    kw = dict(n=8, max_new_tokens=30, temperature=1.5, seed=0, stop_ids=list(range(0, 97, 17)))
    ref_stats, stats = {}, {}
    ref = generate(model, PROMPTS, stats=ref_stats, **kw)
    res = generate(model, PROMPTS, cuda_graph=True, sync_every=5, stats=stats, **kw)
    assert stats["decode_rows"] < len(res) * stats["decode_steps"]  # compaction happened
    assert stats["decode_rows"] > ref_stats["decode_rows"]  # stopped rows ran on until the next check
    assert {c.finish_reason for c in res} == {"stop", "length"}
    for a, b in zip(ref, res):
        assert (a.tokens, a.finish_reason) == (b.tokens, b.finish_reason)
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
        assert torch.allclose(torch.tensor(a.sampling_logprobs), torch.tensor(b.sampling_logprobs), atol=1e-5)


def test_context_limit_ends_with_length(hf_ckpts):
    model = load_model(hf_ckpts["llama"])  # context 128
    res = generate(model, [[1] * 120], max_new_tokens=50, temperature=0)
    assert len(res[0].tokens) == 8 and res[0].finish_reason == "length"


def test_streaming_callback_sees_row_zero(hf_ckpts):
    model = load_model(hf_ckpts["llama"])
    seen = []
    res = generate(model, PROMPTS, n=2, max_new_tokens=9, temperature=1.0, seed=5, on_token=lambda r, t: seen.append(t))
    assert seen == res[0].tokens


@pytest.mark.parametrize("kw,msg", [
    (dict(n=0), "n=0"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_arguments(hf_ckpts, kw, msg):
    model = load_model(hf_ckpts["llama"])
    with pytest.raises(UserError, match=msg):
        generate(model, PROMPTS, **kw)


def test_bad_prompts(hf_ckpts):
    model = load_model(hf_ckpts["llama"])
    with pytest.raises(UserError, match="context is 128"):
        generate(model, [[1] * 200])
    with pytest.raises(UserError, match="prompt 1 is empty"):
        generate(model, [[1], []])
    with pytest.raises(UserError, match="outside"):
        generate(model, [[1, 500]])
    with pytest.raises(UserError, match="non-empty list"):
        generate(model, [])
