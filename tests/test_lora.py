"""LoRA: exactness at step 0, merge, adapters off, what trains, and transformers + peft as the reference."""

import copy
import os
import warnings

import pytest
import torch
import train  # conftest put the repository root on sys.path
from test_train import _torchrun, metrics, pairs_file, run

from nanorl import UserError
from nanorl.lora import TARGETS, add_lora, adapter_tensors, disabled, lora_modules, merge, save_adapter
from nanorl.model import load_model

IDS = torch.tensor([[5, 20, 31, 40, 17, 3, 9, 60], [1, 2, 3, 4, 50, 51, 52, 53]])


def randomize_B(model, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)
    return model


def test_step0_equals_base_and_off_equals_base():
    base = load_model("tiny")
    lora = add_lora(copy.deepcopy(base), 4, alpha=16)
    assert {n.rsplit(".", 1)[1] for n, _ in lora_modules(lora)} == set(TARGETS)
    with torch.no_grad():
        ref = base(IDS)
        assert torch.equal(lora(IDS), ref)  # B = 0: exactly the base
        randomize_B(lora)
        assert (lora(IDS) - ref).abs().max() > 1e-3  # the adapters do something
        with disabled(lora):
            assert torch.equal(lora(IDS), ref)
        assert (lora(IDS) - ref).abs().max() > 1e-3  # and come back on


def test_merged_equals_unmerged():
    lora = randomize_B(add_lora(load_model("tiny"), 8, alpha=32))
    with torch.no_grad():
        unmerged = lora(IDS)
        merged = merge(copy.deepcopy(lora))
        assert not lora_modules(merged)
        assert (merged(IDS) - unmerged).abs().max() <= 1e-5


def test_dropout_only_in_training_and_only_on_the_adapter_path():
    lora = randomize_B(add_lora(load_model("tiny"), 4, dropout=0.5))
    with torch.no_grad():
        merged = merge(copy.deepcopy(lora))(IDS)
        assert (lora.eval()(IDS) - merged).abs().max() <= 1e-5
        lora.train()
        assert (lora(IDS) - merged).abs().max() > 1e-4
        with disabled(lora):  # the base path never sees dropout
            assert torch.equal(lora(IDS), load_model("tiny")(IDS))


def test_init_and_shapes_follow_peft():
    lora = add_lora(load_model("tiny"), 4, alpha=8, targets="q_proj,down_proj")
    mods = dict(lora_modules(lora))
    assert len(mods) == 2 * lora.cfg.n_layers
    q = mods["layers.0.self_attn.q_proj"]
    assert q.lora_A.shape == (4, q.in_features) and q.lora_B.shape == (q.out_features, 4)
    assert torch.count_nonzero(q.lora_B) == 0 and q.scaling == 2.0
    bound = 1 / q.in_features ** 0.5  # kaiming_uniform(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
    assert q.lora_A.abs().max() <= bound and q.lora_A.std() > bound / 3


def test_only_adapters_train():
    lora = add_lora(load_model("tiny"), 4, targets="all-linear")
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    lora(IDS).logsumexp(-1).mean().backward()
    for n, p in lora.named_parameters():
        assert (p.grad is not None) == n.endswith(("lora_A", "lora_B")), n
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    opt.step()
    for n, p in lora.named_parameters():  # the base stays, B moves (A's gradient is 0 while B is 0)
        assert torch.equal(p, before[n]) == (not n.endswith("lora_B")), n
    state_params = {id(p) for p in opt.state}
    assert state_params == {id(p) for n, p in lora.named_parameters() if n.endswith(("lora_A", "lora_B"))}


def test_bad_targets_are_one_clear_error():
    with pytest.raises(UserError, match="lm_head"):
        add_lora(load_model("tiny"), 4, targets="q_proj,lm_head")


def test_bf16_base_keeps_fp32_adapters():
    lora = add_lora(load_model("tiny", dtype="bfloat16"), 4)
    m = lora_modules(lora)[0][1]
    assert m.weight.dtype == torch.bfloat16 and m.lora_A.dtype == torch.float32
    assert lora(IDS).dtype == torch.float32  # forward runs (adapters cast to the input's dtype)


# ----------------------------------------------------------------------------- transformers + peft


