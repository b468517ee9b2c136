"""``htrmrl``: the LightningCLI entry point.

A subcommand given without any ``--config`` runs the embedded default: the packaged
``conf/base.yaml``, ``conf/benchmark/ml1_reach.yaml`` and ``conf/model/htrmrl.yaml``, in that order,
with the command-line options on top. ``--config`` files are merged left to right. Env
dimensions and the trial structure are linked from the data module into the model, never
repeated in YAML.
"""

from __future__ import annotations

import sys
from argparse import ArgumentError
from importlib import resources
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from lightning_htrmrl.callbacks import DDPScaling, MetaTestEvaluation
from lightning_htrmrl.data import MetaRLDataModule
from lightning_htrmrl.envs.base import ConfigError
from lightning_htrmrl.module import CHECKPOINT_KEY, MetaPPO

DEFAULT_CONFIGS = ("base.yaml", "benchmark/ml1_reach.yaml", "model/htrmrl.yaml")
LINKED_KEYS = ("obs_dim", "action_dim", "episode_length", "episodes_per_trial")
SUBCOMMANDS = ("fit", "validate", "test", "predict")
ALLOWED_CLASSES = {
    "data.benchmark": ("lightning_htrmrl.envs.PointRobot", "lightning_htrmrl.envs.MetaWorld"),
    "model.encoder": (
        "lightning_htrmrl.models.HierarchicalEncoder",
        "lightning_htrmrl.models.FlatTransformerEncoder",
        "lightning_htrmrl.models.MLPEncoder",
    ),
}


def default_config_files() -> list[str]:
    """Paths of the packaged default config files, in merge order."""
    root = resources.files("lightning_htrmrl.conf")
    return [str(root.joinpath(name)) for name in DEFAULT_CONFIGS]


def share_run_directory(loggers: object) -> None:
    """Give file loggers that share ``save_dir`` and ``name`` one new ``version_N`` directory.

    TensorBoard and CSV loggers would otherwise each pick their own next version; this keeps the
    events, ``metrics.csv``, ``config.yaml`` and checkpoints of a run in one folder. Existing
    version folders are never reused (a saved ``config.yaml`` names its run's version: running it
    again gets a new one).
    """
    if not isinstance(loggers, list):
        return
    args = [getattr(logger, "init_args", None) for logger in loggers]
    if not args or any(a is None or "save_dir" not in a for a in args):
        return
    if len({(str(a.save_dir), str(a.get("name", "lightning_logs"))) for a in args}) != 1:
        return
    root = Path(args[0].save_dir) / str(args[0].get("name", "lightning_logs"))
    versions = {a.get("version") for a in args}
    if len(versions) == 1 and None not in versions and not (root / str(versions.pop())).exists():
        return  # one explicit, unused version (e.g. a re-used config.yaml of a fresh run)
    taken = [int(p.name.split("_")[1]) for p in root.glob("version_*") if p.name.split("_")[1].isdigit()]
    version = f"version_{max(taken, default=-1) + 1}"
    for a in args:
        a.version = version


def check_checkpoint(path: str) -> None:
    """Fail early, in one line, on a missing, unreadable or foreign checkpoint."""
    if path in ("last", "best", "hpc", "registry"):
        return
    if not Path(path).is_file():
        raise ConfigError(f"ckpt_path: no such file: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # noqa: BLE001 (any failure means the file is unusable)
        reason = str(error).split(". ")[0]
        raise ConfigError(f"ckpt_path: cannot read {path} (truncated or not a PyTorch checkpoint: {reason})") from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise ConfigError(f"ckpt_path: {path} was not written by lightning_htrmrl (no '{CHECKPOINT_KEY}' entry)")


class ConfigInCheckpoint(SaveConfigCallback):
    """Saves ``config.yaml`` in the run directory (never overwriting one) and gives the resolved
    config to the model, which stores it in every checkpoint."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pl_module.resolved_config = self.parser.dump(self.config, skip_none=False)


class HTrMRLCLI(LightningCLI):
    """LightningCLI with the data -> model links of this project."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(MetaTestEvaluation, "meta_test")
        parser.add_lightning_class_args(DDPScaling, "ddp")
        for key in LINKED_KEYS:
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyper-parameters here, before any class is built:
        # check the file first so a bad one gives one clear line.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path:
            check_checkpoint(ckpt_path)
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        share_run_directory(config.trainer.logger)
        optimizer = config.model.optimizer
        lr = getattr(getattr(optimizer, "init_args", None), "lr", None)
        if lr is not None and not lr > 0:
            raise ConfigError(f"model.optimizer.init_args.lr must be > 0, got {lr}")


def with_default_configs(args: list[str]) -> list[str]:
    """Insert the embedded default configs after the subcommand if no ``--config`` is given."""
    if not args or args[0] not in SUBCOMMANDS:
        return args
    if any(arg in ("-c", "--config") or arg.startswith("--config=") for arg in args):
        return args
    defaults = [item for path in default_config_files() for item in ("--config", path)]
    return [args[0], *defaults, *args[1:]]


def main(args: list[str] | None = None) -> None:
    """Run the CLI; bad configuration ends with one ``error:`` line and exit code 2."""
    if args is None:
        sys.argv[1:] = with_default_configs(sys.argv[1:])
    else:
        args = with_default_configs(list(args))
    parser_kwargs = {"parser_mode": "omegaconf", "exit_on_error": False}
    try:
        HTrMRLCLI(
            MetaPPO,
            MetaRLDataModule,
            parser_kwargs={**parser_kwargs, **{name: dict(parser_kwargs) for name in SUBCOMMANDS}},
            save_config_callback=ConfigInCheckpoint,
            save_config_kwargs={"overwrite": False},
            auto_configure_optimizers=False,
            args=args,
        )
    except (ConfigError, ArgumentError) as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        for key, allowed in ALLOWED_CLASSES.items():
            if f'Parser key "{key}"' in message:
                message += f" (allowed {key}: {', '.join(allowed)}, or another subclass given by its full class path)"
        print(f"error: {message}", file=sys.stderr)
        print("tip: `htrmrl fit --help` lists every option", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
