"""`rlhf sync`: what dvc.yaml says that follows from the code and params.yaml, written by a command, never by hand.

dvc.yaml is the one home of each stage's command, params and outputs. From those and the code, this writes:
- every stage's `deps`: each path its command reads (an `--option path` that is not an output), then every project
  file it runs: its import closure (read with `ast`: its imports, theirs, the packages' `__init__` files, and a sibling
  file a module names with `Path(__file__).with_name(...)`), so editing any of them makes `dvc status` name the stage;
- the validate stage's `--data` options: `data` (the embedded default task, tracked by data.dvc) and each local file
  or folder params.yaml's `data` names outside it, so DVC hashes a team's own files too (the stage refuses to read a
  data file its command does not name).

`rlhf run` syncs before it runs; `rlhf sync --check` lists what is out of date and writes nothing;
tests/test_contracts.py checks that the committed dvc.yaml is in sync. On an unchanged tree the output is byte for
byte the file that is there.
"""

from __future__ import annotations

import ast
import io
import shlex
from pathlib import Path
from typing import Any

from stages.lib.datadeps import DEFAULT_DATA, uncovered

OUTPUT_OPTIONS = ("--out", "--metrics", "--reports")  # what a stage writes; every other path option is an input
NOT_TRACKED = ("--reports",)  # written also when the stage fails (they say why), so not a DVC output
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
    return list(dict.fromkeys(v for k, v in options(cmd) if k not in OUTPUT_OPTIONS))


def data_options(params: dict[str, Any], root: Path) -> list[str]:
    """The validate stage's `--data` values: the default task's folder, then each local data path params.yaml names
    that it does not cover."""
    return [DEFAULT_DATA, *uncovered(params.get("data") or {}, [DEFAULT_DATA], root)]


def validate_cmd(cmd: str, data: list[str]) -> str:
    """The validate command with its `--data` options replaced by `data` (first, in order)."""
    rest = [item for pair in options(cmd) if pair[0] != "--data" for item in pair]
    return shlex.join([*shlex.split(cmd)[:3], *(x for d in data for x in ("--data", d)), *rest])


def stage_deps(cmd: str, root: Path) -> list[str] | None:
    """A stage's deps: what its command reads, its own module, then the rest of its import closure, sorted. None when
    the module is not in this project's tree (a stage run from an installed package: nothing to hash)."""
    module = module_of(cmd)
    path = _module_file(module, root)
    if path is None:
        return None
    own = str(path.relative_to(root))
    return [*inputs(cmd), own, *sorted(import_closure(module, root) - {own})]


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
    for name, stage in spec["stages"].items():
        if not str(stage.get("cmd", "")).startswith("python -m stages."):
            continue  # a stage of the user's own: theirs to keep
        if name == "validate":
            cmd = validate_cmd(str(stage["cmd"]), data_options(params, root))
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
    lines = []
    for name in after:
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
