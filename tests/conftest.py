"""Fixtures: tiny Minari datasets built in a temporary MINARI_DATASETS_PATH, and a runner for the
top-level scripts as a user runs them (a subprocess with flags)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

# One torch thread for the tests and every script they start: two threads on two cores beside other
# work spin-wait in OpenMP, and a tiny run that takes 5 s took 2 minutes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Datasets missing from the test stores fail at once instead of after Minari's ~25 s of download retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gymnasium as gym
import numpy as np
import pytest

# A shell's `pytest &` (nohup, a runner's background job) starts pytest with SIGINT ignored; every run a test starts
# would inherit that, Python then installs no KeyboardInterrupt handler, and the tests that send Ctrl-C would wait on
# runs that never stop. With Python's own handler here, the runs start with SIGINT at its default, as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Hopper falls after ~18 steps on average under these actions, so a 20-step limit gives both terminations
# and truncations in a few thousand steps.
TINY_MAX_EPISODE_STEPS = 20


def ctrl_c(process: subprocess.Popen, timeout: float = 120, sig=signal.SIGINT):
    """Send Ctrl-C (or `sig`) and return (stdout, stderr) once the process ends; one still running after `timeout`
    seconds is killed rather than left behind, and the test fails."""
    process.send_signal(sig)
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        raise AssertionError(f"still running {timeout} s after Ctrl-C, killed: {process.args}\n{stderr}")


def build_dataset(dataset_id: str, env_name: str, num_steps: int, seed: int, ref_scores=None):
    """A small Minari dataset collected with a noisy constant-bias policy: actions differ from
    uniform noise, so a BC policy has something to learn."""
    import minari
    from minari.data_collector import EpisodeBuffer

    env = gym.make(env_name, max_episode_steps=TINY_MAX_EPISODE_STEPS)
    rng = np.random.default_rng(seed)
    bias = rng.uniform(-0.5, 0.5, env.action_space.shape)
    episodes, steps = [], 0
    while steps < num_steps:
        obs, _ = env.reset(seed=int(rng.integers(1 << 30)))
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        done = False
        while not done:
            action = np.clip(bias + 0.3 * rng.standard_normal(bias.shape), -1, 1).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(reward)
            terminations.append(terminated)
            truncations.append(truncated)
            done = terminated or truncated
        steps += len(actions)
        episodes.append(EpisodeBuffer(id=len(episodes), observations=np.asarray(observations), actions=np.asarray(actions),
                                      rewards=np.asarray(rewards), terminations=np.asarray(terminations),
                                      truncations=np.asarray(truncations)))
    ref_min, ref_max = ref_scores if ref_scores else (None, None)
    return minari.create_dataset_from_buffers(dataset_id, episodes, env=env.spec, algorithm_name="noisy-constant",
                                              author="tests", author_email="tests@localhost", code_permalink="tests/conftest.py",
                                              eval_env=env.spec, ref_min_score=ref_min, ref_max_score=ref_max, description="test fixture")


@pytest.fixture(scope="session")
def minari_store(tmp_path_factory):
    """A Minari store with `baq/hopper/tiny-v0` (D4RL reference scores), `baq/hopper/other-v0` (same
    environment, another dataset) and `baq/halfcheetah/tiny-v0` (other sizes, no reference scores)."""
    store = tmp_path_factory.mktemp("minari")
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(store)
    build_dataset("baq/hopper/tiny-v0", "Hopper-v5", 3000, seed=0, ref_scores=(-20.272305, 3234.3))
    build_dataset("baq/hopper/other-v0", "Hopper-v5", 1000, seed=1, ref_scores=(-20.272305, 3234.3))
    build_dataset("baq/halfcheetah/tiny-v0", "HalfCheetah-v5", 600, seed=2)
    yield store
    if previous is None:
        os.environ.pop("MINARI_DATASETS_PATH")
    else:
        os.environ["MINARI_DATASETS_PATH"] = previous


# Scripts that share the data, BAQ-term, buffer, evaluation and checkpoint code (identical text).
PIPELINE_SCRIPTS = ["baq_iql", "baq_cql"]
# Every top-level script: the same --env-id handling and errors.
ALL_SCRIPTS = PIPELINE_SCRIPTS + ["offline_pretrain", "bc_pretrain"]

TINY_FLAGS = ["--offline-steps", "60", "--bc-steps", "40", "--online-steps", "70", "--eval-every", "30",
              "--offline-eval-every", "30", "--eval-episodes", "2", "--log-every", "20", "--batch-size", "32",
              "--hidden-dim", "32", "--no-cuda", "--no-compile", "--threads", "1"]


@pytest.fixture(scope="session")
def run_script(minari_store):
    """Run a top-level script as a user does (a subprocess with flags) on the tiny datasets.
    Returns the completed process and the run directory it wrote (None when it wrote none)."""

    def run(script: str, runs_dir: Path, *flags: str, env_id: str = "baq/hopper/tiny-v0", tiny: bool = True, store=None):
        command = [sys.executable, str(ROOT / script), "--env-id", env_id, "--runs-dir", str(runs_dir),
                   *(TINY_FLAGS if tiny else []), *flags]
        environment = {**os.environ, "MINARI_DATASETS_PATH": str(store or minari_store), "PYTHONWARNINGS": "ignore"}
        result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600, cwd=runs_dir.parent)
        run_dirs = sorted(runs_dir.iterdir()) if runs_dir.exists() else []
        return result, run_dirs[-1] if run_dirs else None

    return run


def read_scalars(run_dir: Path) -> dict:
    """{tag: [(step, value), ...]} from a run's TensorBoard event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def step_sequentially_and_compare(agent, reference, optimizers, losses, tau=0.005):
    """CORL's way: each loss stepped by its own optimizer, then the target critics' soft update;
    the reference must end where `agent`'s single update ended."""
    import torch

    for optimizer, loss in zip(optimizers, losses):
        optimizer.zero_grad()
        loss.backward(retain_graph=True)
        optimizer.step()
    with torch.no_grad():
        for target, online in zip(reference.qf_target.parameters(), reference.qf.parameters()):
            target.lerp_(online, tau)
    for (name, mine), theirs in zip(agent.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(mine, theirs, msg=name)
