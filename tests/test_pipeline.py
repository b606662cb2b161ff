"""Each fine-tuning script end to end, as a user runs it, on the tiny datasets the tests build."""
import math

import pytest
import torch

from conftest import ALL_SCRIPTS, PIPELINE_SCRIPTS, read_scalars

ONLINE_STEPS, LOG_EVERY = 70, 20  # as in conftest.TINY_FLAGS
REQUIRED_TAGS = ["eval/return", "eval/normalized_score", "eval/q_bias", "charts/SPS", "charts/episodic_return",
                 "losses/q_loss", "losses/actor_loss", "baq/w_mean", "baq/rho_mean", "baq/online_fraction",
                 "baq/online_weight_share", "offline/losses/q_loss", "offline/eval/return", "bc/loss"]


@pytest.fixture(scope="module", params=PIPELINE_SCRIPTS)
def full_run(request, run_script, tmp_path_factory):
    """One whole pipeline run with every phase: (script file, completed process, run directory)."""
    script = f"{request.param}.py"
    result, run_dir = run_script(script, tmp_path_factory.mktemp("full") / "runs")
    assert result.returncode == 0, result.stderr
    return script, result, run_dir


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_every_phase_updates_and_logs_finite_values(full_run):
    _, _, run_dir = full_run
    scalars = read_scalars(run_dir)
    for tag in REQUIRED_TAGS:
        assert tag in scalars, f"missing tag {tag}"
        assert all(math.isfinite(value) for _, value in scalars[tag]), tag
    assert [s for s, _ in scalars["offline/losses/q_loss"]] == [20, 40, 60]
    assert [s for s, _ in scalars["bc/loss"]] == [20, 40]
    # online updates run from the first online step: 20 updates averaged at step 20
    assert [s for s, _ in scalars["losses/q_loss"]] == [20, 40, 60, ONLINE_STEPS]
    assert [s for s, _ in scalars["eval/return"]] == [0, 30, 60, ONLINE_STEPS]
    for name in ("return", "q_bias"):  # online step 0 evaluates the policy the offline phase ended with, exactly
        assert scalars[f"eval/{name}"][0][1] == scalars[f"offline/eval/{name}"][-1][1]
    assert all(0 < w < 1 for _, w in scalars["baq/w_mean"])  # BAQ weights are on by default
    assert all(rho >= 1 for _, rho in scalars["baq/rho_mean"]) and scalars["baq/rho_mean"][-1][1] > 1
    assert 0 < scalars["baq/online_fraction"][-1][1] < 1 and 0 < scalars["baq/online_weight_share"][-1][1] < 1


def baq_summary(result) -> str:
    return next(line for line in result.stdout.splitlines() if line.startswith("BAQ: "))


def test_eq10_prices_only_new_transitions_by_default(full_run):
    """Sec. 4.3: "The priority of a new transition ... is calculated as" Eq. 10; the offline data keeps rho = 1."""
    _, result, _ = full_run
    summary = baq_summary(result)
    assert "Eq. 10 priorities: new transitions' only" in summary and "rho mean 1.000 (max 1.000)" in summary


def test_offline_priorities_and_kq_scale(full_run, run_script, tmp_path):
    script, _, first_dir = full_run
    result, run_dir = run_script(script, tmp_path / "runs", "--offline-checkpoint", str(first_dir / "offline.pt"),
                                 "--bc-checkpoint", str(first_dir / "bc.pt"), "--offline-priorities",
                                 "--no-priority-sampling", "--kq-scale", "4")
    assert result.returncode == 0, result.stderr
    summary = baq_summary(result)
    kq, default_kq = (float(baq_summary(r).split("k_q ")[1].split(",")[0]) for r in (result, full_run[1]))
    assert kq == pytest.approx(4 * default_kq, rel=1e-3)
    assert "Eq. 10 priorities: every transition's (--offline-priorities)" in summary
    # the default k_rho (the offline mean of ||pi_BC(s) - a||) and alpha = 1 give the offline data a mean rho of 2
    assert "rho mean 2.000" in summary
    uniform_rho = [rho for _, rho in read_scalars(run_dir)["baq/rho_mean"]]  # uniform batches keep that mean
    assert sum(uniform_rho) / len(uniform_rho) == pytest.approx(2.0, abs=0.05)


