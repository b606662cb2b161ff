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
import atexit
import contextlib
import hashlib
import itertools
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass

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
    exp_name: str | None = None  # the experiment's name in the run directory; default: off2on_cql
    env_id: str = "hopper-medium-v2"  # the offline dataset of the checkpoint (a D4RL name or a Minari id)
    seed: int = 1  # seed of the experiment
    torch_deterministic: bool = True  # if toggled, `torch.backends.cudnn.deterministic=True`
    cuda: bool = True  # use CUDA when it is available
    compile: bool = False  # torch.compile the critic and actor losses
    threads: int = 0  # torch threads (0: one per core; 1 when other jobs share the cores)
    runs_dir: str = "runs"  # where the run directories are created
    track: bool = False  # log to Weights & Biases (TensorBoard synced)
    wandb_project_name: str = "baq"  # the W&B project
    wandb_entity: str | None = None  # the W&B entity (team)
    online_steps: int = 30_000  # online environment steps of fine-tuning (the paper's Table 1 budget)
    eval_every: int = 5_000  # evaluate every this many online steps (and at online step 0, the offline policy)
    eval_episodes: int = 10  # deterministic episodes per evaluation
    log_every: int = 1_000  # write losses every this many online steps (averaged over the updates in between)
    # Off2On
    density_lr: float = 3e-4  # learning rate of the density-ratio network
    priority_temperature: float = 5.0  # T of p = w^(1/T) / mean_offline(w^(1/T))
    # the backbone's hyperparameters (the BAQ scripts' defaults)
    batch_size: int = 256  # batch size of every gradient update
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # target network soft-update rate
    hidden_dim: int = 256  # width of every hidden layer (must match the checkpoint's)
    actor_lr: float = 3e-5  # actor learning rate (also the entropy temperature's; baq_cql.py's)
    critic_lr: float = 3e-4  # twin Q learning rate
    target_entropy: float | None = None  # entropy target of the automatic temperature tuning (default: -|A|)

    def __post_init__(self):
        check_flags(self)


METHOD = "off2on"


# ===== The backbones' losses and networks (identical text with the BAQ scripts) =============================
def entropy_temperature_loss(log_alpha, log_prob, target_entropy: float):
    """SAC's automatic entropy tuning: alpha grows while the policy's entropy is below the target."""
    return -(log_alpha * (log_prob.detach() + target_entropy)).mean()


def mlp(in_dim: int, out_dim: int, hidden_dim: int, n_hidden: int) -> nn.Sequential:
    layers, dim = [], in_dim
    for _ in range(n_hidden):
        layers += [nn.Linear(dim, hidden_dim), nn.ReLU()]
        dim = hidden_dim
    return nn.Sequential(*layers, nn.Linear(dim, out_dim))


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
    """CQL's actor as CORL builds it: a = max_action * tanh(u), u ~ N(mean(s), std(s)), 3 hidden layers (PyTorch's
    default initialization, a near-zero output layer); log std = m * output + c, trainable m, c (1 and -1 at start)."""

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


# ===== The backbones for online fine-tuning: IQL and CQL from their offline checkpoints, with the critic ====
# and actor updates apart (a method sets how many of each per environment step)
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


# ===== Off2On's balanced replay: a density-ratio network and priorities in a sum tree =======================
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


