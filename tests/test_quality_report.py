"""benchmarks/quality/report.py on real (tiny, CPU) runs of benchmarks/quality/experiment.py: the tables carry the
runs' numbers, the plots are PNGs, and a run given twice is an error naming both files."""
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"
NEEDLE_VARIANTS = ("nsa", "dense", "nsa-no-window")


def load(name: str):
    """A module of benchmarks/quality by file (the scripts import their siblings by bare name)."""
    spec = importlib.util.spec_from_file_location(f"quality_{name}", QUALITY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


report = load("report")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A folder of tiny CPU runs: needle at 256 and 512 (NSA, dense, no window), LM at 256 (NSA, dense)."""
    experiment = load("experiment")
    out = tmp_path_factory.mktemp("runs")
    common = dict(out=out, size="tiny", steps=6, tokens_per_step=1024, lr=2e-3, seed=0, precision="fp32",
                  device="cpu", progress=False)
    for T in (256, 512):
        experiment.run_setting("needle", T, list(NEEDLE_VARIANTS), **common)
    experiment.run_setting("lm", 256, ["nsa", "dense"], **common)
    return out


def run_json(folder: Path, task: str, T: int, variant: str) -> dict:
    return json.loads((folder / f"{task}-{T}-{variant}.json").read_text())


def final(result: dict, key: str) -> float:
    return result["metrics"]["final_eval"][key]


def ms(result: dict) -> float:
    return 1e3 * result["metrics"]["step_time_s"]


def as_printed(value: float, spec: str) -> float:
    """``value`` as the report formats it, parsed back."""
    return float(format(value, spec))


def table(markdown: str, title: str) -> list:
    """The rows of the table under ``## title`` as ``{column: cell}``."""
    lines = markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    return [dict(zip(rows[0], row)) for row in rows[2:]]


def by_length(rows: list) -> dict:
    return {int(row["T"].replace(",", "")): row for row in rows}


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def run_report(argv: list) -> None:
    """``report.main(argv)``; without matplotlib its ImportError (raised after results.md) is let pass."""
    try:
        report.main(argv)
    except ImportError:
        if importlib.util.find_spec("matplotlib") is not None:
            raise


@pytest.fixture(scope="module")
def written(runs, tmp_path_factory):
    """``(results.md text, out folder)`` of the report on ``runs``."""
    out = tmp_path_factory.mktemp("report")
    run_report([str(runs), "--out", str(out)])
    return (out / "results.md").read_text(), out


def test_needle_table_matches_runs(runs, written):
    text, _ = written
    rows = by_length(table(text, "Needle retrieval"))
    assert sorted(rows) == [256, 512]
    for T, row in rows.items():
        nsa, dense = run_json(runs, "needle", T, "nsa"), run_json(runs, "needle", T, "dense")
        assert int(row["needles"]) == nsa["config"]["data"]["retrieval"]["num_pairs"]
        assert number(row["NSA acc %"]) == as_printed(100 * final(nsa, "accuracy"), ".1f")
        assert number(row["dense acc %"]) == as_printed(100 * final(dense, "accuracy"), ".1f")
        assert number(row["NSA - dense (points)"]) == as_printed(
            100 * (final(nsa, "accuracy") - final(dense, "accuracy")), "+.1f")
        assert number(row["NSA ms/step"]) == as_printed(ms(nsa), ".1f")
        assert number(row["dense ms/step"]) == as_printed(ms(dense), ".1f")
        assert number(row["dense/NSA step time"]) == as_printed(ms(dense) / ms(nsa), ".2f")


def test_ablation_table_matches_runs(runs, written):
    text, _ = written
    rows = {(int(r["T"].replace(",", "")), r["variant"]): r for r in table(text, "Ablations (needle)")}
    assert sorted(rows) == sorted((T, v) for T in (256, 512) for v in NEEDLE_VARIANTS)
    for (T, variant), row in rows.items():
        result, nsa = run_json(runs, "needle", T, variant), run_json(runs, "needle", T, "nsa")
        assert number(row["acc %"]) == as_printed(100 * final(result, "accuracy"), ".1f")
        assert number(row["eval loss"]) == as_printed(final(result, "loss"), ".4f")
        assert number(row["ms/step"]) == as_printed(ms(result), ".1f")
        assert number(row["acc - NSA (points)"]) == as_printed(
            100 * (final(result, "accuracy") - final(nsa, "accuracy")), "+.1f")


def test_lm_table_matches_runs(runs, written):
    text, _ = written
    rows = by_length(table(text, "Byte-level LM"))
    assert sorted(rows) == [256]
    row, nsa, dense = rows[256], run_json(runs, "lm", 256, "nsa"), run_json(runs, "lm", 256, "dense")
    assert number(row["NSA eval loss"]) == as_printed(final(nsa, "loss"), ".4f")
    assert number(row["dense eval loss"]) == as_printed(final(dense, "loss"), ".4f")
    assert number(row["NSA/dense - 1 (%)"]) == as_printed(100 * (final(nsa, "loss") / final(dense, "loss") - 1),
                                                          "+.2f")
    assert number(row["NSA bits/byte"]) == as_printed(final(nsa, "loss") / math.log(2), ".4f")
    assert number(row["dense bits/byte"]) == as_printed(final(dense, "loss") / math.log(2), ".4f")
    assert number(row["NSA ms/step"]) == as_printed(ms(nsa), ".1f")
    assert number(row["dense ms/step"]) == as_printed(ms(dense), ".1f")
    assert number(row["dense/NSA step time"]) == as_printed(ms(dense) / ms(nsa), ".2f")


def test_runs_line_names_environment_steps_and_tokens(runs, written):
    text, _ = written
    env = run_json(runs, "lm", 256, "nsa")["environment"]
    lines = [line for line in text.splitlines() if line.startswith("Runs: ")]
    assert len(lines) == 3  # one per table
    for line in lines:
        for value in (env["device"], env["torch"], env["triton"], env["date"], "steps 6", "tokens/step 1,024"):
            assert value in line


def test_missing_variant_is_a_dash(runs, tmp_path):
    only_nsa = tmp_path / "nsa"
    only_nsa.mkdir()
    shutil.copy(runs / "needle-256-nsa.json", only_nsa)
    run_report([str(only_nsa), "--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "results.md").read_text()
    row = by_length(table(text, "Needle retrieval"))[256]
    dense_columns = ("dense acc %", "NSA - dense (points)", "dense ms/step", "dense/NSA step time")
    assert [row[c] for c in dense_columns] == ["-"] * 4
    assert "## Ablations" not in text
    assert not (tmp_path / "out" / "lm_loss.png").exists()  # no LM runs: no LM plot


def test_plots_are_pngs(written):
    pytest.importorskip("matplotlib")
    _, out = written
    for name in ("needle_accuracy.png", "needle_curves.png", "lm_loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_duplicate_run_names_both_files(runs, tmp_path):
    again = tmp_path / "again"
    again.mkdir()
    copy = Path(shutil.copy(runs / "needle-512-dense.json", again / "rerun.json"))
    with pytest.raises(ValueError, match="appears twice") as error:
        report.main([str(runs), str(again), "--out", str(tmp_path / "out")])
    assert str(runs / "needle-512-dense.json") in str(error.value) and str(copy) in str(error.value)


def test_plots_without_matplotlib_say_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"nsa-dist\[bench\]"):
        report.pyplot()
