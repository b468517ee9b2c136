"""Stop training on the first non-finite loss or weight, before anything non-finite is saved."""

from __future__ import annotations

import torch


class NonFiniteError(RuntimeError):
    """A loss or the weights became NaN or infinite: training stops before anything is saved."""


def raise_if_not_finite(metrics: dict[str, torch.Tensor], module: torch.nn.Module, where: str) -> None:
    """Raise :class:`NonFiniteError` if a ``train/loss*`` entry of ``metrics`` or any weight of
    ``module`` is not finite; ``where`` names the step in the message.

    Raised inside the training step, it stops the run before the epoch's checkpoint, so the last
    ``last.ckpt`` keeps the last finite weights. Every DDP process raises at the same step:
    gradients are averaged, so non-finite weights are the same everywhere.
    """
    for key, value in metrics.items():
        if key.startswith("train/loss") and not torch.isfinite(value):
            raise NonFiniteError(
                f"{where}: {key} is {value.item()}; training stopped, the last checkpoint keeps the last "
                "finite weights (a smaller model.optimizer.init_args.lr or model.max_grad_norm may help)"
            )
    if not torch.isfinite(torch.nn.utils.get_total_norm(module.parameters())):
        names = [name for name, p in module.named_parameters() if not torch.isfinite(p).all()]
        raise NonFiniteError(
            f"{where}: weights are not finite ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); "
            "training stopped, the last checkpoint keeps the last finite weights"
        )
