# Run a grid of datasets x methods x seeds through the top-level scripts, as the paper does: every
# fine-tuning variant of one (dataset, seed) starts from the same offline checkpoint
# (offline_pretrain.py) and the same BC checkpoint (bc_pretrain.py). Runs go in parallel, one torch
# thread each; what has finished is skipped, and an interrupted grid continues when rerun.
#
# `--launcher ray` hands the same runs to Ray (a local instance, or a cluster with --ray-address): each
# run is a Ray task that starts the same command, and a fine-tuning task waits for its pretraining.
#
#   python benchmark/run.py --preset cpu --datasets baq/hopper/medium-v0 --methods iql iql-baq iql-our-q iql-our-s
#   python benchmark/run.py --launcher ray --ray-address auto --gpus-per-run 0.25 --preset paper --datasets paper
#   python benchmark/report.py --preset cpu
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
    # the other reading of Eq. 10 (--offline-priorities): the offline data gets its rho too, not rho = 1
    "iql-baq-offline-rho": ("iql", "baq_iql.py", ["--offline-priorities"]),
    "iql-our-s-offline-rho": ("iql", "baq_iql.py", ["--no-weighted-loss", "--offline-priorities"]),
    "iql-baq-offline-rho-adaptive": ("iql", "baq_iql.py", ["--offline-priorities", "--behavior-constraint"]),
    "cql-baq-offline-rho": ("cql", "baq_cql.py", ["--offline-priorities"]),
    "cql-our-s-offline-rho": ("cql", "baq_cql.py", ["--no-weighted-loss", "--offline-priorities"]),
    "cql-baq-offline-rho-adaptive": ("cql", "baq_cql.py", ["--offline-priorities", "--behavior-constraint"]),
    # BAQ with a weaker weight (Eq. 6): k_q at 4x and 16x its default
    "iql-baq-kq4": ("iql", "baq_iql.py", ["--kq-scale", "4"]),
    "iql-baq-kq16": ("iql", "baq_iql.py", ["--kq-scale", "16"]),
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
    "smoke": dict(offline_steps=60, bc_steps=40, online_steps=70, eval_every=35, eval_episodes=2, offline_eval_episodes=3,
                  seeds=1, extra=["--hidden-dim", "32", "--batch-size", "32", "--log-every", "20", "--no-compile"]),
    # about two hours on a 2-core CPU for one dataset and the five IQL variants, three seeds (the README's Results)
    "cpu": dict(offline_steps=100_000, bc_steps=50_000, online_steps=30_000, eval_every=5_000, eval_episodes=10,
                offline_eval_episodes=30, seeds=3, extra=[]),
    # the paper's budgets; offline checkpoints are scored over 30 episodes (their quality varies widely between seeds
    # and machines, and 10 episodes would not tell it from evaluation noise), fine-tuning evaluations over 10
    "paper": dict(offline_steps=1_000_000, bc_steps=100_000, online_steps=30_000, eval_every=5_000, eval_episodes=10,
                  offline_eval_episodes=30, seeds=4, extra=[]),
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
    first_seed: int = 1
    """the grid's first seed, so it runs --first-seed..N: `--first-seed 3 --seeds 3` adds seed 3 alone, e.g. on a
    machine without the run folders of seeds 1 and 2 (a rerun would retrain them from new checkpoints)"""
    workers: int = os.cpu_count() or 1
    """runs at a time (>= 1), one torch thread each"""
    root: str = os.path.join(ROOT, "benchmark", "runs")
    """where the runs go: {root}/{preset}/{dataset}/{method}/seed{k}; with Ray on several machines, a filesystem
    every worker sees at this same path"""
    launcher: Literal["local", "ray"] = "local"
    """local: processes on this machine (no Ray); ray: one Ray task per run, on a local instance or a cluster"""
    ray_address: Optional[str] = None
    """with --launcher ray: a running cluster (`auto` on one of its nodes, host:6379, or ray://host:10001); default: start
    a local Ray instance with --workers x --cpus-per-run CPUs"""
    cpus_per_run: int = 1
    """with --launcher ray: CPUs Ray reserves for each run, and its torch threads (>= 1)"""
    gpus_per_run: float = 0.0
    """with --launcher ray: GPUs Ray reserves for each run; fractions pack several runs on one GPU (0: runs on the CPU)"""


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
        for seed in range(args.first_seed, (args.seeds or preset["seeds"]) + 1):
            common = ["--env-id", dataset, "--seed", str(seed), *preset["extra"]]
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
                                                   "--eval-episodes", str(preset["offline_eval_episodes"]),
                                                   *(["--no-compile"] if algo == "cql" else [])])  # as baq_cql.py
                jobs.append(offline[algo])
            for method in args.methods:
                algo, script, flags = METHODS[method]
                jobs.append(Job(f"{dataset} {method} seed{seed}", os.path.join(base, method, f"seed{seed}"), "final.pt",
                                [python, os.path.join(ROOT, script), *common, "--exp-name", method, *flags,
                                 *script_flags(preset, "online_steps", "eval_every", "eval_episodes")],
                                needs=[offline[algo], bc] if script.startswith("baq_") else [offline[algo]]))
    return jobs


