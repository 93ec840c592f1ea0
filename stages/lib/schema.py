"""The one internal data schema every input format maps to.

A dataset is a list of rows (or a pandas DataFrame) with string columns:

    preferences: prompt, chosen, rejected   (a labelled pair: `chosen` was preferred)
    sft:         prompt, response           (a demonstration)
    prompts:     prompt                     (a prompt for PPO rollouts or evaluation)

`prompt` is always a rendered dialogue in the Anthropic HH convention, ending with the assistant cue:

    "\\n\\nHuman: What is 2 plus 3?\\n\\nAssistant:"

and `chosen` / `rejected` / `response` hold only the assistant's reply, stripped. A plain question (no dialogue
markup) is rendered into that form, so `{"prompt": "What is 2 plus 3?"}` and the HH transcript of the same turn mean
the same. The model sees `prompt + " " + response`.
"""

from __future__ import annotations

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
SYSTEM = "\n\nSystem:"

KINDS: dict[str, tuple[str, ...]] = {
    "preferences": ("prompt", "chosen", "rejected"),
    "sft": ("prompt", "response"),
    "prompts": ("prompt",),
}


def columns(kind: str) -> tuple[str, ...]:
    """The required columns of a dataset kind."""
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {', '.join(KINDS)}") from None


def render_turn(role: str, text: str) -> str:
    """One dialogue turn in the HH convention: role 'user'/'human', 'assistant', or 'system'."""
    tag = {"user": "Human", "human": "Human", "assistant": "Assistant", "system": "System"}.get(role.lower())
    if tag is None:
        raise ValueError(f"unknown message role {role!r}")
    return f"\n\n{tag}: {text.strip()}"


def render_prompt(text: str) -> str:
    """A prompt in canonical form: dialogue markup kept, a plain question wrapped as one Human turn."""
    if HUMAN in text or text.lstrip().startswith("Human:"):
        body = text if text.startswith("\n\n") else "\n\n" + text.lstrip()
        body = body.rstrip()
        return body if body.endswith(ASSISTANT) else body + ASSISTANT
    return f"{HUMAN} {text.strip()}{ASSISTANT}"


def last_user_turn(prompt: str) -> str:
    """The text of the last Human turn of a rendered prompt (the whole text when there is no markup)."""
    if HUMAN not in prompt:
        return prompt.strip()
    turn = prompt.rsplit(HUMAN, 1)[1]
    return turn.split(ASSISTANT, 1)[0].strip()


def pairs_digest(rows: list[dict[str, str]]) -> str:
    """An identity of a set of preference pairs that survives rendering: the same pairs, raw or validated, give the
    same digest (so a statistic computed on the raw file, like the labeler's ceiling, is applied only to them)."""
    import hashlib
    import json

    canonical = sorted((last_user_turn(r["prompt"]), r["chosen"].strip(), r["rejected"].strip()) for r in rows)
    return hashlib.sha256(json.dumps(canonical, ensure_ascii=False).encode()).hexdigest()[:16]
