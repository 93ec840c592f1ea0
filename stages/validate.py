"""Data validation: every dataset is read into the schema (stages.lib.formats) and checked with Great Expectations.

One ExpectationSuite per dataset kind; one ValidationDefinition and Checkpoint per dataset, whose results are
rendered as Data Docs into reports/validate/data_docs. Rows the loader could not read (bad JSON, bad UTF-8, wrong
types, broken messages) are merged into the same report as failed rows, under the check names they fail.

Policy: table-level failures (missing columns, row count) always fail. Row-level failures fail under policy "fail";
under "quarantine" the bad rows are set aside in quarantine.jsonl when they are at most `max_invalid_fraction` of
the rows, else the dataset fails. Of duplicate rows, the first occurrence is kept and later ones are failed.

Outputs (the data only when every dataset passed; the reports always, since they say why it failed):
    <out>/<dataset>.jsonl, <out>/quarantine.jsonl, <out>/metrics.json
    <reports>/report.md (format_report of each dataset), summary.json (every report), failed_rows.jsonl (every
    failing row), data_docs/
A validation stopped by anything else (a bad params value, an untracked data file, a crash) replaces report.md and
summary.json with that reason too, and removes the previous Data Docs: a previous run's "passed" never stays behind.
Row text reaches the Data Docs HTML escaped, and the terminal with control characters escaped (stages/lib/escaping.py).

    python -m stages.validate                                   # the stage: params.yaml `validate` + `data`
    python -m stages.validate --file F --kind K [--format X] [--reports DIR]
                                                                # one file; exit 0 on pass, 65 on failure
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from stages.lib import schema
from stages.lib.datadeps import uncovered
from stages.lib.environment import quiet
from stages.lib.escaping import html_text, printable
from stages.lib.formats import FORMATS_BY_KIND, DataError, Limits, Loaded, excerpt, load_dataset, row_label
from stages.lib.io import staged_dir, write_json, write_jsonl
from stages.lib.judge import JudgeConfig, resolve_kind
from stages.lib.outcome import ArgumentParser, BadInput, Busy, StageStop, stage_main
from stages.lib.params import (
    AT_LEAST_ONE,
    FRACTION,
    NON_NEGATIVE,
    PARAMS_FILE,
    PROJECT_PARAMS,
    ParamsError,
    config_from,
    load_params,
    one_of,
)
from stages.lib.splits import SplitConfig, derive
from stages.lib.tracking import mlflow_run

OUT_DIR = Path("artifacts/validate/data")  # where stages/sft.py and stages/reward.py read the datasets
REPORT_DIR = Path("reports/validate")
DOCS_SITE = "rlhf_validation"


@dataclass(frozen=True)
class ValidateConfig:
    policy: str  # "fail": any bad row fails; "quarantine": set bad rows aside (within the fraction)
    max_invalid_fraction: float  # quarantine at most this fraction of a dataset's rows, else fail
    min_rows: int  # fewest readable rows a dataset may have
    max_rows: int  # most rows a dataset may have: reading stops past it
    max_file_bytes: int  # largest file, and largest content once decompressed: reading stops past it
    max_row_bytes: int  # longest row (a line of .jsonl or .csv, the text of a record): quarantined
    min_chars: int  # shortest text (after stripping; for prompts, the last user turn)
    max_prompt_chars: int  # longest rendered prompt
    max_response_chars: int  # longest chosen/rejected/response
    report_examples: int  # example rows shown per failed check
    unique_kinds: tuple[str, ...]  # kinds whose repeated rows are failed after the first
    split: SplitConfig  # datasets derived when `data` names only some

    SECTION: ClassVar[str] = "validate"
    RANGES: ClassVar[dict] = {
        "policy": one_of("fail", "quarantine"),
        "max_invalid_fraction": FRACTION,
        "min_rows": NON_NEGATIVE,
        "max_rows": AT_LEAST_ONE,
        "max_file_bytes": AT_LEAST_ONE,
        "max_row_bytes": AT_LEAST_ONE,
        "min_chars": NON_NEGATIVE,
        "max_prompt_chars": AT_LEAST_ONE,
        "max_response_chars": AT_LEAST_ONE,
        "report_examples": NON_NEGATIVE,
        "unique_kinds": one_of(*schema.KINDS),
    }

    @property
    def limits(self) -> Limits:
        """How much of a file is read (stages.lib.formats)."""
        return Limits(self.max_rows, self.max_file_bytes, self.max_row_bytes)


@dataclass(frozen=True)
class DatasetSpec:
    path: str  # a file or a Hugging Face dataset name (see stages.lib.formats)
    kind: str  # preferences | sft | prompts
    format: str = "auto"  # auto | pairs | hh | messages | sft | prompts
    heldout: bool = False  # a test set: its prompts must not appear in any training dataset
    drops: str = ""  # a folder of further batches of this dataset (e.g. new labelled pairs): each file checked on its
    # own as dataset `<name>/<file>`, its valid rows joined to the dataset; a missing folder is no batches yet

    RANGES: ClassVar[dict] = {
        "kind": one_of(*schema.KINDS),
        "format": one_of("auto", *sorted({f for fs in FORMATS_BY_KIND.values() for f in fs})),
    }


@dataclass
class Report:
    dataset: str
    path: str
    kind: str
    source_format: str
    n_rows: int  # rows in the source, readable or not
    n_valid: int  # rows that passed every check
    n_quarantined: int  # rows set aside (only when the dataset passed under policy "quarantine")
    checks: list[dict[str, Any]]  # name, level, success, unexpected_count, description, details, examples
    passed: bool
    reason: str


class ValidationFailed(BadInput):
    """One or more datasets failed; `reason` says which in one line, `details` names each failed check with counts
    and example rows."""

    def __init__(self, reports: list[Report]) -> None:
        self.reports = reports
        failed = [r for r in reports if not r.passed]
        self.details = "\n\n".join(format_report(r) for r in failed)
        super().__init__("validation failed: " + "; ".join(f"{r.dataset} ({r.path}): {r.reason}" for r in failed))


@dataclass(frozen=True)
class _Check:
    name: str
    level: str  # "table": fails the dataset; "row": fails (or quarantines) the rows it names
    description: str  # what a failing row is, as a sentence fragment
    expectation: Any  # a great_expectations Expectation


# ---------------------------------------------------------------------------------------------------------------
# Great Expectations: a context, one suite per kind, one checkpoint per dataset
# ---------------------------------------------------------------------------------------------------------------


def gx_context(docs_dir: Path | None = None) -> Any:
    """An in-memory GX context; with `docs_dir`, checkpoints render Data Docs HTML there."""
    quiet()
    import great_expectations as gx  # slow to import (~3 s): only when validating, so `rlhf --help` stays fast
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if docs_dir is not None:
        sites[DOCS_SITE] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _check(name: str, level: str, description: str, expectation: type, **kwargs: Any) -> _Check:
    return _Check(name, level, description, expectation(**kwargs, meta={"check": name}))


def _column_checks(c: str, config: ValidateConfig) -> list[_Check]:
    """The row checks of one text column: a non-blank string within the length limits."""
    import great_expectations.expectations as gxe

    # The prompt is rendered ("\n\nHuman: ...\n\nAssistant:"), so emptiness is judged on its last user turn.
    content = "prompt_text" if c == "prompt" else c
    longest = config.max_prompt_chars if c == "prompt" else config.max_response_chars
    checks = [
        _check(
            f"is_string({c})", "row", f"'{c}' is not a string", gxe.ExpectColumnValuesToBeOfType, column=c, type_="str"
        ),
        _check(f"not_null({c})", "row", f"'{c}' is null", gxe.ExpectColumnValuesToNotBeNull, column=c),
        _check(
            f"not_blank({c})",
            "row",
            f"'{c}' is empty or whitespace only",
            gxe.ExpectColumnValuesToMatchRegex,
            column=content,
            regex=r"\S",
        ),
        _check(
            f"max_length({c})",
            "row",
            f"'{c}' is longer than {longest} characters",
            gxe.ExpectColumnValueLengthsToBeBetween,
            column=c,
            max_value=longest,
        ),
    ]
    if config.min_chars > 1:  # a minimum of 1 is exactly what not_blank checks
        checks.append(
            _check(
                f"min_length({c})",
                "row",
                f"'{c}' is shorter than {config.min_chars} characters",
                gxe.ExpectColumnValueLengthsToBeBetween,
                column=content,
                min_value=config.min_chars,
            )
        )
    return checks


def _checks(kind: str, config: ValidateConfig, heldout_prompts: frozenset[str]) -> list[_Check]:
    """The suite of a dataset kind (plus the held-out leak check for training data)."""
    import great_expectations.expectations as gxe

    cols = list(schema.columns(kind))
    checks = [
        _check(f"column_exists({c})", "table", f"column '{c}' is missing", gxe.ExpectColumnToExist, column=c)
        for c in cols
    ]
    rows = f"row count must be between {config.min_rows} and {config.max_rows}"
    bounds = {"min_value": config.min_rows, "max_value": config.max_rows}
    checks.append(_check("row_count", "table", rows, gxe.ExpectTableRowCountToBeBetween, **bounds))
    for c in cols:
        checks += _column_checks(c, config)
    if kind == "preferences":
        same = "chosen and rejected are identical"
        checks.append(
            _check(
                "chosen_differs",
                "row",
                same,
                gxe.ExpectColumnValuesToBeInSet,
                column="chosen_differs",
                value_set=[True],
            )
        )
    duplicate = f"duplicate of an earlier row (same {'/'.join(cols)})"
    if kind in config.unique_kinds and len(cols) > 1:
        checks.append(_check("no_duplicates", "row", duplicate, gxe.ExpectCompoundColumnsToBeUnique, column_list=cols))
    elif kind in config.unique_kinds:  # prompts: repeats are usually intended (a sampling distribution), so opt-in
        checks.append(_check("no_duplicates", "row", duplicate, gxe.ExpectColumnValuesToBeUnique, column=cols[0]))
    if heldout_prompts:
        leak = "prompt also appears in a held-out dataset"
        checks.append(
            _check(
                "no_heldout_leak",
                "row",
                leak,
                gxe.ExpectColumnValuesToNotBeInSet,
                column="prompt",
                value_set=sorted(heldout_prompts),
            )
        )
    return checks


def _run_checkpoint(context: Any, name: str, kind: str, checks: list[_Check], frame: pd.DataFrame) -> dict[str, Any]:
    """Run the suite on `frame`; {check name: GX ExpectationValidationResult}."""
    import great_expectations as gx

    sources = context.data_sources.all()
    source = sources["rlhf"] if "rlhf" in sources else context.data_sources.add_pandas("rlhf")
    asset_name = re.sub(r"[^\w.-]", "_", name)
    if asset_name in source.get_asset_names():
        source.delete_asset(asset_name)
    batch = source.add_dataframe_asset(asset_name).add_batch_definition_whole_dataframe("whole")
    # training data carries the extra held-out leak check, so it gets its own suite
    suite_name = f"{kind}_train_suite" if any(c.name == "no_heldout_leak" for c in checks) else f"{kind}_suite"
    suite = context.suites.add_or_update(
        gx.ExpectationSuite(name=suite_name, expectations=[c.expectation for c in checks])
    )
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=asset_name, data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add_or_update(
        gx.Checkpoint(
            name=f"validate_{asset_name}",
            validation_definitions=[definition],
            # COMPLETE + source_row: every failing row comes back with its position in the user's file
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["source_row"]},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    ((identifier, validation),) = result.run_results.items()
    if sites := list(context.list_data_docs_sites()):
        _render_docs(context, sites, identifier, validation)
    return {r.expectation_config.meta["check"]: r for r in validation.results}


def _docs_safe(value: Any) -> Any:
    """Every string in a check's result, HTML-escaped and shortened (html_text); numbers and structure kept."""
    if isinstance(value, str):
        return html_text(value)
    if isinstance(value, dict):
        return {k: _docs_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_docs_safe(v) for v in value]
    return value


