# Off2On (Lee et al., CoRL 2022) as the BAQ paper compares it (Table 2): online fine-tuning of a CQL
# `offline.pt` (offline_pretrain.py --algo cql) with SAC's losses (no conservative penalty online) and
# Off2On's balanced replay, without its pessimistic Q-ensemble (the paper compares without ensembles):
#   - a density-ratio network w(s, a) ~ d_online / d_offline, trained every step on 256 offline and 256
#     online samples with the Jensen-Shannon loss ...... DensityRatio, density_ratio_loss
#   - one buffer of offline and online data sampled with P_i ~ p_i, p = w^(1/T) / mean_offline(w^(1/T))
#     clamped to [1e-3, 1e3], T = 5; new online transitions enter at the largest priority so far, and
#     the sampled batch's priorities are renewed after every update ...... off2on_priorities, SumTree
#
# Evaluation, TensorBoard tags, checkpoints and data loading are the BAQ scripts' (identical text,
# tests/test_copies.py checks it), so Off2On's runs overlay BAQ's in TensorBoard and report.py reads them.
#
#   python benchmark/baselines/off2on.py --env-id baq/hopper/medium-v0 --offline-checkpoint runs/.../offline.pt
import math
import os
import random
import re
import socket
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    offline_checkpoint: str
    """the CQL `offline.pt` to fine-tune (offline_pretrain.py --algo cql, or the offline phase of baq_cql.py)"""
    exp_name: Optional[str] = None
    """name of the experiment, in the run directory {runs_dir}/{env_id}__{exp_name}__{seed}__{time};
    default: off2on_cql"""
    env_id: str = "hopper-medium-v2"
    """the offline dataset the checkpoint was trained on (a D4RL name or a Minari dataset id); its
    transitions fill the replay buffer before the online ones"""
    seed: int = 1
    """seed of the experiment (python, numpy, torch, environments, replay sampling)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """use CUDA when it is available (otherwise the CPU, with a one-line note)"""
    compile: bool = False
    """torch.compile the critic and actor losses"""
    threads: int = 0
    """torch threads (0: torch's default, one per core); give 1 when other jobs share the cores"""
    runs_dir: str = "runs"
    """directory under which the run directory (TensorBoard events and checkpoints) is created"""
    online_steps: int = 30_000
    """online environment steps of fine-tuning (the paper's Table 1 budget)"""
    eval_every: int = 5_000
    """evaluate every this many online steps (and at online step 0, the offline policy)"""
    eval_episodes: int = 10
    """deterministic episodes per evaluation"""
    log_every: int = 1_000
    """write losses every this many online steps (averaged over the updates in between)"""

    # Off2On
    density_lr: float = 3e-4
    """learning rate of the density-ratio network"""
    priority_temperature: float = 5.0
    """T of p = w^(1/T) / mean_offline(w^(1/T))"""

    # the backbone's hyperparameters (the BAQ scripts' defaults)
    batch_size: int = 256
    """batch size of every gradient update"""
    gamma: float = 0.99
    """discount factor, in [0, 1)"""
    tau: float = 0.005
    """target network soft-update rate, in (0, 1]"""
    hidden_dim: int = 256
    """width of every hidden layer (must match the checkpoint's)"""
    actor_lr: float = 3e-5
    """actor learning rate (also the entropy temperature's; baq_cql.py's)"""
    critic_lr: float = 3e-4
    """twin Q learning rate"""
    target_entropy: Optional[float] = None
    """entropy target of the automatic temperature tuning (default: -|A|)"""

    def __post_init__(self):
        check_flags(self)


METHOD = "off2on"


# =============================================================================================
# The backbones' losses and networks (identical text with the BAQ scripts)
# =============================================================================================
def expectile_loss(diff, expectile: float):
    """L2_tau(u) = |tau - 1(u < 0)| u^2 (Eq. 4)."""
    return torch.abs(expectile - (diff < 0).float()) * diff.pow(2)


def iql_value_loss(target_q, v, weights, expectile: float):
    """Eq. 8: E[w(s,a) L2_tau(Q(s,a) - V(s))]."""
    return (weights * expectile_loss(target_q - v, expectile)).mean()


def iql_q_loss(qs, rewards, terminals, next_v, weights, gamma: float):
    """Eq. 9: E[w(s,a) (r + gamma V(s') - Q(s,a))^2], averaged over the twin critics."""
    target = rewards + gamma * (1.0 - terminals) * next_v
    return (weights * (target - qs).pow(2)).mean()


def iql_actor_loss(log_prob, advantage, beta: float, exp_adv_max: float):
    """IQL's advantage-weighted regression: E[-exp(beta A) log pi(a|s)], exp clipped."""
    return -(torch.exp(beta * advantage).clamp(max=exp_adv_max) * log_prob).mean()


def entropy_temperature_loss(log_alpha, log_prob, target_entropy: float):
    """SAC's automatic entropy tuning: alpha grows while the policy's entropy is below the target."""
    return -(log_alpha * (log_prob.detach() + target_entropy)).mean()


def mlp(in_dim: int, out_dim: int, hidden_dim: int, n_hidden: int) -> nn.Sequential:
    layers, dim = [], in_dim
    for _ in range(n_hidden):
        layers += [nn.Linear(dim, hidden_dim), nn.ReLU()]
        dim = hidden_dim
    return nn.Sequential(*layers, nn.Linear(dim, out_dim))


class GaussianPolicy(nn.Module):
    """Gaussian with a tanh-bounded mean and a state-independent log-std: pi_BC of Eq. 2, IQL's actor."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, max_action: float):
        super().__init__()
        self.net = mlp(obs_dim, act_dim, hidden_dim, n_hidden=2)
        self.log_std = nn.Parameter(torch.zeros(act_dim))
        self.max_action = max_action

    def forward(self, obs):
        return self.max_action * torch.tanh(self.net(obs))

    def log_prob(self, obs, actions):
        log_std = self.log_std.clamp(-20.0, 2.0)
        z = (actions - self(obs)) * torch.exp(-log_std)
        return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def sample(self, obs):
        mean = self(obs)
        action = mean + torch.randn_like(mean) * self.log_std.clamp(-20.0, 2.0).exp()
        return action.clamp(-self.max_action, self.max_action)


class EnsembleLinear(nn.Module):
    """`size` independent linear layers evaluated as one batched matrix product."""

    def __init__(self, in_dim: int, out_dim: int, size: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default initialization, per member
        self.weight = nn.Parameter(torch.empty(size, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(size, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)


class TwinQ(nn.Module):
    """Two Q networks as one ensemble network: Q(s, a) -> [2, batch]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, n_hidden: int = 2):
        super().__init__()
        dims = [obs_dim + act_dim] + [hidden_dim] * n_hidden
        self.hidden = nn.ModuleList(EnsembleLinear(i, o, 2) for i, o in zip(dims[:-1], dims[1:]))
        self.out = EnsembleLinear(hidden_dim, 1, 2)

    def forward(self, obs, actions):
        x = torch.cat([obs, actions], -1).expand(2, *obs.shape[:-1], obs.shape[-1] + actions.shape[-1])
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.out(x).squeeze(-1)


