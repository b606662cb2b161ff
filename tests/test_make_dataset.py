"""benchmark/make_dataset.py on a tiny budget: datasets, rebuild from a policy, exact resume."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import PIPELINE_SCRIPTS, ROOT

TINY_SAC = ["--max-episode-steps", "50", "--learning-starts", "100", "--eval-every", "100", "--eval-episodes", "3",
            "--num-envs", "4", "--hidden-dim", "32", "--batch-size", "32", "--checkpoint-every", "150", "--threads", "1", "--no-compile"]


def make_dataset(tmp_path, store, *flags):
    command = [sys.executable, str(ROOT / "benchmark" / "make_dataset.py"), "--env", "hopper",
               "--work-dir", str(tmp_path / "work"), "--state-dir", str(tmp_path / "state"),
               "--policy-dir", str(tmp_path / "policies"), *TINY_SAC, *flags]
    environment = {**os.environ, "MINARI_DATASETS_PATH": str(store), "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny training that reaches its (tiny) medium return, and the datasets it wrote."""
    tmp_path = tmp_path_factory.mktemp("make_dataset")
    store = tmp_path / "store"
    result = make_dataset(tmp_path, store, "--medium-return", "-1000", "--max-steps", "2000", "--num-transitions", "1500")
    assert result.returncode == 0, result.stderr
    return tmp_path, store, result


def load_episodes(store, dataset_id):
    """A dataset of `store` and its episodes; the session's MINARI_DATASETS_PATH is restored after."""
    import minari

    previous = os.environ["MINARI_DATASETS_PATH"]
    os.environ["MINARI_DATASETS_PATH"] = str(store)
    try:
        dataset = minari.load_dataset(dataset_id)
        return dataset, list(dataset.iterate_episodes())
    finally:
        os.environ["MINARI_DATASETS_PATH"] = previous


@pytest.mark.parametrize("level, transitions", [("medium", 1500), ("random", 1500), ("medium-replay", 100)])
def test_datasets_follow_the_d4rl_protocol(built, minari_store, level, transitions):
    _, store, _ = built
    dataset, episodes = load_episodes(store, f"baq/hopper/{level}-v0")
    assert dataset.total_steps == sum(len(e.actions) for e in episodes) == transitions
    assert dataset.storage.metadata["ref_min_score"] == -20.272305 and dataset.storage.metadata["ref_max_score"] == 3234.3
    assert "SAC" in dataset.storage.metadata["algorithm_name"] and "transitions" in dataset.storage.metadata["description"]
    for episode in episodes:  # each episode ends once, at its last step (a termination on the time limit's step has both flags)
        ends = episode.terminations | episode.truncations
        assert ends[-1] and not ends[:-1].any()
        assert len(episode.observations) == len(episode.actions) + 1
        assert len(episode.actions) <= 50
    assert any(e.truncations[-1] for e in episodes)
    assert dataset.recover_environment().spec.id == "Hopper-v5"


def test_medium_policy_is_saved_with_its_training_record(built):
    tmp_path, _, result = built
    saved = torch.load(tmp_path / "policies" / "hopper-medium.pt", weights_only=True)
    assert saved["sac_steps"] == 100 and saved["stochastic_return"] >= -1000  # reached at the first evaluation
    assert "medium policy at step 100" in result.stdout + result.stderr


def test_from_policy_rebuilds_the_same_datasets(built, minari_store):
    tmp_path, store, _ = built
    _, before = load_episodes(store, "baq/hopper/medium-v0")
    result = make_dataset(tmp_path, store, "--from-policy", "--num-transitions", "1500")
    assert result.returncode == 0, result.stderr
    assert "SAC hopper" not in result.stderr  # no training
    _, after = load_episodes(store, "baq/hopper/medium-v0")
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.observations, b.observations)


def test_missing_policy_is_reported(tmp_path):
    result = make_dataset(tmp_path, tmp_path / "store", "--from-policy")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "hopper-medium.pt" in result.stderr and "python benchmark/make_dataset.py --env hopper" in result.stderr


