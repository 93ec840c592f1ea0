"""`rlhf sync`: what dvc.yaml says that follows from the code and params.yaml, written by a command, never by hand.

dvc.yaml is the one home of each stage's command, params and outputs. From those and the code, this writes:
- every stage's `deps`: each path its command reads (an `--option path` that is not an output), then every project
  file it runs: its import closure (read with `ast`: its imports, theirs, the packages' `__init__` files, and a sibling
  file a module names with `Path(__file__).with_name(...)`), so editing any of them makes `dvc status` name the stage;
- the paths a stage takes from params.yaml, as options of its command (hence deps DVC hashes): the validate stage's
  `--data` (`data`, the embedded default task tracked by data.dvc, and each local file params.yaml's `data` names
  outside it; the stage refuses a data file its command does not name) and the comparisons stage's `--labels` (the
  labels file a person returned, when `comparisons.labeler` is file).

`rlhf run` syncs before it runs; `rlhf sync --check` lists what is out of date and writes nothing;
tests/test_contracts.py checks that the committed dvc.yaml is in sync. On an unchanged tree the output is byte for
byte the file that is there.
"""

from __future__ import annotations

import ast
import io
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

from stages.lib.datadeps import DEFAULT_DATA, uncovered

OUTPUT_OPTIONS = ("--out", "--metrics", "--reports")  # what a stage writes; every other path option is an input
NOT_TRACKED = ("--reports",)  # written also when the stage fails (they say why), so not a DVC output
NOT_PATHS = ("--round",)  # options whose value is not a path (which round of comparisons a stage runs)
PACKAGES = ("stages", "flows")
WIDTH = 4096  # a command stays on one line (a folded plain scalar would split options from their values)


def _module_file(module: str, root: Path) -> Path | None:
    base = root / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _runs(path: Path, root: Path) -> set[str]:
    """The project modules `path` imports (absolute imports, anywhere in the file), and the sibling files it names
    with `Path(__file__).with_name("x.py")` (code another program runs, e.g. MLflow's models-from-code)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from stages.lib import task`
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", "") == "with_name"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and str(node.args[0].value).endswith(".py")
        ):
            sibling = path.with_name(node.args[0].value).relative_to(root).with_suffix("")
            found.add(".".join(sibling.parts))
    return {m for m in found if m.split(".")[0] in PACKAGES and _module_file(m, root)}


def import_closure(module: str, root: Path) -> set[str]:
    """Every project file that runs when `module` runs: its imports, theirs, and the packages' __init__ files."""
    files: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            path = _module_file(".".join(parts[:i]), root)
            if path is None:
                continue
            rel = str(path.relative_to(root))
            if rel not in files:
                files.add(rel)
                todo.extend(_runs(path, root))
    return files


def options(cmd: str) -> list[tuple[str, str]]:
    """The `--option value` pairs of a `python -m module ...` command, in order (an option may repeat)."""
    args = shlex.split(cmd)[3:]
    if len(args) % 2 or not all(a.startswith("--") for a in args[::2]):
        raise ValueError(f"not --option value pairs: {cmd}")
    return list(zip(args[::2], args[1::2], strict=True))


def module_of(cmd: str) -> str:
    """`stages.sft` for `python -m stages.sft ...`."""
    return shlex.split(cmd)[2]


def inputs(cmd: str) -> list[str]:
    """The paths a command reads: its option values that are not outputs, in order, each once."""
    return list(dict.fromkeys(v for k, v in options(cmd) if k not in OUTPUT_OPTIONS + NOT_PATHS))


def data_options(params: dict[str, Any], root: Path) -> list[str]:
    """The validate stage's `--data` values: the default task's folder, then each local data path params.yaml names
    that it does not cover."""
    return [DEFAULT_DATA, *uncovered(params.get("data") or {}, [DEFAULT_DATA], root)]


def with_option(cmd: str, option: str, values: list[str]) -> str:
    """`cmd` with its `option` values replaced by `values` (first, in order; none: the option is dropped)."""
    rest = [item for pair in options(cmd) if pair[0] != option for item in pair]
    return shlex.join([*shlex.split(cmd)[:3], *(x for v in values for x in (option, v)), *rest])


