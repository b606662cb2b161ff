# How strongly the adaptive behavior constraint pulls at the start of fine-tuning, against the actor's own
# objective: on batches of the offline data (what the buffer holds when fine-tuning starts), the norm of the
# actor loss's gradient on the actor's network and that of the constraint term with lambda = 1. Their
# ratio is the lambda_0 at which the two pulls are equal, the measurement behind --constraint-coef's default.
#
#   python benchmark/constraint_scale.py --script baq_iql --env-id baq/hopper/medium-v0 \
#       --offline-checkpoint <offline.pt> --bc-checkpoint <bc.pt>
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Args:
    offline_checkpoint: str
    """the offline.pt fine-tuning would start from"""
    bc_checkpoint: str
    """the bc.pt of the same dataset"""
    script: Literal["baq_iql", "baq_cql"] = "baq_iql"
    """the fine-tuning script whose agent and constraint to measure"""
    env_id: str = "baq/hopper/medium-v0"
    """the dataset both checkpoints were trained on"""
    batches: int = 50
    """batches of 256 offline transitions to measure on"""
    seed: int = 0
    """seed of the batch draws"""


def gradient_norm(loss, parameters) -> float:
    gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
    return float(torch.sqrt(sum(g.pow(2).sum() for g in gradients if g is not None)))


def main(args: Args):
    script = importlib.import_module(args.script)
    torch.manual_seed(args.seed)
    data, _, _, _, max_action = script.load_offline_data(args.env_id)
    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    context = {"dataset_id": args.env_id, "obs_dim": obs_dim, "act_dim": act_dim}
    offline = script.load_checkpoint(args.offline_checkpoint, "--offline-checkpoint", "offline", (script.ALGORITHM,), context)
    bc = script.load_checkpoint(args.bc_checkpoint, "--bc-checkpoint", "bc", ("bc",), context)
    script_args = script.Args(compile=False, hidden_dim=offline["hidden_dim"])
    agent = script.Agent(obs_dim, act_dim, max_action, script_args)
    agent.load_pretrained(offline["state_dict"])
    agent.start_online()
    bc_policy = script.GaussianPolicy(obs_dim, act_dim, offline["hidden_dim"], max_action)
    bc_policy.load_state_dict(bc["state_dict"])
    bc_policy.requires_grad_(False)

    def column(name, normalize=False):
        values = torch.as_tensor(data[name], dtype=torch.float32)
        return (values - offline["obs_mean"]) / offline["obs_std"] if normalize else values

    obs, next_obs = column("observations", True), column("next_observations", True)
    actions, rewards, terminals = column("actions"), column("rewards") * offline["reward_scale"], column("terminals")
    states = obs[torch.randperm(len(obs))[:65536]]
    delta_0 = agent.q_disagreement(states, agent.act(states, deterministic=True)).mean().clamp(min=1e-6)
    actor_parameters = list(agent.actor.net.parameters())  # what both terms reach (not the log-std parameters)
    actor_norms, constraint_norms, gates = [], [], []
    for _ in range(args.batches):
        idx = torch.randint(0, len(obs), (256,))
        batch = (obs[idx], actions[idx], rewards[idx], next_obs[idx], terminals[idx])
        total_loss, _ = agent.losses(*batch, torch.ones(256))  # only the actor loss reaches the actor's parameters
        actor_norms.append(gradient_norm(total_loss, actor_parameters))
        policy_actions = agent.actor(batch[0]) if args.script == "baq_iql" else agent.actor(batch[0], deterministic=True)[0]
        term, gate = agent.behavior_constraint(batch[0], policy_actions, bc_policy(batch[0]), 1.0, delta_0)
        constraint_norms.append(gradient_norm(term, actor_parameters))
        gates.append(float(gate))
    ratio = np.array(actor_norms) / np.array(constraint_norms)
    print(f"{args.script} on {args.env_id}: delta_0 {float(delta_0):.4g}, mean gate u {np.mean(gates):.3f}; gradient "
          f"norm on the actor: actor loss {np.median(actor_norms):.4g}, constraint (lambda = 1) "
          f"{np.median(constraint_norms):.4g}; lambda_0 for equal pulls: median {np.median(ratio):.3g} "
          f"(quartiles {np.percentile(ratio, 25):.3g}-{np.percentile(ratio, 75):.3g}) over {args.batches} batches")


if __name__ == "__main__":
    main(tyro.cli(Args))
