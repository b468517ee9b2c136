"""Checks of the parsed config that need more than one class's arguments, run before any class is
built: the process count against ``data.num_envs``, the trainer's numbers (Lightning accepts values
that make no sense for this trainer, or fails on them with a traceback), the global seed and the
loggers. Each failure is one :class:`ConfigError` naming the key."""

from __future__ import annotations

import os

from lightning_htrmrl.validation import ConfigError

# trainer key -> (smallest allowed value, the special value also allowed, what the special value means)
TRAINER_LOWER_BOUNDS = {
    "num_nodes": (1, None, ""),
    "max_epochs": (1, -1, "no epoch limit"),
    "max_steps": (1, -1, "no step limit"),
    "min_epochs": (0, None, ""),
    "min_steps": (0, None, ""),
    "check_val_every_n_epoch": (1, None, ""),
    "num_sanity_val_steps": (0, -1, "all"),
    "log_every_n_steps": (1, None, ""),
    "reload_dataloaders_every_n_epochs": (0, None, ""),
}

# logger init_args the loggers take at values that stop them writing (or fail later): smallest allowed
LOGGER_LOWER_BOUNDS = {"flush_logs_every_n_steps": 1, "max_queue": 1, "flush_secs": 1}


def planned_world_size(trainer_config) -> int | None:
    """The number of training processes the trainer config (or a launcher such as torchrun) asks
    for, or None where only the strategy's setup knows (``devices: auto`` or -1)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    devices = trainer_config.get("devices")
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    elif isinstance(devices, str) and "," in devices:
        devices = len([d for d in devices.split(",") if d.strip()])
    if not isinstance(devices, int) or devices < 1:
        return None
    return devices * int(trainer_config.get("num_nodes") or 1)


def check_slots_per_process(config) -> None:
    """``data.num_envs`` is shared out over the processes: each needs at least one slot."""
    world_size = planned_world_size(config.trainer)
    num_envs = config.get("data", {}).get("num_envs")
    if world_size and isinstance(num_envs, int) and 0 < num_envs < world_size:
        raise ConfigError(
            f"data.num_envs ({num_envs}) must be >= the number of processes ({world_size}, trainer.devices x "
            "trainer.num_nodes): each collects a share of the slots"
        )


def check_trainer_numbers(trainer_config) -> None:
    """The trainer's numeric keys at values this trainer can run with."""
    for key, (lowest, special, meaning) in TRAINER_LOWER_BOUNDS.items():
        value = trainer_config.get(key)
        if value is None or isinstance(value, bool) or value == special or value >= lowest:
            continue
        also = f", or {special} ({meaning})" if special is not None else ""
        raise ConfigError(f"trainer.{key} must be >= {lowest}{also}, got {value}")
    devices = trainer_config.get("devices")
    if isinstance(devices, int) and not isinstance(devices, bool) and devices < 1 and devices != -1:
        raise ConfigError(f"trainer.devices must be >= 1, -1 (every GPU) or auto, got {devices}")
    if trainer_config.get("accumulate_grad_batches") not in (None, 1):
        raise ConfigError(
            f"trainer.accumulate_grad_batches must be 1, got {trainer_config.get('accumulate_grad_batches')}: "
            "MetaPPO steps its optimizer itself (model.episodes_per_minibatch sizes a gradient step)"
        )
    if trainer_config.get("gradient_clip_val") is not None:
        raise ConfigError(
            "trainer.gradient_clip_val must be null: MetaPPO clips its own gradients (set model.max_grad_norm)"
        )
    for index, logger in enumerate(trainer_config.get("logger") or []):
        args = getattr(logger, "init_args", None) or {}
        for key, lowest in LOGGER_LOWER_BOUNDS.items():
            value = args.get(key)
            if value is not None and value < lowest:
                raise ConfigError(f"trainer.logger[{index}].init_args.{key} must be >= {lowest}, got {value}")


def check_seed(seed: object) -> None:
    """``seed_everything``: true (a random seed), false/null (none) or an integer seed >= 0."""
    if not isinstance(seed, bool) and isinstance(seed, int) and seed < 0:
        raise ConfigError(f"seed_everything must be >= 0 (or true for a random seed), got {seed}")
