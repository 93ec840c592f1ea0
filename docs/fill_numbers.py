"""Fill every measured number in README.md and the docs pages from the committed results files in benchmarks/.

    python docs/fill_numbers.py             # rewrite the generated regions of every page
    python docs/fill_numbers.py --check     # change nothing; exit 1 naming each page, line and key that disagrees

A page carries two kinds of generated region (HTML comments: invisible on GitHub and in the built site):

    <!--n:FILE/PATH@FORMAT-->0.488<!--/n-->         one number (or word), inline
    <!--n:=NAME/ARG@FORMAT-->171<!--/n-->           a number derived from results files by DERIVED[NAME](ARG...)
    <!-- numbers:NAME -->  ...  <!-- /numbers -->   a table (or paragraph) written by TABLES[NAME]

FILE is a results file in benchmarks/ without `.json`; PATH walks into it: `/`-separated keys, list indices, and
`key[field=value,...]` to pick the one list element whose fields match. FORMAT is optional: a Python format spec
(`.3f`, `+.2f`, `.0%`), a scale before one (`/1e3:.1f`, `*100:.0f`), `mmss` (seconds as "7 min 41 s") or
`range` / `range:SPEC` (a list as "17-27"). Without FORMAT the value is written as it is. An inline region stays on
one line, never starts one (Markdown would end the paragraph at a line-leading comment) and never sits in a code span;
markers inside fenced code blocks are examples and left alone.

The results files are the one home of each measured number: to change a number, re-measure into its file (or record
the new measurement with its provenance) and run this script; `--check` (run by tests/test_docs.py) fails while a
page and its file disagree.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# One pass over a page finds, in order: a fenced code block (left alone: examples of the markers live in them), a
# generated table, an inline number (on one line).
REGION = re.compile(
    r"(?P<fence>^[ \t]*```[\s\S]*?^[ \t]*```)"
    r"|<!-- numbers:(?P<name>[\w-]+) -->\n(?P<body>[\s\S]*?)<!-- /numbers -->"
    r"|<!--n:(?P<ref>[^\n]*?)-->(?P<text>[^\n]*?)<!--/n-->",
    re.MULTILINE,
)
STRAY = re.compile(r"<!--n:|<!--/n-->|<!-- numbers:[\w-]+ -->|<!-- /numbers -->")
SELECTOR = re.compile(r"^(?P<key>[^\[]*)\[(?P<sel>[^\]]*)\]$")


class NumbersError(Exception):
    """A reference that cannot be resolved: a missing file or key, an unknown name, a format that does not apply."""


class Results:
    """The results files under `root/benchmarks`, each read once; `read` lists the files asked for, in order."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "benchmarks"
        self.cache: dict[str, Any] = {}
        self.read: list[str] = []

    def _path(self, relative: str) -> Path:
        if f"benchmarks/{relative}" not in self.read:
            self.read.append(f"benchmarks/{relative}")
        if not (self.dir / relative).is_file():
            raise NumbersError(f"benchmarks/{relative} does not exist")
        return self.dir / relative

    def __call__(self, stem: str) -> Any:
        """The parsed `benchmarks/<stem>.json`."""
        if stem not in self.cache:
            self.cache[stem] = json.loads(self._path(f"{stem}.json").read_text())
        return self.cache[stem]

    def text(self, relative: str) -> str:
        """A results file that is not JSON (the profiler's tables in benchmarks/profile/)."""
        return self._path(relative).read_text()

    def get(self, ref: str) -> Any:
        """The value at `FILE/PATH`, or `=NAME/ARG...` for a derived one."""
        if ref.startswith("="):
            name, *args = ref[1:].split("/")
            if name not in DERIVED:
                raise NumbersError(f"no derived number '{name}' in docs/fill_numbers.py")
            return DERIVED[name](self, *args)
        stem, *path = ref.split("/")
        value, where = self(stem), f"benchmarks/{stem}.json"
        while path:  # a key may hold slashes itself (MLflow-style "ppo/kl_k1_seq"): the longest one that exists
            take = next((k for k in range(len(path), 1, -1) if _has(value, "/".join(path[:k]))), 1)
            segment, path = "/".join(path[:take]), path[take:]
            value = _step(value, segment, where)
            where += "/" + segment
        return value


def _has(value: Any, key: str) -> bool:
    return isinstance(value, dict) and key in value


def _step(value: Any, segment: str, where: str) -> Any:
    """One PATH segment: a list index, `key[field=value,...]`, or a key."""
    if isinstance(value, list) and segment.lstrip("-").isdigit():
        if not -len(value) <= int(segment) < len(value):
            raise NumbersError(f"{where} has no element {segment}")
        return value[int(segment)]
    if match := SELECTOR.match(segment):
        key, wanted = match["key"], dict(pair.split("=", 1) for pair in match["sel"].split(","))
        items = value.get(key) if isinstance(value, dict) else None
        if not isinstance(items, list):
            raise NumbersError(f"{where} has no list '{key}'")
        found = [i for i in items if all(str(i.get(k)) == v for k, v in wanted.items())]
        if len(found) != 1:
            raise NumbersError(f"{where}/{key} has {len(found)} elements matching [{match['sel']}], not one")
        return found[0]
    if not isinstance(value, dict) or segment not in value:
        raise NumbersError(f"{where} has no key '{segment}'")
    return value[segment]


def fmt(value: Any, spec: str = "") -> str:
    """`value` written as FORMAT says (see the module docstring)."""
    if spec == "mmss":
        minutes, seconds = divmod(round(value), 60)
        return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
    if spec == "range" or spec.startswith("range:"):
        return "-".join(fmt(v, spec[6:]) for v in value)
    if spec[:1] in ("/", "*"):
        scale, _, rest = spec[1:].partition(":")
        value = value / float(scale) if spec[0] == "/" else value * float(scale)
        spec = rest
    try:
        return format(value, spec)
    except (TypeError, ValueError) as e:
        raise NumbersError(f"format '{spec}' does not apply to {value!r}") from e


