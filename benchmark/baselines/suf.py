# SUF (Feng et al., AAAI 2024) as the BAQ paper compares it: unconstrained online fine-tuning of an IQL or
# CQL `offline.pt` (offline_pretrain.py), stabilised by the update-to-data ratio alone, no Q-ensemble:
#   - G critic updates per environment step (--critic-updates, default 10) ...... main
#   - a delayed actor: one actor update after every d-th critic update (--actor-delay, default 2, so five
#     actor updates per environment step) ...... main
# SUF has no public code and the numbers are not in what we could read of it: G = 10 is SO2's ratio, so
# the two baselines differ by SO2's perturbation and the actor's rate; d = 2 is TD3's policy delay.
# CQL: fine-tuned with SAC's losses (no conservative penalty online: "unconstrained") ...... FineTuneCQL
# IQL: its own losses (they use only the data's actions) ...... FineTuneIQL
#
# Evaluation, TensorBoard tags, checkpoints and data loading are the BAQ scripts' (identical text,
# tests/test_copies.py checks it), so SUF's runs overlay BAQ's in TensorBoard and report.py reads them.
#
#   python benchmark/baselines/suf.py --env-id baq/hopper/medium-v0 --offline-checkpoint runs/.../offline.pt
import math
import os
import random
import re
import socket
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    offline_checkpoint: Optional[str] = None
    """the `offline.pt` to fine-tune (offline_pretrain.py, or the offline phase of baq_iql.py/baq_cql.py);
    required unless --resume is given"""
    algo: Optional[Literal["iql", "cql"]] = None
    """the backbone; default: the checkpoint's (given, it must match the checkpoint)"""
    exp_name: Optional[str] = None
    """name of the experiment, in the run directory {runs_dir}/{env_id}__{exp_name}__{seed}__{time};
    default: suf_iql or suf_cql"""
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
    checkpoint_every: int = 5_000
    """write the resumable checkpoint `resume.pt` at the first episode end after every this many online steps
    (0: never)"""
    resume: Optional[str] = None
    """a `resume.pt` of this script: continue that run exactly where it stopped, with its own arguments (only
    --stop-after and --cuda may change)"""
    stop_after: int = 0
    """write `resume.pt` and stop at the first episode end after this many online steps of this command (0: run
    to --online-steps); for runs longer than a session"""

    # SUF
    critic_updates: int = 10
    """G: critic updates per environment step (the update-to-data ratio)"""
    actor_delay: int = 2
    """d: one actor update after every d-th critic update"""

    # the backbone's hyperparameters (the BAQ scripts' defaults)
    batch_size: int = 256
    """batch size of every gradient update"""
    gamma: float = 0.99
    """discount factor, in [0, 1)"""
    tau: float = 0.005
    """target network soft-update rate, in (0, 1]"""
    hidden_dim: int = 256
    """width of every hidden layer (must match the checkpoint's)"""
    actor_lr: Optional[float] = None
    """actor learning rate; default: IQL 3e-4, CQL 3e-5 (also the entropy temperature's)"""
    critic_lr: float = 3e-4
    """twin Q learning rate"""
    value_lr: float = 3e-4
    """IQL: V learning rate"""
    expectile: float = 0.7
    """IQL: expectile tau of the value loss (Eq. 4), in (0, 1)"""
    beta: float = 3.0
    """IQL: inverse temperature of the advantage-weighted regression"""
    exp_adv_max: float = 100.0
    """IQL: clip of exp(beta * advantage)"""
    target_entropy: Optional[float] = None
    """CQL: entropy target of the automatic temperature tuning (default: -|A|)"""

    def __post_init__(self):
        check_flags(self)


METHOD = "suf"


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


