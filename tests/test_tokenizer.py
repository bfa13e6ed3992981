"""Tokenizers: round trips, and chat templates rendered exactly as transformers renders them."""

import json

import pytest

from nanorl import UserError
from nanorl.tokenizer import load_tokenizer

MIXED = "Hello, world! 12 + 30 = 42.\n\tTabs, ünïcödé, 中文, emoji 🙂 and   spaces; x**2 <= y/3 #### 7"

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "And 7 * 6?"},
]

# the Llama 3 chat template, as shipped in Meta-Llama-3-8B-Instruct's tokenizer_config.json
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_smollm2_round_trip(smollm2):
    _, tok = smollm2
    assert tok.decode(tok.encode(MIXED)) == MIXED


def test_smollm2_matches_transformers_tokenizer(smollm2, smollm2_hf):
    _, tok = smollm2
    _, ref = smollm2_hf
    text = "Hello, world! The answer is 42.\nNew line."
    assert tok.encode(text) == ref(text)["input_ids"]


def test_smollm2_splits_digits_like_its_tokenizer_json(smollm2):
    _, tok = smollm2
    # SmolLM2's pre-tokenizer puts every digit in its own token
    assert [tok.decode([i]) for i in tok.encode("1234")] == ["1", "2", "3", "4"]


def test_tiny_round_trip_and_eos():
    tok = load_tokenizer("tiny")
    text = "Q: 12+30=?\nA: 42"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_ids == [2]
    assert len(tok.encode(text)) == len(text)


@pytest.mark.parametrize("gen", [True, False])
def test_chatml_template_matches_transformers(smollm2, smollm2_hf, gen):
    _, tok = smollm2
    _, ref = smollm2_hf
    for conv in (CONVERSATION, CONVERSATION[1:2]):  # with and without a system message
        ours = tok.apply_chat_template(conv, add_generation_prompt=gen)
        theirs = ref.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
        assert ours == theirs
    assert tok.apply_chat_template(CONVERSATION, tokenize=True) == \
        ref.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_llama3_template_matches_transformers(tmp_path):
    """An HF directory with a Llama-3-style template, rendered by both libraries."""
    from transformers import AutoTokenizer

    tiny = load_tokenizer("tiny")
    tiny.chat_template = LLAMA3_TEMPLATE
    tiny.save(str(tmp_path))
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == LLAMA3_TEMPLATE
    ours = load_tokenizer(str(tmp_path))
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    for gen in (True, False):
        assert ours.apply_chat_template(CONVERSATION, add_generation_prompt=gen) == \
            ref.apply_chat_template(CONVERSATION, add_generation_prompt=gen, tokenize=False)
    assert ours.apply_chat_template(CONVERSATION).startswith("<|bos|><|start_header_id|>system")


def test_missing_tokenizer(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))


def test_no_chat_template():
    tok = load_tokenizer("tiny")
    tok.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        tok.apply_chat_template(CONVERSATION)
