"""stages.lib.formats: every supported format and file type reads into the internal schema."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from stages.lib import formats
from stages.lib.formats import DataError, load_dataset, row_label

Q = "\n\nHuman: What is 2 plus 3?\n\nAssistant:"  # the rendered form of the question below


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows in the file type named by the path's extension."""
    name = path.name
    if name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif name.endswith(".parquet"):
        pd.DataFrame(rows).to_parquet(path)
    elif name.endswith(".csv"):
        pd.DataFrame(rows).to_csv(path, index=False)
    return path


def records(loaded: formats.Loaded) -> list[dict[str, Any]]:
    return loaded.rows.drop(columns="source_row").to_dict("records")


PAIRS = [{"prompt": "What is 2 plus 3?", "chosen": " 5 ", "rejected": "6"}]
EXPECTED_PAIR = [{"prompt": Q, "chosen": "5", "rejected": "6"}]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv"])
def test_each_file_type_loads_pairs(tmp_path: Path, suffix: str) -> None:
    loaded = load_dataset(write_rows(tmp_path / f"prefs{suffix}", PAIRS * 3), "preferences")
    assert records(loaded) == EXPECTED_PAIR * 3
    assert list(loaded.rows.columns) == ["prompt", "chosen", "rejected", "source_row"]
    assert list(loaded.rows["source_row"]) == [0, 1, 2]
    assert loaded.row_errors == [] and loaded.source_format == "pairs"


@pytest.mark.parametrize(
    ("kind", "row", "fmt", "expected"),
    [
        ("preferences", PAIRS[0], "pairs", EXPECTED_PAIR[0]),
        pytest.param(
            "preferences",
            {"prompt": [user("What is 2 plus 3?")], "chosen": [bot("5")], "rejected": [bot("6")]},
            "pairs",
            EXPECTED_PAIR[0],
            id="conversational-pairs",
        ),
        pytest.param(
            "preferences",
            {"chosen": [user("What is 2 plus 3?"), bot("5")], "rejected": [user("What is 2 plus 3?"), bot("6")]},
            "pairs",
            EXPECTED_PAIR[0],
            id="implicit-prompt-pairs",
        ),
        pytest.param("preferences", {"chosen": Q + " 5", "rejected": Q + " 6"}, "hh", EXPECTED_PAIR[0], id="hh"),
        pytest.param(
            "sft",
            {"prompt": "What is 2 plus 3?", "response": "5 "},
            "sft",
            {"prompt": Q, "response": "5"},
            id="prompt-response",
        ),
        pytest.param(
            "sft",
            {"prompt": "What is 2 plus 3?", "completion": " 5"},
            "sft",
            {"prompt": Q, "response": "5"},
            id="prompt-completion",
        ),
        pytest.param(
            "sft",
            {"prompt": [user("What is 2 plus 3?")], "completion": [bot("5")]},
            "sft",
            {"prompt": Q, "response": "5"},
            id="conversational-prompt-completion",
        ),
        pytest.param(
            "sft",
            {"messages": [user("What is 2 plus 3?"), bot("5")]},
            "messages",
            {"prompt": Q, "response": "5"},
            id="messages-sft",
        ),
        pytest.param("prompts", {"prompt": "What is 2 plus 3?"}, "prompts", {"prompt": Q}, id="prompts"),
        pytest.param("prompts", {"prompt": Q}, "prompts", {"prompt": Q}, id="prompts-already-rendered"),
        pytest.param("prompts", {"prompt": [user("What is 2 plus 3?")]}, "prompts", {"prompt": Q}, id="prompts-list"),
        pytest.param(
            "prompts", {"messages": [user("What is 2 plus 3?")]}, "messages", {"prompt": Q}, id="messages-prompts"
        ),
        pytest.param(
            "prompts",
            {"messages": [user("What is 2 plus 3?"), bot("5")]},
            "messages",
            {"prompt": Q},
            id="messages-prompts-drop-reply",
        ),
    ],
)
def test_formats_are_detected_and_mapped_to_the_schema(
    tmp_path: Path, kind: str, row: dict[str, Any], fmt: str, expected: dict[str, str]
) -> None:
    path = write_rows(tmp_path / "data.jsonl", [row])
    auto = load_dataset(path, kind)
    assert auto.source_format == fmt
    assert auto.row_errors == []
    assert records(auto) == [expected]
    assert records(load_dataset(path, kind, fmt)) == [expected]  # the explicit format agrees


def test_hh_splits_a_multi_turn_transcript_at_the_last_assistant_marker(tmp_path: Path) -> None:
    history = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2 plus 3?\n\nAssistant:"
    row = {"chosen": history + " It is 5.", "rejected": history + " No idea.\n"}
    loaded = load_dataset(write_rows(tmp_path / "hh.jsonl", [row]), "preferences", "hh")
    assert records(loaded) == [{"prompt": history, "chosen": "It is 5.", "rejected": "No idea."}]