def peft_logits(base_dir, adapter_dir, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(hf, adapter_dir).eval()
    # peft only warns about missing or misnamed keys (the adapter then silently does nothing); library
    # deprecation notices (transformers 5 renames peft still calls) are not about the adapter
    about_adapter = [str(w.message) for w in seen if not issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not about_adapter, about_adapter
    with torch.no_grad():
        return pm(ids).logits


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3"])
def test_peft_loads_adapter(hf_ckpts, tmp_path, variant):
    base_dir = hf_ckpts[variant]
    lora = randomize_B(add_lora(load_model(base_dir), 4, alpha=16))
    out = str(tmp_path / "adapter")
    save_adapter(out, adapter_tensors(lora.state_dict()), lora.lora_config, base_dir)
    ids = IDS % lora.cfg.vocab_size
    theirs = peft_logits(base_dir, out, ids)
    merged = load_model(out)  # the adapter directory loads as its merged model
    assert not lora_modules(merged)
    with torch.no_grad():
        assert (merged(ids) - theirs).abs().max() <= 1e-5
        assert (lora(ids) - theirs).abs().max() <= 1e-5


def test_peft_loads_smollm2_adapter(smollm2, tmp_path):
    """The GGUF base written once in HF format, the adapter on top: peft agrees with our merged model."""
    base, _ = smollm2
    base_dir = str(tmp_path / "base")
    base.save_pretrained(base_dir)
    lora = randomize_B(add_lora(copy.deepcopy(base), 8, alpha=32, targets="q_proj,v_proj,down_proj"), std=0.01)
    out = str(tmp_path / "adapter")
    save_adapter(out, adapter_tensors(lora.state_dict()), lora.lora_config, base_dir)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1789, 28, 216, 30, 9]])
    theirs = peft_logits(base_dir, out, ids)
    with torch.no_grad():
        ours = load_model(out)(ids)
        assert (ours - base(ids)).abs().max() > 1e-3
    # 30 layers in fp32, merged (W + s B A) vs peft's unmerged path, logits up to ~30: relative error ~1e-5
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max().clamp(min=10)
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))


# ----------------------------------------------------------------------------- the sampler's merged copy


def test_sampler_trainer_parity_after_steps(hf_ckpts):
    """A few optimizer steps on the adapters, the sampler's plain copy refreshed with the merged weights: the
    sampler's logprobs equal the trainer's (W x + s B A x) ones, and the adapters did move them."""
    from nanorl.policy import Policy, collate
    from nanorl.sampler import generate

    model = load_model(hf_ckpts["qwen3"])
    sampler = copy.deepcopy(model)  # made before the adapters, as train.py does
    add_lora(model, 4, alpha=16, seed=3)
    policy = Policy(model, impl="torch")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    prompts, pad = [[3, 4, 5], [7, 8, 9, 10, 11]], 0
    for step in range(3):  # push up the log-likelihood of fixed completions
        inp = collate(prompts, [[20, 21, 22, 23], [30, 31]], pad, "cpu")
        logp = policy(inp)[0]
        (-(logp * inp["mask"]).sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        train._copy_weights(sampler, model)  # the trainer's refresh of the sampler's copy: merged from the base
    res = generate(sampler, prompts, n=3, max_new_tokens=12, temperature=1.0, seed=0)
    inp = collate([prompts[c.prompt_index] for c in res], [c.tokens for c in res], pad, "cpu")
    with torch.no_grad():
        trainer = policy(inp)[0]
        with disabled(model):
            base = policy(inp)[0]
    m = inp["mask"] > 0
    sampled = torch.zeros_like(trainer)
    for i, c in enumerate(res):
        sampled[i, :len(c.logprobs)] = torch.tensor(c.logprobs)
    assert (sampled - trainer)[m].abs().max() <= 1e-4
    assert (base - trainer)[m].abs().max() > 1e-2


def test_gradient_checkpointing_gives_the_same_adapter_grads():
    grads = []
    for ckpt in (False, True):
        model = add_lora(load_model("tiny"), 4, seed=1)
        randomize_B(model)
        model.gradient_checkpointing = ckpt
        model(IDS).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-7), n


# ----------------------------------------------------------------------------- train.py with --lora-rank

LORA = ["--lora-rank", "4", "--lr", "1e-2"]


def adapter(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "adapter_model.safetensors"))


def test_lora_lr_default_is_10x(hf_ckpts):
    assert train.parse_args(["--lora-rank", "8"]).lr == pytest.approx(1e-3)  # tiny's full-FT default is 1e-4
    assert train.parse_args(["--lora-rank", "8", "--lr", "3e-4"]).lr == 3e-4
    real = ["--model", hf_ckpts["llama"], "--device", "cpu"]  # a few thousand parameters: the smallest class
    assert train.parse_args(real + ["--lora-rank", "8"]).lr == pytest.approx(10 * train.parse_args(real).lr)


