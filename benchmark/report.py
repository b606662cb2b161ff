# Tables and figures from the runs of benchmark/run.py, read from their TensorBoard event files and from the
# committed run records (benchmark/results/records: each run's curves, a few KB, so a grid can span machines):
# Table 1 (methods x datasets), Table 2 (CQL, Off2On, Our-S), Figure 2 (IQL, SO2, SUF and BAQ during
# fine-tuning), every method's curves, Figure 3 (the drop when Our-Q or Our-S is removed from BAQ),
# the adaptive constraint against BAQ with its lambda_t, and eval/q_bias.
#
#   python benchmark/report.py --preset cpu                               # writes benchmark/runs/report/cpu/
#   python benchmark/report.py --preset cpu --output benchmark/results    # updates the committed results
#   python benchmark/report.py --preset cpu --save-records                # records this machine's runs, to commit
import math
import os
import platform
import textwrap
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD_LABELS = {"iql": "IQL", "iql-so2": "IQL+SO2", "iql-suf": "IQL+SUF", "iql-baq": "IQL+BAQ",
                 "iql-baq-adaptive": "IQL+BAQ adaptive", "iql-our-q": "IQL+Our-Q", "iql-our-s": "IQL+Our-S",
                 "cql": "CQL", "cql-so2": "CQL+SO2", "cql-suf": "CQL+SUF", "cql-baq": "CQL+BAQ",
                 "cql-baq-adaptive": "CQL+BAQ adaptive", "cql-our-q": "CQL+Our-Q", "cql-our-s": "CQL+Our-S",
                 "cql-off2on": "Off2On",
                 # the other reading of Eq. 10 (--offline-priorities): the offline data has its rho too
                 "iql-baq-offline-rho": "IQL+BAQ offline rho", "iql-our-s-offline-rho": "IQL+Our-S offline rho",
                 "iql-baq-offline-rho-adaptive": "IQL+BAQ offline rho adaptive",
                 "cql-baq-offline-rho": "CQL+BAQ offline rho", "cql-our-s-offline-rho": "CQL+Our-S offline rho",
                 "cql-baq-offline-rho-adaptive": "CQL+BAQ offline rho adaptive",
                 "iql-baq-kq4": "IQL+BAQ k_q x4", "iql-baq-kq16": "IQL+BAQ k_q x16"}
METHOD_ORDER = ["iql", "iql-so2", "iql-suf", "iql-baq", "iql-baq-adaptive", "iql-our-q", "iql-our-s",
                "iql-baq-offline-rho", "iql-baq-offline-rho-adaptive", "iql-our-s-offline-rho", "iql-baq-kq4", "iql-baq-kq16",
                "cql", "cql-so2", "cql-suf", "cql-baq", "cql-baq-adaptive", "cql-our-q", "cql-our-s",
                "cql-baq-offline-rho", "cql-baq-offline-rho-adaptive", "cql-our-s-offline-rho", "cql-off2on"]
# one color per method in every figure; a CQL variant takes its IQL counterpart's color and is drawn dashed
METHOD_COLORS = {method: "C7" if method == "cql-off2on" else f"C{i % 7}" for i, method in enumerate(METHOD_LABELS)}
TABLE2_METHODS = ["cql", "cql-off2on", "cql-our-s"]  # the paper's Table 2: CQL, Off2On, Our-S
FIGURE2_METHODS = ["iql", "iql-so2", "iql-suf", "iql-baq"]  # the paper's Figure 2
# the paper's Table 1 (D4RL v2, 4 seeds), for orientation
PAPER_TABLE1 = {
    "halfcheetah-medium-expert": {"iql": "85.1 ± 6.3", "iql-baq": "78.5 ± 11.2", "cql": "57.0 ± 19.0", "cql-baq": "75.3 ± 11.4"},
    "hopper-medium-expert": {"iql": "61.9 ± 45.0", "iql-baq": "88.7 ± 28.3", "cql": "93.3 ± 23.0", "cql-baq": "102.3 ± 14.7"},
    "walker2d-medium-expert": {"iql": "109.6 ± 1.4", "iql-baq": "109.9 ± 1.8", "cql": "110.1 ± 0.6", "cql-baq": "109.3 ± 0.99"},
    "halfcheetah-medium-replay": {"iql": "44.8 ± 1.3", "iql-baq": "44.7 ± 0.7", "cql": "47.8 ± 0.4", "cql-baq": "46.0 ± 0.95"},
    "hopper-medium-replay": {"iql": "83.4 ± 15.3", "iql-baq": "86.1 ± 19.0", "cql": "95.3 ± 2.5", "cql-baq": "92.8 ± 9.5"},
    "walker2d-medium-replay": {"iql": "66.2 ± 14.8", "iql-baq": "76.3 ± 10.5", "cql": "82.3 ± 4.4", "cql-baq": "76.2 ± 6.0"},
    "halfcheetah-medium": {"iql": "47.7 ± 0.5", "iql-baq": "47.7 ± 0.3", "cql": "48.6 ± 0.5", "cql-baq": "48.4 ± 0.46"},
    "hopper-medium": {"iql": "64.5 ± 9.7", "iql-baq": "70.6 ± 8.4", "cql": "70.8 ± 4.2", "cql-baq": "68.9 ± 8.48"},
    "walker2d-medium": {"iql": "80.4 ± 6.0", "iql-baq": "83.9 ± 3.1", "cql": "82.7 ± 0.7", "cql-baq": "82.4 ± 1.63"},
}