def _render_docs(context: Any, sites: list[str], identifier: Any, validation: Any) -> None:
    """Data Docs for one validation, rendered from escaped row values. GX writes the values a check found (its
    "unexpected" tables, observed values) into the HTML as they are, so a row holding `</td><script>` would run in
    the page of whoever opens the report (it is logged to MLflow too); the expectations' own parameters already go
    through its escaping templates. The store holds a serialised copy, so the results are swapped only for `set`."""
    from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier

    raw = [r.result for r in validation.results]
    try:
        for r in validation.results:
            r.result = _docs_safe(r.result)
        context.validation_results_store.set(identifier, validation)
    finally:
        for r, result in zip(validation.results, raw, strict=True):
            r.result = result
    context.build_data_docs(
        site_names=sites, resource_identifiers=[identifier, ExpectationSuiteIdentifier(name=validation.suite_name)]
    )


# ---------------------------------------------------------------------------------------------------------------
# Validating one dataset
# ---------------------------------------------------------------------------------------------------------------


def _failed_rows(check: _Check, result: Any) -> list[int]:
    """Source rows a row-level check failed; of duplicates, all but the first occurrence."""
    index = result.result.get("unexpected_index_list") or []
    if check.name != "no_duplicates":
        return sorted({int(d["source_row"]) for d in index})
    groups: dict[tuple, list[int]] = defaultdict(list)
    for d in index:
        groups[tuple(str(v) for k, v in sorted(d.items()) if k != "source_row")].append(int(d["source_row"]))
    return sorted(r for rows in groups.values() for r in sorted(rows)[1:])


