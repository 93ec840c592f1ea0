"""Read a user's data file into the internal schema (stages.lib.schema), row by row, without ever crashing on bad data.

Supported files: `.jsonl`, `.jsonl.gz`, `.json` (a list of objects), `.parquet`, `.csv`, or a Hugging Face dataset
name (`owner/name` or `name`, optionally `:split`) when the string is not an existing path.

Supported formats (`fmt`, detected from the columns when "auto"):
    pairs     prompt/chosen/rejected strings, or TRL's conversational preference format (message lists), or its
              implicit-prompt variant (only chosen/rejected message lists; their common prefix is the prompt)
    hh        Anthropic HH-RLHF: only chosen/rejected, each a whole transcript; split at the last "\\n\\nAssistant:"
    messages  a `messages` list of {"role", "content"} (TRL conversational language modelling)
    sft       prompt/response, or TRL's prompt/completion
    prompts   prompt (a string or a message list)

Two kinds of problems:
    DataError  the file as a whole is unusable (missing, empty, corrupt, undetectable format, missing columns).
    RowError   one row is unusable; it is left out of `Loaded.rows` and validation reports (and may quarantine) it.

`source_row` / `RowError.row` is the 0-based position of the row in the source: for line-oriented files (.jsonl,
.jsonl.gz) the 0-based line index (blank lines count, so messages say "line {row + 1}"); otherwise the 0-based
record index (messages say "row {row}").
"""

from __future__ import annotations

import gzip
import io
import json
import math
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from stages.lib import schema
from stages.lib.outcome import BadInput

FORMATS_BY_KIND: dict[str, tuple[str, ...]] = {
    "preferences": ("pairs", "hh"),
    "sft": ("sft", "messages"),
    "prompts": ("prompts", "messages"),
}
EXPECTED_COLUMNS: dict[str, str] = {
    "preferences": "prompt/chosen/rejected (pairs), chosen/rejected transcripts or message lists (hh, pairs)",
    "sft": "prompt/response or prompt/completion (sft), messages",
    "prompts": "prompt (prompts), messages",
}
EXCERPT_CHARS = 80
# owner/name or name, optionally :split (split may carry a slice such as train[:1000])
HF_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.\[\]:%+-]+)?$")
Record = dict[str, Any]


class DataError(BadInput):
    """The file as a whole cannot be used; the message is one sentence naming the file and the problem."""


@dataclass(frozen=True)
class RowError:
    """One unusable row. `check` names the validation check it fails (the same names validation reports)."""

    row: int
    reason: str
    excerpt: str
    check: str = "readable_row"


@dataclass
class Loaded:
    """A file read into the schema: clean rows plus the rows that could not be read."""

    rows: pd.DataFrame  # columns: schema.columns(kind) + "source_row"
    row_errors: list[RowError]
    source_format: str
    path: str


class _RowProblem(Exception):
    def __init__(self, check: str, reason: str) -> None:
        super().__init__(reason)
        self.check = check
        self.reason = reason


def is_line_oriented(path: str | Path) -> bool:
    """Whether rows of this source are lines (so a row is best described as 'line N')."""
    name = str(path).lower()
    return name.endswith(".jsonl") or name.endswith(".jsonl.gz")


def row_label(path: str | Path, row: int) -> str:
    """How to point a user at a row: 'line 7' (1-based) for line-oriented files, else 'row 6' (0-based)."""
    return f"line {row + 1}" if is_line_oriented(path) else f"row {row}"


