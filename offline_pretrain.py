# Offline pretraining alone, in one file: exactly the offline phase of baq_iql.py (--algo iql) or
# baq_cql.py (--algo cql), with the same defaults, networks, losses and batches, writing an `offline.pt` that they
# accept with --offline-checkpoint. 1M updates take hours on a CPU: a resumable checkpoint is written
# periodically, and --resume continues a run exactly where it stopped.
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
from dataclasses import asdict, dataclass, fields
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    algo: Literal["iql", "cql"] = "iql"  # the offline algorithm: the offline phase of baq_iql.py or of baq_cql.py
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the experiment's name in the run directory
    env_id: str = "hopper-medium-v2"  # a D4RL name (hopper-medium-v2, ...) or a Minari id (baq/hopper/medium-v0)
    seed: int = 1  # seed of the experiment
    torch_deterministic: bool = True  # if toggled, `torch.backends.cudnn.deterministic=True`
    cuda: bool = True  # use CUDA when it is available
    compile: bool = True  # torch.compile the losses
    threads: int = 0  # torch threads (0: one per core; 1 when other jobs share the cores)
    runs_dir: str = "runs"  # where the run directories are created
    track: bool = False  # log to Weights & Biases (TensorBoard synced)
    wandb_project_name: str = "baq"  # the W&B project
    wandb_entity: str | None = None  # the W&B entity (team)
    offline_steps: int = 1_000_000  # offline gradient updates
    offline_eval_every: int = 100_000  # evaluate every this many offline updates (0: only at the end)
    eval_episodes: int = 10  # deterministic episodes per evaluation
    log_every: int = 1_000  # write losses every this many updates (averaged over them)
    checkpoint_every: int = 50_000  # write the resumable checkpoint `resume.pt` every this many updates (0: never)
    resume: str | None = None  # a `resume.pt`: continue that run exactly, with its own arguments
    stop_after: int = 0  # write `resume.pt` and stop after this many updates (0: run to --offline-steps)
    # shared hyperparameters (as in baq_iql.py and baq_cql.py)
    batch_size: int = 256  # batch size of every gradient update
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # target network soft-update rate
    hidden_dim: int = 256  # width of every hidden layer
    obs_norm_eps: float = 1e-3  # added to the dataset's observation std
    reward_scale: float | None = None  # multiplies every reward; default: IQL 1000 / (max - min return), CQL 1
    actor_lr: float | None = None  # actor lr; default: IQL 3e-4 (cosine-decayed), CQL 3e-5 (also the temperature's)
    critic_lr: float = 3e-4  # twin Q learning rate
    # IQL
    expectile: float = 0.7  # expectile tau of the value loss (Eq. 4)
    beta: float = 3.0  # inverse temperature of IQL's advantage-weighted regression
    exp_adv_max: float = 100.0  # clip of exp(beta * advantage)
    value_lr: float = 3e-4  # V learning rate
    # CQL
    cql_alpha: float = 10.0  # weight of the conservative penalty (Eq. 3's alpha with CORL's mean-squared TD term)
    cql_n_actions: int = 10  # actions per state in each of the penalty's sets (uniform, pi(.|s), pi(.|s'))
    cql_temperature: float = 1.0  # temperature of the penalty's log-sum-exp
    target_entropy: float | None = None  # entropy target of the automatic temperature tuning (default: -|A|)

    def __post_init__(self):
        check_flags(self)


# ===== IQL's losses (Eqs. 4, 8, 9; offline, every w is 1) ===================================================
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


# ===== CQL's losses (Eqs. 3, 7; offline, every w is 1) ======================================================
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


# ===== Networks and the two agents, as in the fine-tuning scripts ===========================================
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


class IQL(ActorCritic):
    """IQL's actor (the same Gaussian policy as pi_BC), twin Q and V, trained by one optimizer."""

    METRICS = ("q_loss", "value_loss", "actor_loss", "q_values")

    def __init__(self, obs_dim, act_dim, max_action, args: Args):
        super().__init__()
        self.actor = GaussianPolicy(obs_dim, act_dim, args.hidden_dim, max_action)
        self.qf = TwinQ(obs_dim, act_dim, args.hidden_dim)
        self.qf_target = TwinQ(obs_dim, act_dim, args.hidden_dim).requires_grad_(False)
        self.qf_target.load_state_dict(self.qf.state_dict())
        self.vf = mlp(obs_dim, 1, args.hidden_dim, n_hidden=2)
        self.optimizer = torch.optim.Adam([
            {"params": self.actor.parameters(), "lr": args.actor_lr},
            {"params": self.qf.parameters(), "lr": args.critic_lr},
            {"params": self.vf.parameters(), "lr": args.value_lr},
        ], fused=True)
        self.compute_losses = torch.compile(self.losses) if args.compile else self.losses
        self.args = args

    def set_actor_lr(self, lr: float):
        self.optimizer.param_groups[0]["lr"] = lr

    def losses(self, obs, actions, rewards, next_obs, terminals, weights):
        """IQL's V, Q and actor losses, summed. One step on the sum equals CORL's three separate updates: each loss
        reaches only its own parameters, as they were before the step (detached advantage, target Q, V(s') without
        gradient); a loss reaching another network changes IQL."""
        args = self.args
        with torch.no_grad():
            target_q = self.qf_target(obs, actions).min(0).values
            next_v = self.vf(next_obs).squeeze(-1)
        v = self.vf(obs).squeeze(-1)
        value_loss = iql_value_loss(target_q, v, weights, args.expectile)  # Eq. 8
        qs = self.qf(obs, actions)
        q_loss = iql_q_loss(qs, rewards, terminals, next_v, weights, args.gamma)  # Eq. 9
        advantage = (target_q - v).detach()
        actor_loss = iql_actor_loss(self.actor.log_prob(obs, actions), advantage, args.beta, args.exp_adv_max)
        total_loss, metrics = value_loss + q_loss + actor_loss, [q_loss, value_loss, actor_loss, qs.mean()]
        return total_loss, torch.stack(metrics).detach()

    @torch.no_grad()
    def act(self, obs, deterministic: bool):
        mean = self.actor(obs)
        if deterministic:
            return mean
        action = mean + torch.randn_like(mean) * self.actor.log_std.clamp(-20.0, 2.0).exp()
        return action.clamp(-self.actor.max_action, self.actor.max_action)


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


