"""Validation of multi-GB input in bounded memory (issue 15): generate big files in a temporary folder, validate
each in a process of its own, and print the wall time and the peak RSS of that process.

    .venv/bin/python benchmarks/validate_big.py [--gb 3] [--dir /tmp] [--old 256f025]

Scenarios (each `validate_file` as `rlhf validate FILE --report DIR` runs it, in a fresh process):
    big-default        a GB-sized .jsonl of ordinary rows, default limits: refused at once (max_file_bytes, 1 GiB)
    big-max-rows       the same file with max_file_bytes raised: rows stream in, reading stops at max_rows (200k)
    bomb-default       a few-MB .jsonl.gz that expands to GBs of zeros (one endless line): stopped after 1 GiB of
                       decompressed data, without holding it
    huge-rows-pass     a GB-sized .jsonl of 20,000 ordinary rows and 10 MB rows (each longer than max_row_bytes),
                       max_file_bytes raised: every huge row skipped a chunk at a time and quarantined, the rest
                       validated by Great Expectations; the dataset passes
    old-huge-rows      (with --old REV) the huge-rows file read by stages/lib/formats.py as it was at REV, for contrast

Measured 2026-12-02 on this repository's machine (Intel(R) Xeon(R) Processor, AVX-512 with avx512_bf16, 2 cores,
24 GiB, Python 3.11.7; load average ~4: other work was running), `--gb 3 --old 256f025` (generation: 125 s):

    scenario        file                              seconds  RSS before  peak RSS  outcome
    big-default     big.jsonl, 3.0 GB                     0.0      555 MB    555 MB  refused at once (max_file_bytes)
    big-max-rows    big.jsonl, max_file_bytes 6 GB        3.1      556 MB    649 MB  refused after 200,000 rows
    bomb-default    bomb.jsonl.gz, ~3 MB -> 3.0 GB        1.8      555 MB    559 MB  refused after 1 GiB decompressed
    huge-rows-pass  huge.jsonl, 3.0 GB, 285 rows x 10 MB  3.3      556 MB    595 MB  passed: 20k valid, 285 quarantined
    old-huge-rows   huge.jsonl, the reader at 256f025    31.6      103 MB   8126 MB  read whole (no limit applies)

"RSS before" is the process after its imports (torch through the judge, pandas, Great Expectations), before reading.
What reading adds is bounded by the limits, not by the file: a line is never held beyond max_row_bytes (1 MiB), and
the rows kept are bounded by max_rows and max_file_bytes. The old reader held the whole file and then every parsed
row: 8.1 GB for a 3 GB file. This is a benchmark, not a test: it writes ~6 GB and takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, time
from pathlib import Path
from stages.lib.formats import DataError
from stages.validate import ValidateConfig, validate_file
from stages.lib.params import defaults
path, limits, reports = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
import great_expectations  # imported before the baseline: it is part of every validating process
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
try:
    report = validate_file(path, "preferences", config=defaults(ValidateConfig, **limits), report_dir=reports)
    verdict = "passed" if report.passed else "failed"
    outcome = f"{verdict}: {report.n_valid} valid, {report.n_quarantined} quarantined"
except DataError as e:
    outcome = "refused: " + str(e)
print(json.dumps({"seconds": time.perf_counter() - start, "outcome": outcome, "baseline_mb": baseline,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

OLD_CHILD = """
import importlib.util, json, resource, sys, time
spec = importlib.util.spec_from_file_location("old_formats", sys.argv[2])
old = importlib.util.module_from_spec(spec)
sys.modules["old_formats"] = old  # its dataclasses look their module up
spec.loader.exec_module(old)
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
loaded = old.load_dataset(sys.argv[1], "preferences")
print(json.dumps({"seconds": time.perf_counter() - start,
                  "outcome": f"read: {len(loaded.rows)} rows, {len(loaded.row_errors)} row errors",
                  "baseline_mb": baseline,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def row(i: int) -> bytes:
    return (
        json.dumps(
            {
                "prompt": f"What is {i} plus {i + 1}?",
                "chosen": f"It is {2 * i + 1}.",
                "rejected": f"I think it is {2 * i}, or so.",
            }
        ).encode()
        + b"\n"
    )


def write_big(path: Path, size: int) -> None:
    """Ordinary, distinct rows up to `size` bytes, written in 8 MB blocks."""
    i, written = 0, 0
    with open(path, "wb") as f:
        while written < size:
            block = b"".join(row(j) for j in range(i, i + 60_000))
            i += 60_000
            f.write(block)
            written += len(block)


def write_huge_rows(path: Path, size: int, good: int = 20_000, row_mb: int = 10) -> None:
    """`good` ordinary rows with 10 MB rows between them, up to `size` bytes."""
    n_huge = max(1, (size - good * 100) // (row_mb << 20))
    filler = b"x" * (row_mb << 20)
    every = max(1, good // n_huge)
    with open(path, "wb") as f:
        for i in range(good):
            f.write(row(i))
            if i % every == 0 and n_huge:
                f.write(b'{"prompt": "q", "chosen": "' + filler + b'", "rejected": "b"}\n')
                n_huge -= 1


def write_bomb(path: Path, unpacked: int) -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = b"\0" * (1 << 20)
    with open(path, "wb") as f:
        for _ in range(unpacked >> 20):
            f.write(packer.compress(zeros))
        f.write(packer.flush())


def measure(code: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "GX_ANALYTICS_ENABLED": "false"},
    )
    if proc.returncode != 0:
        return {
            "seconds": float("nan"),
            "peak_rss_mb": float("nan"),
            "baseline_mb": float("nan"),
            "outcome": "crashed: " + proc.stderr.strip().splitlines()[-1][:300],
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=3.0, help="size of the big files (default: 3 GB)")
    parser.add_argument("--dir", default=None, help="where to write them (default: the system's temporary folder)")
    parser.add_argument("--old", metavar="REV", help="also read the huge-rows file with formats.py as it was at REV")
    args = parser.parse_args()
    size = int(args.gb * 1e9)
    raised = {"max_file_bytes": 2 * size}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp_path = Path(tmp)
        files = {"big": tmp_path / "big.jsonl", "bomb": tmp_path / "bomb.jsonl.gz", "huge": tmp_path / "huge.jsonl"}
        started = time.perf_counter()
        write_big(files["big"], size)
        write_bomb(files["bomb"], size)
        write_huge_rows(files["huge"], size)
        print(
            f"generated in {time.perf_counter() - started:.0f} s: "
            + ", ".join(f"{p.name} {p.stat().st_size / 1e9:.2f} GB" for p in files.values())
        )
        scenarios = [
            ("big-default", files["big"], {}),
            ("big-max-rows", files["big"], {**raised, "max_rows": 200_000}),
            ("bomb-default", files["bomb"], {}),
            ("huge-rows-pass", files["huge"], raised),
        ]
        results = []
        for name, path, limits in scenarios:
            result = measure(CHILD, str(path), json.dumps(limits), str(tmp_path / f"reports-{name}"))
            results.append((name, path, result))
        if args.old:
            old = tmp_path / "old_formats.py"
            old.write_text(
                subprocess.run(
                    ["git", "show", f"{args.old}:stages/lib/formats.py"],
                    cwd=ROOT,
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
            )
            results.append(("old-huge-rows", files["huge"], measure(OLD_CHILD, str(files["huge"]), str(old))))
    print(f"{'scenario':<16} {'file':<14} {'seconds':>8} {'RSS before MB':>14} {'peak RSS MB':>12}  outcome")
    for name, path, r in results:
        print(
            f"{name:<16} {path.name:<14} {r['seconds']:>8.1f} {r['baseline_mb']:>14.0f} {r['peak_rss_mb']:>12.0f}  "
            f"{r['outcome'][:120]}"
        )


if __name__ == "__main__":
    main()
