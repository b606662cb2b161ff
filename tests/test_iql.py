"""IQL's losses with the BAQ weights (Eqs. 4, 8, 9) against hand-computed values."""
import copy

import numpy as np
import pytest
import torch

from conftest import step_sequentially_and_compare

import baq_iql


def test_expectile_loss_is_asymmetric():
    loss = baq_iql.expectile_loss(torch.tensor([2.0, -2.0]), expectile=0.7)
    torch.testing.assert_close(loss, torch.tensor([0.7 * 4.0, 0.3 * 4.0]))


def test_weighted_value_loss_eq8():
    # u = Q - V = (0.5, -0.5): L = (0.7 * 0.25, 0.3 * 0.25); weighted by (0.5, 1.0), then the mean
    loss = baq_iql.iql_value_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]), torch.tensor([0.5, 1.0]), 0.7)
    assert loss.item() == pytest.approx((0.5 * 0.175 + 1.0 * 0.075) / 2)


def test_weighted_q_loss_eq9():
    # targets: 1 + 0.5 * 2 = 2 and (terminal) 0; squared errors critic 1: 1, 4; critic 2: 1, 0
    qs = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    loss = baq_iql.iql_q_loss(qs, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([2.0, 5.0]),
                              torch.tensor([0.5, 1.0]), gamma=0.5)
    assert loss.item() == pytest.approx((0.5 * 1 + 1.0 * 4 + 0.5 * 1 + 1.0 * 0) / 4)


def test_unit_weights_give_plain_iql():
    qs, v = torch.randn(2, 8), torch.randn(8)
    rewards, terminals, next_v, target_q = torch.randn(8), torch.zeros(8), torch.randn(8), torch.randn(8)
    ones = torch.ones(8)
    plain_q = 0.5 * sum(torch.nn.functional.mse_loss(q, rewards + 0.99 * next_v) for q in qs)
    torch.testing.assert_close(baq_iql.iql_q_loss(qs, rewards, terminals, next_v, ones, 0.99), plain_q)
    plain_v = baq_iql.expectile_loss(target_q - v, 0.7).mean()
    torch.testing.assert_close(baq_iql.iql_value_loss(target_q, v, ones, 0.7), plain_v)


def test_actor_loss_clips_exp_advantage():
    loss = baq_iql.iql_actor_loss(torch.tensor([-1.0, -2.0]), torch.tensor([0.0, 10.0]), beta=3.0, exp_adv_max=100.0)
    assert loss.item() == pytest.approx((1.0 * 1.0 + 100.0 * 2.0) / 2)


def test_gaussian_log_prob_matches_torch_distributions():
    policy = baq_iql.GaussianPolicy(4, 3, 16, max_action=1.0)
    with torch.no_grad():
        policy.log_std.copy_(torch.tensor([-1.0, 0.0, 0.5]))
    obs, actions = torch.randn(5, 4), torch.rand(5, 3) * 2 - 1
    expected = torch.distributions.Normal(policy(obs), policy.log_std.exp()).log_prob(actions).sum(-1)
    torch.testing.assert_close(policy.log_prob(obs, actions), expected)


def test_twin_q_members_are_independent_networks():
    qf = baq_iql.TwinQ(4, 2, 8)
    obs, actions = torch.randn(6, 4), torch.randn(6, 2)
    x = torch.cat([obs, actions], -1)
    for member in range(2):
        h = x
        for layer in qf.hidden:
            h = torch.relu(h @ layer.weight[member] + layer.bias[member])
        torch.testing.assert_close(qf(obs, actions)[member], (h @ qf.out.weight[member] + qf.out.bias[member]).squeeze(-1))


def iql_batch(batch_size=32, obs_dim=5, act_dim=2):
    generator = torch.Generator().manual_seed(3)
    return (torch.randn(batch_size, obs_dim, generator=generator), torch.rand(batch_size, act_dim, generator=generator) * 2 - 1,
            torch.randn(batch_size, generator=generator), torch.randn(batch_size, obs_dim, generator=generator),
            (torch.rand(batch_size, generator=generator) < 0.1).float())


def test_one_optimizer_step_equals_three_separate_updates():
    """The single backward + Adam step over all parameter groups matches CORL's sequential V, Q, actor updates."""
    torch.manual_seed(0)
    args = baq_iql.Args(compile=False, hidden_dim=16)
    agent = baq_iql.IQL(5, 2, 1.0, args)
    reference = copy.deepcopy(agent)
    batch, weights = iql_batch(), torch.rand(32)
    agent.update(batch, weights)

    obs, actions, rewards, next_obs, terminals = batch
    optimizers = [torch.optim.Adam(m.parameters(), lr=3e-4) for m in (reference.vf, reference.qf, reference.actor)]
    with torch.no_grad():
        target_q = reference.qf_target(obs, actions).min(0).values
        next_v = reference.vf(next_obs).squeeze(-1)
    v = reference.vf(obs).squeeze(-1)
    advantage = (target_q - v).detach()
    steps = [baq_iql.iql_value_loss(target_q, v, weights, 0.7),
             baq_iql.iql_q_loss(reference.qf(obs, actions), rewards, terminals, next_v, weights, 0.99),
             baq_iql.iql_actor_loss(reference.actor.log_prob(obs, actions), advantage, 3.0, 100.0)]
    step_sequentially_and_compare(agent, reference, optimizers, steps)


def test_compiled_update_matches_eager():
    torch.manual_seed(0)
    eager = baq_iql.IQL(5, 2, 1.0, baq_iql.Args(compile=False, hidden_dim=16))
    compiled = copy.deepcopy(eager)
    compiled.compute_losses = torch.compile(compiled.losses)
    batch, weights = iql_batch(), torch.rand(32)
    for _ in range(2):
        torch.testing.assert_close(compiled.update(batch, weights), eager.update(batch, weights), rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(compiled.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_q_bias_is_q_over_the_reward_scale_minus_the_discounted_return_to_go():
    """evaluate's Q bias: the mean over visited states of Q(s_t, a_t) / reward_scale - sum_k gamma^k r_(t+k)."""
    class ThreeSteps:  # rewards 1, 2, 4, then the episode terminates
        def reset(self, seed):
            self.t = 0
            return np.zeros(2, dtype=np.float32), {}

        def step(self, action):
            self.t += 1
            return np.zeros(2, dtype=np.float32), [1.0, 2.0, 4.0][self.t - 1], self.t == 3, False, {}

    class ConstantQ:
        def act(self, obs, deterministic):
            return torch.zeros(len(obs), 1)

        def qf(self, obs, actions):  # twin critics 10 and 12: the Q bias uses their minimum
            return torch.stack([torch.full((len(obs),), 10.0), torch.full((len(obs),), 12.0)])

    returns, q_bias = baq_iql.evaluate(ConstantQ(), ThreeSteps(), lambda obs: obs, 2, 0, 0.5, 2.0, "cpu")
    assert returns.tolist() == [7.0, 7.0]
    assert q_bias == pytest.approx(10.0 / 2.0 - (3.0 + 4.0 + 4.0) / 3)  # returns-to-go 1 + 1 + 1, 2 + 2, 4
