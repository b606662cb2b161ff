# Run a grid of datasets x methods x seeds through the top-level scripts, as the paper does: every
# fine-tuning variant of one (dataset, seed) starts from the same offline checkpoint
# (offline_pretrain.py) and the same BC checkpoint (bc_pretrain.py). Runs go in parallel, one torch
# thread each; what has finished is skipped, and an interrupted grid continues when rerun.
#
#   python benchmark/run.py --preset cpu --datasets baq/hopper/medium-v0 --methods iql iql-baq iql-our-q iql-our-s
#   python benchmark/report.py --preset cpu
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Literal, Optional

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# method -> (algorithm, fine-tuning script, its flags); every method of a (dataset, seed) starts from the same
# offline.pt, and the BAQ scripts also from the same bc.pt
METHODS = {
    "iql": ("iql", "baq_iql.py", ["--no-weighted-loss", "--no-priority-sampling"]),
    "iql-baq": ("iql", "baq_iql.py", []),
    "iql-our-q": ("iql", "baq_iql.py", ["--no-priority-sampling"]),
    "iql-our-s": ("iql", "baq_iql.py", ["--no-weighted-loss"]),
    "cql": ("cql", "baq_cql.py", ["--no-weighted-loss", "--no-priority-sampling"]),
    "cql-baq": ("cql", "baq_cql.py", []),
    "cql-our-q": ("cql", "baq_cql.py", ["--no-priority-sampling"]),
    "cql-our-s": ("cql", "baq_cql.py", ["--no-weighted-loss"]),
    "iql-baq-adaptive": ("iql", "baq_iql.py", ["--behavior-constraint"]),  # the later paper's adaptive constraint
    "cql-baq-adaptive": ("cql", "baq_cql.py", ["--behavior-constraint"]),
    # the paper's baselines (benchmark/baselines/)
    "iql-so2": ("iql", "benchmark/baselines/so2.py", ["--algo", "iql"]),
    "iql-suf": ("iql", "benchmark/baselines/suf.py", ["--algo", "iql"]),
    "cql-so2": ("cql", "benchmark/baselines/so2.py", ["--algo", "cql"]),
    "cql-suf": ("cql", "benchmark/baselines/suf.py", ["--algo", "cql"]),
    "cql-off2on": ("cql", "benchmark/baselines/off2on.py", []),
}
CHECKPOINT_FLAGS = {"offline.pt": "--offline-checkpoint", "bc.pt": "--bc-checkpoint"}
PAPER_DATASETS = [f"baq/{env}/{level}-v0" for env in ("halfcheetah", "hopper", "walker2d")
                  for level in ("medium", "medium-replay", "medium-expert")]
PRESETS = {
    # minutes on tiny datasets; what the tests run
    "smoke": dict(offline_steps=60, bc_steps=40, online_steps=70, eval_every=35, eval_episodes=2, seeds=1,
                  extra=["--hidden-dim", "32", "--batch-size", "32", "--log-every", "20", "--no-compile"]),
    # a few hours on a 2-core CPU for one dataset and the four IQL variants, two seeds
    "cpu": dict(offline_steps=100_000, bc_steps=50_000, online_steps=30_000, eval_every=5_000, eval_episodes=10, seeds=2, extra=[]),
    # the paper's budgets
    "paper": dict(offline_steps=1_000_000, bc_steps=100_000, online_steps=30_000, eval_every=5_000, eval_episodes=10, seeds=4, extra=[]),
}


@dataclass
class Args:
    preset: Literal["smoke", "cpu", "paper"] = "cpu"
    """budgets: smoke (tiny, for tests), cpu (100k offline updates: reduced to fit a 2-core CPU), paper (1M offline updates, 4 seeds)"""
    datasets: List[str] = field(default_factory=lambda: ["baq/hopper/medium-v0"])
    """--env-id of each dataset (local baq/... datasets, or D4RL names when the official ones are present); `paper` for the paper's nine"""
    methods: List[str] = field(default_factory=lambda: ["iql", "iql-baq", "iql-our-q", "iql-our-s"])
    """methods: {iql,cql} (plain fine-tuning), {iql,cql}-baq, {iql,cql}-our-q (weights only), {iql,cql}-our-s (priorities
    only), {iql,cql}-baq-adaptive (BAQ with the later paper's adaptive behavior constraint), and the paper's baselines
    {iql,cql}-so2, {iql,cql}-suf, cql-off2on"""
    seeds: Optional[int] = None
    """seeds 1..N, N >= 1 (default: the preset's)"""
    workers: int = os.cpu_count() or 1
    """runs at a time (>= 1), one torch thread each"""
    root: str = os.path.join(ROOT, "benchmark", "runs")
    """where the runs go: {root}/{preset}/{dataset}/{method}/seed{k}"""


