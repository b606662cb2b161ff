"""Stopping a run with Ctrl-C: no traceback, one line that says what was saved and how to go on; and
the progress a user sees while a phase runs."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY_FLAGS, ctrl_c


def command_on_tiny(script, minari_store, runs_dir, *flags):
    command = [sys.executable, str(ROOT / script), "--env-id", "baq/hopper/tiny-v0", "--runs-dir", str(runs_dir), *flags]
    return command, {**os.environ, "MINARI_DATASETS_PATH": str(minari_store), "PYTHONWARNINGS": "ignore"}


def start(script, minari_store, runs_dir, *flags):
    command, environment = command_on_tiny(script, minari_store, runs_dir, *flags)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)


def interrupt_once_written(process, runs_dir, name, timeout=300, sig=signal.SIGINT):
    """Wait until the run has written `name`, send Ctrl-C (or `sig`), and return its exit code and output."""
    deadline = time.time() + timeout
    while not list(runs_dir.glob(f"*/{name}")):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"{name} never appeared"
        time.sleep(0.2)
    time.sleep(1.0)
    stdout, stderr = ctrl_c(process, sig=sig)
    return process.returncode, stdout, stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_in_fine_tuning_names_the_checkpoints_to_continue_from(minari_store, tmp_path, sig):
    """SIGTERM (Slurm, timeout, Kubernetes) stops a run as Ctrl-C does."""
    flags = [*TINY_FLAGS, "--bc-steps", "10000000"]  # pi_BC runs until interrupted, after offline.pt is written
    process = start("baq_iql.py", minari_store, tmp_path / "runs", *flags)
    code, _, stderr = interrupt_once_written(process, tmp_path / "runs", "offline.pt", sig=sig)
    assert code == 130 and "Traceback" not in stderr, stderr
    line = stderr.strip().splitlines()[-1]
    offline = next((tmp_path / "runs").glob("*/offline.pt"))
    assert line.startswith("interrupted: saved ") and f"--offline-checkpoint {offline}" in line
    assert "pi_BC (Eq. 2)" in stderr and "update/s" in stderr  # the phase's progress bar was on the console


def test_ctrl_c_in_offline_pretraining_says_how_to_resume(minari_store, tmp_path):
    flags = ["--offline-steps", "10000000", "--checkpoint-every", "20", "--batch-size", "32", "--hidden-dim", "32",
             "--no-cuda", "--no-compile", "--threads", "1", "--offline-eval-every", "0"]
    process = start("offline_pretrain.py", minari_store, tmp_path / "runs", *flags)
    code, _, stderr = interrupt_once_written(process, tmp_path / "runs", "resume.pt")
    assert code == 130 and "Traceback" not in stderr, stderr
    resume = next((tmp_path / "runs").glob("*/resume.pt"))
    assert f"python {ROOT / 'offline_pretrain.py'} --resume {resume}" in stderr.strip().splitlines()[-1]  # as started
    assert "offline IQL" in stderr  # the progress bar


@pytest.mark.parametrize("name", ["offline_pretrain", "so2", "suf"])
def test_ctrl_c_once_the_final_checkpoint_is_written_names_no_resume(name, monkeypatch, capsys):
    """After the last resume.pt the run may still write its final checkpoint: then it has finished."""
    import importlib

    from test_baselines import baseline

    script = importlib.import_module(name) if name == "offline_pretrain" else baseline(name)
    final = "offline" if name == "offline_pretrain" else "final"
    for saved, expected in (({"r/resume.pt": "resume"}, "--resume r/resume.pt"),
                            ({"r/resume.pt": "resume", f"r/{final}.pt": final}, "; the run had finished.")):
        monkeypatch.setattr(script, "SAVED", saved)
        with pytest.raises(SystemExit) as stop:
            script.stop_on_interrupt()
        line = capsys.readouterr().err.strip()
        assert stop.value.code == 130 and expected in line and (final in saved.values()) != ("--resume" in line), line


def test_ctrl_c_after_bc_pt_says_it_is_complete_and_the_evaluation_is_not(minari_store, tmp_path):
    flags = ["--bc-steps", "20", "--eval-episodes", "1000000", "--batch-size", "32", "--hidden-dim", "32", "--no-cuda",
             "--threads", "1"]
    process = start("bc_pretrain.py", minari_store, tmp_path / "runs", *flags)
    code, _, stderr = interrupt_once_written(process, tmp_path / "runs", "bc.pt")
    assert code == 130 and "Traceback" not in stderr, stderr
    line = stderr.strip().splitlines()[-1]
    assert f"saved {next((tmp_path / 'runs').glob('*/bc.pt'))}" in line
    assert "--bc-checkpoint" in line and "evaluation did not finish" in line


@pytest.mark.parametrize("script, progress_bar", [("bc_pretrain.py", "pi_BC (Eq. 2)"), ("baq_cql.py", "offline CQL")])
def test_ctrl_c_before_any_checkpoint_says_so(minari_store, tmp_path, script, progress_bar):
    """Interrupted once its updates run (on Python 3.11 a Ctrl-C inside a first import, such as torch's lazy
    torch._dynamo, can surface as a RuntimeError of the dataclass being defined: not this test's subject)."""
    flags = ["--bc-steps", "10000000", "--batch-size", "32", "--hidden-dim", "32", "--no-cuda", "--threads", "1"]
    if script == "baq_cql.py":
        flags = [*TINY_FLAGS, "--offline-steps", "10000000"]
    command, environment = command_on_tiny(script, minari_store, tmp_path / "runs", *flags)
    code, _, stderr = interrupt_after(command, environment, progress_bar, stream="stderr")
    assert code == 130 and "Traceback" not in stderr, stderr
    assert "nothing was saved yet" in stderr.strip().splitlines()[-1]


def interrupt_after(command, environment, started_marker, stream="stdout", timeout=300):
    """Start a tool, wait for a marker in its output, send Ctrl-C; return exit code, stdout, stderr."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    deadline, seen = time.time() + timeout, ""
    while started_marker not in seen:
        assert process.poll() is None and time.time() < deadline, process.communicate()
        seen += getattr(process, stream).readline()
    stdout, stderr = ctrl_c(process)
    return process.returncode, seen + stdout, stderr


def test_ctrl_c_in_the_grid_stops_its_runs_and_says_how_to_continue(minari_store, tmp_path):
    environment = {**os.environ, "MINARI_DATASETS_PATH": str(minari_store), "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(ROOT / "benchmark" / "run.py"), "--preset", "smoke", "--datasets",
               "baq/hopper/tiny-v0", "--methods", "iql", "--seeds", "1", "--root", str(tmp_path)]
    code, _, stderr = interrupt_after(command, environment, "start ")
    assert code == 130 and "Traceback" not in stderr, stderr
    assert "interrupted: 0 of 3 runs finished" in stderr and "rerun the same command" in stderr


def test_ctrl_c_in_dataset_generation_points_at_its_checkpoints(tmp_path):
    environment = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path / "store"), "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(ROOT / "benchmark" / "make_dataset.py"), "--env", "hopper", "--medium-return", "1e9",
               "--work-dir", str(tmp_path / "work"), "--state-dir", str(tmp_path / "state"), "--policy-dir",
               str(tmp_path / "policies"), "--hidden-dim", "16", "--batch-size", "16", "--learning-starts", "100",
               "--eval-every", "100000", "--threads", "1"]
    code, _, stderr = interrupt_after(command, environment, "SAC hopper", stream="stderr")
    assert code == 130 and "Traceback" not in stderr, stderr
    assert f"interrupted: SAC training checkpoints are in {tmp_path / 'work'}" in stderr
