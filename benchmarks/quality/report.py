"""Tables and plots of the quality experiment from the per-run JSON files that ``experiment.py`` writes.

    python benchmarks/quality/report.py RESULT_DIR [RESULT_DIR ...] --out benchmarks/quality/results

Reads every ``*.json`` in the folders (one run each: a task, a length, a variant) and writes to ``--out``:
``results.md`` (also printed) with the needle-retrieval table (NSA against dense per length), the needle
ablations and the byte-level LM table, each under a line naming the runs' device, versions, steps and tokens per
step; and the plots whose runs exist: ``needle_accuracy.png`` (final accuracy against length),
``needle_curves.png`` (evaluation accuracy against step, per length) and ``lm_loss.png`` (evaluation and
training loss against step, per length). Accuracies are final-evaluation accuracies in percent, losses
final-evaluation cross-entropies in nats per token (per byte for the LM), ms/step the median steady step time.
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

from settings import VARIANTS  # noqa: E402

Key = Tuple[str, int, str]  # (task, seq_len, variant)
Run = Dict
Results = Dict[Key, Run]

MAIN_VARIANTS = ("nsa", "dense")
ABLATION_MARKERS = ("s", "^", "v", "D", "P", "X")


# ---------------------------------------------------------------------------------------------------- loading

def load_results(dirs: Sequence[Path]) -> Results:
    """Every ``*.json`` run in ``dirs`` keyed by ``(task, seq_len, variant)``; each run gets its file as
    ``"source"``. Raises ``ValueError`` naming both files when a key appears twice."""
    results: Results = {}
    for folder in dirs:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder} is not a folder of result files")
        for path in sorted(Path(folder).glob("*.json")):
            run = read_run(path)
            key = (run["task"], run["seq_len"], run["variant"])
            if key in results:
                raise ValueError(f"{key[0]} T={key[1]} {key[2]} appears twice: {results[key]['source']} and {path}")
            results[key] = run
    if not results:
        raise FileNotFoundError(f"no *.json results in {', '.join(map(str, dirs))}")
    return results


def read_run(path: Path) -> Run:
    """One result file, checked to be a quality run, with ``"source"`` set to its path."""
    run = json.loads(Path(path).read_text())
    missing = [k for k in ("task", "seq_len", "variant", "config", "environment", "metrics") if k not in run]
    if missing:
        raise ValueError(f"{path} is not a quality-experiment result (no {', '.join(missing)})")
    return {**run, "source": str(path)}


def lengths(results: Results, task: str) -> List[int]:
    """The sequence lengths that ``task`` has runs at, ascending."""
    return sorted({T for t, T, _ in results if t == task})


def variants(results: Results, task: str, seq_len: Optional[int] = None) -> List[str]:
    """The variants ``task`` has runs of (at ``seq_len`` if given), in ``settings.VARIANTS`` order."""
    present = {v for t, T, v in results if t == task and seq_len in (None, T)}
    order = list(VARIANTS)
    return sorted(present, key=lambda v: (order.index(v) if v in order else len(order), v))


def runs_of(results: Results, task: str, variant_names: Optional[Sequence[str]] = None) -> List[Run]:
    """The runs of ``task`` (only ``variant_names`` if given), by length then variant."""
    return [results[k] for k in sorted(results) if k[0] == task and (variant_names is None or k[2] in variant_names)]


def runs_at(results: Results, task: str, T: int) -> List[Run]:
    """The runs of ``task`` at length ``T``."""
    return [run for (t, length, _), run in sorted(results.items()) if t == task and length == T]


# ---------------------------------------------------------------------------------------------------- metrics

def accuracy_pct(run: Optional[Run]) -> Optional[float]:
    """Final-evaluation accuracy in percent (``None`` without a run)."""
    return None if run is None else 100.0 * run["metrics"]["final_eval"]["accuracy"]


def eval_loss(run: Optional[Run]) -> Optional[float]:
    """Final-evaluation loss in nats per token (``None`` without a run)."""
    return None if run is None else run["metrics"]["final_eval"]["loss"]


def bits_per_byte(run: Optional[Run]) -> Optional[float]:
    """Final-evaluation loss in bits (byte-level LM: bits per byte)."""
    loss = eval_loss(run)
    return None if loss is None else loss / math.log(2)


def ms_per_step(run: Optional[Run]) -> Optional[float]:
    """Median steady step time in milliseconds (``None`` without a run)."""
    return None if run is None else 1e3 * run["metrics"]["step_time_s"]


def difference(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """``a - b``, ``None`` if either is missing."""
    return None if a is None or b is None else a - b


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """``a / b``, ``None`` if either is missing."""
    return None if a is None or b is None else a / b


def tokens_per_step(run: Run) -> int:
    """Tokens per optimizer step: sequences per step times the sequence length."""
    return run["config"]["train"]["batch_size"] * run["config"]["data"]["seq_len"]


# ---------------------------------------------------------------------------------------------------- tables

def fmt(value: Optional[float], spec: str) -> str:
    """``value`` formatted with ``spec``, or ``-`` when missing."""
    return "-" if value is None else format(value, spec)


def distinct(values, spec: str = "") -> str:
    """The distinct values, sorted, formatted with ``spec``, comma-separated."""
    return ", ".join(format(v, spec) for v in sorted(set(values)))


def runs_line(runs: List[Run]) -> str:
    """One line naming the runs' devices, versions, dates, model sizes, precisions, steps and tokens per step."""
    env = [r["environment"] for r in runs]
    return (f"Runs: device {distinct(e['device'] for e in env)}; torch {distinct(e['torch'] for e in env)}; "
            f"triton {distinct(e['triton'] for e in env)}; date {distinct(e['date'] for e in env)}; "
            f"model size {distinct(r['size'] for r in runs)}; "
            f"precision {distinct(r['config']['train']['precision'] for r in runs)}; "
            f"steps {distinct(r['config']['train']['steps'] for r in runs)}; "
            f"tokens/step {distinct((tokens_per_step(r) for r in runs), ',')}.")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    """A markdown table's lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def section(title: str, runs: List[Run], header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    """A titled table: heading, the runs line, the table."""
    return [f"## {title}", "", runs_line(runs), "", *markdown_table(header, rows), ""]


NEEDLE_HEADER = ("T", "needles", "NSA acc %", "dense acc %", "NSA - dense (points)", "NSA ms/step",
                 "dense ms/step", "dense/NSA step time")


def needle_row(results: Results, T: int) -> List[str]:
    """Needle table row at length ``T``: NSA against dense."""
    nsa, dense = results.get(("needle", T, "nsa")), results.get(("needle", T, "dense"))
    pairs = distinct(r["config"]["data"]["retrieval"]["num_pairs"] for r in runs_at(results, "needle", T))
    return [f"{T:,}", pairs, fmt(accuracy_pct(nsa), ".1f"), fmt(accuracy_pct(dense), ".1f"),
            fmt(difference(accuracy_pct(nsa), accuracy_pct(dense)), "+.1f"), fmt(ms_per_step(nsa), ".1f"),
            fmt(ms_per_step(dense), ".1f"), fmt(ratio(ms_per_step(dense), ms_per_step(nsa)), ".2f")]


ABLATION_HEADER = ("T", "variant", "acc %", "eval loss", "ms/step", "acc - NSA (points)")


def ablation_rows(results: Results, T: int) -> List[List[str]]:
    """Ablation table rows at length ``T``: every needle variant run there, against the full NSA."""
    nsa_acc = accuracy_pct(results.get(("needle", T, "nsa")))
    rows = []
    for variant in variants(results, "needle", T):
        run = results[("needle", T, variant)]
        rows.append([f"{T:,}", variant, fmt(accuracy_pct(run), ".1f"), fmt(eval_loss(run), ".4f"),
                     fmt(ms_per_step(run), ".1f"), fmt(difference(accuracy_pct(run), nsa_acc), "+.1f")])
    return rows


LM_HEADER = ("T", "NSA eval loss", "dense eval loss", "NSA/dense - 1 (%)", "NSA bits/byte", "dense bits/byte",
             "NSA ms/step", "dense ms/step", "dense/NSA step time")


def lm_row(results: Results, T: int) -> List[str]:
    """LM table row at length ``T``: NSA against dense."""
    nsa, dense = results.get(("lm", T, "nsa")), results.get(("lm", T, "dense"))
    relative = ratio(eval_loss(nsa), eval_loss(dense))
    return [f"{T:,}", fmt(eval_loss(nsa), ".4f"), fmt(eval_loss(dense), ".4f"),
            fmt(None if relative is None else 100.0 * (relative - 1.0), "+.2f"),
            fmt(bits_per_byte(nsa), ".4f"), fmt(bits_per_byte(dense), ".4f"), fmt(ms_per_step(nsa), ".1f"),
            fmt(ms_per_step(dense), ".1f"), fmt(ratio(ms_per_step(dense), ms_per_step(nsa)), ".2f")]


def render(results: Results) -> str:
    """The markdown report: the tables whose runs exist."""
    lines = ["# Quality: NSA against dense attention", "",
             f"{len(results)} runs from `benchmarks/quality/experiment.py`.", ""]
    needle_lengths, lm_lengths = lengths(results, "needle"), lengths(results, "lm")
    if needle_lengths:
        lines += section("Needle retrieval", runs_of(results, "needle"), NEEDLE_HEADER,
                         [needle_row(results, T) for T in needle_lengths])
    if set(variants(results, "needle")) - set(MAIN_VARIANTS):
        lines += section("Ablations (needle)", runs_of(results, "needle"), ABLATION_HEADER,
                         [row for T in needle_lengths for row in ablation_rows(results, T)])
    if lm_lengths:
        lines += section("Byte-level LM", runs_of(results, "lm"), LM_HEADER, [lm_row(results, T) for T in lm_lengths])
    return "\n".join(lines)


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


def color(variant: str) -> str:
    """One colour per variant, the same in every plot."""
    order = list(VARIANTS)
    return f"C{order.index(variant) if variant in order else len(order)}"


def length_label(T: int) -> str:
    """``4096 -> "4k"``, ``512 -> "512"``."""
    return f"{T // 1024}k" if T >= 1024 and T % 1024 == 0 else str(T)


def chance_pct(runs: List[Run]) -> List[float]:
    """Chance accuracies (``100 / num_values``) of the needle runs, distinct."""
    return sorted({100.0 / r["config"]["data"]["retrieval"]["num_values"] for r in runs})


def draw_chance(ax, runs: List[Run]) -> None:
    """Dashed horizontal line(s) at chance accuracy."""
    for level in chance_pct(runs):
        ax.axhline(level, color="gray", linestyle="--", linewidth=1, label=f"chance ({level:.1f}%)")


def plot_needle_accuracy(results: Results, path: Path) -> None:
    """Final needle accuracy against length (log2 axis): NSA and dense as lines, ablations as markers."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ablations = [v for v in variants(results, "needle") if v not in MAIN_VARIANTS]
    for variant in variants(results, "needle"):
        points = [(T, accuracy_pct(results[("needle", T, variant)])) for T in lengths(results, "needle")
                  if ("needle", T, variant) in results]
        style = (dict(marker="o", linestyle="-") if variant in MAIN_VARIANTS else
                 dict(marker=ABLATION_MARKERS[ablations.index(variant) % len(ABLATION_MARKERS)], linestyle="none"))
        ax.plot(*zip(*points), label=variant, color=color(variant), **style)
    draw_chance(ax, runs_of(results, "needle"))
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths(results, "needle"))
    ax.set_xticklabels([length_label(T) for T in lengths(results, "needle")])
    ax.minorticks_off()
    ax.set(xlabel="context length (tokens)", ylabel="final accuracy (%)", title="Multi-needle retrieval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save(fig, path)


def plot_needle_curves(results: Results, path: Path) -> None:
    """Needle evaluation accuracy against step, one subplot per length, a line per variant."""
    plt = pyplot()
    Ts = lengths(results, "needle")
    fig, axes = plt.subplots(1, len(Ts), figsize=(4.5 * len(Ts), 4), squeeze=False, sharey=True)
    for ax, T in zip(axes[0], Ts):
        for variant in variants(results, "needle", T):
            evals = results[("needle", T, variant)]["metrics"]["evals"]
            ax.plot([e["step"] for e in evals], [100.0 * e["accuracy"] for e in evals], label=variant,
                    color=color(variant))
        draw_chance(ax, runs_at(results, "needle", T))
        ax.set(title=f"T = {length_label(T)}", xlabel="step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("eval accuracy (%)")
    axes[0][0].legend(fontsize="small")
    save(fig, path)


def plot_lm_loss(results: Results, path: Path) -> None:
    """LM evaluation loss (lines with markers) and training loss (faint) against step for NSA and dense, one
    subplot per length."""
    plt = pyplot()
    Ts = lm_plot_lengths(results)
    fig, axes = plt.subplots(1, len(Ts), figsize=(4.5 * len(Ts), 4), squeeze=False)
    for ax, T in zip(axes[0], Ts):
        for variant in MAIN_VARIANTS:
            run = results.get(("lm", T, variant))
            if run is None:
                continue
            evals, history = run["metrics"]["evals"], run["metrics"]["history"]
            ax.plot([h["step"] for h in history], [h["loss"] for h in history], color=color(variant), alpha=0.35,
                    linewidth=1, label=f"{variant} train")
            ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], color=color(variant), marker="o",
                    markersize=3, label=f"{variant} eval")
        ax.set(title=f"T = {length_label(T)}", xlabel="step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss (nats/byte)")
    axes[0][0].legend(fontsize="small")
    save(fig, path)


