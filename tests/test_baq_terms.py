"""The BAQ terms: Eq. 6 weights, Eq. 10 priorities, and proportional sampling from the buffer."""
import importlib
import math

import numpy as np
import pytest
import torch

from conftest import PIPELINE_SCRIPTS


@pytest.fixture(params=PIPELINE_SCRIPTS)
def script(request):
    return importlib.import_module(request.param)


class FixedPolicy(torch.nn.Module):
    def __init__(self, action):
        super().__init__()
        self.action = torch.tensor(action)

    def forward(self, obs):
        return self.action.expand(len(obs), -1)


def test_weight_and_priority_match_hand_computation(script):
    # pi_BC(s) = (0.5, -0.5), a = (0.1, 0.3): squared differences 0.16, 0.64
    divergence = script.bc_divergence(FixedPolicy([0.5, -0.5]), torch.zeros(1, 4), torch.tensor([[0.1, 0.3]]))
    assert divergence.item() == pytest.approx(0.4)
    assert script.behavior_weight(divergence, kq=0.2).item() == pytest.approx(math.exp(-2.0))  # Eq. 6
    # Eq. 10: ||(0.4, -0.8)|| = sqrt(0.8); (sqrt(0.8) / 0.5 + 1)^2
    rho = script.behavior_priority(divergence, act_dim=2, krho=0.5, alpha=2.0)
    assert rho.item() == pytest.approx((math.sqrt(0.8) / 0.5 + 1.0) ** 2)
    assert rho.item() == pytest.approx(7.7777087, rel=1e-6)


def test_identical_actions_get_weight_one_and_priority_one(script):
    divergence = script.bc_divergence(FixedPolicy([0.2, 0.2]), torch.zeros(3, 4), torch.full((3, 2), 0.2))
    torch.testing.assert_close(script.behavior_weight(divergence, 0.1), torch.ones(3))
    torch.testing.assert_close(script.behavior_priority(divergence, 2, 0.1, 3.0), torch.ones(3))


def make_buffer(script, priorities, capacity=16):
    buffer = script.ReplayBuffer(capacity, obs_dim=1, act_dim=1, device=torch.device("cpu"), seed=0)
    n = len(priorities)
    ids = np.arange(n, dtype=np.float32)[:, None]
    buffer.add(ids, ids, np.zeros(n), ids, np.zeros(n), np.ones(n), np.asarray(priorities))
    return buffer


def sampled_frequencies(buffer, prioritized, draws=200_000):
    counts = np.zeros(buffer.size)
    for _ in range(draws // 10_000):
        idx, (obs, *_rest) = buffer.sample(10_000, prioritized=prioritized)
        np.testing.assert_array_equal(obs[:, 0].numpy(), idx.numpy())  # indices and data agree
        counts += np.bincount(idx.numpy(), minlength=buffer.size)
    return counts / draws


def assert_frequencies(frequencies, probabilities, draws=200_000):
    tolerance = 5 * np.sqrt(probabilities * (1 - probabilities) / draws)  # 5 standard errors
    assert np.all(np.abs(frequencies - probabilities) < tolerance), (frequencies, probabilities)


def test_prioritized_sampling_follows_rho_also_after_appends(script):
    priorities = np.array([1.0, 2.0, 3.0, 4.0])
    buffer = make_buffer(script, priorities)
    assert_frequencies(sampled_frequencies(buffer, True), priorities / priorities.sum())
    buffer.add(np.array([[4.0]]), np.array([[4.0]]), [0.0], np.array([[4.0]]), [0.0], [1.0], [10.0])
    priorities = np.append(priorities, 10.0)
    assert_frequencies(sampled_frequencies(buffer, True), priorities / priorities.sum())


def test_the_offline_data_enters_with_its_w_and_rho(script):
    """As `main` adds the offline data once pi_BC exists: tensors of w and rho, the prefix sum built from rho."""
    buffer = script.ReplayBuffer(16, obs_dim=1, act_dim=1, device=torch.device("cpu"), seed=0)
    ids = torch.arange(3.0)[:, None]
    buffer.add(ids, ids, torch.zeros(3), ids, torch.zeros(3), torch.full((3,), 0.5), torch.tensor([1.0, 1.0, 6.0]))
    torch.testing.assert_close(buffer.weights[:3], torch.full((3,), 0.5))
    torch.testing.assert_close(buffer.priority_prefix_sum[:3], torch.tensor([1.0, 2.0, 8.0], dtype=torch.float64))
    assert_frequencies(sampled_frequencies(buffer, True), np.array([0.125, 0.125, 0.75]))


@pytest.mark.parametrize("offline_priorities", [False, True])
def test_the_two_readings_of_eq10_and_the_sampling_frequencies_they_give(script, offline_priorities):
    """Six offline and two online transitions, all at divergence 1 from pi_BC (act_dim 1, k_rho 1, alpha 1), so Eq. 10
    gives rho = (1 + 1)^1 = 2. The text's reading keeps the offline data at rho = 1: each online transition is drawn
    with P = 2 / (6 + 2 * 2) = 0.2, twice as often as an offline one; giving the offline data its rho too makes the
    sampling uniform again (1/8 each)."""
    rho = script.behavior_priority(torch.ones(8), act_dim=1, krho=1.0, alpha=1.0)
    torch.testing.assert_close(rho, torch.full((8,), 2.0))
    offline_rho = rho[:6] if offline_priorities else torch.ones(6)
    buffer = make_buffer(script, offline_rho.numpy())
    buffer.add(np.array([[6.0], [7.0]]), np.zeros((2, 1)), [0.0, 0.0], np.zeros((2, 1)), [0.0, 0.0], [1.0, 1.0], rho[6:])
    expected = np.full(8, 1 / 8) if offline_priorities else np.array([0.1] * 6 + [0.2] * 2)
    assert_frequencies(sampled_frequencies(buffer, True), expected)


def test_uniform_sampling_ignores_priorities(script):
    buffer = make_buffer(script, [1.0, 100.0, 1.0, 1.0])
    assert_frequencies(sampled_frequencies(buffer, False), np.full(4, 0.25))


def test_buffer_refuses_overflow(script):
    buffer = make_buffer(script, [1.0, 1.0], capacity=2)
    with pytest.raises(AssertionError, match="overflow"):
        buffer.add(np.zeros((1, 1)), np.zeros((1, 1)), [0.0], np.zeros((1, 1)), [0.0], [1.0], [1.0])
