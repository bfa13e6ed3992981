"""LoRA: exactness at step 0, merge, adapters off, what trains, and transformers + peft as the reference."""

import copy
import os
import warnings

import pytest
import torch

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
    save_adapter(out, adapter_tensors(lora), lora.lora_config, base_dir)
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
    save_adapter(out, adapter_tensors(lora), lora.lora_config, base_dir)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1789, 28, 216, 30, 9]])
    theirs = peft_logits(base_dir, out, ids)
    with torch.no_grad():
        ours = load_model(out)(ids)
        assert (ours - base(ids)).abs().max() > 1e-3
    assert (ours - theirs).abs().max() <= 1e-4
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))
