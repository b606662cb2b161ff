"""CQL's losses with the BAQ weight (Eqs. 3, 7) against hand-computed values."""
import copy
import math

import pytest
import torch

from conftest import step_sequentially_and_compare

import baq_cql


def test_weighted_bellman_term_eq7():
    # targets (2, 0); squared errors critic 1: 1, 4; critic 2: 1, 0; weights (0.5, 1)
    q_data = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    loss = baq_cql.cql_bellman_loss(q_data, torch.tensor([2.0, 0.0]), torch.tensor([0.5, 1.0]))
    assert loss.item() == pytest.approx((0.5 * 1 + 1.0 * 4) / 2 + (0.5 * 1 + 1.0 * 0) / 2)


def test_conservative_penalty_is_unweighted_logsumexp_minus_data_q():
    q_sampled = torch.tensor([[[0.0, math.log(3.0)]], [[1.0, 1.0]]])  # [critics, batch, samples]
    q_data = torch.tensor([[0.5], [1.0]])
    penalty = baq_cql.cql_penalty(q_sampled, torch.zeros(1, 2), q_data, temperature=1.0)
    assert penalty.item() == pytest.approx((math.log(4.0) - 0.5) + (1.0 + math.log(2.0) - 1.0))
    # importance sampling divides each sample by its density: exp(0 - log 2) + exp(log 3 - 0) = 3.5
    weighted = baq_cql.cql_penalty(q_sampled[:1], torch.tensor([[math.log(2.0), 0.0]]), q_data[:1], temperature=1.0)
    assert weighted.item() == pytest.approx(math.log(3.5) - 0.5)
    # temperature T: T logsumexp(Q / T)
    hot = baq_cql.cql_penalty(q_sampled[1:], torch.zeros(1, 2), q_data[1:], temperature=2.0)
    assert hot.item() == pytest.approx(2.0 * math.log(2.0 * math.exp(0.5)) - 1.0)


@pytest.mark.parametrize("log_prob, direction", [(-1.0, -1), (5.0, +1)])
def test_entropy_temperature_moves_toward_the_target(log_prob, direction):
    # target entropy -3: entropy 1 (log pi = -1) is above it, so alpha shrinks; entropy -5 is below, alpha grows
    log_alpha = torch.nn.Parameter(torch.zeros(()))
    loss = baq_cql.entropy_temperature_loss(log_alpha, torch.full((4,), log_prob), target_entropy=-3.0)
    loss.backward()
    assert log_alpha.grad.item() == pytest.approx(-(log_prob - 3.0))
    optimizer = torch.optim.SGD([log_alpha], lr=0.1)
    optimizer.step()
    assert math.copysign(1, log_alpha.item()) == direction


@pytest.mark.parametrize("offset", [-1.0, -3.0])
def test_tanh_gaussian_log_prob_matches_torch_distributions(offset):
    """log std = m * output + c with the trainable scalars m and c (CORL's: 1 and -1 at the start)."""
    torch.manual_seed(0)
    actor = baq_cql.TanhGaussianActor(4, 3, 16, max_action=1.0)
    with torch.no_grad():
        actor.log_std_offset.fill_(offset)
    obs = torch.randn(6, 4)
    torch.manual_seed(1)
    actions, log_prob = actor(obs)
    mean, log_std = actor.net(obs).chunk(2, -1)
    distribution = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, (1.0 * log_std + offset).clamp(-20, 2).exp()), [torch.distributions.TanhTransform()])
    torch.testing.assert_close(log_prob, distribution.log_prob(actions.clamp(-1 + 1e-6, 1 - 1e-6)).sum(-1), rtol=1e-4, atol=1e-4)
    deterministic, none = actor(obs, deterministic=True)
    assert none is None
    torch.testing.assert_close(deterministic, torch.tanh(mean))