def test_interrupted_training_resumes_exactly(tmp_path):
    unreachable = ["--medium-return", "1e9"]
    whole = make_dataset(tmp_path / "whole", tmp_path / "store", *unreachable, "--max-steps", "700")
    assert whole.returncode != 0 and "did not reach the medium return" in whole.stderr and "Traceback" not in whole.stderr
    first = make_dataset(tmp_path / "split", tmp_path / "store", *unreachable, "--max-steps", "350")
    assert first.returncode != 0
    second = make_dataset(tmp_path / "split", tmp_path / "store", *unreachable, "--max-steps", "700")
    assert "resumed from" in second.stdout + second.stderr
    a = torch.load(tmp_path / "whole" / "work" / "hopper-sac-seed0.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "work" / "hopper-sac-seed0.pt", weights_only=True)
    assert a["state"]["step"] == b["state"]["step"] > 350
    for key, value in a["agent"].items():
        assert torch.equal(value, b["agent"][key]), key
    for key, value in a["replay"].items():
        assert torch.equal(value, b["replay"][key]), key


@pytest.mark.parametrize("script", PIPELINE_SCRIPTS)
def test_fine_tuning_runs_on_generated_datasets(built, run_script, tmp_path, script):
    _, store, _ = built
    for level in ("medium", "medium-replay"):
        result, run_dir = run_script(f"{script}.py", tmp_path / "runs", env_id=f"baq/hopper/{level}-v0", store=store)
        assert result.returncode == 0, result.stderr
        assert (run_dir / "final.pt").exists()


def test_lost_work_dir_continues_from_the_training_state(tmp_path):
    unreachable = ["--medium-return", "1e9"]
    first = make_dataset(tmp_path, tmp_path / "store", *unreachable, "--max-steps", "350")
    assert first.returncode != 0 and (tmp_path / "state" / "hopper-sac-seed0.pt").exists()
    state_only = torch.load(tmp_path / "state" / "hopper-sac-seed0.pt", weights_only=True)
    assert "replay" not in state_only and state_only["state"]["step"] > 150
    for path in (tmp_path / "work").iterdir():
        path.unlink()
    second = make_dataset(tmp_path, tmp_path / "store", *unreachable, "--max-steps", "700")
    assert "continued from the training state" in second.stdout and "not exact" in second.stdout
    after = torch.load(tmp_path / "work" / "hopper-sac-seed0.pt", weights_only=True)
    assert after["state"]["step"] > state_only["state"]["step"]
    # the refilled buffer holds only what came after the continuation
    assert after["state"]["replay_size"] == after["state"]["step"] - state_only["state"]["step"]


def test_expert_training_keeps_a_saved_medium_policy(built, tmp_path):
    built_dir, _, _ = built
    (tmp_path / "policies").mkdir()
    medium = (built_dir / "policies" / "hopper-medium.pt").read_bytes()
    (tmp_path / "policies" / "hopper-medium.pt").write_bytes(medium)
    result = make_dataset(tmp_path, tmp_path / "store", "--expert", "--expert-return", "1e9", "--max-steps", "300")
    assert "medium policy is already saved" in result.stdout and "did not reach the expert return" in result.stderr
    assert (tmp_path / "policies" / "hopper-medium.pt").read_bytes() == medium
    assert not (tmp_path / "store").exists()  # no medium-replay rewritten


def test_a_collection_is_the_same_under_any_thread_count():
    """The committed hopper policy's first 3,000 transitions under torch's 1 and 2 threads: with the policy's
    arithmetic on the caller's threads they first differed at transition 2,745 (two runs of one machine)."""
    from benchmark import make_dataset

    policy, _ = make_dataset.load_policy("hopper", "medium", make_dataset.Args())
    threads, actions = torch.get_num_threads(), []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            episodes = make_dataset.collect("hopper", policy, 3000, 10, 1000, seed=1)
            assert torch.get_num_threads() == count  # the caller's setting is restored
            actions.append(np.concatenate([episode["actions"] for episode in episodes]))
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(*actions)


def test_one_sac_step_equals_three_sequential_steps():
    """The summed loss with one Adam step is SAC's critic, actor and temperature updates, each on
    the parameters from before the step."""
    import copy

    from benchmark import make_dataset

    torch.manual_seed(0)
    args = make_dataset.Args(hidden_dim=16, compile=False)
    agent = make_dataset.SAC(5, 2, args)
    reference = copy.deepcopy(agent)
    batch = [torch.randn(8, 5), torch.rand(8, 2) * 2 - 1, torch.randn(8), torch.randn(8, 5), torch.zeros(8)]
    torch.manual_seed(1)
    agent.update(*batch)

    torch.manual_seed(1)  # the same draws, in the same order, as in SAC.loss
    obs, actions, rewards, next_obs, terminals = batch
    alpha = reference.log_alpha.exp().detach()
    with torch.no_grad():
        next_actions, next_log_prob = reference.actor(next_obs)
        target = rewards + args.gamma * (reference.targets(next_obs, next_actions).min(0).values - alpha * next_log_prob)
    critic_loss = (reference.critics(obs, actions) - target).pow(2).mean(1).sum()
    new_actions, log_prob = reference.actor(obs)
    critics_before = copy.deepcopy(reference.critics).requires_grad_(False)
    actor_loss = (alpha * log_prob - critics_before(obs, new_actions).min(0).values).mean()
    alpha_loss = -(reference.log_alpha * (log_prob.detach() + reference.target_entropy)).mean()
    for parameters, loss in ((reference.critics.parameters(), critic_loss), (reference.actor.parameters(), actor_loss),
                             ([reference.log_alpha], alpha_loss)):
        optimizer = torch.optim.Adam(parameters, lr=args.learning_rate)
        optimizer.zero_grad()
        loss.backward(retain_graph=True)
        optimizer.step()
    with torch.no_grad():
        for target_parameter, online in zip(reference.targets.parameters(), reference.critics.parameters()):
            target_parameter.lerp_(online, args.tau)
    for (name, mine), theirs in zip(agent.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(mine, theirs, msg=name)


def test_an_unusable_store_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    result = make_dataset(tmp_path, tmp_path / "a-file" / "store", "--from-policy")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith("error: the Minari store") and "is a file, not a directory" in message
    assert "MINARI_DATASETS_PATH" in message and "\n" not in message


def test_a_failed_run_creates_no_store(tmp_path):
    result = make_dataset(tmp_path, tmp_path / "new" / "store", "--from-policy")  # no policy: fails
    assert result.returncode != 0 and "hopper-medium.pt" in result.stderr
    assert not (tmp_path / "new").exists()


def test_medium_replay_is_rebuilt_by_a_new_training_that_keeps_the_saved_policy(built, minari_store, tmp_path):
    built_dir, built_store, _ = built
    (tmp_path / "policies").mkdir()
    medium = (built_dir / "policies" / "hopper-medium.pt").read_bytes()
    (tmp_path / "policies" / "hopper-medium.pt").write_bytes(medium)
    _, original = load_episodes(built_store, "baq/hopper/medium-replay-v0")
    rebuild = ["--medium-replay", "--medium-return", "-1000", "--max-steps", "2000"]
    for attempt in ("training", "from its finished checkpoint, into a new store"):
        store = tmp_path / attempt.split()[0]
        result = make_dataset(tmp_path, store, *rebuild)
        assert result.returncode == 0, result.stderr
        assert ("medium policy at step 100" in result.stdout + result.stderr) == (attempt == "training")
        _, rebuilt = load_episodes(store, "baq/hopper/medium-replay-v0")
        assert [len(e.actions) for e in rebuilt] == [len(e.actions) for e in original], attempt
        for a, b in zip(original, rebuilt):  # the same seed on one machine: the same training, the same buffer
            np.testing.assert_array_equal(a.observations, b.observations)
            np.testing.assert_array_equal(a.actions, b.actions)
        assert sorted(p.name for p in (store / "baq" / "hopper").iterdir() if p.is_dir()) == ["medium-replay-v0"]
    assert (tmp_path / "policies" / "hopper-medium.pt").read_bytes() == medium
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["hopper-sac-seed0-medium-replay.pt"]
    assert not (tmp_path / "state").exists()  # an expert training's state file is another name; none is written


@pytest.mark.parametrize("other", ["--from-policy", "--expert"])
def test_medium_replay_is_a_command_of_its_own(tmp_path, other):
    result = make_dataset(tmp_path, tmp_path / "store", "--medium-replay", other)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"--medium-replay cannot be combined with {other}" in result.stderr
    assert "python benchmark/make_dataset.py --env hopper --medium-replay" in result.stderr
    assert not (tmp_path / "store").exists()
