"""`rlhf`: the command line of the RLHF pipeline. A thin wrapper: every command calls a stage's or a flow's function,
and every outcome ends with the one exit-code vocabulary of stages/lib/outcome.py."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from stages.lib.outcome import ArgumentParser, BadInput, ExitCode, StageStop

QUICK_HELP = """\
examples:
  rlhf run                                   run the whole pipeline on the embedded default task
  rlhf run --prefect                         the same as a Prefect flow, with one parent MLflow run
  rlhf run --prefect --runner docker         each stage in its own container (make images builds rlhf-stage:cpu)
  rlhf serve --cron "0 3 * * *"              serve the pipeline nightly (needs `prefect server start`)
  rlhf stack up                              PostgreSQL, Prefect and MLflow servers, a worker, a DVC remote
  rlhf run --prefect --stack                 the pipeline against that stack (rlhf stack status: the URLs)
  rlhf validate data/prefs.jsonl --kind preferences
  rlhf validate hh.jsonl.gz --kind preferences --format hh
  rlhf validate my.jsonl --kind sft --report r   also write r/report.md, failed_rows.jsonl, data_docs/
  rlhf make-data                             regenerate the default task into data/ (matches data.dvc)
  rlhf make-data --batch K                   a new batch of labelled pairs in data/incoming/ (the next run trains on it)

exit codes: 0 ok, 1 crash, 3 a gate stopped it, 4 training diverged, 64 usage, 65 bad data or params,
            69 a service is unavailable, 75 another run holds the project's lock, 130 interrupted
"""

RUN_HELP = """\
Run the pipeline: dvc.yaml's stages in order, each as `dvc repro --single-item` (DVC skips unchanged ones and records
what ran in dvc.lock). Hyperparameters come from params.yaml, the one file DVC tracks them in: for a variant, edit it
or use `dvc exp run -S section.key=value`. With the default --runner local, each stage's `python -m stages.X` runs in
this process, which saves the ~6 s of interpreter start-up and imports a process per stage costs; --runner process
gives each stage a process of its own (what `dvc repro` does). A stage that stops (a gate, bad data, a diverged
loss) ends the run with its exit code and one line saying why; earlier artifacts stay as they were.

--prefect runs the same loop as the Prefect flow `rlhf-pipeline` (flows/pipeline.py): one task per stage (run
by the same runners), one parent MLflow run holding every stage's run, and Prefect artifacts (validation summary,
reward gate, PPO KL curve, evaluation report). Without PREFECT_API_URL, Prefect starts a temporary local
server, which adds about 15-20 s; with it, the run shows in that server's UI.

--runner docker runs each stage in its own container of the stage image (docker/Dockerfile, `make images`) with the
project mounted at its own path and the container running as the project's owner; the outputs, dvc.lock and the
MLflow runs are the same as with the default local runner. --gpus all passes the GPUs to the CUDA image.
"""

SERVE_HELP = """\
Serve the pipeline flow as the Prefect deployment 'rlhf-pipeline/rlhf-nightly' with a cron schedule. This process
runs every scheduled or triggered run of it, in the current directory (the project), until you stop it (Ctrl-C).

It needs a Prefect server, not the temporary one `rlhf run --prefect` starts:
  prefect server start                                         # UI and API on http://127.0.0.1:4200
  prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api  # or export PREFECT_API_URL=...
  rlhf serve --cron "0 3 * * *"                                 # every day at 03:00 UTC
Trigger a run now, from any shell:
  prefect deployment run 'rlhf-pipeline/rlhf-nightly'