class FineTuneIQL(FineTuningAgent):
    """IQL as baq_iql.py builds it (same networks, parameter names and optimizer groups, so an IQL
    offline.pt loads unchanged), its losses split into the critic part (V and Q) and the actor part.
    With target_noise (SO2), V's expectile target is evaluated at perturbed data actions; the actor's
    advantage keeps the clean ones."""

    CRITIC_METRICS = ("q_loss", "value_loss", "q_values")
    ACTOR_METRICS = ("actor_loss",)

    def __init__(self, obs_dim, act_dim, max_action, args, target_noise=(0.0, 0.0)):
        super().__init__()
        self.actor = GaussianPolicy(obs_dim, act_dim, args.hidden_dim, max_action)
        self.qf = TwinQ(obs_dim, act_dim, args.hidden_dim)
        self.qf_target = TwinQ(obs_dim, act_dim, args.hidden_dim).requires_grad_(False)
        self.vf = mlp(obs_dim, 1, args.hidden_dim, n_hidden=2)
        self.optimizer = torch.optim.Adam([
            {"params": self.actor.parameters(), "lr": args.actor_lr},
            {"params": self.qf.parameters(), "lr": args.critic_lr},
            {"params": self.vf.parameters(), "lr": args.value_lr},
        ], fused=True)
        self.compute_critic_loss = torch.compile(self.critic_loss) if args.compile else self.critic_loss
        self.compute_actor_loss = torch.compile(self.actor_loss) if args.compile else self.actor_loss
        self.target_noise, self.max_action, self.args = target_noise, max_action, args

    def critic_loss(self, obs, actions, rewards, next_obs, terminals):
        """Eq. 4 for V (expectile regression to the target critic, at a perturbed action under SO2) and
        IQL's Q loss r + gamma V(s'), every w = 1."""
        with torch.no_grad():
            value_actions = perturbed_actions(actions, *self.target_noise, self.max_action) \
                if self.target_noise[0] > 0 else actions
            target_q = self.qf_target(obs, value_actions).min(0).values
            next_v = self.vf(next_obs).squeeze(-1)
        v = self.vf(obs).squeeze(-1)
        value_loss = iql_value_loss(target_q, v, 1.0, self.args.expectile)
        qs = self.qf(obs, actions)
        q_loss = iql_q_loss(qs, rewards, terminals, next_v, 1.0, self.args.gamma)
        return value_loss + q_loss, torch.stack([q_loss, value_loss, qs.mean()]).detach()

    def actor_loss(self, obs, actions, rewards, next_obs, terminals):
        """IQL's advantage-weighted regression on the batch's actions."""
        with torch.no_grad():
            advantage = self.qf_target(obs, actions).min(0).values - self.vf(obs).squeeze(-1)
        loss = iql_actor_loss(self.actor.log_prob(obs, actions), advantage, self.args.beta, self.args.exp_adv_max)
        return loss, loss.detach()[None]

    @torch.no_grad()
    def act(self, obs, deterministic: bool):
        return self.actor(obs) if deterministic else self.actor.sample(obs)


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


FINE_TUNING_AGENTS = {"iql": FineTuneIQL, "cql": FineTuneCQL}