def test_messages_render_every_turn_before_the_last_reply(tmp_path: Path) -> None:
    messages = [{"role": "system", "content": "Be brief."}, user("Hi"), bot("Hello!"), user("2+3?"), bot("5")]
    loaded = load_dataset(write_rows(tmp_path / "chat.jsonl", [{"messages": messages}]), "sft")
    (row,) = records(loaded)
    assert row == {
        "prompt": "\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+3?\n\nAssistant:",
        "response": "5",
    }


def test_numbers_are_not_cast_to_strings(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "prefs.parquet", [{"prompt": "q", "chosen": 5, "rejected": 6}])
    loaded = load_dataset(path, "preferences")
    assert loaded.rows.empty
    (error,) = loaded.row_errors
    assert error.check == "is_string(chosen)" and "a number (5)" in error.reason and error.row == 0


def test_source_rows_are_line_indices_counting_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n\n\n{"prompt": "b"}\n', encoding="utf-8")
    loaded = load_dataset(path, "prompts")
    assert list(loaded.rows["source_row"]) == [0, 3]
    assert row_label(path, 3) == "line 4" and row_label("x.parquet", 3) == "row 3"


def test_every_row_bad_is_still_loaded_with_its_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("nope\n{broken\n", encoding="utf-8")
    loaded = load_dataset(path, "preferences", "pairs")
    assert loaded.rows.empty and [e.row for e in loaded.row_errors] == [0, 1]


def test_format_that_does_not_fit_the_kind_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="as format 'messages': it does not fit kind 'preferences'"):
        load_dataset(write_rows(tmp_path / "p.jsonl", PAIRS), "preferences", "messages")


@pytest.fixture
def online_hub(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float | None]]:
    """The Hub as if online: HF_HUB_OFFLINE unset and its existence probe answered here (records the ids asked)."""
    import huggingface_hub

    asked: list[tuple[str, float | None]] = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "dataset_info",
        lambda self, repo_id, timeout=None, **kw: asked.append((repo_id, timeout)),
    )
    return asked


def test_hugging_face_names_go_through_datasets(monkeypatch: pytest.MonkeyPatch, online_hub: list) -> None:
    import datasets

    calls = []

    def fake_load(name: str, split: str) -> datasets.Dataset:
        calls.append((name, split))
        return datasets.Dataset.from_list([{"prompt": "What is 2 plus 3?"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    loaded = load_dataset("someone/prompts:test", "prompts")
    assert calls == [("someone/prompts", "test")] and records(loaded) == [{"prompt": Q}]
    load_dataset("someone/prompts", "prompts")
    assert calls[-1] == ("someone/prompts", "train")
    assert online_hub == [("someone/prompts", formats.HUB_TIMEOUT)] * 2  # asked first, with a short timeout


def test_hugging_face_failure_is_a_data_error(monkeypatch: pytest.MonkeyPatch, online_hub: list) -> None:
    import datasets

    def broken(name: str, split: str) -> None:
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(DataError, match="loading it as a Hugging Face dataset failed: Dataset 'nobody/none'"):
        load_dataset("nobody/none", "prompts")


def test_an_unknown_hub_id_is_said_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def not_found(self: object, repo_id: str, timeout: float | None = None, **kw: object) -> None:
        raise RuntimeError(f"404 Client Error: Repository Not Found for url: .../api/datasets/{repo_id}")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", not_found)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset was called"))
    with pytest.raises(
        DataError,
        match=r"nobody/none is not a local file, and the Hugging Face Hub did not return it "
        r"within 10 s: 404 Client Error",
    ):
        load_dataset("nobody/none", "prompts")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("json", "'json' is a `datasets` builder name, not a dataset"),
        ("parquet", "'parquet' is a `datasets` builder name"),
        ("csv:train", "'csv' is a `datasets` builder name"),
        ("prefs_typo.jsonl", "prefs_typo.jsonl does not exist."),
        ("prefs.JSON", "prefs.JSON does not exist."),
        ("my-prefs", "my-prefs does not exist (a Hugging Face dataset is named owner/name"),
        ("a/b/c", "a/b/c does not exist."),
        ("./owner/name", "./owner/name does not exist."),
        ("tests/nosuchfile", "tests/nosuchfile does not exist."),  # the folder exists: a local path was meant
    ],
)
def test_local_looking_and_builder_names_never_reach_the_hub(
    monkeypatch: pytest.MonkeyPatch, online_hub: list, name: str, message: str, root: Path
) -> None:
    import datasets

    monkeypatch.chdir(root)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset was called"))
    with pytest.raises(DataError) as info:
        load_dataset(name, "prompts")
    assert message in str(info.value) and online_hub == []


def test_offline_hub_is_said_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="owner/name is not a local file, and HF_HUB_OFFLINE is set"):
        load_dataset("owner/name", "prompts")
