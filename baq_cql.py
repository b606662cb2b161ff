# BAQ on CQL in one file: offline CQL pretraining, the behavior-cloning reference pi_BC, and Behavior Adaption
# Q-learning fine-tuning online. Paper: "From Static to Dynamic: Leveraging Implicit Behavioral Models to
# Facilitate Transition in Offline-to-Online Reinforcement Learning" (BAQ).
#
# Where the paper's equations live:
#   Eq. 2         pi_BC's negative log-likelihood ......... train_bc
#   Eq. 6         the weight w(s,a) ....................... behavior_weight
#   Eq. 10        the priority rho and its sampling ....... behavior_priority, ReplayBuffer.sample
#   Eqs. 3, 7     CQL's critic loss, Bellman term weighted . cql_bellman_loss, cql_penalty, CQL.losses
#   In `main`, "Eq. N" marks where each one enters the run.
#
# Definitions other scripts also have are identical text in all (tests/test_copies.py). Docs: docs/baq.md
import atexit
import contextlib
import ctypes
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

ALGORITHM = "cql"


@dataclass
class Args:
    exp_name: str | None = None  # the run's experiment name; default: the script and variant (baq_cql-our-q, ...)
    env_id: str = "hopper-medium-v2"  # a D4RL name (hopper-medium-v2, ...) or a Minari id (baq/hopper/medium-v0)
    seed: int = 1  # seed of the experiment
    torch_deterministic: bool = True  # if toggled, `torch.backends.cudnn.deterministic=True`
    cuda: bool = True  # use CUDA when it is available
    compile: bool = False  # torch.compile the losses
    threads: int = 0  # torch threads (0: one per core; 1 when other jobs share the cores)
    runs_dir: str = "runs"  # where the run directories are created
    track: bool = False  # log to Weights & Biases (TensorBoard synced)
    wandb_project_name: str = "baq"  # the W&B project
    wandb_entity: str | None = None  # the W&B entity (team)
    # phases
    offline_steps: int = 1_000_000  # offline gradient updates (skipped with --offline-checkpoint)
    bc_steps: int = 100_000  # gradient updates of pi_BC (skipped with --bc-checkpoint)
    online_steps: int = 30_000  # online environment steps, one gradient update each
    offline_checkpoint: str | None = None  # an `offline.pt`: skips pretraining; fixes --reward-scale, --obs-norm-eps
    bc_checkpoint: str | None = None  # a `bc.pt` of this dataset: skips behavior cloning
    # evaluation and logging
    eval_every: int = 5_000  # evaluate every this many online steps (and at step 0)
    offline_eval_every: int = 100_000  # evaluate every this many offline updates (0: at the end only)
    eval_episodes: int = 10  # deterministic episodes per evaluation
    log_every: int = 1_000  # log the averaged losses and BAQ statistics every this many updates
    # shared hyperparameters
    batch_size: int = 256  # batch size of every gradient update
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # target network soft-update rate
    hidden_dim: int = 256  # width of every hidden layer
    obs_norm_eps: float = 1e-3  # added to the dataset's observation std
    reward_scale: float | None = 1.0  # multiplies every reward (CORL's CQL: 1); None: 1000 / (max - min return)
    bc_lr: float = 3e-4  # learning rate of pi_BC
    # CQL
    actor_lr: float = 3e-5  # actor learning rate (also the entropy temperature's)
    critic_lr: float = 3e-4  # twin Q learning rate
    cql_alpha: float = 10.0  # weight of the conservative penalty (Eq. 3's alpha with CORL's mean-squared TD term)
    online_cql_alpha: float | None = None  # weight of the conservative penalty online; default: --cql-alpha
    cql_n_actions: int = 10  # sampled actions per state in each of the penalty's three action sets
    cql_temperature: float = 1.0  # temperature of the penalty's log-sum-exp
    target_entropy: float | None = None  # entropy target of the temperature tuning; default: -|A|
    # BAQ
    weighted_loss: bool = True  # weight the Bellman term of the critic loss by w(s,a) (Eqs. 6, 7); alone: Our-Q
    priority_sampling: bool = True  # sample transitions proportionally to rho (Eq. 10); alone: Our-S
    kq: float | None = None  # k_q of Eq. 6; default: the offline mean of mean((pi_BC(s)-a)^2)
    kq_scale: float = 1.0  # multiplies k_q (> 1 weakens the weight)
    krho: float | None = None  # k_rho of Eq. 10; default: the offline mean of ||pi_BC(s)-a||
    priority_alpha: float = 1.0  # alpha of Eq. 10 (0: uniform sampling)
    offline_priorities: bool = False  # Eq. 10 for offline data too ("each transition"); default: "a new transition"
    # the adaptive behavior constraint of the later paper (off: the paper's Table 1 method)
    behavior_constraint: bool = False  # add lambda_t E_s[u(s) mean((pi(s) - pi_BC(s))^2)] to the actor loss online
    constraint_coef: float = 30.0  # lambda_0, the constraint's weight when fine-tuning starts
    constraint_half_life: int = 5_000  # n_half of lambda_t = lambda_0 / (1 + n_conf / n_half)

    def __post_init__(self):
        if self.exp_name is None:
            variant = {(True, True): "", (True, False): "-our-q", (False, True): "-our-s", (False, False): "-plain"}
            self.exp_name = f"baq_{ALGORITHM}" + variant[self.weighted_loss, self.priority_sampling]
            self.exp_name += "-adaptive" if self.behavior_constraint else ""
        check_flags(self)