def verdict(
    config: ValidateConfig, n_rows: int, n_bad: int, n_valid: int, table_failures: list[str]
) -> tuple[bool, str]:
    """The gate: (passed, the sentence saying why). Table-level failures always fail; bad rows fail under policy
    "fail", and under "quarantine" when they exceed max_invalid_fraction or leave fewer than min_rows."""
    fraction = n_bad / n_rows if n_rows else 0.0
    limit = config.max_invalid_fraction
    if table_failures:
        return False, f"dataset-level check(s) failed: {', '.join(table_failures)}"
    if n_bad == 0:
        return True, "all checks passed"
    if config.policy == "fail":
        return False, f"{n_bad} of {n_rows} rows failed checks and the policy is 'fail'"
    if fraction > limit:
        return False, (
            f"{n_bad} of {n_rows} rows ({fraction:.1%}) failed checks, more than max_invalid_fraction "
            f"{limit:.1%}; fix the data or raise the limit"
        )
    if n_valid < config.min_rows:
        return False, f"only {n_valid} valid rows remain after quarantine, fewer than min_rows {config.min_rows}"
    return True, f"{n_bad} of {n_rows} rows ({fraction:.1%}) quarantined, within max_invalid_fraction {limit:.1%}"


@dataclass
class _Failures:
    """What failed, per check (the report's entries) and per source row (the quarantine's reasons and excerpts)."""

    path: str
    max_examples: int
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # check name -> its report entry
    reasons: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))  # row -> "check: reason"
    excerpts: dict[int, str] = field(default_factory=dict)

    def entry(self, check_name: str, level: str, description: str) -> dict[str, Any]:
        blank = {"name": check_name, "level": level, "success": True, "unexpected_count": 0}
        return self.entries.setdefault(check_name, blank | {"description": description, "details": "", "examples": []})

    def fail_row(self, e: dict[str, Any], row: int, reason: str, raw: str) -> None:
        e["success"] = False
        e["unexpected_count"] += 1
        self.reasons[row].append(f"{e['name']}: {reason}")
        self.excerpts.setdefault(row, raw)
        if len(e["examples"]) < self.max_examples:
            where = row_label(self.path, row)
            e["examples"].append({"source_row": row, "where": where, "reason": reason, "excerpt": raw})

    def fail_table(self, e: dict[str, Any], details: str) -> None:
        e.update(success=False, level="table", details=details)


