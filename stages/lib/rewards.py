"""The reward model: one place that loads it and one way it scores.

A reward model is an HF `AutoModelForSequenceClassification` with one label (a scalar head on a causal LM's backbone),
trained on `prompt + " " + reply + EOS` (TRL's RewardTrainer appends the EOS). Its score of a sequence is the head's
output at the sequence's last real token. PPO scores its rollouts as token ids (`score_tokens`); everything else scores
text (`score_texts`), which tokenises and then calls the same `score_tokens`.

`norm.json` (written by the reward stage) holds the mean and standard deviation of the scores of SFT replies to PPO
prompts: PPO and evaluation report scores normalised by them, so 0 is "as good as SFT" and 1 is one SFT std better.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.lib.context import fit_pairs, reply_prefix
from stages.lib.modeling import model_context, position_ids, to_device


class RewardModel:
    """A scalar reward model, its (right-padding) tokenizer and, once the reward stage measured them, its norm."""

    def __init__(self, model: nn.Module, tokenizer: Any, norm: dict[str, float] | None = None) -> None:
        self.model, self.tokenizer, self.norm = model, tokenizer, norm
        self.max_length = model_context(model, tokenizer)
        self.last_truncated = 0

    @classmethod
    def load(cls, model_dir: str | Path, norm_file: str | Path | None = None) -> RewardModel:
        """The reward stage's outputs: `model_dir` (HF weights and tokenizer) and its `norm.json`, frozen."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="right")
        norm = json.loads(Path(norm_file).read_text()) if norm_file is not None else None
        return cls(to_device(model.requires_grad_(False).eval()), tokenizer, norm)

    @torch.no_grad()
    def score_tokens(self, seq: torch.Tensor, attn: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Raw scores: the head at each sequence's last real token. seq, attn (B, L); last (B,) indices -> (B,).

        Positions skip left padding (as generation used them); right padding needs nothing (causal attention)."""
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=seq, attention_mask=attn, position_ids=position_ids(attn)).last_hidden_state
        return self.model.score(hidden[torch.arange(len(seq)), last]).squeeze(-1)

    @torch.no_grad()
    def score_texts(
        self, prompts: Sequence[str], replies: Sequence[str], max_length: int | None = None, batch_size: int = 64
    ) -> list[float]:
        """Raw scores of `prompt + " " + reply + EOS`: exactly the text the reward model was trained on, fitted into
        `max_length` tokens (default and at most: the model's context) by the context budget (the reply keeps its
        start, the prompt its last turns; stages/lib/context.py). `self.last_truncated` counts the prompts cut."""
        self.model.eval()
        limit = min(max_length or self.max_length, self.max_length)
        fitted = fit_pairs(self.tokenizer, prompts, [replies], limit)
        self.last_truncated = fitted.prompt_cut
        sep, eos = reply_prefix(self.tokenizer), self.tokenizer.eos_token
        texts = [f"{p}{sep}{r}{eos}" for p, r in zip(fitted.prompts, fitted.replies[0], strict=True)]
        out: list[float] = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                texts[i : i + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=limit,
                add_special_tokens=False,
            )
            enc = enc.to(self.model.device)
            attn = enc["attention_mask"]
            out += self.score_tokens(enc["input_ids"], attn, attn.sum(1) - 1).tolist()
        return out

    def normalise(self, scores: torch.Tensor | list[float]) -> Any:
        """(score - mean) / std of the SFT replies' scores (norm.json); a tensor stays a tensor."""
        if self.norm is None:
            raise ValueError("this reward model has no norm.json: the reward stage writes it")
        if isinstance(scores, torch.Tensor):
            return (scores - self.norm["mean"]) / self.norm["std"]
        return [(s - self.norm["mean"]) / self.norm["std"] for s in scores]
