"""`rlhf validate` on real-world formats, through the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.lib.outcome import ExitCode
from tests.helpers import ROOT

RLHF = str(Path(sys.executable).parent / "rlhf")


def _rlhf(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RLHF, *args], capture_output=True, text=True, timeout=300)


def test_validate_hh_transcripts(tmp_path):
    path = tmp_path / "hh.jsonl"
    rows = []
    for i in range(40):
        prefix = f"\n\nHuman: Hi {i}\n\nAssistant: Hello.\n\nHuman: What is {i} plus 1?\n\nAssistant:"
        rows.append({"chosen": f"{prefix} {i} plus 1 is {i + 1}.", "rejected": f"{prefix} No idea."})
    rows.append({"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _rlhf("validate", str(path), "--kind", "preferences", "--format", "hh")
    assert proc.returncode == 0, proc.stdout + proc.stderr  # 1 bad row in 41 is within the 5% quarantine budget
    assert "format hh" in proc.stdout and "40 valid, 1 quarantined" in proc.stdout
    assert "do not share a prompt prefix" in proc.stdout and "line 41" in proc.stdout


def test_validate_messages_and_a_failing_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": f"Count to {i}"}, {"role": "assistant", "content": str(i)}]}
            )
            + "\n"
            for i in range(10)
        )
    )
    proc = _rlhf("validate", str(path), "--kind", "sft")
    assert proc.returncode == 0 and "format messages" in proc.stdout and "PASSED" in proc.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n")
    proc = _rlhf("validate", str(bad), "--kind", "preferences", "--policy", "fail")
    assert proc.returncode == ExitCode.BAD_INPUT and "chosen_differs" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


STAGE_SECTIONS = {
    "lib.task": "task",
    "validate": "validate",
    "sft": "sft",
    "reward": "reward",
    "reward_gate": "reward_gate",
    "ppo": "ppo",
    "evaluate": "evaluate",
    "promote": "promote",
    "dpo": "dpo",
    "judge": "judge",
}


@pytest.mark.parametrize("stage", sorted(STAGE_SECTIONS))
def test_a_stage_with_a_bad_param_says_which_without_a_traceback(stage, tmp_path, root):
    """`python -m stages.<stage>` (what dvc.yaml and the container run) on a params.yaml with a typo: one clear line."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[STAGE_SECTIONS[stage]]["lerning_rate"] = 0.1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", "--params", str(tmp_path / "params.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == ExitCode.BAD_INPUT, proc.stdout + proc.stderr
    assert "unknown parameter(s) lerning_rate" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "mlflow.db").exists()  # nothing ran


def test_a_stage_without_params_says_so(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "stages.sft", "--params", str(tmp_path / "nope.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == ExitCode.BAD_INPUT and "no params file" in proc.stderr and "Traceback" not in proc.stderr


def test_usage_errors_have_their_own_code(tmp_path):
    """A wrong command line is 64 (EX_USAGE), not argparse's 2 that used to mean a gate; an unknown stage is refused
    before anything is generated."""
    assert _rlhf("run", "--no-such-flag").returncode == ExitCode.USAGE
    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    proc = subprocess.run([RLHF, "run", "nosuchstage"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == ExitCode.USAGE and "no such stage" in proc.stderr
    assert not (tmp_path / "data").exists()
    (tmp_path / "dvc.yaml").unlink()
    proc = subprocess.run([RLHF, "run"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == ExitCode.BAD_INPUT and "no dvc.yaml" in proc.stderr and "Traceback" not in proc.stderr
    stage = subprocess.run([sys.executable, "-m", "stages.sft", "--bogus"], capture_output=True, text=True)
    assert stage.returncode == ExitCode.USAGE
