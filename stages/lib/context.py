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

A model whose tokenizer has a chat template (a pretrained chat model) reads the fitted prompt as messages through its
template (`model_prompt`), and its reply follows the template's assistant cue directly (`reply_prefix` ""); a model
without one (the tiny models) reads the HH text itself, and `prompt + " " + reply` (`reply_prefix` " "). The budget is
counted on the text the model reads, template included.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stages.lib.schema import ASSISTANT, HUMAN, SYSTEM

_TURN = re.compile(f"(?={re.escape(HUMAN)}|{re.escape(ASSISTANT)}|{re.escape(SYSTEM)})")
_ROLES = {HUMAN: "user", ASSISTANT: "assistant", SYSTEM: "system"}


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def reply_prefix(tokenizer: Any) -> str:
    """What joins a prompt (as the model reads it) and its reply: nothing after a chat template's assistant cue,
    a space after the HH text's "Assistant:"."""
    return "" if has_chat_template(tokenizer) else " "


def messages(prompt: str) -> list[dict[str, str]]:
    """An HH-rendered prompt as chat messages, the final (empty) assistant cue left for the template to add."""
    out = []
    for turn in split_turns(prompt):
        marker = next((m for m in _ROLES if turn.startswith(m)), None)
        if marker is None:  # text before the first marker (a cut turn's end): the user's words
            out.append({"role": "user", "content": turn.strip()})
            continue
        out.append({"role": _ROLES[marker], "content": turn[len(marker) :].strip()})
    if out and out[-1]["role"] == "assistant" and not out[-1]["content"]:
        out.pop()
    return out


def model_prompt(tokenizer: Any, prompt: str) -> str:
    """The text the model reads for an HH prompt: through its chat template when it has one, else the HH text."""
    if not has_chat_template(tokenizer):
        return prompt
    return tokenizer.apply_chat_template(messages(prompt), tokenize=False, add_generation_prompt=True)


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """The text's tokens, however long: the budget counts them to cut, so HF's "longer than the specified maximum
    sequence length" warning (the model's trained context, `model_max_length`) would only mislead."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def n_tokens(tokenizer: Any, text: str) -> int:
    return len(token_ids(tokenizer, text))


def split_turns(prompt: str) -> list[str]:
    """A rendered dialogue cut before each "\\n\\nHuman:" / "\\n\\nAssistant:" marker (the text joins back exactly)."""
    return [t for t in _TURN.split(prompt) if t]


def keep_end(tokenizer: Any, text: str, max_tokens: int) -> str:
    """The longest end of `text` that is at most `max_tokens` tokens, cut at a token boundary."""
    ids = token_ids(tokenizer, text)[-max_tokens:] if max_tokens > 0 else []
    kept = tokenizer.decode(ids)
    while ids and n_tokens(tokenizer, kept) > max_tokens:  # a cut inside a multi-byte character re-tokenises longer
        ids = ids[1:]
        kept = tokenizer.decode(ids)
    return kept


def keep_start(tokenizer: Any, text: str, max_tokens: int) -> str:
    """The longest start of `text` that is at most `max_tokens` tokens, cut at a token boundary."""
    ids = token_ids(tokenizer, text)[:max_tokens] if max_tokens > 0 else []
    kept = tokenizer.decode(ids)
    while ids and n_tokens(tokenizer, kept) > max_tokens:
        ids = ids[:-1]
        kept = tokenizer.decode(ids)
    return kept


def fit_prompt(tokenizer: Any, prompt: str, max_tokens: int) -> tuple[str, bool]:
    """`prompt` as the model reads it (`model_prompt`) within `max_tokens`: as is, else its last whole turns, else
    the end of its last turn. (text, cut)."""

    def size(text: str) -> int:
        return n_tokens(tokenizer, model_prompt(tokenizer, text))

    if size(prompt) <= max_tokens:
        return model_prompt(tokenizer, prompt), False
    turns = split_turns(prompt)
    for start in range(1, len(turns) - 1):  # keep at least the last turn and the cue; start where a Human speaks
        if not turns[start].startswith(HUMAN):
            continue
        tail = "".join(turns[start:])
        if size(tail) <= max_tokens:
            return model_prompt(tokenizer, tail), True
    if not has_chat_template(tokenizer):
        return keep_end(tokenizer, prompt, max_tokens), True
    # a chat model: the end of the last Human turn's words, in the room its template leaves
    said = messages(prompt)
    words = said[-1]["content"] if said else ""
    room = max_tokens - size(f"{HUMAN} {ASSISTANT}")
    while room > 0:
        text = f"{HUMAN} {keep_end(tokenizer, words, room)}{ASSISTANT}"
        if size(text) <= max_tokens:
            return model_prompt(tokenizer, text), True
        room -= max(1, size(text) - max_tokens)
    return model_prompt(tokenizer, f"{HUMAN} {ASSISTANT}"), True


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
    `reply_tokens`, default half the context), and the prompt (as the model reads it: `model_prompt`) keeps its end in
    the room the longest kept reply of its row leaves. `extra_tokens` are reserved for what the model adds (the EOS,
    the space between prompt and reply)."""
    reply_tokens = reply_tokens if reply_tokens is not None else context // 2
    prefix = reply_prefix(tokenizer)
    out = Fitted([], [[] for _ in replies])
    for i, prompt in enumerate(prompts):
        longest = 0
        for column, kept in zip(replies, out.replies, strict=True):
            text, cut = fit_reply(tokenizer, prefix + column[i], reply_tokens - extra_tokens)
            kept.append(text.removeprefix(prefix))
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