AGENTS = {"iql": IQL, "cql": CQL}


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


# ===== The run: offline pretraining, resumable ==============================================================
def main(args: Args):
    resume, args = resumed_args(args, Args, None) if args.resume else (None, args)  # a resumed run: its own args
    if args.actor_lr is None:  # the fine-tuning scripts' defaults where IQL and CQL differ
        args.actor_lr = 3e-4 if args.algo == "iql" else 3e-5
    if args.reward_scale is None and args.algo == "cql":
        args.reward_scale = 1.0
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and args.algo == "cql":
        keep_freed_memory()  # CQL: measured in docs/benchmark.md

    # --- data (as the fine-tuning scripts load it) --------------------------------------------
    data, context, make_env, ref_scores, max_action = load_offline_data(args.env_id)
    obs_dim, act_dim, n_offline = context["obs_dim"], context["act_dim"], len(data["rewards"])
    context.update(hidden_dim=args.hidden_dim, obs_norm_eps=args.obs_norm_eps)
    obs_mean, obs_std, reward_scale = data_statistics(data, args, resume)
    context.update(obs_mean=torch.as_tensor(obs_mean), obs_std=torch.as_tensor(obs_std), reward_scale=reward_scale)

    def normalize(obs):
        return (obs - obs_mean) / obs_std

    offline = [torch.as_tensor(column, dtype=torch.float32, device=device) for column in (
        normalize(data["observations"]), data["actions"], data["rewards"] * reward_scale,
        normalize(data["next_observations"]), data["terminals"])]  # (s, a, r, s', terminal)
    sampler = torch.Generator(device).manual_seed(args.seed)  # uniform batches, as the fine-tuning scripts draw them
    del data

    if resume:
        start_step, run_dir, writer = continue_run(args, resume, context, args.offline_steps, "update")
    else:
        start_step, (run_dir, writer) = 0, start_run(args, f"{args.algo.upper()} on {n_offline} offline transitions, "
                                                           f"obs {obs_dim}, actions {act_dim}, reward scale "
                                                           f"{reward_scale:.4g}, device {device}")
    agent = AGENTS[args.algo](obs_dim, act_dim, max_action, args).to(device)
    eval_env = make_env(eval_env=True)

    def run_evaluation(prefix: str, step: int):
        returns, q_bias = evaluate(agent, eval_env, normalize, args.eval_episodes, args.seed + 10_000, args.gamma,
                                   reward_scale, device)
        log_evaluation(writer, prefix, step, ref_scores, returns, q_bias)

    # --- offline pretraining: the fine-tuning scripts' offline phase ----------------------------
    metric_sum = torch.zeros(len(agent.METRICS), device=device)
    if resume:
        agent.load_pretrained(resume["state_dict"])
        metric_sum.copy_(resume["metric_sum"])
        restore_random_state(resume["rng"], sampler, device)
    unit_weights, start = torch.ones(args.batch_size, device=device), time.time()
    steps = tqdm(range(start_step + 1, args.offline_steps + 1), f"offline {args.algo.upper()}", unit="update",
                 mininterval=10)
    for step in steps:
        if args.algo == "iql":  # cosine decay of the actor lr, ending with the offline phase
            agent.set_actor_lr(args.actor_lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / args.offline_steps)))
        idx = torch.randint(0, n_offline, (args.batch_size,), device=device, generator=sampler)
        metric_sum += agent.update([column[idx] for column in offline], unit_weights)
        if step % args.log_every == 0 or step == args.offline_steps:
            count = step % args.log_every or args.log_every
            log_metrics(writer, "offline/losses/", agent.METRICS, metric_sum, count, step)
            writer.add_scalar("offline/charts/SPS", int((step - start_step) / (time.time() - start)), step)
            metric_sum.zero_()
        if (args.offline_eval_every and step % args.offline_eval_every == 0) or step == args.offline_steps:
            run_evaluation("offline/", step)
        stopping = args.stop_after and step - start_step == args.stop_after and step < args.offline_steps
        if (args.checkpoint_every and step % args.checkpoint_every == 0) or stopping:
            save_checkpoint(os.path.join(run_dir, "resume.pt"), "resume", args.algo,
                            {"agent": agent.state_dict(), "optimizer": agent.optimizer.state_dict()}, context, args,
                            step=step, metric_sum=metric_sum.cpu(), rng=random_state(sampler, device))
        if stopping:
            steps.close()
            print(f"stopped after {args.stop_after} updates (update {step} of {args.offline_steps}); continue with "
                  f"`python offline_pretrain.py --resume {os.path.join(run_dir, 'resume.pt')}`")
            return
    save_checkpoint(os.path.join(run_dir, "offline.pt"), "offline", args.algo,
                    {"agent": agent.state_dict(), "optimizer": agent.optimizer.state_dict()}, context, args)
    print(f"done: {os.path.join(run_dir, 'offline.pt')} (use it with `python baq_{args.algo}.py --env-id {args.env_id} "
          f"--offline-checkpoint {os.path.join(run_dir, 'offline.pt')}`)")


