"""`lora.layers`: adapters on the top N transformer blocks only, so backward stops below them (the real profile's
reward model: 4 of SmolLM2's 30 blocks, a training step as cheap as a forward pass)."""

from __future__ import annotations

import re

import pytest
import torch

from stages.lib.modeling import LoraSettings, TinyModelConfig, build_tiny_model, peft_config, train_tokenizer
from stages.lib.params import ParamsError, config_from


def three_block_model():
    tokenizer = train_tokenizer(["Human: hi Assistant: hello there"] * 4, 300)
    shape = TinyModelConfig(n_layer=3, n_embd=32, n_head=2, vocab_size=300, max_positions=64, dropout=0.0)
    return build_tiny_model("gpt2", shape, tokenizer)


def adapted_blocks(layers: int | None) -> set[int]:
    from peft import get_peft_model

    lora = LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["c_attn"], layers=layers)
    model = get_peft_model(three_block_model(), peft_config(lora, "CAUSAL_LM", three_block_model()))
    return {int(re.search(r"\.h\.(\d+)\.", n).group(1)) for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("layers", "blocks"), [(None, {0, 1, 2}), (1, {2}), (2, {1, 2}), (3, {0, 1, 2}), (9, {0, 1, 2})]
)
def test_adapters_sit_on_the_top_blocks_only(layers, blocks):
    assert adapted_blocks(layers) == blocks


def test_backward_stops_below_the_adapted_blocks():
    from peft import get_peft_model

    lora = LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["c_attn"], layers=1)
    model = three_block_model()
    model = get_peft_model(model, peft_config(lora, "CAUSAL_LM", model))
    seen: list[int] = []
    for i, block in enumerate(model.base_model.model.transformer.h):
        block.register_full_backward_hook(lambda _m, _gi, _go, i=i: seen.append(i))
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert seen == [2]  # blocks 0 and 1 hold nothing to train: autograd never enters them


def test_layers_must_be_positive():
    section = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn"], "layers": 0}
    with pytest.raises(ParamsError, match="layers"):
        config_from(LoraSettings, section)
