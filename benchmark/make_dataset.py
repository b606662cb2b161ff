# Build D4RL-protocol MuJoCo datasets locally, as Minari datasets `baq/<env>/<level>-v0`.
#
# D4RL's v2 locomotion protocol: a SAC behavior policy (tanh-Gaussian, 256-256) is trained online;
# when its stochastic policy first reaches the mean return of D4RL's medium dataset it becomes the
# medium policy, and the whole replay buffer up to then is medium-replay; medium (1M transitions)
# and expert are collected with the stochastic policies, random with uniform actions, and
# medium-expert is medium followed by expert. Episodes are capped at 1000 steps, with terminations
# and truncations (time limits) kept apart.
#
#   python benchmark/make_dataset.py --env hopper halfcheetah walker2d      # train (resumable) + build
#   python benchmark/make_dataset.py --env hopper --from-policy             # rebuild from committed policies
#   python benchmark/make_dataset.py --env hopper --medium-replay           # rebuild medium-replay (SAC again)
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from tqdm import tqdm

ENVS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
D4RL_REF_SCORES = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0), "walker2d": (1.629008, 4592.3)}
D4RL_MEDIUM_RETURN = {"hopper": 1422.0, "halfcheetah": 4770.0, "walker2d": 2852.0}  # mean episode return of D4RL medium
D4RL_EXPERT_RETURN = {"hopper": 3234.3, "halfcheetah": 10656.0, "walker2d": 4592.3}  # near D4RL's expert datasets
HERE = os.path.dirname(os.path.abspath(__file__))
BUILT_LEVELS = ("medium", "random", "expert", "medium-expert")  # collected from the behavior policies


@dataclass
class Args:
    env: List[str] = field(default_factory=lambda: ["hopper"])
    """environments to build datasets for (hopper, halfcheetah, walker2d); one after another"""
    seed: int = 0
    """seed of SAC training and of the collection (the same seed gives the same datasets)"""
    levels: List[str] = field(default_factory=lambda: list(BUILT_LEVELS))
    """the datasets to collect from the policies (medium, random, expert, medium-expert); medium-replay comes from training"""
    from_policy: bool = False
    """skip training: rebuild medium, random (and expert, medium-expert) from the saved policies"""
    expert: bool = False
    """keep training after the medium level until the expert return (--expert-return), then build expert and medium-expert"""
    medium_replay: bool = False
    """rebuild medium-replay only: SAC again from step 0 to the medium return, checkpointed in --work-dir; saved policies and training states are kept"""
    medium_return: Optional[float] = None
    """stochastic-policy mean return that makes the medium policy (default: D4RL medium's mean return)"""
    expert_return: Optional[float] = None
    """stochastic-policy mean return that makes the expert policy (default: near D4RL's expert return)"""
    max_steps: int = 3_000_000
    """SAC environment-step budget; training stops with an error if the target is not reached by then"""
    num_transitions: int = 1_000_000
    """transitions of each collected dataset (medium, expert, random)"""
    max_episode_steps: int = 1000
    """episode cap (D4RL: 1000)"""
    num_envs: int = 10
    """vectorized environments for evaluation and collection"""
    eval_every: int = 5_000
    """evaluate the stochastic policy every this many SAC steps"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    learning_starts: int = 5_000
    """uniform-random steps before SAC updates begin"""
    batch_size: int = 256
    """SAC batch size"""
    learning_rate: float = 3e-4
    """SAC learning rate (actor, critics, entropy temperature)"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """target soft-update rate"""
    hidden_dim: int = 256
    """hidden width of the SAC networks"""
    checkpoint_every: int = 20_000
    """save a resumable training checkpoint every this many steps"""
    work_dir: str = os.path.join(HERE, "work")
    """training checkpoints with the replay buffer: an exact resume (large; not committed)"""
    state_dir: str = os.path.join(HERE, "policies", "training")
    """training state without the replay buffer (a few MB; commit it): continues a training whose work_dir was lost, not exactly"""
    policy_dir: str = os.path.join(HERE, "policies")
    """where the behavior policies are saved (committed)"""
    compile: bool = False
    """torch.compile the SAC loss; off by default: on this 2-core CPU with one thread it ran 73-74 updates/s against 85-90 eager"""
    threads: int = 0
    """torch threads (0: torch's default)"""


class TanhGaussianActor(nn.Module):
    def __init__(self, obs_dim, act_dim, hidden_dim):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, 2 * act_dim))

    def forward(self, obs):
        mean, log_std = self.net(obs).chunk(2, -1)
        log_std = -5.0 + 3.5 * (torch.tanh(log_std) + 1.0)  # in [-5, 2]
        u = mean + torch.randn_like(mean) * log_std.exp()
        action = torch.tanh(u)
        log_prob = (-0.5 * ((u - mean) / log_std.exp()).pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        return action, log_prob - torch.log(1.0 - action.pow(2) + 1e-6).sum(-1)


class TwinQ(nn.Module):
    """Both SAC critics as one ensemble network (one batched matrix product per layer): [2, batch]."""

    def __init__(self, obs_dim, act_dim, hidden_dim):
        super().__init__()
        dims = [obs_dim + act_dim, hidden_dim, hidden_dim, 1]
        bounds = [1.0 / math.sqrt(d) for d in dims[:-1]]  # nn.Linear's default initialization, per member
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(2, i, o).uniform_(-b, b)) for i, o, b in zip(dims, dims[1:], bounds))
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(2, 1, o).uniform_(-b, b)) for o, b in zip(dims[1:], bounds))

    def forward(self, obs, actions):
        x = torch.cat([obs, actions], -1).expand(2, *obs.shape[:-1], obs.shape[-1] + actions.shape[-1])
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(bias, x, weight)
            x = torch.relu(x) if i < len(self.weights) - 1 else x
        return x.squeeze(-1)