def seconds(value: float) -> str:
    """A duration or a per-step time at the precision it deserves: 0.29, 5.3, 46.5, 385."""
    return f"{value:.2f}" if value < 1 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def table(header: list[str], body: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


# ---------------------------------------------------------------------------------------------------------------------
# Derived numbers: one definition each, for the few figures a page states that no file holds as such.
# ---------------------------------------------------------------------------------------------------------------------


def _trl_row(r: Results, shape: str, impl: str = "trl") -> dict[str, Any]:
    return r.get(f"results/rows[shape={shape},impl={impl}]")


def _idle_peak(r: Results) -> list[float]:
    return r.get("ppo_speedups_results/idle_matmul_peak_gflops/value")


def promotion(r: Results) -> str:
    """What promotion did on the default task, in the words of the table and of README.md."""
    pr, ev = r("default_task_results")["promote"], r("default_task_results")["evaluate"]
    if pr["outcome"] == "refused":
        return (
            f"**refused**: version {pr['version']} registered as `{pr['alias']}` (win-rate vs SFT "
            f"{ev['win_rate_vs_sft']:.3f} < `promote.min_win_rate_vs_sft` {pr['min_win_rate_vs_sft']:.2f})"
        )
    return f"**{pr['outcome']}**: version {pr['version']} is `{pr['alias']}`"


def promotion_now(r: Results) -> str:
    """What promotion did in the recorded `make run` (benchmarks/make_run_results.json), as a phrase."""
    pr = r("make_run_results")["promote"]
    if pr.get("promoted"):
        return f"**promoted**: version {pr['version']} of `{pr['registered_model']}` is the champion"
    return f"**refused**: {'; '.join(pr.get('reasons') or [])}"


def _night(r: Results, new: bool) -> list[dict[str, Any]]:
    """The night's runs that had new data (or, `new=False`, the ones that said there was nothing new)."""
    runs = r("night_results")["runs"]
    return [x for x in runs if any(s.startswith("nothing new") for s in x["said"]) != new]


DERIVED: dict[str, Callable[..., Any]] = {
    # the shortest and longest flow run of the night that had new data, and the one that had none (benchmarks/night.py)
    "night_seconds": lambda r: [f(x["seconds"] for x in _night(r, new=True)) for f in (min, max)],
    "night_idle_seconds": lambda r: next((x["seconds"] for x in _night(r, new=False)), float("nan")),
    # PostgreSQL's shared buffers in use after the first and the last run; the fewest and most client connections
    "night_buffers": lambda r: [r("night_results")["runs"][i]["pg_shared_buffers_used_mb"] for i in (0, -1)],
    "night_connections": lambda r: [
        f(sum(x["pg_connections"].values()) for x in r("night_results")["runs"]) for f in (min, max)
    ],
    # the three seeds' win-rate interval half-widths (the evaluation's resolution)
    "onpolicy_ci_halfwidths": lambda r: [
        f(
            (x["evaluation"]["win_rate_vs_sft_ci"][1] - x["evaluation"]["win_rate_vs_sft_ci"][0]) / 2
            for x in r("onpolicy_results")["runs"]
        )
        for f in (min, max)
    ],
    # the lowest and highest alignment tax over every PPO run of the sweep (benchmarks/frontier.py)
    "frontier_tax_range": lambda r: [
        f(x["alignment_tax"] for v in r("frontier_results")["variants"].values() for x in v["seeds"].values())
        for f in (min, max)
    ],
    # the promotion's outcome as a phrase (README.md's headline)
    "promotion": promotion,
    "promotion_now": promotion_now,
    # how far the reward model is below the labeler's agreement with gold, in points
    "rm_gap_points": lambda r: (
        100
        * (
            r.get("default_task_results/task/labeler_agreement_heldout")
            - r.get("default_task_results/reward/heldout_accuracy")
        )
    ),
    # what 3x TRL's speed would mean as a share of the matmul peak measured in the same processes (%)
    "trl_3x_pct_of_peak": lambda r, shape: 3 * _trl_row(r, shape)["pct_of_peak"],
    # a PPO running every FLOP at that peak, as a multiple of TRL's speed
    "peak_over_trl": lambda r, shape: 100 / _trl_row(r, shape)["pct_of_peak"],
    # ours against the idle-machine peak of the environment notes (a range, as that peak is one)
    "pct_of_idle_peak": lambda r, shape, impl="ours": [
        100 * _trl_row(r, shape, impl)["gflops_achieved"] / p for p in reversed(_idle_peak(r))
    ],
    # emulated bf16 autocast's cost on a CPU without native bf16
    "bf16_slowdown": lambda r: (
        r.get("precision_results/emulated_bf16/bf16_autocast_s_per_step")
        / r.get("precision_results/emulated_bf16/fp32_s_per_step")
    ),
    # what the fused AdamW saves per PPO batch (ms)
    "adamw_saved_ms": lambda r: (lambda a: a["steps_per_batch"] * (a["per_tensor"] - a["fused"]))(
        r.get("ppo_speedups_results/adamw_step_ms")
    ),
    # what reading a file added to the process (MB): peak RSS minus the process after its imports
    "read_added_mb": lambda r, name: (lambda s: s["peak_rss_mb"] - s["rss_before_mb"])(
        r.get(f"validate_big_results/scenarios[name={name}]")
    ),
}


# ---------------------------------------------------------------------------------------------------------------------
# Tables: each returns the Markdown between `<!-- numbers:NAME -->` and `<!-- /numbers -->`.
# ---------------------------------------------------------------------------------------------------------------------

TABLES: dict[str, Callable[[Results], str]] = {}


def generated(name: str) -> Callable[[Callable[[Results], str]], Callable[[Results], str]]:
    """Register a table function under the NAME pages use."""

    def register(function: Callable[[Results], str]) -> Callable[[Results], str]:
        TABLES[name] = function
        return function

    return register


@generated("default-results")
def default_results(r: Results) -> str:
    d = r("default_task_results")
    task, sft, rm, ppo, ev = d["task"], d["sft"], d["reward"], d["ppo"], d["evaluate"]
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in rm["gold_pair_accuracy_by_kind"].items())
    best = max(ppo["monitor_gold"])
    monitor = " / ".join(f"**{g:.2f}**" if g == best else f"{g:.2f}" for g in ppo["monitor_gold"])
    bon = ev["best_of_n"]
    return table(
        ["what", "number"],
        [
            ["labeler agreement with gold (the ceiling), held-out pairs", f"{task['labeler_agreement_heldout']:.3f}"],
            [
                "SFT: mean gold score on held-out prompts, untrained -> SFT",
                f"{sft['gold_untrained']:.2f} -> {sft['gold_sft']:.2f} ({sft['gold_samples']} samples, "
                f"temperature {sft['gold_temperature']:.1f})",
            ],
            ["SFT held-out perplexity (response tokens)", f"{sft['heldout_perplexity']:.2f}"],
            [
                "RM held-out pairwise accuracy vs the labels",
                f"{rm['heldout_accuracy']:.3f} ({DERIVED['rm_gap_points'](r):.1f} points below the ceiling; "
                f"the gate allowed {100 * rm['gate_max_gap']:.0f})",
            ],
            [
                "RM gold-pair accuracy (held-out pairs, against the gold judge), overall / per kind",
                f"{rm['gold_pair_accuracy']:.2f} / {kinds} (per kind: {rm['gold_pair_accuracy_by_kind_how']})",
            ],
            ["RM Spearman with the gold judge, held-out replies", f"{rm['spearman_gold_heldout_replies']:.2f}"],
            [
                f"PPO ({ppo['steps']} steps x {ppo['rollouts_per_step']} rollouts, `keep: best`)",
                f"kept step {ppo['kept_step']} of {ppo['steps']} (best held-out gold of {ppo['checkpoints']} "
                f"checkpoints on {ppo['monitor_prompts']} monitor prompts)",
            ],
            [
                f"PPO vs SFT, evaluation stage ({ev['prompts']} held-out prompts, gold judge)",
                f"mean gold SFT {ev['sft_gold']:.3f} -> PPO {ev['ppo_gold']:.3f}; gold win-rate "
                f"**{ev['win_rate_vs_sft']:.3f} +- {ev['win_rate_vs_sft_ci95']:.3f}** (95% CI); "
                f"RM win-rate {ev['rm_win_rate_vs_sft']:.2f}",
            ],
            [
                "best-of-n from SFT, picked by the RM (same prompts): n = " + " / ".join(str(b["n"]) for b in bon),
                "win-rate "
                + " / ".join(f"{b['win_rate_vs_sft']:.3f}" for b in bon)
                + " at KL "
                + " / ".join(f"{b['kl']:.2f}" for b in bon)
                + " nats",
            ],
            [
                "PPO KL to the reference (k1, per response), alignment tax",
                f"{ev['kl_k1_seq']:.2f} nats; held-out perplexity {ev['alignment_tax']:+.3f}",
            ],
            [
                "over-optimisation monitor (held-out gold at steps " + "/".join(map(str, ppo["monitor_steps"])) + ")",
                f"{monitor} while the RM score rose {ppo['monitor_rm_score_first_last'][0]:.2f} -> "
                f"{ppo['monitor_rm_score_first_last'][1]:.2f}",
            ],
            ["promotion", promotion(r)],
        ],
    )