class TanhGaussianActor(nn.Module):
    """CQL's actor, as CORL builds it: a = max_action * tanh(u), u ~ N(mean(s), std(s)), 3 hidden layers
    with PyTorch's default initialization and a near-zero output layer; log std = m * (net's output) + c
    with trainable scalars m and c (1 and -1 at the start)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, max_action: float):
        super().__init__()
        self.net = mlp(obs_dim, 2 * act_dim, hidden_dim, n_hidden=3)
        with torch.no_grad():
            nn.init.xavier_uniform_(self.net[-1].weight, gain=1e-2)
            self.net[-1].bias.zero_()
        self.log_std_multiplier = nn.Parameter(torch.tensor(1.0))
        self.log_std_offset = nn.Parameter(torch.tensor(-1.0))
        self.max_action = max_action

    def forward(self, obs, deterministic: bool = False):
        """An action and its log-probability (None when deterministic: max_action * tanh(mean))."""
        mean, log_std = self.net(obs).chunk(2, -1)
        if deterministic:
            return self.max_action * torch.tanh(mean), None
        log_std = (self.log_std_multiplier * log_std + self.log_std_offset).clamp(-20.0, 2.0)
        noise = torch.randn_like(mean)
        u = mean + noise * log_std.exp()
        # log N(u) - log(1 - tanh(u)^2), the latter in its stable form 2 (log 2 - u - softplus(-2u))
        log_prob = (-0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2.0 * (math.log(2.0) - u - nn.functional.softplus(-2.0 * u))).sum(-1)
        return self.max_action * torch.tanh(u), log_prob


# =============================================================================================
# The backbones for online fine-tuning: IQL and CQL from their offline checkpoints, with the critic
# and actor updates apart (a method sets how many of each per environment step)
# =============================================================================================
def perturbed_actions(actions, noise: float, noise_clip: float, max_action: float):
    """SO2's perturbed value update: a + clip(eps, -c, c), eps ~ N(0, sigma^2), kept in the action box
    (sigma = noise and c = noise_clip in units of the action bound)."""
    eps = (torch.randn_like(actions) * noise).clamp(-noise_clip, noise_clip) * max_action
    return (actions + eps).clamp(-max_action, max_action)


class FineTuningAgent(nn.Module):
    """What the fine-tuning IQL and CQL share: the offline checkpoint's weights and Adam moments under this
    run's learning rates, a critic update (then the target critics' soft update) and an actor update,
    each one Adam step of the one optimizer on its own loss. A loss reaches only its own parameters, so
    the other groups get no gradient and Adam leaves them and their moments alone. Subclasses set actor,
    qf, qf_target, optimizer, compute_critic_loss, compute_actor_loss, args."""

    def load_pretrained(self, state_dict: dict):
        """Weights and Adam moments of an offline.pt; the learning rates stay this run's flags. CQL's
        penalty weight is not loaded: these methods fine-tune without the conservative penalty."""
        self.load_state_dict({name: value for name, value in state_dict["agent"].items() if name != "cql_alpha"})
        learning_rates = [group["lr"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state_dict["optimizer"])
        for group, lr in zip(self.optimizer.param_groups, learning_rates):
            group["lr"] = lr

    def step(self, loss):
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def update_critic(self, batch):
        loss, metrics = self.compute_critic_loss(*batch)
        self.step(loss)
        with torch.no_grad():
            for target, online in zip(self.qf_target.parameters(), self.qf.parameters()):
                target.lerp_(online, self.args.tau)
        return metrics

    def update_actor(self, batch):
        loss, metrics = self.compute_actor_loss(*batch)
        self.step(loss)
        return metrics

    @torch.no_grad()
    def q_value(self, obs, actions):
        return self.qf(obs, actions).min(0).values


class FineTuneCQL(FineTuningAgent):
    """CQL's networks as baq_cql.py builds them (a CQL offline.pt loads unchanged), fine-tuned with SAC's
    losses: no conservative penalty online. The TD target is min Q_target(s', a') - alpha log pi(a'|s'),
    a' ~ pi(.|s'), with the critics' action perturbed under SO2 (the entropy term keeps the clean a')."""

    CRITIC_METRICS = ("q_loss", "q_values")
    ACTOR_METRICS = ("actor_loss", "alpha")

    def __init__(self, obs_dim, act_dim, max_action, args, target_noise=(0.0, 0.0)):
        super().__init__()
        self.actor = TanhGaussianActor(obs_dim, act_dim, args.hidden_dim, max_action)
        self.qf = TwinQ(obs_dim, act_dim, args.hidden_dim, n_hidden=3)
        self.qf_target = TwinQ(obs_dim, act_dim, args.hidden_dim, n_hidden=3).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.zeros(()))
        self.target_entropy = -float(act_dim) if args.target_entropy is None else args.target_entropy
        self.optimizer = torch.optim.Adam([
            {"params": self.actor.parameters(), "lr": args.actor_lr},
            {"params": self.qf.parameters(), "lr": args.critic_lr},
            {"params": [self.log_alpha], "lr": args.actor_lr},
        ], fused=True)
        self.compute_critic_loss = torch.compile(self.critic_loss) if args.compile else self.critic_loss
        self.compute_actor_loss = torch.compile(self.actor_loss) if args.compile else self.actor_loss
        self.target_noise, self.max_action, self.args = target_noise, max_action, args

    def critic_loss(self, obs, actions, rewards, next_obs, terminals):
        with torch.no_grad():
            next_actions, next_log_prob = self.actor(next_obs)
            critic_actions = perturbed_actions(next_actions, *self.target_noise, self.max_action) \
                if self.target_noise[0] > 0 else next_actions
            target_q = self.qf_target(next_obs, critic_actions).min(0).values - self.log_alpha.exp() * next_log_prob
            td_target = rewards + self.args.gamma * (1.0 - terminals) * target_q
        qs = self.qf(obs, actions)
        q_loss = (qs - td_target).pow(2).mean(-1).sum()  # CQL's TD term (MSE per critic, summed)
        return q_loss, torch.stack([q_loss, qs.mean()]).detach()

    def actor_loss(self, obs, actions, rewards, next_obs, terminals):
        """SAC's actor loss through the critics' detached weights, and the temperature's loss."""
        new_actions, log_prob = self.actor(obs)
        alpha_loss = entropy_temperature_loss(self.log_alpha, log_prob, self.target_entropy)
        alpha = self.log_alpha.exp().detach()
        frozen_critics = {name: p.detach() for name, p in self.qf.named_parameters()}
        q_new = torch.func.functional_call(self.qf, frozen_critics, (obs, new_actions)).min(0).values
        actor_loss = (alpha * log_prob - q_new).mean()
        return actor_loss + alpha_loss, torch.stack([actor_loss, alpha]).detach()

    @torch.no_grad()
    def act(self, obs, deterministic: bool):
        return self.actor(obs, deterministic)[0]


