# The behavior-cloning reference pi_BC alone, in one file: trained with Eq. 2's loss exactly as baq_iql.py and
# baq_cql.py train it (the same code and seed streams, so the same network), written as a `bc.pt` they accept with
# --bc-checkpoint, and evaluated. With --offline-checkpoint it also measures the paper's Figure 1: over the
# dataset's states, how far the actions of an offline-trained policy and of pi_BC lie from the dataset's actions.
#
# Definitions other scripts also have are identical text in all (tests/test_copies.py). Docs: docs/baq.md
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
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the experiment's name in the run directory
    env_id: str = "hopper-medium-v2"  # a D4RL name (hopper-medium-v2, ...) or a Minari id (baq/hopper/medium-v0)
    seed: int = 1  # seed of the experiment
    torch_deterministic: bool = True  # if toggled, `torch.backends.cudnn.deterministic=True`
    cuda: bool = True  # use CUDA when it is available
    threads: int = 0  # torch threads (0: one per core; 1 when other jobs share the cores)
    runs_dir: str = "runs"  # where the run directories are created
    track: bool = False  # log to Weights & Biases (TensorBoard synced)
    wandb_project_name: str = "baq"  # the W&B project
    wandb_entity: str | None = None  # the W&B entity (team)
    bc_steps: int = 100_000  # gradient updates of pi_BC (0 leaves pi_BC at its random initialization)
    offline_checkpoint: str | None = None  # an IQL or CQL `offline.pt` of this dataset: also plot Figure 1
    eval_episodes: int = 10  # deterministic episodes of the BC policy's evaluation
    log_every: int = 1_000  # write the BC loss every this many updates (averaged over them)
    figure_points: int = 2_000  # transitions drawn per Figure 1 panel (the MSEs use every transition)
    batch_size: int = 256  # batch size of every gradient update
    hidden_dim: int = 256  # width of every hidden layer
    obs_norm_eps: float = 1e-3  # added to the dataset's observation std
    bc_lr: float = 3e-4  # learning rate of pi_BC

    def __post_init__(self):
        check_flags(self)


# ===== pi_BC (Eq. 2) ========================================================================================
@torch.no_grad()
def bc_divergence(bc_policy, obs, actions, chunk: int = 65536):
    """mean((pi_BC(s) - a)^2) over action dimensions, per transition."""
    return torch.cat([(bc_policy(o) - a).pow(2).mean(-1) for o, a in zip(obs.split(chunk), actions.split(chunk))])


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


# ===== Networks: pi_BC, and the offline actors that Figure 1 loads ==========================================
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


# ===== Evaluation and Figure 1 ==============================================================================
def normalized_score(episode_return, ref_scores):
    """D4RL normalized score: 100 * (R - R_random) / (R_expert - R_random)."""
    return 100.0 * (np.asarray(episode_return) - ref_scores[0]) / (ref_scores[1] - ref_scores[0])


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
    actor = (GaussianPolicy if checkpoint["algorithm"] == "iql" else TanhGaussianActor)(*sizes).to(device)
    actor.load_state_dict(weights)
    obs = (observations - checkpoint["obs_mean"].numpy()) / checkpoint["obs_std"].numpy()
    act = actor if checkpoint["algorithm"] == "iql" else lambda o: actor(o, deterministic=True)[0]
    return torch.cat([act(chunk) for chunk in torch.as_tensor(obs, device=device).split(65536)]).cpu()