def _ci(pair: list[float]) -> str:
    return f"{pair[0]:.3f} to {pair[1]:.3f}"


def _signed_ci(pair: list[float]) -> str:
    return f"{pair[0]:+.3f} to {pair[1]:+.3f}"


@generated("reward-real")
def reward_real(r: Results) -> str:
    d = r("reward_real_results")
    body = []
    for row in d["rows"]:
        diff = row.get("pretrained_minus_this")
        body.append(
            [
                row["model"],
                str(row["n_train"]),
                str(row["n_test"]),
                f"{row['accuracy']:.3f} ({_ci(row['ci95'])})",
                f"{row['gold_pair_accuracy']:.3f}" if row.get("gold_pair_accuracy") is not None else "-",
                f"{diff['points']:+.1f} ({diff['ci95_points'][0]:+.1f} to {diff['ci95_points'][1]:+.1f})"
                if diff
                else "-",
            ]
        )
    return table(
        ["base", "training pairs", "held-out pairs", "held-out accuracy (95% CI)", "gold-pair accuracy",
         "pretrained minus this, points (95% CI)"],
        body,
    )  # fmt: skip


@generated("real-samples")
def real_samples(r: Results) -> str:
    """The real profile's first evaluation samples side by side: the prompt's last turn, SFT's and PPO's replies and
    the gold judge's score of each (benchmarks/real_profile_results.json, from the evaluation's samples.jsonl)."""

    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    body = [
        [
            cell(row["prompt"].rsplit("Human:", 1)[-1].removesuffix("Assistant:")),
            f"{cell(row['sft'])} ({row['sft_judge']:+.1f})",
            f"{cell(row['ppo'])} ({row['ppo_judge']:+.1f})",
        ]
        for row in r("real_profile_results")["samples"]
    ]
    return table(["last turn of the held-out dialogue", "SFT (gold)", "PPO (gold)"], body)


