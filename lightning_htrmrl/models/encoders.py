"""Context encoders: map the episodic memory and the current state to the features the heads see.

Every encoder standardises its inputs (tokens and state) with an :class:`InputNormalizer` whose
statistics the trainer updates between PPO iterations, and has two entry points that compute the
same function:

* collection (one step for ``M`` envs): :meth:`ContextEncoder.begin_episode` once per episode on the
  past windows (its result is cached), then :meth:`ContextEncoder.step` at every step;
* training (whole episodes): :meth:`ContextEncoder.forward`, which runs ``begin_episode`` once per
  episode and ``step`` for all ``L`` steps of it as one batch.

Encoders are built from config as ``encoder(obs_dim, action_dim)``; the remaining arguments are the
model's hyper-parameters.
"""

from __future__ import annotations

import abc

import torch
from tensordict import TensorDict
from torch import nn

from lightning_htrmrl.memory import current_windows, every_step_windows
from lightning_htrmrl.models.layers import (
    SequenceEncoder,
    SinusoidalPositionalEncoding,
    attention_mask,
    make_transformer,
    run_transformer,
)
from lightning_htrmrl.models.normalization import InputNormalizer
from lightning_htrmrl.trials import token_dim
from lightning_htrmrl.validation import ConfigError, require_positive


def check_transformer_shape(**sizes: int) -> None:
    """Every size (``model.encoder.init_args.<name>``) > 0, and ``d_model`` divisible by ``num_heads``."""
    for key, value in sizes.items():
        require_positive(f"model.encoder.init_args.{key}", value)
    d_model, num_heads = sizes["d_model"], sizes["num_heads"]
    if d_model % num_heads:
        raise ConfigError(f"model.encoder.init_args.d_model ({d_model}) must be divisible by num_heads ({num_heads})")


