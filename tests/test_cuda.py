"""The device path. These tests run wherever CUDA is available and are skipped, with the reason, on
machines without it (this project's CPU machines and CI), so the first GPU run of the suite checks it."""
import pytest
import torch

from conftest import ALL_SCRIPTS

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")


@needs_cuda
@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_every_script_runs_on_the_gpu(run_script, tmp_path, script):
    result, run_dir = run_script(f"{script}.py", tmp_path / "runs", "--cuda")
    assert result.returncode == 0, result.stderr
    assert "device cuda" in result.stdout
    assert any(run_dir.glob("*.pt"))


@needs_cuda
def test_an_iql_update_on_the_gpu_matches_the_cpu():
    """IQL's update draws no noise, so both devices must end at the same weights (CQL's samples actions;
    its device path is covered end to end above)."""
    import copy

    import baq_iql

    torch.manual_seed(0)
    cpu_agent = baq_iql.Agent(11, 3, 1.0, baq_iql.Args(compile=False, hidden_dim=32))
    gpu_agent = copy.deepcopy(cpu_agent).cuda()
    generator = torch.Generator().manual_seed(1)
    batch = (torch.randn(16, 11, generator=generator), torch.rand(16, 3, generator=generator) * 2 - 1,
             torch.randn(16, generator=generator), torch.randn(16, 11, generator=generator), torch.zeros(16))
    weights = torch.rand(16, generator=generator)
    cpu_metrics = cpu_agent.update(batch, weights)
    gpu_metrics = gpu_agent.update(tuple(t.cuda() for t in batch), weights.cuda())
    torch.testing.assert_close(gpu_metrics.cpu(), cpu_metrics, rtol=1e-4, atol=1e-5)
    for (key, a), b in zip(cpu_agent.state_dict().items(), gpu_agent.state_dict().values()):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5, msg=key)


@needs_cuda
@pytest.mark.parametrize("script, algo", [("so2", "iql"), ("suf", "cql"), ("off2on", "cql")])
def test_the_baselines_run_on_the_gpu(run_script, tmp_path, script, algo):
    from test_baselines import BASELINE_FLAGS
    from test_pretrain import OFFLINE_FLAGS

    made, offline_dir = run_script("offline_pretrain.py", tmp_path / "offline", "--algo", algo, *OFFLINE_FLAGS, tiny=False)
    assert made.returncode == 0, made.stderr
    flags = [flag for flag in BASELINE_FLAGS if flag != "--no-cuda"]
    result, run_dir = run_script(f"benchmark/baselines/{script}.py", tmp_path / "runs", "--offline-checkpoint",
                                 str(offline_dir / "offline.pt"), *flags, "--cuda", tiny=False)
    assert result.returncode == 0, result.stderr
    assert "device cuda" in result.stdout and (run_dir / "final.pt").exists()