@generated("make-run-results")
def make_run_results(r: Results) -> str:
    """The default pipeline's numbers from `make run` (benchmarks/make_run_results.json)."""
    d = r("make_run_results")
    c, rm, gate, ppo, ev, pr = d["comparisons"], d["reward"], d["reward_gate"], d["ppo"], d["evaluate"], d["promote"]
    ladder = sorted(int(k.split("/")[1]) for k in ev if k.startswith("bon/") and k.endswith("/win_rate_vs_sft"))
    n = ev["bon_matched_n"]
    best = max(ladder, key=lambda m: ev[f"bon/{m}/win_rate_vs_sft"])  # the ladder's best rung
    matched = (
        f"best-of-{n} (the smallest n whose KL {ev[f'bon/{n}/kl']:.2f} is at least PPO's): "
        f"{ev[f'bon/{n}/win_rate_vs_sft']:.3f}; PPO {'above' if ev['ppo_beats_matched_bon'] else 'not above'} it"
        if n
        else f"PPO's KL is past the ladder; its best rung, best-of-{best}: {ev[f'bon/{best}/win_rate_vs_sft']:.3f}; "
        f"PPO {'above' if ev['win_rate_vs_sft'] > ev[f'bon/{best}/win_rate_vs_sft'] else 'not above'} it"
    )
    promoted = (
        f"**promoted**: version {pr['version']} is the champion"
        if pr.get("promoted")
        else f"**refused**: {'; '.join(pr.get('reasons', []))}"
    )
    return table(
        ["what", "number"],
        [
            [
                "comparisons of the SFT policy's own replies (simulated labeler, the offline labels' noise)",
                f"{c['train_pairs']} training + {c['test_pairs']} held-out pairs ({c['train_prompts']} training, "
                f"{c['test_prompts']} held-out prompts); the labels agree with the gold judge "
                f"{c['labeler_gold_agreement_test']:.3f} on the held-out pairs (their ceiling)",
            ],
            [
                "reward model: labels trained on / accuracy on the policy's own held-out replies",
                f"{rm['n_train']} ({rm['n_train'] - c['train_preferences']} offline + {c['train_preferences']} "
                f"on-policy) / **{rm['on_policy_accuracy']:.3f}** against the ceiling "
                f"{c['labeler_gold_agreement_test']:.3f}",
            ],
            [
                f"reward model: offline held-out accuracy; best-of-{rm['bon_n']} gold gain on held-out replies",
                f"{rm['accuracy']:.3f} (ceiling {d['labeler']['labeler_ceiling_test']:.3f}); "
                f"{rm['bon_gold_gain']:+.3f} of a possible {rm['bon_gold_headroom']:+.3f}",
            ],
            ["reward-model gate", "passed" if gate.get("passed") else "failed: " + gate.get("reason", "")],
            [
                f"PPO ({ppo['estimator']}, {ppo['steps_done']} steps x 64 rollouts, `keep: best`)",
                f"kept step {ppo['kept_step']}: {ppo['kept_because']}",
            ],
            [
                f"evaluation: {ev['prompts']} held-out prompts x {ev['samples_per_prompt']} replies, gold judge",
                f"gold SFT {ev['sft/judge']:.3f} -> PPO {ev['ppo/judge']:.3f}; paired difference "
                f"**{ev['judge_diff_vs_sft']:+.3f}** (95% CI {_signed_ci(ev['judge_diff_vs_sft_ci'])}); win-rate "
                f"**{ev['win_rate_vs_sft']:.3f}** (95% CI {_ci(ev['win_rate_vs_sft_ci'])}), ties "
                f"{ev['ties_vs_sft']:.2f}; KL {ev['ppo/kl_k1_seq']:.2f} nats",
            ],
            [
                "best-of-n from SFT, picked by the RM: n = " + " / ".join(map(str, ladder)),
                "win-rate "
                + " / ".join(f"{ev[f'bon/{k}/win_rate_vs_sft']:.3f}" for k in ladder)
                + " at KL <= "
                + " / ".join(f"{ev[f'bon/{k}/kl']:.2f}" for k in ladder),
            ],
            ["matched best-of-n", matched],
            ["over-optimisation", ev["overoptimisation_reason"]],
            ["promotion", promoted],
        ],
    )


@generated("ppo-frontier")
def ppo_frontier(r: Results) -> str:
    """PPO settings on the same reward models, each seed beside its matched best-of-n (frontier_results.json: graded
    on the 41 held-out prompts before the dev/test split)."""
    return frontier_table(r("frontier_results"))


@generated("ppo-frontier-test")
def ppo_frontier_test(r: Results) -> str:
    """The PPO settings whose policies were graded again on the test prompts (frontier_test_results.json)."""
    return frontier_table(r("frontier_test_results"))


def frontier_table(d: dict) -> str:
    """A row per PPO setting of a benchmarks/frontier.py results file, each seed beside its matched best-of-n."""
    body = []
    for name, v in d["variants"].items():
        p = v["ppo"]
        leash = f"kl_coef {p['kl_coef']}" + (
            f" adapting toward KL {p['kl_target']} (horizon {p['kl_horizon']})" if p.get("adaptive_kl") else ""
        )
        groups = f", {p['estimator']} groups of {p['group_size']}" if p["estimator"] in ("rloo", "grpo") else ""
        k = v.get("reward_ensemble", 1)
        ensemble = f", an ensemble of {k} reward models (penalty {p['ensemble_penalty']})" if k > 1 else ""
        cells = [f"{name}: {leash}, {p['num_steps']} steps x {p['batch_size']}{groups}{ensemble}"]
        for seed in sorted(v["seeds"]):
            x = v["seeds"][seed]
            bon = f"best-of-{x['matched_n']} {x['matched_bon_win_rate']:.3f}" if x["matched_n"] else "past the ladder"
            cells.append(f"{x['win_rate']:.3f} at KL {x['kl']:.2f} ({bon})")
        cells.append(f"{v['win_rate_mean']:.3f} / {v['kl_mean']:.2f}")
        cells.append(
            f"{v['beats_matched_bon']}" + (f", {v['past_the_ladder']} past it" if v["past_the_ladder"] else "")
        )
        cells.append(" / ".join(f"{v['seeds'][seed]['alignment_tax']:.2f}" for seed in sorted(v["seeds"])))
        body.append(cells)
    seeds = sorted({s for v in d["variants"].values() for s in v["seeds"]})
    header = ["PPO setting", *[f"seed {s}: win-rate at KL (matched best-of-n)" for s in seeds]]
    tax = f"perplexity rise on every demonstration per seed (the tax before tax_share; limit {d['max_alignment_tax']})"
    return table([*header, "mean win-rate / KL", "above matched best-of-n", tax], body)


@generated("onpolicy-seeds")
def onpolicy_seeds(r: Results) -> str:
    """The RLHF half per seed (benchmarks/onpolicy_results.json)."""
    d = r("onpolicy_results")
    body = []
    for run in d["runs"]:
        if not run["gate_passed"]:
            body.append([str(run["seed"]), "stopped by the reward-model gate: " + run["gate"], "", "", "", "", "", ""])
            continue
        e, n = run["evaluation"], run["evaluation"]["bon_matched_n"]
        ladder = [int(k.split("/")[1]) for k in e if k.startswith("bon/") and k.endswith("/win_rate_vs_sft")]
        top = max(ladder, key=lambda m: e[f"bon/{m}/win_rate_vs_sft"])
        bon = (
            f"{e[f'bon/{n}/win_rate_vs_sft']:.3f} (n={n})"
            if n
            else f"past the ladder (its best: {e[f'bon/{top}/win_rate_vs_sft']:.3f}, n={top})"
        )
        dpo = f"{e['dpo_win_rate_vs_sft']:.3f}" if e.get("dpo_win_rate_vs_sft") is not None else "-"
        body.append(
            [
                str(run["seed"]),
                f"{e['win_rate_vs_sft']:.3f} ({_ci(e['win_rate_vs_sft_ci'])})",
                f"{e['judge_diff_vs_sft']:+.3f} ({_signed_ci(e['judge_diff_vs_sft_ci'])})",
                f"{e['ppo/kl_k1_seq']:.2f}",
                bon,
                dpo,
                f"{run['reward']['on_policy_accuracy']:.3f} / {run['labels_gold_agreement_test']:.3f}",
                str(run["ppo"]["kept_step"]),
            ]
        )
    s = d["summary"]
    body.append(
        [
            "mean",
            f"**{s['win_rate_vs_sft_mean']:.3f}**",
            f"{s['judge_diff_vs_sft_mean']:+.3f}",
            f"{s['kl_mean']:.2f}",
            "",
            f"{s['dpo_win_rate_vs_sft_mean']:.3f}" if s.get("dpo_win_rate_vs_sft_mean") is not None else "-",
            f"{s['rm_on_policy_accuracy_mean']:.3f} / {s['labels_gold_agreement_test_mean']:.3f}",
            "",
        ]
    )
    header = ["seed", "gold win-rate vs SFT (95% CI)", "paired gold difference (95% CI)", "KL"]
    header += ["matched best-of-n", "DPO (same labels)", "RM on own replies / ceiling", "kept step"]
    return table(header, body)


