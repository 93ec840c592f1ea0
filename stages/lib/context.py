"""The context budget: one rule wherever a prompt and a reply meet a model (SFT, the reward model, PPO rollouts,
evaluation, the served policy), so no code path ever indexes past a model's context.

    reply   keeps its START, at most `reply_tokens` (generation: the new tokens asked for; training and scoring: half
            the context). A cut reply trains on what is kept: its lost end is simply not in the sequence, so no loss
            falls on it.
    prompt  keeps its END, in the room the kept reply leaves: whole leading exchanges are dropped first (the kept part
            starts where a Human speaks), so the model sees the last turns intact and always the final
            "\\n\\nAssistant:" cue (TRL's truncation_mode="keep_end"); a last turn still too long alone is cut token
            by token from its start.

Real preference data holds dialogues many times longer than a small model's context: this is what lets them through.
Every caller counts what it cut (`Fitted.prompt_cut`, `Fitted.reply_cut`) and its stage reports the counts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stages.lib.schema import ASSISTANT, HUMAN

_TURN = re.compile(f"(?={re.escape(HUMAN)}|{re.escape(ASSISTANT)})")


def n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def split_turns(prompt: str) -> list[str]:
    """A rendered dialogue cut before each "\\n\\nHuman:" / "\\n\\nAssistant:" marker (the text joins back exactly)."""
    return [t for t in _TURN.split(prompt) if t]


def keep_end(tokenizer: Any, text: str, max_tokens: int) -> str:
    """The longest end of `text` that is at most `max_tokens` tokens, cut at a token boundary."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][-max_tokens:] if max_tokens > 0 else []
    kept = tokenizer.decode(ids)
    while ids and n_tokens(tokenizer, kept) > max_tokens:  # a cut inside a multi-byte character re-tokenises longer
        ids = ids[1:]
        kept = tokenizer.decode(ids)
    return kept


def keep_start(tokenizer: Any, text: str, max_tokens: int) -> str:
    """The longest start of `text` that is at most `max_tokens` tokens, cut at a token boundary."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens] if max_tokens > 0 else []
    kept = tokenizer.decode(ids)
    while ids and n_tokens(tokenizer, kept) > max_tokens:
        ids = ids[:-1]
        kept = tokenizer.decode(ids)
    return kept


def fit_prompt(tokenizer: Any, prompt: str, max_tokens: int) -> tuple[str, bool]:
    """`prompt` within `max_tokens`: as is, else its last whole turns, else the end of its last turn. (text, cut)."""
    if n_tokens(tokenizer, prompt) <= max_tokens:
        return prompt, False
    turns = split_turns(prompt)
    for start in range(1, len(turns) - 1):  # keep at least the last turn and the cue; start where a Human speaks
        if not turns[start].startswith(HUMAN):
            continue
        tail = "".join(turns[start:])
        if n_tokens(tokenizer, tail) <= max_tokens:
            return tail, True
    return keep_end(tokenizer, prompt, max_tokens), True


def fit_reply(tokenizer: Any, reply: str, max_tokens: int) -> tuple[str, bool]:
    """`reply` within `max_tokens`, keeping its start. (text, cut)."""
    if n_tokens(tokenizer, reply) <= max_tokens:
        return reply, False
    return keep_start(tokenizer, reply, max_tokens), True


@dataclass
class Fitted:
    """Texts fitted to a budget, and how many were cut."""

    prompts: list[str]
    replies: list[list[str]]  # per reply column (chosen and rejected, or the response), fitted like the prompt
    prompt_cut: int = 0
    reply_cut: int = 0

    def counts(self, prefix: str = "") -> dict[str, int]:
        return {f"{prefix}truncated_prompts": self.prompt_cut, f"{prefix}truncated_replies": self.reply_cut}


def fit_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    replies: Sequence[Sequence[str]],
    context: int,
    reply_tokens: int | None = None,
    extra_tokens: int = 1,
) -> Fitted:
    """Fit rows of (prompt, reply columns...) into `context` tokens each: every reply column keeps its start (at most
    `reply_tokens`, default half the context), and the prompt keeps its end in the room the longest kept reply of its
    row leaves. `extra_tokens` are reserved for what the model adds (the EOS, the space between prompt and reply)."""
    reply_tokens = reply_tokens if reply_tokens is not None else context // 2
    out = Fitted([], [[] for _ in replies])
    for i, prompt in enumerate(prompts):
        longest = 0
        for column, kept in zip(replies, out.replies, strict=True):
            text, cut = fit_reply(tokenizer, " " + column[i], reply_tokens - extra_tokens)
            kept.append(text.removeprefix(" "))
            out.reply_cut += cut
            longest = max(longest, n_tokens(tokenizer, text) + extra_tokens)
        fitted, cut = fit_prompt(tokenizer, prompt, max(1, context - longest))
        out.prompts.append(fitted)
        out.prompt_cut += cut
    return out


def fit_prompts(tokenizer: Any, prompts: Sequence[str], max_tokens: int) -> tuple[list[str], int]:
    """Prompts for generation within `max_tokens` (the context minus the new tokens). (fitted, how many were cut)."""
    fitted = [fit_prompt(tokenizer, p, max_tokens) for p in prompts]
    return [f for f, _ in fitted], sum(cut for _, cut in fitted)