def test_lora_run_saves_a_peft_adapter(tmp_path):
    """GRPO with a KL term: the reference is the policy with its adapters off (KL exactly 0 before the first
    update, > 0 after); the run dir holds a PEFT adapter over OUT/base that peft loads, and --merge-lora's model."""
    out = run(tmp_path, "--steps", "2", "--kl-coef", "0.1", *LORA, "--merge-lora")
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    rows = metrics(out)
    assert rows[0]["kl"] == 0 and rows[1]["kl"] > 0
    tensors = adapter(out)
    assert len(tensors) == 2 * 7 * 4 and any(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k)
    base_dir = os.path.join(out, "base")
    tiny = load_model("tiny").state_dict()
    for k, v in load_model(base_dir).state_dict().items():  # the base is untouched
        assert torch.equal(v, tiny[k]), k
    ids = IDS % 90
    theirs = peft_logits(base_dir, out, ids)
    with torch.no_grad():
        ours = load_model(out)(ids)
        assert (ours - load_model(base_dir)(ids)).abs().max() > 1e-4
        assert (ours - theirs).abs().max() <= 1e-5
        assert (load_model(os.path.join(out, "merged"))(ids) - ours).abs().max() <= 1e-6
    import sample  # sample.py --merge-lora writes the same merged model; sample.py --model RUN_DIR generates

    sample.main(["--model", out, "--merge-lora", str(tmp_path / "merged2"), "--device", "cpu"])
    with torch.no_grad():
        assert (load_model(str(tmp_path / "merged2"))(ids) - ours).abs().max() <= 1e-6
    sample.main(["--model", out, "--prompt", "12+30=", "--max-new-tokens", "4", "--device", "cpu"])


def test_lora_resume_equals_straight_run(tmp_path):
    straight = run(tmp_path, "--steps", "4", "--save-every", "2", *LORA, name="straight")
    run(tmp_path, "--steps", "2", "--save-every", "2", *LORA, name="split")
    split = run(tmp_path, "--steps", "4", "--save-every", "2", "--resume", *LORA, name="split")
    a, b = adapter(straight), adapter(split)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["reward_mean"] for r in metrics(straight)] == [r["reward_mean"] for r in metrics(split)]
    ckpt = os.path.join(split, "ckpt", sorted(os.listdir(os.path.join(split, "ckpt")))[-1], "model.safetensors")
    from safetensors.torch import load_file
    assert all("lora_" in k for k in load_file(ckpt))  # the checkpoint holds what trains, not the base


def test_lora_init_continues_an_adapter(tmp_path):
    first = run(tmp_path, "--steps", "2", *LORA, name="first")
    # lr 0: nothing moves, so the continued run's adapter is exactly the one it started from
    second = run(tmp_path, "--steps", "1", "--lora-rank", "4", "--lr", "0", "--lora-init", first, name="second")
    a, b = adapter(first), adapter(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("algo", ["dpo", "sft"])
def test_lora_offline_algos(tmp_path, algo):
    extra = ["--data", pairs_file(tmp_path)] if algo == "dpo" else []
    out = run(tmp_path, "--algo", algo, "--steps", "2", *LORA, *extra)
    assert any(t.abs().max() > 0 for k, t in adapter(out).items() if "lora_B" in k)
    with torch.no_grad():
        assert (load_model(out)(IDS) - load_model("tiny")(IDS)).abs().max() > 1e-5


@pytest.mark.parametrize("extra", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_lora_two_ranks_equal_one(tmp_path, extra):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _torchrun(1, one, LORA)
    _torchrun(2, two, LORA + extra)
    a, b = adapter(one), adapter(two)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, worst
    assert max(t.abs().max() for k, t in a.items() if "lora_B" in k) > 1e-4


@pytest.mark.parametrize("args,words", [
    (["--lora-rank", "4", "--lora-targets", "q_proj,lm_head"], ["lm_head"]),
    (["--lora-rank", "4", "--lora-init", "/nonexistent/adapter"], ["/nonexistent/adapter"]),
    (["--lora-init", "/tmp"], ["--lora-rank"]),
])
def test_lora_bad_input(tmp_path, args, words):
    from test_train import cli

    res = cli("--out", str(tmp_path / "o"), "--steps", "1", "--warm-start-steps", "0", *args)
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and all(w in last for w in words), last


def test_bench_lora_smoke():
    """bench/lora.py's synthetic path (the GPU measurement's code) on a small random model on CPU."""
    import subprocess
    import sys

    from conftest import ROOT

    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "lora.py"), "--shape", "small", "--seqs", "2",
                          "--seq-len", "32", "--rank", "4"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:5] for line in res.stdout.splitlines() if line.startswith("| ")}
    full, lora = (int(x.replace(",", "")) for x in rows["trainable parameters"][:2])
    # small shape, all-linear r=4: per layer 4 x (64+64 + 64+32 + 64+32 + 64+64 + 3 x (64+128)) = 4 x 1024 = 4096
    assert lora == 2 * 4096 and full > 10 * lora
    opt_full, opt_lora = (float(x.split()[0]) for x in rows["optimizer state (MiB)"][:2])
    assert opt_lora == pytest.approx(2 * 4 * lora / 2**20, abs=0.01)  # AdamW: two fp32 moments per parameter