class SAC(nn.Module):
    """SAC with automatic entropy tuning. The critic, actor and temperature losses are summed and
    stepped by one Adam: each loss reaches only its own parameters (the actor's Q is evaluated with
    detached critic weights) and all use the parameters from before the step, as in the main
    scripts' CQL. On one CPU thread: 75-86 updates/s against 68-77 for three separate backward passes
    and optimizers; at ~0.8 GFLOP an update that is near what one core computes, so SAC here is
    bound by arithmetic, not by overhead."""

    def __init__(self, obs_dim, act_dim, args: Args):
        super().__init__()
        self.actor = TanhGaussianActor(obs_dim, act_dim, args.hidden_dim)
        self.critics = TwinQ(obs_dim, act_dim, args.hidden_dim)
        self.targets = TwinQ(obs_dim, act_dim, args.hidden_dim).requires_grad_(False)
        self.targets.load_state_dict(self.critics.state_dict())
        self.log_alpha = nn.Parameter(torch.zeros(()))
        self.target_entropy = -float(act_dim)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=args.learning_rate, fused=True)
        self.compute_loss = torch.compile(self.loss) if args.compile else self.loss
        self.args = args

    def loss(self, obs, actions, rewards, next_obs, terminals):
        args, alpha = self.args, self.log_alpha.exp().detach()
        with torch.no_grad():
            next_actions, next_log_prob = self.actor(next_obs)
            next_q = self.targets(next_obs, next_actions).min(0).values - alpha * next_log_prob
            target = rewards + args.gamma * (1.0 - terminals) * next_q
        critic_loss = (self.critics(obs, actions) - target).pow(2).mean(1).sum()
        new_actions, log_prob = self.actor(obs)
        frozen_critics = {name: p.detach() for name, p in self.critics.named_parameters()}
        q_new = torch.func.functional_call(self.critics, frozen_critics, (obs, new_actions)).min(0).values
        actor_loss = (alpha * log_prob - q_new).mean()
        alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
        return critic_loss + actor_loss + alpha_loss

    def update(self, obs, actions, rewards, next_obs, terminals):
        loss = self.compute_loss(obs, actions, rewards, next_obs, terminals)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            for target, online in zip(self.targets.parameters(), self.critics.parameters()):
                target.lerp_(online, self.args.tau)


def make_env(env_name, max_episode_steps):
    return gym.make(ENVS[env_name], max_episode_steps=max_episode_steps)


def new_episode(first_observation):
    return {"observations": [first_observation], "actions": [], "rewards": [], "terminations": [], "truncations": []}