def prepare(job: Job) -> List[str]:
    """The command that runs `job` now, for either launcher: an interrupted run that wrote a resume.pt (offline
    pretraining, SO2, SUF) continues from it, any other unfinished run starts over, and a fine-tuning run gets
    the shared pretrained checkpoints."""
    command, run = list(job.command), job.run_directory()
    if run and os.path.exists(os.path.join(run, "resume.pt")):
        return [command[0], command[1], "--resume", os.path.join(run, "resume.pt")]
    if run:
        shutil.rmtree(run)
    for need in job.needs:
        command += [CHECKPOINT_FLAGS[need.artifact], os.path.join(need.run_directory(), need.artifact)]
    os.makedirs(job.directory, exist_ok=True)
    return command + ["--runs-dir", job.directory]


def run_environment(threads: int = 1) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}


def start(job: Job):
    """Start a job as a process of this machine (the local launcher)."""
    command = prepare(job)
    log = open(os.path.join(job.directory, "log.txt"), "a")
    job.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=run_environment(), cwd=ROOT)
    job.started = time.time()
    print(f"start  {job.name}", flush=True)


def log_tail(job: Job, lines: int = 5) -> str:
    """The last lines of a run's log, indented, for the report of a failed run."""
    if not os.path.exists(os.path.join(job.directory, "log.txt")):
        return "         | (no log.txt: the run never started here)"
    with open(os.path.join(job.directory, "log.txt"), errors="replace") as log:
        tail = [line.rstrip() for line in log.read().replace("\r", "\n").splitlines() if line.strip()][-lines:]
    return "\n".join(f"         | {line}" for line in tail)


def check_args(args: Args):
    if args.workers < 1:
        raise SystemExit(f"error: --workers {args.workers}: at least one run must run at a time; give 1 or more "
                         f"(this machine has {os.cpu_count()} cores).")
    if args.launcher == "local" and (args.ray_address or args.cpus_per_run != 1 or args.gpus_per_run):
        raise SystemExit("error: --ray-address, --cpus-per-run and --gpus-per-run apply to --launcher ray; add "
                         "--launcher ray, or drop them to run the grid as processes of this machine.")
    if args.cpus_per_run < 1 or not 0 <= args.gpus_per_run < 1e6:
        raise SystemExit(f"error: --cpus-per-run {args.cpus_per_run} / --gpus-per-run {args.gpus_per_run}: a run needs at "
                         f"least one CPU and zero or more GPUs (fractions such as 0.25 share a GPU between runs).")
    if args.seeds is not None and args.seeds < 1:
        raise SystemExit(f"error: --seeds {args.seeds}: the grid runs seeds 1..N, so N must be 1 or more (omit "
                         f"--seeds for the preset's {PRESETS[args.preset]['seeds']}).")
    last_seed = args.seeds or PRESETS[args.preset]["seeds"]
    if not 1 <= args.first_seed <= last_seed:
        raise SystemExit(f"error: --first-seed {args.first_seed}: the grid runs seeds --first-seed..N with N = {last_seed} "
                         f"({'--seeds' if args.seeds else 'the preset'}), so it would run none; give a first seed from 1 "
                         f"to {last_seed}, or raise --seeds.")


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


