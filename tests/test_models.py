"""Encoders: T1 order-aware, T2 permutation-invariant, padding ignored, cached == uncached, ablations."""

from __future__ import annotations

import pytest
import torch

from lightning_htrmrl.models import FlatTransformerEncoder, HierarchicalEncoder, MLPEncoder
from lightning_htrmrl.models.layers import SequenceEncoder, attention_mask, reference_transformer, run_transformer
from lightning_htrmrl.validation import ConfigError

OBS, ACT = 2, 2
D = OBS + ACT + 2


def _hierarchical(tiny, **overrides) -> HierarchicalEncoder:
    torch.manual_seed(0)
    return tiny.hierarchical(num_episodes=4, **overrides)(OBS, ACT).eval()


def test_t2_pool_permutation_invariant(tiny) -> None:
    encoder = _hierarchical(tiny, inter_positional=False)
    generator = torch.Generator().manual_seed(0)
    episodes = torch.randn(5, 4, 16, generator=generator)
    valid = torch.tensor(
        [
            [True, True, True, True],
            [False, True, True, True],
            [False, False, True, True],
            [True, False, True, True],
            [False, False, False, True],
        ]
    )
    with torch.no_grad():
        z = encoder.pool(episodes, valid)
        for perm in ([3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]):
            z_perm = encoder.pool(episodes[:, perm], valid[:, perm])
            torch.testing.assert_close(z_perm, z, rtol=0, atol=1e-5)
        # invalid (not yet existing) episodes do not matter at all
        garbage = episodes.clone()
        garbage[~valid] = 100.0 * torch.randn(int((~valid).sum()), 16, generator=generator)
        torch.testing.assert_close(encoder.pool(garbage, valid), z, rtol=0, atol=1e-5)
        # but valid ones do
        # (a random change: a uniform shift of a vector would be removed by the LayerNorms)
        changed = episodes.clone()
        changed[:, -1] += torch.randn(5, 16, generator=generator)
        assert ((encoder.pool(changed, valid) - z).abs().amax(-1) > 1e-4).all()


def test_t2_with_inter_positional_is_order_sensitive(tiny) -> None:
    encoder = _hierarchical(tiny, inter_positional=True)
    assert encoder.inter_position is not None
    episodes = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(1))
    valid = torch.ones(3, 4, dtype=torch.bool)
    with torch.no_grad():
        z = encoder.pool(episodes, valid)
        z_perm = encoder.pool(episodes[:, [3, 2, 1, 0]], valid)
    assert (z_perm - z).abs().max() > 1e-4


def test_context_invariant_to_order_of_past_episodes(tiny) -> None:
    """Permuting the past windows handed to begin_episode does not change the per-step context."""
    encoder = _hierarchical(tiny, inter_positional=False)
    generator = torch.Generator().manual_seed(2)
    past = torch.randn(3, 3, tiny.T, D, generator=generator)
    past_valid = torch.tensor([[True, True, True], [False, True, True], [False, False, True]])
    window = torch.randn(3, tiny.T, D, generator=generator)
    length = torch.tensor([4, 2, 1])
    obs = torch.randn(3, OBS, generator=generator)
    with torch.no_grad():
        features = encoder.step(encoder.begin_episode(past, past_valid), window, length, obs)
        perm = [2, 0, 1]
        permuted = encoder.step(encoder.begin_episode(past[:, perm], past_valid[:, perm]), window, length, obs)
    torch.testing.assert_close(permuted, features, rtol=0, atol=1e-5)


def test_t1_is_order_aware(tiny) -> None:
    encoder = _hierarchical(tiny)
    windows = torch.randn(4, tiny.T, D, generator=torch.Generator().manual_seed(3))
    full = torch.full((4,), tiny.T)
    with torch.no_grad():
        out = encoder.encode_windows(windows, full)
        flipped = encoder.encode_windows(windows.flip(1), full)
        rolled = encoder.encode_windows(windows.roll(1, dims=1), full)
    assert out.shape == (4, 16)
    assert ((flipped - out).abs().amax(-1) > 1e-4).all()
    assert ((rolled - out).abs().amax(-1) > 1e-4).all()


