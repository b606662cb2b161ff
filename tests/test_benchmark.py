"""benchmark/run.py and benchmark/report.py: the smoke preset end to end on the tiny dataset."""
import importlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, read_scalars

METHODS = ["iql", "iql-so2", "iql-suf", "iql-baq", "iql-our-q", "iql-our-s", "iql-baq-adaptive", "cql", "cql-off2on"]
BASELINES = ["iql-so2", "iql-suf", "cql-off2on"]


def benchmark(script, minari_store, *flags):
    environment = {**os.environ, "MINARI_DATASETS_PATH": str(minari_store), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(ROOT / "benchmark" / script), *flags], capture_output=True, text=True,
                          env=environment, timeout=900)


@pytest.fixture(scope="module")
def grid(minari_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench") / "runs"
    result = benchmark("run.py", minari_store, "--preset", "smoke", "--datasets", "baq/hopper/tiny-v0", "--methods", *METHODS,
                       "--seeds", "1", "--workers", "2", "--root", str(root))
    assert result.returncode == 0, result.stdout + result.stderr
    return root, result


def finals(root):
    return sorted(root.glob("smoke/*/*/seed*/*/final.pt"))


def test_grid_shares_one_pretraining_per_dataset_and_seed(grid):
    root, result = grid
    assert "12 runs, 0 already finished" in result.stdout
    dataset = root / "smoke" / "baq-hopper-tiny-v0"
    for pretraining in ("pretrain-iql/seed1/*/offline.pt", "pretrain-cql/seed1/*/offline.pt", "pretrain-bc/seed1/*/bc.pt"):
        assert len(list(dataset.glob(pretraining))) == 1
    assert [p.parents[2].name for p in finals(root)] == sorted(METHODS)
    for method in METHODS:  # each fine-tuning run started from the shared checkpoints
        offline = next(dataset.glob(f"pretrain-{method[:3]}/seed1/*/offline.pt"))
        if method in BASELINES:
            assert f"on {method[:3].upper()} from {offline}" in (dataset / method / "seed1" / "log.txt").read_text()
        else:
            used = torch.load(next(dataset.glob(f"{method}/seed1/*/final.pt")), weights_only=True)["args"]
            assert os.path.samefile(used["offline_checkpoint"], offline)
            assert os.path.samefile(used["bc_checkpoint"], next(dataset.glob("pretrain-bc/seed1/*/bc.pt")))


def test_rerun_after_an_interruption_redoes_only_unfinished_runs(grid, minari_store):
    root, _ = grid
    interrupted = root / "smoke" / "baq-hopper-tiny-v0" / "iql-baq" / "seed1"
    next(interrupted.glob("*/final.pt")).unlink()  # as if killed before the end
    kept = {p: p.stat().st_mtime_ns for p in finals(root)}
    result = benchmark("run.py", minari_store, "--preset", "smoke", "--datasets", "baq/hopper/tiny-v0", "--methods", *METHODS,
                       "--seeds", "1", "--root", str(root))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "12 runs, 11 already finished" in result.stdout
    assert result.stdout.count("start ") == 1 and "start  baq/hopper/tiny-v0 iql-baq seed1" in result.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert len(list(interrupted.glob("*/final.pt"))) == 1 and len([d for d in interrupted.iterdir() if d.is_dir()]) == 1


def test_a_run_that_wrote_a_resume_checkpoint_continues_from_it(tmp_path):
    """An unfinished run folder with a resume.pt (offline pretraining, SO2, SUF) is continued with --resume and
    its own arguments; one without is removed and the run starts over from the shared pretrained checkpoint."""
    run = importlib.import_module("benchmark.run")
    pretrained = tmp_path / "pretrain-iql" / "d__offline-iql__1__100"
    pretrained.mkdir(parents=True)
    (pretrained / "offline.pt").write_bytes(b"")
    offline = run.Job("d offline-iql seed1", str(pretrained.parent), "offline.pt", ["python", "offline_pretrain.py"])
    so2 = run.Job("d iql-so2 seed1", str(tmp_path / "iql-so2"), "final.pt", ["python", "so2.py", "--seed", "1"],
                  needs=[offline])
    interrupted = tmp_path / "iql-so2" / "d__iql-so2__1__200"
    interrupted.mkdir(parents=True)
    (interrupted / "resume.pt").write_bytes(b"")
    assert run.prepare(so2) == ["python", "so2.py", "--resume", str(interrupted / "resume.pt")]
    (interrupted / "resume.pt").unlink()
    assert run.prepare(so2) == ["python", "so2.py", "--seed", "1", "--offline-checkpoint", str(pretrained / "offline.pt"),
                                "--runs-dir", str(tmp_path / "iql-so2")]
    assert not interrupted.exists()


def test_first_seed_adds_later_seeds_alone(tmp_path):
    """`--first-seed 3 --seeds 4` plans seeds 3 and 4 with their own pretrainings, and nothing of seeds 1 and 2."""
    run = importlib.import_module("benchmark.run")
    jobs = run.plan(run.Args(preset="smoke", datasets=["d"], methods=["iql", "iql-baq"], seeds=4, first_seed=3,
                             root=str(tmp_path)))
    assert [job.name for job in jobs] == [f"d {kind} seed{seed}" for seed in (3, 4)
                                          for kind in ("bc", "offline-iql", "iql", "iql-baq")]
    assert all(job.command[job.command.index("--seed") + 1] == job.name[-1] for job in jobs)


def test_report_writes_tables_and_figures(grid, minari_store, tmp_path):
    root, _ = grid
    result = benchmark("report.py", minari_store, "--preset", "smoke", "--root", str(root), "--output", str(tmp_path),
                       "--bootstrap-reps", "200")
    assert result.returncode == 0, result.stdout + result.stderr
    tables = (tmp_path / "smoke" / "tables.md").read_text()
    table1 = "| dataset | IQL | IQL+SO2 | IQL+SUF | IQL+BAQ | IQL+BAQ adaptive | IQL+Our-Q | IQL+Our-S | CQL |"
    lines = tables.splitlines()
    assert lines.count(table1) == 2  # Table 1 twice (final, mean over evaluations), in the paper's column order
    assert lines.count("| dataset | CQL | Off2On |") == 2  # Table 2
    assert lines.count(table1 + " Off2On |") == 1  # the q_bias table has every method
    assert "at the end of the online budget" in tables and "averaged over the online evaluations after step 0" in tables
    rows = [line for line in lines if line.startswith("| hopper-tiny |")]
    # the offline checkpoints of IQL and CQL, Table 1 and Table 2 twice, the q_bias table
    assert [len(row.split("|")) for row in rows] == [6, 6, 11, 5, 11, 5, 12] and all("(1 run)" in row for row in rows)
    assert "| IQL hopper-tiny |" in tables  # Figure 3's table
    assert "## Figure 2: score during fine-tuning, IQL, IQL+SO2, IQL+SUF, IQL+BAQ (" in tables
    assert "| IQL+BAQ | " in tables and "| P(IQL+BAQ > IQL) | " in tables  # the rliable aggregates, leading
    assert tables.index("## Aggregates over every (dataset, seed) run") < tables.index("## Table 1")
    assert "too few runs for a verdict: 1.00" in tables  # one run on one dataset
    for figure in ("figure2.png", "figure3.png", "curves.png", "adaptive.png", "aggregates.png",
                   "aggregates-mean.png"):
        assert (tmp_path / "smoke" / figure).stat().st_size > 10_000


def test_records_carry_a_grid_to_a_machine_without_its_runs(grid, minari_store, tmp_path):
    """--save-records keeps each run's curves in a few KB of JSON; a report from the records alone (the run
    folders gone, as on a new machine) is the report from the runs."""
    root, _ = grid
    records, from_runs, from_records = tmp_path / "records", tmp_path / "from-runs", tmp_path / "from-records"
    saved = benchmark("report.py", minari_store, "--preset", "smoke", "--root", str(root), "--records", str(records),
                      "--save-records", "--output", str(from_runs), "--bootstrap-reps", "200")
    assert saved.returncode == 0, saved.stdout + saved.stderr
    files = sorted(records.glob("smoke/baq-hopper-tiny-v0/*/*.json"))
    assert [f.parent.name for f in files] == sorted(METHODS) and all(f.stat().st_size < 20_000 for f in files)
    run = next(root.glob("smoke/baq-hopper-tiny-v0/iql-baq/seed1/*/final.pt")).parent
    saved_run = json.loads((records / "smoke" / "baq-hopper-tiny-v0" / "iql-baq" / f"{run.name}.json").read_text())
    offline = next(root.glob("smoke/baq-hopper-tiny-v0/pretrain-iql/seed1/*/offline.pt")).parent
    assert saved_run["seed"] == 1 and saved_run["offline_run"] == offline.name
    offline_score = read_scalars(offline)["offline/eval/normalized_score"][-1][1]  # over the preset's 3 episodes
    assert saved_run["offline_eval"] == {"tag": "eval/normalized_score", "step": 60, "value": offline_score, "episodes": 3}
    assert saved_run["scalars"]["eval/normalized_score"] == [list(p) for p in read_scalars(run)["eval/normalized_score"]]
    alone = benchmark("report.py", minari_store, "--preset", "smoke", "--root", str(tmp_path / "gone"), "--records",
                      str(records), "--output", str(from_records), "--bootstrap-reps", "200")
    assert alone.returncode == 0, alone.stdout + alone.stderr
    tables = (from_records / "smoke" / "tables.md").read_text()
    assert tables == (from_runs / "smoke" / "tables.md").read_text()
    assert f"| hopper-tiny | IQL | seed1 (offline {offline_score:.8g}): {offline_score:.1f} (3) | {offline_score:.1f} (1 run) |" in tables


def test_a_broken_record_is_named_with_the_fix(minari_store, tmp_path):
    broken = tmp_path / "records" / "smoke" / "baq-hopper-tiny-v0" / "iql" / "run.json"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"format": "baq-run-record-1", "method": "iql", "scalars": {"eval/return": [[0, 1.0, 2.0]]}}')
    result = benchmark("report.py", minari_store, "--preset", "smoke", "--root", str(tmp_path), "--records",
                       str(tmp_path / "records"), "--output", str(tmp_path))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {broken} is not a run record") and "git checkout --" in result.stderr


