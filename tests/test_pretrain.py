"""offline_pretrain.py and bc_pretrain.py: their checkpoints are the fine-tuning scripts' own phases."""
import importlib

import numpy as np
import pytest
import torch

from conftest import TINY_FLAGS, build_dataset, read_scalars

OFFLINE_FLAGS = ["--offline-steps", "60", "--offline-eval-every", "30", "--eval-episodes", "2", "--log-every", "20",
                 "--batch-size", "32", "--hidden-dim", "32", "--no-cuda", "--no-compile"]
BC_FLAGS = ["--bc-steps", "40", "--eval-episodes", "2", "--log-every", "20", "--batch-size", "32", "--hidden-dim", "32", "--no-cuda"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


@pytest.fixture(scope="module", params=["iql", "cql"])
def pretrained(request, run_script, tmp_path_factory):
    """offline_pretrain.py's offline.pt and the fine-tuning script's own offline phase (same seed)."""
    algo, tmp = request.param, tmp_path_factory.mktemp(f"pretrain_{request.param}")
    made, run_dir = run_script("offline_pretrain.py", tmp / "pretrain", "--algo", algo, *OFFLINE_FLAGS, tiny=False)
    assert made.returncode == 0, made.stderr
    fine_tuned, fine_tuning_dir = run_script(f"baq_{algo}.py", tmp / "finetune", "--online-steps", "0")
    assert fine_tuned.returncode == 0, fine_tuned.stderr
    return algo, run_dir, fine_tuning_dir


def test_offline_pretrain_is_the_fine_tuning_scripts_offline_phase(pretrained):
    algo, run_dir, fine_tuning_dir = pretrained
    ours, theirs = load(run_dir / "offline.pt"), load(fine_tuning_dir / "offline.pt")
    assert (ours["kind"], ours["algorithm"]) == ("offline", algo)
    assert_same_weights(ours["state_dict"]["agent"], theirs["state_dict"]["agent"])
    assert ours["reward_scale"] == theirs["reward_scale"]
    scalars = read_scalars(run_dir)
    assert [s for s, _ in scalars["offline/eval/normalized_score"]] == [30, 60]
    assert scalars["offline/eval/return"] == read_scalars(fine_tuning_dir)["offline/eval/return"]
    for tag in ("offline/eval/q_bias", "offline/losses/q_loss", "offline/losses/actor_loss", "offline/charts/SPS"):
        assert tag in scalars


def test_fine_tuning_accepts_the_offline_checkpoint(pretrained, run_script, tmp_path):
    algo, run_dir, _ = pretrained
    result, fine_dir = run_script(f"baq_{algo}.py", tmp_path / "runs", "--offline-checkpoint", str(run_dir / "offline.pt"))
    assert result.returncode == 0, result.stderr
    assert not (fine_dir / "offline.pt").exists() and "offline/losses/q_loss" not in read_scalars(fine_dir)


def test_resume_continues_exactly(pretrained, run_script, tmp_path):
    algo, run_dir, _ = pretrained
    first, split_dir = run_script("offline_pretrain.py", tmp_path / "runs", "--algo", algo, *OFFLINE_FLAGS,
                                  "--stop-after", "25", tiny=False)
    assert first.returncode == 0, first.stderr
    assert "stopped after 25 updates" in first.stdout and not (split_dir / "offline.pt").exists()
    resumed, same_dir = run_script("offline_pretrain.py", tmp_path / "runs", "--resume", str(split_dir / "resume.pt"),
                                   "--offline-steps", "999", tiny=False)
    assert resumed.returncode == 0, resumed.stderr
    assert same_dir == split_dir and "resuming" in resumed.stdout
    ignored = next(line for line in resumed.stdout.splitlines() if "--resume continues the run" in line)
    assert "--offline-steps" in ignored.split("ignored:")[1]  # the run keeps its own 60
    assert_same_weights(load(split_dir / "offline.pt")["state_dict"]["agent"], load(run_dir / "offline.pt")["state_dict"]["agent"])
    whole, split = read_scalars(run_dir), read_scalars(split_dir)
    for tag in ("offline/losses/q_loss", "offline/eval/return"):
        assert whole[tag] == split[tag], tag  # logged once per step, across the interruption too


def test_a_run_saved_on_another_device_goes_on_with_a_note(pretrained, run_script, tmp_path):
    """A generator's state cannot move between devices (CPU and CUDA): --resume on the other one continues the
    run from its weights and Adam moments, without a traceback, and says it is no longer exact."""
    algo, _, _ = pretrained
    first, run_dir = run_script("offline_pretrain.py", tmp_path / "runs", "--algo", algo, *OFFLINE_FLAGS,
                                "--stop-after", "25", tiny=False)
    assert first.returncode == 0, first.stderr
    resume = load(run_dir / "resume.pt")
    resume["rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)  # as a run saved on a GPU holds
    torch.save(resume, run_dir / "resume.pt")
    resumed, _ = run_script("offline_pretrain.py", tmp_path / "runs", "--resume", str(run_dir / "resume.pt"), tiny=False)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    assert "note: saved on cuda, resumed on cpu" in resumed.stdout and (run_dir / "offline.pt").exists()


def test_checkpoints_of_a_rebuilt_dataset_are_refused(pretrained, run_script, tmp_path, monkeypatch):
    """The same name and size, other transitions (a dataset rebuilt on another machine): --resume cannot continue
    exactly, and an offline.pt or bc.pt trained on the old data is refused, not applied to the new."""
    algo, run_dir, fine_tuning_dir = pretrained
    stopped, split_dir = run_script("offline_pretrain.py", tmp_path / "runs", "--algo", algo, *OFFLINE_FLAGS,
                                    "--stop-after", "25", tiny=False)
    assert stopped.returncode == 0, stopped.stderr
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "rebuilt"))
    build_dataset("baq/hopper/tiny-v0", "Hopper-v5", 3000, seed=5, ref_scores=(-20.272305, 3234.3))
    for script, flags, words in [
            ("offline_pretrain.py", ["--resume", str(split_dir / "resume.pt")], "cannot continue exactly"),
            (f"baq_{algo}.py", ["--offline-checkpoint", str(run_dir / "offline.pt"), *TINY_FLAGS], "rebuilt or changed"),
            (f"baq_{algo}.py", ["--bc-checkpoint", str(fine_tuning_dir / "bc.pt"), *TINY_FLAGS], "rebuilt or changed")]:
        result, new_dir = run_script(script, tmp_path / "new", *flags, tiny=False, store=tmp_path / "rebuilt")
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert words in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
        assert new_dir is None