def plot_figure1(predictions: dict, actions, mse: dict, path: str, points: int, seed: int, title: str):
    """Predicted against dataset actions, one row per policy, one column per action dimension."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no GUI backend to pick, no window, nothing to close

    matplotlib.rcParams.update({"font.size": 7, "xtick.labelsize": 6, "ytick.labelsize": 6})
    idx = np.random.default_rng(seed).choice(len(actions), size=min(points, len(actions)), replace=False)
    act_dim = actions.shape[1]
    figure = Figure(figsize=(2.6 * act_dim, 2.6 * len(predictions)))
    axes = figure.subplots(len(predictions), act_dim, squeeze=False)
    for row, (name, predicted) in enumerate(predictions.items()):
        for dim in range(act_dim):
            ax = axes[row, dim]
            ax.scatter(actions[idx, dim], predicted[idx, dim], s=2, alpha=0.3)
            ax.plot([-1, 1], [-1, 1], color="black", linewidth=0.8)
            ax.set_title(f"{name}, a[{dim}]: MSE {mse[name][dim]:.3f}", fontsize=8)
            ax.set(xlabel="dataset action", ylabel="predicted action")
    summary = ", ".join(f"{name} MSE {m.mean():.4f}" for name, m in mse.items())
    figure.suptitle(f"Figure 1, {title}\n{summary}", fontsize=9)
    figure.tight_layout()
    figure.savefig(f"{path}.tmp.png", dpi=120)
    os.replace(f"{path}.tmp.png", path)


# ===== The run: pi_BC, its evaluation, Figure 1 =============================================================
def main(args: Args):
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")

    # --- data (as the fine-tuning scripts load it) --------------------------------------------
    data, context, make_env, ref_scores, max_action = load_offline_data(args.env_id)
    obs_dim, act_dim, n_offline = context["obs_dim"], context["act_dim"], len(data["rewards"])
    context["hidden_dim"] = args.hidden_dim
    offline_checkpoint = args.offline_checkpoint and load_checkpoint(
        args.offline_checkpoint, "--offline-checkpoint", "offline", ("iql", "cql"), context)
    obs_mean, obs_std = data["observations"].mean(0), data["observations"].std(0) + args.obs_norm_eps
    context.update(obs_mean=torch.as_tensor(obs_mean), obs_std=torch.as_tensor(obs_std), obs_norm_eps=args.obs_norm_eps,
                   reward_scale=None)  # no reward

    def normalize(obs):
        return (obs - obs_mean) / obs_std

    observations = torch.as_tensor(normalize(data["observations"]), dtype=torch.float32, device=device)
    actions = torch.as_tensor(data["actions"], device=device)
    run_dir, writer = start_run(args, f"{n_offline} transitions, obs {obs_dim}, actions {act_dim}, device {device}")

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
        mse = {name: (predicted - actions.cpu()).pow(2).mean(0) for name, predicted in predictions.items()}  # per a[i]
        for name, tag in ((offline_name, "offline_policy"), ("pi_BC", "bc_policy")):
            writer.add_scalar(f"figure1/{tag}_mse", mse[name].mean().item(), 0)
            for dim, value in enumerate(mse[name].tolist()):
                writer.add_scalar(f"figure1/{tag}_mse_dim{dim}", value, 0)
            print(f"Figure 1, {name}: action MSE {mse[name].mean().item():.4f} (per dimension: "
                  + ", ".join(f"{v:.4f}" for v in mse[name].tolist()) + ")")
        title = (f"{args.env_id}, seed {args.seed}: pi_BC after {args.bc_steps} updates, {offline_name} after "
                 f"{offline_checkpoint['args']['offline_steps']} updates")
        plot_figure1({k: v.numpy() for k, v in predictions.items()}, data["actions"], mse,
                     os.path.join(run_dir, "figure1.png"), args.figure_points, args.seed, title)
        print(f"Figure 1 plot: {os.path.join(run_dir, 'figure1.png')}")
    writer.close()
    print(f"done: {os.path.join(run_dir, 'bc.pt')}")


# ===== PLUMBING: flags, the run directory, data, checkpoints ================================================
def fail(message: str):
    """Stop with one line (the input, the cause, the fix) and a non-zero exit."""
    raise SystemExit(f"error: {message}")


FLAG_DOMAINS = {  # interval: the numeric flags that must lie in it (NaN and inf never), see check_flags
    "[0, 2147483648)": ["seed"], "[0, inf)": ["threads", "bc_steps", "figure_points"],
    "[1, inf)": ["eval_episodes", "log_every", "batch_size", "hidden_dim"], "(0, inf)": ["obs_norm_eps", "bc_lr"],
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
    hint = ("pi_BC is complete (pass it as --bc-checkpoint), its evaluation did not finish" if SAVED
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
