# Updates per second of each phase of the fine-tuning scripts, side by side, and the cost of BAQ's
# weights and priorities against plain fine-tuning. Halfcheetah sizes (obs 17, actions 6), batch
# 256, a 1M-transition buffer of synthetic data: the arithmetic and memory traffic of a real run
# without the environment.
#
#   python benchmark/speed.py            # writes benchmark/runs/speed.md (untracked)
#   python benchmark/speed.py --output benchmark/results/speed.md     # updates the committed table
import importlib
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import List

import numpy as np
import torch
import tyro

ONLINE_CAPACITY = 200_000  # room for the online steps a measurement appends
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@dataclass
class Args:
    scripts: List[str] = field(default_factory=lambda: ["baq_iql", "baq_cql"])
    """fine-tuning scripts to measure (module names)"""
    threads: int = 2
    """torch threads (the peer figures are for 2)"""
    offline_size: int = 1_000_000
    """offline transitions in the buffer"""
    obs_dim: int = 17
    """observation size (halfcheetah)"""
    act_dim: int = 6
    """action size (halfcheetah)"""
    seconds: float = 10.0
    """timed seconds per measurement (after warm-up)"""
    rounds: int = 5
    """plain and BAQ online steps are timed alternately this many times (seconds/rounds each); the BAQ
    cost is the median of the rounds' ratios, which cancels this machine's drift of +/-10% between runs"""
    warmup: int = 10
    """untimed updates first (includes torch.compile's compilation)"""
    cuda: bool = True
    """also measure on CUDA when it is available"""
    output: str = os.path.join(ROOT, "benchmark", "runs", "speed.md")
    """markdown table written here (untracked by default; pass benchmark/results/speed.md to update the committed one)"""
    keep_freed_memory: bool = True
    """keep freed memory in glibc's heap, as the scripts do on a CPU (--no-keep-freed-memory measures its gain)"""


def filled_buffer(script, args: Args, device):
    generator = np.random.default_rng(0)
    n = args.offline_size
    buffer = script.ReplayBuffer(n + ONLINE_CAPACITY, args.obs_dim, args.act_dim, device, seed=0)
    obs = generator.standard_normal((n, args.obs_dim), dtype=np.float32)
    actions = generator.uniform(-1, 1, (n, args.act_dim)).astype(np.float32)
    buffer.add(obs, actions, generator.standard_normal(n), np.roll(obs, -1, 0), np.zeros(n), np.ones(n), np.ones(n))
    return buffer


def rate(step, args: Args, device, seconds=None):
    """Calls of `step` per second over about `seconds`, synchronizing the device only at the ends."""
    def timed(calls):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return calls / (time.perf_counter() - start)

    for _ in range(args.warmup):
        step()
    return timed(max(5, int((seconds or args.seconds) * timed(5))))


def measure(script, args: Args, device, compile: bool):
    """{phase: updates per second} for one script."""
    torch.manual_seed(0)
    script_args = script.Args(compile=compile, batch_size=256)
    buffer = filled_buffer(script, args, device)
    agent = script.Agent(args.obs_dim, args.act_dim, 1.0, script_args).to(device)
    unit_weights = torch.ones(256, device=device)
    results = {"offline": rate(lambda: agent.update(buffer.sample(256)[1], unit_weights), args, device)}

    bc_policy = script.GaussianPolicy(args.obs_dim, args.act_dim, script_args.hidden_dim, 1.0).to(device)
    bc_optimizer = torch.optim.Adam(bc_policy.parameters(), lr=3e-4)

    def bc_step():
        obs, actions, *_ = buffer.sample(256)[1]
        loss = -bc_policy.log_prob(obs, actions).mean()
        bc_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        bc_optimizer.step()

    results["bc"] = rate(bc_step, args, device)
    bc_policy.requires_grad_(False)
    n_metrics = len(agent.METRICS) + 3
    metric_sum = torch.zeros(n_metrics, device=device)
    transition = torch.randn(1, args.obs_dim, device=device)

    def online_step(baq: bool):
        # what the online loop does per environment step, without the environment itself
        action = agent.act(transition, deterministic=False)
        if baq:
            divergence = script.bc_divergence(bc_policy, transition, action)
            weight, priority = script.behavior_weight(divergence, 0.1), script.behavior_priority(divergence, args.act_dim, 0.5, 1.0)
        else:
            weight = priority = torch.ones(1, device=device)
        buffer.add(transition, action, [0.0], transition, [0.0], weight, priority)
        idx, batch = buffer.sample(256, prioritized=baq)
        batch_terms = torch.stack([buffer.weights[idx].mean(), buffer.priorities[idx].mean(),
                                   (idx >= args.offline_size).float().mean()])
        metric_sum.add_(torch.cat([agent.update(batch, buffer.weights[idx]), batch_terms]))

    rates = {"online (plain)": [], "online (BAQ)": []}
    for _ in range(args.rounds):
        for name, baq in (("online (plain)", False), ("online (BAQ)", True)):
            buffer.size = args.offline_size  # the same buffer contents for both
            rates[name].append(rate(lambda: online_step(baq), args, device, args.seconds / args.rounds))
    results.update({name: float(np.median(values)) for name, values in rates.items()})
    results["BAQ cost"] = float(np.median(np.array(rates["online (plain)"]) / np.array(rates["online (BAQ)"]))) - 1.0
    return results


def main(args: Args):
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if args.cuda and torch.cuda.is_available() else [])
    rows = []
    for name in args.scripts:
        script = importlib.import_module(name)
        if args.keep_freed_memory and hasattr(script, "keep_freed_memory"):
            script.keep_freed_memory()  # as the script's main does on a CPU (CQL only)
        for device in devices:
            for compile in (False, True):
                results = measure(script, args, device, compile)
                rows.append((f"{name}.py", device.type, "compiled" if compile else "eager", results))
                print(f"{name} {device.type} {'compiled' if compile else 'eager'}: " +
                      ", ".join(f"{phase} {value:.3g}" for phase, value in results.items()), flush=True)
    phases = [phase for phase in rows[0][3] if phase != "BAQ cost"]
    lines = [f"Updates per second, halfcheetah sizes (obs {args.obs_dim}, actions {args.act_dim}), batch 256, "
             f"{args.offline_size:,} offline transitions, {args.threads} torch threads, {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}. Online columns: medians over {args.rounds} alternating rounds; BAQ cost: the "
             f"median over rounds of plain rate / BAQ rate - 1.", "",
             "| script | device | mode | " + " | ".join(phases) + " | BAQ cost |", "|" + "---|" * (len(phases) + 4)]
    for script, device, mode, results in rows:
        lines.append(f"| {script} | {device} | {mode} | " + " | ".join(f"{results[p]:.1f}" for p in phases)
                     + f" | {100 * results['BAQ cost']:+.1f}% |")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Args))
