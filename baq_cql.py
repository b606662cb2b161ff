# BAQ on CQL in one file: offline CQL pretraining, the behavior-cloning reference pi_BC, and Behavior
# Adaption Q-learning fine-tuning online, with evaluation, TensorBoard logging and checkpoints.
# Paper: "From Static to Dynamic: Leveraging Implicit Behavioral Models to Facilitate Transition in
# Offline-to-Online Reinforcement Learning" (BAQ).
#
# Where the paper's equations live:
#   Eq. 2         pi_BC's negative log-likelihood ......... train_bc
#   Eq. 6         the weight w(s,a) ....................... behavior_weight
#   Eq. 10        the priority rho and its sampling ....... behavior_priority, ReplayBuffer.sample
#   Eqs. 3, 7     CQL's critic loss, Bellman term weighted . cql_bellman_loss, cql_penalty, CQL.losses
#   In `main`, "Eq. N" marks where each one enters the run.
#
# To try another idea, edit above the PLUMBING banner: a new weight or priority (the BAQ section),
# another loss (CQL.losses; read its docstring first), the online loop (main). Below the banner
# nothing depends on the algorithm (errors, data loading, evaluation, checkpoints): leave it alone.
# Definitions that baq_cql.py, offline_pretrain.py or bc_pretrain.py also have are identical text in
# all of them (tests/test_copies.py checks it): change them everywhere at once.
import ctypes
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

ALGORITHM = "cql"