def run_record(method, seed, offline_run, final_score):
    return {"dataset": "d", "method": method, "seed": seed, "offline_run": offline_run,
            "scalars": {"eval/normalized_score": [[0, 50.0], [100, final_score]]}}


def test_runs_are_told_apart_by_seed_and_offline_checkpoint_and_paired_by_them():
    """Seed 1 on two machines (two offline checkpoints) is two runs; a run folder replaces its committed record;
    Figure 3 subtracts runs that started from the same checkpoint, whatever else the cells hold."""
    report = importlib.import_module("benchmark.report")
    records = [run_record("iql-baq", 1, "d__offline-iql__1__100", 70.0), run_record("iql-baq", 1, "d__offline-iql__1__200", 90.0),
               run_record("iql-baq", 1, "d__offline-iql__1__200", 80.0),  # the same run, read again from its folder
               run_record("iql-our-q", 1, "d__offline-iql__1__200", 60.0), run_record("iql-our-q", 2, "d__offline-iql__2__300", 10.0),
               run_record("iql-our-s", 1, "d__offline-iql__1__200", 75.0), run_record("iql-our-s", 1, "d__offline-iql__1__100", 0.0)]
    curves = report.curves_of(records)
    assert list(curves[("d", "iql-baq")]) == ["seed1 (100)", "seed1 (200)"]
    assert curves[("d", "iql-baq")]["seed1 (200)"]["eval/normalized_score"][1][-1] == 80.0
    tag, triple = "eval/normalized_score", ("iql-baq", "iql-our-q", "iql-our-s")
    baq, our_q, our_s = (report.paired_finals(curves, tag, "d", triple, m) for m in triple)
    assert (baq - our_q).tolist() == [20.0] and (baq - our_s).tolist() == [5.0]