@generated("headroom")
def headroom(r: Results) -> str:
    """What any policy could gain over SFT on the held-out prompts (benchmarks/headroom_results.json)."""
    d = r("headroom_results")
    ladder = list(d["oracle_best_of_n"])
    body = [
        ["gold-best of n SFT samples (a perfect ranker, at test time)"]
        + [f"{d['oracle_best_of_n'][n]['win_rate']:.3f}" for n in ladder],
        ["reward model's pick of n SFT samples (best-of-n)"]
        + [f"{d['rm_best_of_n'][n]['win_rate']:.3f}" for n in ladder],
    ]
    return table(["gold win-rate vs SFT", *[f"n = {n}" for n in ladder]], body)


@generated("own-data-run")
def own_data_run(r: Results) -> str:
    d = r("own_data_results")
    v, s, rm, p, e, pr = d["validate"], d["sft"], d["reward"], d["ppo"], d["evaluate"], d["promote"]
    return table(
        ["stage", "what happened"],
        [
            [
                f"validate ({v['seconds']:.1f} s)",
                f"{v['rows']} rows read, {v['format']} format detected; {v['quarantined']} quarantined with line and "
                f"reason ({v['quarantined_no_assistant_turn']} transcripts without an `Assistant:` turn, "
                f"{v['quarantined_empty_chosen']} empty chosen replies); derived by prompt: {v['train_pairs']} "
                f"training pairs, SFT demonstrations and PPO prompts, {v['heldout_pairs']} held-out pairs, "
                "demonstrations and evaluation prompts",
            ],
            [
                f"SFT ({s['seconds']:.0f} s)",
                f"{s['train_truncated_prompts']} demonstrations; **every** prompt longer than the "
                f"{d['context_tokens']}-token context kept its last turns (truncated: train "
                f"{s['train_truncated_prompts']}, test {s['test_truncated_prompts']}, samples "
                f"{s['samples_truncated_prompts']}); perplexity {s['perplexity']:.2f}",
            ],
            [
                f"reward model ({rm['seconds']:.0f} s)",
                f"held-out accuracy {rm['heldout_accuracy']:.3f} (gate floor {rm['gate_floor']:.2f}; no labeler "
                'ceiling is known for these pairs, so the gate says "the floor alone"); gold-pair accuracy '
                f"{rm['gold_pair_accuracy']:.2f}",
            ],
            [
                "judge",
                f"`auto` chose the default task's {d['judge']['kind']} function: these generated dialogues end in "
                "the default task's prompts, so it applies (on data of your own, `auto` trains the judge reward "
                "model)",
            ],
            [
                f"PPO ({p['seconds']:.0f} s)",
                f"{p['steps']} steps, {p['truncated_prompts']} truncated prompts; kept step {p['kept_step']} (best "
                f"held-out judge score of {p['checkpoints']} checkpoints)",
            ],
            [
                f"evaluation ({e['seconds']:.0f} s)",
                f"{e['prompts']} held-out dialogues (all truncated): gold SFT {e['sft_gold']:.2f} -> PPO "
                f"{e['ppo_gold']:.2f}, gold win-rate **{e['win_rate_vs_sft']:.3f} +- {e['win_rate_vs_sft_ci95']:.3f}**"
                f", KL {e['kl_k1_seq']:.2f} nats, alignment tax {e['alignment_tax']:+.2f} perplexity",
            ],
            ["promotion", f"{pr['outcome']}: version {pr['version']} is `{pr['alias']}`"],
        ],
    )


@generated("validate-big")
def validate_big(r: Results) -> str:
    body = [
        [
            f"`{s['name']}`",
            s["file"],
            f"{s['seconds']:.1f}",
            f"{s['rss_before_mb']} MB",
            f"{s['peak_rss_mb']} MB",
            f"+{s['peak_rss_mb'] - s['rss_before_mb']} MB",
            s["outcome"],
        ]
        for s in r("validate_big_results")["scenarios"]
    ]
    return table(
        ["scenario", "file", "seconds", "process after its imports", "peak RSS", "reading added", "outcome"], body
    )


@generated("alignment-table")
def alignment_table(r: Results) -> str:
    s = r("alignment_results")["summary"]

    def win(k: str) -> str:
        return f"{s[k]['win_rate_vs_sft']['mean']:.3f} +- {s[k]['win_rate_vs_sft']['sd']:.3f}"

    body = [
        [
            label,
            win(k),
            f"{s[k]['kl']['mean']:.2f}",
            f"{s[k]['ppo_seconds']['mean']:.0f} s",
            f"{s[k]['ppo_peak_rss_mb']['mean']:.0f} MB",
            ", ".join(map(str, s[k]["kept_steps"])),
        ]
        for k, label in [
            ("gae", "PPO, `gae` (the default)"),
            ("rloo", "`rloo`"),
            ("grpo", "`grpo`"),
            ("reinforce_pp", "`reinforce_pp`"),
        ]
    ]
    body.append(["best-of-1 (a second SFT sample: the noise floor)", win("best-of-1"), "0", "", "", ""])
    bon = ["best-of-2", "best-of-4", "best-of-8"]
    body.append(
        [
            "best-of-2 / 4 / 8",
            " / ".join(f"{s[k]['win_rate_vs_sft']['mean']:.3f}" for k in bon),
            " / ".join(f"{s[k]['kl']['mean']:.2f}" for k in bon),
            "",
            "",
            "",
        ]
    )
    body.append(["DPO (`dpo.beta` 0.1, 1 epoch)", win("dpo"), f"{s['dpo']['kl']['mean']:.1f}", "", "", ""])
    header = ["policy", "gold win-rate vs SFT (mean +- sd over seeds)", "KL to SFT (nats)", "PPO stage wall"]
    return table(header + ["peak RSS", "kept step (seeds 0, 1, 2)"], body)