def _collect(
    loaded: Loaded, kind: str, checks: list[_Check], results: dict[str, Any], config: ValidateConfig
) -> _Failures:
    """Failures per check and per row; rows the loader could not read count as failures of the check they break
    (valid_utf8, valid_json, is_string(chosen), ...)."""
    failures = _Failures(loaded.path, config.report_examples)
    failures.entry("valid_utf8", "row", "not valid UTF-8")
    for err in loaded.row_errors:
        failures.fail_row(failures.entry(err.check, "row", "row could not be read"), err.row, err.reason, err.excerpt)
    cols = list(schema.columns(kind))
    by_row = loaded.rows.set_index("source_row", drop=False)
    for check in checks:
        result, e = results[check.name], failures.entry(check.name, check.level, check.description)
        if result.exception_info.get("raised_exception"):
            failures.fail_table(e, f"check raised: {result.exception_info.get('exception_message')}")
        elif not result.success:
            failed = _failed_rows(check, result) if check.level == "row" else []
            if not failed:  # a table-level check, or a row check GX could only judge for the whole column
                observed = result.result.get("observed_value")
                failures.fail_table(e, check.description + (f" (observed: {observed})" if observed is not None else ""))
            for row in failed:
                failures.fail_row(e, row, check.description, excerpt({c: by_row.at[row, c] for c in cols}))
    return failures


def validate_frame(
    loaded: Loaded,
    kind: str,
    config: ValidateConfig,
    heldout_prompts: frozenset[str] | set[str] = frozenset(),
    name: str = "dataset",
    context: Any = None,
) -> tuple[Report, pd.DataFrame, list[dict[str, Any]]]:
    """Check one loaded dataset: (report, rows that passed every check, one entry per failed row).

    The failed-row entries (dataset, source_row, reasons, excerpt) are what quarantine.jsonl holds when the report
    passed. Pass one `context` (see gx_context) to collect several datasets into one Data Docs site.
    """
    rows = loaded.rows
    # 1. run the suite on the rows plus the derived columns some checks read
    frame = rows.copy()
    frame["prompt_text"] = frame["prompt"].map(schema.last_user_turn)
    if kind == "preferences":
        frame["chosen_differs"] = (frame["chosen"] != frame["rejected"]).astype(bool)
    checks = _checks(kind, config, frozenset(heldout_prompts))
    results = _run_checkpoint(context or gx_context(), name, kind, checks, frame)
    # 2. collect failures per check and per row
    failures = _collect(loaded, kind, checks, results, config)
    # 3. the gate
    reasons = failures.reasons
    valid = rows[~rows["source_row"].isin(list(reasons))].reset_index(drop=True)
    n_rows = len(rows) + len(loaded.row_errors)
    table_failures = [e["name"] for e in failures.entries.values() if not e["success"] and e["level"] == "table"]
    passed, reason = verdict(config, n_rows, len(reasons), len(valid), table_failures)
    report = Report(
        dataset=printable(name),
        path=printable(loaded.path),
        kind=kind,
        source_format=loaded.source_format,
        n_rows=n_rows,
        n_valid=len(valid),
        n_quarantined=len(reasons) if passed else 0,
        checks=list(failures.entries.values()),
        passed=passed,
        reason=reason,
    )
    failed_rows = [
        {"dataset": name, "source_row": row, "reasons": reasons[row], "excerpt": failures.excerpts[row]}
        for row in sorted(reasons)
    ]
    return report, valid, failed_rows