# =============================================================================================
# Off2On's balanced replay: a density-ratio network and priorities in a sum tree
# =============================================================================================
class DensityRatio(nn.Module):
    """w(s, a) ~ d_online(s, a) / d_offline(s, a): 2x256 ReLU layers and a softplus output. Off2On's code puts
    a ReLU on the output; in our first runs it died within 40 updates (every w = 0, the loss stuck at 22.3 with
    no gradient), so the output is softplus, as in other ports."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, 1, hidden_dim, n_hidden=2)

    def forward(self, obs, actions):
        return nn.functional.softplus(self.net(torch.cat([obs, actions], -1))).squeeze(-1)


def density_ratio_loss(offline_w, online_w):
    """The Jensen-Shannon form of the f-divergence bound: E_off[-log(2 / (w + 1))] - E_on[log(2w / (w + 1))];
    minimized at w = d_online / d_offline. The 1e-10 keeps the logs finite at w = 0 (Off2On's constant)."""
    offline_term = -torch.log(2.0 / (offline_w + 1.0) + 1e-10)
    online_term = torch.log(2.0 * online_w / (online_w + 1.0) + 1e-10)
    return offline_term.mean() - online_term.mean()


def off2on_priorities(w, offline_w, temperature: float):
    """p = w^(1/T) / mean_offline(w^(1/T)), clamped to [1e-3, 1e3]; the mean is over the offline samples
    of the density-ratio network's latest batch."""
    return (w.pow(1.0 / temperature) / (offline_w.pow(1.0 / temperature).mean() + 1e-10)).clamp(1e-3, 1e3)


class SumTree:
    """Priorities in the leaves of a complete binary tree whose every node holds the sum of its two
    children (float64): setting k priorities costs O(k log n) and drawing index i with probability
    p_i / sum_j p_j costs O(log n) per draw, exactly (no pass over the n priorities)."""

    def __init__(self, capacity: int, device):
        self.depth = max(1, (capacity - 1).bit_length())
        self.leaves = 1 << self.depth
        self.nodes = torch.zeros(2 * self.leaves, dtype=torch.float64, device=device)

    def set(self, indices, priorities):
        """p_indices = priorities (for an index given twice, the last value), then the sums up to the root."""
        node = indices.long() + self.leaves
        self.nodes[node] = torch.as_tensor(priorities, dtype=torch.float64, device=self.nodes.device)
        for _ in range(self.depth):
            node = torch.unique(node // 2)
            self.nodes[node] = self.nodes[2 * node] + self.nodes[2 * node + 1]

    def total(self):
        return self.nodes[1]

    def priorities(self, indices):
        return self.nodes[indices.long() + self.leaves]

    def sample(self, n: int, generator):
        """n indices drawn independently with P(i) = p_i / sum_j p_j: descend from the root, going right
        when the uniform draw lies beyond the left child's sum (never into a subtree of sum 0)."""
        u = torch.rand(n, dtype=torch.float64, device=self.nodes.device, generator=generator) * self.total()
        node = torch.ones(n, dtype=torch.long, device=self.nodes.device)
        for _ in range(self.depth):
            left = 2 * node
            right = (u >= self.nodes[left]) & (self.nodes[left + 1] > 0)
            u = torch.where(right, u - self.nodes[left], u)
            node = torch.where(right, left + 1, left)
        return node - self.leaves


class BalancedReplayBuffer:
    """Offline and online transitions in one preallocated buffer on the device, sampled with
    P_i = p_i / sum_j p_j from a sum tree (Off2On's balanced replay). The offline data enter with p = 1;
    each online transition enters with the largest priority set so far, and the priorities of every
    sampled batch are replaced by the density-ratio network's (off2on_priorities)."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device, seed: int):
        def zeros(*shape):
            return torch.zeros(capacity, *shape, dtype=torch.float32, device=device)

        self.observations, self.next_observations = zeros(obs_dim), zeros(obs_dim)
        self.actions, self.rewards, self.terminals = zeros(act_dim), zeros(), zeros()
        self.tree = SumTree(capacity, device)
        self.capacity, self.size, self.max_priority, self.device = capacity, 0, 1.0, device
        self.generator = torch.Generator(device).manual_seed(seed)

    def add(self, obs, actions, rewards, next_obs, terminals):
        n, start = len(rewards), self.size
        if start + n > self.capacity:
            raise ValueError(f"replay buffer overflow: {start} + {n} > capacity {self.capacity}")
        end = start + n
        for column, value in ((self.observations, obs), (self.actions, actions), (self.rewards, rewards),
                              (self.next_observations, next_obs), (self.terminals, terminals)):
            column[start:end] = torch.as_tensor(value, dtype=column.dtype, device=self.device)
        self.tree.set(torch.arange(start, end, device=self.device), torch.full((n,), self.max_priority))
        self.size = end

    def set_priorities(self, indices, priorities):
        self.tree.set(indices, priorities)
        self.max_priority = max(self.max_priority, priorities.max().item())

    def batch(self, idx):
        return (self.observations[idx], self.actions[idx], self.rewards[idx], self.next_observations[idx],
                self.terminals[idx])

    def sample(self, batch_size: int):
        """Indices and (s, a, r, s', terminal) of a batch with P_i = p_i / sum_j p_j."""
        idx = self.tree.sample(batch_size, self.generator)
        return idx, self.batch(idx)

    def sample_uniform(self, batch_size: int, low: int, high: int):
        """(s, a) of a batch drawn uniformly from [low, high): the offline or the online part."""
        idx = torch.randint(low, high, (batch_size,), device=self.device, generator=self.generator)
        return self.observations[idx], self.actions[idx]


# =============================================================================================
# The run: Off2On fine-tuning online from the CQL checkpoint
# =============================================================================================
def main(args: Args):
    device = seed_and_pick_device(args)
    data, make_env, ref_scores, max_action = load_offline_data(args.env_id)
    obs_dim, act_dim, n_offline = data["observations"].shape[1], data["actions"].shape[1], len(data["rewards"])
    context = {"dataset_id": args.env_id, "obs_dim": obs_dim, "act_dim": act_dim, "hidden_dim": args.hidden_dim}
    checkpoint = load_checkpoint(args.offline_checkpoint, "--offline-checkpoint", "offline", ("cql",), context)
    args.exp_name = args.exp_name or f"{METHOD}_cql"
    obs_mean, obs_std, reward_scale = data_statistics(data, args, checkpoint, None)
    context.update(obs_mean=torch.as_tensor(obs_mean), obs_std=torch.as_tensor(obs_std), reward_scale=reward_scale)

    def normalize(obs):
        return (obs - obs_mean) / obs_std

    buffer = BalancedReplayBuffer(n_offline + args.online_steps, obs_dim, act_dim, device, args.seed)
    buffer.add(normalize(data["observations"]), data["actions"], data["rewards"] * reward_scale,
               normalize(data["next_observations"]), data["terminals"])
    del data
    run_dir, writer = start_run(args, f"Off2On on CQL from {args.offline_checkpoint}, {n_offline} offline "
                                      f"transitions, device {device}", ref_scores)
    agent = FineTuneCQL(obs_dim, act_dim, max_action, args).to(device)
    agent.load_pretrained(checkpoint["state_dict"])
    density = DensityRatio(obs_dim, act_dim, args.hidden_dim).to(device)
    density_optimizer = torch.optim.Adam(density.parameters(), lr=args.density_lr)
    eval_env = make_env(eval_env=True)
    eval_env.action_space.seed(args.seed)

    def run_evaluation(step: int):
        returns, q_bias = evaluate(agent, eval_env, normalize, args.eval_episodes, args.seed + 10_000, args.gamma,
                                   reward_scale, device)
        log_evaluation(writer, "", step, ref_scores, returns, q_bias)

    # --- online fine-tuning: density ratio, then one SAC update on a balanced batch, every step ---
    torch.manual_seed(args.seed + 2)
    buffer.generator.manual_seed(args.seed + 2)
    env = make_env()
    env.action_space.seed(args.seed)
    obs, _ = env.reset(seed=args.seed)
    episode_return, episode_length, offline_w = 0.0, 0, None
    metric_tags = [f"losses/{name}" for name in (*agent.CRITIC_METRICS, *agent.ACTOR_METRICS, "density_loss")]
    metric_tags += ["off2on/density_ratio_mean", "off2on/online_fraction", "off2on/priority_mean"]
    metric_sum, start = torch.zeros(len(metric_tags), device=device), time.time()
    for step in progress(range(args.online_steps), f"online {args.exp_name}", "step"):
        if step % args.eval_every == 0:
            run_evaluation(step)
        state = torch.as_tensor(normalize(obs), dtype=torch.float32, device=device)[None]
        action = agent.act(state, deterministic=False)
        next_obs, reward, terminated, truncated, _ = env.step(action[0].cpu().numpy())
        buffer.add(state, action, [reward * reward_scale], normalize(next_obs)[None], [float(terminated)])
        episode_return, episode_length = episode_return + reward, episode_length + 1
        obs = next_obs
        if terminated or truncated:
            writer.add_scalar("charts/episodic_return", episode_return, step + 1)
            writer.add_scalar("charts/episodic_length", episode_length, step + 1)
            obs, _ = env.reset()
            episode_return, episode_length = 0.0, 0

        density_loss = torch.zeros((), device=device)
        if buffer.size - n_offline >= args.batch_size:  # the density ratio needs a batch of online data
            offline_obs, offline_actions = buffer.sample_uniform(args.batch_size, 0, n_offline)
            online_obs, online_actions = buffer.sample_uniform(args.batch_size, n_offline, buffer.size)
            offline_w = density(offline_obs, offline_actions)
            density_loss = density_ratio_loss(offline_w, density(online_obs, online_actions))
            density_optimizer.zero_grad(set_to_none=True)
            density_loss.backward()
            density_optimizer.step()
        idx, batch = buffer.sample(args.batch_size)  # balanced replay: P_i ~ p_i
        metrics = torch.cat([agent.update_critic(batch), agent.update_actor(batch)])
        with torch.no_grad():
            batch_w = density(batch[0], batch[1])
            if offline_w is not None:  # the sampled transitions' priorities, from the density ratio
                buffer.set_priorities(idx, off2on_priorities(batch_w, offline_w.detach(), args.priority_temperature))
        batch_terms = torch.stack([density_loss.detach(), batch_w.mean(), (idx >= n_offline).float().mean(),
                                   buffer.tree.priorities(idx).float().mean()])
        metric_sum += torch.cat([metrics, batch_terms])
        if (step + 1) % args.log_every == 0 or step + 1 == args.online_steps:
            log_metrics(writer, "", metric_tags, metric_sum, (step + 1) % args.log_every or args.log_every, step + 1)
            writer.add_scalar("charts/SPS", int((step + 1) / (time.time() - start)), step + 1)
            metric_sum.zero_()
    run_evaluation(args.online_steps)

    save_checkpoint(os.path.join(run_dir, "final.pt"), "final", "cql",
                    {"agent": agent.state_dict(), "optimizer": agent.optimizer.state_dict(),
                     "density_ratio": density.state_dict()}, context, args, method=METHOD)
    writer.close()
    print(f"done: {run_dir}")


# =============================================================================================
# PLUMBING. Nothing below depends on the algorithm: errors, flags, data loading, evaluation,
# logging, checkpoints, memory settings. Identical text in every script that has it.
# =============================================================================================
def fail(message: str):
    """Stop with one clear paragraph (input, cause, fix) and a non-zero exit."""
    raise SystemExit(f"error: {message}")


# What this run has written so far: read when the user stops it with Ctrl-C.
RUN_STATE = {"run_dir": None, "writer": None, "checkpoints": {}}


def stop_on_interrupt():
    """Ctrl-C: one line saying what was saved and how to continue, then exit 130 (no traceback)."""
    if RUN_STATE["writer"] is not None:
        try:
            RUN_STATE["writer"].close()  # keep what was logged
        except Exception:  # the interrupt hit the writer itself: what it had flushed is kept
            pass
    saved, script = RUN_STATE["checkpoints"], sys.argv[0]
    if "resume" in saved:
        hint = f"continue it with `python {script} --resume {saved['resume']}`"
    elif "offline" in saved or "bc" in saved:
        flags = " ".join(f"--{kind}-checkpoint {path}" for kind, path in saved.items() if kind in ("offline", "bc"))
        hint = f"rerun the same command with {flags} to skip what finished"
    else:
        hint = "nothing was saved yet, so rerun the command to start again"
    where = f" in {RUN_STATE['run_dir']}" if RUN_STATE["run_dir"] else ""
    written = ", ".join(sorted(saved.values())) or "no checkpoint"
    print(f"\ninterrupted: saved {written}{where}; {hint}.", file=sys.stderr)
    raise SystemExit(130)


def progress(steps, description: str, unit: str):
    """Steps with a progress bar (rate and time left) on stderr, redrawn at most every 10 s."""
    return tqdm(steps, desc=description, unit=unit, mininterval=10, smoothing=0.1, dynamic_ncols=True)


# Every numeric flag of every script, with the values it accepts (NaN and inf are never accepted).
FLAG_DOMAINS = {
    **dict.fromkeys(["offline_steps", "bc_steps", "online_steps", "offline_eval_every", "checkpoint_every",
                     "stop_after", "figure_points", "threads"], ("an integer >= 0", lambda v: v >= 0)),
    **dict.fromkeys(["eval_every", "eval_episodes", "log_every", "batch_size", "hidden_dim", "cql_n_actions",
                     "critic_updates", "actor_delay"], ("an integer >= 1", lambda v: v >= 1)),
    **dict.fromkeys(["obs_norm_eps", "reward_scale", "bc_lr", "actor_lr", "critic_lr", "value_lr", "kq", "kq_scale",
                     "krho", "cql_temperature", "exp_adv_max", "density_lr", "priority_temperature"],
                    ("a number > 0", lambda v: v > 0)),
    **dict.fromkeys(["cql_alpha", "online_cql_alpha", "beta", "target_noise", "target_noise_clip"],
                    ("a number >= 0", lambda v: v >= 0)),
    "constraint_coef": ("a number > 0", lambda v: v > 0),
    "constraint_half_life": ("an integer >= 1", lambda v: v >= 1),
    "gamma": ("a number in [0, 1)", lambda v: 0 <= v < 1),
    "tau": ("a number in (0, 1]", lambda v: 0 < v <= 1),
    "expectile": ("a number in (0, 1)", lambda v: 0 < v < 1),
    "priority_alpha": ("a number in [-10, 10]", lambda v: -10 <= v <= 10),
    "target_entropy": ("a finite number", lambda v: True),
}


def check_flags(args):
    """Refuse a numeric flag outside its domain before anything is loaded or written."""
    for name, value in vars(args).items():
        if name not in FLAG_DOMAINS or value is None or isinstance(value, bool):
            continue
        domain, accepts = FLAG_DOMAINS[name]
        if not (isinstance(value, (int, float)) and math.isfinite(value) and accepts(value)):
            fail(f"--{name.replace('_', '-')} {value} is outside its domain: it must be {domain}. "
                 f"See `--help` for what it means.")


def seed_and_pick_device(args):
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    if args.cuda and device.type == "cpu":
        print("note: CUDA is not available; running on the CPU.")
    return device


def start_run(args, description: str, ref_scores):
    """CleanRL's run directory and TensorBoard writer. The directory is created exclusively: two runs
    started in the same second get two directories (the second name ends in _1, _2, ...)."""
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    base = os.path.join(args.runs_dir, run_name)
    run_dir, attempt = base, 0
    os.makedirs(args.runs_dir, exist_ok=True)
    while True:
        try:
            os.mkdir(run_dir)
            break
        except FileExistsError:
            attempt += 1
            run_dir = f"{base}_{attempt}"
    writer = SummaryWriter(run_dir)
    RUN_STATE.update(run_dir=run_dir, writer=writer)
    table = "\n".join(f"|{name}|{value}|" for name, value in vars(args).items())
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    print(f"run {run_dir}: {description}")
    if ref_scores is None:
        print(f"note: {args.env_id} has no reference scores; eval/normalized_score is not logged, only eval/return.")
    return run_dir, writer


def log_metrics(writer, prefix: str, names, metric_sum, count: int, step: int):
    for name, value in zip(names, (metric_sum / count).tolist()):
        writer.add_scalar(f"{prefix}{name}", value, step)


# --- data: D4RL names and Minari ids, episodes to transitions, scores -------------------------
D4RL_REF_SCORES = {  # (random, expert) returns from d4rl/infos.py, used by every locomotion version
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
}
D4RL_LEVELS_TO_MINARI = {  # official Minari counterparts; medium-replay and random have none
    "medium": ["medium"],
    "expert": ["expert"],
    "medium-expert": ["medium", "expert"],
    "medium-replay": [],
    "random": [],
}


def how_to_build(env: str, level: str) -> str:
    """The benchmark/make_dataset.py command that builds baq/<env>/<level>-v0, and what it costs."""
    command = f"python benchmark/make_dataset.py --env {env}"
    if level == "medium-replay":
        return f"`{command} --medium-replay` (SAC trained again up to the medium return: 30-50 minutes on a CPU)"
    if level in ("expert", "medium-expert"):
        return (f"`{command} --from-policy` if benchmark/policies/{env}-expert.pt exists (minutes), else "
                f"`{command} --expert` (SAC trained to the expert level: hours)")
    return f"`{command} --from-policy` (minutes, from the committed behavior policy)"


def resolve_dataset_ids(env_id: str) -> list:
    """Map --env-id to the Minari dataset ids it stands for."""
    d4rl = re.fullmatch(r"(hopper|halfcheetah|walker2d)-([a-z-]+)-v2", env_id)
    if d4rl:
        env, level = d4rl.groups()
        if level not in D4RL_LEVELS_TO_MINARI:
            fail(
                f"--env-id {env_id!r} is not a D4RL dataset: the level {level!r} is unknown. "
                f"Use one of {', '.join(f'{env}-{lvl}-v2' for lvl in D4RL_LEVELS_TO_MINARI)}, or a Minari id."
            )
        if not D4RL_LEVELS_TO_MINARI[level]:
            fail(
                f"--env-id {env_id!r} has no official Minari counterpart (Minari publishes only "
                f"medium, expert and their combination for {env}), so it cannot be downloaded. Build the "
                f"D4RL-protocol dataset locally with {how_to_build(env, level)} and pass it by its id: "
                f"--env-id baq/{env}/{level}-v0."
            )
        return [f"mujoco/{env}/{name}-v0" for name in D4RL_LEVELS_TO_MINARI[level]]
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)*-v\d+", env_id):
        fail(
            f"--env-id {env_id!r} is neither a D4RL name ({{hopper,halfcheetah,walker2d}}-"
            f"{{{','.join(D4RL_LEVELS_TO_MINARI)}}}-v2) nor a Minari dataset id (namespace/name-vN, "
            f"e.g. baq/hopper/medium-v0). Check the spelling."
        )
    return [env_id]


def hub_unreachable_reason() -> Optional[str]:
    """Minari retries a download for ~25 s when offline; a socket probe answers in seconds."""
    remote = os.environ.get("MINARI_REMOTE", "hf://farama-minari")
    host = "storage.googleapis.com" if remote.startswith("gcp://") else "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return None
    except OSError as err:
        return f"no connection to the Minari hub {host} ({err})"


def load_minari_dataset(dataset_id: str, env_id: str):
    """Load a dataset from the local Minari store, downloading it when it is missing."""
    import minari

    try:
        return minari.load_dataset(dataset_id)
    except FileNotFoundError:
        pass
    store = os.environ.get("MINARI_DATASETS_PATH", os.path.join(os.path.expanduser("~"), ".minari", "datasets"))
    id_parts = dataset_id.split("/")
    env = id_parts[1] if len(id_parts) == 3 and id_parts[1] in D4RL_REF_SCORES else "{hopper,halfcheetah,walker2d}"
    level = id_parts[-1].rsplit("-v", 1)[0]
    advice = (
        f"Build a D4RL-protocol dataset locally with {how_to_build(env, level)} and pass it by its id "
        f"(--env-id baq/{env}/{level}-v0), or copy the dataset into the store."
    )
    reason = hub_unreachable_reason()
    if reason is None:
        try:
            minari.download_dataset(dataset_id)
            return minari.load_dataset(dataset_id)
        except Exception as err:  # the hub's errors are many; all mean "not available"
            reason = f"the download failed: {type(err).__name__}: {err}"
    fail(
        f"--env-id {env_id!r} needs the Minari dataset {dataset_id!r}, which is not in the local Minari "
        f"store ({store}; set MINARI_DATASETS_PATH to use another) and cannot be downloaded: {reason}. {advice}"
    )


def episodes_to_transitions(episodes) -> dict:
    """Flatten Minari episodes into (s, a, r, s', terminal) arrays. Terminations are terminal;
    truncations (time limits) are not, so their last transition bootstraps from s'."""
    parts = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminals")}
    returns = []
    for episode in episodes:
        observations = np.asarray(episode.observations, dtype=np.float32)
        parts["observations"].append(observations[:-1])
        parts["next_observations"].append(observations[1:])
        parts["actions"].append(np.asarray(episode.actions, dtype=np.float32))
        parts["rewards"].append(np.asarray(episode.rewards, dtype=np.float32))
        parts["terminals"].append(np.asarray(episode.terminations, dtype=np.float32))
        returns.append(float(np.sum(episode.rewards)))
    data = {k: np.concatenate(v) for k, v in parts.items()}
    data["episode_returns"] = np.asarray(returns)
    return data


def load_offline_data(env_id: str):
    """Transitions of --env-id, a maker of its environment (`make_env(eval_env=...)`), its reference
    scores (None when unknown) and its action bound."""
    datasets = [load_minari_dataset(dataset_id, env_id) for dataset_id in resolve_dataset_ids(env_id)]
    first = datasets[0]
    for dataset in datasets:
        spaces = (dataset.observation_space, dataset.action_space)
        if not all(isinstance(space, gym.spaces.Box) for space in spaces):
            fail(f"--env-id {env_id!r}: BAQ needs flat Box observations and actions; {dataset.spec.dataset_id} has "
                 f"{dataset.observation_space} and {dataset.action_space}.")
        if (dataset.observation_space.shape, dataset.action_space.shape) != (first.observation_space.shape,
                                                                               first.action_space.shape):
            fail(f"--env-id {env_id!r} combines datasets of different shapes; combine only datasets of one "
                 f"environment.")
    data = episodes_to_transitions(e for dataset in datasets for e in dataset.iterate_episodes())
    action_space = first.action_space
    if not (np.allclose(action_space.low, -action_space.high) and np.allclose(action_space.high, action_space.high[0])):
        fail(f"--env-id {env_id!r}: BAQ's tanh policies need a symmetric action box [-c, c]; the dataset has "
             f"{action_space}.")
    metadata = first.storage.metadata
    env_name = first.spec.env_spec.id.split("-")[0].lower()
    if metadata.get("ref_min_score") is not None and metadata.get("ref_max_score") is not None:
        ref_scores = (float(metadata["ref_min_score"]), float(metadata["ref_max_score"]))
    else:
        ref_scores = D4RL_REF_SCORES.get(env_name)
    return data, first.recover_environment, ref_scores, float(action_space.high[0])


def data_statistics(data: dict, args, offline_checkpoint, bc_checkpoint):
    """Observation mean and std and the reward scale: the offline checkpoint's when one is given (its
    networks were trained with them), else the dataset's. A BC checkpoint must agree with them."""
    if offline_checkpoint:
        obs_mean, obs_std = offline_checkpoint["obs_mean"].numpy(), offline_checkpoint["obs_std"].numpy()
        reward_scale = offline_checkpoint["reward_scale"]
    else:
        obs_mean = data["observations"].mean(0)
        obs_std = data["observations"].std(0) + args.obs_norm_eps
        return_range = np.ptp(data["episode_returns"])
        reward_scale = float(args.reward_scale or (1000.0 / return_range if return_range > 0 else 1.0))
    if bc_checkpoint:
        for name, ours in (("mean", obs_mean), ("std", obs_std)):
            if not np.allclose(bc_checkpoint[f"obs_{name}"].numpy(), ours, atol=1e-5):
                fail(f"--bc-checkpoint {args.bc_checkpoint!r} normalizes observations with another {name} than this "
                     f"run ({'its --offline-checkpoint' if offline_checkpoint else f'--env-id {args.env_id}'}): pi_BC "
                     f"would see other states. Pass a bc.pt trained on the same dataset with the same "
                     f"--obs-norm-eps, or drop --bc-checkpoint to train pi_BC here.")
    return obs_mean, obs_std, reward_scale


def normalized_score(episode_return, ref_scores):
    """D4RL normalized score: 100 * (R - R_random) / (R_expert - R_random)."""
    ref_min, ref_max = ref_scores
    return 100.0 * (np.asarray(episode_return) - ref_min) / (ref_max - ref_min)


# --- evaluation -------------------------------------------------------------------------------
def discounted_returns_to_go(rewards, gamma: float):
    returns, running = np.zeros(len(rewards)), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        returns[t] = running
    return returns


def evaluate(agent, env, normalize, episodes: int, seed: int, gamma: float, reward_scale: float, device):
    """Deterministic episodes. Returns their returns and the Q bias: mean over visited (s_t, a_t) of
    Q(s_t, a_t) / reward_scale minus the discounted return collected from t on (reward units)."""
    episode_returns, q_errors = [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        states, actions, rewards, done = [], [], [], False
        while not done:
            state = torch.as_tensor(normalize(obs), dtype=torch.float32, device=device)
            action = agent.act(state[None], deterministic=True)[0]
            obs, reward, terminated, truncated, _ = env.step(action.cpu().numpy())
            states.append(state)
            actions.append(action)
            rewards.append(reward)
            done = terminated or truncated
        q = agent.q_value(torch.stack(states), torch.stack(actions)).cpu().numpy() / reward_scale
        q_errors.append(q - discounted_returns_to_go(rewards, gamma))
        episode_returns.append(sum(rewards))
    return np.asarray(episode_returns), float(np.concatenate(q_errors).mean())


def log_evaluation(writer, prefix: str, step: int, ref_scores, returns, q_bias: float):
    writer.add_scalar(f"{prefix}eval/return", returns.mean(), step)
    writer.add_scalar(f"{prefix}eval/q_bias", q_bias, step)
    score = ""
    if ref_scores is not None:
        writer.add_scalar(f"{prefix}eval/normalized_score", normalized_score(returns.mean(), ref_scores), step)
        score = f", normalized score {normalized_score(returns.mean(), ref_scores):.1f}"
    tqdm.write(f"{prefix or 'online/'}step {step}: return {returns.mean():.1f} +/- {returns.std():.1f}{score}, "
          f"Q bias {q_bias:.1f}")


# --- checkpoints ------------------------------------------------------------------------------
def save_checkpoint(path: str, kind: str, algorithm: str, state_dict: dict, context: dict, args, **extra):
    """Self-describing checkpoint, written to a temporary file and renamed (never half-written)."""
    payload = {"format": "baq-checkpoint-1", "kind": kind, "algorithm": algorithm, **context,
               "state_dict": state_dict, "args": asdict(args), **extra}
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)
    RUN_STATE["checkpoints"][kind] = path


def load_checkpoint(path: str, flag: str, kind: str, algorithms: tuple, context: dict) -> dict:
    """Load a checkpoint given to `flag` and check that it fits this run."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"{flag} {path!r}: no such file. Pass the path of a checkpoint written by an earlier run.")
    except Exception as err:
        fail(f"{flag} {path!r} is not a readable checkpoint ({type(err).__name__}: {err}). Pass a file written by an "
             f"earlier run.")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != "baq-checkpoint-1":
        fail(f"{flag} {path!r} is not a BAQ checkpoint. Pass an `{kind}.pt` written by an earlier run.")
    if checkpoint["kind"] != kind or checkpoint["algorithm"] not in algorithms:
        needed = " or ".join(a.upper() for a in algorithms)
        fail(
            f"{flag} {path!r} holds a checkpoint of kind {checkpoint['kind']!r} made by "
            f"{checkpoint['algorithm'].upper()}, but {flag} needs kind {kind!r} made by {needed}. Pass the "
            f"`{kind}.pt` written by an earlier {needed} run."
        )
    same_environment = "pass a checkpoint made on this environment"
    fixes = {"dataset_id": f"pass a checkpoint made on --env-id {context.get('dataset_id')}",
             "obs_dim": same_environment, "act_dim": same_environment,
             "hidden_dim": f"pass --hidden-dim {checkpoint.get('hidden_dim')} to match it"}
    for key in ("dataset_id", "obs_dim", "act_dim", "hidden_dim"):
        if key in context and checkpoint[key] != context[key]:
            fail(f"{flag} {path!r} was made for {key} {checkpoint[key]!r}, but this run has {context[key]!r}: "
                 f"{fixes[key]}, or drop {flag} to train it here.")
    return checkpoint


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except KeyboardInterrupt:
        stop_on_interrupt()
