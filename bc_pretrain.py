# The behavior-cloning reference pi_BC alone, in one file: trained with the loss of Eq. 2 exactly as
# baq_iql.py and baq_cql.py train it (the same code and seed streams, so the same network), written as a
# `bc.pt` they accept with --bc-checkpoint, and evaluated in the environment. With --offline-checkpoint
# it also measures the paper's Figure 1: over the dataset's states, how far the actions of an
# offline-trained policy and of pi_BC lie from the dataset's actions.
#
# Definitions that the other top-level scripts also have are identical text in all of them
# (tests/test_copies.py checks it): change them everywhere at once.
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
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of the experiment, in the run directory {runs_dir}/{env_id}__{exp_name}__{seed}__{time}"""
    env_id: str = "hopper-medium-v2"
    """the offline dataset: a D4RL name ({hopper,halfcheetah,walker2d}-{medium,medium-replay,medium-expert,
    expert,random}-v2) or any Minari dataset id (e.g. baq/hopper/medium-v0)"""
    seed: int = 1
    """seed of the experiment (python, numpy, torch, environments, replay sampling)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """use CUDA when it is available (otherwise the CPU, with a one-line note)"""
    threads: int = 0
    """torch threads (0: torch's default, one per core); give 1 when other jobs share the cores: on our 2 cores
    beside a background job, a tiny CQL run took 2 minutes with 2 threads and 5.6 s with 1"""
    runs_dir: str = "runs"
    """directory under which the run directory (TensorBoard events and checkpoints) is created"""
    bc_steps: int = 100_000
    """gradient updates of pi_BC (0 leaves pi_BC at its random initialization)"""
    offline_checkpoint: Optional[str] = None
    """an `offline.pt` (IQL or CQL) on the same dataset: also measure and plot Figure 1"""
    eval_episodes: int = 10
    """deterministic episodes of the BC policy's evaluation"""
    log_every: int = 1_000
    """write the BC loss every this many updates (averaged over them)"""
    figure_points: int = 2_000
    """dataset transitions drawn in each panel of the Figure 1 plot (the MSEs use every transition)"""
    batch_size: int = 256
    """batch size of every gradient update"""
    hidden_dim: int = 256
    """width of every hidden layer"""
    obs_norm_eps: float = 1e-3
    """added to the dataset's observation std for state normalization"""
    bc_lr: float = 3e-4
    """learning rate of pi_BC"""

    def __post_init__(self):
        check_flags(self)


# =============================================================================================
# pi_BC (Eq. 2)
# =============================================================================================
@torch.no_grad()
def bc_divergence(bc_policy, obs, actions, chunk: int = 65536):
    """mean((pi_BC(s) - a)^2) over action dimensions, per transition."""
    return torch.cat([(bc_policy(o) - a).pow(2).mean(-1) for o, a in zip(obs.split(chunk), actions.split(chunk))])


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
# Networks: pi_BC, and the offline actors that Figure 1 loads
# =============================================================================================
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
# Evaluation and Figure 1
# =============================================================================================
@torch.no_grad()
def evaluate_policy(policy, env, normalize, episodes: int, seed: int, device):
    """Returns of deterministic episodes of pi_BC (its mean action)."""
    episode_returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        total, done = 0.0, False
        while not done:
            action = policy(torch.as_tensor(normalize(obs), dtype=torch.float32, device=device)[None])[0]
            obs, reward, terminated, truncated, _ = env.step(action.cpu().numpy())
            total, done = total + reward, terminated or truncated
        episode_returns.append(total)
    return np.asarray(episode_returns)


@torch.no_grad()
def offline_policy_actions(checkpoint: dict, observations, max_action: float, device):
    """The deterministic actions of the actor in an offline checkpoint, on raw observations."""
    weights = {k[len("actor."):]: v for k, v in checkpoint["state_dict"]["agent"].items() if k.startswith("actor.")}
    sizes = (checkpoint["obs_dim"], checkpoint["act_dim"], checkpoint["hidden_dim"], max_action)
    actor = (GaussianPolicy if checkpoint["algorithm"] == "iql" else TanhGaussianActor)(*sizes)
    actor.load_state_dict(weights)
    actor.to(device)
    obs = (observations - checkpoint["obs_mean"].numpy()) / checkpoint["obs_std"].numpy()
    obs = torch.as_tensor(obs, device=device)
    if checkpoint["algorithm"] == "iql":
        return torch.cat([actor(chunk) for chunk in obs.split(65536)]).cpu()
    return torch.cat([actor(chunk, deterministic=True)[0] for chunk in obs.split(65536)]).cpu()


def action_mse(predicted, actions):
    """Mean squared error to the dataset's actions: per action dimension, and overall."""
    per_dimension = (predicted - actions).pow(2).mean(0)
    return per_dimension, per_dimension.mean()