# ===== Evaluation and logging: the D4RL normalized score, the Q bias, averaged metrics =======================
@torch.no_grad()
def evaluate(agent, env, normalize, episodes: int, seed: int, gamma: float, reward_scale: float, device):
    """Deterministic episodes' returns and the Q bias: mean of min_i Q_i(s_t, a_t) / reward_scale - return-to-go."""
    episode_returns, q_errors = [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        states, actions, rewards, done = [], [], [], False
        while not done:
            states.append(torch.as_tensor(normalize(obs), dtype=torch.float32, device=device))
            actions.append(agent.act(states[-1][None], deterministic=True)[0])
            obs, reward, terminated, truncated, _ = env.step(actions[-1].cpu().numpy())
            rewards.append(reward)
            done = terminated or truncated
        q = agent.qf(torch.stack(states), torch.stack(actions)).min(0).values.cpu().numpy() / reward_scale
        returns_to_go = list(itertools.accumulate(reversed(rewards), lambda g, r: r + gamma * g))[::-1]
        q_errors.append(q - np.asarray(returns_to_go))
        episode_returns.append(sum(rewards))
    return np.asarray(episode_returns), float(np.concatenate(q_errors).mean())


def log_evaluation(writer, prefix: str, step: int, ref_scores, returns, q_bias: float):
    scores = {"return": returns.mean(), "q_bias": q_bias}
    if ref_scores is not None:  # D4RL's: 100 (R - R_random) / (R_expert - R_random)
        scores["normalized_score"] = 100.0 * (returns.mean() - ref_scores[0]) / (ref_scores[1] - ref_scores[0])
    for name, value in scores.items():
        writer.add_scalar(f"{prefix}eval/{name}", value, step)
    shown = ", ".join(f"{name} {value:.1f}" for name, value in scores.items())
    tqdm.write(f"{prefix or 'online/'}step {step}: {shown} (return std {returns.std():.1f})")


def log_metrics(writer, prefix: str, names, metric_sum, count: int, step: int):
    """The metrics averaged since the last log (read from the device once); a non-finite one stops the run."""
    for name, value in zip(names, (metric_sum / count).tolist()):
        writer.add_scalar(f"{prefix}{name}", value, step)
        if not math.isfinite(value):
            fail(f"at step {step} {prefix}{name} = {value}: the run diverged, and stops with what it saved in "
                 f"{writer.log_dir}; lower the learning rates or the reward scale.")


# ===== The run: Off2On fine-tuning online from the CQL checkpoint ===========================================
def main(args: Args):
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    data, context, make_env, ref_scores, max_action = load_offline_data(args.env_id)
    obs_dim, act_dim, n_offline = context["obs_dim"], context["act_dim"], len(data["rewards"])
    context["hidden_dim"] = args.hidden_dim
    checkpoint = load_checkpoint(args.offline_checkpoint, "--offline-checkpoint", "offline", ("cql",), context)
    args.exp_name = args.exp_name or f"{METHOD}_cql"
    obs_mean, obs_std, reward_scale = data_statistics(data, args, checkpoint)
    context.update(obs_mean=torch.as_tensor(obs_mean), obs_std=torch.as_tensor(obs_std), reward_scale=reward_scale)

    def normalize(obs):
        return (obs - obs_mean) / obs_std

    buffer = BalancedReplayBuffer(n_offline + args.online_steps, obs_dim, act_dim, device, args.seed)
    buffer.add(normalize(data["observations"]), data["actions"], data["rewards"] * reward_scale,
               normalize(data["next_observations"]), data["terminals"])
    del data
    run_dir, writer = start_run(args, f"Off2On on CQL from {args.offline_checkpoint}, {n_offline} offline "
                                      f"transitions, device {device}")
    agent = FineTuneCQL(obs_dim, act_dim, max_action, args).to(device)
    agent.load_pretrained(checkpoint["state_dict"])
    density = DensityRatio(obs_dim, act_dim, args.hidden_dim).to(device)
    density_optimizer = torch.optim.Adam(density.parameters(), lr=args.density_lr)
    eval_env = make_env(eval_env=True)

    def run_evaluation(step: int):
        returns, q_bias = evaluate(agent, eval_env, normalize, args.eval_episodes, args.seed + 10_000, args.gamma,
                                   reward_scale, device)
        log_evaluation(writer, "", step, ref_scores, returns, q_bias)

    # --- online fine-tuning: density ratio, then one SAC update on a balanced batch, every step ---
    torch.manual_seed(args.seed + 2)
    buffer.generator.manual_seed(args.seed + 2)
    env = gym.wrappers.RecordEpisodeStatistics(make_env())
    obs, _ = env.reset(seed=args.seed)
    offline_w = None
    metric_tags = [f"losses/{name}" for name in (*agent.CRITIC_METRICS, *agent.ACTOR_METRICS, "density_loss")]
    metric_tags += ["off2on/density_ratio_mean", "off2on/online_fraction", "off2on/priority_mean"]
    metric_sum, start = torch.zeros(len(metric_tags), device=device), time.time()
    for step in tqdm(range(args.online_steps), f"online {args.exp_name}", unit="step", mininterval=10):
        if step % args.eval_every == 0:
            run_evaluation(step)
        state = torch.as_tensor(normalize(obs), dtype=torch.float32, device=device)[None]
        action = agent.act(state, deterministic=False)
        next_obs, reward, terminated, truncated, info = env.step(action[0].cpu().numpy())
        buffer.add(state, action, [reward * reward_scale], normalize(next_obs)[None], [float(terminated)])
        obs = next_obs
        if terminated or truncated:
            writer.add_scalar("charts/episodic_return", info["episode"]["r"], step + 1)
            writer.add_scalar("charts/episodic_length", info["episode"]["l"], step + 1)
            obs, _ = env.reset()

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


# ===== PLUMBING: flags, the run directory, data, checkpoints ================================================
def fail(message: str):
    """Stop with one line (the input, the cause, the fix) and a non-zero exit."""
    raise SystemExit(f"error: {message}")


FLAG_DOMAINS = {  # interval: the numeric flags that must lie in it (NaN and inf never), see check_flags
    "[0, 2147483648)": ["seed"], "[0, 1)": ["gamma"], "(0, 1]": ["tau"], "[0, inf)": ["threads", "online_steps"],
    "[1, inf)": ["eval_every", "eval_episodes", "log_every", "batch_size", "hidden_dim"],
    "(0, inf)": ["density_lr", "priority_temperature", "actor_lr", "critic_lr"], "(-inf, inf)": ["target_entropy"],
}


def check_flags(args):
    """Before anything loads: numeric flags in their intervals, a run directory inside a writable --runs-dir."""
    for interval, names in FLAG_DOMAINS.items():
        low, high = map(float, interval[1:-1].split(","))
        for name in names:
            v = getattr(args, name)
            if v is not None and not (math.isfinite(v) and (low <= v if interval[0] == "[" else low < v)
                                      and (v < high if interval[-1] == ")" else v <= high)):
                fail(f"--{name.replace('_', '-')} {v} is outside its domain: it must be in {interval}.")
    if args.exp_name is not None and not re.fullmatch(r"\w[\w.+=-]{0,99}", args.exp_name):
        fail(f"--exp-name {args.exp_name!r} is not a folder name: use up to 100 letters, digits and . _ + = -.")
    folder = os.path.abspath(args.runs_dir) if args.runs_dir else ""
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not (os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)):
        fail(f"--runs-dir {args.runs_dir!r} cannot hold run directories ({folder or 'empty'} is not a writable "
             f"folder): pass a writable folder.")


