"""Input normalisation: running statistics, the identity before the first update, checkpoints."""

from __future__ import annotations

import torch

from lightning_htrmrl.models.normalization import InputNormalizer, RunningMeanStd


def test_running_mean_std_merges_batches_like_one_pass() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 3, generator=generator) * torch.tensor([1.0, 5.0, 0.1]) + 2.0 for n in (7, 50, 1)]
    stats = RunningMeanStd((3,))
    for batch in batches:
        stats.update(batch)
    everything = torch.cat(batches).double()
    torch.testing.assert_close(stats.mean, everything.mean(0))
    torch.testing.assert_close(stats.var, everything.var(0, unbiased=False))
    assert float(stats.count) == 58


def test_running_mean_std_gathered_equals_sequential() -> None:
    """Under DDP every process merges every process's batch: same as merging them one by one."""
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(20, 2, generator=generator) + k for k in range(3)]
    sequential, gathered = RunningMeanStd((2,)), RunningMeanStd((2,))
    for batch in batches:
        sequential.update(batch)
    calls = iter(range(2))

    def fake_all_gather(tensor: torch.Tensor) -> torch.Tensor:
        # what each process would contribute: moments [2, D] or count []
        if next(calls) == 0:
            rows = [torch.stack([b.double().mean(0), b.double().var(0, unbiased=False)]) for b in batches]
            return torch.stack(rows)
        return torch.tensor([20.0, 20.0, 20.0], dtype=torch.float64)

    gathered.update(batches[0], fake_all_gather)
    torch.testing.assert_close(gathered.mean, sequential.mean)
    torch.testing.assert_close(gathered.var, sequential.var)


def test_input_normalizer_is_identity_until_updated_then_standardises() -> None:
    norm = InputNormalizer(token_dim=4, obs_dim=2, clip=5.0)
    tokens = torch.randn(100, 4) * torch.tensor([0.05, 3.0, 1.0, 0.0]) + torch.tensor([0.6, -1.0, 0.0, 1.0])
    assert not norm.initialized
    torch.testing.assert_close(norm(tokens), tokens, rtol=0, atol=0)
    norm.update(tokens)
    assert norm.initialized
    normalised = norm(tokens)
    torch.testing.assert_close(normalised[:, :3].mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalised[:, :3].std(0, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    assert torch.equal(normalised[:, 3], torch.zeros(100)), "a constant feature maps to 0"
    # the state shares the statistics of the token's first obs_dim entries
    torch.testing.assert_close(norm.observation(tokens[:, :2]), normalised[:, :2])
    # far outliers are clipped
    assert float(norm(torch.full((1, 4), 1e6)).max()) == 5.0


def test_input_statistics_live_in_the_state_dict(tiny) -> None:
    module = tiny.make_module(tiny.encoders["hierarchical"])
    module.encoder.input_norm.update(torch.randn(50, module.encoder.token_dim) * 3.0 + 1.0)
    restored = tiny.make_module(tiny.encoders["hierarchical"])
    restored.load_state_dict(module.state_dict())
    tokens = torch.randn(5, module.encoder.token_dim)
    torch.testing.assert_close(restored.encoder.input_norm(tokens), module.encoder.input_norm(tokens))
    assert float(restored.encoder.input_norm.stats.count) == 50