@pytest.mark.parametrize("kind", ["hierarchical", "flat"])
def test_padding_beyond_length_is_ignored(tiny, kind) -> None:
    torch.manual_seed(0)
    encoder = tiny.encoders[kind](OBS, ACT).eval()
    generator = torch.Generator().manual_seed(4)
    batch = 4
    window = torch.randn(batch, tiny.T, D, generator=generator)
    length = torch.tensor([1, 2, 3, 4])
    padded = window.clone()
    pad = torch.arange(tiny.T) >= length.unsqueeze(-1)
    padded[pad] = 50.0 * torch.randn(int(pad.sum()), D, generator=generator)
    with torch.no_grad():
        if kind == "hierarchical":
            torch.testing.assert_close(
                encoder.encode_windows(padded, length), encoder.encode_windows(window, length), rtol=0, atol=1e-5
            )
        past = torch.randn(batch, encoder.num_episodes - 1, tiny.T, D, generator=generator)
        cache = encoder.begin_episode(past, torch.ones(batch, encoder.num_episodes - 1, dtype=torch.bool))
        obs = window[:, 0, :OBS]
        torch.testing.assert_close(
            encoder.step(cache, padded, length, obs), encoder.step(cache, window, length, obs), rtol=0, atol=1e-5
        )
        # the valid tokens do matter
        changed = window.clone()
        changed[torch.arange(batch), length - 1] += 1.0
        assert not torch.allclose(encoder.step(cache, changed, length, obs), encoder.step(cache, window, length, obs))


@pytest.mark.parametrize("kind", ["hierarchical", "hierarchical_n3", "flat", "mlp"])
def test_cached_inference_equals_training_forward(tiny, kind) -> None:
    """Per-step features written by EpisodicContext during collection == encoder.forward on episode records."""
    L, K, M = tiny.L, tiny.K, tiny.M
    module = tiny.make_module(tiny.encoders[kind])
    env = tiny.point_robot().make_env("train", num_envs=M, seed=4)
    batch = tiny.collect(env, module.make_policy(seed=1), trials_per_env=2)
    records = module.episode_records(batch)
    steps = records["steps"]
    with torch.no_grad():
        uncached = module.encoder(steps["token"], steps["observation"], records["past_windows"], records["past_valid"])
    collected = batch["features"].reshape(M * 2 * K, L, -1)
    assert uncached.shape == collected.shape == (M * 2 * K, L, module.encoder.out_features)
    assert (uncached - collected).abs().max() < 1e-5
    # episode_features is the same path
    with torch.no_grad():
        torch.testing.assert_close(module.episode_features(records), uncached, rtol=0, atol=0)


@pytest.mark.parametrize("num_episodes", [2, 3])
def test_past_episodes_are_encoded_once_per_episode(tiny, monkeypatch, num_episodes) -> None:
    """Per step only the current window goes through T1; past windows go through T1 once per episode."""
    L, K, M, N = tiny.L, tiny.K, tiny.M, num_episodes
    module = tiny.make_module(tiny.hierarchical(num_episodes=N))
    sizes: list[int] = []
    original = module.encoder.intra.forward

    def spy(tokens, valid, last):
        sizes.append(len(tokens))
        return original(tokens, valid, last)

    monkeypatch.setattr(module.encoder.intra, "forward", spy)
    env = tiny.point_robot().make_env("train", num_envs=M, seed=0)
    with torch.no_grad():
        env.rollout(K * L, module.make_policy(seed=0), break_when_any_done=False)
    # K * L per-step calls on M current windows, K + 1 calls (one per episode, plus the empty init)
    # on M * (N - 1) past windows
    assert len(sizes) == K * L + K + 1
    assert set(sizes) == {M, M * (N - 1)}
    if N != 2:
        assert sizes.count(M) == K * L, "T1 must run once per step on the current windows only"
        assert sizes.count(M * (N - 1)) == K + 1, "past windows must be encoded once per episode"