@generated("night")
def night(r: Results) -> str:
    """benchmarks/night.py: memory per service after run 3 and after the last run, PostgreSQL's shared buffers and
    databases, connections, the worker."""
    n = r("night_results")
    runs, base = n["runs"], n["baseline"]
    third, last = runs[2], runs[-1]
    kinds = ("rss_mb", "pss_mb", "uss_mb")
    rows = [
        [
            f"{name} (RSS / PSS / USS MB)",
            *(" / ".join(f"{x[k][name]:.0f}" for k in kinds) for x in (base, third, last)),
            " / ".join(f"{last[k][name] / third[k][name] - 1:+.1%}" for k in kinds),
        ]
        for name in ("prefect", "mlflow", "postgres", "worker")
    ]
    used = [x["pg_shared_buffers_used_mb"] for x in (base, third, last)]
    rows.append([
        f"PostgreSQL shared buffers in use (MB of {last['pg_shared_buffers_mb']:.0f})",
        *(f"{u:.0f}" for u in used),
        f"{used[2] / used[1] - 1:+.1%}",
    ])  # fmt: skip
    size = [sum(x["pg_database_mb"].values()) for x in (base, third, last)]
    rows.append(["PostgreSQL databases on disk (MB)", *(f"{v:.0f}" for v in size), f"{size[2] / size[1] - 1:+.1%}"])
    conns = [sum(x["pg_connections"].values()) for x in (base, third, last)]
    rows.append(["PostgreSQL client connections", *map(str, conns), f"{conns[2] - conns[0]:+d} from idle"])
    w3, wl = third["worker"], last["worker"]
    rows.append([
        "worker: threads / open files / child processes",
        "",
        f"{w3['threads']} / {w3['open_files']} / {w3['children']}",
        f"{wl['threads']} / {wl['open_files']} / {wl['children']}",
        "",
    ])  # fmt: skip
    return table(["", "idle, before run 1", "after run 3", f"after run {len(runs)}", "change from run 3"], rows)


@generated("stack-cost")
def stack_cost(r: Results) -> str:
    b, t = r("stack_results"), r("stack_tests_results")
    mem, tests = t["idle_memory_mb"], t["stack_tests"]
    return table(
        ["what", "number"],
        [
            [
                "`rlhf stack up` from nothing (initdb, both servers' database migrations, worker, sshd)",
                f"**{b['stack_up_from_nothing_s']:.1f} s** at load {b['load_before'][0]:.1f}; "
                f"{fmt(t['stack_up_from_nothing_in_test_sessions_s'], 'range')} s in the test sessions at load "
                f"{fmt(t['stack_up_from_nothing_in_test_sessions_load'], 'range')}",
            ],
            [
                "`rlhf stack up` again (everything answers) / `rlhf stack down`",
                f"{b['stack_up_again_s']:.1f} s / {b['stack_down_s']:.1f} s",
            ],
            [
                "tiny pipeline (the tests' sizes), embedded vs against the stack",
                f"**{b['pipeline_embedded_s']:.1f} s vs {b['pipeline_stack_s']:.1f} s**",
            ],
            [
                "the worker's run of the `rlhf-process` deployment (tiny; ppo, evaluate, promote rerun)",
                f"{fmt(t['worker_deployment_run_s'], 'range')} s by load, including the worker's 10 s polling",
            ],
            [
                "resident memory of the idle stack",
                f"about {t['idle_memory_gb']:.1f} GB (Prefect server ~{mem['prefect_server']} MB, MLflow server "
                f"~{mem['mlflow_server']} MB plus its uvicorn workers, worker ~{mem['worker']} MB, PostgreSQL and "
                "sshd a few tens of MB)",
            ],
            [
                "the stack tests (`pytest tests/test_stack.py tests/test_ui.py`)",
                f"{fmt(tests[0]['seconds'], 'mmss')} at load ~{tests[0]['load']} "
                f"({fmt(tests[1]['seconds'], 'mmss')} at load ~{tests[1]['load']})",
            ],
        ],
    )


@generated("pipeline-overhead")
def pipeline_overhead(r: Results) -> str:
    local, process = r("pipeline_results"), r("pipeline_results_process")

    def both(key: str, f: Callable[[Any], str]) -> list[str]:
        return [f(local[key]), f(process[key])]

    def share(x: dict[str, Any]) -> str:
        return f"{x['overhead_s']:.1f} s = {x['overhead_pct_of_compute']:.1f}%"

    return table(
        ["", "`--runner local` (in process, the default)", "`--runner process` (one process per stage)"],
        [
            ["measured (UTC)", local["date_utc"], process["date_utc"]],
            ["`rlhf run --prefect` on a fresh clone: wall", *both("wall_s", lambda v: f"{v:.1f} s ({fmt(v, 'mmss')})")],
            ["stage compute (the stages' own MLflow runs)", *both("stage_compute_s", lambda v: f"{v:.1f} s")],
            ["outside stage compute (Prefect, DVC, imports, MLflow set-up)", share(local), share(process)],
            ["of which Prefect and the CLI", *both("prefect_s", lambda v: f"{v:.1f} s")],
            ["of which stage start-up", *both("stage_startup_s", lambda v: f"{v:.1f} s")],
            ["no-op `rlhf run --prefect`", *both("noop_flow_s", lambda v: f"{v:.1f} s")],
            ["no-op `dvc repro`", *both("noop_dvc_repro_s", lambda v: f"{v:.2f} s")],
        ],
    )


@generated("pipeline-stages")
def pipeline_stages(r: Results) -> str:
    stages = r("pipeline_results")["stages"]
    order = ["validate", "sft", "reward", "ppo", "evaluate", "promote"]
    return table(
        ["stage", *order],
        [
            ["flow task (s)", *(f"{stages[s]['stage']:.1f}" for s in order)],
            ["the stage's own MLflow run (s)", *(f"{stages[s]['compute']:.1f}" for s in order)],
        ],
    )


