"""heldout.sequence_logprobs (evaluation's KL and perplexity) in bounded batches, with the lm_head only over the reply
positions: the same log-probs as one full forward over every row."""

from __future__ import annotations

import torch

from stages.lib import heldout
from stages.lib import rl_math as pm
from stages.lib.modeling import TinyModelConfig, build_tiny_model, train_tokenizer


def test_batched_logprobs_equal_one_full_forward(monkeypatch):
    torch.manual_seed(0)
    texts = [f"Human: what is {i} plus {i * 3}? Assistant: it is {i * 4}, I think" for i in range(40)]
    tokenizer = train_tokenizer(texts, 300)
    model = build_tiny_model(
        "gpt2", TinyModelConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=300, max_positions=128, dropout=0.0),
        tokenizer,
    ).eval()  # fmt: skip
    prompts = [f"\n\nHuman: what is {i} plus {'1' * (i % 7)}?\n\nAssistant:" for i in range(11)]  # ragged prompts
    replies = [f"it is {i}" + " and more" * (i % 3) for i in range(11)]
    monkeypatch.setattr(heldout, "LOGPROB_BATCH", 4)  # 3 batches, the last one short
    logprobs, mask = heldout.sequence_logprobs(model, tokenizer, prompts, replies, 0.7)

    monkeypatch.setattr(heldout, "LOGPROB_BATCH", 10**6)  # one batch ...
    whole, whole_mask = heldout.sequence_logprobs(model, tokenizer, prompts, replies, 0.7)
    assert torch.equal(mask, whole_mask) and mask.sum() > 0
    assert torch.allclose(logprobs * mask, whole * mask, atol=1e-5)
    # ... and by hand: every logit over the full padded batch (what the function did before)
    sep = heldout.reply_prefix(tokenizer)
    rows = [tokenizer(p + sep + r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for p, r in zip(prompts, replies, strict=True)]  # fmt: skip
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), tokenizer.pad_token_id)
    attn = torch.zeros(len(rows), L, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], attn[i, : len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        full = pm.logprobs_from_logits(model(input_ids=ids, attention_mask=attn).logits[:, :-1], ids[:, 1:], 0.7)
    assert torch.allclose(logprobs * mask, full * mask, atol=1e-5)
