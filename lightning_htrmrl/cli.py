"""``htrmrl``: the LightningCLI entry point.

``--config`` files are merged left to right, the command-line options on top (see
:mod:`lightning_htrmrl.config_files` for the embedded default and experiment files). Env
dimensions and the trial structure are linked from the data module into the model, never
repeated in YAML.
"""

from __future__ import annotations

import os
import sys
from argparse import ArgumentError

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_htrmrl.callbacks import DDPScaling, MetaTestEvaluation
from lightning_htrmrl.config_files import SUBCOMMANDS, expand_config_files
from lightning_htrmrl.data import MetaRLDataModule
from lightning_htrmrl.metaworld_protocol import check_metaworld_benchmark
from lightning_htrmrl.module import MetaPPO, NonFiniteError
from lightning_htrmrl.runs import (
    CHECKPOINT_ALIASES,
    check_checkpoint,
    find_checkpoint,
    place_run_files,
    runs_folder,
    share_run_directory,
)
from lightning_htrmrl.validation import ConfigError

LINKED_KEYS = ("obs_dim", "action_dim", "episode_length", "episodes_per_trial")
ALLOWED_CLASSES = {
    "data.benchmark": ("lightning_htrmrl.envs.PointRobot", "lightning_htrmrl.envs.MetaWorld"),
    "model.encoder": (
        "lightning_htrmrl.models.HierarchicalEncoder",
        "lightning_htrmrl.models.FlatTransformerEncoder",
        "lightning_htrmrl.models.MLPEncoder",
    ),
}


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
        parser.add_argument(
            "--defaults",
            type=list[str] | None,
            default=None,
            help="in a config file: config files (paths relative to it) merged before it",
        )
        for key in LINKED_KEYS:
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyper-parameters here, before any class is built:
        # resolve `last` / `best` to a file of this run name and check it, so that a bad or missing
        # one gives one clear line instead of a silent fresh start.
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            place_run_files(config.trainer)
            ckpt_path = config.get("ckpt_path")
            if ckpt_path in CHECKPOINT_ALIASES:
                config.ckpt_path = str(find_checkpoint(ckpt_path, runs_folder(config.trainer)))
                print(f"ckpt_path {ckpt_path}: {config.ckpt_path}", file=sys.stderr)
            trained = None
            if config.ckpt_path and config.ckpt_path not in ("hpc", "registry"):
                trained = check_checkpoint(config.ckpt_path).get("benchmark")
            if config.meta_test.protocol == "metaworld":
                benchmark = config.data.benchmark
                facts = {key: benchmark.init_args.get(key) for key in ("benchmark", "task_name")}
                check_metaworld_benchmark(benchmark.class_path.rsplit(".", 1)[-1], trained or None, facts)
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand == "fit":
            check_slots_per_process(config)
        place_run_files(config.trainer)
        share_run_directory(config.trainer.logger)


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


def main(args: list[str] | None = None) -> None:
    """Run the CLI.

    Bad configuration ends with one ``error:`` line and exit code 2, before anything is built;
    non-finite training with one ``error:`` line and exit code 1; SIGTERM (after the current
    batch, Lightning's signal handling) with one line and exit code 143. Ctrl-C is Lightning's
    graceful shutdown (exit code 1). Collector processes are stopped in every case.
    """
    parser_kwargs = {"parser_mode": "omegaconf", "exit_on_error": False}
    try:
        if args is None:
            sys.argv[1:] = expand_config_files(sys.argv[1:])
        else:
            args = expand_config_files(list(args))
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
    except NonFiniteError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except SIGTERMException:
        print("error: stopped by SIGTERM; resume with --ckpt_path last", file=sys.stderr)
        sys.exit(143)


if __name__ == "__main__":
    main()