def test_checkpoints_describe_themselves_and_hold_trained_networks(full_run):
    script, _, run_dir = full_run
    offline, bc, final = (load(run_dir / f"{name}.pt") for name in ("offline", "bc", "final"))
    algorithm = script.removeprefix("baq_").removesuffix(".py")
    assert (offline["kind"], offline["algorithm"], bc["kind"], final["kind"]) == ("offline", algorithm, "bc", "final")
    for checkpoint in (offline, bc, final):
        assert checkpoint["dataset_id"] == "baq/hopper/tiny-v0"
        assert (checkpoint["obs_dim"], checkpoint["act_dim"]) == (11, 3)
        assert checkpoint["obs_mean"].shape == (11,) and checkpoint["reward_scale"] > 0
        assert checkpoint["args"]["online_steps"] == ONLINE_STEPS
    assert final["online_updates"] == ONLINE_STEPS and final["kq"] > 0 and final["krho"] > 0
    changed = [not torch.equal(final["state_dict"]["agent"][k], v) for k, v in offline["state_dict"]["agent"].items()]
    assert any(changed), "online fine-tuning changed no parameter"
    for key, value in bc["state_dict"].items():
        assert torch.equal(final["state_dict"]["bc_policy"][key], value)  # pi_BC stays frozen
    assert not list(run_dir.glob("*.tmp"))


def test_same_seed_same_result(full_run, run_script, tmp_path):
    script, _, first_dir = full_run
    result, second_dir = run_script(script, tmp_path / "runs")
    assert result.returncode == 0, result.stderr
    first, second = load(first_dir / "final.pt"), load(second_dir / "final.pt")
    for key, value in first["state_dict"]["agent"].items():
        assert torch.equal(value, second["state_dict"]["agent"][key]), key
    assert read_scalars(first_dir)["eval/return"] == read_scalars(second_dir)["eval/return"]


def test_checkpoints_skip_their_phases(full_run, run_script, tmp_path):
    script, _, first_dir = full_run
    result, run_dir = run_script(script, tmp_path / "runs", "--offline-checkpoint", str(first_dir / "offline.pt"),
                                 "--bc-checkpoint", str(first_dir / "bc.pt"))
    assert result.returncode == 0, result.stderr
    assert not (run_dir / "offline.pt").exists() and not (run_dir / "bc.pt").exists()
    scalars = read_scalars(run_dir)
    assert not any(tag.startswith(("offline/", "bc/")) for tag in scalars)
    # the loaded networks make exactly the fine-tuning of the run that trained them
    assert scalars["eval/return"] == read_scalars(first_dir)["eval/return"]
    final, first_final = load(run_dir / "final.pt"), load(first_dir / "final.pt")
    for part in ("agent", "bc_policy"):
        for key, value in first_final["state_dict"][part].items():
            assert torch.equal(final["state_dict"][part][key], value), (part, key)


def test_switches_off_give_unit_weights_and_uniform_sampling(full_run, run_script, tmp_path):
    script, _, _ = full_run
    result, run_dir = run_script(script, tmp_path / "runs", "--no-weighted-loss", "--no-priority-sampling")
    assert result.returncode == 0, result.stderr
    scalars = read_scalars(run_dir)
    assert all(w == 1.0 for _, w in scalars["baq/w_mean"])
    # with w = 1 the online share of the weighted loss is the online share of the batch
    share, fraction = ([v for _, v in scalars[f"baq/online_{name}"]] for name in ("weight_share", "fraction"))
    assert share == pytest.approx(fraction, rel=1e-5) and max(fraction) > 0
    # proportional sampling draws the online transitions (rho > 1; the offline data has rho = 1) more often
    uniform, prioritized = (sum(f for _, f in s["baq/online_fraction"]) for s in (scalars, read_scalars(full_run[2])))
    assert prioritized > 1.3 * uniform


