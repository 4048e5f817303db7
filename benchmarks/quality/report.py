"""Tables and plots of the quality experiment from the per-run JSON files that ``experiment.py`` writes.

    python benchmarks/quality/report.py RESULT_DIR [RESULT_DIR ...] --out benchmarks/quality/results

Reads every ``*.json`` in the folders (one run each: a task, a length, a variant, a learning rate, a seed; files
written before the learning-rate and seed sweep carry the last two only in their config) and writes to ``--out``:

- ``results.md`` (also printed): the learning-rate sweep (every setting's mean and spread over seeds, when the
  runs have more than one learning rate), the needle-retrieval table (the retrieval recipe ``settings.RECIPE``,
  NSA with the paper's semantics and dense, per length), the needle ablations, the step time of every needle
  variant by training phase (short sequences, full-selection warm-up, the rest) and the byte-level LM table (the
  same three models), each under a line naming its runs' device, versions, learning rates, seeds, steps and
  tokens per step;
- ``retrieval-summary.json``: one entry per needle run, ``{"variant", "seq_len", "seed", "lr", "steps",
  "accuracy"}`` (final accuracy as a fraction; the recipe's runs as ``"nsa-recipe"``);
- the plots whose runs exist: ``needle_accuracy.png`` (final accuracy against length, error bars over seeds),
  ``needle_curves.png`` (evaluation accuracy against step, per length) and ``lm_loss.png`` (evaluation and
  training loss against step, per length).

A setting is a (task, length, variant, learning rate); its numbers are means over its seeds, its spread the
min-max over them. Learning rates are ranked per (task, variant) at the shortest length where the variant ran at
several: highest mean final accuracy (needle) or lowest mean final evaluation loss (LM) first, the smaller first
on a tie (a variant never run at several: its learning rates ascending). Outside the sweep table every variant is
shown at each length at the best-ranked learning rate it ran at there; the tables' ``lr`` columns say which.
Accuracies are final-evaluation accuracies in percent, losses final-evaluation cross-entropies in nats per token
(per byte for the LM), ms/step the median steady step time at the target length (phase tables: the mean over the
phase), taken only from runs that had the device to themselves (``experiment.py --jobs 1``); runs trained several
at once give accuracies and losses but no times.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from settings import NEEDLE_TASKS, RECIPE, TASKS, VARIANTS, model_section  # noqa: E402

Key = Tuple[str, int, str, float, int]  # (task, seq_len, variant, lr, seed)
Run = Dict
Results = Dict[Key, Run]
Metric = Callable[[Run], float]

# the models the main tables compare, with their column labels: the retrieval recipe (settings.RECIPE, named
# "nsa-recipe" in the retrieval summary), NSA with the paper's semantics, dense attention
COMPARED: Tuple[Tuple[str, str], ...] = ((RECIPE, "recipe"), ("nsa", "NSA"), ("dense", "dense"))
MAIN_VARIANTS = tuple(variant for variant, _ in COMPARED)
ABLATION_MARKERS = ("s", "^", "v", "D", "P", "X")
SPREAD = "min-max over seeds"


# ---------------------------------------------------------------------------------------------------- loading

def load_results(dirs: Sequence[Path]) -> Results:
    """Every ``*.json`` run in ``dirs`` keyed by ``(task, seq_len, variant, lr, seed)``; each run gets its file as
    ``"source"``. Raises ``ValueError`` naming both files when a key appears twice."""
    results: Results = {}
    for folder in dirs:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder} is not a folder of result files")
        for path in sorted(Path(folder).glob("*.json")):
            run = read_run(path)
            key = (run["task"], run["seq_len"], run["variant"], run["lr"], run["seed"])
            if key in results:
                raise ValueError(f"{key[0]} T={key[1]} {key[2]} lr {key[3]:g} seed {key[4]} appears twice: "
                                 f"{results[key]['source']} and {path}")
            results[key] = run
    if not results:
        raise FileNotFoundError(f"no *.json results in {', '.join(map(str, dirs))}")
    return results


def read_run(path: Path) -> Run:
    """One result file, checked to be a quality run, with ``"source"`` set to its path and ``"lr"`` and ``"seed"``
    taken from its config where the file has no such keys (files from before the sweep); a run of the alias
    ``"nsa-recipe"`` is read as ``settings.RECIPE`` (``ValueError`` if its model is not that variant's)."""
    run = json.loads(Path(path).read_text())
    missing = [k for k in ("task", "seq_len", "variant", "config", "environment", "metrics") if k not in run]
    if missing:
        raise ValueError(f"{path} is not a quality-experiment result (no {', '.join(missing)})")
    run = {"lr": run["config"]["train"]["lr"], "seed": run["config"]["seed"], **run, "source": str(path)}
    if run["variant"] == "nsa-recipe":  # the alias: read as the variant it names, if it ran that variant's model
        if run["config"]["model"] != model_section(run["size"], RECIPE):
            raise ValueError(f"{path} ran variant 'nsa-recipe' with another model than today's recipe "
                             f"{RECIPE!r}: set its \"variant\" to the name of the settings it ran")
        run["variant"] = RECIPE
    return run


def lengths(results: Results, task: str, variant: Optional[str] = None) -> List[int]:
    """The sequence lengths that ``task`` has runs at (of ``variant`` if given), ascending."""
    return sorted({T for t, T, v, _, _ in results if t == task and variant in (None, v)})


def variants(results: Results, task: str, seq_len: Optional[int] = None) -> List[str]:
    """The variants ``task`` has runs of (at ``seq_len`` if given), in ``settings.VARIANTS`` order."""
    present = {v for t, T, v, _, _ in results if t == task and seq_len in (None, T)}
    order = list(VARIANTS)
    return sorted(present, key=lambda v: (order.index(v) if v in order else len(order), v))


def learning_rates(results: Results, task: str, seq_len: int, variant: str) -> List[float]:
    """The learning rates ``variant`` ran at on ``task`` at ``seq_len``, ascending."""
    return sorted({lr for t, T, v, lr, _ in results if (t, T, v) == (task, seq_len, variant)})


def seed_runs(results: Results, task: str, seq_len: int, variant: str, lr: float) -> List[Run]:
    """The runs of one setting (task, length, variant, learning rate), one per seed, by seed."""
    return [results[k] for k in sorted(results) if k[:4] == (task, seq_len, variant, lr)]


def task_runs(results: Results, task: str) -> List[Run]:
    """The runs of ``task``."""
    return [results[k] for k in sorted(results) if k[0] == task]


def runs_at(results: Results, task: str, T: int) -> List[Run]:
    """The runs of ``task`` at length ``T``."""
    return [results[k] for k in sorted(results) if k[:2] == (task, T)]


# ---------------------------------------------------------------------------------------------------- metrics

def accuracy_pct(run: Run) -> float:
    """Final-evaluation accuracy in percent."""
    return 100.0 * run["metrics"]["final_eval"]["accuracy"]


def eval_loss(run: Run) -> float:
    """Final-evaluation loss in nats per token."""
    return run["metrics"]["final_eval"]["loss"]


def bits_per_byte(run: Run) -> float:
    """Final-evaluation loss in bits (byte-level LM: bits per byte)."""
    return eval_loss(run) / math.log(2)


def timed_alone(run: Run) -> bool:
    """Whether the run had its device to itself (``experiment.py --jobs 1``; older files: always), so that its
    step times mean something."""
    return run.get("concurrent_runs", 1) == 1


def ms_per_step(run: Run) -> Optional[float]:
    """Median steady step time in milliseconds (``None`` for a run that shared its device)."""
    return 1e3 * run["metrics"]["step_time_s"] if timed_alone(run) else None


def phase_bounds(run: Run) -> Dict[str, Tuple[int, int]]:
    """The run's training phases as step ranges ``[start, end)``: ``"short"`` (``data.short_steps`` on short
    sequences), ``"full selection"`` (the rest of ``nsa.selection_warmup_steps``, at the target length) and
    ``"main"`` (the remaining steps at the target length); empty phases are left out. Dense runs have no
    full-selection phase."""
    config = run["config"]
    steps, short = config["train"]["steps"], min(config["data"].get("short_steps", 0), config["train"]["steps"])
    warmup = 0 if config["model"]["attention"] == "dense" else config["model"]["nsa"].get("selection_warmup_steps", 0)
    warmup = min(max(warmup, short), steps)
    bounds = {"short": (0, short), "full selection": (short, warmup), "main": (warmup, steps)}
    return {name: (a, b) for name, (a, b) in bounds.items() if b > a}


def phase_ms_per_step(run: Run, phase: str) -> Optional[float]:
    """Mean training ms/step of ``phase`` (:func:`phase_bounds`): the step time summed over the logged windows
    (consecutive ``history`` records; ``elapsed_s`` sums step times, evaluation left out) inside the phase, the
    phase's first window left out (compilation at a new shape), over their steps; ``None`` when the run lacks the
    phase, the phase has no second window or the run shared its device."""
    bounds = phase_bounds(run)
    if phase not in bounds or not timed_alone(run):
        return None
    start, end = bounds[phase]
    marks = [(0, 0.0)] + [(r["step"], r["elapsed_s"]) for r in run["metrics"]["history"]]
    windows = [(s1 - s0, e1 - e0) for (s0, e0), (s1, e1) in zip(marks, marks[1:]) if start <= s0 and s1 <= end][1:]
    if not windows:
        return None
    return 1e3 * sum(t for _, t in windows) / sum(n for n, _ in windows)


def train_seconds(run: Run) -> Optional[float]:
    """Training time of the whole run in seconds (step times summed, evaluation left out; ``None`` for a run that
    shared its device)."""
    return run["metrics"]["train_time_s"] if timed_alone(run) else None


def tokens_per_step(run: Run) -> int:
    """Tokens per optimizer step: sequences per step times the sequence length."""
    return run["config"]["train"]["batch_size"] * run["config"]["data"]["seq_len"]


def mean(metric: Metric, runs: List[Run]) -> Optional[float]:
    """The mean of ``metric`` over the runs where it is known (``None`` where it is known for none)."""
    values = [value for value in map(metric, runs) if value is not None]
    return sum(values) / len(values) if values else None


def extent(metric: Metric, runs: List[Run]) -> Tuple[float, float]:
    """The smallest and the largest value of ``metric`` over ``runs`` (at least one)."""
    values = [metric(run) for run in runs]
    return min(values), max(values)


def difference(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """``a - b``, ``None`` if either is missing."""
    return None if a is None or b is None else a - b


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """``a / b``, ``None`` if either is missing."""
    return None if a is None or b is None else a / b


# ---------------------------------------------------------------------------------------------------- best lr

# per task: the metric that ranks learning rates and how (the best is the max or the min of the seed means)
RANKING: Dict[str, Tuple[Metric, Callable]] = {**{task: (accuracy_pct, max) for task in NEEDLE_TASKS},
                                               "lm": (eval_loss, min)}


def lr_ranking(results: Results, task: str, variant: str) -> List[float]:
    """``variant``'s learning rates on ``task``, best first: at the shortest length where it ran at several (else
    its shortest length), by mean final accuracy (needle, highest first) or mean final evaluation loss (LM, lowest
    first), the smaller first on a tie; learning rates it ran at only at other lengths follow, ascending (none
    without runs)."""
    Ts = lengths(results, task, variant)
    if not Ts:
        return []
    T = ([T for T in Ts if len(learning_rates(results, task, T, variant)) > 1] or Ts)[0]
    metric, pick = RANKING[task]
    sign = -1.0 if pick is max else 1.0
    ranked = sorted(learning_rates(results, task, T, variant),
                    key=lambda lr: (sign * mean(metric, seed_runs(results, task, T, variant, lr)), lr))
    others = sorted({lr for t, _, v, lr, _ in results if (t, v) == (task, variant)} - set(ranked))
    return ranked + others


def best_lr(results: Results, task: str, variant: str, T: Optional[int] = None) -> Optional[float]:
    """``variant``'s best learning rate on ``task`` (the first of :func:`lr_ranking`); with ``T``, the best of
    those it ran at at length ``T`` (``None`` when it never ran there)."""
    ran = set(learning_rates(results, task, T, variant)) if T is not None else None
    return next((lr for lr in lr_ranking(results, task, variant) if ran is None or lr in ran), None)


def best_runs(results: Results, task: str, T: int, variant: str) -> List[Run]:
    """The runs (one per seed) of ``variant`` at length ``T`` at its best learning rate there; empty without any."""
    lr = best_lr(results, task, variant, T)
    return [] if lr is None else seed_runs(results, task, T, variant, lr)


def shown_runs(results: Results, task: str, variant_names: Sequence[str]) -> List[Run]:
    """The best-learning-rate runs of ``variant_names`` on ``task`` at every length: the runs a table shows."""
    return [run for T in lengths(results, task) for v in variant_names for run in best_runs(results, task, T, v)]


# ---------------------------------------------------------------------------------------------------- tables

def fmt(value: Optional[float], spec: str) -> str:
    """``value`` formatted with ``spec``, or ``-`` when missing."""
    return "-" if value is None else format(value, spec)


def distinct(values, spec: str = "") -> str:
    """The distinct values, sorted, formatted with ``spec``, comma-separated."""
    return ", ".join(format(v, spec) for v in sorted(set(values)))


def spread(metric: Metric, runs: List[Run], spec: str) -> str:
    """``min-max`` of ``metric`` over ``runs`` formatted with ``spec`` (``-`` without runs)."""
    return "-" if not runs else "-".join(format(v, spec) for v in extent(metric, runs))


def runs_line(runs: List[Run]) -> str:
    """One line naming the runs' devices, versions, dates, model sizes, precisions, learning rates, seeds, steps
    and tokens per step."""
    env = [r["environment"] for r in runs]
    return (f"Runs: device {distinct(e['device'] for e in env)}; torch {distinct(e['torch'] for e in env)}; "
            f"triton {distinct(e['triton'] for e in env)}; date {distinct(e['date'] for e in env)}; "
            f"model size {distinct(r['size'] for r in runs)}; "
            f"precision {distinct(r['config']['train']['precision'] for r in runs)}; "
            f"lr {distinct((r['lr'] for r in runs), 'g')}; seeds {distinct(r['seed'] for r in runs)}; "
            f"steps {distinct(r['config']['train']['steps'] for r in runs)}; "
            f"tokens/step {distinct((tokens_per_step(r) for r in runs), ',')}.")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    """A markdown table's lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def section(title: str, runs: List[Run], header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    """A titled table: heading, the runs line, the table."""
    return [f"## {title}", "", runs_line(runs), "", *markdown_table(header, rows), ""]


def setting_columns(prefix: str, label: str) -> List[str]:
    """Header cells of :func:`setting_cells`: learning rate, seed count, mean ``label``, spread."""
    return [f"{prefix}lr", f"{prefix}seeds", f"{prefix}{label}", f"{prefix}spread"]


def setting_cells(runs: List[Run], metric: Metric, spec: str) -> List[str]:
    """One setting's cells: its learning rate, its number of seeds, the mean and the spread of ``metric`` over
    them (all ``-`` without runs)."""
    return [fmt(runs[0]["lr"] if runs else None, "g"), str(len(runs)) if runs else "-",
            fmt(mean(metric, runs), spec), spread(metric, runs, spec)]


def compared_runs(results: Results, task: str, T: int) -> List[List[Run]]:
    """The runs of each model of ``COMPARED`` at length ``T``, each at its best learning rate there."""
    return [best_runs(results, task, T, variant) for variant, _ in COMPARED]


def compared_columns(label: str) -> List[str]:
    """Header cells of :func:`compared_cells`."""
    return [cell for _, name in COMPARED for cell in setting_columns(f"{name} ", label)]


def compared_cells(groups: List[List[Run]], metric: Metric, spec: str) -> List[str]:
    """:func:`setting_cells` of each model of ``COMPARED`` (``groups`` from :func:`compared_runs`)."""
    return [cell for runs in groups for cell in setting_cells(runs, metric, spec)]


STEP_TIME_HEADER = tuple(f"{name} ms/step" for _, name in COMPARED) + tuple(
    f"{name}/dense step time" for _, name in COMPARED[:-1])


def step_time_cells(groups: List[List[Run]]) -> List[str]:
    """Each compared model's mean ms/step, then each sparse model's ratio to dense's."""
    times = [mean(ms_per_step, runs) for runs in groups]
    return [fmt(t, ".1f") for t in times] + [fmt(ratio(t, times[-1]), ".2f") for t in times[:-1]]


SWEEP_HEADER = ("task", "T", "variant", *setting_columns("", "acc %"), "eval loss", "eval loss spread", "best lr")


def sweep_rows(results: Results) -> List[List[str]]:
    """Learning-rate sweep rows: every setting (task, length, variant, learning rate), marking the best lr."""
    rows = []
    for task in TASKS:
        for T in lengths(results, task):
            for variant in variants(results, task, T):
                best = best_lr(results, task, variant)
                for lr in learning_rates(results, task, T, variant):
                    runs = seed_runs(results, task, T, variant, lr)
                    rows.append([task, f"{T:,}", variant, *setting_cells(runs, accuracy_pct, ".1f"),
                                 fmt(mean(eval_loss, runs), ".4f"), spread(eval_loss, runs, ".4f"),
                                 "yes" if lr == best else "no"])
    return rows


NEEDLE_HEADER = ("T", "needles", *compared_columns("acc %"),
                 *(f"{name} - dense (points)" for _, name in COMPARED[:-1]), *STEP_TIME_HEADER)


def needle_row(results: Results, T: int, task: str = "needle") -> List[str]:
    """Needle table row of ``task`` (a needle setting) at length ``T``: the recipe, paper NSA and dense, each at
    its best learning rate."""
    groups = compared_runs(results, task, T)
    pairs = distinct(r["config"]["data"]["retrieval"]["num_pairs"] for r in runs_at(results, task, T))
    dense = mean(accuracy_pct, groups[-1])
    return [f"{T:,}", pairs, *compared_cells(groups, accuracy_pct, ".1f"),
            *(fmt(difference(mean(accuracy_pct, runs), dense), "+.1f") for runs in groups[:-1]),
            *step_time_cells(groups)]


ABLATION_HEADER = ("T", "variant", *setting_columns("", "acc %"), "eval loss", "ms/step", "acc - NSA (points)")


def ablation_rows(results: Results, T: int) -> List[List[str]]:
    """Ablation table rows at length ``T``: every needle variant run there at its best learning rate, against
    the full NSA at its own."""
    nsa_acc = mean(accuracy_pct, best_runs(results, "needle", T, "nsa"))
    rows = []
    for variant in variants(results, "needle", T):
        runs = best_runs(results, "needle", T, variant)
        if runs:
            rows.append([f"{T:,}", variant, *setting_cells(runs, accuracy_pct, ".1f"),
                         fmt(mean(eval_loss, runs), ".4f"), fmt(mean(ms_per_step, runs), ".1f"),
                         fmt(difference(mean(accuracy_pct, runs), nsa_acc), "+.1f")])
    return rows


PHASES = ("short", "full selection", "main")
PHASE_HEADER = ("T", "variant", "lr", "seeds", *(f"{p} ms/step" for p in PHASES), "main / dense main",
                "training s", "training / dense training")


def phase_rows(results: Results, T: int) -> List[List[str]]:
    """Step time by phase at length ``T``: every needle variant run there at its best learning rate, its mean
    ms/step in each phase (:func:`phase_ms_per_step`) and its training time, each against dense's."""
    dense = best_runs(results, "needle", T, "dense")
    dense_main = mean(lambda r: phase_ms_per_step(r, "main"), dense)
    dense_train = mean(train_seconds, dense)
    rows = []
    for variant in variants(results, "needle", T):
        runs = best_runs(results, "needle", T, variant)
        means = [mean(lambda r, p=p: phase_ms_per_step(r, p), runs) for p in PHASES]
        rows.append([f"{T:,}", variant, fmt(runs[0]["lr"], "g"), str(len(runs)), *(fmt(m, ".1f") for m in means),
                     fmt(ratio(means[-1], dense_main), ".2f"), fmt(mean(train_seconds, runs), ".0f"),
                     fmt(ratio(mean(train_seconds, runs), dense_train), ".2f")])
    return rows


LM_HEADER = ("T", *compared_columns("eval loss"), *(f"{name}/dense - 1 (%)" for _, name in COMPARED[:-1]),
             *(f"{name} bits/byte" for _, name in COMPARED), *STEP_TIME_HEADER)


def lm_row(results: Results, T: int) -> List[str]:
    """LM table row at length ``T``: the recipe, paper NSA and dense, each at its best learning rate."""
    groups = compared_runs(results, "lm", T)
    dense = mean(eval_loss, groups[-1])
    relative = [ratio(mean(eval_loss, runs), dense) for runs in groups[:-1]]
    return [f"{T:,}", *compared_cells(groups, eval_loss, ".4f"),
            *(fmt(None if r is None else 100.0 * (r - 1.0), "+.2f") for r in relative),
            *(fmt(mean(bits_per_byte, runs), ".4f") for runs in groups), *step_time_cells(groups)]


def render(results: Results) -> str:
    """The markdown report: the tables whose runs exist."""
    lines = ["# Quality: NSA against dense attention", "",
             f"{len(results)} runs from `benchmarks/quality/experiment.py`. A setting is a (task, length, variant, "
             f"learning rate): its numbers are means over its seeds (`seeds` of them), its spread the {SPREAD}. "
             "Outside the sweep every variant is at its best learning rate: the highest mean final accuracy "
             "(needle) or lowest mean final evaluation loss (LM) at the shortest length where it ran at several "
             "(ties: the smaller; never run at several: its learning rate at its shortest length).", ""]
    needle_lengths, lm_lengths = lengths(results, "needle"), lengths(results, "lm")
    if len({lr for _, _, _, lr, _ in results}) > 1:
        lines += section("Learning-rate sweep", [results[k] for k in sorted(results)], SWEEP_HEADER,
                         sweep_rows(results))
    if needle_lengths:
        lines += section("Needle retrieval", shown_runs(results, "needle", MAIN_VARIANTS), NEEDLE_HEADER,
                         [needle_row(results, T) for T in needle_lengths])
    others = [task for task in NEEDLE_TASKS if task != "needle" and lengths(results, task)]
    if others:
        shown = [run for task in others for run in shown_runs(results, task, MAIN_VARIANTS)]
        lines += section("Other needle settings", shown, ("setting", *NEEDLE_HEADER),
                         [[task, *needle_row(results, T, task)] for task in others for T in lengths(results, task)])
    if set(variants(results, "needle")) - set(MAIN_VARIANTS):
        lines += section("Ablations (needle)", shown_runs(results, "needle", variants(results, "needle")),
                         ABLATION_HEADER, [row for T in needle_lengths for row in ablation_rows(results, T)])
    if needle_lengths:
        lines += section("Step time by phase (needle)", shown_runs(results, "needle", variants(results, "needle")),
                         PHASE_HEADER, [row for T in needle_lengths for row in phase_rows(results, T)])
    if lm_lengths:
        lines += section("Byte-level LM", shown_runs(results, "lm", MAIN_VARIANTS), LM_HEADER,
                         [lm_row(results, T) for T in lm_lengths])
    return "\n".join(lines)


def retrieval_summary(results: Results) -> List[Dict]:
    """One entry per needle run: ``variant`` (``"nsa-recipe"`` for runs of ``settings.RECIPE``), ``seq_len``,
    ``seed``, ``lr``, ``steps`` (optimizer steps) and ``accuracy`` (final-evaluation accuracy, a fraction)."""
    return [{"variant": "nsa-recipe" if run["variant"] == RECIPE else run["variant"], "seq_len": run["seq_len"],
             "seed": run["seed"], "lr": run["lr"], "steps": run["config"]["train"]["steps"],
             "accuracy": run["metrics"]["final_eval"]["accuracy"]}
            for key, run in sorted(results.items()) if key[0] == "needle"]


# ---------------------------------------------------------------------------------------------------- plots

def pyplot():
    """``matplotlib.pyplot`` with the Agg backend; ``ImportError`` with the install hint without matplotlib."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("the quality plots need matplotlib: pip install 'nsa-dist[bench]' (matplotlib)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def color(variant: str):
    """One colour per variant, the same in every plot: the compared models in blue (recipe), red (paper NSA) and
    orange (dense), the other variants from the 20-colour ``tab20`` map in ``settings.VARIANTS`` order."""
    fixed = {RECIPE: "tab:blue", "nsa": "tab:red", "dense": "tab:orange"}
    if variant in fixed:
        return fixed[variant]
    others = [v for v in VARIANTS if v not in fixed]
    return pyplot().get_cmap("tab20")((others.index(variant) if variant in others else len(others)) % 20)


def legend_label(results: Results, task: str, variant: str) -> str:
    """``variant`` with the learning rates it is shown at on ``task`` (its best at each length), for a legend."""
    return f"{variant} (lr {distinct((r['lr'] for r in shown_runs(results, task, [variant])), 'g')})"


def length_label(T: int) -> str:
    """``4096 -> "4k"``, ``512 -> "512"``."""
    return f"{T // 1024}k" if T >= 1024 and T % 1024 == 0 else str(T)


def mean_curve(runs: List[Run], series: str, field: str) -> Tuple[List[int], List[float]]:
    """The steps of ``metrics[series]`` that every run has, and the mean of ``field`` over the runs there."""
    curves = [{point["step"]: point[field] for point in run["metrics"][series]} for run in runs]
    steps = sorted(set.intersection(*(set(curve) for curve in curves)))
    return steps, [sum(curve[step] for curve in curves) / len(curves) for step in steps]


def chance_pct(runs: List[Run]) -> List[float]:
    """Chance accuracies (``100 / num_values``) of the needle runs, distinct."""
    return sorted({100.0 / r["config"]["data"]["retrieval"]["num_values"] for r in runs})


def draw_chance(ax, runs: List[Run]) -> None:
    """Dashed horizontal line(s) at chance accuracy."""
    for level in chance_pct(runs):
        ax.axhline(level, color="gray", linestyle="--", linewidth=1, label=f"chance ({level:.1f}%)")


def plot_needle_accuracy(results: Results, path: Path) -> None:
    """Mean final needle accuracy against length (log2 axis), error bars from the smallest to the largest seed:
    NSA and dense as lines, ablations as markers, each at its best learning rate."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ablations = [v for v in variants(results, "needle") if v not in MAIN_VARIANTS]
    for variant in variants(results, "needle"):
        points = [(T, runs) for T in lengths(results, "needle", variant)
                  if (runs := best_runs(results, "needle", T, variant))]
        means = [mean(accuracy_pct, runs) for _, runs in points]
        bounds = [extent(accuracy_pct, runs) for _, runs in points]
        errors = [[m - lo for m, (lo, _) in zip(means, bounds)], [hi - m for m, (_, hi) in zip(means, bounds)]]
        style = (dict(marker="o", linestyle="-") if variant in MAIN_VARIANTS else
                 dict(marker=ABLATION_MARKERS[ablations.index(variant) % len(ABLATION_MARKERS)], linestyle="none"))
        ax.errorbar([T for T, _ in points], means, yerr=errors, capsize=3,
                    label=legend_label(results, "needle", variant), color=color(variant), **style)
    draw_chance(ax, task_runs(results, "needle"))
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths(results, "needle"))
    ax.set_xticklabels([length_label(T) for T in lengths(results, "needle")])
    ax.minorticks_off()
    ax.set(xlabel="context length (tokens)", ylabel="final accuracy (%), mean and min-max over seeds",
           title="Multi-needle retrieval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    save(fig, path)


def plot_needle_curves(results: Results, path: Path) -> None:
    """Needle evaluation accuracy (mean over seeds) against step, one subplot per length, a line per variant at
    its best learning rate."""
    plt = pyplot()
    Ts = lengths(results, "needle")
    fig, axes = plt.subplots(1, len(Ts), figsize=(4.5 * len(Ts), 4), squeeze=False, sharey=True)
    for ax, T in zip(axes[0], Ts):
        for variant in variants(results, "needle", T):
            runs = best_runs(results, "needle", T, variant)
            if runs:
                steps, accuracy = mean_curve(runs, "evals", "accuracy")
                ax.plot(steps, [100.0 * a for a in accuracy], label=legend_label(results, "needle", variant),
                        color=color(variant))
        draw_chance(ax, runs_at(results, "needle", T))
        ax.set(title=f"T = {length_label(T)}", xlabel="step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("eval accuracy (%), mean over seeds")
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize="x-small", loc="center left",
               bbox_to_anchor=(1.0, 0.5))
    save(fig, path)


def plot_lm_loss(results: Results, path: Path) -> None:
    """LM evaluation loss (lines with markers) and training loss (faint), means over seeds, against step for NSA
    and dense at their best learning rates, one subplot per length."""
    plt = pyplot()
    Ts = lm_plot_lengths(results)
    fig, axes = plt.subplots(1, len(Ts), figsize=(4.5 * len(Ts), 4), squeeze=False)
    for ax, T in zip(axes[0], Ts):
        for variant in MAIN_VARIANTS:
            runs = best_runs(results, "lm", T, variant)
            if not runs:
                continue
            label = legend_label(results, "lm", variant)
            ax.plot(*mean_curve(runs, "history", "loss"), color=color(variant), alpha=0.35, linewidth=1,
                    label=f"{label} train")
            ax.plot(*mean_curve(runs, "evals", "loss"), color=color(variant), marker="o", markersize=3,
                    label=f"{label} eval")
        ax.set(title=f"T = {length_label(T)}", xlabel="step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss (nats/byte), mean over seeds")
    axes[0][0].legend(fontsize="small")
    save(fig, path)


def depth_accuracy(runs: List[Run]) -> Optional[List[Optional[float]]]:
    """Final accuracy (%) by needle depth bin (``diagnostics.accuracy_by_depth``), pooled over the seeds'
    answers; None when the runs predate the diagnostics."""
    diagnostics = [run["metrics"]["final_eval"].get("diagnostics") for run in runs]
    if not runs or any(d is None for d in diagnostics):
        return None
    correct = [sum((d["accuracy_by_depth"][i] or 0.0) * d["answers_by_depth"][i] for d in diagnostics)
               for i in range(len(diagnostics[0]["answers_by_depth"]))]
    answers = [sum(d["answers_by_depth"][i] for d in diagnostics) for i in range(len(correct))]
    return [None if n == 0 else 100.0 * c / n for c, n in zip(correct, answers)]


def diagnosed_variants(results: Results) -> List[str]:
    """Needle variants whose best-learning-rate runs carry depth diagnostics at some length."""
    return [v for v in variants(results, "needle")
            if any(depth_accuracy(best_runs(results, "needle", T, v)) for T in lengths(results, "needle", v))]


def plot_depth_heatmap(results: Results, path: Path) -> None:
    """Needle-in-a-haystack heatmap per variant (best learning rate): final accuracy by needle depth (rows, 0 =
    start of the sequence) and context length (columns); blank where a length was not run."""
    plt = pyplot()
    names, Ts = diagnosed_variants(results), lengths(results, "needle")
    ncols = min(4, len(names))
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * (1.6 + 0.8 * len(Ts)) + 1.2, 4.4 * nrows),
                             squeeze=False, layout="constrained")
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for n, (ax, variant) in enumerate(zip(axes.flat, names)):
        columns = [depth_accuracy(best_runs(results, "needle", T, variant)) for T in Ts]
        bins = len(next(c for c in columns if c))
        grid = [[float("nan") if c is None or c[i] is None else c[i] for c in columns] for i in range(bins)]
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if value == value:
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if value < 60 else "black")
        ax.set_xticks(range(len(Ts)), [length_label(T) for T in Ts])
        ax.set_yticks(range(bins), [f"{100 * i // bins}%" for i in range(bins)] if n % ncols == 0 else [])
        ax.set_title(legend_label(results, "needle", variant).replace(" (", "\n("), fontsize=8)
        ax.set(xlabel="context length", ylabel="needle depth" if n % ncols == 0 else "")
    fig.colorbar(image, ax=axes.flat[:len(names)], label="final accuracy (%)")
    save(fig, path)