# --- the Ray launcher ---------------------------------------------------------------------------
def die_with_parent():
    """In the run's process: stop (SIGTERM) when the Ray worker that started it dies, so that a cancelled
    or lost task leaves no orphaned run behind (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_on_worker(job: Job, threads: int, use_gpu: bool, progress, *needs_results) -> dict:
    """One Ray task: the local launcher's command for `job`, run to its end on whichever node Ray chose."""
    import ray

    if any(result["status"] != "done" for result in needs_results):
        return {"status": "skipped"}
    try:
        probe_writable(job.directory)
    except OSError as err:
        return {"status": "failed", "message": f"node {socket.gethostname()} cannot write to {job.directory} ({err}): "
                f"--root must be a filesystem that every Ray worker sees at the same path (a shared NFS/Lustre "
                f"mount, for example), writable by the workers' user."}
    environment = run_environment(threads)
    if not use_gpu:
        environment["CUDA_VISIBLE_DEVICES"] = ""  # no GPU reserved for this run: it must not use one
    if ray.get(progress.started.remote(job.name)):  # the grid was interrupted before this run could start
        return {"status": "interrupted"}
    started = time.time()
    with open(os.path.join(job.directory, "log.txt"), "a") as log:
        process = subprocess.Popen(prepare(job), stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=ROOT,
                                   preexec_fn=die_with_parent)
        try:
            while True:
                try:
                    returncode = process.wait(timeout=2)
                    break
                except subprocess.TimeoutExpired:
                    if ray.get(progress.halted.remote()):  # the grid's Ctrl-C
                        return {"status": "interrupted"}
        finally:  # interrupted, or a ray.cancel (KeyboardInterrupt here): stop the run, keep what it saved
            if process.poll() is None:
                process.terminate()
                process.wait()
            progress.stopped.remote(job.name)
    status = "done" if returncode == 0 and job.finished() else "failed"
    return {"status": status, "returncode": returncode, "minutes": (time.time() - started) / 60,
            "node": socket.gethostname()}


def connect_ray(args: Args):
    """ray.init on the cluster of --ray-address, or a new local instance; a wrong address fails in seconds."""
    import ray

    address = args.ray_address
    if address and address != "auto":
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host or address, int(port or 0) or (10001 if address.startswith("ray://") else 6379)),
                                     timeout=5).close()
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: --ray-address {address!r}: no Ray cluster answers there ({err}). Start the head "
                             f"first (`ray start --head` prints its address), pass host:6379 or ray://host:10001, or "
                             f"`auto` on a node of a running cluster; omit --ray-address to start a local Ray instance.")
    try:
        if address:
            return ray.init(address=address, log_to_driver=False)
        return ray.init(num_cpus=args.workers * args.cpus_per_run, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SystemExit(f"error: --ray-address {address!r}: {err}. Start the cluster first (`ray start --head`), or "
                         f"omit --ray-address to start a local Ray instance.")


def schedule_on_ray(args: Args, pending, failed, skipped, start_time):
    """Submit every unfinished run as a Ray task (a fine-tuning task takes its pretraining tasks' results as
    arguments, so Ray starts it after them), then report each as it ends, and progress every 30 s."""
    import ray

    context = connect_ray(args)
    dashboard = getattr(context, "dashboard_url", None)
    print(f"Ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs"
          + (f"; dashboard at http://{dashboard}" if dashboard else ""), flush=True)

    @ray.remote(num_cpus=0)
    class Progress:
        """The running runs, and the grid's stop: tasks poll it, as ray.cancel races with a task that is ending."""

        def __init__(self):
            self.running, self.halt = set(), False

        def started(self, name):
            if not self.halt:
                self.running.add(name)
            return self.halt

        def halted(self):
            return self.halt

        def stop(self):
            self.halt = True

        def stopped(self, name):
            self.running.discard(name)

        def count(self):
            return len(self.running)

    progress, tasks, by_name = Progress.remote(), {}, {}
    task = ray.remote(run_on_worker).options(num_cpus=args.cpus_per_run, num_gpus=args.gpus_per_run, max_retries=0)
    for job in pending:  # plan() lists every pretraining run before the runs that need it
        needs = [by_name[need.name] for need in job.needs if need.name in by_name]
        by_name[job.name] = task.remote(job, args.cpus_per_run, args.gpus_per_run > 0, progress, *needs)
        tasks[by_name[job.name]] = job
    done, last_report = 0, time.time()
    try:
        while tasks:
            ready, _ = ray.wait(list(tasks), num_returns=1, timeout=5)
            for ref in ready:
                job, result = tasks.pop(ref), ray.get(ref)
                if result["status"] == "done":
                    done += 1
                    print(f"done   {job.name} ({result['minutes']:.1f} min on {result['node']}; grid at "
                          f"{(time.time() - start_time) / 60:.1f} min)", flush=True)
                elif result["status"] == "skipped":
                    skipped.append(job)
                    print(f"SKIP   {job.name}: a pretraining run it needs failed", flush=True)
                else:
                    failed.append(job)
                    reason = result.get("message") or (f"exit {result['returncode']}: "
                                                       f"{os.path.join(job.directory, 'log.txt')} ends with\n{log_tail(job)}")
                    print(f"FAILED {job.name} ({reason})", flush=True)
            if time.time() - last_report > 30 and tasks:
                print(f"progress: {done} finished, {ray.get(progress.count.remote())} running, {len(failed)} failed, "
                      f"{len(skipped)} skipped, {len(tasks)} left", flush=True)
                last_report = time.time()
    except KeyboardInterrupt:
        progress.stop.remote()  # each task stops its run within seconds
        ray.wait(list(tasks), num_returns=len(tasks), timeout=30)
        raise
    finally:
        if not args.ray_address:
            ray.shutdown()


def probe_writable(folder: str):
    """Create `folder` if needed and write a file in it: raises OSError where this user or node cannot."""
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):  # a name of its own: grids started together on one root do not collide
        pass