def test_state_embedding_ablation(tiny) -> None:
    with_state = tiny.hierarchical(state_embedding_dim=8)(OBS, ACT)
    without = tiny.hierarchical(state_embedding_dim=0)(OBS, ACT)
    assert with_state.out_features == 16 + 8
    assert without.out_features == 16 and without.state_embedding is None
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randn(2, tiny.L, D, generator=generator)
    past = torch.randn(2, 1, tiny.T, D, generator=generator)
    valid = torch.ones(2, 1, dtype=torch.bool)
    with torch.no_grad():
        assert with_state(tokens, tokens[..., :OBS], past, valid).shape == (2, tiny.L, 24)
        assert without(tokens, tokens[..., :OBS], past, valid).shape == (2, tiny.L, 16)
    # the tiny MetaPPO heads follow the encoder's width
    module = tiny.make_module(tiny.hierarchical(state_embedding_dim=0))
    assert module.encoder.out_features == 16


def test_flat_encoder_attends_over_n_times_t_tokens(tiny) -> None:
    N, T = 3, tiny.T
    torch.manual_seed(0)
    encoder = tiny.flat(num_episodes=N, window=T)(OBS, ACT).eval()
    assert encoder.encoder.position.pe.shape[0] == N * T
    assert encoder.out_features == 16 + 8
    generator = torch.Generator().manual_seed(6)
    tokens = torch.randn(2, tiny.L, D, generator=generator)
    past = torch.randn(2, N - 1, T, D, generator=generator)
    valid = torch.ones(2, N - 1, dtype=torch.bool)
    with torch.no_grad():
        out = encoder(tokens, tokens[..., :OBS], past, valid)
        # every past token is in the attention span
        for p in range(N - 1):
            for t in range(T):
                changed = past.clone()
                changed[:, p, t] += 1.0
                assert not torch.allclose(encoder(tokens, tokens[..., :OBS], changed, valid), out)
        # invalid past episodes are masked out entirely
        invalid = torch.zeros(2, N - 1, dtype=torch.bool)
        ref = encoder(tokens, tokens[..., :OBS], past, invalid)
        torch.testing.assert_close(encoder(tokens, tokens[..., :OBS], 7.0 * past, invalid), ref, rtol=0, atol=1e-5)
    # TrMRL baseline: N = 1, T = 5, no state branch
    trmrl = FlatTransformerEncoder(OBS, ACT, d_model=16, num_heads=2, num_layers=1, ff_dim=32)
    assert trmrl.num_episodes == 1 and trmrl.window == 5 and trmrl.out_features == 16
    with torch.no_grad():
        out = trmrl(tokens, tokens[..., :OBS], torch.zeros(2, 0, 5, D), torch.zeros(2, 0, dtype=torch.bool))
    assert out.shape == (2, tiny.L, 16)


def test_mlp_encoder_sees_the_state_only() -> None:
    encoder = MLPEncoder(OBS, ACT)
    assert encoder.num_episodes == 1 and encoder.window == 1 and encoder.out_features == OBS
    tokens = torch.randn(3, 5, D)
    out = encoder(tokens, tokens[..., :OBS], torch.zeros(3, 0, 1, D), torch.zeros(3, 0, dtype=torch.bool))
    torch.testing.assert_close(out, tokens[..., :OBS])


@pytest.mark.parametrize(
    "cls, kwargs, key",
    [
        (HierarchicalEncoder, dict(num_episodes=0), "num_episodes"),
        (HierarchicalEncoder, dict(window=0), "window"),
        (HierarchicalEncoder, dict(d_model=10, num_heads=4), "d_model"),
        (HierarchicalEncoder, dict(state_embedding_dim=-1), "state_embedding_dim"),
        (FlatTransformerEncoder, dict(window=0), "window"),
    ],
)
def test_bad_encoder_options(cls, kwargs, key) -> None:
    with pytest.raises(ConfigError, match=key):
        cls(OBS, ACT, **kwargs)