@pytest.mark.parametrize("script", [f"{name}.py" for name in ALL_SCRIPTS])
@pytest.mark.parametrize("env_id, words", [
    ("baq/hopper/expert-v0", ["'baq/hopper/expert-v0'", "not in the store", "nor downloadable",
                              "`python benchmark/make_dataset.py --env hopper --levels expert --from-policy`"]),
    ("hopper-medium-v2", ["'mujoco/hopper/medium-v0'", "nor downloadable", "--levels medium --from-policy",
                          "--env-id baq/hopper/medium-v0"]),
    ("hopper-medium-replay-v2", ["no Minari counterpart", "--env hopper --medium-replay", "baq/hopper/medium-replay-v0"]),
    ("Hopper-Medium-v2", ["is not a D4RL name", "lower case"]),  # issue 34, row 9: no id that cannot exist
    ("baq/Hopper/medium-v0", ["nor downloadable", "check the id (case-sensitive"]),
    ("baq/hopper/nope-v0", ["nor downloadable", "check the id", "medium-replay"]),
])
def test_unusable_datasets_exit_with_one_clear_paragraph(run_script, tmp_path, script, env_id, words):
    result, run_dir = run_script(script, tmp_path / "runs", env_id=env_id, tiny=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message
    for word in words:
        assert word in message
    assert run_dir is None  # nothing written for a run that could not start


def test_mismatched_checkpoints_are_refused(full_run, run_script, tmp_path):
    script, _, first_dir = full_run
    cases = [
        (["--offline-checkpoint", str(first_dir / "bc.pt")], "baq/hopper/tiny-v0", ["of kind 'bc' by BC", "`offline.pt`"]),
        (["--bc-checkpoint", str(first_dir / "offline.pt")], "baq/hopper/tiny-v0", ["of kind 'offline'", "`bc.pt` of an earlier BC"]),
        (["--offline-checkpoint", str(first_dir / "offline.pt")], "baq/hopper/other-v0", ["dataset_id 'baq/hopper/tiny-v0'", "'baq/hopper/other-v0'"]),
        (["--bc-checkpoint", str(tmp_path / "nothing.pt")], "baq/hopper/tiny-v0", ["cannot be read (FileNotFoundError)"]),
        (["--offline-checkpoint", str(first_dir / "offline.pt"), "--hidden-dim", "16"], "baq/hopper/tiny-v0", ["hidden_dim 32", "this run has 16"]),
    ]
    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    cases.append((["--offline-checkpoint", str(tmp_path / "garbage.pt")], "baq/hopper/tiny-v0", ["cannot be read (UnpicklingError)"]))
    for flags, env_id, words in cases:
        result, _ = run_script(script, tmp_path / "runs", *flags, env_id=env_id)
        assert result.returncode != 0, flags
        assert "Traceback" not in result.stderr
        for word in words:
            assert word in result.stderr, (flags, result.stderr)


def test_offline_checkpoint_of_the_other_algorithm_is_refused(run_script, tmp_path):
    made, iql_dir = run_script("baq_iql.py", tmp_path / "iql", "--online-steps", "0")
    assert made.returncode == 0, made.stderr
    result, _ = run_script("baq_cql.py", tmp_path / "cql", "--offline-checkpoint", str(iql_dir / "offline.pt"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "by IQL" in result.stderr and "an earlier CQL run" in result.stderr
    # pi_BC is the same in both scripts: trained from the same seed it is the same network
    made_cql, cql_dir = run_script("baq_cql.py", tmp_path / "cql2", "--online-steps", "0")
    assert made_cql.returncode == 0, made_cql.stderr
    for key, value in load(iql_dir / "bc.pt")["state_dict"].items():
        assert torch.equal(load(cql_dir / "bc.pt")["state_dict"][key], value), key


def test_learning_rate_flags_apply_after_an_offline_checkpoint(full_run, run_script, tmp_path):
    """The checkpoint's Adam moments are kept, its learning rates are not: the run's flags win."""
    script, _, first_dir = full_run
    flags = ["--actor-lr", "2e-5", "--critic-lr", "1e-5"] + (["--value-lr", "3e-5"] if "iql" in script else [])
    result, run_dir = run_script(script, tmp_path / "runs", "--offline-checkpoint", str(first_dir / "offline.pt"),
                                 "--bc-checkpoint", str(first_dir / "bc.pt"), *flags)
    assert result.returncode == 0, result.stderr
    optimizer = load(run_dir / "final.pt")["state_dict"]["optimizer"]
    expected = [2e-5, 1e-5, 3e-5] if "iql" in script else [2e-5, 1e-5, 2e-5]
    assert [group["lr"] for group in optimizer["param_groups"]] == pytest.approx(expected)
    steps = {float(state["step"]) for state in optimizer["state"].values()}
    assert steps == {60.0 + ONLINE_STEPS}  # the offline phase's 60 Adam steps went on


def test_bc_checkpoint_with_other_normalization_is_refused(full_run, run_script, tmp_path):
    script, _, first_dir = full_run
    result, _ = run_script(script, tmp_path / "runs", "--bc-checkpoint", str(first_dir / "bc.pt"),
                           "--obs-norm-eps", "0.5")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "was made for obs_norm_eps 0.001, this run has 0.5: pass --obs-norm-eps 0.001" in result.stderr


def test_a_checkpoint_older_than_the_obs_norm_eps_key_is_checked_by_its_flag(full_run, run_script, tmp_path):
    """Checkpoints written before `obs_norm_eps` was a key hold it in their arguments, and are checked by it."""
    script, _, first_dir = full_run
    older = load(first_dir / "bc.pt")
    del older["obs_norm_eps"]
    torch.save(older, tmp_path / "bc.pt")
    accepted, accepted_dir = run_script(script, tmp_path / "accepted", "--bc-checkpoint", str(tmp_path / "bc.pt"))
    assert accepted.returncode == 0 and not (accepted_dir / "bc.pt").exists(), accepted.stderr  # pi_BC loaded
    refused, run_dir = run_script(script, tmp_path / "refused", "--bc-checkpoint", str(tmp_path / "bc.pt"),
                                  "--obs-norm-eps", "0.5")
    assert refused.returncode != 0 and run_dir is None
    assert "was made for obs_norm_eps 0.001, this run has 0.5: pass --obs-norm-eps 0.001" in refused.stderr


def test_runs_started_together_get_their_own_directories(minari_store, tmp_path):
    """Same script, seed and second: the second run must not write into the first one's directory."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, TINY_FLAGS

    command = [sys.executable, str(ROOT / "baq_iql.py"), "--env-id", "baq/hopper/tiny-v0", "--runs-dir",
               str(tmp_path / "runs"), *TINY_FLAGS, "--online-steps", "0", "--exp-name", "same"]
    environment = {**os.environ, "MINARI_DATASETS_PATH": str(minari_store), "PYTHONWARNINGS": "ignore"}
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment)
                 for _ in range(3)]
    for process in processes:
        assert process.wait(timeout=600) == 0, process.stderr.read()
    run_dirs = sorted((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 3
    for run_dir in run_dirs:
        assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
        assert (run_dir / "offline.pt").exists() and (run_dir / "final.pt").exists()


@pytest.mark.parametrize("script, flag, value", [
    ("baq_iql.py", "--kq", "nan"), ("baq_iql.py", "--gamma", "1.5"), ("baq_iql.py", "--expectile", "1.5"),
    ("baq_iql.py", "--tau", "5"), ("baq_iql.py", "--hidden-dim", "0"), ("baq_iql.py", "--batch-size", "-3"),
    ("baq_cql.py", "--cql-n-actions", "0"), ("baq_cql.py", "--online-cql-alpha", "-1"),
    ("baq_cql.py", "--actor-lr", "inf"), ("offline_pretrain.py", "--critic-lr", "0"),
    ("bc_pretrain.py", "--bc-lr", "-0.001"), ("offline_pretrain.py", "--offline-steps", "-5"),
    ("baq_iql.py", "--constraint-coef", "-1.0"), ("baq_cql.py", "--constraint-half-life", "0"),
    ("baq_iql.py", "--priority-alpha", "1000"),  # rho would overflow to inf (issue 34, row 8)
    *((script, "--seed", seed) for script in ("baq_iql.py", "baq_cql.py", "offline_pretrain.py", "bc_pretrain.py")
      for seed in ("-1", str(2**40))),  # issue 34, row 1: before anything loads
])
def test_out_of_domain_flags_exit_before_writing(run_script, tmp_path, script, flag, value):
    result, run_dir = run_script(script, tmp_path / "runs", flag, value, tiny=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith(f"error: {flag} {value}") and "\n" not in message and "must be" in message
    assert run_dir is None