def test_two_pretrainings_of_one_seed_that_scored_alike_count_once():
    """On one machine a seed's pretraining is bit-identical when repeated: its fine-tuning runs are the same runs."""
    report = importlib.import_module("benchmark.report")
    evaluated = [{**run_record("iql", 1, f"d__offline-iql__1__{stamp}", 70.0), "offline_eval": {"value": score}}
                 for stamp, score in ((100, 45.25), (200, 45.25), (300, 12.5))]
    assert list(report.curves_of(evaluated)[("d", "iql")]) == ["seed1 (offline 12.5)", "seed1 (offline 45.25)"]


def test_report_without_runs_says_what_to_do(minari_store, tmp_path):
    result = benchmark("report.py", minari_store, "--preset", "smoke", "--root", str(tmp_path), "--output", str(tmp_path))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "python benchmark/run.py --preset smoke" in result.stderr


def test_total_is_left_out_for_a_method_missing_a_dataset():
    report = importlib.import_module("benchmark.report")
    values = {("baq-hopper-medium-v0", "iql"): np.array([60.0, 70.0]), ("baq-walker2d-medium-v0", "iql"): np.array([80.0]),
              ("baq-hopper-medium-v0", "iql-baq"): np.array([75.0, 77.0])}
    lines = report.table(values, ["baq-hopper-medium-v0", "baq-walker2d-medium-v0"], ["iql", "iql-baq"])
    assert lines[2] == "| hopper-medium | 65.0 ± 5.0 (2) | 76.0 ± 1.0 (2) |"
    assert lines[3] == "| walker2d-medium | 80.0 (1 run) |  |"
    assert lines[-1] == "| Total | 145.0 | (1 of 2 datasets) |"


