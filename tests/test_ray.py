"""benchmark/run.py --launcher ray: the smoke grid through a real local Ray instance (one for the whole
module) gives what the local launcher gives, resumes after an interruption, reports a failing run while
the rest finish, and refuses a wrong address or root in seconds."""
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, ctrl_c, read_scalars
from test_benchmark import benchmark

ray = pytest.importorskip("ray")
METHODS = ["iql", "iql-baq", "iql-so2"]


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray instance for the module; run.py joins it with --ray-address."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def smoke_grid(minari_store, root, *flags, datasets=("baq/hopper/tiny-v0",)):
    return benchmark("run.py", minari_store, "--preset", "smoke", "--datasets", *datasets, "--methods", *METHODS,
                     "--seeds", "1", "--workers", "2", "--root", str(root), *flags)


def artifacts(root):
    """{dataset/method/seed: the checkpoint} of a grid (run folder names carry a time, so they are left out)."""
    return {str(path.parent.parent.relative_to(root)): path for path in root.glob("smoke/*/*/seed*/*/*.pt")
            if path.name != "resume.pt"}


@pytest.fixture(scope="module")
def grids(minari_store, ray_address, tmp_path_factory):
    local_root, ray_root = tmp_path_factory.mktemp("local") / "runs", tmp_path_factory.mktemp("ray") / "runs"
    local = smoke_grid(minari_store, local_root)
    assert local.returncode == 0, local.stdout + local.stderr
    through_ray = smoke_grid(minari_store, ray_root, "--launcher", "ray", "--ray-address", ray_address)
    assert through_ray.returncode == 0, through_ray.stdout + through_ray.stderr
    return local_root, ray_root, through_ray


def test_ray_grid_gives_the_local_grids_folders_tags_and_checkpoints(grids):
    local_root, ray_root, through_ray = grids
    assert "5 runs, 0 already finished, through Ray" in through_ray.stdout
    assert "5 of 5 runs finished, 0 failed, 0 skipped" in through_ray.stdout
    local, remote = artifacts(local_root), artifacts(ray_root)
    assert sorted(local) == sorted(remote) and len(local) == 5
    for key in local:  # same seeds, same machine, same commands: the same numbers
        mine, theirs = (torch.load(path, map_location="cpu", weights_only=True) for path in (local[key], remote[key]))
        weights = "agent" if "agent" in mine["state_dict"] else None
        for name, value in (mine["state_dict"][weights] if weights else mine["state_dict"]).items():
            expected = theirs["state_dict"][weights][name] if weights else theirs["state_dict"][name]
            assert torch.equal(value, expected), (key, name)
        local_tags, ray_tags = read_scalars(local[key].parent), read_scalars(remote[key].parent)
        assert local_tags.keys() == ray_tags.keys()
        for tag in [t for t in local_tags if "eval/" in t]:
            assert local_tags[tag] == ray_tags[tag], (key, tag)


def test_an_interrupted_ray_grid_resumes(grids, minari_store, ray_address, tmp_path):
    """Ctrl-C stops the grid and its runs (none left running); the rerun skips what finished."""
    root = tmp_path / "runs"
    environment = {**os.environ, "MINARI_DATASETS_PATH": str(minari_store), "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(ROOT / "benchmark" / "run.py"), "--preset", "smoke", "--datasets", "baq/hopper/tiny-v0",
               "--methods", *METHODS, "--seeds", "1", "--root", str(root), "--launcher", "ray", "--ray-address", ray_address]
    grid = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    while not list(root.glob("smoke/*/pretrain-*/seed1/*/*.pt")):  # interrupt after the first pretraining finished
        assert grid.poll() is None, grid.communicate()
        time.sleep(0.2)
    stdout, stderr = ctrl_c(grid)
    assert grid.returncode == 130 and "interrupted:" in stderr and "Traceback" not in stderr, stdout + stderr
    time.sleep(1)
    leftovers = subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], "runs of the interrupted grid are still running"
    finished = len(artifacts(root))
    assert 1 <= finished < 5  # the first pretraining finished and the interrupt stopped the grid before its end
    resumed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"5 runs, {finished} already finished" in resumed.stdout and len(artifacts(root)) == 5


def test_a_failing_ray_run_is_reported_and_the_others_finish(ray_address, minari_store, tmp_path):
    store = tmp_path / "store"  # the tiny dataset, and a copy of it whose data file is cut: its runs fail
    shutil.copytree(minari_store, store)
    shutil.copytree(store / "baq" / "hopper" / "tiny-v0", store / "baq" / "hopper" / "cut-v0")
    data = next((store / "baq" / "hopper" / "cut-v0").rglob("main_data.hdf5"))
    data.write_bytes(data.read_bytes()[:1000])
    result = smoke_grid(store, tmp_path / "runs", "--launcher", "ray", "--ray-address", ray_address,
                        datasets=("baq/hopper/cut-v0", "baq/hopper/tiny-v0"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "FAILED baq/hopper/cut-v0 offline-iql seed1 (exit 1" in result.stdout
    assert "| error: --env-id 'baq/hopper/cut-v0'" in result.stdout  # the log's last line
    assert "SKIP   baq/hopper/cut-v0 iql-baq seed1" in result.stdout
    assert "5 of 10 runs finished, 2 failed, 3 skipped" in result.stdout
    assert len(artifacts(tmp_path / "runs")) == 5


@pytest.mark.parametrize("flags, words", [
    (["--ray-address", "127.0.0.1:1"], "error: --ray-address '127.0.0.1:1': no Ray cluster answers there"),
    (["--ray-address", "ray://127.0.0.1:1"], "no Ray cluster answers there"),
    (["--gpus-per-run", "-1"], "error: --cpus-per-run 1 / --gpus-per-run -1.0"),
])
def test_bad_ray_settings_fail_in_seconds_with_one_line(minari_store, tmp_path, flags, words):
    started = time.time()
    result = smoke_grid(minari_store, tmp_path / "runs", "--launcher", "ray", *flags)
    assert result.returncode != 0 and time.time() - started < 20
    assert words in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr


def test_ray_flags_without_the_ray_launcher_are_refused(minari_store, tmp_path):
    result = smoke_grid(minari_store, tmp_path / "runs", "--gpus-per-run", "0.5")
    assert result.returncode != 0 and "apply to --launcher ray" in result.stderr


def test_an_unwritable_root_is_refused_before_anything_runs(minari_store, tmp_path):
    (tmp_path / "a-file").write_text("")
    result = smoke_grid(minari_store, tmp_path / "a-file" / "runs", "--launcher", "ray")
    assert result.returncode != 0 and "is not a writable folder" in result.stderr
    assert "every Ray worker sees" in result.stderr and "Traceback" not in result.stderr