def lm_plot_lengths(results: Results) -> List[int]:
    """The LM lengths with an NSA or a dense run."""
    return sorted({T for t, T, v in results if t == "lm" and v in MAIN_VARIANTS})


def save(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    pyplot().close(fig)


def write_plots(results: Results, out: Path) -> List[Path]:
    """Draw the plots whose runs exist into ``out``; return their paths."""
    plots: List[Tuple[str, bool, Callable[[Results, Path], None]]] = [
        ("needle_accuracy.png", bool(lengths(results, "needle")), plot_needle_accuracy),
        ("needle_curves.png", bool(lengths(results, "needle")), plot_needle_curves),
        ("lm_loss.png", bool(lm_plot_lengths(results)), plot_lm_loss),
    ]
    written = []
    for name, has_data, draw in plots:
        if has_data:
            draw(results, out / name)
            written.append(out / name)
    return written


# ---------------------------------------------------------------------------------------------------- CLI

def main(argv: Optional[List[str]] = None) -> List[Path]:
    """Write ``results.md`` (printed too) and the plots; return the written paths."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="folders of per-run JSON files from experiment.py")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for results.md and the plots")
    args = parser.parse_args(argv)
    results = load_results(args.dirs)
    args.out.mkdir(parents=True, exist_ok=True)
    text = render(results)
    (args.out / "results.md").write_text(text)
    print(text)
    plots = write_plots(results, args.out)
    print("wrote " + ", ".join(str(p) for p in [args.out / "results.md", *plots]), file=sys.stderr)
    return [args.out / "results.md", *plots]


if __name__ == "__main__":
    main()
