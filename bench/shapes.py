"""Real models' shapes with random weights, for benchmarks where no checkpoint can travel (the GPU machine
has no network, and the 64 MiB it receives cannot hold even SmolLM2-135M's 93 MB GGUF).

    model = random_model("qwen2.5-0.5b", device="cuda")     # a Transformer of that shape, N(0, 0.02) init
    path = resolve("random:smollm2-135m", work_dir)           # an HF directory of it, for train.py / transformers

The shapes are the checkpoints' config.json values. A random model's HF directory carries the tiny built-in
character tokenizer (ids below 100, valid in any of these vocabularies): the numbers a benchmark measures
depend on shapes and lengths, not on what the tokens say.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESETS = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         head_dim=64, intermediate_size=1536, rope_theta=1e5, tie_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, n_layers=24, n_heads=14, n_kv_heads=2,
                         head_dim=64, intermediate_size=4864, rope_theta=1e6, tie_embeddings=True, attn_bias=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, n_layers=28, n_heads=12, n_kv_heads=2,
                         head_dim=128, intermediate_size=8960, rope_theta=1e6, tie_embeddings=True, attn_bias=True),
    "small": dict(model_type="qwen2", vocab_size=8192, hidden_size=256, n_layers=4, n_heads=4, n_kv_heads=2,
                  head_dim=64, intermediate_size=768, tie_embeddings=True, attn_bias=True),
}
PRESETS["qwen2-0.5b"] = PRESETS["qwen2.5-0.5b"]  # the name bench/mfu.py has always used


def random_model(name, device="cpu", dtype=None, max_seq_len=4096, seed=0):
    import torch

    from nanorl.model import ModelConfig, Transformer
    from nanorl.tokenizer import CharTokenizer

    cfg = ModelConfig(**PRESETS[name], max_seq_len=max_seq_len, eos_token_id=CharTokenizer.EOS,
                      bos_token_id=CharTokenizer.BOS)
    model = Transformer(cfg).init_weights(seed).to(device)
    return (model.to(dtype) if dtype is not None else model).eval()


def resolve(model, work):
    """'random:NAME' -> an HF directory (weights + the built-in tokenizer) written under `work`; else `model`."""
    if not model.startswith("random:"):
        return model
    from nanorl.tokenizer import load_tokenizer

    path = os.path.join(work, model.replace(":", "-"))
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        random_model(model.split(":", 1)[1]).save_pretrained(path, tokenizer=load_tokenizer("tiny"))
    return path