# ===== PLUMBING: flags, the run directory, data, checkpoints ================================================
def fail(message: str):
    """Stop with one line (the input, the cause, the fix) and a non-zero exit."""
    raise SystemExit(f"error: {message}")


FLAG_DOMAINS = {  # interval: the numeric flags that must lie in it (NaN and inf never), see check_flags
    "[0, 2147483648)": ["seed"], "[0, 1)": ["gamma"], "(0, 1]": ["tau"], "(0, 1)": ["expectile"],
    "[0, inf)": ["threads", "offline_steps", "offline_eval_every", "checkpoint_every", "stop_after", "beta",
                 "cql_alpha"],
    "[1, inf)": ["eval_episodes", "log_every", "batch_size", "hidden_dim", "cql_n_actions"],
    "(0, inf)": ["obs_norm_eps", "reward_scale", "actor_lr", "critic_lr", "exp_adv_max", "value_lr", "cql_temperature"],
    "(-inf, inf)": ["target_entropy"],
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
    """Ctrl-C or SIGTERM: one line on what was saved and how --resume continues it exactly, exit 130."""
    resume = [path for path, kind in SAVED.items() if kind == "resume"]
    hint = ("the run had finished" if set(SAVED.values()) - {"resume"} else
            f"continue it with `python {sys.argv[0]} --resume {resume[-1]}`" if resume else
            "nothing was saved yet, so rerun the command to start again")
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


# --- resuming an interrupted run exactly --------------------------------------------------------
def resumed_args(args, args_class, method: str | None):
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
        theirs, ours = (f"benchmark/baselines/{m}.py" if m else "offline_pretrain.py"
                        for m in (resume.get("method"), method))
        fail(f"--resume {args.resume!r} continues a run of {theirs}, not of {ours}: pass it to that script, or pass a "
             f"`resume.pt` written by this one.")
    saved = {name: value for name, value in resume["args"].items() if name in args_class.__dataclass_fields__}
    return resume, args_class(**{**saved, **{name: getattr(args, name) for name in kept}})


def continue_run(args, resume: dict, context: dict, total: int, unit: str):
    """The step, run directory and TensorBoard writer of a resumed run. What the interrupted run logged
    after its resume.pt was written is dropped, so every step is logged once."""
    if resume.get("data_sha1") != context["data_sha1"]:
        fail(f"--resume {args.resume!r} was made on other transitions of {resume['dataset_id']} than it now holds: "
             f"the dataset was rebuilt or changed, so the run cannot continue exactly. Start a new run.")
    run_dir = os.path.dirname(os.path.abspath(args.resume))
    writer = open_writer(run_dir, args, purge_step=resume["step"] + 1)
    SAVED[os.path.abspath(args.resume)] = "resume"  # until this run writes its next one
    print(f"resuming {run_dir} at {unit} {resume['step']} of {total}")
    return resume["step"], run_dir, writer


def random_state(sampler, device) -> dict:
    """The generators a run draws from (torch's and the replay sampler's), for an exact resume."""
    state = {"buffer": sampler.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_random_state(state: dict, sampler, device):
    """Exact on the device the run was saved on: a generator's state cannot move to another device."""
    torch.set_rng_state(state["torch"])
    if ("cuda" in state) != (device.type == "cuda"):
        print(f"note: saved on {'cuda' if 'cuda' in state else 'cpu'}, resumed on {device.type}: the replay sampler "
              f"starts a new random stream, so the run goes on, but not as the uninterrupted one would have")
        return
    sampler.set_state(state["buffer"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"])


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM (Slurm, timeout) stops as Ctrl-C does
    try:
        main(tyro.cli(Args))
    except KeyboardInterrupt:
        stop_on_interrupt()