# ===== BAQ: pi_BC (Eq. 2), the weight w (Eq. 6) and the priority rho (Eq. 10) ===============================
@torch.no_grad()
def bc_divergence(bc_policy, obs, actions, chunk: int = 65536):
    """mean((pi_BC(s) - a)^2) over action dimensions, per transition."""
    return torch.cat([(bc_policy(o) - a).pow(2).mean(-1) for o, a in zip(obs.split(chunk), actions.split(chunk))])


def behavior_weight(divergence, kq: float):
    """Eq. 6: w(s,a) = exp(-mean((pi_BC(s) - a)^2) / k_q)."""
    return torch.exp(-divergence / kq)


def behavior_priority(divergence, act_dim: int, krho: float, alpha: float):
    """Eq. 10: rho = (||pi_BC(s) - a|| / k_rho + 1)^alpha, with ||.||^2 = act_dim * mean(.^2)."""
    return (torch.sqrt(divergence * act_dim) / krho + 1.0).pow(alpha)


def train_bc(observations, actions, max_action: float, args: Args, writer):
    """Eq. 2: pi_BC = argmin E_(s,a)~D[-log pi(a|s)]; its own seed streams make it the same in every script."""
    device = observations.device
    torch.manual_seed(args.seed)
    generator = torch.Generator(device).manual_seed(args.seed + 1)
    bc_policy = GaussianPolicy(observations.shape[1], actions.shape[1], args.hidden_dim, max_action).to(device)
    optimizer = torch.optim.Adam(bc_policy.parameters(), lr=args.bc_lr)
    loss_sum, start = torch.zeros((), device=device), time.time()
    for step in tqdm(range(1, args.bc_steps + 1), "pi_BC (Eq. 2)", unit="update", mininterval=10):
        idx = torch.randint(0, len(observations), (args.batch_size,), device=device, generator=generator)
        loss = -bc_policy.log_prob(observations[idx], actions[idx]).mean()  # Eq. 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
        if step % args.log_every == 0 or step == args.bc_steps:
            writer.add_scalar("bc/loss", (loss_sum / (step % args.log_every or args.log_every)).item(), step)
            writer.add_scalar("bc/mse", bc_divergence(bc_policy, observations[idx], actions[idx]).mean().item(), step)
            writer.add_scalar("bc/SPS", int(step / (time.time() - start)), step)
            loss_sum.zero_()
    return bc_policy


# ===== CQL with the BAQ weights (Eq. 7) =====================================================================
def cql_bellman_loss(q_data, td_target, weights):
    """Eq. 7: E[w(s,a) (Q(s,a) - B^pi Q_target(s,a))^2] for each critic, summed over the twin critics.
    The paper's text says the weight goes on the "conservative penalty term", but Eq. 7 weights the
    Bellman term; we implement the equation. (TD term as CORL's MSE; see Args.cql_alpha.)"""
    return (weights * (q_data - td_target).pow(2)).mean(-1).sum()


def cql_penalty(q_sampled, log_density, q_data, temperature: float):
    """Eq. 3's conservative term, unweighted: E_s[T logsumexp_a'(Q(s,a') / T) - Q(s,a)] for each
    critic, summed; a' are sampled and importance-weighted by their log-density:
    q_sampled [critics, batch, samples], log_density [batch, samples], q_data [critics, batch]."""
    out_of_distribution = temperature * torch.logsumexp((q_sampled - log_density) / temperature, dim=-1)
    return (out_of_distribution - q_data).mean(-1).sum()


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