def validate_file(
    path: str | Path,
    kind: str,
    fmt: str = "auto",
    *,
    config: ValidateConfig,
    heldout_prompts: frozenset[str] | set[str] = frozenset(),
    report_dir: Path | None = None,
) -> Report:
    """Load and check one file (what `rlhf validate FILE` runs); DataError if it cannot be read at all.

    A failed check does not raise: `report.passed` says, and format_report(report) says why. With `report_dir`, the
    files the stage writes are written there as well (report.md, summary.json, failed_rows.jsonl with every failing
    row, data_docs/), replacing a previous run's; a file that cannot be read leaves its failure there.
    """
    docs_dir = None if report_dir is None else Path(report_dir) / "data_docs"
    if docs_dir is not None:
        shutil.rmtree(docs_dir, ignore_errors=True)  # the site index would otherwise list a previous run's pages
    try:
        loaded = load_dataset(path, kind, fmt, config.limits)
        report, _, failed = validate_frame(
            loaded, kind, config, heldout_prompts, Path(str(path)).name, gx_context(docs_dir)
        )
    except Exception as e:
        if report_dir is not None:
            write_failure(Path(report_dir), e)
        raise
    if report_dir is not None:
        write_reports(Path(report_dir), [report], failed)
    return report


def load_prompts(path: str | Path, fmt: str = "auto", limits: Limits = Limits()) -> list[str]:  # noqa: B008
    """The rendered prompts of a dataset of any kind (for a held-out set given on the command line)."""
    error: DataError | None = None
    for kind in ("preferences", "sft", "prompts"):  # most specific first: a prompts file also "fits" sft's prompt
        try:
            return list(
                load_dataset(path, kind, fmt if fmt in FORMATS_BY_KIND[kind] else "auto", limits).rows["prompt"]
            )
        except DataError as e:
            error = e
    assert error is not None
    raise error


def format_report(report: Report) -> str:
    """The human-readable report of one dataset: verdict, counts, each failed check with example rows. Every line is
    printable (stages/lib/escaping.py): row text and file names come from strangers and go to terminals."""
    lines = [
        f"Dataset '{report.dataset}' ({report.path}; kind {report.kind}, format {report.source_format}): "
        + ("PASSED" if report.passed else "FAILED"),
        f"  rows: {report.n_rows} read, {report.n_valid} valid, {report.n_quarantined} quarantined",
        f"  {'note' if report.passed else 'reason'}: {report.reason}",
    ]
    failed = [c for c in report.checks if not c["success"]]
    if failed:
        lines.append("  failed checks:")
    for c in failed:
        if c["level"] == "table":
            lines.append(f"    - {c['name']}: {c['details'] or c['description']}")
            continue
        lines.append(f"    - {c['name']}: {c['unexpected_count']} row(s)")
        for ex in c["examples"]:
            lines.append(f"        {ex['where']}: {ex['reason']}: {ex['excerpt']}")
        if c["unexpected_count"] > len(c["examples"]):
            lines.append(f"        ... and {c['unexpected_count'] - len(c['examples'])} more")
    passed = [c["name"] for c in report.checks if c["success"]]
    lines.append(f"  passed checks ({len(passed)}): {', '.join(passed)}")
    return "\n".join(printable(line) for line in lines)


def _unreadable(name: str, spec: DatasetSpec, error: DataError) -> Report:
    check = {
        "name": "readable_file",
        "level": "table",
        "success": False,
        "unexpected_count": 0,
        "description": "the file could not be read",
        "details": str(error),
        "examples": [],
    }
    return Report(name, printable(spec.path), spec.kind, spec.format, 0, 0, 0, [check], False, str(error))


def _reason(error: BaseException) -> str:
    return error.reason if isinstance(error, StageStop) else f"{type(error).__name__}: {error}".splitlines()[0]


def write_reports(report_dir: Path, reports: list[Report], failed_rows: list[dict[str, Any]], error: str = "") -> None:
    """report.md, summary.json and failed_rows.jsonl (every failing row) of one validation, replacing a previous
    run's. `error`: the validation failed after the datasets were judged (e.g. deriving the splits)."""
    passed = not error and all(r.passed for r in reports)
    summary: dict[str, Any] = {"passed": passed, "datasets": {r.dataset: asdict(r) for r in reports}}
    text = "\n\n".join(format_report(r) for r in reports)
    if error:
        summary["error"] = error
        text = f"Validation FAILED: {printable(error)}\n\n{text}".rstrip()
    write_json(report_dir / "summary.json", summary)
    (report_dir / "report.md").write_text(text + "\n", encoding="utf-8")
    write_jsonl(report_dir / "failed_rows.jsonl", failed_rows)