def check_root(args: Args):
    """--root must be writable here (and, with Ray on a cluster, on every worker: each task checks its own node)."""
    try:
        probe_writable(args.root)
    except OSError as err:
        raise SystemExit(f"error: --root {args.root!r} is not a writable folder ({err}). Pass a folder this user can write"
                         + (", on a filesystem every Ray worker sees at the same path." if args.launcher == "ray" else "."))


def check_datasets(datasets: List[str]):
    """Every local dataset of the grid is in the Minari store before any run starts: a missing one late in a long
    grid would otherwise fail hours in. (D4RL names may still be downloaded by the scripts.)"""
    store = os.environ.get("MINARI_DATASETS_PATH") or os.path.join(os.path.expanduser("~"), ".minari", "datasets")
    missing = [d for d in datasets if "/" in d and not os.path.isdir(os.path.join(store, d, "data"))]
    if missing:
        raise SystemExit(f"error: --datasets {' '.join(missing)}: not in the Minari store {store}; build them first "
                         f"(e.g. `python benchmark/make_dataset.py --env hopper --levels medium --from-policy` builds "
                         f"baq/hopper/medium-v0) or point MINARI_DATASETS_PATH at the store that has them.")


def main(args: Args):
    check_args(args)
    check_root(args)
    check_datasets(PAPER_DATASETS if args.datasets == ["paper"] else args.datasets)
    jobs = plan(args)
    preset = PRESETS[args.preset]
    if args.preset == "cpu":
        print(f"preset cpu: {preset['offline_steps']:,} offline updates instead of the paper's 1,000,000 (reduced to fit a "
              f"2-core CPU), {preset['bc_steps']:,} BC updates, {preset['online_steps']:,} online steps")
    pending = [job for job in jobs if not job.finished()]
    at_a_time = f"{args.workers} at a time" if args.launcher == "local" else "through Ray"
    print(f"{len(jobs)} runs, {len(jobs) - len(pending)} already finished, {at_a_time}", flush=True)
    running, failed, skipped, start_time = [], [], [], time.time()
    try:
        if args.launcher == "ray":
            schedule_on_ray(args, pending, failed, skipped, start_time)
        else:
            schedule(args, pending, running, failed, skipped, start_time)
    except KeyboardInterrupt:
        for job in running:
            job.process.terminate()
            job.process.wait()
        done = sum(job.finished() for job in jobs)
        print(f"\ninterrupted: {done} of {len(jobs)} runs finished and are kept; rerun the same command to continue "
              f"(an interrupted run that wrote a resume.pt continues from it, other unfinished runs start over).",
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
