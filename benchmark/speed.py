# Updates per second of each phase of the fine-tuning scripts, side by side, the cost of BAQ's
# weights and priorities against plain fine-tuning, and the online steps per second of the paper's
# baselines (benchmark/baselines/: several updates per step). Halfcheetah sizes (obs 17, actions 6),
# batch 256, a 1M-transition buffer of synthetic data: the arithmetic and memory traffic of a real
# run without the environment.
#
#   python benchmark/speed.py            # writes benchmark/runs/speed.md (untracked)
#   python benchmark/speed.py --output benchmark/results/speed.md     # updates the committed table
import importlib
import importlib.util
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
    baselines: List[str] = field(default_factory=lambda: ["so2-iql", "so2-cql", "suf-iql", "suf-cql", "off2on-cql"])
    """baselines to measure, {so2,suf}-{iql,cql} and off2on-cql (none: skip them)"""
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
    cpu: bool = True
    """measure on the CPU (--no-cpu: CUDA only, as the device check does)"""
    cuda: bool = True
    """also measure on CUDA when it is available"""
    output: str = os.path.join(ROOT, "benchmark", "runs", "speed.md")
    """markdown table written here (untracked by default; pass benchmark/results/speed.md to update the committed one)"""
    keep_freed_memory: bool = True
    """keep freed memory in glibc's heap, as the scripts do on a CPU (--no-keep-freed-memory measures its gain)"""


def synthetic_data(args: Args):
    """(s, a, r, s', terminal) of args.offline_size random transitions."""
    generator = np.random.default_rng(0)
    n = args.offline_size
    obs = generator.standard_normal((n, args.obs_dim), dtype=np.float32)
    actions = generator.uniform(-1, 1, (n, args.act_dim)).astype(np.float32)
    return obs, actions, generator.standard_normal(n), np.roll(obs, -1, 0), np.zeros(n)


def filled_buffer(buffer_class, args: Args, device):
    """A buffer of that class holding the synthetic offline data (w = rho = 1 in a buffer that has them)."""
    buffer = buffer_class(args.offline_size + ONLINE_CAPACITY, args.obs_dim, args.act_dim, device, 0)
    buffer.add(*synthetic_data(args))
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
    buffer = filled_buffer(script.ReplayBuffer, args, device)
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


def load_baseline(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmark", "baselines", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_baseline(name: str, args: Args, device, compile: bool) -> float:
    """Online environment steps per second of a baseline's default loop, without the environment: SO2's
    10 critic updates and one actor update, SUF's 10 critic updates and 5 actor updates, Off2On's density
    ratio update, one SAC update on a prioritized batch and the batch's new priorities."""
    method, algo = name.split("-")
    script = load_baseline(method)
    torch.manual_seed(0)
    script_args = script.Args(offline_checkpoint="", compile=compile, actor_lr=3e-4 if algo == "iql" else 3e-5)
    agent = (script.FineTuneCQL if method == "off2on" else script.FINE_TUNING_AGENTS[algo])(
        args.obs_dim, args.act_dim, 1.0, script_args).to(device)
    transition = torch.randn(1, args.obs_dim, device=device)
    if method == "off2on":
        buffer = filled_buffer(script.BalancedReplayBuffer, args, device)
        density = script.DensityRatio(args.obs_dim, args.act_dim, 256).to(device)
        density_optimizer = torch.optim.Adam(density.parameters(), lr=3e-4)

        def online_step():
            action = agent.act(transition, deterministic=False)
            buffer.add(transition, action, [0.0], transition, [0.0])
            offline_w = density(*buffer.sample_uniform(256, 0, args.offline_size))
            loss = script.density_ratio_loss(offline_w, density(*buffer.sample_uniform(256, args.offline_size, buffer.size)))
            density_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            density_optimizer.step()
            idx, batch = buffer.sample(256)
            agent.update_critic(batch)
            agent.update_actor(batch)
            with torch.no_grad():
                buffer.set_priorities(idx, script.off2on_priorities(density(batch[0], batch[1]), offline_w, 5.0))
    else:
        buffer = filled_buffer(script.UniformReplayBuffer, args, device)
        actor_updates = 1 if method == "so2" else script_args.critic_updates // script_args.actor_delay

        def online_step():
            action = agent.act(transition, deterministic=False)
            buffer.add(transition, action, [0.0], transition, [0.0])
            for _ in range(script_args.critic_updates):
                batch = buffer.sample(256)
                agent.update_critic(batch)
            for _ in range(actor_updates):
                agent.update_actor(batch)

    return rate(online_step, args, device, args.seconds)


def main(args: Args):
    torch.set_num_threads(args.threads)
    devices = ([torch.device("cpu")] if args.cpu else []) + (
        [torch.device("cuda")] if args.cuda and torch.cuda.is_available() else [])
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
    lines = [f"Halfcheetah sizes (obs {args.obs_dim}, actions {args.act_dim}), batch 256, {args.offline_size:,} offline "
             f"transitions, {args.threads} torch threads, {platform.processor() or platform.machine()}, torch {torch.__version__}."]
    if rows:
        phases = [phase for phase in rows[0][3] if phase != "BAQ cost"]
        lines += ["", f"Updates per second. Online columns: medians over {args.rounds} alternating rounds; BAQ cost: the "
                  f"median over rounds of plain rate / BAQ rate - 1.", "",
                  "| script | device | mode | " + " | ".join(phases) + " | BAQ cost |", "|" + "---|" * (len(phases) + 4)]
        for script, device, mode, results in rows:
            lines.append(f"| {script} | {device} | {mode} | " + " | ".join(f"{results[p]:.1f}" for p in phases)
                         + f" | {100 * results['BAQ cost']:+.1f}% |")
    if args.baselines:
        lines += ["", "Online environment steps per second of the baselines' default loops (updates only, no environment; "
                  "SO2: 10 critic + 1 actor updates per step, SUF: 10 + 5, Off2On: density ratio + 1 + 1), and the "
                  "updates' share of a 30,000-step run.", "",
                  "| baseline | device | mode | steps/s | 30,000 steps |", "|---|---|---|---|---|"]
        for name in args.baselines:
            for device in devices:
                for compile in (False, True):
                    steps_per_second = measure_baseline(name, args, device, compile)
                    mode = "compiled" if compile else "eager"
                    print(f"{name} {device.type} {mode}: {steps_per_second:.3g} steps/s", flush=True)
                    lines.append(f"| {name} | {device.type} | {mode} | {steps_per_second:.1f} | "
                                 f"{30_000 / steps_per_second / 60:.0f} min |")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Args))