@dataclass
class Args:
    exp_name: Optional[str] = None
    """name of the experiment, in the run directory {runs_dir}/{env_id}__{exp_name}__{seed}__{time};
    default: the script and its variant (baq_cql, baq_cql-our-q, baq_cql-our-s, baq_cql-plain)"""
    env_id: str = "hopper-medium-v2"
    """the offline dataset: a D4RL name ({hopper,halfcheetah,walker2d}-{medium,medium-replay,medium-expert,
    expert,random}-v2) or any Minari dataset id (e.g. baq/hopper/medium-v0)"""
    seed: int = 1
    """seed of the experiment (python, numpy, torch, environments, replay sampling)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """use CUDA when it is available (otherwise the CPU, with a one-line note)"""
    compile: bool = False
    """torch.compile the losses. Off by default for CQL: on our 2-core CPU compiled updates ran 7.6 against
    8.3 updates/s eager in one measurement and 9.9 against 9.5 in another (within the drift), and compiling
    costs 20-60 s. Not measured on a GPU."""
    threads: int = 0
    """torch threads (0: torch's default, one per core); give 1 when other jobs share the cores: on our 2 cores
    beside a background job, a tiny CQL run took 2 minutes with 2 threads and 5.6 s with 1"""
    runs_dir: str = "runs"
    """directory under which the run directory (TensorBoard events and checkpoints) is created"""

    # phases
    offline_steps: int = 1_000_000
    """offline gradient updates (skipped with --offline-checkpoint)"""
    bc_steps: int = 100_000
    """gradient updates of the behavior-cloning reference pi_BC (skipped with --bc-checkpoint; 0 leaves
    pi_BC at its random initialization)"""
    online_steps: int = 30_000
    """online environment steps of fine-tuning, one gradient update each (the paper's Table 1 budget)"""
    offline_checkpoint: Optional[str] = None
    """an `offline.pt` of an earlier run of this algorithm on the same dataset: skips offline pretraining
    (its weights and Adam moments are loaded; the learning rates are this run's flags)"""
    bc_checkpoint: Optional[str] = None
    """a `bc.pt` of an earlier run on the same dataset: skips behavior cloning"""

    # evaluation and logging
    eval_every: int = 5_000
    """evaluate every this many online steps (and at online step 0, the offline policy)"""
    offline_eval_every: int = 100_000
    """evaluate every this many offline updates (0: only at the end of the offline phase)"""
    eval_episodes: int = 10
    """deterministic episodes per evaluation"""
    log_every: int = 1_000
    """write losses and BAQ statistics every this many updates (averaged over them)"""

    # shared hyperparameters
    batch_size: int = 256
    """batch size of every gradient update"""
    gamma: float = 0.99
    """discount factor, in [0, 1)"""
    tau: float = 0.005
    """target network soft-update rate, in (0, 1]"""
    hidden_dim: int = 256
    """width of every hidden layer"""
    obs_norm_eps: float = 1e-3
    """added to the dataset's observation std for state normalization"""
    reward_scale: Optional[float] = 1.0
    """multiplies every reward (CORL's CQL: 1 on locomotion); None: 1000 / (max - min episode return of the
    dataset)"""
    bc_lr: float = 3e-4
    """learning rate of pi_BC"""

    # CQL
    actor_lr: float = 3e-5
    """actor learning rate (also the entropy temperature's)"""
    critic_lr: float = 3e-4
    """twin Q learning rate"""
    cql_alpha: float = 10.0
    """weight of the conservative penalty (Eq. 3's alpha, with the TD term as a plain mean squared error like
    CORL's: under Adam this equals Eq. 3 with alpha/2)"""
    online_cql_alpha: Optional[float] = None
    """weight of the conservative penalty during fine-tuning (default: --cql-alpha)"""
    cql_n_actions: int = 10
    """sampled actions per state in each of the penalty's three action sets (uniform, pi(.|s), pi(.|s'))"""
    cql_temperature: float = 1.0
    """temperature of the penalty's log-sum-exp"""
    target_entropy: Optional[float] = None
    """entropy target of the automatic temperature tuning (default: -|A|)"""

    # BAQ
    weighted_loss: bool = True
    """weight the Bellman term of the critic loss by w(s,a) (Eqs. 6, 7); alone: the paper's Our-Q"""
    priority_sampling: bool = True
    """sample transitions proportionally to rho (Eq. 10); alone: the paper's Our-S"""
    kq: Optional[float] = None
    """k_q of Eq. 6; default: the offline dataset's mean of mean((pi_BC(s)-a)^2), so that a typical offline
    transition has w = exp(-1)"""
    kq_scale: float = 1.0
    """multiplies k_q (the default or --kq): > 1 weakens the weight, w -> 1"""
    krho: Optional[float] = None
    """k_rho of Eq. 10; default: the offline mean of ||pi_BC(s)-a|| (rho = 2^alpha at a typical offline divergence)"""
    priority_alpha: float = 1.0
    """alpha of Eq. 10, in [-10, 10] (0: uniform sampling; negative: transitions near pi_BC are sampled more)"""
    offline_priorities: bool = False
    """give the offline data Eq. 10's rho too, per "the sampling probability of each transition in the replay
    buffer" (Sec. 4.3); default: offline rho = 1, per "the priority of a new transition ... is calculated as" """

    # the adaptive behavior constraint of the later paper (off: the paper's Table 1 method)
    behavior_constraint: bool = False
    """add lambda_t E_s[u(s) mean((pi(s) - pi_BC(s))^2)] to the actor loss online: u(s) = 1 - exp(-delta / delta_0),
    delta = |Q1 - Q2|(s, pi(s)), delta_0 its mean over offline states when fine-tuning starts"""
    constraint_coef: float = 30.0
    """lambda_0, the constraint's weight when fine-tuning starts. 30: the weight at which its gradient on the actor
    equals the actor loss's at the start of fine-tuning (hopper-medium after 10,000 offline CQL updates: median 35.8,
    quartiles 31.2-42.2, benchmark/constraint_scale.py); at 1 it was 2.7% of the actor's pull"""
    constraint_half_life: int = 5_000
    """n_half of lambda_t = lambda_0 / (1 + n_conf / n_half), n_conf the online transitions collected where
    delta(s, pi(s)) < delta_0: lambda_t halves once n_half confident transitions have come, and stays while
    online experience stays uncertain"""

    def __post_init__(self):
        check_flags(self)
        if self.exp_name is None:
            variant = {(True, True): "", (True, False): "-our-q", (False, True): "-our-s", (False, False): "-plain"}
            self.exp_name = f"baq_{ALGORITHM}" + variant[self.weighted_loss, self.priority_sampling]
            self.exp_name += "-adaptive" if self.behavior_constraint else ""


# =============================================================================================
# BAQ: pi_BC (Eq. 2), the weight w (Eq. 6) and the priority rho (Eq. 10)
# =============================================================================================
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


def set_offline_behavior_terms(buffer, weights, priorities):
    """The offline transitions entered the buffer before pi_BC existed; give them their w and rho."""
    buffer.weights[: buffer.size] = weights
    buffer.priorities[: buffer.size] = priorities
    buffer.priority_prefix_sum[: buffer.size] = torch.cumsum(buffer.priorities[: buffer.size].double(), 0)


def constraint_coefficient(coef: float, confident, half_life: int):
    """lambda_t = lambda_0 / (1 + n_conf / n_half): never increases, since n_conf (the online transitions
    collected where the critics agreed better than on the offline data) only grows."""
    return coef / (1.0 + confident / half_life)


def train_bc(observations, actions, max_action: float, args: Args, writer):
    """Eq. 2: pi_BC = argmin E_(s,a)~D[-log pi(a|s)] on the offline dataset's (normalized) states and
    actions. Its own seed streams make pi_BC the same whether or not an offline phase ran before it,
    and the same in every script."""
    device = observations.device
    torch.manual_seed(args.seed)
    generator = torch.Generator(device).manual_seed(args.seed + 1)
    bc_policy = GaussianPolicy(observations.shape[1], actions.shape[1], args.hidden_dim, max_action).to(device)
    optimizer = torch.optim.Adam(bc_policy.parameters(), lr=args.bc_lr)
    loss_sum, start = torch.zeros((), device=device), time.time()
    for step in progress(range(1, args.bc_steps + 1), "pi_BC (Eq. 2)", "update"):
        idx = torch.randint(0, len(observations), (args.batch_size,), device=device, generator=generator)
        loss = -bc_policy.log_prob(observations[idx], actions[idx]).mean()  # Eq. 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
        if step % args.log_every == 0 or step == args.bc_steps:
            count = step % args.log_every or args.log_every
            writer.add_scalar("bc/loss", (loss_sum / count).item(), step)
            writer.add_scalar("bc/mse", bc_divergence(bc_policy, observations[idx], actions[idx]).mean().item(), step)
            writer.add_scalar("bc/SPS", int(step / (time.time() - start)), step)
            loss_sum.zero_()
    return bc_policy


# =============================================================================================
# CQL with the BAQ weights (Eq. 7)
# =============================================================================================
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


def orthogonal_critic_init_(critic):
    """CORL's CQL critics: orthogonal weights (gain sqrt 2, the output layer's 1e-2), zero biases."""
    with torch.no_grad():
        for member in range(critic.out.weight.shape[0]):
            for layer in [*critic.hidden, critic.out]:
                nn.init.orthogonal_(layer.weight[member], gain=1e-2 if layer is critic.out else math.sqrt(2.0))
                layer.bias[member].zero_()


class ActorCritic(nn.Module):
    """What IQL and CQL share: one gradient step on the summed losses (see their `losses`), the soft
    update of the target critics, pretrained weights loaded under this run's learning rates, and the
    Q-value used by evaluation. Subclasses set actor, qf, qf_target, optimizer, compute_losses, args."""

    def update(self, batch, weights, constraint=None):
        """One gradient step on a batch (s, a, r, s', terminal) with per-transition weights w; `constraint`
        (pi_BC's actions on the batch, lambda_t, delta_0) adds the adaptive behavior constraint."""
        total_loss, metrics = self.compute_losses(*batch, weights, constraint)
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

    @torch.no_grad()
    def q_value(self, obs, actions):
        return self.qf(obs, actions).min(0).values

    @torch.no_grad()
    def q_disagreement(self, obs, actions):
        """delta = |Q1 - Q2|(s, a): how much the twin critics disagree, the constraint's uncertainty signal."""
        qs = self.qf(obs, actions)
        return (qs[0] - qs[1]).abs()

    def behavior_constraint(self, obs, policy_actions, bc_actions, coef, scale):
        """The adaptive behavior constraint (this project's reading of the later paper's dual objective):
        lambda_t E_s[u(s) mean((pi(s) - pi_BC(s))^2)], with the gate u(s) = 1 - exp(-delta(s, pi(s)) / delta_0)
        in [0, 1) growing with the critics' disagreement. The gate is computed without gradient, so the term
        reaches only the actor. Returns the term and the batch's mean gate."""
        gate = 1.0 - torch.exp(-self.q_disagreement(obs, policy_actions.detach()) / scale)
        return coef * (gate * (policy_actions - bc_actions).pow(2).mean(-1)).mean(), gate.mean()


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

    def start_online(self):
        """The conservative penalty stays during fine-tuning, with its online weight."""
        self.cql_alpha.fill_(self.args.cql_alpha if self.args.online_cql_alpha is None else self.args.online_cql_alpha)

    def losses(self, obs, actions, rewards, next_obs, terminals, weights, constraint=None):
        """CQL's temperature, actor and critic losses, summed, with the behavior constraint's actor term
        when given. One backward pass and one Adam step on the sum equal the peer's (CORL's) three
        sequential updates, because every loss is built from the parameters as they were before this step
        and reaches only its own parameter group: the actor sees the critics through detached weights,
        the TD target and the penalty's sampled actions are computed without gradient, alpha enters the
        actor loss detached, and the constraint's gate is computed without gradient. An edit that lets a
        loss reach another network's parameters (e.g. Q(s, pi(s)) through the live critics) silently
        changes the algorithm: detach it, or step it separately.

        Layout, batch B and n = --cql-n-actions (every sampled action in one actor pass, every Q in one
        critic pass, all at s as in CORL):
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
        if constraint is not None:  # at the actor's deterministic action
            policy_actions = self.actor(obs, deterministic=True)[0]
            constraint_loss, gate_mean = self.behavior_constraint(obs, policy_actions, *constraint)
            total_loss, metrics = total_loss + constraint_loss, metrics + [constraint_loss, gate_mean]
        return total_loss, torch.stack(metrics).detach()

    @torch.no_grad()
    def act(self, obs, deterministic: bool):
        return self.actor(obs, deterministic)[0]


Agent = CQL


# =============================================================================================
# The replay buffer: offline and online data, uniform or proportional (Eq. 10) sampling
# =============================================================================================
class ReplayBuffer:
    """Offline and online transitions in one preallocated buffer on the device, each with its weight w
    (Eq. 6) and priority rho (Eq. 10). pi_BC is frozen and a stored action never changes, so w and rho
    are fixed when a transition enters. Proportional sampling, P_i = rho_i / sum_j rho_j, is then exact
    and O(log n) per sample: an append-only float64 prefix sum of rho and a binary search, with no pass
    over the buffer per update."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device, seed: int):
        def zeros(*shape, dtype=torch.float32):
            return torch.zeros(capacity, *shape, dtype=dtype, device=device)

        self.observations, self.next_observations = zeros(obs_dim), zeros(obs_dim)
        self.actions, self.rewards, self.terminals = zeros(act_dim), zeros(), zeros()
        self.weights, self.priorities = zeros(), zeros()
        self.priority_prefix_sum = zeros(dtype=torch.float64)
        self.capacity, self.size, self.device = capacity, 0, device
        self.generator = torch.Generator(device).manual_seed(seed)

    def add(self, obs, actions, rewards, next_obs, terminals, weights, priorities):
        n, start = len(rewards), self.size
        if start + n > self.capacity:
            raise ValueError(f"replay buffer overflow: {start} + {n} > capacity {self.capacity}")
        end = start + n
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


# =============================================================================================
# The run: offline pretraining, pi_BC, BAQ fine-tuning online
# =============================================================================================
def main(args: Args):
    device = seed_and_pick_device(args)
    if device.type == "cpu":
        # alternating runs on our 2-core CPU: CQL 7.9 and 6.4 updates/s with it, 6.3 and 5.8 without;
        # IQL gains nothing (126, 126, 154 against 124, 136, 155), so IQL runs do not call it
        keep_freed_memory()

    # --- data ---------------------------------------------------------------------------------
    data, make_env, ref_scores, max_action = load_offline_data(args.env_id)
    obs_dim, act_dim, n_offline = data["observations"].shape[1], data["actions"].shape[1], len(data["rewards"])
    context = {"dataset_id": args.env_id, "obs_dim": obs_dim, "act_dim": act_dim, "hidden_dim": args.hidden_dim}
    offline_checkpoint = bc_checkpoint = None
    if args.offline_checkpoint:
        offline_checkpoint = load_checkpoint(args.offline_checkpoint, "--offline-checkpoint", "offline", (ALGORITHM,),
                                             context)
    if args.bc_checkpoint:
        bc_checkpoint = load_checkpoint(args.bc_checkpoint, "--bc-checkpoint", "bc", ("bc",), context)
    obs_mean, obs_std, reward_scale = data_statistics(data, args, offline_checkpoint, bc_checkpoint)
    context.update(obs_mean=torch.as_tensor(obs_mean), obs_std=torch.as_tensor(obs_std), reward_scale=reward_scale)

    def normalize(obs):
        return (obs - obs_mean) / obs_std

    buffer = ReplayBuffer(n_offline + args.online_steps, obs_dim, act_dim, device, args.seed)
    ones = np.ones(n_offline, dtype=np.float32)  # w and rho of the offline data, until pi_BC exists
    buffer.add(normalize(data["observations"]), data["actions"], data["rewards"] * reward_scale,
               normalize(data["next_observations"]), data["terminals"], ones, ones)
    del data
    run_dir, writer = start_run(args, f"{n_offline} offline transitions, obs {obs_dim}, actions {act_dim}, "
                                      f"reward scale {reward_scale:.4g}, device {device}", ref_scores)
    agent = Agent(obs_dim, act_dim, max_action, args).to(device)
    eval_env = make_env(eval_env=True)
    eval_env.action_space.seed(args.seed)

    def run_evaluation(prefix: str, step: int):
        returns, q_bias = evaluate(agent, eval_env, normalize, args.eval_episodes, args.seed + 10_000, args.gamma,
                                   reward_scale, device)
        log_evaluation(writer, prefix, step, ref_scores, returns, q_bias)

    # --- offline pretraining ------------------------------------------------------------------
    if offline_checkpoint:
        agent.load_pretrained(offline_checkpoint["state_dict"])
        print(f"offline phase skipped: loaded {args.offline_checkpoint}")
    else:
        metric_sum, start = torch.zeros(len(Agent.METRICS), device=device), time.time()
        unit_weights = torch.ones(args.batch_size, device=device)  # offline, w = 1: plain CQL
        for step in progress(range(1, args.offline_steps + 1), f"offline {ALGORITHM.upper()}", "update"):
            metric_sum += agent.update(buffer.sample(args.batch_size)[1], unit_weights)
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
        print(f"BC phase skipped: loaded {args.bc_checkpoint}")
    else:
        bc_policy = train_bc(buffer.observations[:n_offline], buffer.actions[:n_offline], max_action, args, writer)
        save_checkpoint(os.path.join(run_dir, "bc.pt"), "bc", "bc", bc_policy.state_dict(), context, args)
    bc_policy.requires_grad_(False).eval()

    # --- BAQ terms of the offline data: computed once, kept in the buffer ---------------------
    offline_divergence = bc_divergence(bc_policy, buffer.observations[:n_offline], buffer.actions[:n_offline])
    kq = (args.kq or offline_divergence.mean().item()) * args.kq_scale
    krho = args.krho or torch.sqrt(offline_divergence * act_dim).mean().item()

    def behavior_terms(divergence):
        weights = behavior_weight(divergence, kq) if args.weighted_loss else torch.ones_like(divergence)  # Eq. 6
        return weights, behavior_priority(divergence, act_dim, krho, args.priority_alpha)  # Eq. 10

    offline_w, offline_rho = behavior_terms(offline_divergence)
    if not args.offline_priorities:  # Sec. 4.3: Eq. 10 prices a new transition; the offline data keeps rho = 1
        offline_rho = torch.ones_like(offline_rho)
    set_offline_behavior_terms(buffer, offline_w, offline_rho)
    reading = "every transition's (--offline-priorities)" if args.offline_priorities else "new transitions' only"
    summary = (f"k_q {kq:.4g}, k_rho {krho:.4g}, alpha {args.priority_alpha}, Eq. 10 priorities: {reading}; "
               f"offline data: w mean {offline_w.mean():.3f} (min {offline_w.min():.3f}), "
               f"rho mean {offline_rho.mean():.3f} (max {offline_rho.max():.3f})")
    print(f"BAQ: {summary}")
    writer.add_text("baq", summary)

    # --- the adaptive behavior constraint: delta_0 over offline states, pi at the end of the offline phase ---
    if args.behavior_constraint:
        generator = torch.Generator(device).manual_seed(args.seed + 3)
        states = buffer.observations[torch.randperm(n_offline, device=device, generator=generator)[:65536]]
        offline_disagreement = agent.q_disagreement(states, agent.act(states, deterministic=True)).mean()
        scale, confident = offline_disagreement.clamp(min=1e-6), torch.zeros((), device=device)
        print(f"behavior constraint: lambda_0 {args.constraint_coef}, n_half {args.constraint_half_life}, "
              f"delta_0 {offline_disagreement.item():.4g} (|Q1 - Q2| at pi(s), mean over {len(states)} offline states)")

    # --- online fine-tuning -------------------------------------------------------------------
    torch.manual_seed(args.seed + 2)  # the same online phase whether the earlier phases ran or were loaded
    buffer.generator.manual_seed(args.seed + 2)
    env = make_env()
    env.action_space.seed(args.seed)
    obs, _ = env.reset(seed=args.seed)
    episode_return, episode_length = 0.0, 0
    constraint_tags = ["baq/constraint_loss", "baq/uncertainty_mean"] if args.behavior_constraint else []
    metric_tags = [f"losses/{name}" for name in Agent.METRICS] + constraint_tags + [
        "baq/w_mean", "baq/rho_mean", "baq/online_fraction", "baq/online_weight_share"]
    metric_tags += ["baq/constraint_coef", "baq/confident_transitions"] if args.behavior_constraint else []
    metric_sum, start = torch.zeros(len(metric_tags), device=device), time.time()
    for step in progress(range(args.online_steps), f"online {args.exp_name}", "step"):
        if step % args.eval_every == 0:
            run_evaluation("", step)
        state = torch.as_tensor(normalize(obs), dtype=torch.float32, device=device)[None]
        action = agent.act(state, deterministic=False)
        next_obs, reward, terminated, truncated, _ = env.step(action[0].cpu().numpy())
        weight, priority = behavior_terms(bc_divergence(bc_policy, state, action))  # Eqs. 6, 10, once per transition
        buffer.add(state, action, [reward * reward_scale], normalize(next_obs)[None], [float(terminated)],
                   weight, priority)
        episode_return, episode_length = episode_return + reward, episode_length + 1
        obs = next_obs
        if terminated or truncated:
            writer.add_scalar("charts/episodic_return", episode_return, step + 1)
            writer.add_scalar("charts/episodic_length", episode_length, step + 1)
            obs, _ = env.reset()
            episode_return, episode_length = 0.0, 0

        idx, batch = buffer.sample(args.batch_size, prioritized=args.priority_sampling)  # Eq. 10: P_i ~ rho_i
        weights, online = buffer.weights[idx], idx >= n_offline
        constraint, constraint_terms = None, []
        if args.behavior_constraint:  # n_conf counts this transition when the critics agree at pi(s)
            disagreement = agent.q_disagreement(state, agent.act(state, deterministic=True))
            confident += (disagreement < offline_disagreement).sum()
            coef = constraint_coefficient(args.constraint_coef, confident, args.constraint_half_life)
            constraint, constraint_terms = (bc_policy(batch[0]), coef, scale), [coef, confident]
        metrics = agent.update(batch, weights, constraint)  # Eq. 7: the Bellman term weighted by w
        batch_terms = torch.stack([weights.mean(), buffer.priorities[idx].mean(), online.float().mean(),
                                   (weights * online).sum() / weights.sum()])  # the online share of the weighted loss
        metric_sum += torch.cat([metrics, batch_terms, torch.stack(constraint_terms)]) if constraint_terms else \
            torch.cat([metrics, batch_terms])
        if (step + 1) % args.log_every == 0 or step + 1 == args.online_steps:
            log_metrics(writer, "", metric_tags, metric_sum, (step + 1) % args.log_every or args.log_every, step + 1)
            writer.add_scalar("charts/SPS", int((step + 1) / (time.time() - start)), step + 1)
            metric_sum.zero_()
    run_evaluation("", args.online_steps)

    save_checkpoint(os.path.join(run_dir, "final.pt"), "final", ALGORITHM,
                    {"agent": agent.state_dict(), "optimizer": agent.optimizer.state_dict(),
                     "bc_policy": bc_policy.state_dict()},
                    context, args, kq=kq, krho=krho, online_updates=args.online_steps)
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


def keep_freed_memory():
    """glibc returns freed blocks above its mmap threshold to the OS, so on a CPU every update
    page-faults its large activations in anew; keep them in the heap."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            return
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD, at glibc's maximum
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD


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