def orthogonal_critic_init_(critic):
    """CORL's CQL critics: orthogonal weights (gain sqrt 2, the output layer's 1e-2), zero biases."""
    with torch.no_grad():
        for member in range(critic.out.weight.shape[0]):
            for layer in [*critic.hidden, critic.out]:
                nn.init.orthogonal_(layer.weight[member], gain=1e-2 if layer is critic.out else math.sqrt(2.0))
                layer.bias[member].zero_()


class ActorCritic(nn.Module):
    """What IQL and CQL share; subclasses set actor, qf, qf_target, optimizer, compute_losses and args."""

    def update(self, batch, weights, *extra):
        """One step on a batch (s, a, r, s', terminal) weighted by w; `extra`: what a subclass's losses add."""
        total_loss, metrics = self.compute_losses(*batch, weights, *extra)
        self.optimizer.zero_grad(set_to_none=True)
        total_loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            for target, online in zip(self.qf_target.parameters(), self.qf.parameters()):
                target.lerp_(online, self.args.tau)
        return metrics

    def load_pretrained(self, state_dict: dict):
        """Weights and Adam moments of a checkpoint; the learning rates stay this run's flags."""
        self.load_state_dict(state_dict["agent"])
        learning_rates = [group["lr"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state_dict["optimizer"])
        for group, lr in zip(self.optimizer.param_groups, learning_rates):
            group["lr"] = lr


class CQL(ActorCritic):
    """SAC-style CQL: tanh-Gaussian actor, twin Q (3x256), automatic entropy tuning, one optimizer."""

    METRICS = ("q_loss", "cql_penalty", "actor_loss", "q_values", "alpha")

    def __init__(self, obs_dim, act_dim, max_action, args: Args):
        super().__init__()
        self.actor = TanhGaussianActor(obs_dim, act_dim, args.hidden_dim, max_action)
        self.qf = TwinQ(obs_dim, act_dim, args.hidden_dim, n_hidden=3)
        orthogonal_critic_init_(self.qf)
        self.qf_target = TwinQ(obs_dim, act_dim, args.hidden_dim, n_hidden=3).requires_grad_(False)
        self.qf_target.load_state_dict(self.qf.state_dict())
        self.log_alpha = nn.Parameter(torch.zeros(()))
        self.register_buffer("cql_alpha", torch.tensor(args.cql_alpha))  # a tensor: changing it needs no recompile
        self.target_entropy = -float(act_dim) if args.target_entropy is None else args.target_entropy
        self.log_uniform_density = -act_dim * math.log(2.0 * max_action)
        self.max_action = max_action
        self.optimizer = torch.optim.Adam([
            {"params": self.actor.parameters(), "lr": args.actor_lr},
            {"params": self.qf.parameters(), "lr": args.critic_lr},
            {"params": [self.log_alpha], "lr": args.actor_lr},
        ], fused=True)
        self.compute_losses = torch.compile(self.losses) if args.compile else self.losses
        self.args = args

    def losses(self, obs, actions, rewards, next_obs, terminals, weights):
        """CQL's temperature, actor and critic losses, summed. One step on the sum equals CORL's three sequential
        updates because each loss reaches only its own parameter group, from parameters as they were before the step
        (the actor sees detached critic weights; TD target and sampled actions without gradient; alpha detached in
        the actor loss). An edit that lets a loss reach another network (Q(s, pi(s)) through the live critics)
        changes the algorithm. Batch B, n = --cql-n-actions, one actor pass and one critic pass, all at s as in CORL:
            sampled = [pi(s') | pi(s) x n | pi(s') x n]      rows B + 2Bn, no gradient
            q_all   = [data | uniform | pi(s) | pi(s')]      columns B + 3Bn, per critic
        """
        args, batch_size, n = self.args, obs.shape[0], self.args.cql_n_actions
        new_actions, log_prob = self.actor(obs)
        alpha_loss = entropy_temperature_loss(self.log_alpha, log_prob, self.target_entropy)
        alpha = self.log_alpha.exp().detach()
        frozen_critics = {name: p.detach() for name, p in self.qf.named_parameters()}
        q_new = torch.func.functional_call(self.qf, frozen_critics, (obs, new_actions)).min(0).values
        actor_loss = (alpha * log_prob - q_new).mean()

        with torch.no_grad():
            obs_n, next_obs_n = obs.repeat_interleave(n, 0), next_obs.repeat_interleave(n, 0)
            sampled, sampled_log_prob = self.actor(torch.cat([next_obs, obs_n, next_obs_n]))
            target_q = self.qf_target(next_obs, sampled[:batch_size]).min(0).values
            td_target = rewards + args.gamma * (1.0 - terminals) * target_q
            uniform = (torch.rand_like(sampled[batch_size:batch_size + batch_size * n]) * 2.0 - 1.0) * self.max_action
            log_density = torch.cat([torch.full_like(sampled_log_prob[:batch_size * n], self.log_uniform_density),
                                     sampled_log_prob[batch_size:]]).view(3, batch_size, n)
        q_all = self.qf(torch.cat([obs, obs_n, obs_n, obs_n]), torch.cat([actions, uniform, sampled[batch_size:]]))
        q_data = q_all[:, :batch_size]
        # [critic, set, state, sample] -> [critic, state, set x sample], as log_density
        q_sampled = q_all[:, batch_size:].view(2, 3, batch_size, n).permute(0, 2, 1, 3).reshape(2, batch_size, 3 * n)
        log_density = log_density.permute(1, 0, 2).reshape(batch_size, 3 * n)
        q_loss = cql_bellman_loss(q_data, td_target, weights)  # Eq. 7
        penalty = cql_penalty(q_sampled, log_density, q_data, args.cql_temperature)
        total_loss = q_loss + self.cql_alpha * penalty + actor_loss + alpha_loss
        metrics = [q_loss, penalty, actor_loss, q_data.mean(), alpha]
        return total_loss, torch.stack(metrics).detach()

    @torch.no_grad()
    def act(self, obs, deterministic: bool):
        return self.actor(obs, deterministic)[0]


class Agent(CQL):
    """CQL plus what fine-tuning adds: its online setting, and the adaptive behavior constraint's term when passed."""

    def start_online(self):
        """The conservative penalty stays during fine-tuning, with its online weight."""
        self.cql_alpha.fill_(self.args.cql_alpha if self.args.online_cql_alpha is None else self.args.online_cql_alpha)

    @torch.no_grad()
    def q_disagreement(self, obs, actions):
        """delta = |Q1 - Q2|(s, a): how much the twin critics disagree, the constraint's uncertainty signal."""
        return torch.sub(*self.qf(obs, actions)).abs()

    def behavior_constraint(self, obs, policy_actions, bc_actions, coef, scale):
        """The later paper's term, as we read it: lambda_t E_s[u(s) mean((pi(s) - pi_BC(s))^2)], and the mean gate u;
        u(s) = 1 - exp(-delta(s, pi(s)) / delta_0) without gradient."""
        gate = 1.0 - torch.exp(-self.q_disagreement(obs, policy_actions.detach()) / scale)
        return coef * (gate * (policy_actions - bc_actions).pow(2).mean(-1)).mean(), gate.mean()

    def losses(self, obs, actions, rewards, next_obs, terminals, weights, constraint=None):
        """Plus the constraint's term at pi's deterministic action; `constraint`: (pi_BC(s), lambda_t, delta_0)."""
        total_loss, metrics = super().losses(obs, actions, rewards, next_obs, terminals, weights)
        if constraint is not None:  # one more critic pass
            policy_actions = self.actor(obs, deterministic=True)[0]
            constraint_loss, gate_mean = self.behavior_constraint(obs, policy_actions, *constraint)
            total_loss = total_loss + constraint_loss
            metrics = torch.cat([metrics, torch.stack([constraint_loss, gate_mean]).detach()])
        return total_loss, metrics


# ===== The replay buffer: offline and online data, uniform or proportional (Eq. 10) sampling ================
class ReplayBuffer:
    """Transitions on the device with their w (Eq. 6) and rho (Eq. 10), fixed on entry (pi_BC is frozen); exact
    sampling P_i = rho_i / sum_j rho_j, O(log n), by a binary search in a float64 prefix sum of rho."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device, seed: int):
        def zeros(*shape, dtype=torch.float32):
            return torch.zeros(capacity, *shape, dtype=dtype, device=device)

        self.observations, self.next_observations = zeros(obs_dim), zeros(obs_dim)
        self.actions, self.rewards, self.terminals = zeros(act_dim), zeros(), zeros()
        self.weights, self.priorities = zeros(), zeros()
        self.priority_prefix_sum = zeros(dtype=torch.float64)
        self.capacity, self.size, self.device = capacity, 0, device
        self.generator = torch.Generator(device).manual_seed(seed)

    def add(self, obs, actions, rewards, next_obs, terminals, weights=1.0, priorities=1.0):
        start, end = self.size, self.size + len(rewards)
        assert end <= self.capacity, f"replay buffer overflow: {end} rows, capacity {self.capacity}"
        for column, value in ((self.observations, obs), (self.actions, actions), (self.rewards, rewards),
                              (self.next_observations, next_obs), (self.terminals, terminals),
                              (self.weights, weights), (self.priorities, priorities)):
            column[start:end] = torch.as_tensor(value, dtype=column.dtype, device=self.device)
        previous = self.priority_prefix_sum[start - 1] if start > 0 else 0.0
        self.priority_prefix_sum[start:end] = previous + torch.cumsum(self.priorities[start:end].double(), 0)
        self.size = end

    def sample(self, batch_size: int, prioritized: bool = False):
        """Indices and (s, a, r, s', terminal) of a batch, uniform or with P_i = rho_i / sum_j rho_j."""
        if prioritized:
            total = self.priority_prefix_sum[self.size - 1]
            u = torch.rand(batch_size, dtype=torch.float64, device=self.device, generator=self.generator) * total
            idx = torch.searchsorted(self.priority_prefix_sum[: self.size], u, right=True).clamp_(max=self.size - 1)
        else:
            idx = torch.randint(0, self.size, (batch_size,), device=self.device, generator=self.generator)
        return idx, (self.observations[idx], self.actions[idx], self.rewards[idx], self.next_observations[idx],
                     self.terminals[idx])


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


# ===== The run: offline pretraining, pi_BC, BAQ fine-tuning online ==========================================
def main(args: Args):
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()  # CQL: measured in docs/benchmark.md

    # --- data ---------------------------------------------------------------------------------
    data, context, make_env, ref_scores, max_action = load_offline_data(args.env_id)
    obs_dim, act_dim, n_offline = context["obs_dim"], context["act_dim"], len(data["rewards"])
    context.update(hidden_dim=args.hidden_dim, obs_norm_eps=args.obs_norm_eps)
    offline_checkpoint = args.offline_checkpoint and load_checkpoint(
        args.offline_checkpoint, "--offline-checkpoint", "offline", (ALGORITHM,), context)
    bc_checkpoint = args.bc_checkpoint and load_checkpoint(
        args.bc_checkpoint, "--bc-checkpoint", "bc", ("bc",), context)
    obs_mean, obs_std, reward_scale = data_statistics(data, args, offline_checkpoint)
    context.update(obs_mean=torch.as_tensor(obs_mean), obs_std=torch.as_tensor(obs_std), reward_scale=reward_scale)

    def normalize(obs):
        return (obs - obs_mean) / obs_std

    offline = [torch.as_tensor(column, dtype=torch.float32, device=device) for column in (
        normalize(data["observations"]), data["actions"], data["rewards"] * reward_scale,
        normalize(data["next_observations"]), data["terminals"])]  # (s, a, r, s', terminal)
    del data
    run_dir, writer = start_run(args, f"{n_offline} offline transitions, obs {obs_dim}, actions {act_dim}, "
                                      f"reward scale {reward_scale:.4g}, device {device}")
    agent = Agent(obs_dim, act_dim, max_action, args).to(device)
    eval_env = make_env(eval_env=True)

    def run_evaluation(prefix: str, step: int):
        returns, q_bias = evaluate(agent, eval_env, normalize, args.eval_episodes, args.seed + 10_000, args.gamma,
                                   reward_scale, device)
        log_evaluation(writer, prefix, step, ref_scores, returns, q_bias)

    # --- offline pretraining ------------------------------------------------------------------
    if offline_checkpoint:
        agent.load_pretrained(offline_checkpoint["state_dict"])
    else:
        metric_sum, start, unit_weights = 0, time.time(), torch.ones(args.batch_size, device=device)
        sampler = torch.Generator(device).manual_seed(args.seed)  # uniform batches of the offline data
        for step in tqdm(range(1, args.offline_steps + 1), f"offline {ALGORITHM.upper()}", unit="update",
                         mininterval=10):
            idx = torch.randint(0, n_offline, (args.batch_size,), device=device, generator=sampler)
            metric_sum += agent.update([column[idx] for column in offline], unit_weights)  # w = 1: plain CQL
            if step % args.log_every == 0 or step == args.offline_steps:
                count = step % args.log_every or args.log_every
                log_metrics(writer, "offline/losses/", Agent.METRICS, metric_sum, count, step)
                writer.add_scalar("offline/charts/SPS", int(step / (time.time() - start)), step)
                metric_sum.zero_()
            if (args.offline_eval_every and step % args.offline_eval_every == 0) or step == args.offline_steps:
                run_evaluation("offline/", step)
        save_checkpoint(os.path.join(run_dir, "offline.pt"), "offline", ALGORITHM,
                        {"agent": agent.state_dict(), "optimizer": agent.optimizer.state_dict()}, context, args)
    agent.start_online()

    # --- behavior-cloning reference pi_BC (Eq. 2) ---------------------------------------------
    if bc_checkpoint:
        bc_policy = GaussianPolicy(obs_dim, act_dim, args.hidden_dim, max_action).to(device)
        bc_policy.load_state_dict(bc_checkpoint["state_dict"])
    else:
        bc_policy = train_bc(offline[0], offline[1], max_action, args, writer)
        save_checkpoint(os.path.join(run_dir, "bc.pt"), "bc", "bc", bc_policy.state_dict(), context, args)
    bc_policy.requires_grad_(False).eval()

    # --- BAQ terms of the offline data: computed once, kept in the buffer ---------------------
    offline_divergence = bc_divergence(bc_policy, offline[0], offline[1])
    kq = (args.kq or offline_divergence.mean().item()) * args.kq_scale
    krho = args.krho or torch.sqrt(offline_divergence * act_dim).mean().item()

    def behavior_terms(divergence):
        weights = behavior_weight(divergence, kq) if args.weighted_loss else torch.ones_like(divergence)  # Eq. 6
        return weights, behavior_priority(divergence, act_dim, krho, args.priority_alpha)  # Eq. 10

    offline_w, offline_rho = behavior_terms(offline_divergence)
    offline_rho = offline_rho if args.offline_priorities else torch.ones_like(offline_rho)  # Sec. 4.3: offline rho = 1
    buffer = ReplayBuffer(n_offline + args.online_steps, obs_dim, act_dim, device, args.seed + 2)
    buffer.add(*offline, offline_w, offline_rho)  # online transitions follow them
    del offline
    reading = "every transition's (--offline-priorities)" if args.offline_priorities else "new transitions' only"
    summary = (f"k_q {kq:.4g}, k_rho {krho:.4g}, Eq. 10 priorities: {reading}; offline w mean {offline_w.mean():.3f} "
               f"(min {offline_w.min():.3f}), rho mean {offline_rho.mean():.3f} (max {offline_rho.max():.3f})")
    print(f"BAQ: {summary}")
    writer.add_text("baq", summary)

    # --- the adaptive behavior constraint: delta_0 over offline states, pi at the end of the offline phase ---
    if args.behavior_constraint:
        generator = torch.Generator(device).manual_seed(args.seed + 3)
        states = buffer.observations[torch.randperm(n_offline, device=device, generator=generator)[:65536]]
        delta_0 = agent.q_disagreement(states, agent.act(states, deterministic=True)).mean()
        scale, confident = delta_0.clamp(min=1e-6), torch.zeros((), device=device)
        print(f"behavior constraint: delta_0 {delta_0.item():.4g}, mean |Q1 - Q2| at pi(s) over {len(states)} states")

    # --- online fine-tuning -------------------------------------------------------------------
    torch.manual_seed(args.seed + 2)  # the same online phase whether the earlier phases ran or were loaded
    env = gym.wrappers.RecordEpisodeStatistics(make_env())
    obs, _ = env.reset(seed=args.seed)
    loss_tags = [f"losses/{name}" for name in Agent.METRICS]
    loss_tags += ["baq/constraint_loss", "baq/uncertainty_mean"] if args.behavior_constraint else []
    metric_sum, start = 0, time.time()
    for step in tqdm(range(args.online_steps), f"online {args.exp_name}", unit="step", mininterval=10):
        if step % args.eval_every == 0:
            run_evaluation("", step)
        state = torch.as_tensor(normalize(obs), dtype=torch.float32, device=device)[None]
        action = agent.act(state, deterministic=False)
        next_obs, reward, terminated, truncated, info = env.step(action[0].cpu().numpy())
        weight, priority = behavior_terms(bc_divergence(bc_policy, state, action))  # Eqs. 6, 10, once per transition
        buffer.add(state, action, [reward * reward_scale], normalize(next_obs)[None], [float(terminated)],
                   weight, priority)
        obs = next_obs
        if terminated or truncated:
            writer.add_scalar("charts/episodic_return", info["episode"]["r"], step + 1)
            writer.add_scalar("charts/episodic_length", info["episode"]["l"], step + 1)
            obs, _ = env.reset()

        idx, batch = buffer.sample(args.batch_size, prioritized=args.priority_sampling)  # Eq. 10: P_i ~ rho_i
        weights, online = buffer.weights[idx], idx >= n_offline
        constraint, constraint_tags = None, {}
        if args.behavior_constraint:  # n_conf counts this transition when the critics agree at pi(s)
            confident += (agent.q_disagreement(state, agent.act(state, deterministic=True)) < delta_0).sum()
            coef = args.constraint_coef / (1.0 + confident / args.constraint_half_life)  # lambda_t
            constraint = (bc_policy(batch[0]), coef, scale)
            constraint_tags = {"baq/constraint_coef": coef, "baq/confident_transitions": confident}
        metrics = agent.update(batch, weights, constraint)  # Eqs. 8, 9: the critic losses weighted by w
        logged = {**dict(zip(loss_tags, metrics)),
                  "baq/w_mean": weights.mean(), "baq/rho_mean": buffer.priorities[idx].mean(),
                  "baq/online_fraction": online.float().mean(), **constraint_tags,
                  "baq/online_weight_share": (weights * online).sum() / weights.sum()}  # of the weighted loss
        metric_sum = metric_sum + torch.stack(list(logged.values()))
        if (step + 1) % args.log_every == 0 or step + 1 == args.online_steps:
            log_metrics(writer, "", logged, metric_sum, (step + 1) % args.log_every or args.log_every, step + 1)
            writer.add_scalar("charts/SPS", int((step + 1) / (time.time() - start)), step + 1)
            metric_sum = 0
    run_evaluation("", args.online_steps)
    writer.close()  # before final.pt: a run with a final.pt has its whole curve on disk

    save_checkpoint(os.path.join(run_dir, "final.pt"), "final", ALGORITHM,
                    {"agent": agent.state_dict(), "optimizer": agent.optimizer.state_dict(),
                     "bc_policy": bc_policy.state_dict()},
                    context, args, kq=kq, krho=krho, online_updates=args.online_steps)
    print(f"done: {run_dir}")


# ===== PLUMBING: flags, the run directory, data, checkpoints ================================================
def fail(message: str):
    """Stop with one line (the input, the cause, the fix) and a non-zero exit."""
    raise SystemExit(f"error: {message}")


FLAG_DOMAINS = {  # interval: the numeric flags that must lie in it (NaN and inf never), see check_flags
    "[0, 2147483648)": ["seed"], "[0, 1)": ["gamma"], "(0, 1]": ["tau"],
    "[0, inf)": ["threads", "offline_steps", "bc_steps", "online_steps", "offline_eval_every", "cql_alpha",
                 "online_cql_alpha"],
    "[1, inf)": ["eval_every", "eval_episodes", "log_every", "batch_size", "hidden_dim", "cql_n_actions",
                 "constraint_half_life"],
    "(0, inf)": ["obs_norm_eps", "reward_scale", "bc_lr", "actor_lr", "critic_lr", "cql_temperature", "kq",
                 "kq_scale", "krho", "constraint_coef"],
    "[-10, 10]": ["priority_alpha"], "(-inf, inf)": ["target_entropy"],
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


def keep_freed_memory():
    """On a CPU, keep large freed blocks in glibc's heap instead of returning them to the OS, so that an update
    does not page-fault its activations in anew (CQL's are large: docs/benchmark.md)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to set
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD, at glibc's maximum
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD


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
    """Ctrl-C or SIGTERM: one line on what was saved and how a rerun skips it, exit 130."""
    skip = " ".join(f"--{kind}-checkpoint {path}" for path, kind in SAVED.items() if kind != "final")
    hint = (f"rerun the same command with {skip} to skip what finished" if skip else "the run had finished" if SAVED
            else "nothing was saved yet, so rerun the command to start again")
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