@dataclass
class Job:
    name: str
    directory: str  # the --runs-dir of the script; its one run directory is inside
    artifact: str  # the file a finished run leaves
    command: List[str]
    needs: List["Job"] = field(default_factory=list)
    process: Optional[subprocess.Popen] = None
    started: float = 0.0

    def run_directory(self) -> Optional[str]:
        runs = sorted(d for d in os.listdir(self.directory) if os.path.isdir(os.path.join(self.directory, d))) \
            if os.path.isdir(self.directory) else []
        return os.path.join(self.directory, runs[-1]) if runs else None

    def finished(self) -> bool:
        run = self.run_directory()
        return run is not None and os.path.exists(os.path.join(run, self.artifact))


def script_flags(preset: dict, *names: str) -> List[str]:
    return [flag for name in names for flag in (f"--{name.replace('_', '-')}", str(preset[name]))]


def plan(args: Args) -> List[Job]:
    preset = PRESETS[args.preset]
    datasets = PAPER_DATASETS if args.datasets == ["paper"] else args.datasets
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: --methods {' '.join(unknown)}: unknown; choose from {', '.join(METHODS)}.")
    python, jobs = sys.executable, []
    for dataset in datasets:
        base = os.path.join(args.root, args.preset, dataset.replace("/", "-"))
        for seed in range(1, (args.seeds or preset["seeds"]) + 1):
            common = ["--env-id", dataset, "--seed", str(seed), "--eval-episodes", str(preset["eval_episodes"]), *preset["extra"]]
            bc_extra = [f for f in preset["extra"] if f != "--no-compile"]
            bc = Job(f"{dataset} bc seed{seed}", os.path.join(base, "pretrain-bc", f"seed{seed}"), "bc.pt",
                     [python, os.path.join(ROOT, "bc_pretrain.py"), "--env-id", dataset, "--seed", str(seed),
                      "--eval-episodes", str(preset["eval_episodes"]), *bc_extra, *script_flags(preset, "bc_steps")])
            if any(METHODS[m][1].startswith("baq_") for m in args.methods):  # the baselines need no pi_BC
                jobs.append(bc)
            offline = {}
            for algo in sorted({METHODS[m][0] for m in args.methods}):
                offline[algo] = Job(f"{dataset} offline-{algo} seed{seed}", os.path.join(base, f"pretrain-{algo}", f"seed{seed}"),
                                    "offline.pt", [python, os.path.join(ROOT, "offline_pretrain.py"), "--algo", algo, *common,
                                                   *script_flags(preset, "offline_steps"), "--offline-eval-every", "0",
                                                   *(["--no-compile"] if algo == "cql" else [])])  # as baq_cql.py
                jobs.append(offline[algo])
            for method in args.methods:
                algo, script, flags = METHODS[method]
                jobs.append(Job(f"{dataset} {method} seed{seed}", os.path.join(base, method, f"seed{seed}"), "final.pt",
                                [python, os.path.join(ROOT, script), *common, "--exp-name", method, *flags,
                                 *script_flags(preset, "online_steps", "eval_every")],
                                needs=[offline[algo], bc] if script.startswith("baq_") else [offline[algo]]))
    return jobs