def collect(env_name, policy, num_transitions, num_envs, max_episode_steps, seed, one_episode_each=False, name=None):
    """Episodes of a policy (None: uniform actions) from `num_envs` vectorized environments, until
    `num_transitions` steps (the last episode is cut there and marked truncated) or, with
    `one_episode_each`, until every environment has finished its first episode (an unbiased
    evaluation: the first N episodes to end would favour short ones)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the policy's arithmetic, hence the dataset, does not depend on --threads
    try:
        envs = gym.vector.SyncVectorEnv([lambda: make_env(env_name, max_episode_steps)] * num_envs,
                                        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        envs.action_space.seed(seed)
        torch.manual_seed(seed)  # the policy's action noise: the same seed gives the same dataset
        obs, _ = envs.reset(seed=seed)
        open_episodes = [new_episode(o) for o in obs]
        finished = np.zeros(num_envs, bool)
        bar = tqdm(total=num_transitions, desc=f"collect {name}", unit="step", mininterval=10, disable=name is None)
        episodes, steps = [], 0
        while True:
            if policy is None:
                actions = envs.action_space.sample()
            else:
                with torch.no_grad():
                    actions = policy(torch.as_tensor(obs, dtype=torch.float32))[0].numpy()
            next_obs, rewards, terminated, truncated, info = envs.step(actions)
            for i, episode in enumerate(open_episodes):
                if finished[i]:
                    continue
                done = terminated[i] or truncated[i]
                episode["observations"].append(info["final_obs"][i] if done else next_obs[i])
                episode["actions"].append(actions[i])
                episode["rewards"].append(rewards[i])
                episode["terminations"].append(bool(terminated[i]))
                episode["truncations"].append(bool(truncated[i]))
                steps += 1
                bar.update(1)
                cut = not one_episode_each and steps == num_transitions
                if done:
                    episodes.append({k: np.asarray(v) for k, v in episode.items()})
                    open_episodes[i] = new_episode(next_obs[i])
                    finished[i] = one_episode_each
                if cut:  # the budget is reached: every unfinished episode ends here, truncated
                    for unfinished in open_episodes:
                        if unfinished["actions"]:
                            unfinished["truncations"][-1] = True
                            episodes.append({k: np.asarray(v) for k, v in unfinished.items()})
                if cut or finished.all():
                    envs.close()
                    bar.close()
                    return episodes
            obs = next_obs
    finally:
        torch.set_num_threads(threads)


def evaluate(env_name, actor, args: Args, seed):
    """Mean return of the stochastic policy over `eval_episodes` episodes."""
    episodes = collect(env_name, actor, None, args.eval_episodes, args.max_episode_steps, seed, one_episode_each=True)
    return float(np.mean([e["rewards"].sum() for e in episodes]))


def replay_to_episodes(replay, size):
    """The SAC replay buffer (episodes stored in order) as a list of episodes; an unfinished last
    episode ends there, truncated."""
    truncations = replay["truncations"][:size].copy()
    truncations[-1] = not replay["terminations"][size - 1]
    ends = np.flatnonzero(replay["terminations"][:size] | truncations) + 1
    episodes, start = [], 0
    for end in ends:
        episodes.append({
            "observations": np.concatenate([replay["observations"][start:end], replay["next_observations"][end - 1:end]]),
            **{k: replay[k][start:end] for k in ("actions", "rewards", "terminations")}, "truncations": truncations[start:end],
        })
        start = end
    return episodes


def write_dataset(dataset_id, env_name, episodes, args: Args, description):
    import minari
    from minari.data_collector import EpisodeBuffer

    if dataset_id in minari.list_local_datasets():
        minari.delete_dataset(dataset_id)
    buffers = [EpisodeBuffer(id=i, observations=e["observations"], actions=e["actions"].astype(np.float32), rewards=e["rewards"],
                             terminations=e["terminations"], truncations=e["truncations"]) for i, e in enumerate(episodes)]
    spec = make_env(env_name, args.max_episode_steps).spec
    returns = [float(e["rewards"].sum()) for e in episodes]
    ref_min, ref_max = D4RL_REF_SCORES[env_name]
    try:
        create_dataset(minari, dataset_id, buffers, spec, args, episodes, returns, description)
    except OSError as err:
        raise SystemExit(f"error: writing {dataset_id} into the Minari store {minari_store()} failed ({err}). Free space "
                         f"or point MINARI_DATASETS_PATH at a writable directory, then rerun the same command: the "
                         f"training is kept in {args.work_dir}.")
    score = 100 * (np.mean(returns) - ref_min) / (ref_max - ref_min)
    print(f"wrote {dataset_id}: {sum(len(e['rewards']) for e in episodes)} transitions, {len(episodes)} episodes, "
          f"mean return {np.mean(returns):.1f} (normalized {score:.1f})")


def create_dataset(minari, dataset_id, buffers, spec, args: Args, episodes, returns, description):
    ref_min, ref_max = D4RL_REF_SCORES[dataset_id.split("/")[1]]
    minari.create_dataset_from_buffers(
        dataset_id, buffers, env=spec, eval_env=spec, algorithm_name="SAC (D4RL protocol, benchmark/make_dataset.py)",
        author="BAQ reference implementation", author_email="n/a", code_permalink="benchmark/make_dataset.py",
        ref_min_score=ref_min, ref_max_score=ref_max,
        description=f"{description} {sum(len(e['rewards']) for e in episodes)} transitions, {len(episodes)} episodes, "
                    f"mean episode return {np.mean(returns):.1f}. Seed {args.seed}.")


def save_atomically(obj, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(obj, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def train(env_name, args: Args):
    """Train SAC until the medium (and with --expert, the expert) return; resumable. A level whose
    policy is already saved is not a target again, so --expert never replaces a committed medium policy."""
    env = make_env(env_name, args.max_episode_steps)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    targets = {"medium": args.medium_return or D4RL_MEDIUM_RETURN[env_name]}
    if args.expert:
        targets["expert"] = args.expert_return or D4RL_EXPERT_RETURN[env_name]
    torch.manual_seed(args.seed)
    agent = SAC(obs_dim, act_dim, args)
    replay = {"observations": np.zeros((args.max_steps, obs_dim), np.float32),
              "next_observations": np.zeros((args.max_steps, obs_dim), np.float32),
              "actions": np.zeros((args.max_steps, act_dim), np.float32), "rewards": np.zeros(args.max_steps, np.float32),
              "terminations": np.zeros(args.max_steps, bool), "truncations": np.zeros(args.max_steps, bool)}
    state = {"step": 0, "replay_size": 0, "episodes": 0, "evaluations": [], "elapsed": 0.0, "reached": {}}
    training = f"{env_name}-sac-seed{args.seed}{'-medium-replay' if args.medium_replay else ''}"
    checkpoint_path = os.path.join(args.work_dir, f"{training}.pt")
    # a medium-replay rebuild's product is its replay buffer, so it continues only from its exact checkpoint
    state_path = None if args.medium_replay else os.path.join(args.state_dir, f"{training}.pt")
    resume_path = next((p for p in (checkpoint_path, state_path) if p and os.path.exists(p)), None)
    if resume_path:
        checkpoint = torch.load(resume_path, weights_only=True)
        agent.load_state_dict(checkpoint["agent"])
        agent.optimizer.load_state_dict(checkpoint["optimizer"])
        state = checkpoint["state"]
        if resume_path == checkpoint_path:
            for k in replay:
                replay[k][: state["replay_size"]] = checkpoint["replay"][k].numpy()
            print(f"{env_name}: resumed from {checkpoint_path} at step {state['step']} (exact)")
        else:  # the replay buffer is lost: refill it with the current policy before updating again
            state["replay_size"] = 0
            print(f"{env_name}: continued from the training state {state_path} at step {state['step']}; its replay buffer "
                  f"was not saved, so it is refilled with {args.learning_starts} steps of the current policy (not exact)")
    saved = {level for level in targets if os.path.exists(os.path.join(args.policy_dir, f"{env_name}-{level}.pt"))}
    if args.medium_replay:  # trains to the medium return again, keeping the saved medium policy
        saved = set()
    for level in sorted(saved - set(state["reached"])):
        print(f"{env_name}: the {level} policy is already saved in {args.policy_dir}; training does not replace it")

    def reseed():
        """Checkpoints fall between episodes and every random stream restarts from (seed, step) there,
        so an interrupted and resumed training is the same as an uninterrupted one."""
        torch.manual_seed(args.seed * 1_000_003 + state["step"])
        env.action_space.seed(args.seed * 1_000_003 + state["step"])
        return np.random.default_rng([args.seed, state["step"]])

    rng = reseed()

    def save_checkpoint():
        compact = {"agent": agent.state_dict(), "optimizer": agent.optimizer.state_dict(), "state": state}
        if state_path:
            save_atomically(compact, state_path)
        size = state["replay_size"]
        save_atomically({**compact, "replay": {k: torch.from_numpy(v[:size]) for k, v in replay.items()}}, checkpoint_path)

    def write_medium_replay(size, reached):  # the whole replay buffer up to the medium policy
        write_dataset(f"baq/{env_name}/medium-replay-v0", env_name, replay_to_episodes(replay, size), args,
                      f"Replay buffer of SAC up to the medium policy ({reached['step']} steps; stochastic return {reached['return']:.1f}).")

    def save_policy(level, mean_return):
        state["reached"][level] = {"step": state["step"], "return": mean_return, "elapsed": state["elapsed"]}
        if not args.medium_replay:
            save_atomically({"env": env_name, "level": level, "actor": agent.actor.state_dict(), "obs_dim": obs_dim,
                             "act_dim": act_dim, "hidden_dim": args.hidden_dim, "sac_steps": state["step"],
                             "stochastic_return": mean_return, "training_seconds": state["elapsed"], "seed": args.seed},
                            os.path.join(args.policy_dir, f"{env_name}-{level}.pt"))
        if level == "medium":
            write_medium_replay(state["replay_size"], state["reached"]["medium"])

    pending = [level for level in targets if level not in state["reached"] and level not in saved]
    if not pending:
        if args.medium_replay:  # a finished rebuild: write the dataset again from its checkpoint (the store may be new)
            write_medium_replay(state["reached"]["medium"]["step"], state["reached"]["medium"])
        return
    obs, _ = env.reset(seed=int(rng.integers(1 << 31)))
    last_eval, last_checkpoint = (state["evaluations"][-1][1] if state["evaluations"] else float("nan")), state["step"]
    # the budget is an upper bound: training stops at the target return, usually long before it
    bar = tqdm(total=args.max_steps, initial=state["step"], unit="step", smoothing=0.05,
               desc=f"SAC {env_name} until the {pending[-1]} return {targets[pending[-1]]:.0f} (budget)")
    start = time.time() - state["elapsed"]
    while pending:
        step, size = state["step"], state["replay_size"]
        if step >= args.max_steps:  # no checkpoint here: checkpoints stay on episode boundaries
            raise SystemExit(
                f"error: SAC on {env_name} did not reach the {pending[0]} return {targets[pending[0]]:.0f} within --max-steps "
                f"{args.max_steps} (last stochastic return {last_eval:.1f}). Rerun with a larger --max-steps: training "
                f"continues from the last checkpoint in {args.work_dir} (step {last_checkpoint}).")
        if step < args.learning_starts:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                action = agent.actor(torch.as_tensor(obs, dtype=torch.float32)[None])[0][0].numpy()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for key, value in (("observations", obs), ("next_observations", next_obs), ("actions", action), ("rewards", reward),
                           ("terminations", terminated), ("truncations", truncated)):
            replay[key][size] = value
        state["step"], state["replay_size"] = step, size = step + 1, size + 1
        obs = next_obs
        if size >= args.learning_starts:
            idx = torch.as_tensor(rng.integers(0, size, args.batch_size))
            agent.update(*(torch.as_tensor(replay[k][idx]).float() for k in
                           ("observations", "actions", "rewards", "next_observations", "terminations")))
        if step % args.eval_every == 0:
            last_eval = evaluate(env_name, agent.actor, args, seed=args.seed + 1_000_000 + step)
            state["evaluations"].append((step, last_eval))
            state["elapsed"] = time.time() - start
            bar.set_postfix(stochastic_return=f"{last_eval:.0f}", target=f"{targets[pending[0]]:.0f}", alpha=f"{agent.log_alpha.exp().item():.3f}")
            if last_eval >= targets[pending[0]]:
                tqdm.write(f"{env_name}: {pending[0]} policy at step {step} (stochastic return {last_eval:.1f}, {state['elapsed'] / 60:.1f} min)")
                save_policy(pending.pop(0), last_eval)
        bar.update(1)
        if terminated or truncated:
            state["episodes"] += 1
            state["elapsed"] = time.time() - start
            if step - last_checkpoint >= args.checkpoint_every:
                save_checkpoint()
                last_checkpoint, rng = step, reseed()
            obs, _ = env.reset(seed=int(rng.integers(1 << 31)))
    save_checkpoint()  # the finished training, mid-episode: never continued, it records the levels reached
    bar.close()


def load_policy(env_name, level, args: Args):
    path = os.path.join(args.policy_dir, f"{env_name}-{level}.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: --from-policy needs {path}, which does not exist. Train it first with "
                         f"`python benchmark/make_dataset.py --env {env_name}{' --expert' if level == 'expert' else ''}`.")
    saved = torch.load(path, weights_only=True)
    actor = TanhGaussianActor(saved["obs_dim"], saved["act_dim"], saved["hidden_dim"])
    actor.load_state_dict(saved["actor"])
    return actor, saved


def build_datasets(env_name, args: Args):
    """The --levels datasets; each collection has its own seed, so a level is the same whichever others are built."""
    episodes, about = {}, {}
    for level, seed in (("medium", args.seed + 1), ("expert", args.seed + 3)):
        path = os.path.join(args.policy_dir, f"{env_name}-{level}.pt")
        wanted = level in args.levels or "medium-expert" in args.levels
        if wanted and (level == "medium" or args.expert or os.path.exists(path)):
            policy, info = load_policy(env_name, level, args)
            episodes[level] = collect(env_name, policy, args.num_transitions, args.num_envs, args.max_episode_steps,
                                      seed, name=f"baq/{env_name}/{level}-v0")
            about[level] = (f"SAC policy after {info['sac_steps']} steps (stochastic return "
                            f"{info['stochastic_return']:.1f}), sampled stochastically;")
            if level in args.levels:
                write_dataset(f"baq/{env_name}/{level}-v0", env_name, episodes[level], args,
                              f"{level.capitalize()}: {about[level]}")
    if "random" in args.levels:
        random_episodes = collect(env_name, None, args.num_transitions, args.num_envs, args.max_episode_steps,
                                  args.seed + 2, name=f"baq/{env_name}/random-v0")
        write_dataset(f"baq/{env_name}/random-v0", env_name, random_episodes, args, "Random: uniform actions;")
    if "medium-expert" in args.levels and "expert" in episodes:
        write_dataset(f"baq/{env_name}/medium-expert-v0", env_name, episodes["medium"] + episodes["expert"], args,
                      f"Medium-expert: medium ({about['medium']}) followed by expert ({about['expert']})")


def minari_store() -> str:
    return os.environ.get("MINARI_DATASETS_PATH", os.path.join(os.path.expanduser("~"), ".minari", "datasets"))


def check_store():
    """The datasets go into the Minari store: refuse an unusable one before any training, creating nothing."""
    store = existing = minari_store()
    while not os.path.exists(existing):
        existing = os.path.dirname(existing.rstrip(os.sep)) or "."
    problem = None
    if not os.path.isdir(existing):
        problem = f"{existing} is a file, not a directory"
    else:
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as err:
            problem = f"{existing} is not writable ({err.strerror})"
    if problem:
        raise SystemExit(f"error: the Minari store {store} (MINARI_DATASETS_PATH) cannot hold the datasets: {problem}. "
                         f"Point MINARI_DATASETS_PATH at a writable directory, e.g. `export "
                         f"MINARI_DATASETS_PATH=$HOME/minari-datasets`, and rerun.")


def main(args: Args):
    if args.medium_replay and (args.from_policy or args.expert):
        raise SystemExit(f"error: --medium-replay cannot be combined with {'--from-policy' if args.from_policy else '--expert'}: "
                         f"it is a training of its own that writes only medium-replay. Run it as a separate command "
                         f"(`python benchmark/make_dataset.py --env {' '.join(args.env)} --medium-replay`).")
    check_store()
    if not set(args.levels) <= set(BUILT_LEVELS):
        raise SystemExit(f"error: --levels {' '.join(args.levels)}: each must be one of {', '.join(BUILT_LEVELS)} "
                         f"(medium-replay is the replay buffer of SAC's training: build it with --medium-replay).")
    unknown = [e for e in args.env if e not in ENVS]
    if unknown:
        raise SystemExit(f"error: --env {' '.join(unknown)}: unknown environment; choose from {', '.join(ENVS)}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    for env_name in args.env:
        if not args.from_policy:
            train(env_name, args)
        if args.medium_replay:
            continue
        start = time.time()
        build_datasets(env_name, args)
        print(f"{env_name}: datasets collected in {time.time() - start:.0f} s")


if __name__ == "__main__":
    arguments = tyro.cli(Args)
    try:
        main(arguments)
    except KeyboardInterrupt:
        print(f"\ninterrupted: SAC training checkpoints are in {arguments.work_dir} (exact) and {arguments.state_dir} "
              f"(without the replay buffer); rerun the same command to continue from the last one.", file=sys.stderr)
        raise SystemExit(130)