SAVED = {}  # path: kind of each checkpoint this run wrote, for the line a Ctrl-C prints


def open_writer(run_dir: str, args, purge_step: int | None = None):
    """The run's TensorBoard writer, closed at exit (Ctrl-C too), synced to Weights & Biases with --track."""
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=os.path.basename(run_dir),
                   config=vars(args), sync_tensorboard=True, save_code=True, dir=run_dir)
    writer = SummaryWriter(run_dir, purge_step=purge_step)
    atexit.register(writer.close)
    return writer


def start_run(args, description: str):
    """CleanRL's run directory {runs_dir}/{env_id}__{exp_name}__{seed}__{time}, exclusive (_1, _2 when taken)."""
    name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    os.makedirs(args.runs_dir, exist_ok=True)
    for attempt in itertools.count():
        with contextlib.suppress(FileExistsError):
            os.mkdir(run_dir := os.path.join(args.runs_dir, f"{name}_{attempt}" if attempt else name))
            break
    writer = open_writer(run_dir, args)
    rows = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")
    print(f"run {run_dir}: {description}")
    return run_dir, writer


def stop_on_interrupt():
    """Ctrl-C or SIGTERM: one line on what was saved, exit 130."""
    hint = "the run had finished" if SAVED else "nothing was saved yet, so rerun the command to start again"
    print(f"\ninterrupted: saved {', '.join(SAVED) or 'no checkpoint'}; {hint}.", file=sys.stderr)
    raise SystemExit(130)