# =============================================================================================
# The replay buffer (the BAQ scripts' own; every w and rho is 1: uniform replay)
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
# The run: SUF fine-tuning online from the offline checkpoint
# =============================================================================================
def main(args: Args):
    resume = None
    if args.resume:  # the run goes on with its own arguments
        resume, args = resumed_args(args, Args, METHOD)
    elif args.offline_checkpoint is None:
        fail("--offline-checkpoint is missing: pass the `offline.pt` to fine-tune (offline_pretrain.py, or the offline "
             "phase of baq_iql.py/baq_cql.py), or --resume with a `resume.pt` of this script.")
    device = seed_and_pick_device(args)
    data, make_env, ref_scores, max_action = load_offline_data(args.env_id)
    obs_dim, act_dim, n_offline = data["observations"].shape[1], data["actions"].shape[1], len(data["rewards"])
    context = {"dataset_id": args.env_id, "obs_dim": obs_dim, "act_dim": act_dim, "hidden_dim": args.hidden_dim}
    checkpoint = resume or load_checkpoint(args.offline_checkpoint, "--offline-checkpoint", "offline",
                                           (args.algo,) if args.algo else ("iql", "cql"), context)
    args.algo = checkpoint["algorithm"]
    args.actor_lr = args.actor_lr or {"iql": 3e-4, "cql": 3e-5}[args.algo]
    args.exp_name = args.exp_name or f"{METHOD}_{args.algo}"
    obs_mean, obs_std, reward_scale = data_statistics(data, args, checkpoint, None)
    context.update(obs_mean=torch.as_tensor(obs_mean), obs_std=torch.as_tensor(obs_std), reward_scale=reward_scale)

    def normalize(obs):
        return (obs - obs_mean) / obs_std

    buffer = ReplayBuffer(n_offline + args.online_steps, obs_dim, act_dim, device, args.seed)
    ones = np.ones(n_offline, dtype=np.float32)  # w = rho = 1: plain uniform replay of offline and online data
    buffer.add(normalize(data["observations"]), data["actions"], data["rewards"] * reward_scale,
               normalize(data["next_observations"]), data["terminals"], ones, ones)
    del data
    if resume:
        sizes = (obs_dim, act_dim, n_offline)
        start_step, run_dir, writer = continue_run(args.resume, resume, sizes, args.online_steps, "online step")
    else:
        start_step, (run_dir, writer) = 0, start_run(args, f"{METHOD.upper()} on {args.algo.upper()} from "
                                                           f"{args.offline_checkpoint}, {n_offline} offline "
                                                           f"transitions, device {device}", ref_scores)
    agent = FINE_TUNING_AGENTS[args.algo](obs_dim, act_dim, max_action, args).to(device)
    agent.load_pretrained(checkpoint["state_dict"])
    eval_env = make_env(eval_env=True)
    eval_env.action_space.seed(args.seed)

    def run_evaluation(step: int):
        returns, q_bias = evaluate(agent, eval_env, normalize, args.eval_episodes, args.seed + 10_000, args.gamma,
                                   reward_scale, device)
        log_evaluation(writer, "", step, ref_scores, returns, q_bias)

    # --- online fine-tuning: G critic updates per environment step, an actor update every d-th ---------
    torch.manual_seed(args.seed + 2)
    buffer.generator.manual_seed(args.seed + 2)
    env = make_env()
    env.action_space.seed(args.seed)
    obs, _ = env.reset(seed=args.seed)
    episode_return, episode_length, saved_at = 0.0, 0, start_step
    critic_sum = torch.zeros(len(agent.CRITIC_METRICS), device=device)
    actor_sum = torch.zeros(len(agent.ACTOR_METRICS), device=device)
    counts = {"critic_updates": 0, "actor_updates": 0, "logged_critic": 0, "logged_actor": 0}
    if resume:  # where resume.pt was written: an episode's start, with every random state as it was
        obs = restore_online_phase(resume, buffer, env, critic_sum, actor_sum, counts)
    else:
        run_evaluation(0)
    start = time.time()
    for step in progress(range(start_step, args.online_steps), f"online {args.exp_name}", "step"):
        state = torch.as_tensor(normalize(obs), dtype=torch.float32, device=device)[None]
        action = agent.act(state, deterministic=False)
        next_obs, reward, terminated, truncated, _ = env.step(action[0].cpu().numpy())
        buffer.add(state, action, [reward * reward_scale], normalize(next_obs)[None], [float(terminated)], [1.0], [1.0])
        episode_return, episode_length = episode_return + reward, episode_length + 1
        obs = next_obs
        if terminated or truncated:
            writer.add_scalar("charts/episodic_return", episode_return, step + 1)
            writer.add_scalar("charts/episodic_length", episode_length, step + 1)
            env_random_state = env.np_random.bit_generator.state  # what the reset draws from: kept for resume.pt
            obs, _ = env.reset()
            episode_return, episode_length = 0.0, 0

        for _ in range(args.critic_updates):  # SUF: the update-to-data ratio G and the actor's delay d
            batch = buffer.sample(args.batch_size)[1]
            critic_sum += agent.update_critic(batch)
            counts["critic_updates"] += 1
            if counts["critic_updates"] % args.actor_delay == 0:
                actor_sum += agent.update_actor(batch)
                counts["actor_updates"] += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.online_steps:
            log_update_counts(writer, agent, critic_sum, actor_sum, counts, step + 1, start_step, start)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.online_steps:
            run_evaluation(step + 1)
        if (terminated or truncated) and step + 1 < args.online_steps:  # resume.pt at an episode's start
            stopping = args.stop_after and step + 1 - start_step >= args.stop_after
            every = args.checkpoint_every
            if stopping or (every and (step + 1) // every > saved_at // every):
                save_online_phase(run_dir, agent, buffer, n_offline, env_random_state, critic_sum, actor_sum, counts,
                                  step + 1, context, args)
                saved_at = step + 1
            if stopping:
                writer.close()
                print(f"stopped after {step + 1 - start_step} online steps (step {step + 1} of {args.online_steps}, "
                      f"an episode's end); continue with `python {sys.argv[0]} --resume "
                      f"{os.path.join(run_dir, 'resume.pt')}`")
                return

    save_checkpoint(os.path.join(run_dir, "final.pt"), "final", args.algo,
                    {"agent": agent.state_dict(), "optimizer": agent.optimizer.state_dict()}, context, args,
                    method=METHOD, critic_updates=counts["critic_updates"], actor_updates=counts["actor_updates"])
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


# --- resuming ---------------------------------------------------------------------------------
def resumed_args(args, args_class, method: Optional[str]):
    """--resume: its checkpoint and the run's own arguments; of this command's flags only --resume,
    --stop-after and --cuda apply (a note names the others)."""
    kept = ("resume", "stop_after", "cuda")
    defaults = {field.name: field.default for field in fields(args_class)}
    ignored = [f"--{name.replace('_', '-')}" for name, value in vars(args).items()
               if name not in kept and value != defaults[name]]
    if ignored:
        print(f"note: --resume continues the run with its own arguments; ignored: {' '.join(ignored)}")
    resume = load_checkpoint(args.resume, "--resume", "resume", ("iql", "cql"), {})
    if resume.get("method") != method:
        def script(name):
            return f"benchmark/baselines/{name}.py" if name else "offline_pretrain.py"

        fail(f"--resume {args.resume!r} continues a run of {script(resume.get('method'))}, not of {script(method)}: "
             f"pass it to that script, or pass a `resume.pt` written by this one.")
    saved = {name: value for name, value in resume["args"].items() if name in args_class.__dataclass_fields__}
    return resume, args_class(**{**saved, **{name: getattr(args, name) for name in kept}})


def continue_run(resume_path: str, resume: dict, sizes: tuple, total: int, unit: str):
    """The step, run directory and TensorBoard writer of a resumed run. What the interrupted run logged
    after its resume.pt was written is dropped, so every step is logged once."""
    if (resume["obs_dim"], resume["act_dim"], resume["transitions"]) != sizes:
        fail(f"--resume {resume_path!r} was made on {resume['transitions']} transitions of {resume['dataset_id']}, "
             f"which now has {sizes[2]} (observations {sizes[0]}, actions {sizes[1]}): the dataset changed, so the "
             f"run cannot continue exactly. Start a new run.")
    run_dir = os.path.dirname(os.path.abspath(resume_path))
    writer = SummaryWriter(run_dir, purge_step=resume["step"] + 1)
    RUN_STATE.update(run_dir=run_dir, writer=writer)
    RUN_STATE["checkpoints"]["resume"] = resume_path
    print(f"resuming {run_dir} at {unit} {resume['step']} of {total}")
    return resume["step"], run_dir, writer


def random_state(buffer, device) -> dict:
    """The generators a run draws from (torch's and the replay sampler's), for an exact resume."""
    state = {"buffer": buffer.generator.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_random_state(state: dict, buffer, device):
    buffer.generator.set_state(state["buffer"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"])


# --- the online phase: its logs and its resume.pt --------------------------------------------
def log_update_counts(writer, agent, critic_sum, actor_sum, counts: dict, step: int, start_step: int, start: float):
    """The losses averaged over the updates since the last log, the update counts and the steps per second."""
    critic_count = counts["critic_updates"] - counts["logged_critic"]
    actor_count = counts["actor_updates"] - counts["logged_actor"]
    log_metrics(writer, "losses/", agent.CRITIC_METRICS, critic_sum, critic_count, step)
    if actor_count:
        log_metrics(writer, "losses/", agent.ACTOR_METRICS, actor_sum, actor_count, step)
    writer.add_scalar("charts/critic_updates", counts["critic_updates"], step)
    writer.add_scalar("charts/actor_updates", counts["actor_updates"], step)
    writer.add_scalar("charts/SPS", int((step - start_step) / (time.time() - start)), step)
    critic_sum.zero_()
    actor_sum.zero_()
    counts.update(logged_critic=counts["critic_updates"], logged_actor=counts["actor_updates"])


ONLINE_COLUMNS = ("observations", "actions", "rewards", "next_observations", "terminals", "weights", "priorities")


def save_online_phase(run_dir: str, agent, buffer, n_offline: int, env_random_state: dict, critic_sum, actor_sum,
                      counts: dict, step: int, context: dict, args):
    """resume.pt at an episode's start: the agent with its Adam moments, the online transitions, the loss
    sums not yet logged, the update counts and every random state (the environment's as its reset found it)."""
    # cloned: torch.save of a slice would write the whole buffer's storage (185 MB for walker2d-medium)
    online = {name: getattr(buffer, name)[n_offline:buffer.size].clone().cpu() for name in ONLINE_COLUMNS}
    save_checkpoint(os.path.join(run_dir, "resume.pt"), "resume", args.algo,
                    {"agent": agent.state_dict(), "optimizer": agent.optimizer.state_dict()}, context, args,
                    method=METHOD, step=step, transitions=n_offline, online_transitions=online,
                    critic_sum=critic_sum.cpu(), actor_sum=actor_sum.cpu(), counts=dict(counts),
                    rng=random_state(buffer, critic_sum.device), env_random_state=env_random_state)


def restore_online_phase(resume: dict, buffer, env, critic_sum, actor_sum, counts: dict):
    """Back to where save_online_phase left the run; returns the first observation of its next episode.
    Every rho of these buffers is 1, so the online rows' prefix sums come back exact."""
    buffer.add(*(resume["online_transitions"][name] for name in ONLINE_COLUMNS))
    critic_sum.copy_(resume["critic_sum"])
    actor_sum.copy_(resume["actor_sum"])
    counts.update(resume["counts"])
    restore_random_state(resume["rng"], buffer, critic_sum.device)
    env.np_random.bit_generator.state = resume["env_random_state"]
    return env.reset()[0]


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except KeyboardInterrupt:
        stop_on_interrupt()
