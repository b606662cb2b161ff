"""The adaptive behavior constraint (the later paper's dual objective, as this project reads it):
lambda_t E_s[u(s) mean((pi(s) - pi_BC(s))^2)], u(s) = 1 - exp(-|Q1 - Q2|(s, pi(s)) / delta_0),
lambda_t = lambda_0 / (1 + n_conf / n_half)."""
import importlib
import math

import pytest
import torch

from conftest import PIPELINE_SCRIPTS, read_scalars


@pytest.fixture(params=PIPELINE_SCRIPTS)
def script(request):
    return importlib.import_module(request.param)


class HandBuiltCritics(torch.nn.Module):
    """Q1 = s_0, Q2 = -s_0: the critics disagree by 2 |s_0| whatever the action."""

    def forward(self, obs, actions):
        return torch.stack([obs[:, 0], -obs[:, 0]])


def agent_with_hand_built_critics(script):
    agent = script.Agent(2, 2, 1.0, script.Args(compile=False, hidden_dim=8))
    agent.qf = HandBuiltCritics()
    return agent


def test_gate_grows_with_disagreement_and_the_term_matches_hand_computation(script):
    agent = agent_with_hand_built_critics(script)
    obs = torch.tensor([[0.1, 0.0], [1.0, 0.0]])  # disagreements 0.2 and 2.0
    policy_actions = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    bc_actions = torch.tensor([[0.1, 0.5], [0.5, -0.5]])  # mean squared differences 0.08 and 0.5
    loss, gate_mean = agent.behavior_constraint(obs, policy_actions, bc_actions, coef=2.0, scale=1.0)
    gates = [1 - math.exp(-0.2), 1 - math.exp(-2.0)]
    assert gates[1] > gates[0]
    assert gate_mean.item() == pytest.approx(sum(gates) / 2)
    assert loss.item() == pytest.approx(2.0 * (gates[0] * 0.08 + gates[1] * 0.5) / 2)


def test_term_is_zero_where_pi_equals_pi_bc_and_reaches_only_the_actor(script):
    torch.manual_seed(0)
    agent = script.Agent(3, 2, 1.0, script.Args(compile=False, hidden_dim=8))
    obs = torch.randn(5, 3)
    same = agent.act(obs, deterministic=True)
    loss, _ = agent.behavior_constraint(obs, same, same, coef=1.0, scale=1.0)
    assert loss.item() == 0.0
    policy_actions = agent.actor(obs) if script.ALGORITHM == "iql" else agent.actor(obs, deterministic=True)[0]
    loss, _ = agent.behavior_constraint(obs, policy_actions, torch.zeros(5, 2), coef=1.0, scale=1.0)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.actor.parameters())
    assert all(p.grad is None for p in agent.qf.parameters())


def test_off_or_zero_weight_changes_nothing(script):
    import copy

    torch.manual_seed(0)
    agent = script.Agent(3, 2, 1.0, script.Args(compile=False, hidden_dim=8, **({"cql_n_actions": 2}
                                                                              if script.ALGORITHM == "cql" else {})))
    twin = copy.deepcopy(agent)
    generator = torch.Generator().manual_seed(1)
    batch = (torch.randn(6, 3, generator=generator), torch.rand(6, 2, generator=generator) * 2 - 1,
             torch.randn(6, generator=generator), torch.randn(6, 3, generator=generator), torch.zeros(6))
    weights = torch.ones(6)
    torch.manual_seed(2)
    plain = agent.update(batch, weights)
    torch.manual_seed(2)
    zero = twin.update(batch, weights, (torch.zeros(6, 2), torch.tensor(0.0), torch.tensor(1.0)))
    assert len(zero) == len(plain) + 2 and zero[-2].item() == 0.0  # the term, then the mean gate
    torch.testing.assert_close(zero[:len(plain)], plain)
    for (name, a), b in zip(agent.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("name", PIPELINE_SCRIPTS)
def test_a_run_with_the_constraint_logs_its_terms(run_script, tmp_path, name):
    result, run_dir = run_script(f"{name}.py", tmp_path / "runs", "--behavior-constraint", "--constraint-half-life", "1",
                                 "--log-every", "1")
    assert result.returncode == 0, result.stderr
    lambda_0 = importlib.import_module(name).Args().constraint_coef  # each script's measured default
    assert "behavior constraint: delta_0 " in result.stdout and " at pi(s) over " in result.stdout
    assert run_dir.name.split("__")[1] == f"{name}-adaptive"
    scalars = read_scalars(run_dir)
    for tag in ("baq/constraint_coef", "baq/constraint_loss", "baq/uncertainty_mean", "baq/confident_transitions"):
        values = [value for _, value in scalars[tag]]
        assert values and all(math.isfinite(v) for v in values), tag
    coefs = [value for _, value in scalars["baq/constraint_coef"]]
    assert all(0 < c <= lambda_0 for c in coefs)
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(coefs, coefs[1:]))  # float32
    confident = [value for _, value in scalars["baq/confident_transitions"]]  # logged every step: n_conf itself
    assert all(n == int(n) for n in confident) and confident == sorted(confident) and confident[-1] >= 1
    assert coefs == pytest.approx([lambda_0 / (1 + n / 1) for n in confident], rel=1e-6)  # lambda_0 / (1 + n / n_half)
    assert all(0 <= u < 1 for _, u in scalars["baq/uncertainty_mean"])


def test_constraint_scale_measures_the_two_gradients(run_script, tmp_path, minari_store):
    """benchmark/constraint_scale.py (the measurement behind --constraint-coef's default) on tiny checkpoints."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    from test_pretrain import BC_FLAGS, OFFLINE_FLAGS

    made, offline_dir = run_script("offline_pretrain.py", tmp_path / "offline", *OFFLINE_FLAGS, tiny=False)
    cloned, bc_dir = run_script("bc_pretrain.py", tmp_path / "bc", *BC_FLAGS, tiny=False)
    assert made.returncode == 0 and cloned.returncode == 0, made.stderr + cloned.stderr
    result = subprocess.run([sys.executable, str(ROOT / "benchmark" / "constraint_scale.py"), "--env-id", "baq/hopper/tiny-v0",
                             "--offline-checkpoint", str(offline_dir / "offline.pt"), "--bc-checkpoint",
                             str(bc_dir / "bc.pt"), "--batches", "5"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MINARI_DATASETS_PATH": str(minari_store)})
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    ratio = float(line.split("lambda_0 for equal pulls: median ")[1].split()[0])
    assert line.startswith("baq_iql on baq/hopper/tiny-v0: delta_0") and math.isfinite(ratio) and ratio > 0