def plot_selection_diagnostics(results: Results, path: Path) -> None:
    """Per NSA variant (best learning rate, longest length it ran at, first seed): selection recall of the
    needle's block, the compressed-attention mass on the needle and full attention's mass on the needle's block
    (``selection_key_mass``; runs recorded before it existed leave that row empty) at the answer positions,
    against step, one line per layer (mean over its KV heads); the dotted line is recall by chance (``top_n`` of
    the blocks)."""
    plt = pyplot()
    picked = []
    for variant in diagnosed_variants(results):
        T = max(lengths(results, "needle", variant))
        runs = best_runs(results, "needle", T, variant)
        if runs and runs[0]["metrics"]["evals"][-1].get("diagnostics", {}).get("layers"):
            picked.append((variant, T, runs[0]))
    fields = ("selection_recall", "compressed_mass", "selection_key_mass")
    fig, axes = plt.subplots(len(fields), max(1, len(picked)), figsize=(3.6 * max(1, len(picked)), 9),
                             squeeze=False, sharey="row")
    for j, (variant, T, run) in enumerate(picked):
        evals = run["metrics"]["evals"]
        steps = [e["step"] for e in evals]
        for layer in range(len(evals[-1]["diagnostics"]["layers"])):
            for row, field in enumerate(fields):
                per_head = [e["diagnostics"]["layers"][layer].get(field) for e in evals]
                if all(h is not None for h in per_head):
                    axes[row][j].plot(steps, [sum(h) / len(h) for h in per_head], label=f"layer {layer}")
        nsa = run["config"]["model"]["nsa"]
        blocks = -(-T // nsa["select_len"])
        axes[0][j].axhline(min(1.0, nsa["top_n"] / blocks), color="gray", linestyle=":", label="chance")
        axes[0][j].set(title=f"{variant} T={length_label(T)}")
        axes[-1][j].set(xlabel="step")
    axes[0][0].set_ylabel("selection recall of the needle")
    axes[1][0].set_ylabel("compressed mass on the needle")
    axes[2][0].set_ylabel("full attention's mass on\nthe needle's block")
    axes[0][0].legend(fontsize="x-small")
    save(fig, path)


def lm_plot_lengths(results: Results) -> List[int]:
    """The LM lengths with an NSA or a dense run at its best learning rate."""
    return [T for T in lengths(results, "lm") if any(best_runs(results, "lm", T, v) for v in MAIN_VARIANTS)]


def save(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` and close it (laid out tightly unless it has a layout engine of its own)."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")  # legends placed outside the axes stay in
    pyplot().close(fig)


def write_plots(results: Results, out: Path) -> List[Path]:
    """Draw the plots whose runs exist into ``out``; return their paths."""
    plots: List[Tuple[str, bool, Callable[[Results, Path], None]]] = [
        ("needle_accuracy.png", bool(lengths(results, "needle")), plot_needle_accuracy),
        ("needle_curves.png", bool(lengths(results, "needle")), plot_needle_curves),
        ("lm_loss.png", bool(lm_plot_lengths(results)), plot_lm_loss),
        ("needle_depth_heatmap.png", bool(diagnosed_variants(results)), plot_depth_heatmap),
        ("selection_diagnostics.png", bool(diagnosed_variants(results)), plot_selection_diagnostics),
    ]
    written = []
    for name, has_data, draw in plots:
        if has_data:
            draw(results, out / name)
            written.append(out / name)
    return written


# ---------------------------------------------------------------------------------------------------- CLI

def main(argv: Optional[List[str]] = None) -> List[Path]:
    """Write ``results.md`` (printed too), ``retrieval-summary.json`` and the plots; return the written paths."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="folders of per-run JSON files from experiment.py")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="folder for results.md, retrieval-summary.json and the plots")
    args = parser.parse_args(argv)
    results = load_results(args.dirs)
    args.out.mkdir(parents=True, exist_ok=True)
    text = render(results)
    written = [args.out / "results.md", args.out / "retrieval-summary.json"]
    written[0].write_text(text)
    written[1].write_text(json.dumps(retrieval_summary(results), indent=1))
    print(text)
    written += write_plots(results, args.out)
    print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return written


if __name__ == "__main__":
    main()