def _size_label(name: str) -> str:
    layers, width = name.split("x")
    extra = {"4x256": " (the default)", "12x768": " (GPT-2 small's shape)"}.get(name, "")
    return f"{layers} x {width}{extra}"


@generated("scaling-sizes")
def scaling_sizes(r: Results) -> str:
    def cell(x: dict[str, Any]) -> str:
        return f"{seconds(x['seconds_per_step'])} ({x['tokens_per_second']:.0f}, {x['peak_rss_mb'] / 1e3:.1f} GB)"

    body = [
        [
            _size_label(name),
            f"{x['non_embedding_params'] / 1e6:.1f}M",
            cell(x["sft"]),
            cell(x["reward"]),
            cell(x["ppo"]),
            f"{seconds(x['evaluate']['seconds_per_1k_prompts'])} ({x['evaluate']['peak_rss_mb'] / 1e3:.1f} GB)",
        ]
        for name, x in r("scaling_results")["sizes"].items()
    ]
    header = ["model (layers x width)", "non-embedding params", "SFT s/step (tok/s, peak RSS)"]
    header += ["reward model s/step (tok/s, RSS)", "PPO s/step, 32 x 48 tokens, 4 epochs (tok/s, RSS)"]
    return table(header + ["evaluation s per 1k prompts (RSS)"], body)


@generated("scaling-data")
def scaling_data(r: Results) -> str:
    body = [
        [
            name,
            f"{x['validate']['rows']:,} rows, {seconds(x['validate']['seconds'])} s "
            f"({x['validate']['peak_rss_mb'] / 1e3:.1f} GB)",
            f"{x['sft_epoch']['rows']:,} rows, {seconds(x['sft_epoch']['seconds_total'])} s "
            f"({x['sft_epoch']['peak_rss_mb'] / 1e3:.1f} GB)",
        ]
        for name, x in r("scaling_results")["data"].items()
    ]
    header = ["data (x the default task)", "validation of all six files: rows, time (RSS)"]
    return table(header + ["one SFT epoch at 4 x 256: rows, time (RSS)"], body)


@generated("ppo-vs-trl")
def ppo_vs_trl(r: Results) -> str:
    d = r("results")
    ratio = d["ratio_ours_over_trl_tokens_per_s"]
    body = []
    for x in d["rows"]:
        ours = x["impl"] == "ours"
        idle = fmt(DERIVED["pct_of_idle_peak"](r, x["shape"], x["impl"]), "range:.0f")
        body.append(
            [
                x["shape"],
                "ours" if ours else f"TRL {x['trl']}",
                f"{x['s_per_batch']:.2f}",
                f"{x['cpu_s_per_batch']:.2f}",
                f"{x['tokens_per_s']:.0f}",
                f"**{ratio[x['shape']]:.2f}x**" if ours else "",
                f"{x['generation_s']:.2f} / {x['scoring_s']:.2f} / {x['update_s']:.2f}" if ours else "",
                f"{x['gflops_achieved']:.0f}",
                f"{x['pct_of_peak']:.0f}% (of {x['peak_gflops']:.0f})",
                f"{idle}%",
            ]
        )
    header = ["shape", "impl", "s/batch", "CPU s/batch", "response tok/s", "ours/TRL (tok/s)"]
    header += ["ours gen / score / update (s)", "GFLOP/s", "% of measured peak", "% of the idle peak"]
    phases = "; ".join(
        f"{x['shape']}: generation {x['generation_pct_of_peak']:.0f}%, scoring {x['scoring_pct_of_peak']:.0f}%, "
        f"update {x['update_pct_of_peak']:.0f}%"
        for x in d["rows"]
        if x["impl"] == "ours"
    )
    return table(header, body) + f"\n\nOurs per phase, as % of the measured peak: {phases}."


@generated("ppo-ablation")
def ppo_ablation(r: Results) -> str:
    rows = r("ppo_speedups_results")["ablation"]["rows"]
    after = statistics.mean(rows[1]["cpu_1_thread"])
    body = []
    for i, x in enumerate(rows):
        one = ", ".join(f"{v:.2f}" for v in x["cpu_1_thread"])
        if i >= 2:
            one += f" ({100 * (statistics.mean(x['cpu_1_thread']) / after - 1):+.1f}%"
            one += f"; {x['phase']} {x['phase_s'][0]:.2f} -> {x['phase_s'][1]:.2f} s)" if "phase" in x else ")"
        body.append([x["name"], one, ", ".join(f"{v:.2f}" for v in x["wall_2_threads"])])
    return table(["(median per run)", "1 thread: CPU s/batch", "2 threads: wall s/batch"], body)


# The profiler's rows as the page shows them: (op names in torch_ops.txt, what the page calls them, what they are).
PROFILE_ROWS = [
    (["aten::mm"], "`aten::mm`", "backward matmuls (gradients of inputs and weights) and the LM head"),
    (["aten::addmm"], "`aten::addmm`", "forward of GPT-2's Conv1D layers (training, scoring, generation)"),
    (
        [
            "aten::_scaled_dot_product_flash_attention_for_cpu_ba...",
            "aten::_scaled_dot_product_flash_attention_for_cpu",
        ],
        "flash attention backward + forward",
        "S = 80, head dim 64",
    ),
    (["aten::gelu", "aten::gelu_backward"], "`aten::gelu` + `gelu_backward`", "the fused tanh GELU"),
    (
        ["aten::copy_", "aten::cat"],
        "`aten::copy_`, `aten::cat`",
        "`cat`: the KV cache grows by concatenation in generation",
    ),
    (
        ["aten::mul_", "aten::add_", "aten::native_layer_norm", "aten::native_layer_norm_backward"],
        "`mul_`, `add_`, LayerNorm forward + backward",
        "gradient-clipping scale, gradient accumulation, norms",
    ),
    (["aten::_fused_adamw_"], "`aten::_fused_adamw_`", "the whole optimiser: 8 calls per batch"),
]