def test_one_optimizer_step_equals_corl_sequential_updates():
    """The single backward + Adam step matches CORL's order: temperature, actor, then critics, each
    with its own optimizer and every loss built from the parameters before the update."""
    torch.manual_seed(0)
    args = baq_cql.Args(compile=False, hidden_dim=16, cql_n_actions=3)
    agent = baq_cql.CQL(5, 2, 1.0, args)
    reference = copy.deepcopy(agent)
    generator = torch.Generator().manual_seed(3)
    obs, next_obs = torch.randn(8, 5, generator=generator), torch.randn(8, 5, generator=generator)
    actions, rewards = torch.rand(8, 2, generator=generator) * 2 - 1, torch.randn(8, generator=generator)
    terminals, weights = torch.zeros(8), torch.rand(8, generator=generator)
    torch.manual_seed(7)
    agent.update((obs, actions, rewards, next_obs, terminals), weights)

    torch.manual_seed(7)  # the same random draws, in the same order
    n, b = 3, 8
    new_actions, log_prob = reference.actor(obs)
    alpha_loss = -(reference.log_alpha * (log_prob - 2.0).detach()).mean()  # target entropy -|A| = -2
    actor_loss = (reference.log_alpha.exp().detach() * log_prob - reference.qf(obs, new_actions).min(0).values).mean()
    with torch.no_grad():
        sampled, sampled_log_prob = reference.actor(torch.cat([next_obs, obs.repeat_interleave(n, 0), next_obs.repeat_interleave(n, 0)]))
        td_target = rewards + 0.99 * reference.qf_target(next_obs, sampled[:b]).min(0).values
        uniform = torch.rand_like(sampled[b:b + b * n]) * 2 - 1
    q_sampled = torch.cat([(reference.qf(obs.repeat_interleave(n, 0), a) - d).view(2, b, n) for a, d in (
        (uniform, torch.full((b * n,), -2 * math.log(2.0))), (sampled[b:b + b * n], sampled_log_prob[b:b + b * n]),
        (sampled[b + b * n:], sampled_log_prob[b + b * n:]))], dim=-1)
    q_data = reference.qf(obs, actions)
    critic_loss = (weights * (q_data - td_target).pow(2)).mean(-1).sum() + \
        10.0 * (torch.logsumexp(q_sampled, -1) - q_data).mean(-1).sum()
    optimizers = [torch.optim.Adam([reference.log_alpha], lr=3e-5), torch.optim.Adam(reference.actor.parameters(), lr=3e-5),
                  torch.optim.Adam(reference.qf.parameters(), lr=3e-4)]
    step_sequentially_and_compare(agent, reference, optimizers, (alpha_loss, actor_loss, critic_loss))


def test_online_penalty_weight_is_a_flag():
    agent = baq_cql.Agent(3, 2, 1.0, baq_cql.Args(compile=False, hidden_dim=8, online_cql_alpha=2.5))
    assert agent.cql_alpha.item() == 10.0
    agent.start_online()
    assert agent.cql_alpha.item() == 2.5
    default = baq_cql.Agent(3, 2, 1.0, baq_cql.Args(compile=False, hidden_dim=8))
    default.start_online()
    assert default.cql_alpha.item() == 10.0


def test_actor_and_critics_are_initialized_and_trained_as_corl_does():
    """CORL's CQL: the actor keeps PyTorch's default hidden layers, its output layer is xavier(1e-2) with
    zero bias, and its log-std multiplier (1) and offset (-1) are trainable; the critics are orthogonal
    (gain sqrt 2, output gain 1e-2) with zero biases."""
    torch.manual_seed(0)
    agent = baq_cql.CQL(11, 3, 1.0, baq_cql.Args(compile=False, hidden_dim=64))
    actor = agent.actor
    assert actor.log_std_multiplier.item() == 1.0 and actor.log_std_offset.item() == -1.0
    actor_parameters = {id(p) for p in agent.optimizer.param_groups[0]["params"]}
    assert {id(actor.log_std_multiplier), id(actor.log_std_offset)} <= actor_parameters
    hidden = [m for m in actor.net if isinstance(m, torch.nn.Linear)][:-1]
    for layer in hidden:  # PyTorch's default: uniform within 1/sqrt(fan_in), nonzero biases
        bound = 1 / math.sqrt(layer.in_features)
        assert layer.weight.abs().max() <= bound and layer.bias.abs().max() > 0
    assert actor.net[-1].bias.abs().max() == 0 and actor.net[-1].weight.abs().max() < 0.01
    for member in range(2):
        for layer in agent.qf.hidden:
            weight = layer.weight[member]  # [in, out]: orthonormal in its shorter dimension, times sqrt 2
            gram = weight.T @ weight if weight.shape[0] >= weight.shape[1] else weight @ weight.T
            torch.testing.assert_close(gram, 2.0 * torch.eye(min(weight.shape)), atol=1e-4, rtol=0)
            assert layer.bias[member].abs().max() == 0
        torch.testing.assert_close(agent.qf.out.weight[member].norm(), torch.tensor(1e-2))
