"""The paper's baselines (benchmark/baselines/): SO2's perturbed value update, SUF's update counts,
Off2On's density-ratio loss, priorities and sum tree, each script end to end from an offline
checkpoint of each backbone, and wrong checkpoints refused."""
import importlib.util
import math

import numpy as np
import pytest
import torch

from conftest import ROOT, read_scalars
from test_pretrain import OFFLINE_FLAGS, load

BASELINE_FLAGS = ["--online-steps", "40", "--eval-every", "20", "--eval-episodes", "2", "--log-every", "10",
                  "--batch-size", "32", "--hidden-dim", "32", "--no-cuda", "--threads", "1"]


def baseline(name: str):
    """A baseline script imported as a module (its Args need an --offline-checkpoint: pass one)."""
    spec = importlib.util.spec_from_file_location(f"baseline_{name}", ROOT / "benchmark" / "baselines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def offline_checkpoints(run_script, tmp_path_factory):
    """{algo: offline.pt} from offline_pretrain.py on the tiny dataset."""
    checkpoints = {}
    for algo in ("iql", "cql"):
        made, run_dir = run_script("offline_pretrain.py", tmp_path_factory.mktemp(f"offline_{algo}") / "runs", "--algo",
                                   algo, *OFFLINE_FLAGS, tiny=False)
        assert made.returncode == 0, made.stderr
        checkpoints[algo] = run_dir / "offline.pt"
    return checkpoints


# --- SO2 -------------------------------------------------------------------------------------
def test_perturbed_actions_match_hand_computation():
    so2 = baseline("so2")
    actions = torch.tensor([[0.0, 0.9, -0.5], [0.95, -0.95, 0.2]])
    torch.manual_seed(3)
    perturbed = so2.perturbed_actions(actions, 0.3, 0.6, 2.0)
    torch.manual_seed(3)
    eps = torch.randn(2, 3)  # the same draws, by hand: sigma 0.3, clip 0.6, both in units of max_action 2
    expected = (actions + (0.3 * eps).clamp(-0.6, 0.6) * 2.0).clamp(-2.0, 2.0)
    torch.testing.assert_close(perturbed, expected)
    big = so2.perturbed_actions(torch.zeros(10_000, 1), 0.3, 0.6, 1.0)
    assert big.abs().max() <= 0.6 + 1e-6 and 0.25 < big.std() < 0.3  # a clipped N(0, 0.09): std 0.27


class LinearCritics(torch.nn.Module):
    """Q1 = Q2 = sum(a): a perturbation of the action shows in the value."""

    def forward(self, obs, actions):
        return actions.sum(-1).expand(2, -1)


def test_so2_iql_regresses_v_to_the_critic_at_perturbed_actions():
    """Our placement for IQL: V's expectile target is min Q_target(s, a + eps); the advantage is clean."""
    so2 = baseline("so2")
    args = so2.Args(offline_checkpoint="unused", compile=False, hidden_dim=8, actor_lr=3e-4)
    agent = so2.FineTuneIQL(3, 2, 1.0, args, target_noise=(0.3, 0.6))
    agent.qf_target = LinearCritics()
    obs, actions = torch.randn(5, 3), torch.tensor([[0.1, -0.2]] * 5)
    batch = (obs, actions, torch.zeros(5), torch.randn(5, 3), torch.zeros(5))
    torch.manual_seed(0)
    _, metrics = agent.critic_loss(*batch)
    torch.manual_seed(0)
    target_q = so2.perturbed_actions(actions, 0.3, 0.6, 1.0).sum(-1)
    v = agent.vf(obs).squeeze(-1)
    diff = target_q - v
    expected = (torch.abs(0.7 - (diff < 0).float()) * diff.pow(2)).mean()
    torch.testing.assert_close(metrics[1], expected.detach())
    clean = so2.FineTuneIQL(3, 2, 1.0, args)  # no noise: IQL's own V target
    clean.load_state_dict(agent.state_dict(), strict=False)
    clean.qf_target = LinearCritics()
    clean_diff = actions.sum(-1) - clean.vf(obs).squeeze(-1)
    expected_clean = (torch.abs(0.7 - (clean_diff < 0).float()) * clean_diff.pow(2)).mean()
    torch.testing.assert_close(clean.critic_loss(*batch)[1][1], expected_clean.detach())
    assert not torch.isclose(metrics[1], expected_clean)
    # the actor's advantage uses the clean action: its loss is deterministic
    torch.testing.assert_close(agent.actor_loss(*batch)[0], agent.actor_loss(*batch)[0])


def test_so2_cql_target_perturbs_the_critic_action_not_the_entropy_term():
    so2 = baseline("so2")
    args = so2.Args(offline_checkpoint="unused", compile=False, hidden_dim=8, actor_lr=3e-5)
    agent = so2.FineTuneCQL(3, 2, 1.0, args, target_noise=(0.3, 0.6))
    agent.qf_target = LinearCritics()
    batch = (torch.randn(4, 3), torch.zeros(4, 2), torch.ones(4), torch.randn(4, 3), torch.tensor([0.0, 0.0, 1.0, 0.0]))
    torch.manual_seed(1)
    _, metrics = agent.critic_loss(*batch)
    torch.manual_seed(1)
    with torch.no_grad():
        next_actions, next_log_prob = agent.actor(batch[3])
        target = so2.perturbed_actions(next_actions, 0.3, 0.6, 1.0).sum(-1) - agent.log_alpha.exp() * next_log_prob
        td_target = batch[2] + 0.99 * (1.0 - batch[4]) * target
        qs = agent.qf(batch[0], batch[1])
    torch.testing.assert_close(metrics[0], (qs - td_target).pow(2).mean(-1).sum())


# --- SUF and the split updates ---------------------------------------------------------------
def test_suf_update_counts_and_adam_steps(offline_checkpoints, run_script, tmp_path):
    """G critic updates per step and an actor update every d-th: TensorBoard's counts, final.pt's, and
    Adam's per-parameter step counts (a critic update leaves the actor's moments alone)."""
    result, run_dir = run_script("benchmark/baselines/suf.py", tmp_path / "runs", "--offline-checkpoint",
                                 str(offline_checkpoints["iql"]), *BASELINE_FLAGS, "--critic-updates", "3",
                                 "--actor-delay", "2", tiny=False)
    assert result.returncode == 0, result.stderr
    scalars = read_scalars(run_dir)
    assert scalars["charts/critic_updates"][-1] == (40, 120.0) and scalars["charts/actor_updates"][-1] == (40, 60.0)
    final, offline = load(run_dir / "final.pt"), load(offline_checkpoints["iql"])
    assert (final["critic_updates"], final["actor_updates"], final["method"]) == (120, 60, "suf")
    steps = [state["step"].item() for state in final["state_dict"]["optimizer"]["state"].values()]
    groups = [group["params"] for group in final["state_dict"]["optimizer"]["param_groups"]]  # actor, Q, V
    offline_steps = next(iter(offline["state_dict"]["optimizer"]["state"].values()))["step"].item()
    assert {steps[i] for i in groups[0]} == {offline_steps + 60}
    assert {steps[i] for group in groups[1:] for i in group} == {offline_steps + 120}


@pytest.mark.parametrize("script", ["so2", "suf"])
def test_an_interrupted_baseline_resumes_exactly(offline_checkpoints, run_script, tmp_path, script):
    """Stopped at an episode's end and resumed (--stop-after), or crashed after its last resume.pt, a run
    ends with the uninterrupted run's weights, Adam moments and update counts, and logs each step once."""
    path, flags = f"benchmark/baselines/{script}.py", [*BASELINE_FLAGS, "--critic-updates", "2", "--checkpoint-every", "15"]
    whole, whole_dir = run_script(path, tmp_path / "whole", "--offline-checkpoint", str(offline_checkpoints["iql"]),
                                  *flags, tiny=False)
    assert whole.returncode == 0, whole.stderr
    first, split_dir = run_script(path, tmp_path / "split", "--offline-checkpoint", str(offline_checkpoints["iql"]),
                                  *flags, "--stop-after", "5", tiny=False)
    assert first.returncode == 0, first.stderr
    assert "stopped after" in first.stdout and not (split_dir / "final.pt").exists()
    stopped = load(split_dir / "resume.pt")
    assert 5 <= stopped["step"] < 40
    for name, column in stopped["online_transitions"].items():  # the online rows alone, not the buffer's storage
        assert len(column) == stopped["step"] and column.untyped_storage().nbytes() == column.nbytes, name
    resumed, same_dir = run_script(path, tmp_path / "split", "--resume", str(split_dir / "resume.pt"), "--online-steps",
                                   "999", tiny=False)
    assert resumed.returncode == 0, resumed.stderr
    assert same_dir == split_dir and f"resuming {split_dir} at online step {stopped['step']} of 40" in resumed.stdout
    ignored = next(line for line in resumed.stdout.splitlines() if "--resume continues the run" in line)
    assert "--online-steps" in ignored.split("ignored:")[1]  # the run keeps its own 40

    reference, reference_scalars = load(whole_dir / "final.pt"), read_scalars(whole_dir)
    # the uninterrupted run wrote resume.pt on its way; without its final.pt it is a run that crashed after that
    (whole_dir / "final.pt").unlink()
    crashed, _ = run_script(path, tmp_path / "whole", "--resume", str(whole_dir / "resume.pt"), tiny=False)
    assert crashed.returncode == 0, crashed.stderr
    for run_dir in (split_dir, whole_dir):
        final = load(run_dir / "final.pt")
        torch.testing.assert_close(final["state_dict"], reference["state_dict"], rtol=0, atol=0)
        assert (final["critic_updates"], final["actor_updates"]) == (reference["critic_updates"], reference["actor_updates"])
        scalars = read_scalars(run_dir)
        assert scalars.keys() == reference_scalars.keys()
        for tag in scalars.keys() - {"charts/SPS"}:
            assert scalars[tag] == reference_scalars[tag], tag


def test_a_resume_checkpoint_of_another_script_is_refused(offline_checkpoints, run_script, tmp_path):
    result, run_dir = run_script("benchmark/baselines/so2.py", tmp_path / "runs", "--offline-checkpoint",
                                 str(offline_checkpoints["iql"]), *BASELINE_FLAGS, "--stop-after", "1", tiny=False)
    assert result.returncode == 0, result.stderr
    stopped, offline_dir = run_script("offline_pretrain.py", tmp_path / "offline", "--algo", "iql", *OFFLINE_FLAGS,
                                      "--stop-after", "30", tiny=False)
    assert stopped.returncode == 0, stopped.stderr
    resume = str(run_dir / "resume.pt")
    cases = [("suf", resume, "continues a run of benchmark/baselines/so2.py, not of benchmark/baselines/suf.py"),
             ("offline_pretrain", resume, "continues a run of benchmark/baselines/so2.py, not of offline_pretrain.py"),
             ("so2", str(offline_dir / "resume.pt"), "continues a run of offline_pretrain.py, not of benchmark/baselines/so2.py"),
             ("so2", str(offline_checkpoints["iql"]), "of kind 'offline' by IQL: pass the `resume.pt`")]
    for script, checkpoint, words in cases:
        script_path = "offline_pretrain.py" if script == "offline_pretrain" else f"benchmark/baselines/{script}.py"
        refused, written = run_script(script_path, tmp_path / script, "--resume", checkpoint, tiny=False)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr
        assert refused.stderr.startswith("error: --resume") and words in refused.stderr, refused.stderr
        assert written is None


@pytest.mark.parametrize("script, algo", [("so2", "iql"), ("so2", "cql"), ("suf", "cql"), ("off2on", "cql")])
def test_baselines_run_end_to_end_and_log_the_bench_tags(offline_checkpoints, run_script, tmp_path, script, algo):
    result, run_dir = run_script(f"benchmark/baselines/{script}.py", tmp_path / "runs", "--offline-checkpoint",
                                 str(offline_checkpoints[algo]), *BASELINE_FLAGS, tiny=False)
    assert result.returncode == 0, result.stderr
    assert f"__{script}_{algo}__1__" in run_dir.name
    scalars = read_scalars(run_dir)
    assert [s for s, _ in scalars["eval/normalized_score"]] == [0, 20, 40]
    tags = ["eval/return", "eval/q_bias", "charts/SPS", "charts/episodic_return", "losses/q_loss", "losses/actor_loss"]
    tags += ["off2on/density_ratio_mean", "off2on/online_fraction", "losses/density_loss"] if script == "off2on" else []
    for tag in tags:
        assert tag in scalars and all(math.isfinite(v) for _, v in scalars[tag]), tag
    # the offline policy is evaluated first: the same return as the checkpoint's own last evaluation
    offline_return = read_scalars(offline_checkpoints[algo].parent)["offline/eval/return"][-1][1]
    assert scalars["eval/return"][0][1] == pytest.approx(offline_return)
    final = load(run_dir / "final.pt")
    assert (final["kind"], final["algorithm"], final["method"]) == ("final", algo, script)
    offline = load(offline_checkpoints[algo])["state_dict"]["agent"]
    changed = [name for name, value in final["state_dict"]["agent"].items() if not torch.equal(value, offline[name])]
    assert any(name.startswith("actor.") for name in changed) and any(name.startswith("qf.") for name in changed)


def test_wrong_checkpoints_are_refused(offline_checkpoints, run_script, tmp_path):
    final = load(offline_checkpoints["cql"])
    final["kind"] = "final"  # a fine-tuned checkpoint is not a starting point
    torch.save(final, tmp_path / "final.pt")
    cases = [("so2", tmp_path / "final.pt", [], "of kind 'final' by CQL: pass the `offline.pt`"),
             ("off2on", offline_checkpoints["iql"], [], "of kind 'offline' by IQL: pass the `offline.pt` of an earlier CQL run"),
             ("so2", offline_checkpoints["iql"], ["--algo", "cql"], "by IQL"),
             ("suf", offline_checkpoints["cql"].parent / "missing.pt", [], "cannot be read (FileNotFoundError)")]
    for script, checkpoint, flags, words in cases:
        result, run_dir = run_script(f"benchmark/baselines/{script}.py", tmp_path / script, "--offline-checkpoint",
                                     str(checkpoint), *flags, *BASELINE_FLAGS, tiny=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("error: --offline-checkpoint") and words in result.stderr
        assert run_dir is None


@pytest.mark.parametrize("script, flag, value", [("so2", "--target-noise", "-0.1"), ("suf", "--actor-delay", "0"),
                                                 ("off2on", "--priority-temperature", "0"), ("so2", "--critic-updates", "0")])
def test_out_of_domain_baseline_flags_exit_before_writing(run_script, tmp_path, script, flag, value):
    result, run_dir = run_script(f"benchmark/baselines/{script}.py", tmp_path / "runs", "--offline-checkpoint", "x.pt",
                                 flag, value, tiny=False)
    assert result.returncode != 0 and result.stderr.strip().startswith(f"error: {flag} {value}")
    assert "must be" in result.stderr and run_dir is None


# --- Off2On ----------------------------------------------------------------------------------
def test_density_ratio_loss_and_priorities_match_hand_computation():
    off2on = baseline("off2on")
    offline_w, online_w = torch.tensor([0.5, 1.0]), torch.tensor([2.0, 3.0])
    expected = (-math.log(2 / 1.5) - math.log(2 / 2.0)) / 2 - (math.log(4 / 3) + math.log(6 / 4)) / 2
    assert off2on.density_ratio_loss(offline_w, online_w).item() == pytest.approx(expected, abs=1e-6)
    # T = 2: sqrt(w) / mean(sqrt(offline w)); clamped to [1e-3, 1e3]
    w = torch.tensor([4.0, 1e-12, 1e12])
    normalizer = (math.sqrt(0.5) + 1.0) / 2
    priorities = off2on.off2on_priorities(w, offline_w, 2.0)
    torch.testing.assert_close(priorities, torch.tensor([2.0 / normalizer, 1e-3, 1e3]))


def test_the_density_ratio_learns_the_online_to_offline_ratio():
    """Offline actions ~ U(-1, 0), online ~ U(-1, 1), one state: on [-1, 0) the optimum is d_on / d_off = 1/2;
    (0, 1] has no offline mass, so w grows without bound there."""
    off2on = baseline("off2on")
    torch.manual_seed(0)
    network = off2on.DensityRatio(1, 1, 64)
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    obs = torch.zeros(512, 1)
    for _ in range(1500):
        offline = -torch.rand(512, 1)
        online = torch.rand(512, 1) * 2 - 1
        loss = off2on.density_ratio_loss(network(obs, offline), network(obs, online))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        inside = network(obs[:100], -torch.linspace(0.1, 0.9, 100)[:, None]).mean().item()
        outside = network(obs[:100], torch.linspace(0.3, 0.9, 100)[:, None]).mean().item()
    assert inside == pytest.approx(0.5, abs=0.15) and outside > 5.0


def test_sum_tree_samples_in_proportion_to_updated_priorities():
    off2on = baseline("off2on")
    tree = off2on.SumTree(13, torch.device("cpu"))  # 16 leaves, the last 3 empty
    priorities = torch.arange(1, 14, dtype=torch.float64)
    tree.set(torch.arange(13), priorities)
    tree.set(torch.tensor([2, 7, 7]), torch.tensor([0.0, 5.0, 40.0]))  # a zero, and a repeated index: the last wins
    priorities[2], priorities[7] = 0.0, 40.0
    assert tree.total().item() == pytest.approx(priorities.sum().item())
    torch.testing.assert_close(tree.priorities(torch.arange(13)), priorities)
    n = 400_000
    counts = np.bincount(tree.sample(n, torch.Generator().manual_seed(0)).numpy(), minlength=16)
    assert counts[13:].sum() == 0 and counts[2] == 0
    expected = n * (priorities / priorities.sum()).numpy()
    chi_square = (((counts[:13] - expected) ** 2 / np.maximum(expected, 1e-9))[expected > 0]).sum()
    assert chi_square < 35.0  # 11 degrees of freedom: P(chi2 > 35) < 3e-4


def test_balanced_buffer_gives_new_transitions_the_largest_priority():
    off2on = baseline("off2on")
    buffer = off2on.BalancedReplayBuffer(10, 2, 1, torch.device("cpu"), seed=0)
    buffer.add(np.zeros((4, 2)), np.zeros((4, 1)), np.zeros(4), np.zeros((4, 2)), np.zeros(4))
    torch.testing.assert_close(buffer.tree.priorities(torch.arange(4)), torch.ones(4, dtype=torch.float64))
    buffer.set_priorities(torch.tensor([0, 1]), torch.tensor([3.0, 0.5]))
    buffer.add(np.ones((1, 2)), np.ones((1, 1)), [1.0], np.ones((1, 2)), [0.0])
    assert buffer.tree.priorities(torch.tensor([4])).item() == 3.0
    idx, batch = buffer.sample(1000)
    assert idx.max() < 5 and torch.equal(batch[0][idx == 4], torch.ones(int((idx == 4).sum()), 2))