def start(job: Job):
    """Start a job; an interrupted offline pretraining resumes, any other unfinished run starts over."""
    command, run = list(job.command), job.run_directory()
    if run and job.artifact == "offline.pt" and os.path.exists(os.path.join(run, "resume.pt")):
        command = [command[0], command[1], "--resume", os.path.join(run, "resume.pt")]
    elif run:
        shutil.rmtree(run)
    for need in job.needs:  # the fine-tuning runs start from the shared pretrained checkpoints
        command += [CHECKPOINT_FLAGS[need.artifact], os.path.join(need.run_directory(), need.artifact)]
    os.makedirs(job.directory, exist_ok=True)
    if "--resume" not in command:
        command += ["--runs-dir", job.directory]
    log = open(os.path.join(job.directory, "log.txt"), "a")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    job.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=ROOT)
    job.started = time.time()
    print(f"start  {job.name}", flush=True)


def log_tail(job: Job, lines: int = 5) -> str:
    """The last lines of a run's log, indented, for the report of a failed run."""
    with open(os.path.join(job.directory, "log.txt"), errors="replace") as log:
        tail = [line.rstrip() for line in log.read().replace("\r", "\n").splitlines() if line.strip()][-lines:]
    return "\n".join(f"         | {line}" for line in tail)


def check_args(args: Args):
    if args.workers < 1:
        raise SystemExit(f"error: --workers {args.workers}: at least one run must run at a time; give 1 or more "
                         f"(this machine has {os.cpu_count()} cores).")
    if args.seeds is not None and args.seeds < 1:
        raise SystemExit(f"error: --seeds {args.seeds}: the grid runs seeds 1..N, so N must be 1 or more (omit "
                         f"--seeds for the preset's {PRESETS[args.preset]['seeds']}).")


def schedule(args: Args, pending, running, failed, skipped, start_time):
    """Start runs whose pretraining has finished, up to --workers at a time, until none is left."""
    while pending or running:
        for job in list(running):
            if job.process.poll() is not None:
                running.remove(job)
                if job.process.returncode == 0 and job.finished():
                    print(f"done   {job.name} ({(time.time() - job.started) / 60:.1f} min; grid at "
                          f"{(time.time() - start_time) / 60:.1f} min)", flush=True)
                else:
                    failed.append(job)
                    print(f"FAILED {job.name} (exit {job.process.returncode}): {os.path.join(job.directory, 'log.txt')} "
                          f"ends with\n{log_tail(job)}", flush=True)
        blocked = [job for job in pending if any(need in failed for need in job.needs)]
        for job in blocked:
            pending.remove(job)
            skipped.append(job)
            print(f"SKIP   {job.name}: a pretraining run it needs failed", flush=True)
        for job in [job for job in pending if all(need.finished() for need in job.needs)]:
            if len(running) >= args.workers:
                break
            pending.remove(job)
            start(job)
            running.append(job)
        time.sleep(0.5)


def main(args: Args):
    check_args(args)
    jobs = plan(args)
    preset = PRESETS[args.preset]
    if args.preset == "cpu":
        print(f"preset cpu: {preset['offline_steps']:,} offline updates instead of the paper's 1,000,000 (reduced to fit a "
              f"2-core CPU), {preset['bc_steps']:,} BC updates, {preset['online_steps']:,} online steps")
    pending = [job for job in jobs if not job.finished()]
    print(f"{len(jobs)} runs, {len(jobs) - len(pending)} already finished, {args.workers} at a time", flush=True)
    running, failed, skipped, start_time = [], [], [], time.time()
    try:
        schedule(args, pending, running, failed, skipped, start_time)
    except KeyboardInterrupt:
        for job in running:
            job.process.terminate()
            job.process.wait()
        done = sum(job.finished() for job in jobs)
        print(f"\ninterrupted: {done} of {len(jobs)} runs finished and are kept; rerun the same command to continue "
              f"(an interrupted offline pretraining resumes from its resume.pt, other unfinished runs start over).",
              file=sys.stderr)
        raise SystemExit(130)
    finished = len(jobs) - len(failed) - len(skipped)
    print(f"{finished} of {len(jobs)} runs finished, {len(failed)} failed, {len(skipped)} skipped; the grid took "
          f"{(time.time() - start_time) / 60:.1f} min")
    if failed:
        raise SystemExit(f"error: {len(failed)} runs failed ({', '.join(job.name for job in failed)}) and {len(skipped)} "
                         f"that need them were skipped. Their logs are log.txt in each run's directory; rerun this "
                         f"command to retry them (finished runs are kept).")


if __name__ == "__main__":
    main(tyro.cli(Args))