def param_paths(name: str, params: dict[str, Any], root: Path) -> tuple[str, list[str]] | None:
    """The path option a stage takes from params.yaml, and its values: the validate stage's data files, the
    comparisons stage's labels file (labeler: file, or human: Label Studio's export). None for the other stages."""
    if name == "validate":
        return "--data", data_options(params, root)
    if base_name(name) == "comparisons":
        compare = params.get("comparisons") or {}
        given = compare.get("labeler") in ("file", "human") and compare.get("labels")
        return "--labels", [round_file(compare["labels"], round_of(name))] if given else []
    return None


def stage_deps(cmd: str, root: Path) -> list[str] | None:
    """A stage's deps: what its command reads, its own module, then the rest of its import closure, sorted. None when
    the module is not in this project's tree (a stage run from an installed package: nothing to hash)."""
    module = module_of(cmd)
    path = _module_file(module, root)
    if path is None:
        return None
    own = str(path.relative_to(root))
    return [*inputs(cmd), own, *sorted(import_closure(module, root) - {own})]


ROUND_STAGES = ("comparisons", "reward", "reward_gate", "ppo")  # one of each per round of on-policy comparisons
ROUND_SUFFIX = re.compile(r"_r(\d+)$")
EVERY_ROUND = ("--round-gate", "--round-ppo")  # options of the stages after the rounds that list every round's file


def rounds_of(params: dict[str, Any]) -> int:
    return int((params.get("comparisons") or {}).get("rounds", 1) or 1)


def round_name(stage: str, r: int) -> str:
    """The stage of round `r`: round 1's keep their names (comparisons, reward, ...), later ones `<name>_r<r>`."""
    return stage if r == 1 else f"{stage}_r{r}"


def base_name(stage: str) -> str:
    """`ppo` for `ppo_r3`: the module a round's stage runs."""
    return ROUND_SUFFIX.sub("", stage)


def round_of(stage: str) -> int:
    """3 for `ppo_r3` (or its folder `reports/ppo_r3`), 1 for round 1's `ppo`."""
    found = ROUND_SUFFIX.search(stage.rstrip("/").rsplit("/", 1)[-1])
    return int(found.group(1)) if found else 1


def round_file(path: str, r: int) -> str:
    """Round `r`'s labels file from comparisons.labels (round 1's): labels/round.json -> labels/round_r2.json. Each
    round's labels in a file of their own: adding round 2's would otherwise change round 1's dependency and rerun
    round 1 and everything after it (and a human round's export, one Label Studio project each, would replace it)."""
    if r == 1:
        return path
    file = PurePosixPath(path)
    return str(file.with_name(f"{file.stem}_r{r}{file.suffix}"))


def _in_round(path: str, r: int) -> str:
    """`path` under round `r`'s folders (artifacts/ppo/model -> artifacts/ppo_r2/model), from any round's path."""
    parts = path.split("/")
    if len(parts) > 1 and parts[0] in ("artifacts", "reports") and base_name(parts[1]) in ROUND_STAGES:
        parts[1] = round_name(base_name(parts[1]), r)
    return "/".join(parts)


def _round_cmd(base: str, cmd: str, r: int) -> str:
    """Round `r`'s command from round 1's: its own folders, the previous round's policy, every round's comparisons."""
    previous = f"{_in_round('artifacts/ppo', r - 1)}/model"
    pairs = [(k, _in_round(v, r)) for k, v in options(cmd) if k not in ("--start", "--round")]
    if base == "comparisons":
        pairs = [(k, previous if k == "--policy" else v) for k, v in pairs] + [("--round", str(r))]
    elif base == "reward":  # every round's comparisons so far, where round 1's stand
        first = next(i for i, (k, _) in enumerate(pairs) if k == "--comparisons")
        rest = [p for p in pairs if p[0] != "--comparisons"]
        rounds = [("--comparisons", _in_round("artifacts/comparisons", k)) for k in range(1, r + 1)]
        pairs = rest[:first] + rounds + rest[first:]
    elif base == "ppo":
        pairs = [("--start", previous), *pairs]
    return shlex.join([*shlex.split(cmd)[:3], *(x for pair in pairs for x in pair)])


