"""Dataset ids, episodes to transitions, reference scores (shared code of every pipeline script)."""
import importlib
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ALL_SCRIPTS


@pytest.fixture(params=ALL_SCRIPTS)
def script(request):
    return importlib.import_module(request.param)


def test_d4rl_names_map_to_official_minari_ids(script):
    assert script.resolve_dataset_ids("hopper-medium-v2") == ["mujoco/hopper/medium-v0"]
    assert script.resolve_dataset_ids("walker2d-expert-v2") == ["mujoco/walker2d/expert-v0"]
    assert script.resolve_dataset_ids("halfcheetah-medium-expert-v2") == ["mujoco/halfcheetah/medium-v0", "mujoco/halfcheetah/expert-v0"]


def test_minari_ids_pass_through(script):
    assert script.resolve_dataset_ids("baq/hopper/medium-replay-v0") == ["baq/hopper/medium-replay-v0"]
    assert script.resolve_dataset_ids("mujoco/hopper/simple-v0") == ["mujoco/hopper/simple-v0"]


@pytest.mark.parametrize("env_id, words", [
    ("hopper-medium-replay-v2", ["no Minari counterpart", "`python benchmark/make_dataset.py --env hopper --medium-replay`",
                                 "--env-id baq/hopper/medium-replay-v0"]),
    ("walker2d-random-v2", ["no Minari counterpart",
                            "`python benchmark/make_dataset.py --env walker2d --levels random --from-policy`"]),
    ("hopper-medum-v2", ["is not a D4RL name", "hopper-<level>-v2", "medium-replay"]),
    ("Hopper-Medium-v2", ["is not a D4RL name", "lower case"]),
])
def test_unusable_ids_fail_with_advice(script, env_id, words):
    with pytest.raises(SystemExit) as error:
        script.resolve_dataset_ids(env_id)
    message = str(error.value.code)
    assert message.startswith("error: ") and env_id in message
    for word in words:
        assert word in message


def test_episodes_become_transitions_with_truncations_bootstrapped(script):
    terminated = SimpleNamespace(observations=np.array([[0.0], [1.0], [2.0]]), actions=np.array([[0.1], [0.2]]),
                                 rewards=np.array([1.0, 2.0]), terminations=np.array([False, True]),
                                 truncations=np.array([False, False]))
    truncated = SimpleNamespace(observations=np.array([[5.0], [6.0]]), actions=np.array([[0.3]]), rewards=np.array([4.0]),
                                terminations=np.array([False]), truncations=np.array([True]))
    data = script.episodes_to_transitions([terminated, truncated])
    np.testing.assert_array_equal(data["observations"][:, 0], [0.0, 1.0, 5.0])
    np.testing.assert_array_equal(data["next_observations"][:, 0], [1.0, 2.0, 6.0])
    np.testing.assert_allclose(data["actions"][:, 0], [0.1, 0.2, 0.3])
    np.testing.assert_array_equal(data["rewards"], [1.0, 2.0, 4.0])
    np.testing.assert_array_equal(data["terminals"], [0.0, 1.0, 0.0])  # the truncation is not terminal
    np.testing.assert_array_equal(data["episode_returns"], [3.0, 4.0])
    assert data["observations"].dtype == np.float32


def test_normalized_score_uses_d4rl_constants(script):
    """D4RL's 100 (R - R_random) / (R_expert - R_random), as each script logs it: 0, 100 and 50 by hand."""
    ref = script.D4RL_REF_SCORES["hopper"]
    assert ref == (-20.272305, 3234.3)

    def logged_score(episode_return):
        if not hasattr(script, "log_evaluation"):  # bc_pretrain logs its one evaluation itself
            return script.normalized_score(episode_return, ref)
        logged = {}
        writer = SimpleNamespace(add_scalar=lambda tag, value, step: logged.setdefault(tag, value))
        script.log_evaluation(writer, "offline/", 7, ref, np.array([episode_return]), q_bias=0.0)
        assert set(logged) == {"offline/eval/return", "offline/eval/q_bias", "offline/eval/normalized_score"}
        return logged["offline/eval/normalized_score"]

    assert logged_score(ref[0]) == pytest.approx(0.0)
    assert logged_score(ref[1]) == pytest.approx(100.0)
    assert logged_score(1607.0137) == pytest.approx(50.0, abs=1e-4)


def test_loaded_dataset_matches_the_fixture(script, minari_store):
    data, identity, make_env, ref_scores, max_action = script.load_offline_data("baq/hopper/tiny-v0")
    assert data["observations"].shape[1] == 11 and data["actions"].shape[1] == 3
    assert len(data["rewards"]) >= 3000
    assert 0 < data["terminals"].sum() < len(data["episode_returns"])  # some episodes end by truncation
    assert ref_scores == (-20.272305, 3234.3) and max_action == 1.0
    assert identity["dataset_id"] == "baq/hopper/tiny-v0" and (identity["obs_dim"], identity["act_dim"]) == (11, 3)
    assert len(identity["data_sha1"]) == 40
    env = make_env(eval_env=True)
    assert env.spec.id == "Hopper-v5" and env.spec.max_episode_steps == 20


def test_reference_scores_fall_back_to_d4rl_constants(script, minari_store):
    _, _, _, ref_scores, _ = script.load_offline_data("baq/halfcheetah/tiny-v0")  # stored without ref scores
    assert ref_scores == script.D4RL_REF_SCORES["halfcheetah"]