def excerpt(value: Any) -> str:
    """The first EXCERPT_CHARS characters of a raw row, for messages."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text[:EXCERPT_CHARS] + ("..." if len(text) > EXCERPT_CHARS else "")


# ---------------------------------------------------------------------------------------------------------------
# Reading records: (source_row, record) pairs plus row errors for lines that are not JSON objects
# ---------------------------------------------------------------------------------------------------------------


def _jsonl_records(lines: Iterator[bytes], errors: list[RowError]) -> Iterator[tuple[int, Record]]:
    for i, raw in enumerate(lines):
        if i == 0 and raw.startswith(b"\xef\xbb\xbf"):  # a BOM some editors write
            raw = raw[3:]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            reason = f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})"
            errors.append(RowError(i, reason, excerpt(raw.decode("utf-8", "replace").strip()), "valid_utf8"))
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(RowError(i, f"not valid JSON ({e.msg} at column {e.colno})", excerpt(line.strip()), "valid_json"))
            continue
        if not isinstance(record, dict):
            what = "a JSON array" if isinstance(record, list) else f"a JSON {type(record).__name__}"
            errors.append(RowError(i, f"is {what}, not an object", excerpt(line.strip()), "valid_json"))
            continue
        yield i, record


def _read_jsonl(path: Path, errors: list[RowError]) -> list[tuple[int, Record]]:
    if path.name.lower().endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                return list(_jsonl_records(iter(f), errors))
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise DataError(f"{path} is a truncated or corrupt gzip file ({e}).") from None
    with open(path, "rb") as f:
        return list(_jsonl_records(iter(f), errors))


def _read_json(path: Path) -> list[tuple[int, Record]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (byte offset {e.start}).") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from None
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a JSON list of objects, not a {type(data).__name__}.")
    return list(enumerate(data))  # non-objects become row errors in _convert


def _read_csv(path: Path) -> list[tuple[int, Record]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path} is not valid UTF-8 at line {line} (byte 0x{raw[e.start]:02x}).") from None
    try:
        # Everything stays a string: no NA guessing, so an empty cell is "" (validation reports it as empty).
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, index_col=False)
    except pd.errors.EmptyDataError:
        return []
    except (pd.errors.ParserError, ValueError) as e:
        raise DataError(f"could not parse CSV file {path}: {e}.") from None
    return list(enumerate(frame.to_dict("records")))


def _read_parquet(path: Path) -> list[tuple[int, Record]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # to_pylist keeps Python types (lists of dicts for messages, ints stay ints), unlike a pandas round trip.
        return list(enumerate(pq.read_table(path).to_pylist()))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable parquet file ({e}).") from None


def _read_hub(name: str) -> list[tuple[int, Record]]:
    dataset, _, split = name.partition(":")
    try:
        import datasets

        return list(enumerate(datasets.load_dataset(dataset, split=split or "train").to_list()))
    except Exception as e:  # any hub, network or script failure is the user's dataset name problem
        raise DataError(
            f"{name} is not an existing file, and loading it as a Hugging Face dataset failed: {e}"
        ) from None


def _read_records(path: str | Path, errors: list[RowError]) -> list[tuple[int, Record]]:
    p = Path(path)
    name = p.name.lower()
    if not p.exists():
        known = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")
        if not name.endswith(known) and HF_NAME.match(str(path)):
            return _read_hub(str(path))
        raise DataError(f"{path} does not exist.")
    if p.is_dir():
        raise DataError(f"{path} is a directory, not a data file.")
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            return _read_jsonl(p, errors)
        if name.endswith(".json"):
            return _read_json(p)
        if name.endswith(".parquet"):
            return _read_parquet(p)
        if name.endswith(".csv"):
            return _read_csv(p)
    except OSError as e:  # permissions, I/O errors: still the user's file, still one sentence
        raise DataError(f"could not read {path}: {e.strerror or e}.") from None
    raise DataError(
        f"{path} has an unsupported file type; expected .jsonl, .jsonl.gz, .json, .parquet or .csv "
        "(or a Hugging Face dataset name)."
    )


# ---------------------------------------------------------------------------------------------------------------
# Converting one record to the schema
# ---------------------------------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"a number ({value!r})"[:60]
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _field(record: Record, key: str) -> Any:
    if key not in record:
        raise _RowProblem(f"has_field({key})", f"missing field '{key}'")
    if _is_null(record[key]):
        raise _RowProblem(f"not_null({key})", f"'{key}' is null")
    return record[key]


def _text(record: Record, key: str) -> str:
    value = _field(record, key)
    if not isinstance(value, str):  # never cast: a number where text belongs is a broken export, not a prompt
        raise _RowProblem(f"is_string({key})", f"'{key}' is {_type_name(value)}, expected a string")
    return value


def _messages(value: Any, key: str) -> list[tuple[str, str]]:
    """A list of {"role", "content"} messages as (role, content) pairs, or a RowProblem saying what is wrong."""
    check = f"valid_messages({key})"
    if not isinstance(value, list | tuple):
        raise _RowProblem(check, f"'{key}' is {_type_name(value)}, expected a list of messages")
    if not value:
        raise _RowProblem(check, f"'{key}' is an empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _RowProblem(check, f"'{key}' message {i} is {_type_name(m)}, expected an object")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise _RowProblem(check, f"'{key}' message {i} has no string 'role'")
        if role.lower() not in ("user", "human", "assistant", "system"):
            raise _RowProblem(check, f"'{key}' message {i} has unknown role {role!r}")
        if not isinstance(content, str):
            raise _RowProblem(check, f"'{key}' message {i} has no string 'content'")
        out.append((role.lower(), content))
    return out


def _render(messages: list[tuple[str, str]]) -> str:
    return schema.render_prompt("".join(schema.render_turn(role, content) for role, content in messages))


def _prompt(record: Record, key: str = "prompt") -> str:
    value = _field(record, key)
    if isinstance(value, list | tuple):
        return _render(_messages(value, key))
    return schema.render_prompt(_text(record, key))


def _reply(record: Record, key: str) -> str:
    """A response given as a string, or as TRL's message list ending with the assistant's message."""
    value = _field(record, key)
    if isinstance(value, list | tuple):
        messages = _messages(value, key)
        if messages[-1][0] != "assistant":
            raise _RowProblem(f"valid_messages({key})", f"'{key}' does not end with an assistant message")
        return messages[-1][1].strip()
    return _text(record, key).strip()


def _split_hh(transcript: str, key: str) -> tuple[str, str]:
    cut = transcript.rfind(schema.ASSISTANT)
    if cut < 0:
        raise _RowProblem("hh_transcript", f"'{key}' has no '\\n\\nAssistant:' turn")
    cut += len(schema.ASSISTANT)
    return schema.render_prompt(transcript[:cut]), transcript[cut:].strip()


def _pairs(record: Record) -> dict[str, str]:
    if "prompt" in record:
        return {"prompt": _prompt(record), "chosen": _reply(record, "chosen"), "rejected": _reply(record, "rejected")}
    # TRL's implicit-prompt format: the shared leading messages are the prompt, the rest is each side's reply
    chosen = _messages(_field(record, "chosen"), "chosen")
    rejected = _messages(_field(record, "rejected"), "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    tails = (chosen[shared:], rejected[shared:])
    if shared == 0 or any(len(t) != 1 or t[0][0] != "assistant" for t in tails):
        raise _RowProblem("shared_prompt", "chosen and rejected conversations do not share a prompt prefix")
    return {"prompt": _render(chosen[:shared]), "chosen": tails[0][0][1].strip(), "rejected": tails[1][0][1].strip()}


def _hh(record: Record) -> dict[str, str]:
    prompt, chosen = _split_hh(_text(record, "chosen"), "chosen")
    rejected_prompt, rejected = _split_hh(_text(record, "rejected"), "rejected")
    if prompt != rejected_prompt:
        raise _RowProblem("hh_transcript", "HH transcripts do not share a prompt prefix")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _conversation(record: Record, kind: str) -> dict[str, str]:
    messages = _messages(_field(record, "messages"), "messages")
    roles = [role for role, _ in messages]
    if "assistant" not in roles:
        if kind == "prompts":
            return {"prompt": _render(messages)}
        raise _RowProblem("valid_messages(messages)", "'messages' has no assistant turn")
    # The last assistant message is the demonstration (sft) or is dropped (prompts): what came before is the prompt.
    last = len(roles) - 1 - roles[::-1].index("assistant")
    if last == 0:
        raise _RowProblem("valid_messages(messages)", "'messages' has no turn before the assistant reply")
    prompt = _render(messages[:last])
    return {"prompt": prompt} if kind == "prompts" else {"prompt": prompt, "response": messages[last][1].strip()}


def _sft(record: Record) -> dict[str, str]:
    key = "response" if "response" in record or "completion" not in record else "completion"
    return {"prompt": _prompt(record), "response": _reply(record, key)}


def _convert(record: Any, fmt: str, kind: str) -> dict[str, str]:
    if not isinstance(record, dict):
        raise _RowProblem("valid_json", f"is {_type_name(record)}, not an object")
    if fmt == "pairs":
        return _pairs(record)
    if fmt == "hh":
        return _hh(record)
    if fmt == "messages":
        return _conversation(record, kind)
    if fmt == "sft":
        return _sft(record)
    return {"prompt": _prompt(record)}


# ---------------------------------------------------------------------------------------------------------------
# Format detection and the public entry point
# ---------------------------------------------------------------------------------------------------------------

REQUIRED: dict[str, tuple[tuple[str, ...], ...]] = {  # any one of these column sets will do
    "pairs": (("prompt", "chosen", "rejected"), ("chosen", "rejected")),
    "hh": (("chosen", "rejected"),),
    "messages": (("messages",),),
    "sft": (("prompt", "response"), ("prompt", "completion")),
    "prompts": (("prompt",),),
}


def _detect(kind: str, keys: set[str]) -> str | None:
    if "messages" in keys and kind != "preferences":
        return "messages"
    if kind == "preferences":
        if {"chosen", "rejected"} <= keys and "prompt" not in keys:
            return "hh"  # refined to implicit-prompt "pairs" by the values, see load_dataset
        return "pairs" if keys & {"prompt", "chosen", "rejected"} else None
    if kind == "sft":
        return "sft" if keys & {"prompt", "response", "completion"} else None
    return "prompts" if "prompt" in keys else None


def load_dataset(path: str | Path, kind: str, fmt: str = "auto") -> Loaded:
    """Read `path` as a dataset of `kind` in format `fmt` ("auto" detects it from the columns)."""
    schema.columns(kind)  # unknown kind -> ValueError
    if fmt != "auto" and fmt not in FORMATS_BY_KIND[kind]:
        raise DataError(
            f"cannot read {path} as format {fmt!r}: it does not fit kind {kind!r} "
            f"(expected auto or one of {', '.join(FORMATS_BY_KIND[kind])})."
        )
    errors: list[RowError] = []
    records = _read_records(path, errors)
    if not records and not errors:
        raise DataError(f"{path} is empty (no rows).")

    keys = set().union(*(r.keys() for _, r in records if isinstance(r, dict)))
    if records and fmt == "auto":
        detected = _detect(kind, keys)
        if detected is None:
            found = ", ".join(sorted(keys)) or "none"
            raise DataError(
                f"could not detect the format of {path}: columns {found}; expected one of: {EXPECTED_COLUMNS[kind]}."
            )
        sample = [r.get("chosen") for _, r in records[:100] if isinstance(r, dict)]
        if detected == "hh" and sum(isinstance(v, list) for v in sample) > sum(isinstance(v, str) for v in sample):
            detected = "pairs"  # mostly message lists: TRL's implicit-prompt conversational format
        fmt = detected
    if records and not any(set(cols) <= keys for cols in REQUIRED[fmt]):
        need = " or ".join("/".join(cols) for cols in REQUIRED[fmt])
        missing = sorted(set(REQUIRED[fmt][0]) - keys)
        raise DataError(
            f"{path} is missing required column(s) {', '.join(missing)} for format {fmt} "
            f"(needs {need}; found: {', '.join(sorted(keys)) or 'none'})."
        )

    rows = []
    for source_row, record in records:
        try:
            rows.append({**_convert(record, fmt, kind), "source_row": source_row})
        except _RowProblem as p:
            errors.append(RowError(source_row, p.reason, excerpt(record), p.check))
    errors.sort(key=lambda e: e.row)
    frame = pd.DataFrame(rows, columns=[*schema.columns(kind), "source_row"]).astype({"source_row": "int64"})
    return Loaded(rows=frame, row_errors=errors, source_format=fmt if fmt != "auto" else "unknown", path=str(path))