@dataclass
class Args:
    preset: Literal["smoke", "cpu", "paper"] = "cpu"
    """the preset whose runs to report"""
    root: str = os.path.join(ROOT, "benchmark", "runs")
    """where benchmark/run.py put the runs"""
    output: str = os.path.join(ROOT, "benchmark", "runs", "report")
    """tables and figures go to {output}/{preset}/ (untracked by default; --output benchmark/results updates the
    committed results)"""
    records: str = os.path.join(ROOT, "benchmark", "results", "records")
    """committed run records (a few KB of JSON per run: its evaluation curves and its offline checkpoint), read beside
    the runs under --root, so that a grid spread over machines and sessions is reported whole"""
    save_records: bool = False
    """write a record of every finished run under --root into --records (commit them: run folders are large and
    stay on the machine that ran them)"""
    bootstrap_reps: int = 5000
    """bootstrap replications of the aggregate statistics' confidence intervals"""


def read_runs(root: str, preset: str, missing: List[str] = None) -> List[dict]:
    """A record (see `record`) of every finished fine-tuning run of run.py's layout under {root}/{preset}; each
    unfinished one is named in `missing`."""
    import torch

    records, missing, offline_scores = [], [] if missing is None else missing, {}
    top = os.path.join(root, preset)
    for dataset in sorted(os.listdir(top)) if os.path.isdir(top) else []:
        for method in [m for m in METHOD_ORDER if os.path.isdir(os.path.join(top, dataset, m))]:
            for seed_dir in sorted(os.listdir(os.path.join(top, dataset, method))):
                folder = os.path.join(top, dataset, method, seed_dir)
                runs = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
                if not runs or not os.path.exists(os.path.join(folder, runs[-1], "final.pt")):
                    missing.append(f"{short_name(dataset)} {METHOD_LABELS[method]} {seed_dir}")
                    continue
                run_args = torch.load(os.path.join(folder, runs[-1], "final.pt"), map_location="cpu", weights_only=True)["args"]
                scalars = scalars_of(os.path.join(folder, runs[-1]), RECORDED_TAGS)
                last = scalars.get("eval/return", [[None]])[-1][0]
                if last != run_args["online_steps"]:  # a cut events file: its last point is not the final score
                    missing.append(f"{short_name(dataset)} {METHOD_LABELS[method]} {seed_dir} (its curve ends at step "
                                   f"{last} of {run_args['online_steps']}: events file cut)")
                    continue
                offline = run_args.get("offline_checkpoint")
                if offline and offline not in offline_scores:
                    offline_scores[offline] = offline_evaluation(offline)
                records.append(record(preset, dataset, method, run_args, runs[-1], scalars, offline_scores.get(offline)))
    return records


RECORDED_TAGS = ("eval/normalized_score", "eval/return", "eval/q_bias", "baq/constraint_coef", "baq/w_mean", "baq/rho_mean",
                 "baq/online_fraction", "baq/online_weight_share")


def scalars_of(run_dir: str, tags) -> Dict[str, list]:
    """{tag: [[step, value], ...]} of the tags a run's event file has."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [[e.step, e.value] for e in accumulator.Scalars(tag)] for tag in tags if tag in accumulator.Tags()["scalars"]}


def offline_evaluation(checkpoint: str) -> Optional[dict]:
    """The offline checkpoint's own last evaluation (offline_pretrain.py's, over its --eval-episodes), or None where
    its run folder is gone."""
    import torch

    if not os.path.exists(checkpoint):
        return None
    episodes = torch.load(checkpoint, map_location="cpu", weights_only=True)["args"]["eval_episodes"]
    scalars = scalars_of(os.path.dirname(checkpoint), ("offline/eval/normalized_score", "offline/eval/return"))
    tag = next(iter(scalars), None)
    return {"tag": tag.removeprefix("offline/"), "step": scalars[tag][-1][0], "value": scalars[tag][-1][1],
            "episodes": episodes} if tag else None


def record(preset: str, dataset: str, method: str, run_args: dict, run: str, scalars: dict, offline_eval) -> dict:
    """What the report needs of one run, a few KB of JSON: its evaluation curves, and which offline checkpoint it
    fine-tuned (all methods of one (dataset, seed) share it, so runs are paired by it across methods) with that
    checkpoint's own evaluation."""
    offline = run_args.get("offline_checkpoint")
    return {"format": RECORD_FORMAT, "preset": preset, "dataset": dataset, "method": method, "seed": run_args["seed"],
            "run": run, "offline_run": os.path.basename(os.path.dirname(offline)) if offline else run,
            "offline_eval": offline_eval, "scalars": scalars,
            "recorded_on": {"cpu": cpu_name(), "python": platform.python_version()}}