# --- data: D4RL names and Minari ids, episodes to transitions, scores -------------------------
D4RL_REF_SCORES = {  # (random, expert) returns of d4rl/infos.py, the same for every locomotion version
    "hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0), "walker2d": (1.629008, 4592.3)}
D4RL_LEVELS = {"medium": ["medium"], "medium-replay": [], "medium-expert": ["medium", "expert"], "expert": ["expert"],
               "random": []}  # each one's Minari levels ([]: Minari has none); benchmark/make_dataset.py builds all


def how_to_build(dataset_id: str) -> str:
    known = re.fullmatch(rf"(?:baq|mujoco)/(hopper|halfcheetah|walker2d)/({'|'.join(D4RL_LEVELS)})-v0", dataset_id)
    if not known:
        return f"check the id (case-sensitive: baq/<env>/<level>-v0, <level> one of {', '.join(D4RL_LEVELS)})"
    how = "--medium-replay" if known[2] == "medium-replay" else f"--levels {known[2]} --from-policy"
    return (f"build it with `python benchmark/make_dataset.py --env {known[1]} {how}` and pass --env-id "
            f"baq/{known[1]}/{known[2]}-v0")


def resolve_dataset_ids(env_id: str) -> list:
    """The Minari ids that --env-id stands for: a D4RL name maps to Minari's official data, else it is an id."""
    d4rl = re.fullmatch(r"(hopper|halfcheetah|walker2d)-([a-z-]+)-v2", env_id.lower())
    if d4rl and (env_id != env_id.lower() or d4rl[2] not in D4RL_LEVELS):
        fail(f"--env-id {env_id!r} is not a D4RL name: write {d4rl[1]}-<level>-v2 in lower case, <level> one of "
             f"{', '.join(D4RL_LEVELS)}.")
    if d4rl and not D4RL_LEVELS[d4rl[2]]:
        fail(f"--env-id {env_id!r} has no Minari counterpart: {how_to_build(f'baq/{d4rl[1]}/{d4rl[2]}-v0')}.")
    return [f"mujoco/{d4rl[1]}/{level}-v0" for level in D4RL_LEVELS[d4rl[2]]] if d4rl else [env_id]


def episodes_to_transitions(episodes) -> dict:
    """(s, a, r, s', terminal) of Minari episodes: a truncation (time limit) is not terminal, it bootstraps from s'."""
    keys = ("observations", "actions", "rewards", "next_observations", "terminals")
    parts, returns = {key: [] for key in keys}, []
    for episode in episodes:
        obs = np.asarray(episode.observations, dtype=np.float32)
        for key, value in zip(keys, (obs[:-1], episode.actions, episode.rewards, obs[1:], episode.terminations)):
            parts[key].append(np.asarray(value, dtype=np.float32))
        returns.append(float(np.sum(episode.rewards)))
    return {**{key: np.concatenate(value) for key, value in parts.items()}, "episode_returns": np.asarray(returns)}


def load_offline_data(env_id: str):
    """Transitions, their identity (id, SHA-1, sizes), make_env(eval_env=...), reference scores or None, max action."""
    import minari

    store = os.environ.get("MINARI_DATASETS_PATH") or os.path.join(os.path.expanduser("~"), ".minari", "datasets")
    if os.path.exists(store) and not os.path.isdir(store):
        fail(f"MINARI_DATASETS_PATH {store!r} is a file: point it at a folder (the Minari store).")
    had_store, loaded = os.path.isdir(store), []
    for dataset_id in resolve_dataset_ids(env_id):
        try:
            dataset = minari.load_dataset(dataset_id, download=True)
            loaded.append((dataset, episodes_to_transitions(dataset.iterate_episodes())))  # reads every file
        except Exception as err:  # Minari's, the hub's and h5py's errors: each means this dataset cannot be read
            folder = os.path.join(store, dataset_id)
            local = os.path.isdir(os.path.join(folder, "data"))
            if not had_store:  # a failed load leaves no store it made
                shutil.rmtree(store, ignore_errors=True)
            cause = (f"its files in {folder} cannot be read" if local else
                     f"it is not in the store {store} nor downloadable")
            fail(f"--env-id {env_id!r} needs the Minari dataset {dataset_id!r}, but {cause} ({type(err).__name__}: "
                 f"{' '.join(str(err).split())[:200]}); {'delete that folder and ' if local else ''}"
                 f"{how_to_build(dataset_id)}.")
    first, space = loaded[0][0], loaded[0][0].action_space
    spaces = {(str(d.observation_space), str(d.action_space)) for d, _ in loaded}
    if len(spaces) > 1 or not all(isinstance(s, gym.spaces.Box) for s in (first.observation_space, space)):
        fail(f"--env-id {env_id!r}: BAQ needs flat Box observations and actions of one environment, not {spaces}.")
    if not (np.allclose(space.low, -space.high) and np.allclose(space.high, space.high[0])):
        fail(f"--env-id {env_id!r}: the tanh policies need a symmetric action box [-c, c], not {space}.")
    data = {key: np.concatenate([part[key] for _, part in loaded]) for key in loaded[0][1]}
    digest = hashlib.sha1()  # a checkpoint made on other data under the same name is refused
    for key in ("observations", "actions", "rewards", "next_observations", "terminals"):
        digest.update(np.ascontiguousarray(data[key]))
    identity = {"dataset_id": env_id, "data_sha1": digest.hexdigest(), "obs_dim": data["observations"].shape[1],
                "act_dim": data["actions"].shape[1]}
    ref_scores = [first.storage.metadata.get(f"ref_{end}_score") for end in ("min", "max")]
    ref_scores = tuple(map(float, ref_scores)) if None not in ref_scores else D4RL_REF_SCORES.get(
        first.spec.env_spec.id.split("-")[0].lower())
    if ref_scores is None:
        print(f"note: {env_id} has no reference scores; eval/normalized_score is not logged, only eval/return.")
    return data, identity, first.recover_environment, ref_scores, float(space.high[0])


def data_statistics(data: dict, args, offline_checkpoint):
    """Observation mean, std and reward scale: an offline checkpoint's, else the dataset's; args record the scale."""
    if offline_checkpoint:
        obs_mean, obs_std = offline_checkpoint["obs_mean"].numpy(), offline_checkpoint["obs_std"].numpy()
        reward_scale = offline_checkpoint["reward_scale"]
        if getattr(args, "reward_scale", None) not in (None, reward_scale):  # the baselines lack the flag
            fail(f"--reward-scale {args.reward_scale} differs from the offline checkpoint's {reward_scale}, which "
                 f"fixes it: pass --reward-scale {reward_scale}, or a checkpoint trained with {args.reward_scale}.")
    else:
        obs_mean, obs_std = data["observations"].mean(0), data["observations"].std(0) + args.obs_norm_eps
        return_range = np.ptp(data["episode_returns"])
        reward_scale = float(args.reward_scale or (1000.0 / return_range if return_range > 0 else 1.0))
    if hasattr(args, "reward_scale"):
        args.reward_scale = reward_scale
    return obs_mean, obs_std, reward_scale


# --- checkpoints ------------------------------------------------------------------------------
def save_checkpoint(path: str, kind: str, algorithm: str, state_dict: dict, context: dict, args, **extra):
    """A self-describing checkpoint, written to a temporary file and renamed (never half-written)."""
    payload = {"format": "baq-checkpoint-1", "kind": kind, "algorithm": algorithm, **context,
               "state_dict": state_dict, "args": asdict(args), **extra}
    torch.save(payload, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)
    SAVED[path] = kind


def load_checkpoint(path: str, flag: str, kind: str, algorithms: tuple, context: dict) -> dict:
    """The checkpoint given to `flag`, checked against this run (kind, algorithm, data, sizes, normalization)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        fail(f"{flag} {path!r} cannot be read ({type(err).__name__}): pass a `{kind}.pt` written by an earlier run.")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != "baq-checkpoint-1":
        fail(f"{flag} {path!r} is not a BAQ checkpoint: pass a `{kind}.pt` written by an earlier run.")
    if checkpoint["kind"] != kind or checkpoint["algorithm"] not in algorithms:
        fail(f"{flag} {path!r} holds a checkpoint of kind {checkpoint['kind']!r} by {checkpoint['algorithm'].upper()}: "
             f"pass the `{kind}.pt` of an earlier {' or '.join(a.upper() for a in algorithms)} run.")
    for key in ("dataset_id", "data_sha1", "obs_dim", "act_dim", "hidden_dim", "obs_norm_eps"):
        theirs = checkpoint.get(key, checkpoint["args"].get(key))  # older checkpoints: obs_norm_eps in their args
        if key in context and theirs != context[key]:
            fix = (f"pass --{key.replace('_', '-')} {theirs}" if key in ("hidden_dim", "obs_norm_eps")
                   else "the dataset was rebuilt or changed: pass a checkpoint trained on it" if key == "data_sha1"
                   else "pass a checkpoint of this dataset")
            fail(f"{flag} {path!r} was made for {key} {theirs!r}, this run has {context[key]!r}: {fix}, "
                 f"or drop {flag} to train it here.")
    return checkpoint


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM (Slurm, timeout) stops as Ctrl-C does
    try:
        main(tyro.cli(Args))
    except KeyboardInterrupt:
        stop_on_interrupt()
