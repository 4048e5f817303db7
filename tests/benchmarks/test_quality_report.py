"""benchmarks/quality/report.py on real (tiny, CPU) runs of benchmarks/quality/experiment.py at two learning rates
and two seeds: the tables carry the means over seeds at each variant's best learning rate, the recipe's alias
reads as the recipe, the phase step times are the logged step times' means, the retrieval summary lists every
needle run, the plots are PNGs, files from before the sweep still load, and a run given twice is an error naming
both files."""
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest

from tests.helpers.quality_scripts import load

pytestmark = pytest.mark.slow  # trains models

LRS, SEEDS = (1e-3, 3e-3), (0, 1)

report = load("report")
RECIPE = load("settings").RECIPE


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A folder of tiny CPU runs: needle at 256 (NSA and dense at two lrs x two seeds, no window at one lr and
    seed; the recipe under its alias "nsa-recipe", after 2 steps on 128-token sequences, at one lr and seed),
    needle at 512 and LM at 256 (NSA and dense at the two lrs, one seed), the 4-pair needle setting at 256 (NSA and
    dense at one lr and seed)."""
    experiment = load("experiment")
    out = tmp_path_factory.mktemp("runs")
    common = dict(out=out, size="tiny", steps=6, tokens_per_step=1024, precision="fp32", device="cpu",
                  progress=False)
    experiment.run_setting(["needle"], [256], ["nsa", "dense"], lrs=LRS, seeds=SEEDS, **common)
    experiment.run_setting(["needle"], [256], ["nsa-no-window"], lrs=LRS[:1], seeds=SEEDS[:1], **common)
    experiment.run_setting(["needle"], [256], ["nsa-recipe"], lrs=LRS[:1], seeds=SEEDS[:1], short_seq_len=128,
                           short_steps=2, **common)
    experiment.run_setting(["needle"], [512], ["nsa", "dense"], lrs=LRS, seeds=SEEDS[:1], **common)
    experiment.run_setting(["lm"], [256], ["nsa", "dense"], lrs=LRS, seeds=SEEDS[:1], **common)
    experiment.run_setting(["needle-4pairs"], [256], ["nsa", "dense"], lrs=LRS[:1], seeds=SEEDS[:1], **common)
    return out


# ------------------------------------------------------------------------ the expected numbers, from the JSON files

Setting = Tuple[str, int, str, float]  # (task, seq_len, variant, lr)


def settings(folder: Path) -> Dict[Setting, List[dict]]:
    """The runs in ``folder`` read here (not by the report), grouped by setting (runs of the alias "nsa-recipe"
    under the recipe's name), each group ordered by seed."""
    groups: Dict[Setting, List[dict]] = {}
    for path in sorted(folder.glob("*.json")):
        run = json.loads(path.read_text())
        variant = RECIPE if run["variant"] == "nsa-recipe" else run["variant"]
        groups.setdefault((run["task"], run["seq_len"], variant, run["lr"]), []).append(run)
    return {key: sorted(group, key=lambda run: run["seed"]) for key, group in groups.items()}


def accuracy(run: dict) -> float:
    return 100 * run["metrics"]["final_eval"]["accuracy"]


def loss(run: dict) -> float:
    return run["metrics"]["final_eval"]["loss"]


def ms(run: dict) -> float:
    return 1e3 * run["metrics"]["step_time_s"]


def average(metric: Callable[[dict], float], group: List[dict]) -> float:
    return sum(metric(run) for run in group) / len(group)


def lrs_at(groups: Dict[Setting, List[dict]], task: str, T: int, variant: str) -> List[float]:
    return sorted(lr for t, length, v, lr in groups if (t, length, v) == (task, T, variant))


def expected_best(groups: Dict[Setting, List[dict]], task: str, variant: str) -> float:
    """The best lr by the documented rule: at the shortest length with several lrs, the highest mean accuracy
    (needle) or lowest mean loss (LM), the smaller lr on a tie."""
    Ts = sorted({T for t, T, v, _ in groups if (t, v) == (task, variant)})
    T = next((T for T in Ts if len(lrs_at(groups, task, T, variant)) > 1), Ts[0])
    if task == "lm":
        def score(lr):
            return average(loss, groups[task, T, variant, lr])
    else:
        def score(lr):
            return -average(accuracy, groups[task, T, variant, lr])
    return min(lrs_at(groups, task, T, variant), key=score)


def best_group(groups: Dict[Setting, List[dict]], task: str, T: int, variant: str) -> List[dict]:
    """The runs of ``variant`` at ``T`` at its best lr, or (the best did not run there) at its other lr run there
    (each variant here ran at two lrs at most); empty if it never ran at ``T``."""
    ran = lrs_at(groups, task, T, variant)
    if not ran:
        return []
    best = expected_best(groups, task, variant)
    return groups[task, T, variant, best if best in ran else ran[0]]


def expected_cells(group: List[dict], metric: Callable[[dict], float], spec: str) -> List[str]:
    """A setting's lr, seed count, mean and min-max spread of ``metric``, formatted as the report prints them."""
    if not group:
        return ["-"] * 4
    values = [metric(run) for run in group]
    return [format(group[0]["lr"], "g"), str(len(group)), format(average(metric, group), spec),
            f"{min(values):{spec}}-{max(values):{spec}}"]


def cells(row: dict, prefix: str, label: str) -> List[str]:
    """A table row's lr, seeds, mean and spread cells of the columns named with ``prefix``."""
    return [row[f"{prefix}lr"], row[f"{prefix}seeds"], row[f"{prefix}{label}"], row[f"{prefix}spread"]]


# ------------------------------------------------------------------------ reading the report

def table(markdown: str, title: str) -> List[dict]:
    """The rows of the table under ``## title`` as ``{column: cell}``."""
    lines = markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    return [dict(zip(rows[0], row)) for row in rows[2:]]


def length(row: dict) -> int:
    return int(row["T"].replace(",", ""))


def by_length(rows: List[dict]) -> Dict[int, dict]:
    return {length(row): row for row in rows}


def run_report(argv: list) -> None:
    """``report.main(argv)``; without matplotlib its ImportError (raised after results.md and the retrieval summary)
    is let pass."""
    try:
        report.main(argv)
    except ImportError:
        if importlib.util.find_spec("matplotlib") is not None:
            raise


def copy_runs(source: Path, target: Path, keep: Callable[[str], bool] = lambda name: True,
              edit: Callable[[dict], None] = lambda run: None) -> Path:
    """The runs of ``source`` whose file name passes ``keep``, changed in place by ``edit``, written to ``target``."""
    target.mkdir()
    for path in sorted(source.glob("*.json")):
        if keep(path.name):
            run = json.loads(path.read_text())
            edit(run)
            (target / path.name).write_text(json.dumps(run))
    return target


@pytest.fixture(scope="module")
def written(runs, tmp_path_factory):
    """``(results.md text, out folder)`` of the report on ``runs``."""
    out = tmp_path_factory.mktemp("report")
    run_report([str(runs), "--out", str(out)])
    return (out / "results.md").read_text(), out


# ------------------------------------------------------------------------ tests

def test_sweep_table_has_every_setting_with_means_over_seeds(runs, written):
    text, _ = written
    groups = settings(runs)
    rows = {(r["task"], length(r), r["variant"], float(r["lr"])): r for r in table(text, "Learning-rate sweep")}
    assert sorted(rows) == sorted(groups)
    assert {len(groups["needle", 256, "nsa", lr]) for lr in LRS} == {2}  # means over two seeds
    for key, row in rows.items():
        group = groups[key]
        assert cells(row, "", "acc %") == expected_cells(group, accuracy, ".1f")
        assert [row["eval loss"], row["eval loss spread"]] == expected_cells(group, loss, ".4f")[2:]
        assert row["best lr"] == ("yes" if key[3] == expected_best(groups, key[0], key[2]) else "no")


COMPARED = ((RECIPE, "recipe"), ("nsa", "NSA"), ("dense", "dense"))


def optional_format(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def mean_or_none(metric: Callable[[dict], float], group: List[dict]):
    return average(metric, group) if group else None


def assert_compared(row: dict, groups: Dict[Setting, List[dict]], task: str, T: int, metric, spec: str,
                    label: str) -> None:
    """The recipe's, paper NSA's and dense's cells and step times of a needle or LM row."""
    compared = {name: best_group(groups, task, T, variant) for variant, name in COMPARED}
    for name, group in compared.items():
        assert cells(row, f"{name} ", label) == expected_cells(group, metric, spec)
        assert row[f"{name} ms/step"] == optional_format(mean_or_none(ms, group), ".1f")
    dense_ms = mean_or_none(ms, compared["dense"])
    for name in ("recipe", "NSA"):
        sparse_ms = mean_or_none(ms, compared[name])
        assert row[f"{name}/dense step time"] == optional_format(
            None if sparse_ms is None or dense_ms is None else sparse_ms / dense_ms, ".2f")


def test_needle_table_is_recipe_and_nsa_against_dense_at_their_best_lrs(runs, written):
    text, _ = written
    groups = settings(runs)
    rows = by_length(table(text, "Needle retrieval"))
    assert sorted(rows) == [256, 512]
    for T, row in rows.items():
        assert_compared(row, groups, "needle", T, accuracy, ".1f", "acc %")
        nsa, dense = best_group(groups, "needle", T, "nsa"), best_group(groups, "needle", T, "dense")
        assert int(row["needles"]) == nsa[0]["config"]["data"]["retrieval"]["num_pairs"]
        assert row["NSA - dense (points)"] == format(average(accuracy, nsa) - average(accuracy, dense), "+.1f")
    recipe = groups["needle", 256, RECIPE, LRS[0]]
    assert rows[256]["recipe - dense (points)"] == format(
        average(accuracy, recipe) - average(accuracy, best_group(groups, "needle", 256, "dense")), "+.1f")
    assert [rows[256]["NSA seeds"], rows[512]["NSA seeds"], rows[256]["recipe seeds"]] == ["2", "1", "1"]
    assert cells(rows[512], "recipe ", "acc %") == ["-"] * 4  # the recipe ran at 256 only
    assert rows[512]["recipe - dense (points)"] == "-"


def test_other_needle_settings_table_compares_each_setting(runs, written):
    text, _ = written
    groups = settings(runs)
    (row,) = table(text, "Other needle settings")
    assert (row["setting"], length(row), row["needles"]) == ("needle-4pairs", 256, "4")
    assert_compared(row, groups, "needle-4pairs", 256, accuracy, ".1f", "acc %")
    assert "needle-4pairs" not in table(text, "Needle retrieval")[0].values()


def test_ablation_table_has_every_variant_at_its_best_lr(runs, written):
    text, _ = written
    groups = settings(runs)
    rows = {(length(r), r["variant"]): r for r in table(text, "Ablations (needle)")}
    assert sorted(rows) == sorted([(256, "nsa"), (256, "dense"), (256, "nsa-no-window"), (256, RECIPE),
                                   (512, "nsa"), (512, "dense")])
    for (T, variant), row in rows.items():
        group, nsa = best_group(groups, "needle", T, variant), best_group(groups, "needle", T, "nsa")
        assert cells(row, "", "acc %") == expected_cells(group, accuracy, ".1f")
        assert row["eval loss"] == format(average(loss, group), ".4f")
        assert row["ms/step"] == format(average(ms, group), ".1f")
        assert row["acc - NSA (points)"] == format(average(accuracy, group) - average(accuracy, nsa), "+.1f")


def test_lm_table_is_nsa_against_dense_at_their_lowest_loss_lrs(runs, written):
    text, _ = written
    groups = settings(runs)
    rows = by_length(table(text, "Byte-level LM"))
    assert sorted(rows) == [256]
    row, nsa, dense = rows[256], best_group(groups, "lm", 256, "nsa"), best_group(groups, "lm", 256, "dense")
    assert_compared(row, groups, "lm", 256, loss, ".4f", "eval loss")
    assert row["NSA/dense - 1 (%)"] == format(100 * (average(loss, nsa) / average(loss, dense) - 1), "+.2f")
    assert row["recipe/dense - 1 (%)"] == "-"  # no LM run of the recipe
    assert row["NSA bits/byte"] == format(average(loss, nsa) / math.log(2), ".4f")
    assert row["dense bits/byte"] == format(average(loss, dense) / math.log(2), ".4f")


def test_runs_lines_name_environment_lrs_seeds_steps_and_tokens(runs, written):
    text, _ = written
    env = json.loads(next(runs.glob("lm-*.json")).read_text())["environment"]
    lines = [line for line in text.splitlines() if line.startswith("Runs: ")]
    assert len(lines) == 6  # one per table
    for line in lines:
        for value in (env["device"], env["torch"], env["triton"], env["date"], "steps 6", "tokens/step 1,024"):
            assert value in line
    assert "lr 0.001, 0.003; seeds 0, 1;" in lines[0]  # the sweep: every run


def test_retrieval_summary_lists_every_needle_run(runs, written):
    _, out = written
    summary = json.loads((out / "retrieval-summary.json").read_text())
    needle = [run for run in (json.loads(path.read_text()) for path in sorted(runs.glob("*.json")))
              if run["task"] == "needle"]  # the measured setting only
    assert len(summary) == len(needle) == 14
    assert sorted(map(json.dumps, summary)) == sorted(
        json.dumps({"variant": r["variant"], "seq_len": r["seq_len"], "seed": r["seed"], "lr": r["lr"],
                    "steps": 6, "accuracy": r["metrics"]["final_eval"]["accuracy"]}) for r in needle)


def test_best_lr_is_chosen_by_seed_means_at_the_shortest_swept_length(runs, tmp_path):
    """Accuracies and losses set so that the rule's choice differs from one seed's, the longest length's, the
    largest lr's on a tie and the highest loss's."""
    chosen = {("needle", 256, "nsa", 1e-3): (0.5, 0.1), ("needle", 256, "nsa", 3e-3): (0.2, 0.3),
              ("needle", 512, "nsa", 1e-3): (0.0,), ("needle", 512, "nsa", 3e-3): (0.9,),
              ("needle", 256, "dense", 1e-3): (0.25, 0.25), ("needle", 256, "dense", 3e-3): (0.25, 0.25)}
    losses = {("lm", 256, "nsa", 1e-3): 2.0, ("lm", 256, "nsa", 3e-3): 3.0}

    def edit(run):
        key = (run["task"], run["seq_len"], run["variant"], run["lr"])
        final = run["metrics"]["final_eval"]
        final["accuracy"] = chosen.get(key, (final["accuracy"],) * 2)[run["seed"]]
        final["loss"] = losses.get(key, final["loss"])

    results = report.load_results([copy_runs(runs, tmp_path / "edited", edit=edit)])
    assert report.best_lr(results, "needle", "nsa") == 1e-3  # means 30% against 25%, at 256
    assert report.best_lr(results, "needle", "dense") == 1e-3  # a tie: the smaller
    assert report.best_lr(results, "lm", "nsa") == 1e-3  # the lower loss
    rows = by_length(table(report.render(results), "Needle retrieval"))
    assert cells(rows[256], "NSA ", "acc %") == ["0.001", "2", "30.0", "10.0-50.0"]
    assert cells(rows[512], "NSA ", "acc %") == ["0.001", "1", "0.0", "0.0-0.0"]


def test_missing_variant_is_a_dash_and_a_length_without_the_best_lr_shows_the_next(runs, tmp_path):
    groups = settings(runs)
    best = expected_best(groups, "needle", "nsa")
    other_lr = next(lr for lr in LRS if lr != best)
    kept = copy_runs(runs, tmp_path / "nsa", keep=lambda name: name.startswith("needle-256-nsa-lr")
                     or name == f"needle-512-nsa-lr{other_lr:g}-s0.json")
    run_report([str(kept), "--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "results.md").read_text()
    rows = by_length(table(text, "Needle retrieval"))
    missing = ("dense lr", "dense seeds", "dense acc %", "dense spread", "NSA - dense (points)", "dense ms/step",
               "NSA/dense step time", "recipe lr", "recipe acc %", "recipe ms/step")
    assert [rows[256][c] for c in missing] == ["-"] * len(missing)
    # its best lr (chosen at 256) did not run at 512: the row shows the lr that did
    assert cells(rows[512], "NSA ", "acc %") == expected_cells(groups["needle", 512, "nsa", other_lr], accuracy, ".1f")
    assert cells(rows[256], "NSA ", "acc %") == expected_cells(groups["needle", 256, "nsa", best], accuracy, ".1f")
    assert "## Ablations" not in text
    assert not (tmp_path / "out" / "lm_loss.png").exists()  # no LM runs: no LM plot


def test_alias_run_of_another_model_is_refused(runs, tmp_path):
    def widen_window(run):
        run["config"]["model"]["nsa"]["window"] += 1

    edited = copy_runs(runs, tmp_path / "alias", keep=lambda name: "nsa-recipe" in name, edit=widen_window)
    with pytest.raises(ValueError, match="ran variant 'nsa-recipe' with another model than today's recipe"):
        report.load_results([edited])
    assert {key[2] for key in report.load_results([runs])} >= {RECIPE}
    assert "nsa-recipe" not in {key[2] for key in report.load_results([runs])}


def test_phase_step_times_are_the_logged_windows_means(runs, tmp_path):
    """A 12-step run logged every 2 steps, 3 short steps and a full-selection warm-up to step 8: each phase's
    mean is its windows' step time over their steps, the first window of each phase (and any window across a
    phase boundary) left out."""
    elapsed = [0.0]
    for step in range(1, 13):  # step time 10 ms in the short phase, 30 ms in the warm-up, 20 ms after
        elapsed.append(elapsed[-1] + (0.010 if step <= 3 else 0.030 if step <= 8 else 0.020) * step)

    def phases(run):
        run["config"]["train"]["steps"] = 12
        run["config"]["data"]["short_steps"] = 3
        run["config"]["model"]["nsa"]["selection_warmup_steps"] = 8
        run["metrics"]["history"] = [{"step": s, "elapsed_s": elapsed[s]} for s in range(1, 13)]

    folder = copy_runs(runs, tmp_path / "phases", keep=lambda name: name == "needle-256-nsa-lr0.001-s0.json",
                       edit=phases)
    run = next(iter(report.load_results([folder]).values()))
    assert report.phase_bounds(run) == {"short": (0, 3), "full selection": (3, 8), "main": (8, 12)}
    # short: windows (0,1] (1,2] (2,3], the first left out; warm-up: (3,4] ... (7,8], the first left out
    assert report.phase_ms_per_step(run, "short") == pytest.approx(1e3 * (elapsed[3] - elapsed[1]) / 2)
    assert report.phase_ms_per_step(run, "full selection") == pytest.approx(1e3 * (elapsed[8] - elapsed[4]) / 4)
    assert report.phase_ms_per_step(run, "main") == pytest.approx(1e3 * (elapsed[12] - elapsed[9]) / 3)
    rows = {r["variant"]: r for r in table(report.render(report.load_results([folder])), "Step time by phase (needle)")}
    assert rows["nsa"]["full selection ms/step"] == format(1e3 * (elapsed[8] - elapsed[4]) / 4, ".1f")
    assert rows["nsa"]["main / dense main"] == "-"  # no dense run


def test_runs_that_shared_the_device_give_accuracies_but_no_step_times(runs, tmp_path):
    """A run trained beside others (``experiment.py --jobs``) keeps its accuracy in the tables; its ms/step and
    phase times are dashes, and a setting's mean step time comes from its seeds that ran alone."""
    def shared(run):
        run["concurrent_runs"] = 2 if run["seed"] == 1 or run["variant"] == "dense" else 1

    folder = copy_runs(runs, tmp_path / "shared", keep=lambda name: name.startswith("needle-256-"), edit=shared)
    results = report.load_results([folder])
    groups = settings(folder)
    best = expected_best(groups, "needle", "nsa")
    text = report.render(results)
    row = by_length(table(text, "Needle retrieval"))[256]
    assert cells(row, "NSA ", "acc %") == expected_cells(groups["needle", 256, "nsa", best], accuracy, ".1f")
    alone = [run for run in groups["needle", 256, "nsa", best] if run["seed"] == 0]
    assert row["NSA ms/step"] == format(average(ms, alone), ".1f")
    assert row["dense ms/step"] == "-" and row["NSA/dense step time"] == "-"
    phases = {r["variant"]: r for r in table(text, "Step time by phase (needle)")}
    assert phases["dense"]["main ms/step"] == "-" and phases["dense"]["training s"] == "-"
    assert phases["nsa"]["training s"] != "-"


def test_runs_trained_at_once_equal_runs_trained_in_turn(tmp_path):
    """``experiment.py --jobs 2``: each run in its own process gives the losses of the same run trained alone
    (CPU, fp32), records that two runs shared the device, and a spent time budget starts none. The script is
    loaded under its own name, as ``python experiment.py`` lets the spawned workers import it."""
    experiment = load("experiment", "experiment")
    common = dict(size="tiny", steps=3, tokens_per_step=512, precision="fp32", device="cpu", progress=False,
                  lrs=LRS[:1], seeds=SEEDS)
    alone = experiment.run_setting(["needle"], [256], ["dense"], out=tmp_path / "alone", **common)
    shared = experiment.run_setting(["needle"], [256], ["dense"], out=tmp_path / "shared", jobs=2, **common)
    assert [run["concurrent_runs"] for run in alone] == [1, 1]
    assert [run["concurrent_runs"] for run in shared] == [2, 2]
    for a, b in zip(alone, shared):
        assert a["seed"] == b["seed"]
        assert a["metrics"]["final_eval"]["loss"] == b["metrics"]["final_eval"]["loss"]
        assert json.loads((tmp_path / "shared" / experiment.run_name("needle", 256, "dense", LRS[0], b["seed"]))
                          .read_text())["metrics"]["final_eval"] == b["metrics"]["final_eval"]
    assert experiment.run_setting(["needle"], [512], ["dense"], out=tmp_path / "late", jobs=2, budget_s=-1,
                                  **common) == []


def test_files_without_lr_and_seed_keys_still_load(runs, tmp_path):
    def strip(run):
        del run["lr"], run["seed"]

    legacy = copy_runs(runs, tmp_path / "legacy", edit=strip)
    assert "lr" not in json.loads(next(legacy.glob("*.json")).read_text())
    old, new = report.load_results([legacy]), report.load_results([runs])
    assert sorted(old) == sorted(new)
    assert report.render(old) == report.render(new)


def test_plots_are_pngs(written):
    pytest.importorskip("matplotlib")
    _, out = written
    for name in ("needle_accuracy.png", "needle_curves.png", "lm_loss.png", "needle_depth_heatmap.png",
                 "selection_diagnostics.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_depth_heatmap_pools_the_seeds_answers(runs):
    """The heatmap's cell is correct answers over answers at that needle depth, summed over the seeds' runs."""
    group = settings(runs)[("needle", 256, "nsa", LRS[0])]
    assert len(group) == len(SEEDS)
    diagnostics = [run["metrics"]["final_eval"]["diagnostics"] for run in group]
    expected = []
    for i in range(len(diagnostics[0]["answers_by_depth"])):
        answers = sum(d["answers_by_depth"][i] for d in diagnostics)
        correct = sum(d["accuracy_by_depth"][i] * d["answers_by_depth"][i] for d in diagnostics
                      if d["accuracy_by_depth"][i] is not None)
        expected.append(None if answers == 0 else 100 * correct / answers)
    got = report.depth_accuracy(report.seed_runs(report.load_results([runs]), "needle", 256, "nsa", LRS[0]))
    assert got == pytest.approx(expected)
    assert sum(d["answers_by_depth"][i] for d in diagnostics for i in range(len(expected))) == \
        sum(run["config"]["data"]["retrieval"]["num_pairs"] * run["config"]["train"]["batch_size"] *
            run["config"]["train"]["eval_batches"] for run in group)


def test_duplicate_run_names_both_files(runs, tmp_path):
    again = tmp_path / "again"
    again.mkdir()
    original = runs / "needle-512-dense-lr0.003-s0.json"
    copy = Path(shutil.copy(original, again / "rerun.json"))
    with pytest.raises(ValueError, match="needle T=512 dense lr 0.003 seed 0 appears twice") as error:
        report.main([str(runs), str(again), "--out", str(tmp_path / "out")])
    assert str(original) in str(error.value) and str(copy) in str(error.value)


def test_plots_without_matplotlib_say_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"nsa-dist\[bench\]"):
        report.pyplot()