@generated("torch-profile")
def torch_profile(r: Results) -> str:
    text = r.text("profile/torch_ops.txt")
    share = {
        m["name"]: float(m["pct"]) for m in re.finditer(r"^\s*(?P<name>\S+)\s+(?P<pct>[\d.]+)%", text, re.MULTILINE)
    }
    total = re.search(r"Self CPU time total: ([\d.]+)s", text)
    body = []
    for ops, label, what in PROFILE_ROWS:
        missing = [op for op in ops if op not in share]
        if missing or not total:
            raise NumbersError(f"benchmarks/profile/torch_ops.txt has no row {missing or 'Self CPU time total'}")
        body.append([" + ".join(f"{share[op]:.1f}%" for op in ops), label, what])
    head = f"Self CPU time of one batch: {float(total[1]):.2f} s under the profiler.\n\n"
    return head + table(["share", "op", "what"], body)


def _cumtime(text: str, pattern: str) -> float:
    """The largest cumulative time (seconds) among cProfile rows whose function matches `pattern`."""
    found = [
        float(m[1])
        for m in re.finditer(r"^\s*\S+\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+[\d.]+\s+(.*)$", text, re.MULTILINE)
        if re.search(pattern, m[2])
    ]
    if not found:
        raise NumbersError(f"benchmarks/profile/cprofile.txt has no row matching {pattern!r}")
    return max(found)


@generated("cprofile")
def cprofile(r: Results) -> str:
    text = r.text("profile/cprofile.txt")
    total = re.search(r"in ([\d.]+) seconds", text)
    if not total:
        raise NumbersError("benchmarks/profile/cprofile.txt has no total")
    t = {
        name: _cumtime(text, pattern)
        for name, pattern in {
            "backward": r"torch/_tensor\.py:\d+\(backward\)",
            "gpt2": r"modeling_gpt2\.py:\d+\(forward\)",
            "train": r"stages/ppo\.py:\d+\(forward\)",
            "generate": r"generation/utils\.py:\d+\(generate\)",
            "reward": r"stages/ppo\.py:\d+\(reward_scores\)",
            "clip": r"accelerator\.py:\d+\(clip_grad_norm_\)",
            "cat": r"\{built-in method torch\.cat\}",
            "step": r"accelerate/optimizer\.py:\d+\(step\)",
        }.items()
    }
    return (
        f"cProfile, cumulative ({float(total[1]):.2f} s under the profiler, `benchmarks/profile/cprofile.txt`): "
        f"`loss.backward()` x 8 {t['backward']:.2f} s ({100 * t['backward'] / float(total[1]):.0f}%); GPT-2 "
        f"forwards {t['gpt2']:.2f} s in all (the 8 training forwards of policy + critic {t['train']:.2f} s; the rest "
        f"are generation, the scoring critic, reference and reward model); `generate` {t['generate']:.2f} s; reward "
        f"model {t['reward']:.2f} s; `clip_grad_norm_` {t['clip']:.2f} s; KV-cache `torch.cat` {t['cat']:.2f} s; "
        f"optimiser steps {t['step']:.2f} s."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------------------------------------------------


def pages(root: Path) -> list[Path]:
    """Every page that may carry generated regions."""
    found = [root / "README.md", root / "benchmarks/README.md", *sorted((root / "docs").rglob("*.md"))]
    return [p for p in found if p.is_file()]


def render(page: Path, root: Path) -> tuple[str, list[str], list[str]]:
    """The page with every region filled; one line per region that disagreed with its file, and one per region that
    could not be resolved (left as it was)."""
    text = page.read_text()
    name = page.relative_to(root).as_posix()
    differences: list[str] = []
    errors: list[str] = []

    def line(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def block(m: re.Match[str]) -> str:
        results = Results(root)
        try:
            if m["name"] not in TABLES:
                raise NumbersError(f"no table '{m['name']}' in docs/fill_numbers.py")
            body = TABLES[m["name"]](results).strip()
        except (NumbersError, KeyError, IndexError, TypeError, ValueError, json.JSONDecodeError) as e:
            errors.append(f"{name}:{line(m.start())}: numbers:{m['name']}: {e}")
            return m[0]
        if m["body"].strip() != body:
            old = m["body"].strip().splitlines()
            new = body.splitlines()
            first = next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new)))
            differences.append(
                f"{name}:{line(m.start())}: numbers:{m['name']} differs from what {', '.join(results.read)} give "
                f"(table line {first + 1}: page {old[first] if first < len(old) else '(none)'!r}, "
                f"file {new[first] if first < len(new) else '(none)'!r})"
            )
        return f"<!-- numbers:{m['name']} -->\n\n{body}\n\n<!-- /numbers -->"

    def inline(m: re.Match[str]) -> str:
        ref, _, spec = m["ref"].partition("@")
        try:
            before = text[text.rfind("\n", 0, m.start()) + 1 : m.start()]
            if before.count("`") % 2:
                raise NumbersError("inside a code span, where the comment would show: move it out of the backticks")
            if not before.strip():  # CommonMark and Python-Markdown both end the paragraph at a line-leading comment
                raise NumbersError("starts a line, which ends the paragraph there: put a word before it")
            value = fmt(Results(root).get(ref), spec)
        except (NumbersError, KeyError, IndexError, TypeError, ValueError, json.JSONDecodeError) as e:
            errors.append(f"{name}:{line(m.start())}: n:{m['ref']}: {e}")
            return m[0]
        if m["text"] != value:
            source = "docs/fill_numbers.py (derived)" if ref.startswith("=") else f"benchmarks/{ref.split('/')[0]}.json"
            differences.append(f"{name}:{line(m.start())}: n:{m['ref']} reads {m['text']!r}, {source} gives {value!r}")
        return f"<!--n:{m['ref']}-->{value}<!--/n-->"

    def region(m: re.Match[str]) -> str:
        return m[0] if m["fence"] else block(m) if m["name"] else inline(m)

    def unmatched(m: re.Match[str]) -> str:  # what REGION does not match is a marker broken across lines, or unclosed
        return "\n" * m[0].count("\n") if m["fence"] or m["name"] or m["ref"] else m[0]

    rest = REGION.sub(unmatched, text)
    for stray in STRAY.finditer(rest):
        errors.append(f"{name}:{rest.count(chr(10), 0, stray.start()) + 1}: {stray[0]!r} without its other half")
    return REGION.sub(region, text), differences, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page disagrees")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this one)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    failed = False
    for page in pages(root):
        text, differences, errors = render(page, root)
        for problem in errors + (differences if args.check else []):
            print(problem, file=sys.stderr)
        failed |= bool(errors) or (args.check and bool(differences))
        if not args.check and text != page.read_text():  # a region that differs is rewritten
            page.write_text(text)
            print(f"updated {page.relative_to(root).as_posix()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