class ContextEncoder(nn.Module, abc.ABC):
    """Base class.

    Args:
        obs_dim: size of the state ``s_t``.
        action_dim: size of the action.
        num_episodes: ``N``, episodes in memory (the current one included).
        window: ``T``, tokens per episode window.
        state_embedding_dim: size of ``phi2(s_t)`` concatenated to the context (0: no state branch).
    """

    def __init__(self, obs_dim: int, action_dim: int, num_episodes: int, window: int, state_embedding_dim: int) -> None:
        super().__init__()
        for key, value in (("num_episodes", num_episodes), ("window", window)):
            require_positive(f"model.encoder.init_args.{key}", value)
        if state_embedding_dim < 0:
            raise ConfigError(f"model.encoder.init_args.state_embedding_dim must be >= 0, got {state_embedding_dim}")
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.token_dim = token_dim(obs_dim, action_dim)
        self.num_episodes = num_episodes
        self.window = window
        self.state_embedding = nn.Linear(obs_dim, state_embedding_dim) if state_embedding_dim else None
        self.state_embedding_dim = state_embedding_dim
        self.input_norm = InputNormalizer(self.token_dim, obs_dim)

    @property
    @abc.abstractmethod
    def context_dim(self) -> int:
        """Size of the context ``z``."""

    @property
    def out_features(self) -> int:
        """Size of the features ``[z, phi2(s)]`` given to the heads."""
        return self.context_dim + self.state_embedding_dim

    def begin_episode(self, past_windows: torch.Tensor, past_valid: torch.Tensor) -> TensorDict:
        """Encode the past episodes once per episode.

        Args:
            past_windows: ``[M, N-1, T, D]`` one window of raw tokens per past episode.
            past_valid: ``[M, N-1]`` whether that past episode exists.

        Returns:
            A cache TensorDict ``[M]`` handed to :meth:`step` at every step of the episode.
        """
        return self.encode_past(self.input_norm(past_windows), past_valid)

    def context(self, cache: TensorDict, current: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
        """Context ``z [M, context_dim]`` from the cache and the current window of raw tokens
        ``[M, T, D]`` whose first ``num_valid [M]`` tokens are valid."""
        return self.encode_context(cache, self.input_norm(current), num_valid)

    @abc.abstractmethod
    def encode_past(self, past_windows: torch.Tensor, past_valid: torch.Tensor) -> TensorDict:
        """:meth:`begin_episode` on normalised tokens."""

    @abc.abstractmethod
    def encode_context(self, cache: TensorDict, current: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
        """:meth:`context` on normalised tokens."""

    def step(
        self, cache: TensorDict, current: torch.Tensor, num_valid: torch.Tensor, observation: torch.Tensor
    ) -> torch.Tensor:
        """Features ``[M, out_features]`` for one step of ``M`` envs (raw tokens and state)."""
        return self.state_features(self.context(cache, current, num_valid), observation)

    def state_features(self, z: torch.Tensor, observation: torch.Tensor) -> torch.Tensor:
        """``[z, phi2(s)]`` from the context ``z [*, C]`` and the raw state ``[*, obs_dim]``."""
        if self.state_embedding is None:
            return z
        return torch.cat([z, self.state_embedding(self.input_norm.observation(observation))], dim=-1)

    def forward(
        self,
        tokens: torch.Tensor,
        observation: torch.Tensor,
        past_windows: torch.Tensor,
        past_valid: torch.Tensor,
    ) -> torch.Tensor:
        """Features for every step of ``E`` whole episodes.

        Args:
            tokens: ``[E, L, D]``.
            observation: ``[E, L, obs_dim]``.
            past_windows: ``[E, N-1, T, D]``.
            past_valid: ``[E, N-1]``.

        Returns:
            ``[E, L, out_features]``.
        """
        cache = self.begin_episode(past_windows, past_valid)
        return self.state_features(self.episode_contexts(cache, self.input_norm(tokens)), observation)

    def episode_contexts(self, cache: TensorDict, tokens: torch.Tensor) -> torch.Tensor:
        """The context at every step of ``E`` episodes, ``[E, L, C]``, from their normalised tokens
        ``[E, L, D]`` and the cache ``[E]`` of :meth:`begin_episode`.

        This is :meth:`encode_context` on the window of every step (what collection computes step by
        step); encoders override it with an equal but cheaper whole-episode computation.
        """
        episodes, length = tokens.shape[:2]
        step = torch.arange(length, device=tokens.device).expand(episodes, length)
        windows, num_valid = current_windows(tokens, step, self.window)
        cache = cache.unsqueeze(1).expand(episodes, length).reshape(-1)
        z = self.encode_context(cache, windows.flatten(0, 1), num_valid.flatten())
        return z.view(episodes, length, -1)

    def context_at(
        self, tokens: torch.Tensor, past_windows: torch.Tensor, past_valid: torch.Tensor, step: torch.Tensor
    ) -> torch.Tensor:
        """The context ``z [E, context_dim]`` the policy formed at step ``step [E]`` of ``E`` episodes
        (tokens ``[E, L, D]``, past windows ``[E, N-1, T, D]`` and ``past_valid [E, N-1]``)."""
        cache = self.begin_episode(past_windows, past_valid)
        current, num_valid = current_windows(tokens, step, self.window)
        return self.context(cache, current, num_valid)


def _window_valid(num_valid: torch.Tensor, window: int) -> torch.Tensor:
    return torch.arange(window, device=num_valid.device) < num_valid.unsqueeze(-1)


class HierarchicalEncoder(ContextEncoder):
    """HTrMRL: intra-episode transformer T1, inter-episode transformer T2, masked mean.

    T1 (linear embedding + sinusoidal positions) encodes each episode's window into its output at
    the last valid token. T2 (no positional encoding by default: episodes form a set) mixes the
    ``N`` episode vectors under a key-padding mask for episodes that do not exist yet; their masked
    mean is the task context ``z``. Past-episode encodings are computed once per episode and cached.

    Args:
        obs_dim, action_dim: env dimensions (linked from the task distribution).
        num_episodes: ``N``.
        window: ``T``.
        d_model: width of both transformers.
        num_heads: attention heads of both transformers.
        intra_layers: layers of T1.
        inter_layers: layers of T2.
        ff_dim: feed-forward width.
        state_embedding_dim: size of ``phi2(s_t)`` (0 disables the state branch: an ablation).
        inter_positional: add sinusoidal positions (episode order) in T2 (an ablation).
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        num_episodes: int = 4,
        window: int = 10,
        d_model: int = 64,
        num_heads: int = 4,
        intra_layers: int = 2,
        inter_layers: int = 1,
        ff_dim: int = 128,
        state_embedding_dim: int = 64,
        inter_positional: bool = False,
    ) -> None:
        super().__init__(obs_dim, action_dim, num_episodes, window, state_embedding_dim)
        check_transformer_shape(
            d_model=d_model, num_heads=num_heads, intra_layers=intra_layers, inter_layers=inter_layers, ff_dim=ff_dim
        )
        self.d_model = d_model
        self.intra = SequenceEncoder(self.token_dim, d_model, num_heads, intra_layers, ff_dim, max_len=window)
        self.inter = make_transformer(d_model, num_heads, inter_layers, ff_dim)
        self.inter_position = SinusoidalPositionalEncoding(d_model, num_episodes) if inter_positional else None

    @property
    def context_dim(self) -> int:
        return self.d_model

    def encode_windows(self, windows: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
        """T1: ``windows [B, T, D]`` with ``num_valid [B]`` valid tokens -> ``[B, d_model]``."""
        return self.intra(windows, _window_valid(num_valid, self.window), num_valid - 1)

    def encode_past(self, past_windows: torch.Tensor, past_valid: torch.Tensor) -> TensorDict:
        envs, num_past = past_valid.shape
        flat = past_windows.flatten(0, 1)
        full = torch.full((len(flat),), self.window, device=flat.device)
        encoding = self.encode_windows(flat, full) if len(flat) else flat.new_zeros(0, self.d_model)
        return TensorDict(
            {"past_encoding": encoding.view(envs, num_past, self.d_model), "past_valid": past_valid},
            batch_size=[envs],
        )

    def pool(self, episodes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """T2 + masked mean: ``episodes [B, N, d]``, ``valid [B, N]`` -> ``z [B, d]``."""
        if self.inter_position is not None:
            episodes = self.inter_position(episodes)
        mixed = run_transformer(self.inter, episodes, attention_mask(valid, causal=False))
        weights = valid.unsqueeze(-1).to(mixed.dtype)
        return (mixed * weights).sum(1) / weights.sum(1)

    def encode_context(self, cache: TensorDict, current: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
        return self.pool_with_past(cache, self.encode_windows(current, num_valid))

    def pool_with_past(self, cache: TensorDict, current: torch.Tensor) -> torch.Tensor:
        """T2 over the cached past encodings ``[B, N-1, d]`` and the current window's ``[B, d]``."""
        episodes = torch.cat([cache["past_encoding"], current.unsqueeze(1)], dim=1)
        current_valid = torch.ones(len(current), 1, dtype=torch.bool, device=current.device)
        valid = torch.cat([cache["past_valid"], current_valid], dim=1)
        return self.pool(episodes, valid)

    def episode_contexts(self, cache: TensorDict, tokens: torch.Tensor) -> torch.Tensor:
        # Each token is embedded once, then the window of every step is gathered from the
        # embeddings (positions are added per window): T times less embedding work than embedding
        # every window, and the same numbers.
        episodes, length = tokens.shape[:2]
        windows, num_valid = every_step_windows(self.intra.embed(tokens), self.window)
        num_valid = num_valid.flatten()
        current = self.intra.encode_embedded(
            windows.flatten(0, 1), _window_valid(num_valid, self.window), num_valid - 1
        )
        cache = cache.unsqueeze(1).expand(episodes, length).reshape(-1)
        return self.pool_with_past(cache, current).view(episodes, length, -1)


class FlatTransformerEncoder(ContextEncoder):
    """One flat transformer over all context tokens: TrMRL and the flat ablation.

    The sequence is the ``N - 1`` past windows followed by the current window (``N * T`` tokens,
    sinusoidal positions, causal attention as in TrMRL); the context is the output at the current
    step's token. With ``num_episodes=1, window=5`` this is the TrMRL baseline (working memory of the
    5 most recent transitions of the current episode). Nothing can be cached, so per-step cost grows
    with ``N * T``.

    Args:
        obs_dim, action_dim: env dimensions.
        num_episodes: ``N``.
        window: ``T``.
        d_model, num_heads, num_layers, ff_dim: transformer shape.
        state_embedding_dim: size of ``phi2(s_t)`` (0: TrMRL, whose token already holds ``s_t``).
        causal: causal attention.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        num_episodes: int = 1,
        window: int = 5,
        d_model: int = 64,
        num_heads: int = 4,
        num_layers: int = 3,
        ff_dim: int = 128,
        state_embedding_dim: int = 0,
        causal: bool = True,
    ) -> None:
        super().__init__(obs_dim, action_dim, num_episodes, window, state_embedding_dim)
        check_transformer_shape(d_model=d_model, num_heads=num_heads, num_layers=num_layers, ff_dim=ff_dim)
        self.d_model = d_model
        self.encoder = SequenceEncoder(
            self.token_dim, d_model, num_heads, num_layers, ff_dim, max_len=num_episodes * window, causal=causal
        )

    @property
    def context_dim(self) -> int:
        return self.d_model

    def encode_past(self, past_windows: torch.Tensor, past_valid: torch.Tensor) -> TensorDict:
        return TensorDict({"past_windows": past_windows, "past_valid": past_valid}, batch_size=[len(past_valid)])

    def encode_context(self, cache: TensorDict, current: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
        past = cache["past_windows"].flatten(1, 2)
        past_valid = cache["past_valid"].repeat_interleave(self.window, dim=1)
        tokens = torch.cat([past, current], dim=1)
        valid = torch.cat([past_valid, _window_valid(num_valid, self.window)], dim=1)
        return self.encoder(tokens, valid, past.shape[1] + num_valid - 1)

    def episode_contexts(self, cache: TensorDict, tokens: torch.Tensor) -> torch.Tensor:
        # The embedding is per token: embed the episode's tokens and its past windows once, then
        # gather every step's sequence from the embeddings (positions are added per sequence).
        episodes, length = tokens.shape[:2]
        windows, num_valid = every_step_windows(self.encoder.embed(tokens), self.window)  # [E, L, T, d]
        past = self.encoder.embed(cache["past_windows"].flatten(1, 2))  # [E, (N-1) T, d]
        num_past = past.shape[1]
        past_valid = cache["past_valid"].repeat_interleave(self.window, dim=1)
        sequences = torch.cat([past.unsqueeze(1).expand(-1, length, -1, -1), windows], dim=2)
        valid = torch.cat(
            [past_valid.unsqueeze(1).expand(-1, length, -1), _window_valid(num_valid, self.window)], dim=2
        )
        last = num_past + num_valid.flatten() - 1
        z = self.encoder.encode_embedded(sequences.flatten(0, 1), valid.flatten(0, 1), last)
        return z.view(episodes, length, -1)


class MLPEncoder(ContextEncoder):
    """No memory: the heads see the current state only (the lower-bound baseline).

    Args:
        obs_dim, action_dim: env dimensions.
    """

    def __init__(self, obs_dim: int, action_dim: int) -> None:
        super().__init__(obs_dim, action_dim, num_episodes=1, window=1, state_embedding_dim=0)

    @property
    def context_dim(self) -> int:
        return self.obs_dim

    def encode_past(self, past_windows: torch.Tensor, past_valid: torch.Tensor) -> TensorDict:
        return TensorDict({}, batch_size=[len(past_valid)])

    def encode_context(self, cache: TensorDict, current: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
        # With T = 1 the window is the current token, whose first entries are s_t.
        return current[:, 0, : self.obs_dim]

    def episode_contexts(self, cache: TensorDict, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[..., : self.obs_dim]