@pytest.mark.parametrize("causal", [False, True])
def test_fused_read_out_path_equals_the_plain_transformer(causal: bool) -> None:
    """Fused attention with the final layer at the read-out position only equals nn.TransformerEncoder
    over every position, in value and in gradient."""
    torch.manual_seed(0)
    encoder = SequenceEncoder(6, 16, 2, 3, 32, max_len=7, causal=causal)
    tokens = torch.randn(20, 7, 6)
    length = torch.randint(1, 8, (20,))
    valid = torch.arange(7) < length.unsqueeze(-1)
    fast = encoder(tokens, valid, length - 1)
    plain = encoder.forward_reference(tokens, valid, length - 1)
    assert (fast - plain).abs().max() < 1e-5
    weights = torch.randn_like(fast)
    fast_grads = torch.autograd.grad((fast * weights).sum(), list(encoder.parameters()))
    plain_grads = torch.autograd.grad((plain * weights).sum(), list(encoder.parameters()))
    for fast_grad, plain_grad in zip(fast_grads, plain_grads, strict=True):
        assert (fast_grad - plain_grad).abs().max() < 1e-4


def test_fused_t2_equals_the_plain_transformer(tiny) -> None:
    """T2 through the fused layers equals nn.TransformerEncoder under the same key-padding mask."""
    encoder = _hierarchical(tiny, inter_layers=2)
    episodes = torch.randn(5, encoder.num_episodes, encoder.d_model)
    valid = torch.rand(5, encoder.num_episodes) < 0.6
    valid[:, -1] = True  # the current episode always exists
    mask = attention_mask(valid, causal=False)
    fused = run_transformer(encoder.inter, episodes, mask)
    plain = reference_transformer(encoder.inter, episodes, mask)
    assert (fused - plain)[valid].abs().max() < 1e-5


@pytest.mark.parametrize("factory", [HierarchicalEncoder, FlatTransformerEncoder])
def test_single_episode_memory_works(factory) -> None:
    """N = 1 (the episodes_n1 ablation, TrMRL's setting): no past episodes, current window only."""
    encoder = factory(2, 2, num_episodes=1, window=3, d_model=8, num_heads=2)
    tokens = torch.randn(2, 5, encoder.token_dim)
    features = encoder(
        tokens, tokens[..., :2], torch.zeros(2, 0, 3, encoder.token_dim), torch.zeros(2, 0, dtype=torch.bool)
    )
    assert features.shape == (2, 5, encoder.out_features) and torch.isfinite(features).all()


@pytest.mark.parametrize("kind", ["hierarchical", "hierarchical_n3", "flat", "mlp"])
def test_whole_episode_update_path_equals_the_per_window_path(tiny, kind) -> None:
    """The update's whole-episode encoder (each token normalised and embedded once, windows gathered
    from the embeddings) gives the per-window path's features, PPO losses and gradients (the path
    collection takes step by step: ``ContextEncoder.episode_contexts``) on the same batch."""
    from lightning_htrmrl.models.encoders import ContextEncoder

    module = tiny.make_module(tiny.encoders[kind])
    env = tiny.point_robot().make_env("train", num_envs=tiny.M, seed=4)
    batch = tiny.collect(env, module.make_policy(seed=1), trials_per_env=2)
    module.encoder.input_norm.update(batch["token"])  # a real normalisation, not the identity
    module.estimate_advantage(batch)
    records = module.episode_records(batch)
    encoder, steps = module.encoder, records["steps"]

    def per_window(tokens, observation, past_windows, past_valid):
        cache = encoder.begin_episode(past_windows, past_valid)
        z = ContextEncoder.episode_contexts(encoder, cache, encoder.input_norm(tokens))
        return encoder.state_features(z, observation)

    results = {}
    for name, path in (("whole_episode", encoder), ("per_window", per_window)):
        module.zero_grad()
        features = path(steps["token"], steps["observation"], records["past_windows"], records["past_valid"])
        losses = module.loss_module(steps.clone(False).set("features", features))
        sum(losses[key] for key in ("loss_objective", "loss_critic")).backward()
        grads = [p.grad.clone() for p in module.parameters() if p.grad is not None]
        results[name] = (features.detach(), {key: losses[key].detach() for key in losses.keys()}, grads)
    (features, losses, grads), (ref_features, ref_losses, ref_grads) = results["whole_episode"], results["per_window"]
    torch.testing.assert_close(features, ref_features, rtol=0, atol=1e-5)
    for key, value in ref_losses.items():
        torch.testing.assert_close(losses[key], value, rtol=0, atol=1e-5, msg=key)
    assert len(grads) == len(ref_grads) > 0
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-5)
