"""`rlhf`: the command line of the RLHF pipeline. A thin wrapper: every command calls a stage's or a flow's function."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

EXIT_GATE = 2  # a gate (validation, reward-model agreement, KL guard) stopped the pipeline: not a crash

QUICK_HELP = """\
examples:
  rlhf run                                   run the whole pipeline on the embedded default task
  rlhf validate data/prefs.jsonl --kind preferences
  rlhf validate hh.jsonl.gz --kind preferences --format hh
  rlhf make-data                             regenerate the default task into data/ (matches data.dvc)
"""


def _cmd_make_data(args: argparse.Namespace) -> int:
    from stages import task

    return task.main(["--params", args.params, "--out", args.out])


def _cmd_validate(args: argparse.Namespace) -> int:
    from stages import validate
    from stages.formats import DataError
    from stages.params import config_from, load_params

    section = load_params(args.params).get("validate", {}) if Path(args.params).exists() else {}
    overrides = {"policy": args.policy} if args.policy else {}
    config = config_from(validate.ValidateConfig, section, **overrides)
    heldout: set[str] = set()
    try:
        for path in args.heldout or []:
            heldout |= set(validate.load_prompts(path))
        report = validate.validate_file(args.file, args.kind, args.format, config, heldout)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_GATE
    print(validate.format_report(report))
    return 0 if report.passed else EXIT_GATE


def _venv_env() -> dict[str, str]:
    """The environment for child commands: this interpreter's bin/ first, so `python` in dvc.yaml is ours."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for key, value in {"DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false",
                       "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}.items():  # fmt: skip
        env.setdefault(key, value)
    return env


def _cmd_run(args: argparse.Namespace) -> int:
    if not Path(args.data).exists():
        print(f"no {args.data}/ found: generating the embedded default task (it matches data.dvc)")
        rc = _cmd_make_data(argparse.Namespace(params=args.params, out=args.data))
        if rc:
            return rc
    cmd = [sys.executable, "-m", "dvc", "repro", *args.stages]
    print("$ dvc repro", *args.stages, flush=True)
    rc = subprocess.call(cmd, env=_venv_env())
    if rc:
        print(f"the pipeline stopped (dvc repro exited {rc}); earlier artifacts are left as they were", file=sys.stderr)
        return EXIT_GATE
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf",
        description="A reproducible RLHF pipeline: data validation, SFT, reward model, PPO, evaluation, promotion.",
        epilog=QUICK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the pipeline (through DVC: unchanged stages are skipped)")
    p.add_argument("stages", nargs="*", help="only these stages (and what they need); default: all")
    p.add_argument("--data", default="data", help="the raw data folder tracked by data.dvc")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("validate", help="validate one data file and print the report the stage writes")
    p.add_argument("file", help="a .jsonl, .jsonl.gz, .parquet or .csv file, or a Hugging Face datasets name")
    p.add_argument("--kind", required=True, choices=["preferences", "sft", "prompts"], help="what the file holds")
    p.add_argument("--format", default="auto", choices=["auto", "pairs", "hh", "messages"],
                   help="pairs: prompt/chosen/rejected; hh: Anthropic HH transcripts; messages: role/content lists")  # fmt: skip
    p.add_argument("--policy", choices=["fail", "quarantine"], help="override params.yaml validate.policy")
    p.add_argument("--heldout", action="append", metavar="FILE",
                   help="a held-out file whose prompts must not appear in FILE (repeatable)")  # fmt: skip
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("make-data", help="generate the embedded default task (deterministic; matches data.dvc)")
    p.add_argument("--out", default="data", help="output folder (default: data)")
    p.set_defaults(func=_cmd_make_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:  # bad params or paths: say what, not where in our code
        print(f"error: {e}", file=sys.stderr)
        return EXIT_GATE


if __name__ == "__main__":
    raise SystemExit(main())