For work pools and workers (process or Docker) use prefect.yaml: prefect deploy --all
"""


STACK_HELP = """\
The services a team runs the pipeline against, on this machine (flows/stack.py):
  postgres    PostgreSQL (initdb/pg_ctl; as the non-root user rlhf-stack when run as root), both servers' database
  prefect     `prefect server start` on PostgreSQL: API and UI (default http://127.0.0.1:4200)
  mlflow      `mlflow server` on PostgreSQL, artifacts proxied through it (default http://127.0.0.1:5000)
  worker      `prefect worker start --pool rlhf-process`; `up` registers prefect.yaml's rlhf-process deployment
  dvc-remote  sshd for the project's DVC remote over SSH (`rlhf stack remote` configures it)
  label-studio  with --label-studio: Label Studio on the same PostgreSQL, for human labelling rounds (default :8080)
Loopback only unless --host says otherwise. `up` is idempotent; `down` stops everything `up` started.

  rlhf stack up && rlhf run --prefect --stack     # then open the two UIs `rlhf stack status` prints
  eval "$(rlhf stack env)"                         # MLFLOW_TRACKING_URI and PREFECT_API_URL for any tool
  prefect deployment run 'rlhf-pipeline/rlhf-process'   # the same pipeline, run by the stack's worker
"""


def _stack_config(args: argparse.Namespace):  # -> flows.stack.StackConfig
    from flows.stack import config_from

    flags = {
        k: getattr(args, k, None)
        for k in ("dir", "host", "pg_port", "prefect_port", "mlflow_port", "ssh_port", "db_user", "label_studio_port")
    }
    if getattr(args, "label_studio", False) and not flags["label_studio_port"]:
        flags["label_studio_port"] = 8080
    return config_from(Path.cwd(), flags)


def _cmd_stack(args: argparse.Namespace) -> int:
    from flows import stack

    config = _stack_config(args)
    if args.action == "up":
        t0 = time.monotonic()
        stack.up(config, Path.cwd(), deploy=not args.no_deploy)
        print(f"the stack is up ({time.monotonic() - t0:.1f} s)\n")
    elif args.action == "down":
        if not stack.down(config):
            print(f"nothing of the stack in {config.home} was running")
        return ExitCode.OK
    elif args.action == "restart":
        stack.restart(config, args.service, args.down_for)
    elif args.action == "env":
        print("\n".join(f"export {k}={v}" for k, v in stack.client_env(Path.cwd(), config.dir).items()))
        return ExitCode.OK
    elif args.action == "remote":
        stack.configure_remote(config, Path.cwd(), args.name)
        print(
            f"DVC remote {args.name!r} (default): {config.remote_url} (key in .dvc/config.local); dvc push / dvc pull"
        )
        return ExitCode.OK
    services = stack.status(config)
    if getattr(args, "json", False):
        print(
            json.dumps(
                {
                    "dir": str(config.home),
                    **stack.urls(config),
                    "services": {s.name: {"up": s.up, "address": s.address} for s in services},
                },
                indent=2,
            )
        )
    else:
        print(stack.format_status(config, services))
    return ExitCode.OK if all(s.up for s in services) else ExitCode.UNAVAILABLE


def _stack_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stack",
        help="start, stop or inspect the PostgreSQL-backed Prefect and MLflow servers",
        description=STACK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=ArgumentParser)
    for name, text in (
        ("up", "start whatever is not running (idempotent)"),
        ("down", "stop everything up started"),
        ("status", "the URLs and whether each service answers (exit 69 if one does not)"),
        ("env", "print export lines for MLFLOW_TRACKING_URI and PREFECT_API_URL"),
        ("remote", "make the stack's SSH store this project's default DVC remote"),
        ("restart", "stop one service and start it again"),
    ):
        a = actions.add_parser(name, help=text, description=text)
        a.add_argument("--dir", help="the stack's folder (default: RLHF_STACK_DIR or .rlhf/stack in the project)")
        a.set_defaults(func=_cmd_stack)
        if name == "up":
            a.add_argument("--host", help="the address every service binds to (default 127.0.0.1: loopback only)")
            for port, default in (("pg", 5433), ("prefect", 4200), ("mlflow", 5000), ("ssh", 2222)):
                a.add_argument(f"--{port}-port", type=int, help=f"default {default} (RLHF_STACK_{port.upper()}_PORT)")
            a.add_argument(
                "--db-user",
                help="the PostgreSQL role (default rlhf); password: RLHF_STACK_DB_PASSWORD "
                "or generated into <dir>/secrets/db_password",
            )
            a.add_argument("--no-deploy", action="store_true", help="do not register prefect.yaml's deployment")
            a.add_argument(
                "--label-studio",
                action="store_true",
                help="Label Studio too (port 8080; installed into a venv of its own the first time), for the "
                "comparisons stage's human rounds",
            )
            a.add_argument("--label-studio-port", type=int, help="Label Studio's port (RLHF_STACK_LABEL_STUDIO_PORT)")
        if name == "status":
            a.add_argument("--json", action="store_true", help="machine-readable")
        if name == "remote":
            a.add_argument("--name", default="stack", help="the remote's name (default: stack)")
        if name == "restart":
            from flows.stack import OPTIONAL, SERVICES

            a.add_argument("service", choices=SERVICES + OPTIONAL)
            a.add_argument(
                "--down-for",
                type=float,
                default=0.0,
                metavar="SECONDS",
                help="keep it down this long before starting it again (a fault drill)",
            )


def _cmd_make_data(args: argparse.Namespace) -> int:
    from stages.lib import task

    if args.profile:  # the profile's own data: its `profile.dialogues` pairs where its `data.preferences` points
        from flows.profiles import dialogues

        n, out = dialogues(Path.cwd(), args.profile)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        return task.main(["--params", args.params, "--out", out, "--dialogues", str(n)])
    if args.batch is not None:  # a labelling team's delivery: the next run picks it up (flows/orchestrate.py)
        out = args.out if args.out != "data" else f"data/incoming/batch-{args.batch:03d}.jsonl"
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        return task.main(
            ["--params", args.params, "--out", out, "--batch", str(args.batch), "--pairs", str(args.pairs)]
        )
    extra = ["--dialogues", str(args.dialogues)] if args.dialogues else []
    code = task.main(["--params", args.params, "--out", args.out, *extra])
    if not code and not args.dialogues and Path(args.out).resolve() == Path.cwd() / "data":
        from flows.orchestrate import cache_data

        cache_data(Path.cwd())  # into the DVC cache, so `dvc push` sends it
    return code


def _cmd_validate(args: argparse.Namespace) -> int:
    from stages import validate
    from stages.lib.params import PROJECT_PARAMS, config_from, load_params

    report_dir = Path(args.report) if args.report else None
    try:  # bad params or an unreadable held-out file: the report folder says so too, never a previous verdict
        params_file = args.params if Path(args.params).exists() else PROJECT_PARAMS  # outside a project: ours
        section = load_params(params_file).get("validate")
        overrides = {"policy": args.policy} if args.policy else {}
        config = config_from(validate.ValidateConfig, section, **overrides)
        heldout: set[str] = set()
        for path in args.heldout or []:
            heldout |= set(validate.load_prompts(path, limits=config.limits))
    except Exception as e:
        if report_dir is not None:
            validate.write_failure(report_dir, e)
        raise
    report = validate.validate_file(
        args.file, args.kind, args.format, config=config, heldout_prompts=heldout, report_dir=report_dir
    )
    print(validate.format_report(report))
    if report_dir is not None:
        print(
            f"reports: {report_dir}/report.md, summary.json, failed_rows.jsonl (every failing row), "
            "data_docs/index.html"
        )
    return ExitCode.OK if report.passed else ExitCode.BAD_INPUT


def _runner(args: argparse.Namespace):  # -> flows.runners.Runner, checked: the engine answers, the image exists
    from flows.runners import Runner, RunnerError

    runner = Runner(args.runner, args.image, args.gpus)
    try:
        runner.check()
        runner.check_project(Path.cwd())
    except RunnerError as e:
        raise _Unavailable(str(e)) from None
    return runner


class _Unavailable(StageStop):
    code = ExitCode.UNAVAILABLE


def _cmd_run(args: argparse.Namespace) -> int:
    from flows.lifecycle import project_lock
    from flows.orchestrate import plan

    project = Path.cwd()
    if args.profile:
        from flows.profiles import apply

        changed = apply(project, args.profile)
        print(f"profile {args.profile}: " + ("; ".join(changed) if changed else "params.yaml already has its values"))
        if changed:
            print("(params.yaml now holds them, as `dvc exp run -S` would; `git checkout params.yaml` goes back)")
    if args.stack or args.stack_dir:  # before anything imports Prefect, which reads PREFECT_API_URL once
        from flows.stack import client_env

        os.environ.update(client_env(project, args.stack_dir))
    names = plan(project, args.stages or None)  # an unknown stage is refused before anything is generated
    runner = _runner(args)
    with project_lock(project):
        if args.prefect:
            return _run_flow(args)
        return _run_local(project, names, runner)


def _run_local(project: Path, names: list[str], runner) -> int:  # noqa: ANN001 (a flows.runners.Runner)
    """`rlhf run`: the one loop, each stage where `runner` says, its output to this command's stdout."""
    from flows.orchestrate import local_execute, prepare, run_pipeline, stage_env, up_to_date

    prepare(project)
    if nothing := up_to_date(project, names):
        print(nothing)
        return ExitCode.OK
    stdout = sys.stdout

    def echo(line: str) -> None:  # a stage's output to this command's stdout (in process, sys.stdout is the stage's)
        print(line, file=stdout, flush=True)

    pipeline = run_pipeline(project, names, local_execute(runner, project, stage_env(), echo))
    if (stop := pipeline.stopped) is not None:
        print(f"the pipeline stopped: {stop.message}; earlier artifacts are left as they were", file=sys.stderr)
        return pipeline.exit_code
    print(pipeline.summary())
    _print_where_to_look(project, None)
    return ExitCode.OK


def _run_flow(args: argparse.Namespace) -> int:
    """`rlhf run --prefect`: the Prefect flow in this process, on PREFECT_API_URL's server, else on a temporary one
    that cannot outlive this command (flows/lifecycle.py)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.lifecycle import temporary_prefect_server
    from flows.pipeline import rlhf_pipeline

    with contextlib.ExitStack() as stack:
        if not PREFECT_API_URL.value():
            url = stack.enter_context(temporary_prefect_server())
            stack.enter_context(temporary_settings({PREFECT_API_URL: url}))
        state = rlhf_pipeline(
            project_dir=".",
            stages=args.stages or None,
            runner=args.runner,
            image=args.image,
            gpus=args.gpus,
            return_state=True,
        )
    summary = state.result(raise_on_failure=False)
    if not isinstance(summary, dict):  # the flow itself crashed before it could say how the pipeline went
        print(f"the pipeline flow crashed: {state.message}", file=sys.stderr)
        return ExitCode.CRASH
    if summary["exit_code"]:
        print(f"the pipeline stopped: {state.message}; earlier artifacts are left as they were", file=sys.stderr)
        _print_where_to_look(Path.cwd(), summary["parent_run_id"])
        return summary["exit_code"]
    if summary.get("nothing_new"):
        print(summary["nothing_new"])
        return ExitCode.OK
    restored = f"; restored from DVC's run cache: {', '.join(summary['restored'])}" if summary["restored"] else ""
    print(
        f"ran: {', '.join(summary['ran']) or 'nothing'}; skipped (unchanged): "
        f"{', '.join(summary['skipped']) or 'nothing'}{restored}"
    )
    _print_where_to_look(Path.cwd(), summary["parent_run_id"])
    return ExitCode.OK


def _print_where_to_look(project: Path, parent_run_id: str | None) -> None:
    """Where the results are: the MLflow UI, the champion, the reports."""
    from stages.lib.tracking import redact_uri, tracking_uri

    uri = tracking_uri()
    run = f", parent run {parent_run_id}" if parent_run_id else ""
    if uri.startswith(("http://", "https://")):  # a tracking server: its UI is at the same address
        from flows.stack import training_view

        print(f"MLflow:   {training_view(uri, parent_run_id)}")
    else:
        print(f'MLflow:   mlflow ui --backend-store-uri {redact_uri(uri)}   (experiment "rlhf"{run})')
    promote = project / "artifacts/promote/metrics.json"
    if promote.exists():
        p = json.loads(promote.read_text())
        name = p.get("registered_model", "rlhf-policy")
        verdict = (
            f"version {p.get('version')} promoted"
            if p.get("promoted")
            else f"version {p.get('version')} not promoted ({'; '.join(p.get('reasons') or [])})"
        )
        print(f"champion: {name} version {p.get('champion')} (models:/{name}@champion); last promotion: {verdict}")
    reports = [
        r
        for r in ("reports/validate/report.md", "artifacts/evaluate/report.md", "artifacts/evaluate/report.html")
        if (project / r).exists()
    ]
    if reports:
        print(f"reports:  {', '.join(reports)}")


def _cmd_sync(args: argparse.Namespace) -> int:
    """Write dvc.yaml's deps from each stage's import closure and params.yaml's data files (flows/sync.py)."""
    from flows import sync

    project = Path.cwd()
    if not (project / "dvc.yaml").exists():
        raise BadInput(f"no dvc.yaml in {project}: run rlhf from the project's directory")
    said = sync.changes(project) if args.check else sync.sync(project)
    for line in said:
        print(f"dvc.yaml {'is out of date' if args.check else 'now'}: {line}")
    if not said:
        print("dvc.yaml is in sync with the code and params.yaml")
    return ExitCode.GATE if args.check and said else ExitCode.OK


def _cmd_promote(args: argparse.Namespace) -> int:
    """Promote the version registered from an MLflow run (criteria re-checked from its tags unless --force)."""
    from stages import promote
    from stages.lib.params import config_from, load_params
    from stages.lib.tracking import mlflow_run

    config = config_from(promote.PromoteConfig, load_params(args.params).get("promote"))
    with mlflow_run("promote-cli", tags={"rlhf.promote_run_id": args.run_id, "rlhf.forced": str(args.force)}):
        result = promote.promote_run(args.run_id, args.force, config)
    if not result["promoted"]:
        print(
            f"not promoted: version {result['version']} fails: {'; '.join(result['reasons'])} (use --force)",
            file=sys.stderr,
        )
        return ExitCode.GATE
    print(
        f"{config.registered_model} version {result['version']} is the champion"
        f"{' (unchanged)' if result.get('unchanged') else ''}"
    )
    return ExitCode.OK


def _cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a registered model against the SFT baseline on the held-out prompts."""
    from stages import evaluate

    judge = Path("artifacts/judge/model")  # the project's judge, when its judge stage has run
    extra = ["--judge", str(judge)] if (judge / "judge.json").exists() else []
    extra += ["--trust-model"] if args.trust_model else []
    return evaluate.main(["--params", args.params, "--model-uri", args.model_uri, "--out", args.out, *extra])


def _cmd_serve(args: argparse.Namespace) -> int:
    from prefect.settings import PREFECT_API_URL
    from prefect.types.entrypoint import EntrypointType

    from flows.pipeline import rlhf_pipeline

    if not PREFECT_API_URL.value():
        raise _Unavailable(
            "rlhf serve needs a Prefect server: run `prefect server start` and set PREFECT_API_URL "
            "(see rlhf serve --help)"
        )
    # The module path (not a file path) lets the served flow run from any project directory.
    parameters = {"project_dir": str(Path.cwd()), "runner": args.runner, "image": args.image, "gpus": args.gpus}
    rlhf_pipeline.serve(
        name=args.name, cron=args.cron, parameters=parameters, entrypoint_type=EntrypointType.MODULE_PATH
    )
    return ExitCode.OK


def _runner_options(p: argparse.ArgumentParser) -> None:
    from flows.runners import DEFAULT_IMAGE, RUNNERS

    p.add_argument(
        "--runner",
        choices=RUNNERS,
        default="local",
        help="local: stages run in this process (default); process: each stage in a process of its own; "
        "docker: each stage in its own container of --image, the project mounted at its own path "
        "(build the image with `make images`)",
    )
    p.add_argument(
        "--image", default=DEFAULT_IMAGE, help=f"the stage image for --runner docker (default: {DEFAULT_IMAGE})"
    )
    p.add_argument(
        "--gpus", metavar="GPUS", help="with --runner docker: `docker run --gpus` (e.g. all) for the CUDA image"
    )


def _params_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--params", default="params.yaml", help=f"the params file {what} (default: params.yaml)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="rlhf",
        epilog=QUICK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A reproducible RLHF pipeline: data validation, SFT, reward model, PPO, evaluation, promotion.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ArgumentParser)
    _pipeline_parsers(sub)
    _stack_parser(sub)
    _registry_parsers(sub)
    _data_parsers(sub)
    _label_parser(sub)
    return parser


LABEL_HELP = """\
A human labelling round in Label Studio (comparisons.labeler: human; docs/comparisons.md):
  rlhf run                 # the comparisons stage writes the round's tasks, then stops while they await labels
  rlhf label open          # the round's Label Studio project (created once, its tasks imported) and a sign-up link
  rlhf label status        # how many comparisons are labelled, of how many wanted
  rlhf label pull          # the annotations, as Label Studio's JSON export, into the round's labels file
  rlhf run                 # the stage closes the round (enough labels) and the reward model trains on them
Label Studio: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, else the stack's (`rlhf stack up --label-studio`).
The Prefect flow does open/pull itself, suspending between them (resume it in the Prefect UI).
"""


def _label_parser(sub: Any) -> None:
    p = sub.add_parser(
        "label",
        help="a human labelling round in Label Studio: open, status, pull",
        description=LABEL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=["open", "status", "pull"])
    p.add_argument(
        "--reports",
        help="the comparisons stage's --reports folder (default: the round waiting for labels, else "
        "reports/comparisons; round r's: reports/comparisons_r<r>)",
    )
    _params_option(p, "that names the labeler and the labels file")
    p.set_defaults(func=_cmd_label)


def _cmd_label(args: argparse.Namespace) -> int:
    from flows import labelling
    from stages.lib.params import load_params

    reports = args.reports or labelling.waiting_reports(Path.cwd())
    round_ = labelling.current_round(Path.cwd(), load_params(args.params), reports)
    if args.action == "open":
        print(f"{'opened' if round_.created else 'continuing'} the round: {round_.link}")
        print(f"a new annotator signs up at {round_.ls.invite_link()}")
    elif args.action == "pull":
        n = labelling.pull(round_.ls, round_.project, round_.labels)
        print(f"{n} annotations pulled into {round_.labels}")
    print(round_.status())
    return ExitCode.OK


def _pipeline_parsers(sub: Any) -> None:
    """run, serve."""
    p = sub.add_parser(
        "run",
        help="run the pipeline (through DVC: unchanged stages are skipped)",
        description=RUN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("stages", nargs="*", help="only these stages (and what they need); default: all")
    p.add_argument(
        "--prefect",
        action="store_true",
        help="run the Prefect flow (parent MLflow run, Prefect artifacts) instead of plain `dvc repro`",
    )
    p.add_argument(
        "--stack",
        action="store_true",
        help="run against the servers `rlhf stack up` started (their MLflow and Prefect URLs)",
    )
    p.add_argument("--stack-dir", help="the stack's folder, if not the default (implies --stack)")
    p.add_argument(
        "--profile",
        metavar="NAME",
        help="write profiles/NAME.yaml's values into params.yaml first (e.g. real: SmolLM2-135M-Instruct on "
        "dialogues; `make run-real`)",
    )
    _runner_options(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "serve",
        help="serve the pipeline flow on a cron schedule (needs a Prefect server)",
        description=SERVE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cron", default="0 3 * * *", help='when to run, a cron string in UTC (default: "0 3 * * *")')
    p.add_argument("--name", default="rlhf-nightly", help="the deployment name (default: rlhf-nightly)")
    _runner_options(p)
    p.set_defaults(func=_cmd_serve)


def _registry_parsers(sub: Any) -> None:
    """promote, eval: the MLflow Model Registry's side."""
    p = sub.add_parser("promote", help="promote the policy registered from an MLflow run (e.g. chosen in the UI)")
    p.add_argument("--run-id", required=True, help="the MLflow run that registered the version (the promote stage's)")
    p.add_argument("--force", action="store_true", help="promote even if the promotion criteria failed")
    _params_option(p, "whose promote section names the registered model")
    p.set_defaults(func=_cmd_promote)

    p = sub.add_parser("eval", help="evaluate a registered model against SFT on the held-out prompts")
    p.add_argument("--model-uri", required=True, help="e.g. models:/rlhf-policy@champion or models:/rlhf-policy/3")
    p.add_argument("--out", default="reports/eval", help="where the report goes (default: reports/eval)")
    p.add_argument(
        "--trust-model",
        action="store_true",
        help="evaluate a model this pipeline did not register (its safetensors HF folder; nothing is "
        "unpickled either way)",
    )
    _params_option(p, "whose evaluate section sets the sampling")
    p.set_defaults(func=_cmd_eval)


def _data_parsers(sub: Any) -> None:
    """validate, sync, make-data: the data and dvc.yaml's side."""
    p = sub.add_parser("validate", help="validate one data file and print the report the stage writes")
    p.add_argument(
        "file",
        help="a .jsonl, .jsonl.gz, .json, .parquet or .csv file, or a Hugging Face dataset id (owner/name[:split])",
    )
    p.add_argument("--kind", required=True, choices=["preferences", "sft", "prompts"], help="what the file holds")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "pairs", "hh", "messages"],
        help="pairs: prompt/chosen/rejected; hh: Anthropic HH transcripts; messages: role/content lists",
    )
    p.add_argument("--policy", choices=["fail", "quarantine"], help="override params.yaml validate.policy")
    p.add_argument(
        "--heldout",
        action="append",
        metavar="FILE",
        help="a held-out file whose prompts must not appear in FILE (repeatable)",
    )
    p.add_argument(
        "--report",
        metavar="DIR",
        help="write the stage's report files to DIR: report.md, summary.json, failed_rows.jsonl (every "
        "failing row) and data_docs/ (Great Expectations HTML); default: print only",
    )
    _params_option(p, "whose validate section sets the checks")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser(
        "sync",
        help="write dvc.yaml's deps: each stage's import closure and the data files params.yaml names "
        "(rlhf run does it first)",
    )
    p.add_argument(
        "--check", action="store_true", help="only say what is out of date (exit 3 if anything is, as a gate)"
    )
    p.set_defaults(func=_cmd_sync)

    p = sub.add_parser("make-data", help="generate the embedded default task (deterministic; matches data.dvc)")
    p.add_argument("--out", default="data", help="output folder (default: data); with --dialogues, a .jsonl file")
    p.add_argument(
        "--dialogues",
        type=int,
        metavar="N",
        help="write N multi-turn HH-RLHF preference pairs (long histories, a few broken rows) to --out: "
        "a real-shaped example of your own data",
    )
    p.add_argument(
        "--batch",
        type=int,
        metavar="K",
        help="write batch K of new labelled pairs (the task's labeler, training prompts) to "
        "data/incoming/batch-K.jsonl: a labelling team's delivery, which the next run picks up",
    )
    p.add_argument("--pairs", type=int, default=64, help="pairs in a --batch (default 64)")
    p.add_argument("--profile", metavar="NAME", help="the data profiles/NAME.yaml runs on (e.g. real)")
    _params_option(p, "whose task section defines the data")
    p.set_defaults(func=_cmd_make_data)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except StageStop as e:  # bad params or data, a missing service, a refused request: one line, its own code
        from stages.lib.escaping import printable

        print(f"error: {printable(e.reason)}", file=sys.stderr)  # reasons quote data and file names
        return e.code
    except ValueError as e:  # a plan the dvc.yaml cannot give (no such stage): the request is wrong
        print(f"error: {e}", file=sys.stderr)
        return ExitCode.USAGE


if __name__ == "__main__":
    raise SystemExit(main())