RECORD_FORMAT = "baq-run-record-1"


def cpu_name() -> str:
    """The CPU's model name (same-seed runs are bit-identical only on the same kind of machine)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def run_key(run: dict) -> str:
    """One run's name in a cell: its seed and the offline checkpoint it fine-tuned, named by that checkpoint's own
    score (else by its pretraining's start time). Pretrainings of one seed on one machine are bit-identical, so the
    runs of two such checkpoints count once; another machine's checkpoint scores otherwise and counts apart.
    Methods pair by it."""
    offline = run.get("offline_eval")
    checkpoint = f"offline {offline['value']:.8g}" if offline else run["offline_run"].rsplit("__", 1)[-1]
    return f"seed{run['seed']} ({checkpoint})"


def read_records(folder: str, preset: str) -> List[dict]:
    """The committed records under {folder}/{preset}; a file that is not one stops the report with its name."""
    import json

    records = []
    for directory, _, files in sorted(os.walk(os.path.join(folder, preset))):
        for name in sorted(f for f in files if f.endswith(".json")):
            path = os.path.join(directory, name)
            try:
                with open(path) as f:
                    loaded = json.load(f)
                if loaded.get("format") != RECORD_FORMAT or loaded["method"] not in METHOD_LABELS:
                    raise ValueError(f"format {loaded.get('format')!r}, method {loaded.get('method')!r}")
                for tag, points in loaded["scalars"].items():
                    if not points or any(len(point) != 2 for point in points):
                        raise ValueError(f"{tag} is not a list of [step, value] pairs")
                records.append(loaded)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise SystemExit(f"error: {path} is not a run record of this report ({type(err).__name__}: {err}). "
                                 f"Records are written by `python benchmark/report.py --save-records`; restore the "
                                 f"file from git (`git checkout -- {path}`) or delete it.")
    return records


def save_records(records: List[dict], folder: str):
    """Each record to {folder}/{preset}/{dataset}/{method}/{run}.json, written to a temporary file and renamed."""
    import json

    for run in records:
        directory = os.path.join(folder, run["preset"], run["dataset"], run["method"])
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{run['run']}.json")
        with open(f"{path}.tmp", "w") as f:
            json.dump(run, f, separators=(",", ":"))
        os.replace(f"{path}.tmp", path)


def curves_of(records: List[dict]) -> Dict:
    """{(dataset, method): {run_key: {tag: (steps, values)}}}; a later record of the same key replaces an earlier
    one (a run folder's over a committed copy of it)."""
    curves = defaultdict(dict)
    for run in records:
        curves[(run["dataset"], run["method"])][run_key(run)] = {
            tag: (np.array([p[0] for p in points]), np.array([p[1] for p in points], dtype=float))
            for tag, points in run["scalars"].items()}
    return {key: dict(sorted(runs.items())) for key, runs in curves.items()}


def score_tag(curves) -> str:
    """Normalized score where every run has it, else the return."""
    has_score = all("eval/normalized_score" in run for runs in curves.values() for run in runs.values())
    return "eval/normalized_score" if has_score else "eval/return"


# The two readings of the paper's Table 1 ("during the initial 30,000 steps"): the score at the end, or the mean over
# the online evaluations after step 0 (step 0 evaluates the offline checkpoint, the same for every method)
STATISTICS = {"final": "final score", "mean": "mean score over the online evaluations after step 0"}


def score_of(curve, kind: str) -> float:
    steps, values = curve
    return values[-1] if kind == "final" else values[steps > 0].mean()


def statistic(curves, tag: str, kind: str) -> Dict:
    """{(dataset, method): per-seed values of `kind` (see STATISTICS)}, runs in the order of their names
    (`curves_of` sorts them; the seeded bootstrap's intervals depend on it)."""
    return {key: np.array([score_of(run[tag], kind) for run in runs.values()]) for key, runs in curves.items()}


def aggregate_scores(curves, tag: str, datasets: List[str], methods: List[str], kind: str = "final") -> Dict:
    """Scores for one aggregate group, each cell's runs ordered so that those from the offline checkpoints
    fine-tuned by more of the group's methods come first, then by name. `aggregates` keeps a method's first runs
    where it has more on one dataset than on another, so the runs kept start, where they can, from the checkpoints
    that the group's other methods also started from; a seed that only some methods ran is left out before one
    that all ran."""
    scores = {}
    for dataset in datasets:
        uses = Counter(key for m in methods for key in curves.get((dataset, m), {}))
        for method in methods:
            runs = curves.get((dataset, method), {})
            scores[(dataset, method)] = np.array([score_of(runs[key][tag], kind)
                                                  for key in sorted(runs, key=lambda k: (-uses[k], k))])
    return scores


def paired_finals(curves, tag: str, dataset: str, triple: tuple, method: str):
    """Final scores of `method` on the runs that BAQ and both ablations (`triple`) share (same seed and offline
    checkpoint), in one order, so that differences pair runs from the same checkpoint."""
    shared = set.intersection(*(set(curves[(dataset, m)]) for m in triple))
    runs = curves[(dataset, method)]
    return np.array([runs[key][tag][1][-1] for key in sorted(shared)])


def cell(values) -> str:
    """Mean ± std over seeds and the number of runs; one run has no spread to show."""
    if len(values) == 0:
        return ""
    if len(values) == 1:
        return f"{values[0]:.1f} (1 run)"
    return f"{values.mean():.1f} ± {values.std():.1f} ({len(values)})"


def table(values: Dict, datasets: List[str], methods: List[str], with_total: bool = True) -> List[str]:
    lines = ["| dataset | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |", "|---|" + "---|" * len(methods)]
    for dataset in datasets:
        lines.append(f"| {short_name(dataset)} | " + " | ".join(cell(values.get((dataset, m), np.array([]))) for m in methods) + " |")
    if with_total:  # the sum over datasets of the mean over seeds, as in the paper; a partial sum would mislead
        present = [[d for d in datasets if (d, m) in values] for m in methods]
        lines.append("| Total | " + " | ".join(
            f"{sum(values[(d, m)].mean() for d in have):.1f}" if len(have) == len(datasets) else f"({len(have)} of {len(datasets)} datasets)"
            for m, have in zip(methods, present)) + " |")
    return lines


def short_name(dataset: str) -> str:
    """baq-hopper-medium-v0 -> hopper-medium (the paper's row names)."""
    parts = dataset.split("-")
    return "-".join(parts[1:-1]) if parts[0] in ("baq", "mujoco") else dataset


def plot_curves(curves, tag: str, datasets, methods, path: str, title: str):
    """Figure 2: the evaluation score against the online step, mean and a +/- std band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for method in methods:
            runs = curves.get((dataset, method))
            if not runs:
                continue
            steps = next(iter(runs.values()))[tag][0]
            values = np.stack([run[tag][1] for run in runs.values()])
            mean, std = values.mean(0), values.std(0)
            ax.plot(steps, mean, label=f"{METHOD_LABELS[method]} ({len(runs)})", color=METHOD_COLORS[method],
                    linestyle="--" if method.startswith("cql") else "-")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2, color=METHOD_COLORS[method])
        ax.set_title(short_name(dataset), fontsize=9)
        ax.set_xlabel("online step", fontsize=8)
        ax.set_ylabel(tag.split("/")[-1].replace("_", " "), fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(wrapped(title, figure), fontsize=9)
    figure.tight_layout()
    save(figure, path)


def backbone(method: str) -> str:
    return method.split("-")[0]


def aggregate_groups(final: Dict, datasets: List[str], methods: List[str]) -> List[tuple]:
    """The (datasets, methods) each aggregate covers. rliable compares methods over one set of datasets, and a grid
    is uneven (the baselines run on the medium datasets only, seeds arrive over sessions), so per backbone the first
    group takes the datasets where the backbone and its BAQ ran, with every method of that backbone that ran on all
    of them; each other method is then compared where it and the backbone ran, with every method of the family
    that ran there too (one group per set of datasets and methods: SO2 and SUF on the medium datasets share one;
    the other reading of Eq. 10 keeps its groups over the datasets it ran on).
    "Ran" means 2 runs or more wherever the group's pair has them on some dataset: a method counts as many runs on
    every dataset as on its fewest, so one dataset with a single new seed would cut all others to one run and leave
    the bootstrap nothing to resample within a dataset; such a dataset joins once its second seed has run."""
    def ran(d, m, least):
        return len(final.get((d, m), ())) >= least

    def covering(group, least):
        return [d for d in datasets if all(ran(d, m, least) for m in group)]

    def ran_on_all(family, where, least):
        return [m for m in family if all(ran(d, m, least) for d in where)]

    def group_of(pair, family):
        least = 2 if covering(pair, 2) else 1
        where = covering(pair, least)
        return where, ran_on_all(family, where, least)

    groups = []
    for algo in ("iql", "cql"):
        family = [m for m in methods if backbone(m) == algo]
        lead, members = group_of([m for m in (algo, f"{algo}-baq") if m in family] or family, family)
        if lead and members:
            groups.append((lead, members))
        for method in (m for m in family if m != algo):
            group = group_of([m for m in (algo, method) if m in family], family)
            if group[0] and group not in groups:
                groups.append(group)
    return groups


def outside_aggregates(final: Dict, groups: List[tuple]) -> List[tuple]:
    """The (dataset, method) cells that no aggregate group holds, with their run counts."""
    held = {(d, m) for where, members in groups for d in where for m in members}
    return [(d, m, len(v)) for (d, m), v in sorted(final.items()) if (d, m) not in held]


def aggregates(final: Dict, datasets: List[str], methods: List[str], reps: int, seed: int = 0, kind: str = "final"):
    """rliable's few-run statistics of the scores (`kind`, see STATISTICS) over every (dataset, seed) run: per method the
    interquartile mean and the mean with 95% stratified bootstrap intervals (runs resampled within each
    dataset), and for each BAQ variant the probability of improvement over its backbone (and BAQ adaptive's over
    BAQ), P(X > Y) (the Mann-Whitney probability that a run of X beats a run of Y on a dataset, averaged over
    datasets), with its interval. Every method must have run on every one of `datasets`; each counts as many runs
    as its fewest on one of them (the bootstrap resamples within datasets, so a method's runs form a runs x
    datasets matrix: the first ones of a cell, in the order `aggregate_scores` gives), and methods may differ in
    that count."""
    import warnings

    from rliable import library as rly
    from rliable import metrics

    warnings.filterwarnings("ignore", category=FutureWarning, module="arch")  # rliable passes a RandomState
    runs = {m: min(len(final[(d, m)]) for d in datasets) for m in methods}
    scores = {m: np.stack([final[(d, m)][:runs[m]] for d in datasets], axis=1) for m in methods}  # [runs, datasets]

    def iqm_and_mean(x):
        return np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)])

    # rliable's stratified bootstraps draw (in part) from numpy's global generator, not only from random_state
    np.random.seed(seed)
    points, intervals = rly.get_interval_estimates(scores, iqm_and_mean, reps=reps, random_state=np.random.RandomState(seed))
    pairs = {(m, backbone(m)): [scores[m], scores[backbone(m)]] for m in methods
             if m != backbone(m) and backbone(m) in methods and ("baq" in m or "our-" in m)}
    for m in methods:  # the later paper's question: does the adaptive constraint improve on BAQ itself
        baq = m.removesuffix("-adaptive")
        if baq != m and baq in methods:
            pairs[(m, baq)] = [scores[m], scores[baq]]
    np.random.seed(seed + 1)
    improvement = rly.get_interval_estimates({f"{x},{y}": v for (x, y), v in pairs.items()},
                                             metrics.probability_of_improvement, reps=reps,
                                             random_state=np.random.RandomState(seed + 1)) if pairs else ({}, {})
    left_out = {(d, m): len(final[(d, m)]) - runs[m] for d in datasets for m in methods if len(final[(d, m)]) > runs[m]}
    return {"datasets": datasets, "runs": runs, "points": points, "intervals": intervals, "improvement": improvement,
            "left_out": left_out, "kind": kind}


def offline_lines(records: List[dict]) -> List[str]:
    """Each offline checkpoint's own evaluation, per dataset and backbone: where every method of a seed starts."""
    checkpoints = defaultdict(dict)
    for run in records:
        if run.get("offline_eval"):
            checkpoints[(run["dataset"], backbone(run["method"]))][run_key(run)] = run["offline_eval"]
    if not checkpoints:
        return []
    lines = ["## Offline checkpoints: their own evaluation at the end of offline pretraining", "",
             "Every method of one (dataset, seed) fine-tunes the same checkpoint; its quality varies between seeds and "
             "machines, so compare methods within a checkpoint.", "",
             "| dataset | backbone | checkpoint: score (evaluation episodes) | mean ± std |", "|---|---|---|---|"]
    for (dataset, algo), runs in sorted(checkpoints.items()):
        values = np.array([e["value"] for e in runs.values()])
        lines.append(f"| {short_name(dataset)} | {algo.upper()} | " + ", ".join(
            f"{key}: {e['value']:.1f} ({e['episodes']})" for key, e in sorted(runs.items())) + f" | {cell(values)} |")
    return lines + [""]


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def aggregate_lines(stats) -> List[str]:
    counts = sorted(set(stats["runs"].values()))
    seeds = "/".join(map(str, counts)) + f" seed{'' if counts == [1] else 's'}"
    family = ", ".join(METHOD_LABELS[m] for m in stats["points"])
    lines = [f"## Aggregates over every (dataset, seed) run of {family}: {STATISTICS[stats['kind']]}, 95% stratified "
             "bootstrap intervals (rliable)", "",
             f"Over {plural(len(stats['datasets']), 'dataset')} ({', '.join(short_name(d) for d in stats['datasets'])}) "
             f"x {seeds}. IQM: the mean of the middle 50% of runs, robust to one outlier seed.", ""]
    if stats["left_out"]:  # the bootstrap resamples a runs x datasets matrix: as many runs on each dataset
        lines += ["Left out (a method counts as many runs on each dataset as on its fewest; those kept come from the "
                  "offline checkpoints most methods started from): " +
                  ", ".join(f"{METHOD_LABELS[m]} {plural(n, 'run')} on {short_name(d)}"
                            for (d, m), n in stats["left_out"].items()) + ".", ""]
    lines += ["| method | runs | IQM [95% CI] | mean [95% CI] |", "|---|---|---|---|"]
    for method, point in stats["points"].items():
        low, high = stats["intervals"][method]
        lines.append(f"| {METHOD_LABELS[method]} | {stats['runs'][method] * len(stats['datasets'])} | "
                     f"{point[0]:.1f} [{low[0]:.1f}, {high[0]:.1f}] | {point[1]:.1f} [{low[1]:.1f}, {high[1]:.1f}] |")
    points, intervals = stats["improvement"]
    if points:
        lines += ["", "| probability of improvement | P(X > Y) [95% CI] | the interval excludes 0.5 (no difference); "
                  "too few runs: the smallest p-value they allow |",
                  "|---|---|---|"]
        for pair, point in points.items():
            x, y = pair.split(",")
            # With few runs a bootstrap interval collapses whenever every run of X beats every run of Y (2 seeds
            # each: 4 pairs) although chance alone does that often; no verdict where even that complete separation
            # has a two-sided permutation p-value of 0.05 or more (within each dataset C(n_x + n_y, n_x) equally
            # likely splits).
            floor = 2 / math.comb(stats["runs"][x] + stats["runs"][y], stats["runs"][x]) ** len(stats["datasets"])
            low, high = np.ravel(intervals[pair])[:2]
            verdict = f"too few runs for a verdict: {floor:.2f}" if floor >= 0.05 else \
                "yes, X better" if low > 0.5 else "yes, Y better" if high < 0.5 else "no"
            lines.append(f"| P({METHOD_LABELS[x]} > {METHOD_LABELS[y]}) | {float(point):.2f} [{low:.2f}, {high:.2f}] | "
                         f"{verdict} |")
    return lines + [""]


def plot_aggregates(groups: List[dict], path: str, title: str):
    """The aggregate intervals, one row per group of methods: IQM, mean, and the probabilities of improvement
    (0.5: no difference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = sum(0.45 * max(len(stats["points"]), len(stats["improvement"][0])) + 1.0 for stats in groups) + 0.6
    figure, axes = plt.subplots(len(groups), 3, figsize=(12.6, height), squeeze=False)
    for stats, row_axes in zip(groups, axes):
        methods, (points, intervals) = list(stats["points"]), stats["improvement"]
        datasets = f"over {plural(len(stats['datasets']), 'dataset')}"
        for column, name in enumerate(("IQM", "mean")):
            for row, method in enumerate(methods):
                low, high = stats["intervals"][method][:, column]
                row_axes[column].plot([low, high], [row, row], linewidth=6, alpha=0.5, color=METHOD_COLORS[method])
                row_axes[column].plot(stats["points"][method][column], row, "k|", markersize=12)
            row_axes[column].set_yticks(range(len(methods)), [METHOD_LABELS[m] for m in methods], fontsize=7)
            row_axes[column].set_xlabel(f"{name} of the {STATISTICS[stats['kind']]}, {datasets}", fontsize=8)
        if not points:
            row_axes[2].axis("off")
            continue
        for row, (pair, point) in enumerate(points.items()):
            low, high = np.ravel(intervals[pair])[:2]
            row_axes[2].plot([low, high], [row, row], linewidth=6, alpha=0.5, color=METHOD_COLORS[pair.split(",")[0]])
            row_axes[2].plot(float(point), row, "k|", markersize=12)
        row_axes[2].axvline(0.5, color="black", linewidth=0.8, linestyle="--")
        labels = [f"P({METHOD_LABELS[p.split(',')[0]]} > {METHOD_LABELS[p.split(',')[1]]})" for p in points]
        row_axes[2].set_yticks(range(len(points)), labels, fontsize=7)
        row_axes[2].set_xlabel(f"probability of improvement, {datasets}", fontsize=8)
    figure.suptitle(wrapped(title, figure), fontsize=9)
    figure.tight_layout()
    save(figure, path)


def plot_adaptive(curves, tag: str, datasets, methods, path: str, title: str):
    """BAQ with the adaptive constraint against BAQ (top row: score, mean and +/- std over seeds) and the
    constraint's coefficient lambda_t of every seed (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(datasets), figsize=(4.2 * len(datasets), 5.6), squeeze=False)
    for column, dataset in enumerate(datasets):
        for method in methods:
            for shown in (method.replace("-adaptive", ""), method):  # BAQ, then BAQ with the constraint
                runs = curves.get((dataset, shown))
                if not runs:
                    continue
                steps = next(iter(runs.values()))[tag][0]
                values = np.stack([run[tag][1] for run in runs.values()])
                axes[0][column].plot(steps, values.mean(0), label=f"{METHOD_LABELS[shown]} ({len(runs)})")
                axes[0][column].fill_between(steps, values.mean(0) - values.std(0), values.mean(0) + values.std(0), alpha=0.2)
            for seed, run in (curves.get((dataset, method)) or {}).items():
                if "baq/constraint_coef" in run:
                    axes[1][column].plot(*run["baq/constraint_coef"], label=f"{METHOD_LABELS[method]} {seed}")
        axes[0][column].set_title(short_name(dataset), fontsize=9)
        axes[0][column].set_ylabel(tag.split("/")[-1].replace("_", " "), fontsize=8)
        axes[1][column].set_ylabel("lambda_t", fontsize=8)
        axes[1][column].set_xlabel("online step", fontsize=8)
        for ax in axes[:, column]:
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7)
    figure.suptitle(wrapped(title, figure), fontsize=9)
    figure.tight_layout()
    save(figure, path)


def plot_ablation(drops: Dict, path: str, title: str):
    """Figure 3: BAQ minus the variant without one component, per dataset and algorithm, with the spread
    over seeds (the std of the per-seed differences, seeds paired by number)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(drops)
    x = np.arange(len(labels))
    figure, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(labels)), 3.2))
    for offset, (component, color) in zip((-0.2, 0.2), (("without Our-Q", "tab:blue"), ("without Our-S", "tab:orange"))):
        ax.bar(x + offset, [drops[label][component].mean() for label in labels], width=0.4, label=component, color=color,
               yerr=[drops[label][component].std() for label in labels], capsize=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, labels, fontsize=7, rotation=20)
    ax.set_ylabel("score of BAQ minus the ablation", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title(wrapped(title, figure), fontsize=9)
    figure.tight_layout()
    save(figure, path)


def wrapped(title: str, figure) -> str:
    """The title broken into lines that fit the figure's width (about 13 characters per inch at 9 points)."""
    return textwrap.fill(title, width=int(13 * figure.get_figwidth()))


def save(figure, path: str):
    import matplotlib.pyplot as plt

    figure.savefig(f"{path}.tmp.png", dpi=120)
    plt.close(figure)
    os.replace(f"{path}.tmp.png", path)


def main(args: Args):
    missing = []
    runs = read_runs(args.root, args.preset, missing)
    if args.save_records:
        save_records(runs, args.records)
        print(f"recorded {len(runs)} runs in {os.path.join(args.records, args.preset)}")
    committed = read_records(args.records, args.preset)
    curves = curves_of(committed + runs)
    if not curves:
        raise SystemExit(f"error: no finished runs under {os.path.join(args.root, args.preset)} and no records under "
                         f"{os.path.join(args.records, args.preset)}. Run `python benchmark/run.py --preset "
                         f"{args.preset}` first (or pass --root / --records).")
    output = os.path.join(args.output, args.preset)
    os.makedirs(output, exist_ok=True)
    tag = score_tag(curves)
    datasets = sorted({d for d, _ in curves})
    methods = [m for m in METHOD_ORDER if any((d, m) in curves for d in datasets)]
    seeds = sorted({len(runs) for runs in curves.values()})
    budget = max(int(run[tag][0][-1]) for runs in curves.values() for run in runs.values())
    lines = [f"# Results: preset `{args.preset}`", "",
             f"{plural(len(datasets), 'dataset')}, {plural(len(methods), 'method')}, {'/'.join(map(str, seeds))} seeds per cell, "
             f"{budget:,} online steps. Cells: mean ± std over seeds of `{tag}`, with the number of runs.", ""]
    if missing:
        lines += [f"Not finished, so not in the tables: {', '.join(missing)}.", ""]
    title = (f"preset {args.preset}, {'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''} per method, "
             f"{budget:,} online steps")
    final = statistic(curves, tag, "final")
    grouping = aggregate_groups(final, datasets, methods)
    for kind, figure in (("final", "aggregates.png"), ("mean", "aggregates-mean.png")):  # the field's statistics lead
        groups = [aggregates(aggregate_scores(curves, tag, group_datasets, group_methods, kind), group_datasets,
                             group_methods, args.bootstrap_reps, kind=kind)
                  for group_datasets, group_methods in grouping]
        if groups:
            lines += [line for stats in groups for line in aggregate_lines(stats)] + [f"![aggregates]({figure})", ""]
            plot_aggregates(groups, os.path.join(output, figure), f"Aggregates of the {STATISTICS[kind]}, {title}")
    outside = outside_aggregates(final, grouping)
    if grouping and outside:
        lines += ["In no aggregate (a single run where the rest have two or more, or no backbone to compare with): " +
                  ", ".join(f"{METHOD_LABELS[m]} on {short_name(d)} ({plural(n, 'run')})" for d, m, n in outside) + ".", ""]
    lines += offline_lines(committed + runs)
    for kind, when in (("final", "at the end of the online budget"),
                       ("mean", "averaged over the online evaluations after step 0")):
        values = statistic(curves, tag, kind)
        lines += [f"## Table 1: score {when}", "", *table(values, datasets, [m for m in methods if m != "cql-off2on"]), ""]
        table2 = [m for m in TABLE2_METHODS if m in methods]
        if "cql" in table2 and len(table2) > 1:
            lines += [f"## Table 2: CQL, Off2On and Our-S, score {when}", "", *table(values, datasets, table2), ""]
    drops = {}
    for algo, reading in ((algo, reading) for algo in ("iql", "cql") for reading in ("", "-offline-rho")):
        triple = (f"{algo}-baq{reading}", f"{algo}-our-q", f"{algo}-our-s{reading}")
        for dataset in datasets:
            if all((dataset, m) in final for m in triple):
                baq, our_q, our_s = (paired_finals(curves, tag, dataset, triple, m) for m in triple)
                if len(baq):
                    drops[f"{algo.upper()}{reading.replace('-', ' ')} {short_name(dataset)}"] = {
                        "without Our-Q": baq - our_s, "without Our-S": baq - our_q}
    if drops:
        lines += ["## Figure 3: the drop when a component is removed (final score of BAQ minus the ablation)", "",
                  "| | without Our-Q (= BAQ - Our-S) | without Our-S (= BAQ - Our-Q) |", "|---|---|---|"]
        lines += [f"| {label} | {d['without Our-Q'].mean():+.1f} ± {d['without Our-Q'].std():.1f} | "
                  f"{d['without Our-S'].mean():+.1f} ± {d['without Our-S'].std():.1f} |" for label, d in drops.items()]
        lines += ["", "![Figure 3](figure3.png)", ""]
        plot_ablation(drops, os.path.join(output, "figure3.png"), f"Figure 3, {title}")
    if all("eval/q_bias" in run for runs in curves.values() for run in runs.values()):
        lines += ["## Q-value estimation error: `eval/q_bias` averaged over the online evaluations", "",
                  "Q(s_t, a_t) minus the discounted return collected from t on, over the evaluation episodes' visited pairs, "
                  "in reward units (closer to 0 is better).", "",
                  *table(statistic(curves, "eval/q_bias", "mean"), datasets, methods, with_total=False), ""]
    figure2 = [m for m in FIGURE2_METHODS if m in methods]
    if figure2:
        plot_curves(curves, tag, datasets, figure2, os.path.join(output, "figure2.png"), f"Figure 2, {title}")
        lines += [f"## Figure 2: score during fine-tuning, {', '.join(METHOD_LABELS[m] for m in figure2)} (mean and "
                  f"± std over seeds)", "", "![Figure 2](figure2.png)", ""]
    plot_curves(curves, tag, datasets, methods, os.path.join(output, "curves.png"), f"Every method, {title}")
    lines += ["## Score during fine-tuning, every method (mean and ± std over seeds)", "", "![curves](curves.png)", ""]
    adaptive = [m for m in ("iql-baq-adaptive", "cql-baq-adaptive") if m in methods]
    if adaptive:
        plot_adaptive(curves, tag, datasets, adaptive, os.path.join(output, "adaptive.png"), f"Adaptive constraint, {title}")
        lines += ["## The adaptive behavior constraint: score against BAQ, and lambda_t, per seed", "",
                  "![adaptive](adaptive.png)", ""]
    paper_rows = [d for d in datasets if short_name(d) in PAPER_TABLE1]
    if paper_rows:
        paper_methods = ["iql", "iql-baq", "cql", "cql-baq"]
        lines += ["## The paper's Table 1 on these datasets (D4RL v2 data, 4 seeds), for orientation", "",
                  "| dataset | " + " | ".join(METHOD_LABELS[m] for m in paper_methods) + " |", "|---|" + "---|" * len(paper_methods)]
        lines += [f"| {short_name(d)} | " + " | ".join(PAPER_TABLE1[short_name(d)][m] for m in paper_methods) + " |" for d in paper_rows]
        lines.append("")
    with open(os.path.join(output, "tables.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {output}/tables.md and its figures")


if __name__ == "__main__":
    main(tyro.cli(Args))