def test_bc_pretrain_is_the_fine_tuning_scripts_bc_phase(pretrained, run_script, tmp_path):
    algo, _, fine_tuning_dir = pretrained
    result, bc_dir = run_script("bc_pretrain.py", tmp_path / "runs", *BC_FLAGS, tiny=False)
    assert result.returncode == 0, result.stderr
    ours = load(bc_dir / "bc.pt")
    assert (ours["kind"], ours["algorithm"]) == ("bc", "bc")
    assert_same_weights(ours["state_dict"], load(fine_tuning_dir / "bc.pt")["state_dict"])
    scalars = read_scalars(bc_dir)
    assert "bc/eval/normalized_score" in scalars and "bc/loss" in scalars
    fine, fine_dir = run_script(f"baq_{algo}.py", tmp_path / "fine", "--bc-checkpoint", str(bc_dir / "bc.pt"))
    assert fine.returncode == 0, fine.stderr
    assert not (fine_dir / "bc.pt").exists() and "bc/loss" not in read_scalars(fine_dir)


def test_figure1_numbers_match_a_direct_computation(pretrained, run_script, tmp_path, minari_store):
    algo, run_dir, _ = pretrained
    result, bc_dir = run_script("bc_pretrain.py", tmp_path / "runs", *BC_FLAGS, "--offline-checkpoint", str(run_dir / "offline.pt"),
                                tiny=False)
    assert result.returncode == 0, result.stderr
    assert (bc_dir / "figure1.png").stat().st_size > 10_000
    scalars = read_scalars(bc_dir)

    script = importlib.import_module(f"baq_{algo}")
    data, _, _, _, max_action = script.load_offline_data("baq/hopper/tiny-v0")
    offline, bc = load(run_dir / "offline.pt"), load(bc_dir / "bc.pt")
    agent = script.Agent(11, 3, max_action, script.Args(compile=False, hidden_dim=32))
    agent.load_state_dict(offline["state_dict"]["agent"])
    bc_policy = script.GaussianPolicy(11, 3, 32, max_action)
    bc_policy.load_state_dict(bc["state_dict"])
    actions = torch.as_tensor(data["actions"])
    for checkpoint, policy, tag in ((offline, lambda o: agent.act(o, deterministic=True), "offline_policy"), (bc, bc_policy, "bc_policy")):
        obs = torch.as_tensor((data["observations"] - checkpoint["obs_mean"].numpy()) / checkpoint["obs_std"].numpy())
        with torch.no_grad():
            per_dimension = (policy(obs) - actions).pow(2).mean(0).numpy()
        assert scalars[f"figure1/{tag}_mse"][0][1] == pytest.approx(per_dimension.mean(), rel=1e-5)
        for dim in range(3):
            assert scalars[f"figure1/{tag}_mse_dim{dim}"][0][1] == pytest.approx(per_dimension[dim], rel=1e-5)
    assert np.isfinite(scalars["figure1/offline_policy_mse"][0][1])


def test_wrong_checkpoints_are_refused(pretrained, run_script, tmp_path):
    algo, run_dir, fine_tuning_dir = pretrained
    bc_path, offline_path = str(fine_tuning_dir / "bc.pt"), str(run_dir / "offline.pt")
    cases = [
        ("bc_pretrain.py", [*BC_FLAGS, "--offline-checkpoint", bc_path], "baq/hopper/tiny-v0", ["kind 'bc'", "`offline.pt` of an earlier IQL or CQL run"]),
        ("bc_pretrain.py", [*BC_FLAGS, "--offline-checkpoint", offline_path], "baq/hopper/other-v0", ["dataset_id 'baq/hopper/tiny-v0'"]),
        ("offline_pretrain.py", ["--resume", offline_path], "baq/hopper/tiny-v0", ["kind 'offline'", "`resume.pt`"]),
        ("offline_pretrain.py", ["--algo", "sac"], "baq/hopper/tiny-v0", ["sac"]),
    ]
    for script, flags, env_id, words in cases:
        result, _ = run_script(script, tmp_path / "runs", *flags, env_id=env_id, tiny=False)
        assert result.returncode != 0, (script, flags)
        assert "Traceback" not in result.stderr, result.stderr
        for word in words:
            assert word in result.stderr, (script, flags, result.stderr)
