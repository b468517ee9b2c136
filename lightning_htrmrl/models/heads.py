"""Actor and critic heads on the encoder's features (TorchRL ``ProbabilisticActor`` / ``ValueOperator``)."""

from __future__ import annotations

import math
from typing import Literal

from tensordict.nn import TensorDictModule
from tensordict.nn.distributions.continuous import AddStateIndependentNormalScale
from torch import nn
from torchrl.modules import MLP, IndependentNormal, ProbabilisticActor, TanhNormal, ValueOperator

Distribution = Literal["tanh_normal", "normal"]


def _mlp(in_features: int, out_features: int, hidden: list[int], output_gain: float) -> MLP:
    mlp = MLP(in_features=in_features, out_features=out_features, num_cells=list(hidden), activation_class=nn.Tanh)
    for layer in mlp.modules():
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight, math.sqrt(2))
            nn.init.zeros_(layer.bias)
    nn.init.orthogonal_(mlp[-1].weight, output_gain)
    return mlp


def make_actor(
    in_features: int,
    action_dim: int,
    hidden: list[int],
    distribution: Distribution = "normal",
    init_std: float = 1.0,
) -> ProbabilisticActor:
    """Gaussian policy on ``features [*, in_features]`` with a learned state-independent std.

    ``tanh_normal`` squashes samples into ``[-1, 1]``; ``normal`` is the paper's (garage) Gaussian
    whose samples the env clips. Writes ``action``, ``action_log_prob``, ``loc`` and ``scale``.
    """
    net = nn.Sequential(
        _mlp(in_features, action_dim, hidden, output_gain=0.01),
        AddStateIndependentNormalScale(action_dim, init_value=math.log(init_std), scale_lb=1e-4),
    )
    if distribution == "tanh_normal":
        dist_class, dist_kwargs = TanhNormal, {"low": -1.0, "high": 1.0}
    elif distribution == "normal":
        dist_class, dist_kwargs = IndependentNormal, {}
    else:
        raise ValueError(f"model.distribution must be one of ['tanh_normal', 'normal'], got {distribution!r}")
    return ProbabilisticActor(
        TensorDictModule(net, in_keys=["features"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        distribution_class=dist_class,
        distribution_kwargs=dist_kwargs,
        return_log_prob=True,
    )


def make_critic(in_features: int, hidden: list[int]) -> ValueOperator:
    """State-value head: ``features -> state_value [*, 1]``."""
    return ValueOperator(_mlp(in_features, 1, hidden, output_gain=1.0), in_keys=["features"])