def write_failure(report_dir: Path, error: BaseException | str) -> None:
    """A validation that could not judge the data (bad params, an unreadable file, a crash): its reports say so,
    replacing a previous run's (which may have passed), and a previous run's Data Docs go."""
    shutil.rmtree(report_dir / "data_docs", ignore_errors=True)
    write_reports(report_dir, [], [], error if isinstance(error, str) else _reason(error))


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------


DROP_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".csv")


def expand_drops(datasets: dict[str, DatasetSpec], root: Path) -> dict[str, DatasetSpec]:
    """Each dataset followed by the files of its `drops` folder (sorted by name), one dataset per file named
    `<dataset>/<file>`, so that each batch is validated and reported on its own and a bad row names its file."""
    out: dict[str, DatasetSpec] = {}
    for name, spec in datasets.items():
        out[name] = spec
        if not spec.drops:
            continue
        folder = root / spec.drops
        if folder.exists() and not folder.is_dir():
            raise BadInput(f"data.{name}.drops = {spec.drops!r} is a file: it names a folder of batches")
        for f in _batches(folder):
            path = f.relative_to(root) if f.is_relative_to(root) else f
            out[f"{name}/{f.relative_to(folder)}"] = replace(spec, path=str(path), drops="")
    return out


def _batches(folder: Path) -> list[Path]:
    """The batch files of a drops folder, sorted by name (none while nothing was delivered)."""
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.name.lower().endswith(DROP_SUFFIXES))