def plot_figure1(predictions: dict, actions, mse: dict, path: str, points: int, seed: int, title: str):
    """Predicted against dataset actions, one row per policy, one column per action dimension."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = np.random.default_rng(seed).choice(len(actions), size=min(points, len(actions)), replace=False)
    act_dim = actions.shape[1]
    figure, axes = plt.subplots(len(predictions), act_dim, figsize=(2.6 * act_dim, 2.6 * len(predictions)),
                                squeeze=False)
    for row, (name, predicted) in enumerate(predictions.items()):
        for dim in range(act_dim):
            ax = axes[row, dim]
            ax.scatter(actions[idx, dim], predicted[idx, dim], s=2, alpha=0.3)
            ax.plot([-1, 1], [-1, 1], color="black", linewidth=0.8)
            ax.set_title(f"{name}, a[{dim}]: MSE {mse[name][0][dim]:.3f}", fontsize=8)
            ax.set_xlabel("dataset action", fontsize=7)
            ax.set_ylabel("predicted action", fontsize=7)
            ax.tick_params(labelsize=6)
    summary = ", ".join(f"{name} MSE {m[1]:.4f}" for name, m in mse.items())
    figure.suptitle(f"Figure 1, {title}\n{summary}", fontsize=9)
    figure.tight_layout()
    figure.savefig(f"{path}.tmp.png", dpi=120)
    plt.close(figure)
    os.replace(f"{path}.tmp.png", path)


# =============================================================================================
# The run: pi_BC, its evaluation, Figure 1
# =============================================================================================
def main(args: Args):
    device = seed_and_pick_device(args)

    # --- data (as the fine-tuning scripts load it) --------------------------------------------
    data, make_env, ref_scores, max_action = load_offline_data(args.env_id)
    obs_dim, act_dim, n_offline = data["observations"].shape[1], data["actions"].shape[1], len(data["rewards"])
    context = {"dataset_id": args.env_id, "obs_dim": obs_dim, "act_dim": act_dim, "hidden_dim": args.hidden_dim}
    offline_checkpoint = None
    if args.offline_checkpoint:
        offline_checkpoint = load_checkpoint(args.offline_checkpoint, "--offline-checkpoint", "offline",
                                             ("iql", "cql"), context)
    obs_mean = data["observations"].mean(0)
    obs_std = data["observations"].std(0) + args.obs_norm_eps
    context.update(obs_mean=torch.as_tensor(obs_mean), obs_std=torch.as_tensor(obs_std), reward_scale=None)  # no reward

    def normalize(obs):
        return (obs - obs_mean) / obs_std

    observations = torch.as_tensor(normalize(data["observations"]), dtype=torch.float32, device=device)
    actions = torch.as_tensor(data["actions"], device=device)
    run_dir, writer = start_run(args, f"{n_offline} offline transitions, obs {obs_dim}, actions {act_dim}, "
                                      f"device {device}", ref_scores)

    # --- pi_BC (Eq. 2), exactly as the fine-tuning scripts train it -----------------------------
    bc_policy = train_bc(observations, actions, max_action, args, writer)
    save_checkpoint(os.path.join(run_dir, "bc.pt"), "bc", "bc", bc_policy.state_dict(), context, args)
    bc_policy.requires_grad_(False).eval()
    returns = evaluate_policy(bc_policy, make_env(eval_env=True), normalize, args.eval_episodes, args.seed + 10_000,
                              device)
    writer.add_scalar("bc/eval/return", returns.mean(), args.bc_steps)
    score = ""
    if ref_scores is not None:
        writer.add_scalar("bc/eval/normalized_score", normalized_score(returns.mean(), ref_scores), args.bc_steps)
        score = f", normalized score {normalized_score(returns.mean(), ref_scores):.1f}"
    print(f"BC policy after {args.bc_steps} updates: return {returns.mean():.1f} +/- {returns.std():.1f}{score}")

    # --- Figure 1: actions of the offline policy and of pi_BC against the dataset's -------------
    if offline_checkpoint:
        offline_name = f"offline {offline_checkpoint['algorithm'].upper()}"
        predictions = {
            offline_name: offline_policy_actions(offline_checkpoint, data["observations"], max_action, device),
            "pi_BC": torch.cat([bc_policy(o) for o in observations.split(65536)]).cpu(),
        }
        mse = {name: action_mse(predicted, actions.cpu()) for name, predicted in predictions.items()}
        for name, tag in ((offline_name, "offline_policy"), ("pi_BC", "bc_policy")):
            writer.add_scalar(f"figure1/{tag}_mse", mse[name][1].item(), 0)
            for dim, value in enumerate(mse[name][0].tolist()):
                writer.add_scalar(f"figure1/{tag}_mse_dim{dim}", value, 0)
            print(f"Figure 1, {name}: action MSE {mse[name][1].item():.4f} (per dimension: "
                  + ", ".join(f"{v:.4f}" for v in mse[name][0].tolist()) + ")")
        offline_steps = offline_checkpoint["args"]["offline_steps"]
        title = (f"{args.env_id}, seed {args.seed}: pi_BC after {args.bc_steps} updates, {offline_name} after "
                 f"{offline_steps} updates")
        plot_figure1({k: v.numpy() for k, v in predictions.items()}, data["actions"], mse,
                     os.path.join(run_dir, "figure1.png"), args.figure_points, args.seed, title)
        print(f"Figure 1 plot: {os.path.join(run_dir, 'figure1.png')}")
    writer.close()
    print(f"done: {os.path.join(run_dir, 'bc.pt')}")


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


def normalized_score(episode_return, ref_scores):
    """D4RL normalized score: 100 * (R - R_random) / (R_expert - R_random)."""
    ref_min, ref_max = ref_scores
    return 100.0 * (np.asarray(episode_return) - ref_min) / (ref_max - ref_min)


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