def test_report_names_unfinished_runs(grid, minari_store, tmp_path):
    root, _ = grid
    unfinished = root / "smoke" / "baq-hopper-tiny-v0" / "iql-our-q" / "seed2" / "some-run"
    unfinished.mkdir(parents=True)  # a run that started and has no final.pt
    result = benchmark("report.py", minari_store, "--preset", "smoke", "--root", str(root), "--output", str(tmp_path),
                       "--bootstrap-reps", "200")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Not finished, so not in the tables: hopper-tiny IQL+Our-Q seed2." in result.stdout
    (unfinished.parent / "some-run").rmdir()
    unfinished.parent.rmdir()


@pytest.mark.parametrize("flags, words", [(["--workers", "0"], "--workers 0"), (["--seeds", "0"], "--seeds 0"),
                                          (["--seeds", "-1"], "--seeds -1"), (["--first-seed", "0"], "--first-seed 0"),
                                          (["--first-seed", "3", "--seeds", "2"], "--first-seed 3")])
def test_run_refuses_an_empty_or_endless_grid(minari_store, tmp_path, flags, words):
    result = benchmark("run.py", minari_store, "--preset", "smoke", "--datasets", "baq/hopper/tiny-v0",
                       "--root", str(tmp_path), *flags)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(f"error: {words}") and not (tmp_path / "smoke").exists()


def test_tools_leave_the_committed_results_alone():
    """speed.py and report.py write to the untracked benchmark/runs unless told to update the results."""
    speed, report = importlib.import_module("benchmark.speed"), importlib.import_module("benchmark.report")
    for output in (speed.Args().output, report.Args().output):
        assert os.path.relpath(output, ROOT).startswith(os.path.join("benchmark", "runs"))


