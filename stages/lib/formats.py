"""Read a user's data file into the internal schema (stages.lib.schema), row by row, without ever crashing on bad data.

Supported files: `.jsonl`, `.jsonl.gz`, `.json` (a list of objects), `.parquet`, `.csv`, or a Hugging Face dataset
id (`owner/name`, optionally `:split`) when the string is not an existing path and does not look like one.

Supported formats (`fmt`, detected from the columns of the first DETECT_ROWS readable rows when "auto"):
    pairs     prompt/chosen/rejected strings, or TRL's conversational preference format (message lists), or its
              implicit-prompt variant (only chosen/rejected message lists; their common prefix is the prompt)
    hh        Anthropic HH-RLHF: only chosen/rejected, each a whole transcript; split at the last "\\n\\nAssistant:"
    messages  a `messages` list of {"role", "content"} (TRL conversational language modelling). For sft the last
              message must be the assistant's reply: a message after it (a trailing system or user message) would
              be dropped, so the row is quarantined instead. For prompts the whole conversation is the prompt, less
              a final assistant reply (a trailing system message is kept).
    sft       prompt/response, or TRL's prompt/completion
    prompts   prompt (a string or a message list)

Reading is streaming and bounded (Limits): rows are read and checked one at a time, only regular files are opened
(symlinks resolved first; a FIFO, a device or a directory is refused before anything blocks), and reading stops with
a DataError naming the file past `max_rows` rows or `max_file_bytes` bytes (counted after decompression for .gz, and
from the footer for parquet). A line of a .jsonl longer than `max_row_bytes` is skipped a chunk at a time, never held,
and quarantined; in a CSV it stops the reading (a quoted field may span lines, so the next row cannot be found safely).
A .json file is one document: it is parsed whole (so keep big data in .jsonl).

Two kinds of problems:
    DataError  the file as a whole is unusable (missing, not a regular file, too big, empty, corrupt, undetectable
               format, missing columns). One sentence naming the file.
    RowError   one row is unusable; it is left out of `Loaded.rows` and validation reports (and may quarantine) it:
               not UTF-8, not JSON, nested too deeply, an integer past Python's digit limit, a repeated key (JSON
               would silently keep the last value), a lone UTF-16 surrogate, a control character other than tab and
               newline in its text (raw or escaped, in every format alike), a turn marker ("\\n\\nHuman:") inside a
               message or reply (it would forge a dialogue turn), a conversation without a user turn, too long.

`source_row` / `RowError.row` is the 0-based position of the row in the source: for line-oriented files (.jsonl,
.jsonl.gz) the 0-based line index (blank lines count, so messages say "line {row + 1}"); otherwise the 0-based
record index (messages say "row {row}").
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import math
import os
import re
import stat
import sys
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pandas as pd

from stages.lib import schema
from stages.lib.escaping import printable
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
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")
# A name that does not exist but ends like a file was meant as a file: "no such file" at once, never a Hub request.
LOCAL_SUFFIXES = (
    *SUFFIXES,
    ".gz",
    ".ndjson",
    ".pq",
    ".tsv",
    ".txt",
    ".arrow",
    ".feather",
    ".zip",
    ".bz2",
    ".xz",
    ".zst",
    ".tar",
    ".yaml",
    ".yml",
    ".xlsx",
)
# A Hub dataset id is owner/name, optionally :split (the split may carry a slice such as train[:1000]).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.\[\]:%+-]+)?$")
# The `datasets` library's packaged builders: given one of these names, load_dataset builds from files in the current
# directory (it walked a project for minutes). They are never sent to it.
BUILDER_NAMES = frozenset(
    {
        "json",
        "csv",
        "parquet",
        "text",
        "arrow",
        "pandas",
        "sql",
        "generator",
        "spark",
        "xml",
        "imagefolder",
        "audiofolder",
        "videofolder",
        "pdffolder",
        "niftifolder",
        "webdataset",
        "hdf5",
        "cache",
        "eval",
        "folder_based_builder",
        "lance",
    }
)
HUB_TIMEOUT = 10.0  # seconds for the Hub to say whether a dataset exists (its client retried for ~25 s)
DETECT_ROWS = 100  # readable rows whose columns decide the format
EXCERPT_CHARS = 80
TURN_MARKERS = (schema.HUMAN, schema.ASSISTANT, "\n\nSystem:")  # inside a message they would start a new turn
BOM = b"\xef\xbb\xbf"
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # tab, newline and carriage return are text
_SURROGATE = re.compile("[\ud800-\udfff]")
Record = dict[str, Any]


@dataclass(frozen=True)
class Limits:
    """How much of a file is read (params.yaml: validate.max_rows, max_file_bytes, max_row_bytes)."""

    max_rows: int = 10_000_000  # rows, readable or not; more stop the reading
    max_file_bytes: int = 1 << 30  # bytes of the file, and of its content once decompressed (.gz, parquet)
    max_row_bytes: int = 1 << 20  # bytes of one row: a line of .jsonl/.csv, or the text of a record


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
    """The first EXCERPT_CHARS characters of a raw row, for messages, with control characters and escape sequences
    shown escaped (a row is printed to terminals and logs)."""
    if isinstance(value, bytes):
        value = value[: EXCERPT_CHARS * 4].decode("utf-8", "replace")
    try:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, RecursionError):  # an integer past the digit limit, a structure too deep to print
        text = f"<a {type(value).__name__} that cannot be shown>"
    shown = printable(text[: EXCERPT_CHARS + 1])
    return shown[:EXCERPT_CHARS] + "..." if len(text) > EXCERPT_CHARS or len(shown) > EXCERPT_CHARS else shown


# ---------------------------------------------------------------------------------------------------------------
# Opening: regular files only, within the size limit
# ---------------------------------------------------------------------------------------------------------------

_FILE_TYPES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _regular_file(path: str | Path, limits: Limits) -> Path:
    """`path` resolved (symlinks followed), if it is a regular file within max_file_bytes; else a DataError at once.
    Nothing is opened: opening a FIFO blocks until a writer comes, and /dev/zero never ends."""
    shown = printable(str(path))
    try:
        real = Path(path).resolve(strict=True)
        st = real.stat()
    except FileNotFoundError:
        link = " (a symbolic link to a missing file)" if Path(path).is_symlink() else ""
        raise DataError(f"{shown} does not exist{link}.") from None
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError in 3.11), permissions
        raise DataError(f"could not read {shown}: {getattr(e, 'strerror', None) or e}.") from None
    if not stat.S_ISREG(st.st_mode):
        what = next((name for test, name in _FILE_TYPES if test(st.st_mode)), "not a regular file")
        via = f" (it links to {printable(str(real))})" if real != Path(path).absolute() else ""
        if what == "a directory":
            raise DataError(f"{shown} is a directory, not a data file{via}.")
        raise DataError(f"{shown} is {what}{via}, not a regular file: only regular files are read.")
    if st.st_size > limits.max_file_bytes:
        raise DataError(
            f"{shown} is {st.st_size} bytes, more than validate.max_file_bytes ({limits.max_file_bytes}); "
            "raise it to read this file."
        )
    return real


def open_regular(path: str | Path, limits: Limits = Limits()) -> BinaryIO:  # noqa: B008 (frozen)
    """Open `path` for binary reading if it is a regular file within the limits (see _regular_file). The file is
    opened non-blocking and checked again, so one swapped for a FIFO after the check cannot block either."""
    real = _regular_file(path, limits)
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DataError(f"{printable(str(path))} changed while it was opened and is no longer a regular file.")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# ---------------------------------------------------------------------------------------------------------------
# Reading records: (source_row, record) pairs, one at a time, plus row errors for rows that cannot be records
# ---------------------------------------------------------------------------------------------------------------


class _Reader:
    """One source being read: its limits, the rows and bytes read so far, and the row errors found."""

    def __init__(self, path: str | Path, limits: Limits) -> None:
        self.name = printable(str(path))
        self.limits = limits
        self.errors: list[RowError] = []
        self.n_rows = 0
        self.n_bytes = 0  # read from the source (after decompression)
        self.n_text = 0  # of text in the records made (parquet and the Hub can expand far beyond their bytes)
        self.unpacked = str(path).lower().endswith(".gz")

    def count_row(self) -> None:
        self.n_rows += 1
        self.check_rows(self.n_rows)

    def check_rows(self, n_rows: int) -> None:
        if n_rows > self.limits.max_rows:
            raise DataError(
                f"{self.name} has more than validate.max_rows ({self.limits.max_rows}) rows; reading "
                "stopped (raise it, or split the file)."
            )

    def read(self, read: Callable[[int], bytes], size: int) -> bytes:
        """`read(size)`, counting bytes against max_file_bytes (after decompression) and naming a corrupt gzip."""
        try:
            chunk = read(size)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise DataError(f"{self.name} is a truncated or corrupt gzip file ({e}).") from None
        self.n_bytes += len(chunk)
        if self.n_bytes > self.limits.max_file_bytes:
            unpacked = " once decompressed" if self.unpacked else ""
            raise DataError(
                f"{self.name} holds more than validate.max_file_bytes ({self.limits.max_file_bytes}) "
                f"bytes{unpacked}; reading stopped (raise it to read this file)."
            )
        return chunk

    def error(self, row: int, reason: str, raw: Any, check: str) -> None:
        self.errors.append(RowError(row, reason, excerpt(raw), check))

    def count_text(self, size: int) -> None:
        """Count bytes of text made from the source against max_file_bytes: a dictionary-encoded parquet column or a
        Hub dataset can hold far more text than its bytes on disk."""
        self.n_text += size
        if self.n_text > self.limits.max_file_bytes:
            raise DataError(
                f"{self.name} holds more than validate.max_file_bytes ({self.limits.max_file_bytes}) "
                "bytes of text once read; reading stopped (raise it to read this file)."
            )

    def checked(self, row: int, record: Any, raw: Any, max_bytes: int | None = None, counted: bool = False) -> bool:
        """Whether a parsed record may go on; if not, its row error is recorded. With `max_bytes` (records not read
        from lines), its text is measured against it and counted (count_text) unless already `counted`."""
        problem, size = _record_problem(record, max_bytes)
        if problem is not None:
            self.error(row, problem.reason, raw, problem.check)
        if not counted:
            self.count_text(size)
        return problem is None


def _lines(f: BinaryIO, reader: _Reader, skip_long: bool = True) -> Iterator[tuple[int, bytes]]:
    """The lines of `f` (0-based index, bytes), none read in more than max_row_bytes + 1 bytes: a longer line is
    skipped a chunk at a time (never held) and recorded as a row error, or, with skip_long False, a DataError."""
    limit = reader.limits.max_row_bytes
    for i in itertools.count():
        line = reader.read(f.readline, limit + 1)
        if not line:
            return
        if len(line) <= limit or line.endswith(b"\n"):
            yield i, line
            continue
        head = line[: EXCERPT_CHARS * 4]
        while line and not line.endswith(b"\n"):
            line = reader.read(f.readline, limit + 1)
        if not skip_long:
            raise DataError(
                f"{reader.name}: line {i + 1} is longer than validate.max_row_bytes ({limit}); reading "
                "stopped (in a CSV the next row cannot be found safely)."
            )
        reader.count_row()
        reader.error(i, f"is longer than validate.max_row_bytes ({limit} bytes)", head, "row_size")


class _RepeatedKeys(dict):
    """A JSON object that repeated a key. json keeps the last value silently (an empty `chosen` could hide behind
    a good one, or the reverse), so such a row is refused."""

    repeated = ""


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        obj = _RepeatedKeys(obj)
        obj.repeated = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
    return obj


def _parse_json(text: str) -> Any:
    """json.loads that keeps repeated keys visible, and reads a raw control character inside a string as its escaped
    form reads (strict=False), so that both meet the same text check."""
    return json.loads(text, object_pairs_hook=_json_object, strict=False)


def _json_problem(e: Exception, where: str) -> str:
    """Why a JSON text could not be parsed, as a verb phrase; `where` is "column 7" or "line 2, column 7"."""
    if isinstance(e, RecursionError):
        return "is nested too deeply to parse as JSON"
    if isinstance(e, json.JSONDecodeError):  # some of json's messages end in "at" ("Invalid control character at")
        return f"is not valid JSON ({e.msg.removesuffix(' at')} at {where})"
    if "digits" in str(e):
        return f"holds an integer longer than Python's limit of {sys.get_int_max_str_digits()} digits"
    return f"is not valid JSON ({str(e).splitlines()[0]})"


def _record_problem(record: Any, max_bytes: int | None) -> tuple[_RowProblem | None, int]:
    """A problem of a parsed record as a whole: a repeated key, a lone UTF-16 surrogate anywhere (it is not text:
    nothing can print or write it), or more than `max_bytes` of text (measured only when given); and the size of its
    text. Iterative, so any depth json parsed is fine."""
    size, todo = 0, [record]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            if isinstance(item, _RepeatedKeys):
                key = excerpt(item.repeated)
                return _RowProblem(
                    "valid_json", f"repeats the key '{key}' (JSON would silently keep the last value)"
                ), size
            todo += [*item.keys(), *item.values()]
        elif isinstance(item, list | tuple):
            todo += item
        elif isinstance(item, str):
            if m := _SURROGATE.search(item):
                return _RowProblem(
                    "valid_utf8", f"holds a lone UTF-16 surrogate (\\u{ord(m.group()):04x}), which is not text"
                ), size
            if max_bytes is not None:
                size += len(item.encode("utf-8"))
    if max_bytes is not None and size > max_bytes:
        return _RowProblem("row_size", f"holds more than validate.max_row_bytes ({max_bytes} bytes) of text"), size
    return None, size


def _jsonl_records(f: BinaryIO, reader: _Reader) -> Iterator[tuple[int, Record]]:
    for i, raw in _lines(f, reader):
        if i == 0 and raw.startswith(BOM):  # a BOM some editors write
            raw = raw[3:]
        if not raw.strip():
            continue
        reader.count_row()
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            reader.error(
                i, f"is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})", raw.strip(), "valid_utf8"
            )
            continue
        try:
            record = _parse_json(line)
        except (ValueError, RecursionError) as e:
            where = f"column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
            reader.error(i, _json_problem(e, where), line.strip(), "valid_json")
            continue
        if not isinstance(record, dict):
            what = "a JSON array" if isinstance(record, list) else f"a JSON {type(record).__name__}"
            reader.error(i, f"is {what}, not an object", line.strip(), "valid_json")
        elif reader.checked(i, record, line.strip()):
            yield i, record


def _json_records(f: BinaryIO, reader: _Reader) -> Iterator[tuple[int, Record]]:
    raw = reader.read(f.read, reader.limits.max_file_bytes + 1)
    try:
        text = raw.decode("utf-8-sig")  # a BOM is accepted, as in .jsonl and .csv
    except UnicodeDecodeError as e:
        raise DataError(f"{reader.name} is not valid UTF-8 (byte offset {e.start}).") from None
    del raw
    try:
        data = _parse_json(text)
    except (ValueError, RecursionError) as e:  # one document: its problem is the file's
        where = f"line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise DataError(f"{reader.name} {_json_problem(e, where)}.") from None
    del text
    if not isinstance(data, list):
        raise DataError(f"{reader.name} must hold a JSON list of objects, not a {type(data).__name__}.")
    for i, record in enumerate(data):
        reader.count_row()
        if reader.checked(i, record, record, reader.limits.max_row_bytes):
            yield i, record  # non-objects become row errors in _convert


def _csv_records(f: BinaryIO, reader: _Reader) -> Iterator[tuple[int, Record]]:
    """CSV rows as records of strings (no NA guessing: an empty cell is "", which validation reports as empty)."""

    def text_lines() -> Iterator[str]:
        for i, raw in _lines(f, reader, skip_long=False):
            try:
                yield (raw[3:] if i == 0 and raw.startswith(BOM) else raw).decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{reader.name} is not valid UTF-8 at line {i + 1} (byte 0x{raw[e.start]:02x})."
                ) from None

    # csv's field limit is process-wide: bounded to a row while this file is read (a quoted field can span lines)
    previous = csv.field_size_limit(reader.limits.max_row_bytes)
    rows = csv.reader(text_lines(), strict=True)
    try:
        header = next(rows, None)
        if header is not None and len(set(header)) < len(header):
            twice = next(h for i, h in enumerate(header) if h in header[:i])
            raise DataError(
                f"{reader.name} repeats the column '{excerpt(twice)}' in its header (a row could keep "
                "only one of its values)."
            )
        n = 0
        for fields in rows if header is not None else ():
            if not fields:  # a blank line, as pandas skips it
                continue
            reader.count_row()
            if len(fields) != len(header):
                reader.error(
                    n, f"has {len(fields)} fields where the header has {len(header)}", ",".join(fields), "valid_csv"
                )
            elif reader.checked(
                n, record := dict(zip(header, fields, strict=True)), record, reader.limits.max_row_bytes
            ):
                yield n, record
            n += 1
    except csv.Error as e:
        raise DataError(f"could not parse CSV file {reader.name} at line {rows.line_num}: {e}.") from None
    finally:
        csv.field_size_limit(previous)


def _parquet_records(f: BinaryIO, reader: _Reader) -> Iterator[tuple[int, Record]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # Top-level string columns stay dictionary-encoded in memory: one long value repeated on every row (a few KB
        # on disk) is then held once, and its expansion is measured (_decoded_bytes) before any row is made of it.
        schema = pq.ParquetFile(f).schema_arrow
        strings = [
            field.name for field in schema if pa.types.is_string(field.type) or pa.types.is_large_string(field.type)
        ]
        parquet = pq.ParquetFile(f, read_dictionary=strings)
        meta = parquet.metadata
        # the footer says how big the columns are once decompressed: a small file of compressed repeats is refused
        # before it is expanded
        unpacked = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
        if unpacked > reader.limits.max_file_bytes:
            raise DataError(
                f"{reader.name} decompresses to {unpacked} bytes, more than validate.max_file_bytes "
                f"({reader.limits.max_file_bytes})."
            )
        reader.check_rows(meta.num_rows)
        i = 0
        for batch in parquet.iter_batches(batch_size=256):
            reader.count_text(_decoded_bytes(batch))
            # to_pylist keeps Python types (lists of dicts for messages, ints stay ints), unlike a pandas round trip
            for record in batch.to_pylist():
                reader.count_row()
                if reader.checked(i, record, record, reader.limits.max_row_bytes, counted=True):
                    yield i, record
                i += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{reader.name} is not a readable parquet file ({e}).") from None


def _decoded_bytes(batch: Any) -> int:
    """The bytes a record batch takes once its dictionary-encoded columns are expanded, measured without expanding
    them. (A nested column, e.g. a message list, is expanded by Arrow as it reads: it counts as it is.)"""
    import pyarrow as pa
    import pyarrow.compute as pc

    total = 0
    for column in batch.columns:
        if pa.types.is_dictionary(column.type):
            total += pc.sum(pc.take(pc.binary_length(column.dictionary), column.indices)).as_py() or 0
        else:
            total += column.nbytes
    return total


def _looks_local(name: str) -> bool:
    """Whether a name that does not exist was meant as a local file: a path-like start, a file suffix, more than one
    slash, or a folder that exists (data/prefs when data/ exists)."""
    base = name.split(":", 1)[0] if not name.startswith(("/", ".", "~")) else name
    if base.startswith(("/", ".", "~")) or "\\" in base or base.count("/") > 1:
        return True
    if base.lower().endswith(LOCAL_SUFFIXES):
        return True
    return "/" in base and Path(base).parent.is_dir()


def _hub_offline() -> bool:
    return any(
        os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _hub_dataset(name: str) -> Any:
    """A Hub dataset, asked for only when `name` looks like one (owner/name); offline or unknown: one line, at once."""
    shown = printable(name)
    dataset_id, _, split = name.partition(":")
    if _looks_local(name):
        raise DataError(f"{shown} does not exist.")
    if dataset_id.lower() in BUILDER_NAMES:
        raise DataError(
            f"{shown} does not exist, and '{dataset_id}' is a `datasets` builder name, not a dataset: "
            "give the path of your file."
        )
    if not HUB_ID.match(name):
        raise DataError(f"{shown} does not exist (a Hugging Face dataset is named owner/name, e.g. Anthropic/hh-rlhf).")
    if _hub_offline():
        raise DataError(f"{shown} is not a local file, and HF_HUB_OFFLINE is set: the Hugging Face Hub is not asked.")
    from huggingface_hub import HfApi

    try:  # one request with a short timeout: a typo or no network is said in seconds, not after retries
        HfApi().dataset_info(dataset_id, timeout=HUB_TIMEOUT)
    except Exception as e:  # noqa: BLE001 (not found, gated, no network: each the user's to fix)
        raise DataError(
            f"{shown} is not a local file, and the Hugging Face Hub did not return it within "
            f"{HUB_TIMEOUT:.0f} s: {printable(str(e).splitlines()[0] if str(e) else type(e).__name__)}"
        ) from None
    try:
        import datasets

        return datasets.load_dataset(dataset_id, split=split or "train")
    except Exception as e:  # noqa: BLE001 (any hub, network or script failure is the user's dataset name problem)
        raise DataError(
            f"{shown} is not an existing file, and loading it as a Hugging Face dataset failed: "
            f"{printable(str(e).splitlines()[0] if str(e) else type(e).__name__)}"
        ) from None


def _hub_records(name: str, reader: _Reader) -> Iterator[tuple[int, Record]]:
    dataset = _hub_dataset(name)
    reader.check_rows(dataset.num_rows)
    for i, record in enumerate(dataset):  # Arrow-backed and memory-mapped: rows come one at a time
        reader.count_row()
        if reader.checked(i, record, record, reader.limits.max_row_bytes):
            yield i, record


def _records(path: str | Path, reader: _Reader, files: ExitStack) -> Iterator[tuple[int, Record]]:
    """The records of `path`, lazily; what makes the whole file unusable is raised here, before the first row."""
    if not os.path.lexists(path):
        return _hub_records(str(path), reader)
    _regular_file(path, reader.limits)
    name = Path(path).name.lower()
    if not name.endswith(SUFFIXES):
        raise DataError(
            f"{reader.name} has an unsupported file type; expected .jsonl, .jsonl.gz, .json, .parquet or "
            ".csv (or a Hugging Face dataset id, owner/name)."
        )
    f = files.enter_context(open_regular(path, reader.limits))
    if name.endswith(".gz"):
        f = files.enter_context(gzip.GzipFile(fileobj=f, mode="rb"))
    for suffix, read in (
        (".jsonl", _jsonl_records),
        (".jsonl.gz", _jsonl_records),
        (".json", _json_records),
        (".parquet", _parquet_records),
        (".csv", _csv_records),
    ):
        if name.endswith(suffix):
            return read(f, reader)
    raise AssertionError(name)  # SUFFIXES and the table above name the same suffixes


def read_records(path: str | Path, limits: Limits = Limits()) -> list[Record]:  # noqa: B008 (frozen)
    """Every record of a local file of JSON objects (.jsonl, .jsonl.gz, .json, .parquet, .csv) within `limits`, for
    files that are not one of the datasets (a labels file): an unreadable row is a DataError naming its line."""
    reader = _Reader(path, limits)
    with ExitStack() as files:
        records = [record for _, record in _records(path, reader, files)]
    if reader.errors:
        err = reader.errors[0]
        raise DataError(f"{row_label(reader.name, err.row)} {err.reason}")
    return records


# ---------------------------------------------------------------------------------------------------------------
# Converting one record to the schema
# ---------------------------------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        try:
            return f"a number ({value!r})"[:60]
        except ValueError:  # an int past the digit limit cannot even be printed
            return "a number"
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


def _plain(text: str, key: str, what: str = "") -> str:
    """`text` if it holds no control character but tab, newline and carriage return (raw or JSON-escaped alike)."""
    if m := _CONTROL.search(text):
        raise _RowProblem(
            f"valid_text({key})",
            f"'{key}'{what} holds the control character {printable(m.group())} at offset {m.start()}",
        )
    return text


def _text(record: Record, key: str) -> str:
    value = _field(record, key)
    if not isinstance(value, str):  # never cast: a number where text belongs is a broken export, not a prompt
        raise _RowProblem(f"is_string({key})", f"'{key}' is {_type_name(value)}, expected a string")
    return _plain(value, key)


def _marker(text: str) -> str | None:
    return next((m for m in TURN_MARKERS if m in text), None)


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
            raise _RowProblem(check, f"'{key}' message {i} has unknown role {excerpt(role)!r}")
        if not isinstance(content, str):
            raise _RowProblem(check, f"'{key}' message {i} has no string 'content'")
        if marker := _marker(content):  # rendered, it would start a turn of its own
            raise _RowProblem(
                check,
                f"'{key}' message {i} holds the turn marker {marker!r} in its content, which "
                "would forge a dialogue turn",
            )
        out.append((role.lower(), _plain(content, key, f" message {i}")))
    return out


def _render(messages: list[tuple[str, str]], key: str) -> str:
    """The messages as an HH prompt. Without a user turn, render_prompt would relabel the text as one (an
    assistant-only history becoming a Human question), so such a row is refused."""
    if not any(role in ("user", "human") for role, _ in messages):
        raise _RowProblem(f"valid_messages({key})", f"'{key}' has no user turn before the reply")
    return schema.render_prompt("".join(schema.render_turn(role, content) for role, content in messages))


def _prompt(record: Record, key: str = "prompt") -> str:
    value = _field(record, key)
    if isinstance(value, list | tuple):
        return _render(_messages(value, key), key)
    return schema.render_prompt(_text(record, key))  # a string may be a whole transcript: its markers are meant


def _unforged(reply: str, key: str) -> str:
    """A reply is one assistant turn: a turn marker inside it would make the model see a dialogue that was not."""
    if marker := _marker(reply):
        raise _RowProblem(f"no_turn_markers({key})", f"'{key}' holds the turn marker {marker!r} inside the reply")
    return reply


def _reply(record: Record, key: str) -> str:
    """A response given as a string, or as TRL's message list ending with the assistant's message."""
    value = _field(record, key)
    if isinstance(value, list | tuple):
        messages = _messages(value, key)
        if messages[-1][0] != "assistant":
            raise _RowProblem(f"valid_messages({key})", f"'{key}' does not end with an assistant message")
        return messages[-1][1].strip()
    return _unforged(_text(record, key).strip(), key)


def _split_hh(transcript: str, key: str) -> tuple[str, str]:
    cut = transcript.rfind(schema.ASSISTANT)
    if cut < 0:
        raise _RowProblem("hh_transcript", f"'{key}' has no '\\n\\nAssistant:' turn")
    cut += len(schema.ASSISTANT)
    return schema.render_prompt(transcript[:cut]), _unforged(transcript[cut:].strip(), key)


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
    return {
        "prompt": _render(chosen[:shared], "chosen"),
        "chosen": tails[0][0][1].strip(),
        "rejected": tails[1][0][1].strip(),
    }


def _hh(record: Record) -> dict[str, str]:
    prompt, chosen = _split_hh(_text(record, "chosen"), "chosen")
    rejected_prompt, rejected = _split_hh(_text(record, "rejected"), "rejected")
    if prompt != rejected_prompt:
        raise _RowProblem("hh_transcript", "HH transcripts do not share a prompt prefix")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _conversation(record: Record, kind: str) -> dict[str, str]:
    """prompts: the whole conversation less a final assistant reply. sft: the last message is the demonstration
    and must be the assistant's; a message after it (a trailing system or user message) would be dropped, so the
    row is refused instead."""
    messages = _messages(_field(record, "messages"), "messages")
    check = "valid_messages(messages)"
    roles = [role for role, _ in messages]
    if kind == "prompts":
        return {"prompt": _render(messages[:-1] if roles[-1] == "assistant" else messages, "messages")}
    if "assistant" not in roles:
        raise _RowProblem(check, "'messages' has no assistant turn")
    last = len(roles) - 1 - roles[::-1].index("assistant")
    if last < len(roles) - 1:
        raise _RowProblem(
            check,
            f"'messages' has a {roles[last + 1]} message after the last assistant reply "
            f"(message {last + 1}), which would be dropped",
        )
    if last == 0:
        raise _RowProblem(check, "'messages' has no turn before the assistant reply")
    return {"prompt": _render(messages[:last], "messages"), "response": messages[last][1].strip()}


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
            return "hh"  # refined to implicit-prompt "pairs" by the values, see _format
        return "pairs" if keys & {"prompt", "chosen", "rejected"} else None
    if kind == "sft":
        return "sft" if keys & {"prompt", "response", "completion"} else None
    return "prompts" if "prompt" in keys else None


def _format(name: str, kind: str, fmt: str, head: list[tuple[int, Any]]) -> str:
    """The format of a source from its first readable records: `fmt` itself unless "auto"; a DataError when the
    columns fit no format of `kind`, or lack the columns the format needs."""
    if not head:
        return fmt
    keys = set().union(*(r.keys() for _, r in head if isinstance(r, dict)))
    found = ", ".join(sorted(excerpt(k) for k in keys)) or "none"
    if fmt == "auto":
        fmt = _detect(kind, keys) or ""
        if not fmt:
            raise DataError(
                f"could not detect the format of {name}: columns {found}; expected one of: {EXPECTED_COLUMNS[kind]}."
            )
        sample = [r.get("chosen") for _, r in head if isinstance(r, dict)]
        if fmt == "hh" and sum(isinstance(v, list) for v in sample) > sum(isinstance(v, str) for v in sample):
            fmt = "pairs"  # mostly message lists: TRL's implicit-prompt conversational format
    if not any(set(cols) <= keys for cols in REQUIRED[fmt]):
        need = " or ".join("/".join(cols) for cols in REQUIRED[fmt])
        missing = sorted(set(REQUIRED[fmt][0]) - keys)
        raise DataError(
            f"{name} is missing required column(s) {', '.join(missing)} for format {fmt} (needs {need}; "
            f"found: {found})."
        )
    return fmt


def load_dataset(path: str | Path, kind: str, fmt: str = "auto", limits: Limits = Limits()) -> Loaded:  # noqa: B008
    """Read `path` as a dataset of `kind` in format `fmt` ("auto" detects it from the columns of the first
    DETECT_ROWS readable rows), within `limits`; a DataError when the file as a whole cannot be used."""
    schema.columns(kind)  # unknown kind -> ValueError
    reader = _Reader(path, limits)
    if not str(path).strip():
        raise DataError("no data file was given (the path is empty).")
    if fmt != "auto" and fmt not in FORMATS_BY_KIND[kind]:
        raise DataError(
            f"cannot read {reader.name} as format {fmt!r}: it does not fit kind {kind!r} "
            f"(expected auto or one of {', '.join(FORMATS_BY_KIND[kind])})."
        )
    rows = []
    with ExitStack() as files:
        try:
            records = _records(path, reader, files)
            head = list(itertools.islice(records, DETECT_ROWS))
            if not head and not reader.errors:
                raise DataError(f"{reader.name} is empty (no rows).")
            fmt = _format(reader.name, kind, fmt, head)
            for source_row, record in itertools.chain(head, records):  # one row at a time from here on
                try:
                    rows.append({**_convert(record, fmt, kind), "source_row": source_row})
                except _RowProblem as p:
                    reader.error(source_row, p.reason, record, p.check)
        except OSError as e:  # permissions, I/O errors: still the user's file, still one sentence
            raise DataError(f"could not read {reader.name}: {e.strerror or e}.") from None
    errors = sorted(reader.errors, key=lambda e: e.row)
    frame = pd.DataFrame(rows, columns=[*schema.columns(kind), "source_row"]).astype({"source_row": "int64"})
    return Loaded(rows=frame, row_errors=errors, source_format=fmt if fmt != "auto" else "unknown", path=str(path))
