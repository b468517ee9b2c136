"""Episodic memory: the ``N`` most recent episodes of the current trial, per env, and window sampling.

The policy conditions on ``N`` episodes: the ``N - 1`` previous episodes of the trial (one length-``T``
window each, chosen once when an episode begins: with a uniformly drawn start, or ending at the
episode's highest-reward step) and the current episode (its last ``T`` tokens). The same window
arithmetic serves collection (a ring buffer of episodes, :class:`EpisodicMemory`) and training
(whole trials in a batch, :func:`episode_records`), so both paths see identical inputs by
construction.
"""

from __future__ import annotations

from typing import Literal

import torch
from tensordict import TensorDict, TensorDictBase

from lightning_htrmrl.trials import REWARD_ENTRY


def past_episode_ids(episode_idx: torch.Tensor, num_past: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the past episodes in memory, oldest first, and whether they exist.

    Args:
        episode_idx: ``[*B]`` index of the current episode within its trial.
        num_past: ``N - 1``.

    Returns:
        ``ids [*B, N-1]`` (clamped to >= 0) and ``valid [*B, N-1]`` (bool).
    """
    offsets = torch.arange(num_past, 0, -1, device=episode_idx.device)
    ids = episode_idx.unsqueeze(-1) - offsets
    return ids.clamp_min(0), ids >= 0


def gather_windows(
    episodes: torch.Tensor, episode_ids: torch.Tensor, starts: torch.Tensor, window: int
) -> torch.Tensor:
    """Cut length-``window`` token windows out of stored episodes.

    Args:
        episodes: ``[B, E, L, D]`` tokens of ``E`` stored episodes per row.
        episode_ids: ``[B, *I]`` which stored episode each window comes from.
        starts: ``[B, *I]`` first step of each window.
        window: ``T``.

    Returns:
        ``[B, *I, T, D]``.
    """
    batch = episodes.shape[0]
    steps = starts.unsqueeze(-1) + torch.arange(window, device=starts.device)
    rows = torch.arange(batch, device=starts.device).view(batch, *([1] * (steps.dim() - 1)))
    return episodes[rows, episode_ids.unsqueeze(-1), steps]


def current_windows(tokens: torch.Tensor, step: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The current episode's last ``T`` tokens at each step, left-aligned.

    Args:
        tokens: ``[B, L, D]`` tokens of one episode per row (only steps <= ``step`` are read).
        step: ``[B, *S]`` step index within the episode.
        window: ``T`` (must be <= ``L``).

    Returns:
        ``windows [B, *S, T, D]`` and ``num_valid [B, *S]``: the window covers steps
        ``max(0, t - T + 1) .. t``; positions ``>= num_valid`` are padding and must be masked.
    """
    start = (step - window + 1).clamp_min(0)
    num_valid = step - start + 1
    episode = torch.zeros_like(step)
    return gather_windows(tokens.unsqueeze(1), episode, start, window), num_valid


def every_step_windows(tokens: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`current_windows` at every step ``0 .. L-1`` of ``tokens [B, L, D]``, as strided views
    (``unfold``, whose backward is a strided sum instead of a scatter-add).

    Returns ``windows [B, L, T, D]`` and ``num_valid [B, L]``.
    """
    batch, length = tokens.shape[:2]
    first = tokens[:, :window].unsqueeze(1).expand(batch, window - 1, window, tokens.shape[-1])  # left-aligned
    full = tokens.unfold(1, window, 1).transpose(-1, -2)  # [B, L - T + 1, T, D]
    num_valid = (torch.arange(length, device=tokens.device) + 1).clamp_max(window).expand(batch, length)
    return torch.cat([first, full], dim=1), num_valid


WindowSelection = Literal["uniform", "max_reward"]
WINDOW_SELECTIONS = ("uniform", "max_reward")


def max_reward_window_starts(
    rewards: torch.Tensor, window: int, steps_written: torch.Tensor | None = None
) -> torch.Tensor:
    """Starts of the windows that end at each episode's highest-reward step.

    Args:
        rewards: ``[*B, L]`` the reward entry of each stored token (token ``t`` holds ``r_{t-1}``;
            the first token of an episode holds the previous episode's last reward and is skipped).
        window: ``T``.
        steps_written: ``[*B]`` steps stored of each episode (default: all ``L``); later ones are ignored.

    Returns:
        ``[*B]`` starts in ``[0, max(steps_written - T, 0)]`` (the first highest step on ties).
    """
    episode_length = rewards.shape[-1]
    if steps_written is not None:
        beyond = torch.arange(episode_length, device=rewards.device) >= steps_written.unsqueeze(-1)
        rewards = rewards.masked_fill(beyond, float("-inf"))
    best = rewards[..., 1:].argmax(-1) + 1
    last_start = episode_length - window if steps_written is None else (steps_written - window).clamp_min(0)
    return (best - window + 1).clamp_min(0).clamp_max(last_start)


def sample_window_starts(
    shape: tuple[int, ...], episode_length: int, window: int, generator: torch.Generator
) -> torch.Tensor:
    """Uniform window starts in ``[0, L - T]``, shape ``shape``."""
    return torch.randint(episode_length - window + 1, shape, generator=generator)


class EpisodicMemory:
    """Per-env ring buffer ``tokens [M, N, L, D]`` of the tokens of the ``N`` latest episodes.

    Episode ``j`` of a trial lives in slot ``j % N``. Slots of an env are zeroed when its trial
    starts, and a slot when an episode starts in it; nothing else is cleared between the episodes
    of a trial. Episodes may end before ``L`` steps (Meta-World's own evaluation ends them on
    success): the steps written per slot are kept, and past windows lie within them (an episode
    shorter than ``T`` gives a window that starts at its first step and ends in zeros).

    Args:
        num_envs: ``M``.
        num_episodes: ``N`` (current episode included).
        episode_length: ``L``.
        window: ``T``.
        token_dim: ``D``.
        seed: seeds the window-start sampler.
        device: storage device.
        past_windows: ``uniform`` (a uniformly drawn start) or ``max_reward`` (the window ending at
            the past episode's highest-reward step; the reward is the token's second-to-last entry).
    """

    def __init__(
        self,
        num_envs: int,
        num_episodes: int,
        episode_length: int,
        window: int,
        token_dim: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        past_windows: WindowSelection = "uniform",
    ) -> None:
        if past_windows not in WINDOW_SELECTIONS:
            raise ValueError(f"past_windows must be one of {list(WINDOW_SELECTIONS)}, got {past_windows!r}")
        self.past_windows = past_windows
        self.num_episodes = num_episodes
        self.episode_length = episode_length
        self.window = window
        self.tokens = torch.zeros(num_envs, num_episodes, episode_length, token_dim, device=device)
        self.steps_written = torch.zeros(num_envs, num_episodes, dtype=torch.long, device=device)
        self.generator = torch.Generator().manual_seed(seed)
        # Index tensors reused at every step (collection runs a few dozen envs: allocations show).
        self._envs = torch.arange(num_envs, device=device)
        self._window_offsets = torch.arange(window, device=device)

    @property
    def num_envs(self) -> int:
        return self.tokens.shape[0]

    def clear(self, env_mask: torch.Tensor) -> None:
        """Forget every stored episode of the envs in ``env_mask [M]``."""
        self.tokens[env_mask] = 0.0
        self.steps_written[env_mask] = 0

    def write(self, token: torch.Tensor, episode_idx: torch.Tensor, step: torch.Tensor) -> None:
        """Store ``token [M, D]`` at (episode ``episode_idx [M]``, step ``step [M]``) of each env."""
        slots = episode_idx % self.num_episodes
        starting = step == 0
        if starting.any():  # an episode that starts in a slot leaves nothing of the one before
            self.tokens[self._envs[starting], slots[starting]] = 0.0
        self.tokens[self._envs, slots, step] = token
        self.steps_written[self._envs, slots] = step + 1

    def sample_past_windows(self, episode_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Choose one window per past episode for envs starting episode ``episode_idx [n]``.

        Only valid for the ``n`` envs given (pass ``episode_idx`` of every env; select rows after).

        Returns:
            ``starts [M, N-1]``, ``valid [M, N-1]`` and ``windows [M, N-1, T, D]``.
        """
        num_past = self.num_episodes - 1
        ids, valid = past_episode_ids(episode_idx, num_past)
        slots = ids % self.num_episodes
        envs = self._envs.unsqueeze(-1)
        written = self.steps_written[envs, slots]  # [M, N-1]
        if self.past_windows == "max_reward":
            rewards = self.tokens[envs, slots, :, REWARD_ENTRY]  # [M, N-1, L]
            starts = max_reward_window_starts(rewards, self.window, written)
        else:
            starts = sample_window_starts(ids.shape, self.episode_length, self.window, self.generator).to(ids.device)
            starts = torch.minimum(starts, (written - self.window).clamp_min(0))  # within shorter episodes
        starts = starts * valid
        windows = gather_windows(self.tokens, slots, starts, self.window)
        return starts, valid, windows

    def current_window(self, episode_idx: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The current episode's last ``T`` tokens: ``window [M, T, D]``, ``length [M]``.

        Same windows as :func:`current_windows`, gathered straight from the ring buffer (``T``
        tokens per env, not the whole episode).
        """
        start = (step - self.window + 1).clamp_min(0)
        steps = start.unsqueeze(-1) + self._window_offsets
        slots = (episode_idx % self.num_episodes).unsqueeze(-1)
        return self.tokens[self._envs.unsqueeze(-1), slots, steps], step - start + 1


def episode_records(trials: TensorDictBase, num_episodes: int, window: int, episode_length: int) -> TensorDict:
    """Split a batch of whole trials into one record per episode, with its past-window context.

    Args:
        trials: ``[B, K * L]`` collected trials holding ``token [B, K*L, D]`` and the window starts
            sampled at collection ``window_starts [B, K*L, N-1]``.
        num_episodes: ``N``.
        window: ``T``.
        episode_length: ``L``.

    Returns:
        TensorDict ``[B * K]`` with ``steps [B*K, L]`` (the per-step data of each episode),
        ``past_windows [B*K, N-1, T, D]`` and ``past_valid [B*K, N-1]``.
    """
    batch, total = trials.shape
    episodes_per_row = total // episode_length
    steps = trials.reshape(batch * episodes_per_row, episode_length)
    tokens = trials["token"].reshape(batch, episodes_per_row, episode_length, -1)
    episode_idx = steps["episode_idx"][:, 0].reshape(batch, episodes_per_row)
    ids, valid = past_episode_ids(episode_idx, num_episodes - 1)
    # A collected row may hold several consecutive trials: index episodes within the row.
    row_episode = torch.arange(episodes_per_row, device=ids.device).view(1, -1, 1)
    row_ids = (row_episode - (episode_idx.unsqueeze(-1) - ids)).clamp_min(0)
    starts = steps["window_starts"][:, 0].reshape(batch, episodes_per_row, num_episodes - 1)
    windows = gather_windows(tokens, row_ids, starts, window)
    return TensorDict(
        {
            "steps": steps,
            "past_windows": windows.reshape(batch * episodes_per_row, num_episodes - 1, window, tokens.shape[-1]),
            "past_valid": valid.reshape(batch * episodes_per_row, num_episodes - 1),
        },
        batch_size=[batch * episodes_per_row],
    )