def test_a_failed_run_is_reported_with_its_log_and_its_dependents_skipped(minari_store, tmp_path):
    store = tmp_path / "store"  # a dataset whose data file is cut: the grid starts, its first runs fail
    shutil.copytree(minari_store / "baq" / "hopper" / "tiny-v0", store / "baq" / "hopper" / "cut-v0")
    data = next((store / "baq" / "hopper" / "cut-v0").rglob("main_data.hdf5"))
    data.write_bytes(data.read_bytes()[:1000])
    result = benchmark("run.py", store, "--preset", "smoke", "--datasets", "baq/hopper/cut-v0", "--methods",
                       "iql", "iql-baq", "--seeds", "1", "--workers", "2", "--root", str(tmp_path / "runs"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "FAILED baq/hopper/cut-v0 offline-iql seed1 (exit 1)" in result.stdout
    assert "| error: --env-id 'baq/hopper/cut-v0'" in result.stdout  # the log's last line, shown
    assert "0 of 4 runs finished, 2 failed, 2 skipped" in result.stdout


def test_a_missing_dataset_stops_the_grid_before_any_run(minari_store, tmp_path):
    """Issue 34: the grid's last dataset missing fails at once, not after the runs of the others."""
    result = benchmark("run.py", minari_store, "--preset", "smoke", "--datasets", "baq/hopper/tiny-v0",
                       "baq/hopper/missing-v0", "--methods", "iql", "--root", str(tmp_path))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: --datasets baq/hopper/missing-v0: not in the Minari store")
    assert not (tmp_path / "smoke").exists()


def test_a_run_whose_curve_was_cut_is_not_counted_as_finished(grid, minari_store, tmp_path):
    """Issue 34, row 7: a kill after final.pt and before the events were all on disk (the order before) must not
    make the report take the step-0 score for the final one."""
    root, _ = grid
    cut_root = tmp_path / "runs"
    shutil.copytree(root, cut_root)  # the grid, with its IQL run's events file cut
    cut = next(cut_root.glob("smoke/baq-hopper-tiny-v0/iql/seed1/*/final.pt")).parent
    events = next(cut.glob("events.out.tfevents.*"))
    steps = [step for step, _ in read_scalars(cut)["eval/normalized_score"]]
    while steps and steps[-1] == 70:  # cut the file until its last evaluation is gone
        events.write_bytes(events.read_bytes()[:-200])
        steps = [step for step, _ in read_scalars(cut)["eval/normalized_score"]]
    result = benchmark("report.py", minari_store, "--preset", "smoke", "--root", str(cut_root), "--output",
                       str(tmp_path / "report"), "--records", str(tmp_path / "no-records"), "--bootstrap-reps", "200")
    output = result.stdout + result.stderr
    assert "Not finished, so not in the tables: hopper-tiny IQL seed1 (its curve ends at step" in output, output
    assert "of 70: events file cut)" in output


def test_aggregates_match_hand_computation():
    """rliable's IQM (the mean of the middle half), the mean, and P(X > Y) = the share of run pairs X wins."""
    report = importlib.import_module("benchmark.report")
    runs = np.arange(1.0, 9.0)
    final = {("d", "iql"): runs, ("d", "iql-baq"): runs + 10, ("d", "iql-our-s"): runs + 0.5}
    stats = report.aggregates(final, ["d"], ["iql", "iql-baq", "iql-our-s"], reps=300)
    np.testing.assert_allclose(stats["points"]["iql"], [4.5, 4.5])  # IQM of 1..8: mean(3, 4, 5, 6)
    np.testing.assert_allclose(stats["points"]["iql-baq"], [14.5, 14.5])
    low, high = stats["intervals"]["iql"][:, 0]
    assert 1.0 < low <= 4.5 <= high < 8.0  # the interval brackets the IQM and lies strictly inside the runs' range
    improvement = stats["improvement"][0]
    assert improvement["iql-baq,iql"] == pytest.approx(1.0)
    assert improvement["iql-our-s,iql"] == pytest.approx(36 / 64)  # x_i = i + 0.5 beats y_j = j for j <= i


def test_aggregates_are_the_same_in_every_report():
    """Both bootstraps are seeded, whatever numpy's global generator did before (rliable's probability of
    improvement draws from it)."""
    report = importlib.import_module("benchmark.report")
    rng = np.random.default_rng(0)
    final = {(d, m): rng.normal(size=3) for d in ("d1", "d2") for m in ("iql", "iql-baq", "iql-our-q")}
    intervals = []
    for draws in (1, 7):
        np.random.rand(draws)
        stats = report.aggregates(final, ["d1", "d2"], ["iql", "iql-baq", "iql-our-q"], reps=300)
        intervals.append([np.ravel(stats["improvement"][1][p]) for p in ("iql-baq,iql", "iql-our-q,iql")] +
                         [stats["intervals"][m] for m in ("iql", "iql-baq")])
    for first, second in zip(*intervals):
        np.testing.assert_array_equal(first, second)


def test_aggregates_of_an_uneven_grid_keep_every_run():
    """Baselines on fewer datasets and methods with fewer seeds neither drop datasets nor runs from BAQ's
    comparison with its backbone: each backbone leads with the datasets where it and its BAQ ran, and each method
    left out is compared where it ran (SO2 on d1, BAQ adaptive on d2: neither shrinks the other's group)."""
    report = importlib.import_module("benchmark.report")
    final = {("d1", "iql"): np.arange(3.0), ("d2", "iql"): np.arange(4.0), ("d1", "iql-baq"): np.arange(2.0) + 10,
             ("d2", "iql-baq"): np.arange(2.0) + 10, ("d1", "iql-so2"): np.arange(1.0), ("d1", "cql"): np.arange(2.0),
             ("d2", "iql-baq-adaptive"): np.arange(2.0) + 20}
    groups = report.aggregate_groups(final, ["d1", "d2"], ["iql", "iql-so2", "iql-baq", "iql-baq-adaptive", "cql"])
    assert groups == [(["d1", "d2"], ["iql", "iql-baq"]), (["d1"], ["iql", "iql-so2", "iql-baq"]),
                      (["d2"], ["iql", "iql-baq", "iql-baq-adaptive"]), (["d1"], ["cql"])]
    adaptive = report.aggregates(final, *groups[2], reps=200)["improvement"][0]
    assert set(adaptive) == {"iql-baq,iql", "iql-baq-adaptive,iql", "iql-baq-adaptive,iql-baq"}
    assert adaptive["iql-baq-adaptive,iql-baq"] == pytest.approx(1.0)  # 20, 21 beat 10, 11: the constraint over BAQ
    stats = report.aggregates(final, *groups[0], reps=200)
    assert stats["runs"] == {"iql": 3, "iql-baq": 2}  # IQL's fewest on one dataset (3 on d1), not BAQ's 2
    np.testing.assert_allclose(stats["points"]["iql"][1], 1.0)  # mean of 0, 1, 2 on both datasets
    lines = report.aggregate_lines(stats)
    assert "Over 2 datasets (d1, d2) x 2/3 seeds." in "\n".join(lines) and "| IQL | 6 | " in "\n".join(lines)
    # complete separation of 2 runs against 3 on two datasets: p = 2 / C(5, 2)^2 = 0.02 allows a verdict
    assert next(line for line in lines if line.startswith("| P(IQL+BAQ > IQL) |")).endswith("| yes, X better |")


def test_a_dataset_with_a_single_new_seed_waits_out_of_the_aggregates():
    """A grid growing seed by seed: d3's first seed (and BAQ adaptive's on d2) would cut every other dataset to one
    run, so they stay out of the groups, named, until their second seed; with every cell at one run, one is used."""
    report = importlib.import_module("benchmark.report")
    final = {(d, m): np.arange(2.0) for d in ("d1", "d2") for m in ("iql", "iql-baq")}
    final.update({("d3", "iql"): np.zeros(1), ("d3", "iql-baq"): np.zeros(1), ("d1", "iql-baq-adaptive"): np.arange(2.0),
                  ("d2", "iql-baq-adaptive"): np.zeros(1)})
    groups = report.aggregate_groups(final, ["d1", "d2", "d3"], ["iql", "iql-baq", "iql-baq-adaptive"])
    assert groups == [(["d1", "d2"], ["iql", "iql-baq"]), (["d1"], ["iql", "iql-baq", "iql-baq-adaptive"])]
    assert report.outside_aggregates(final, groups) == [("d2", "iql-baq-adaptive", 1), ("d3", "iql", 1),
                                                        ("d3", "iql-baq", 1)]
    single = {key: values[:1] for key, values in final.items()}
    groups = report.aggregate_groups(single, ["d1", "d2", "d3"], ["iql", "iql-baq", "iql-baq-adaptive"])
    assert groups == [(["d1", "d2", "d3"], ["iql", "iql-baq"]), (["d1", "d2"], ["iql", "iql-baq", "iql-baq-adaptive"])]
    assert report.outside_aggregates(single, groups) == []


def test_aggregates_keep_the_runs_from_the_checkpoints_most_methods_share():
    """hopper has 4 IQL runs from two machines' checkpoints (A: IQL only; B: IQL and SO2), halfcheetah 2: the 2
    hopper runs kept for IQL are B's, the ones SO2 also started from, whichever names sort first; the rest is named."""
    report = importlib.import_module("benchmark.report")

    def runs(scores):
        return {key: {"eval/normalized_score": (np.array([0, 5000]), np.array([0.0, score]))} for key, score in scores.items()}
    hopper, cheetah = "baq-hopper-medium-v0", "baq-halfcheetah-medium-v0"
    curves = {(hopper, "iql"): runs({"seed1 (A)": 10.0, "seed1 (B)": 50.0, "seed2 (A)": 20.0, "seed2 (B)": 60.0}),
              (hopper, "iql-so2"): runs({"seed1 (B)": 55.0, "seed2 (B)": 65.0}),
              (cheetah, "iql"): runs({"seed1 (C)": 40.0, "seed2 (C)": 42.0})}
    final = report.aggregate_scores(curves, "eval/normalized_score", [hopper, cheetah], ["iql", "iql-so2"])
    np.testing.assert_array_equal(final[(hopper, "iql")], [50.0, 60.0, 10.0, 20.0])
    stats = report.aggregates(final, [hopper, cheetah], ["iql"], reps=100)
    assert stats["runs"] == {"iql": 2} and stats["left_out"] == {(hopper, "iql"): 2}
    np.testing.assert_allclose(stats["points"]["iql"][1], (50 + 60 + 40 + 42) / 4)  # B's hopper runs, not A's
    assert "Left out (a method counts as many runs on each dataset as on its fewest; those kept come from the " \
           "offline checkpoints most methods started from): IQL 2 runs on hopper-medium." in report.aggregate_lines(stats)


@pytest.mark.parametrize("runs, datasets, verdict", [(2, 1, "too few runs for a verdict: 0.33"),
                                                     (3, 1, "too few runs for a verdict: 0.10"),
                                                     (4, 1, "yes, X better"), (2, 3, "yes, X better")])
def test_no_verdict_where_complete_separation_could_be_chance(runs, datasets, verdict):
    """Every run of BAQ beats every run of IQL: the bootstrap interval is [1, 1] at any size, but with n runs per
    dataset on d datasets chance alone separates them with probability 2 / C(2n, n)^d (two-sided)."""
    report = importlib.import_module("benchmark.report")
    names = [f"d{i}" for i in range(datasets)]
    final = {(d, m): np.arange(runs) + (10.0 if m == "iql-baq" else 0.0) for d in names for m in ("iql", "iql-baq")}
    stats = report.aggregates(final, names, ["iql", "iql-baq"], reps=200)
    row = next(line for line in report.aggregate_lines(stats) if line.startswith("| P(IQL+BAQ > IQL) |"))
    assert row.endswith(f"| 1.00 [1.00, 1.00] | {verdict} |")


def test_grids_started_together_do_not_trip_over_the_root_check(tmp_path):
    """Two run.py started at once on one --root both pass its writability check (a shared probe file did not)."""
    from concurrent.futures import ThreadPoolExecutor
    run = importlib.import_module("benchmark.run")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: [run.probe_writable(str(tmp_path)) for _ in range(200)], range(8)))
    assert list(tmp_path.iterdir()) == []
