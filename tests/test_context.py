"""The context budget (stages/lib/context.py) and the derived splits (stages/lib/splits.py), on a real tokenizer."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from stages.lib.context import (
    fit_pairs,
    fit_prompt,
    fit_prompts,
    fit_reply,
    messages,
    model_prompt,
    n_tokens,
    reply_prefix,
    split_turns,
)
from stages.lib.modeling import TinyModelConfig, build_tiny_model, generate, train_tokenizer
from stages.lib.outcome import BadInput
from stages.lib.params import defaults
from stages.lib.schema import ASSISTANT, HUMAN
from stages.lib.splits import JUDGE, REQUIRED, SplitConfig, derive
from stages.lib.task import TaskConfig, make_dialogues


@pytest.fixture(scope="module")
def tokenizer():
    texts = [row["chosen"] for row in make_dialogues(200, defaults(TaskConfig, seed=3))]
    return train_tokenizer(texts, 400)


def _dialogue(turns: int) -> str:
    return (
        "".join(f"{HUMAN} What is {i} plus {i}?{ASSISTANT} {i} plus {i} is {2 * i}." for i in range(turns))
        + f"{HUMAN} What is the capital of Peru?{ASSISTANT}"
    )


def test_turns_split_and_join_back():
    prompt = _dialogue(3)
    turns = split_turns(prompt)
    assert "".join(turns) == prompt and len(turns) == 8 and turns[-1] == ASSISTANT


def test_a_long_prompt_keeps_its_last_whole_turns_and_the_cue(tokenizer):
    prompt = _dialogue(30)
    budget = 60
    assert n_tokens(tokenizer, prompt) > 4 * budget  # several times the budget
    fitted, cut = fit_prompt(tokenizer, prompt, budget)
    assert cut and n_tokens(tokenizer, fitted) <= budget
    assert prompt.endswith(fitted) and fitted.startswith(HUMAN) and fitted.endswith(ASSISTANT)
    assert "capital of Peru" in fitted  # the last question is always there
    # the longest tail of whole exchanges that fits: one more leading exchange would not
    turns = split_turns(prompt)
    start = len(turns) - len(split_turns(fitted))
    assert n_tokens(tokenizer, "".join(turns[start - 2 :])) > budget


def test_a_single_overlong_turn_is_cut_from_its_start(tokenizer):
    prompt = f"{HUMAN} {'please ' * 400}tell me the capital of Peru?{ASSISTANT}"
    fitted, cut = fit_prompt(tokenizer, prompt, 32)
    assert cut and n_tokens(tokenizer, fitted) <= 32 and fitted.endswith("Peru?" + ASSISTANT)
    assert fit_prompt(tokenizer, _dialogue(1), 500) == (_dialogue(1), False)  # what fits is untouched


def test_replies_keep_their_start_and_pairs_fit_the_context(tokenizer):
    reply = "The capital of Peru is Lima. " * 40
    kept, cut = fit_reply(tokenizer, reply, 20)
    assert cut and reply.startswith(kept) and n_tokens(tokenizer, kept) <= 20
    fitted = fit_pairs(tokenizer, [_dialogue(30), _dialogue(1)], [[reply, "Lima."], ["No.", "Paris."]], context=96)
    assert fitted.prompt_cut == 1 and fitted.reply_cut == 1  # the short row is untouched
    for p, c, r in zip(fitted.prompts, *fitted.replies, strict=True):
        for text in (f"{p} {c}", f"{p} {r}"):
            assert n_tokens(tokenizer, text) + 1 <= 96  # + the EOS the model appends
    assert fitted.counts("train_") == {"train_truncated_prompts": 1, "train_truncated_replies": 1}


def test_generation_never_indexes_past_the_context(tokenizer):
    """A prompt several times the model's context: before the budget, GPT-2's position embedding raised IndexError."""
    torch.manual_seed(0)
    model = build_tiny_model(
        "gpt2", defaults(TinyModelConfig, n_layer=1, n_embd=32, n_head=2, max_positions=64), tokenizer
    )
    prompts = [_dialogue(40), "\n\nHuman: Hi!\n\nAssistant:"]
    assert n_tokens(tokenizer, prompts[0]) > 5 * 64
    out = generate(model, tokenizer, prompts, max_new_tokens=16)
    assert len(out.replies) == 2 and out.truncated == 1
    assert fit_prompts(tokenizer, prompts, 48)[1] == 1


def test_a_model_is_given_the_context_it_was_fine_tuned_at_not_every_position_it_has(tokenizer, tmp_path):
    """A pretrained model knows more positions than the stage trained at (SmolLM2: 8192 against 256): the window the
    stage records on the saved tokenizer bounds generation, held-out log-probs, the reward model's scores and PPO's
    rollout prompts, so none of them runs on whole long dialogues the models never learned."""
    from transformers import AutoModelForSequenceClassification

    from stages.lib.heldout import sequence_logprobs
    from stages.lib.modeling import keep_context, load_causal_lm, model_context
    from stages.lib.rewards import RewardModel
    from stages.ppo import rollout_prompts

    torch.manual_seed(0)
    tok = copy.deepcopy(tokenizer)
    shape = defaults(TinyModelConfig, n_layer=1, n_embd=32, n_head=2, max_positions=128)
    model = build_tiny_model("gpt2", shape, tok)
    assert model_context(model, tok) == 128  # nothing recorded: the positions
    keep_context(tok, 48)
    model.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    model, tok = load_causal_lm(tmp_path / "policy")
    assert model_context(model, tok) == 48  # saved with the tokenizer, read back with it
    prompt = _dialogue(20)
    assert n_tokens(tok, prompt) > 128
    out = generate(model, tok, [prompt], max_new_tokens=16)
    assert out.truncated == 1
    logprobs, mask = sequence_logprobs(model, tok, [prompt], ["four"], 1.0)
    assert logprobs.shape[1] <= 48 - 1 and mask.sum() >= 1
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "policy", num_labels=1)
    rm.save_pretrained(tmp_path / "rm")
    keep_context(tok, 40)
    tok.save_pretrained(tmp_path / "rm")
    assert RewardModel.load(tmp_path / "rm").max_length == 40
    (tmp_path / "prompts.jsonl").write_text(f'{{"prompt": {json.dumps(prompt)}}}\n')
    config = SimpleNamespace(response_length=16)
    fitted, cut = rollout_prompts(config, model, tok, tmp_path / "prompts.jsonl", rm_window=40)
    assert cut == 1 and n_tokens(tok, fitted[0]) <= 40 - 16
    with pytest.raises(BadInput, match="context of 16 tokens"):
        rollout_prompts(config, model, tok, tmp_path / "prompts.jsonl", rm_window=16)


def _pairs(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"prompt": f"{HUMAN} question {i}?{ASSISTANT}", "chosen": f"good {i}", "rejected": f"bad {i}"}
            for i in range(n)
        ]
    )


CHATML = (  # SmolLM2-Instruct's template (ChatML with a default system turn)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture
def chat_tokenizer(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHATML
    return chat


def test_a_chat_model_reads_the_dialogue_as_messages_through_its_template(tokenizer, chat_tokenizer):
    prompt = f"{HUMAN} Hi{ASSISTANT} Hello! How can I help?{HUMAN} What is 2 plus 3?{ASSISTANT}"
    assert messages(prompt) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2 plus 3?"},
    ]
    assert model_prompt(chat_tokenizer, prompt) == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert (reply_prefix(chat_tokenizer), reply_prefix(tokenizer)) == ("", " ")  # the cue ends the line; HH: a space
    assert model_prompt(tokenizer, prompt) == prompt  # no template: the HH text itself, as before


def test_a_chat_prompt_fits_the_budget_counted_with_its_template(chat_tokenizer):
    prompt = _dialogue(30)
    budget = 150  # this tokenizer never saw the template's markers: they cost it ~60 tokens
    fitted, cut = fit_prompt(chat_tokenizer, prompt, budget)
    assert cut and n_tokens(chat_tokenizer, fitted) <= budget  # template tokens counted
    assert fitted.startswith("<|im_start|>system") and fitted.endswith("<|im_start|>assistant\n")
    assert "What is the capital of Peru?<|im_end|>" in fitted  # the last turn is whole
    # one overlong last turn: its end is kept, inside the template
    fitted, cut = fit_prompt(chat_tokenizer, f"{HUMAN} {'very ' * 300}long question?{ASSISTANT}", budget)
    assert cut and n_tokens(chat_tokenizer, fitted) <= budget and "long question?<|im_end|>" in fitted
    rows = fit_pairs(chat_tokenizer, [prompt], [["Peru's capital is Lima."]], 180)
    assert rows.replies == [["Peru's capital is Lima."]]
    assert n_tokens(chat_tokenizer, rows.prompts[0] + rows.replies[0][0]) + 1 <= 180


def test_one_preference_set_feeds_every_dataset_split_by_prompt():
    frames, notes = derive({"preferences": _pairs(400)}, defaults(SplitConfig, heldout_fraction=0.2, seed=0), 0.5, 1)
    assert set(REQUIRED) | {JUDGE} == set(frames) and set(notes) == set(frames) - {"preferences"}
    train, dev, judge = (set(frames[n]["prompt"]) for n in ("preferences", "preferences_test", JUDGE))
    test = set(frames["eval_prompts"]["prompt"])
    assert not train & dev and not judge & dev and not train & judge  # nothing leaks, the judge's pairs are apart
    assert not (train | judge) & test
    # the held-out prompts split once more: dev (the gate's pairs, the monitor's sft_test) and test (the evaluation)
    assert dev and test and not dev & test and 0.1 < (len(dev) + len(test)) / 400 < 0.3
    assert 0.3 < len(dev) / (len(dev) + len(test)) < 0.7 and 0.3 < len(judge) / (400 - len(dev) - len(test)) < 0.7
    assert set(frames["prompts"]["prompt"]) == train
    assert set(frames["sft_test"]["prompt"]) == dev and set(frames["sft"]["prompt"]) == train | judge
    again, _ = derive({"preferences": _pairs(500)}, defaults(SplitConfig, heldout_fraction=0.2, seed=0), 0.5, 1)
    assert dev <= set(again["preferences_test"]["prompt"])  # more rows never move an existing prompt
    assert test <= set(again["eval_prompts"]["prompt"])


def test_given_datasets_are_kept_and_their_prompts_stay_in_training():
    given_sft = pd.DataFrame([{"prompt": p, "response": "x"} for p in _pairs(400)["prompt"][:200]])
    frames, notes = derive({"preferences": _pairs(400), "sft": given_sft}, defaults(SplitConfig, heldout_fraction=0.5))
    assert frames["sft"] is given_sft and "sft" not in notes
    assert not set(given_sft["prompt"]) & set(frames["preferences_test"]["prompt"])  # a given training prompt stays
    with pytest.raises(BadInput, match="no preferences to derive them from"):
        derive({"sft": given_sft}, defaults(SplitConfig))