def _round_paths(entries: Any, r: int) -> Any:
    """outs/metrics entries (`path` or `{path: options}`) moved into round `r`'s folders."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    moved = CommentedSeq()
    for e in entries or []:
        if isinstance(e, str):
            moved.append(_in_round(e, r))
        else:
            ((path, opts),) = e.items()
            moved.append(CommentedMap({_in_round(path, r): opts}))
    return moved


def with_rounds(stages: Any, rounds: int) -> None:
    """Rewrite the stages in place for `rounds` rounds of comparisons -> reward -> reward_gate -> ppo: round 1's
    stages as written, the later rounds' generated from them (before `evaluate`), and what reads a round's outputs
    after the rounds (evaluate, promote) pointed at the last round's."""
    from ruamel.yaml.comments import CommentedMap

    for name in [n for n in stages if ROUND_SUFFIX.search(n) and base_name(n) in ROUND_STAGES]:
        del stages[name]
    if any(base not in stages for base in ROUND_STAGES):
        return  # not this pipeline's layout
    at = list(stages).index("ppo") + 1
    for r in range(2, rounds + 1):
        for base in ROUND_STAGES:
            first = stages[base]
            entry = CommentedMap({"cmd": _round_cmd(base, str(first["cmd"]), r)})
            for key in ("params", "outs", "metrics", "plots"):
                if key in first:
                    entry[key] = first[key] if key == "params" else _round_paths(first[key], r)
            stages.insert(at, round_name(base, r), entry)
            at += 1
    after = list(stages)[at:]
    for name in after:
        stage = stages[name]
        if str(stage.get("cmd", "")).startswith("python -m stages."):
            pairs = []
            for k, v in options(str(stage["cmd"])):
                if k in EVERY_ROUND and _in_round(v, 1) in [p for _, p in pairs]:
                    continue  # a later round's copy of a per-round option: written afresh below
                pairs += (
                    [(k, _in_round(v, r)) for r in range(1, rounds + 1)]
                    if k in EVERY_ROUND
                    else [(k, _in_round(v, rounds))]
                )
            cmd = shlex.join([*shlex.split(str(stage["cmd"]))[:3], *(x for pair in pairs for x in pair)])
            if cmd != " ".join(str(stage["cmd"]).split()):
                stage["cmd"] = cmd


def _yaml() -> Any:
    from ruamel.yaml import YAML

    yaml = YAML()  # round trip: comments, order and layout are kept
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = WIDTH
    yaml.preserve_quotes = True
    return yaml


def synced(root: Path) -> str:
    """dvc.yaml's text with every stage's deps (and validate's data paths) as the code and params.yaml say."""
    import yaml as pyyaml
    from ruamel.yaml.comments import CommentedSeq

    yaml = _yaml()
    spec = yaml.load((root / "dvc.yaml").read_text())
    params_file = root / "params.yaml"
    params = (pyyaml.safe_load(params_file.read_text()) or {}) if params_file.exists() else {}
    with_rounds(spec["stages"], rounds_of(params))
    for name, stage in spec["stages"].items():
        if not str(stage.get("cmd", "")).startswith("python -m stages."):
            continue  # a stage of the user's own: theirs to keep
        if (named := param_paths(name, params, root)) is not None:
            cmd = with_option(str(stage["cmd"]), *named)
            if cmd != " ".join(str(stage["cmd"]).split()):
                stage["cmd"] = cmd
        wanted = stage_deps(str(stage["cmd"]), root)
        if wanted is not None and "deps" not in stage:
            stage.insert(list(stage).index("cmd") + 1, "deps", CommentedSeq(wanted))  # right after the command
        elif wanted is not None and [str(d) for d in stage["deps"] or []] != wanted:
            stage["deps"] = CommentedSeq(wanted)
    out = io.StringIO()
    yaml.dump(spec, out)
    return out.getvalue()


def changes(root: Path) -> list[str]:
    """What `sync` would change, a line per stage (empty when dvc.yaml is in sync)."""
    import yaml

    before = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    after = yaml.safe_load(synced(root))["stages"]
    lines = [f"{name}: removed (comparisons.rounds)" for name in before if name not in after]
    for name in after:
        if name not in before:
            lines.append(f"{name}: added (comparisons.rounds)")
            continue
        if before[name].get("cmd", "").split() != after[name].get("cmd", "").split():
            lines.append(f"{name}: cmd -> {after[name]['cmd']}")
        old, new = before[name].get("deps") or [], after[name].get("deps") or []
        if old != new:
            added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
            said = [f"+{', +'.join(added)}"] if added else []
            said += [f"-{', -'.join(removed)}"] if removed else []
            lines.append(f"{name}: deps {' '.join(said) or 'reordered'}")
    return lines


def sync(root: Path) -> list[str]:
    """Write dvc.yaml in sync; returns what changed (see `changes`). Nothing is written when nothing changed."""
    said = changes(root)
    text = synced(root)
    if (root / "dvc.yaml").read_text() != text:
        (root / "dvc.yaml").write_text(text)
    return said
