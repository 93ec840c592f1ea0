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


def norm_of(scores: torch.Tensor) -> dict[str, float]:
    """norm.json's statistics of raw scores of SFT replies (B,): their mean, standard deviation (at least 1e-6), n."""
    return {"mean": scores.mean().item(), "std": scores.std().clamp_min(1e-6).item(), "n": scores.numel()}


class RewardModel:
    """A scalar reward model, its (right-padding) tokenizer and, once the reward stage measured them, its norm."""

    def __init__(self, model: nn.Module, tokenizer: Any, norm: dict[str, float] | None = None) -> None:
        self.model, self.tokenizer, self.norm = model, tokenizer, norm
        self.max_length = model_context(model, tokenizer)
        self.last_truncated = 0

    @property
    def models(self) -> list[nn.Module]:
        """The networks that score (one here; an ensemble's members)."""
        return [self.model]

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

    def score_and_spread(
        self, seq: torch.Tensor, attn: torch.Tensor, last: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(raw scores, the members' spread (B,)): a lone reward model has no spread (None)."""
        return self.score_tokens(seq, attn, last), None

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


class RewardEnsemble(RewardModel):
    """Several reward models trained on the same labels (the reward stage's `reward.ensemble`: the gated model plus
    members with their own seeds and bootstrap resamples of the pairs, saved under `model/ensemble/<i>/`). Its raw
    score is the members' mean normalised score minus `penalty` times their standard deviation (uncertainty-weighted
    optimisation, Coste et al. 2023):

        c(x, y) = mean_i z_i(x, y) - penalty * std_i z_i(x, y),     z_i = (s_i - mean_i) / std_i   (norm.json each)

    normalised, like a lone model's, by c's mean and standard deviation over the SFT replies the members were
    normalised on (`ensemble/norm_z.json` holds their z): a mean of k members varies less than one, and PPO's KL
    coefficient is set against scores whose SFT spread is 1. A reply the members disagree on is one none of them has
    seen the like of: the penalty keeps PPO from climbing one member's errors."""

    def __init__(self, members: list[RewardModel], penalty: float, norm_z: torch.Tensor) -> None:
        super().__init__(members[0].model, members[0].tokenizer, norm_of(self.combine(norm_z, penalty)[0]))
        self.members, self.penalty = members, penalty

    @staticmethod
    def combine(z: torch.Tensor, penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Members' normalised scores z (k, B) -> (mean - penalty * spread, spread), each (B,)."""
        spread = z.std(0)
        return z.mean(0) - penalty * spread, spread

    @property
    def models(self) -> list[nn.Module]:
        return [m.model for m in self.members]

    @classmethod
    def load_all(cls, model_dir: str | Path, norm_file: str | Path, penalty: float) -> RewardModel:
        """The reward stage's model and, when it trained an ensemble, its members; a lone model stays a RewardModel."""
        from transformers import AutoModelForSequenceClassification

        first = RewardModel.load(model_dir, norm_file)
        folders = sorted((Path(model_dir) / "ensemble").glob("[0-9]*/"), key=lambda d: int(d.name))
        if not folders:
            return first
        members = [first]
        for folder in folders:
            model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True)
            norm = json.loads((folder / "norm.json").read_text())
            members.append(RewardModel(to_device(model.requires_grad_(False).eval()), first.tokenizer, norm))
        norm_z = torch.tensor(json.loads((Path(model_dir) / "ensemble" / "norm_z.json").read_text()))
        return cls(members, penalty, norm_z)

    @torch.no_grad()
    def score_and_spread(self, seq: torch.Tensor, attn: torch.Tensor, last: torch.Tensor) -> tuple:
        return self.combine(
            torch.stack([m.normalise(m.score_tokens(seq, attn, last)) for m in self.members]), self.penalty
        )

    def score_tokens(self, seq: torch.Tensor, attn: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        return self.score_and_spread(seq, attn, last)[0]
