"""Running statistics and the per-feature standardisation of the encoder's inputs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class RunningMeanStd(nn.Module):
    """Running mean and variance of a stream of ``[*, *shape]`` values (parallel Welford, float64).

    Saved in checkpoints as buffers. :meth:`update` merges a batch's moments; under DDP pass
    ``all_gather`` so that every process merges every process's batch in the same order and the
    statistics stay identical everywhere.
    """

    def __init__(self, shape: tuple[int, ...] = (), epsilon: float = 1e-8) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @property
    def std(self) -> torch.Tensor:
        return (self.var + self.epsilon).sqrt().float()

    @torch.no_grad()
    def update(self, values: torch.Tensor, all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        values = values.detach().double().reshape(-1, *self.mean.shape)
        moments = torch.stack([values.mean(0), values.var(0, unbiased=False)])
        count = torch.tensor(float(len(values)), dtype=torch.float64, device=values.device)
        if all_gather is not None:  # [world, 2, *shape] and [world]
            moments, count = all_gather(moments), all_gather(count)
        else:
            moments, count = moments.unsqueeze(0), count.unsqueeze(0)
        for (batch_mean, batch_var), batch_count in zip(moments, count):
            delta = batch_mean - self.mean
            total = self.count + batch_count
            self.mean += delta * batch_count / total
            m2 = self.var * self.count + batch_var * batch_count + delta.square() * self.count * batch_count / total
            self.var = m2 / total
            self.count = total


class InputNormalizer(nn.Module):
    """Standardises RL^2 tokens ``[*, D]`` and states ``[*, obs_dim]`` per feature, then clips.

    The statistics are those of the collected tokens (the state is the token's first ``obs_dim``
    entries, so both share them). Until the first :meth:`update` it is the identity. The float32
    ``shift``, ``scale`` and ``clip`` buffers used by :meth:`forward` change only in :meth:`update`,
    which the trainer calls between PPO iterations: collection and the update of a batch see the same
    normalisation. (TorchRL's ``VecNorm`` / ``ObservationNorm`` transforms update inside the env at
    every step, so a recomputed log-prob would not match the collected one.) Features that never
    vary (e.g. Meta-World's hidden goal) map to 0.

    Args:
        token_dim: ``D``.
        obs_dim: size of the state at the start of the token.
        clip: normalised values are clipped to ``[-clip, clip]``.
        min_std: floor of the standard deviation (keeps near-constant features from exploding).
    """

    def __init__(self, token_dim: int, obs_dim: int, clip: float = 5.0, min_std: float = 1e-3) -> None:
        super().__init__()
        self.obs_dim = obs_dim
        self.clip_value = clip
        self.min_std = min_std
        self.stats = RunningMeanStd((token_dim,))
        self.register_buffer("shift", torch.zeros(token_dim))
        self.register_buffer("scale", torch.ones(token_dim))
        self.register_buffer("clip", torch.tensor(float("inf")))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[*, D]`` -> ``[*, D]``."""
        return self._normalize(tokens, self.shift, self.scale)

    def observation(self, observation: torch.Tensor) -> torch.Tensor:
        """``[*, obs_dim]`` -> ``[*, obs_dim]``."""
        return self._normalize(observation, self.shift[: self.obs_dim], self.scale[: self.obs_dim])

    def _normalize(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.clamp((x - shift) * scale, -self.clip, self.clip)

    @property
    def initialized(self) -> bool:
        return bool(self.stats.count > 0)

    @torch.no_grad()
    def update(self, tokens: torch.Tensor, all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Merge the tokens ``[*, D]`` of a collected batch into the statistics and apply them."""
        self.stats.update(tokens, all_gather)
        self.shift.copy_(self.stats.mean.float())
        self.scale.copy_(1.0 / self.stats.var.sqrt().float().clamp_min(self.min_std))
        self.clip.fill_(self.clip_value)