def drops_listing(datasets: dict[str, DatasetSpec], root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file in the drops folders, by the path expand_drops gives its batch."""
    listing = {}
    for spec in datasets.values():
        for f in _batches(root / spec.drops) if spec.drops else []:
            st = f.stat()
            listing[str(f.relative_to(root) if f.is_relative_to(root) else f)] = (st.st_size, st.st_mtime_ns)
    return listing


def drops_changed(datasets: dict[str, DatasetSpec], root: Path, before: dict[str, tuple[int, int]]) -> str | None:
    """What changed in the drops folders since `before`, or since expand_drops listed the batches (a delivery that
    landed, grew or went while validation read the folder); None if nothing did."""
    now = drops_listing(datasets, root)
    read = {spec.path for name, spec in datasets.items() if batch_of(name, datasets)}
    new = sorted(set(now) - read)
    grew = sorted(p for p in set(now) & set(before) if now[p] != before[p])
    gone = sorted(read - set(now))
    if not (new or grew or gone):
        return None
    said = [f"{what}: {', '.join(paths[:5])}{' ...' if len(paths) > 5 else ''}"
            for what, paths in (("new", new), ("changed", grew), ("gone", gone)) if paths]  # fmt: skip
    return (f"a batch folder changed while validation read it ({'; '.join(said)}): nothing was written; run "
            "again once the delivery is complete (deliver a batch atomically: write, then move it in)")  # fmt: skip


def batch_of(name: str, datasets: dict[str, DatasetSpec]) -> str | None:
    """The dataset a batch `<dataset>/<file>` of expand_drops joins; None for a dataset params.yaml names."""
    base = name.split("/", 1)[0]
    return base if "/" in name and base != name and base in datasets and datasets[base].drops else None


def join_drops(
    frames: dict[str, pd.DataFrame], datasets: dict[str, DatasetSpec], config: ValidateConfig
) -> dict[str, dict[str, int]]:
    """Join each batch's valid rows to its dataset (in `frames`, in place); a row already in the dataset or an earlier
    batch is dropped (a batch delivered twice adds nothing). Returns, per dataset with batches, the counts."""
    joined: dict[str, dict[str, int]] = {}
    for name, spec in datasets.items():
        into = batch_of(name, datasets)
        if into is None or name not in frames or into not in frames:
            continue
        counts = joined.setdefault(into, {"n_batches": 0, "n_from_batches": 0, "n_repeats_dropped": 0})
        both = pd.concat([frames[into], frames.pop(name)], ignore_index=True)
        kept = both.drop_duplicates() if spec.kind in config.unique_kinds else both
        counts["n_batches"] += 1
        counts["n_from_batches"] += len(kept) - len(frames[into])
        counts["n_repeats_dropped"] += len(both) - len(kept)
        frames[into] = kept.reset_index(drop=True)
    return joined


def check_datasets(
    config: ValidateConfig, datasets: dict[str, DatasetSpec], docs_dir: Path
) -> tuple[list[Report], dict[str, pd.DataFrame], list[dict[str, Any]]]:
    """Load and check every dataset: (reports in `datasets` order, the valid rows of each, every failed row). An
    unreadable file becomes a failed report, so the other datasets are still checked."""
    shutil.rmtree(docs_dir, ignore_errors=True)  # the site index would otherwise list a previous run's pages
    context = gx_context(docs_dir)
    reports: dict[str, Report] = {}
    loaded: dict[str, Loaded] = {}
    for name, spec in datasets.items():
        try:
            loaded[name] = load_dataset(spec.path, spec.kind, spec.format, config.limits)
        except DataError as e:
            reports[name] = _unreadable(name, spec, e)

    # the prompts of every held-out dataset must not appear in any training dataset
    heldout = frozenset(p for n, data in loaded.items() if datasets[n].heldout for p in data.rows["prompt"])
    valid: dict[str, pd.DataFrame] = {}
    failed_rows: list[dict[str, Any]] = []
    for name, data in loaded.items():
        spec = datasets[name]
        leak_set = frozenset() if spec.heldout else heldout
        reports[name], valid[name], bad = validate_frame(data, spec.kind, config, leak_set, name, context)
        failed_rows += bad
    return [reports[name] for name in datasets], valid, failed_rows


def run(
    config: ValidateConfig,
    datasets: dict[str, DatasetSpec],
    out_dir: Path,
    report_dir: Path,
    metrics_file: Path | None = None,
    *,
    judge: JudgeConfig,
) -> dict[str, Any]:
    """Validate every dataset, then derive the ones not given (stages/lib/splits.py); write the datasets only if all
    passed, and the reports always: they say why it failed, whatever the reason (a failed check, an unreadable file,
    a crash), and never leave a previous run's verdict standing."""
    out_dir, report_dir = Path(out_dir), Path(report_dir)
    before = drops_listing(datasets, Path.cwd())
    try:
        ordered, valid, failed_rows = check_datasets(config, datasets, report_dir / "data_docs")
        if changed := drops_changed(datasets, Path.cwd(), before):  # a half-written batch must not count as read
            raise Busy(changed)
    except BaseException as e:
        write_failure(report_dir, e)
        raise
    write_reports(report_dir, ordered, failed_rows)
    if not all(r.passed for r in ordered):
        raise ValidationFailed(ordered)
    try:
        return _publish(config, datasets, ordered, valid, failed_rows, out_dir, report_dir, metrics_file, judge)
    except BaseException as e:
        write_reports(report_dir, ordered, failed_rows, _reason(e))
        raise


def _publish(
    config: ValidateConfig,
    datasets: dict[str, DatasetSpec],
    ordered: list[Report],
    valid: dict[str, pd.DataFrame],
    failed_rows: list[dict[str, Any]],
    out_dir: Path,
    report_dir: Path,
    metrics_file: Path | None,
    judge_config: JudgeConfig,
) -> dict[str, Any]:
    """Derive the datasets not given, by prompt from the preference pairs (the judge's pairs set aside if it is a
    reward model: it must not be trained on what the reward model learns from), then swap the data in complete."""
    frames = {name: rows[list(schema.columns(datasets[name].kind))] for name, rows in valid.items()}
    joined = join_drops(frames, datasets, config)
    pref_prompts = list(frames["preferences"]["prompt"]) if "preferences" in frames else []
    judge_kind = resolve_kind(judge_config, pref_prompts)
    frames, derived = derive(
        frames,
        config.split,
        judge_config.fraction if judge_kind == "reward_model" else None,
        judge_config.seed,
    )
    with (report_dir / "report.md").open("a", encoding="utf-8") as f:
        f.write("".join(f"\nDataset '{n}' derived: {len(frames[n])} rows, {how}\n" for n, how in derived.items()))

    metrics = {
        r.dataset: {"n_rows": r.n_rows, "n_valid": r.n_valid, "n_quarantined": r.n_quarantined, "passed": r.passed}
        for r in ordered
    }
    metrics |= {n: {"n_rows": len(frames[n]), "derived": True} for n in derived}
    for name, counts in joined.items():
        metrics[name] |= counts | {"n_joined": len(frames[name])}
    with staged_dir(out_dir) as tmp:
        for name, rows in frames.items():
            write_jsonl(tmp / f"{name}.jsonl", rows.to_dict("records"))
        write_jsonl(tmp / "quarantine.jsonl", failed_rows)
        write_json(tmp / "derived.json", {"judge": judge_kind, "derived": derived})
    write_json(
        metrics_file or out_dir.parent / "metrics.json", metrics
    )  # beside the data: DVC metrics can't overlap outs
    return {
        "metrics": metrics,
        "outputs": {name: str(out_dir / f"{name}.jsonl") for name in frames},
        "quarantine": str(out_dir / "quarantine.jsonl"),
        "report": str(report_dir / "report.md"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m stages.validate", description=__doc__.splitlines()[0])
    parser.add_argument("--file", help="validate this one file instead of the datasets in params.yaml")
    parser.add_argument("--kind", choices=list(schema.KINDS), help="dataset kind of --file")
    parser.add_argument("--format", default="auto", help="format of --file (default: auto)")
    parser.add_argument("--params", default=str(PARAMS_FILE), help="params file (default: params.yaml)")
    parser.add_argument(
        "--data",
        action="append",
        metavar="PATH",
        help="a data file or folder this run may read (repeatable; dvc.yaml passes each, `rlhf sync` writes them): "
        "a file of params.yaml's data outside every --data is refused, as DVC would not see it change",
    )
    parser.add_argument("--out", default=str(OUT_DIR), help=f"validated datasets (default: {OUT_DIR})")
    parser.add_argument(
        "--reports", help=f"reports and Data Docs (default: {REPORT_DIR}; with --file, none unless given)"
    )
    parser.add_argument("--metrics", default=str(OUT_DIR.parent / "metrics.json"), help="row counts per dataset")
    args = parser.parse_args(argv)
    if args.file and not args.kind:
        parser.error("--kind is required with --file")
    reports = Path(args.reports) if args.reports else None if args.file else REPORT_DIR
    try:  # what stops validation before any data is judged still replaces the reports: they say why
        # a single file can be checked outside a project, with this project's own params
        outside = args.file and not Path(args.params).exists()
        params = load_params(PROJECT_PARAMS if outside else args.params)
        config = config_from(ValidateConfig, params.get("validate"))
        if not args.file:
            data = params.get("data") or {}
            if not isinstance(data, dict):
                raise ParamsError(f"data = {str(data)[:60]!r}: expected a mapping of dataset names to path and kind")
            datasets = {name: config_from(DatasetSpec, spec, at=f"data.{name}") for name, spec in data.items()}
            datasets = expand_drops(datasets, Path.cwd())
            check_tracked(data, args.data)
            judge = config_from(JudgeConfig, params.get("judge"))
    except Exception as e:
        if reports is not None:
            write_failure(reports, e)
        raise
    try:
        if args.file:
            report = validate_file(args.file, args.kind, args.format, config=config, report_dir=reports)
            if not report.passed:
                raise ValidationFailed([report])
            print(format_report(report))
            return 0
        result = run_tracked(config, datasets, Path(args.out), reports, Path(args.metrics), judge)
    except ValidationFailed as e:
        print(e.details, file=sys.stderr)
        raise
    print(Path(result["report"]).read_text(encoding="utf-8"), end="")
    return 0


def check_tracked(data: dict[str, Any], named: list[str] | None) -> None:
    """Every local data file of params.yaml must be under a `--data` path of this run, which dvc.yaml's command
    passes and so hashes (stages/lib/datadeps.py). Without --data (a run by hand), nothing is checked."""
    missing = uncovered(data, named, Path.cwd()) if named is not None else []
    if missing:
        raise BadInput(
            f"params.yaml data names {', '.join(missing)}, which the validate stage's command does not pass "
            "(--data), so DVC would not see it change: run `rlhf sync` (or `rlhf run`, which syncs first)"
        )


def run_tracked(
    config: ValidateConfig,
    datasets: dict[str, DatasetSpec],
    out: Path,
    reports: Path,
    metrics: Path,
    judge: JudgeConfig,
) -> dict[str, Any]:
    """`run` inside this stage's MLflow run: params, the verdict as tags, the reports and Data Docs as artifacts."""
    with mlflow_run("validate") as tracker:
        given = {n: asdict(d) for n, d in datasets.items() if not batch_of(n, datasets)}  # a batch's are metrics
        tracker.log_params({"validate": asdict(config), "data": given})
        try:
            result = run(config, datasets, out, reports, metrics, judge=judge)
        except ValidationFailed as e:
            tracker.set_tags({"rlhf.gate": "failed", "rlhf.gate_reason": e.reason[:500]})
            raise
        finally:
            for name in ("report.md", "summary.json", "data_docs"):
                if (reports / name).exists():
                    tracker.log_artifact(reports / name, "data_docs" if name == "data_docs" else None)
        tracker.set_tags({"rlhf.gate": "passed"})
        tracker.log_metrics({f"{d}/{k}": v for d, m in result["metrics"].items() for k, v in m.items()})
        tracker.set_tags({"rlhf.judge_kind": json.loads((out / "derived.json").read_text())["judge"]})
    return result


if __name__ == "__main__":
    raise SystemExit(stage_main("validate", main))
