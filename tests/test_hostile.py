"""Unusual inputs a user may give (issue 34): each stops with one line naming the input, no traceback, a
non-zero exit and nothing written, or is recorded as what it did; SIGTERM, divergence and a run's identity."""
import importlib
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_FLAGS, read_scalars


def one_line_error(result, *words):
    message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""  # after any progress bar
    assert result.returncode not in (0, None) and "Traceback" not in result.stderr, result.stderr
    assert message.startswith("error: ") and "\n" not in message, message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("flags, words", [
    (["--runs-dir", "A_FILE"], ["--runs-dir", "is not a writable folder"]),
    (["--runs-dir", ""], ["--runs-dir ''", "empty"]),
    (["--exp-name", "a/b"], ["--exp-name 'a/b' is not a folder name"]),
    (["--exp-name", "x" * 300], ["is not a folder name", "up to 100"]),
    (["--exp-name", "/../../escaped"], ["--exp-name '/../../escaped'"]),  # would leave --runs-dir (row 3)
])
def test_run_locations_are_checked_before_loading(run_script, tmp_path, flags, words):
    """Issue 34, rows 2-3: before the dataset loads (the store here is empty: loading would fail otherwise)."""
    (tmp_path / "A_FILE").write_text("")
    flags = [str(tmp_path / "A_FILE") if flag == "A_FILE" else flag for flag in flags]
    result, _ = run_script("baq_iql.py", tmp_path / "runs", *flags, store=tmp_path / "empty-store")
    one_line_error(result, *words)
    assert sorted(os.listdir(tmp_path)) == ["A_FILE"]  # no runs folder, no store, nothing escaped


def test_a_store_path_that_is_a_file_is_one_line(run_script, tmp_path):
    (tmp_path / "store").write_text("")
    result, run_dir = run_script("baq_cql.py", tmp_path / "runs", store=tmp_path / "store")
    one_line_error(result, "MINARI_DATASETS_PATH", "is a file")
    assert (tmp_path / "store").is_file()  # left as it was
    assert run_dir is None


def test_a_missing_dataset_leaves_no_store_folder_behind(run_script, tmp_path):
    result, _ = run_script("offline_pretrain.py", tmp_path / "runs", env_id="baq/hopper/medium-v0",
                           store=tmp_path / "new" / "store", tiny=False)
    one_line_error(result, "'baq/hopper/medium-v0'", "nor downloadable", "--levels medium --from-policy")
    assert not (tmp_path / "new" / "store").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("damaged", ["main_data.hdf5", "metadata.json"])
def test_a_damaged_dataset_names_its_folder_and_the_fix(run_script, minari_store, tmp_path, damaged):
    """Issue 34, row 5: a truncated file of a dataset in the store."""
    store = tmp_path / "store"
    shutil.copytree(minari_store / "baq" / "hopper" / "tiny-v0", store / "baq" / "hopper" / "tiny-v0")
    path = next((store / "baq" / "hopper" / "tiny-v0").rglob(damaged))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result, run_dir = run_script("baq_iql.py", tmp_path / "runs", store=store)
    one_line_error(result, "'baq/hopper/tiny-v0'", "cannot be read", str(store / "baq" / "hopper" / "tiny-v0"),
                   "delete that folder")
    assert run_dir is None


@pytest.fixture(scope="module")
def offline_run(minari_store, tmp_path_factory):
    runs = tmp_path_factory.mktemp("offline")
    command = [sys.executable, str(ROOT / "baq_iql.py"), "--env-id", "baq/hopper/tiny-v0", "--runs-dir", str(runs),
               *TINY_FLAGS, "--online-steps", "0"]
    environment = {**os.environ, "MINARI_DATASETS_PATH": str(minari_store), "PYTHONWARNINGS": "ignore"}
    assert subprocess.run(command, capture_output=True, text=True, env=environment).returncode == 0
    return next(runs.iterdir())


@pytest.mark.parametrize("flag, value, words", [
    ("--reward-scale", "5", ["--reward-scale 5.0 differs from the offline checkpoint's", "which fixes it"]),
    ("--obs-norm-eps", "0.5", ["--offline-checkpoint", "was made for obs_norm_eps 0.001, this run has 0.5",
                               "pass --obs-norm-eps 0.001"]),
])
def test_a_flag_the_checkpoint_fixes_is_refused_when_it_differs(run_script, offline_run, tmp_path, flag, value, words):
    """Issue 34, row 6: never silently replaced by the checkpoint's value while the records name the flag's."""
    result, run_dir = run_script("baq_iql.py", tmp_path / "runs", "--offline-checkpoint",
                                 str(offline_run / "offline.pt"), flag, value)
    one_line_error(result, *words)
    assert run_dir is None


def test_the_records_name_the_reward_scale_that_was_used(run_script, offline_run, tmp_path):
    checkpoint = torch.load(offline_run / "offline.pt", weights_only=True)
    result, run_dir = run_script("baq_iql.py", tmp_path / "runs", "--offline-checkpoint", str(offline_run / "offline.pt"),
                                 "--bc-checkpoint", str(offline_run / "bc.pt"))
    assert result.returncode == 0, result.stderr
    final = torch.load(run_dir / "final.pt", weights_only=True)
    assert final["args"]["reward_scale"] == checkpoint["reward_scale"] == final["reward_scale"] != None  # noqa: E711


def test_the_hyperparameters_table_lists_every_flag(offline_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(offline_run), size_guidance={"tensors": 0})
    events.Reload()
    table = events.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    checkpoint = torch.load(offline_run / "offline.pt", weights_only=True)
    assert table.startswith("|param|value|\n|-|-|\n")
    assert table.splitlines()[2:] == [f"|{key}|{value}|" for key, value in checkpoint["args"].items()]


def test_evaluations_at_their_steps(minari_store, tmp_path, monkeypatch):
    """Offline updates 30 and 60, online steps 0, 30, 60 and 70: one evaluation each."""
    script = importlib.import_module("baq_iql")
    calls = []
    monkeypatch.setattr(script, "evaluate", lambda *a, **k: calls.append(1) or (torch.ones(2).numpy(), 0.0))
    monkeypatch.setattr(sys, "argv", ["baq_iql.py", "--env-id", "baq/hopper/tiny-v0", "--runs-dir",
                                      str(tmp_path / "runs"), *TINY_FLAGS])
    script.main(script.tyro.cli(script.Args))
    scalars = read_scalars(next((tmp_path / "runs").iterdir()))
    assert [step for step, _ in scalars["eval/return"]] == [0, 30, 60, 70] and len(calls) == 6
    assert [step for step, _ in scalars["offline/eval/return"]] == [30, 60]


def test_divergence_stops_at_the_first_log_with_one_line(run_script, tmp_path):
    result, run_dir = run_script("baq_iql.py", tmp_path / "runs", "--reward-scale", "1e38")
    one_line_error(result, "at step 20 offline/losses/", "diverged", str(run_dir))
    losses = read_scalars(run_dir)["offline/losses/q_loss"]
    assert [step for step, _ in losses] == [20] and not math.isfinite(losses[0][1])  # logged, then stopped
    assert not (run_dir / "offline.pt").exists()


def test_track_logs_the_scalars_to_a_local_wandb_run(run_script, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    result, run_dir = run_script("bc_pretrain.py", tmp_path / "runs", "--track", "--bc-steps", "40", tiny=False)
    assert result.returncode == 0, result.stderr
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and b"bc/loss" in runs[0].read_bytes()
