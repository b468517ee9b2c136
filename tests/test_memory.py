"""EpisodicMemory / EpisodicContext: no leaks across trials or envs, no reset between episodes of a trial,
window sampling, and ``episode_records`` rebuilding exactly the windows seen at collection."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from lightning_htrmrl.memory import EpisodicMemory, episode_records
from lightning_htrmrl.models import EpisodicContext


def _record_begin_episode(monkeypatch, encoder) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Spy on ``encoder.begin_episode`` (the real method still runs): records (past_windows, past_valid)."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = encoder.begin_episode

    def spy(past_windows, past_valid):
        calls.append((past_windows.clone(), past_valid.clone()))
        return original(past_windows, past_valid)

    monkeypatch.setattr(encoder, "begin_episode", spy)
    return calls


def _expected_past_windows(tokens, window_starts, episode_idx, L, N, T):
    """Reference (loops): for every episode of every row, the windows of its N-1 past episodes.

    tokens [B, S, D], window_starts [B, S, N-1], episode_idx [B, S] (S = whole episodes).
    Returns windows [B, S // L, N-1, T, D] and valid [B, S // L, N-1].
    """
    B, S, D = tokens.shape
    E = S // L
    windows = torch.zeros(B, E, N - 1, T, D)
    valid = torch.zeros(B, E, N - 1, dtype=torch.bool)
    for b in range(B):
        for e in range(E):
            k = int(episode_idx[b, e * L])  # episode index within its trial
            for p in range(N - 1):
                past = k - (N - 1) + p
                if past < 0:
                    continue
                valid[b, e, p] = True
                row_episode = e - (k - past)  # the past episode's position in this row
                start = int(window_starts[b, e * L, p])
                first = row_episode * L + start
                windows[b, e, p] = tokens[b, first : first + T]
    return windows, valid


@pytest.mark.parametrize("num_episodes", [2, 3])
def test_memory_kept_across_episodes_and_cleared_at_trial_start(tiny, monkeypatch, num_episodes) -> None:
    L, K, M, T, N = tiny.L, tiny.K, tiny.M, tiny.T, num_episodes
    module = tiny.make_module(tiny.hierarchical(num_episodes=N))
    policy = module.make_policy(seed=0)
    context: EpisodicContext = policy[0]
    calls = _record_begin_episode(monkeypatch, module.encoder)
    env = tiny.point_robot().make_env("train", num_envs=M, seed=0)
    td = env.rollout(K * L, policy, break_when_any_done=False)  # exactly one trial
    tokens = td["token"]

    # The ring buffer holds the N latest episodes of the trial: episode j lives in slot j % N.
    storage = context.memory.tokens
    assert storage.shape == (M, N, L, tokens.shape[-1])
    for j in range(K - N, K):
        assert torch.equal(storage[:, j % N], tokens[:, j * L : (j + 1) * L]), f"episode {j} missing from memory"

    # Window starts: sampled once per episode (constant within it), uniform range [0, L - T].
    starts = td["window_starts"]
    assert starts.shape == (M, K * L, N - 1)
    for k in range(K):
        episode = starts[:, k * L : (k + 1) * L]
        assert (episode == episode[:, :1]).all(), "window starts must not change within an episode"
    assert ((starts >= 0) & (starts <= L - T)).all()
    assert (starts[:, :L] == 0).all(), "the first episode has no past episodes"

    # Past windows handed to the encoder at episode k come from episodes k-N+1..k-1 of the same trial,
    # cut at the stored window starts (memory was not reset between episodes).
    episode_calls = calls[-K:]
    expected, valid = _expected_past_windows(tokens, starts, td["episode_idx"], L, N, T)
    for k, (windows, past_valid) in enumerate(episode_calls):
        assert torch.equal(past_valid, valid[:, k])
        assert torch.equal(windows[past_valid], expected[:, k][valid[:, k]])
    if N >= 2:
        assert valid[:, 1:].any(), "later episodes must see past episodes"

    # The trial is over (done); the env resets into a new trial and the policy sees its first step:
    # the env's memory is all zeros except the new first token.
    assert td["next", "done"][:, -1].all()
    td2 = policy(env.reset())
    assert (td2["episode_idx"] == 0).all() and (td2["step_in_episode"] == 0).all()
    storage = context.memory.tokens
    new_token = td2["token"]
    assert torch.equal(storage[:, 0, 0], new_token)
    rest = storage.clone()
    rest[:, 0, 0] = 0
    assert (rest == 0).all(), "memory leaked across trials"
    # ... and the new trial's first episode sees no past episode.
    assert not calls[-1][1].any()


def _index_sequence(offset: int, steps: int, L: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    phase = (torch.arange(steps) + offset) % (K * L)
    return phase // L, phase % L


def _run_context(encoder, tokens, episode_idx, step, L, seed=0) -> torch.Tensor:
    """Drive a fresh EpisodicContext step by step over tokens [M, S, D]; returns features [M, S, F]."""
    context = EpisodicContext(encoder, episode_length=L, seed=seed)
    obs_dim = encoder.obs_dim
    features = []
    with torch.no_grad():
        for s in range(tokens.shape[1]):
            td = TensorDict(
                {
                    "token": tokens[:, s],
                    "observation": tokens[:, s, :obs_dim],
                    "episode_idx": episode_idx[:, s],
                    "step_in_episode": step[:, s],
                },
                batch_size=[tokens.shape[0]],
            )
            features.append(context(td)["features"])
    return torch.stack(features, dim=1)


@pytest.mark.parametrize("kind", ["hierarchical", "hierarchical_n3", "flat"])
def test_no_leak_across_envs_or_trials(tiny, kind) -> None:
    L, K = tiny.L, tiny.K
    encoder = tiny.make_module(tiny.encoders[kind]).encoder.eval()
    # Three envs at different phases of their trials (their trial boundaries differ).
    offsets = [0, 5, 13]
    steps = 2 * K * L
    idx = [_index_sequence(o, steps, L, K) for o in offsets]
    episode_idx = torch.stack([i[0] for i in idx])
    step = torch.stack([i[1] for i in idx])
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(len(offsets), steps, encoder.token_dim, generator=generator)
    base = _run_context(encoder, tokens, episode_idx, step, L)

    # Changing env 0's tokens changes env 0's features only.
    other = tokens.clone()
    other[0] = torch.randn(steps, encoder.token_dim, generator=generator)
    changed = _run_context(encoder, other, episode_idx, step, L)
    torch.testing.assert_close(changed[1:], base[1:], rtol=0, atol=1e-6)
    assert not torch.allclose(changed[0], base[0])

    # Changing env 1's tokens in its current trial leaves its next trial untouched.
    trial_start = ((episode_idx[1] == 0) & (step[1] == 0)).nonzero().squeeze(-1)
    boundary = int(trial_start[trial_start > 0][0])
    other = tokens.clone()
    other[1, :boundary] += 1.0
    changed = _run_context(encoder, other, episode_idx, step, L)
    torch.testing.assert_close(changed[1, boundary:], base[1, boundary:], rtol=0, atol=1e-6)
    torch.testing.assert_close(changed[[0, 2]], base[[0, 2]], rtol=0, atol=1e-6)

    # Memory is kept between the episodes of a trial: changing only episode 0 of env 0's first trial
    # changes the features of its episode 1 (which sees a window of episode 0).
    other = tokens.clone()
    other[0, :L] += 1.0
    changed = _run_context(encoder, other, episode_idx, step, L)
    episode1 = slice(L, 2 * L)
    for s in range(L, 2 * L):
        assert not torch.allclose(changed[0, s], base[0, s]), f"episode 1 step {s - L} ignores episode 0"
    assert not torch.allclose(changed[0, episode1], base[0, episode1])


def test_window_starts_uniform() -> None:
    L, T, N, num_envs = 8, 4, 3, 2000
    memory = EpisodicMemory(num_envs, N, L, T, token_dim=6, seed=0)
    for episode in range(2):  # two whole past episodes
        for step in range(L):
            memory.write(torch.zeros(num_envs, 6), torch.full((num_envs,), episode), torch.full((num_envs,), step))
    episode_idx = torch.full((num_envs,), 2)
    starts, valid, windows = memory.sample_past_windows(episode_idx)
    assert starts.shape == (num_envs, N - 1) and windows.shape == (num_envs, N - 1, T, 6)
    assert valid.all()
    counts = torch.bincount(starts.flatten(), minlength=L - T + 1)
    assert len(counts) == L - T + 1, "starts must lie in [0, L - T]"
    expected = starts.numel() / (L - T + 1)
    assert ((counts - expected).abs() < 0.15 * expected).all(), counts
    # Episode 0 has no past: starts are zeroed and flagged invalid.
    starts, valid, _ = memory.sample_past_windows(torch.zeros(num_envs, dtype=torch.long))
    assert not valid.any() and (starts == 0).all()
    # Episode 1 with N = 3: only the newest past slot exists.
    starts, valid, _ = memory.sample_past_windows(torch.ones(num_envs, dtype=torch.long))
    assert not valid[:, 0].any() and valid[:, 1].all()
    # T = L: the only window is the whole episode.
    full = EpisodicMemory(4, 2, L, L, token_dim=6, seed=0)
    starts, _, _ = full.sample_past_windows(torch.full((4,), 1))
    assert (starts == 0).all()


@pytest.mark.parametrize("num_episodes", [2, 3])
def test_episode_records_rebuild_collected_windows(tiny, monkeypatch, num_episodes) -> None:
    L, K, M, T, N = tiny.L, tiny.K, tiny.M, tiny.T, num_episodes
    module = tiny.make_module(tiny.hierarchical(num_episodes=N))
    calls = _record_begin_episode(monkeypatch, module.encoder)
    env = tiny.point_robot().make_env("train", num_envs=M, seed=2)
    batch = tiny.collect(env, module.make_policy(seed=3), trials_per_env=2)  # rows hold 2 trials
    assert batch.shape == (M, 2 * K * L)
    episode_calls = [c for c in calls if len(c[1]) == M][-2 * K :]
    assert len(episode_calls) == 2 * K, "the collector must run the (shared) encoder of the policy"

    records = episode_records(batch, N, T, L)
    assert records.shape == (M * 2 * K,)
    assert records["past_windows"].shape == (M * 2 * K, N - 1, T, batch["token"].shape[-1])
    assert records["steps"].shape == (M * 2 * K, L)
    assert torch.equal(records["steps", "token"], batch["token"].reshape(M * 2 * K, L, -1))

    expected, valid = _expected_past_windows(batch["token"], batch["window_starts"], batch["episode_idx"], L, N, T)
    rec_windows = records["past_windows"].reshape(M, 2 * K, N - 1, T, -1)
    rec_valid = records["past_valid"].reshape(M, 2 * K, N - 1)
    assert torch.equal(rec_valid, valid)
    assert torch.equal(rec_windows[valid], expected[valid])
    # the windows rebuilt in training are the ones the policy saw at collection
    for e, (windows, past_valid) in enumerate(episode_calls):
        assert torch.equal(past_valid, rec_valid[:, e])
        assert torch.equal(windows[past_valid], rec_windows[:, e][past_valid])
    # nothing from trial 1 is visible to trial 2's first episode
    assert not rec_valid[:, K].any()


def test_max_reward_windows_end_at_the_best_step() -> None:
    L, T, N, M, D = 8, 3, 3, 3, 6
    memory = EpisodicMemory(M, N, L, T, token_dim=D, seed=0, past_windows="max_reward")
    best_steps = torch.tensor([[5, 1], [7, 6], [2, 3]])  # per env, for past episodes 0 and 1
    for episode in range(2):
        for step in range(L):
            token = torch.zeros(M, D)
            token[:, 0] = 10 * episode + step  # identifies the stored step
            token[:, -2] = (best_steps[:, episode] == step).float()  # the reward entry
            if step == 0:
                token[:, -2] = 5.0  # the previous episode's last reward: never picked
            memory.write(token, torch.full((M,), episode), torch.full((M,), step))
    starts, valid, windows = memory.sample_past_windows(torch.full((M,), 2))
    assert valid.all()
    expected = (best_steps - T + 1).clamp(0, L - T)
    assert torch.equal(starts, expected)
    # each window's tokens are consecutive steps of its own episode, ending at the best one where possible
    for env in range(M):
        for past in range(2):
            steps = windows[env, past, :, 0] - 10 * past
            assert torch.equal(steps, torch.arange(T, dtype=steps.dtype) + expected[env, past])
            assert int(best_steps[env, past]) in steps.tolist()


@pytest.mark.parametrize("kind", ["hierarchical", "flat"])
def test_max_reward_windows_keep_log_prob_parity(tiny, kind) -> None:
    module = tiny.make_module(tiny.encoders[kind], past_windows="max_reward")
    env = tiny.point_robot(sparse=False).make_env("train", num_envs=tiny.M, seed=4)
    batch = tiny.collect(env, module.make_policy(seed=4), trials_per_env=2)
    starts = batch["window_starts"][batch["episode_idx"] > 0]
    assert starts.unique().numel() > 1, "dense rewards should peak at different steps"
    diff = (module.recompute_log_prob(batch).reshape(batch.shape) - batch["action_log_prob"]).abs().max()
    assert diff < 1e-5, f"log-prob parity broken: max abs diff {diff:.3g}"


@pytest.mark.parametrize("past_windows", ["uniform", "max_reward"])
def test_past_windows_stay_inside_episodes_shorter_than_the_memory(past_windows: str) -> None:
    """Meta-World's own evaluation ends episodes on success: an episode of 5 steps in a memory of
    L = 8 leaves nothing of the older episode that used its slot, and its window lies in its 5 steps."""
    L, T, N, M, D = 8, 3, 2, 500, 6
    memory = EpisodicMemory(M, N, L, T, token_dim=D, seed=0, past_windows=past_windows)
    for episode, length in ((0, L), (1, L), (2, 5)):  # episode 2 reuses episode 0's slot
        for step in range(length):
            token = torch.full((M, D), 100.0 * (episode + 1) + step)
            token[:, -2] = float(step == length - 1 and episode != 2) + float(episode == 2 and step == 3)
            memory.write(token, torch.full((M,), episode), torch.full((M,), step))
    stored = memory.tokens[:, 0]  # slot of episodes 0 and 2
    assert (stored[:, 5:] == 0).all(), "steps of episode 0 beyond episode 2's length survived"
    starts, valid, windows = memory.sample_past_windows(torch.full((M,), 3))
    assert valid.all() and (starts <= 5 - T).all()
    assert (windows[..., 0] >= 300).all(), "the window of episode 2 holds only its own steps"
    if past_windows == "max_reward":
        assert (starts == 3 - T + 1).all()  # ends at its best step (3)
    else:
        assert set(starts.flatten().tolist()) == {0, 1, 2}
