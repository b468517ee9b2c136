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

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_htrmrl.callbacks import DDPScaling, MetaTestEvaluation
from lightning_htrmrl.data import MetaRLDataModule
from lightning_htrmrl.envs.base import ConfigError
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
        place_run_files(config.trainer)
        share_run_directory(config.trainer.logger)
        optimizer = config.model.optimizer
        lr = getattr(getattr(optimizer, "init_args", None), "lr", None)
        if lr is not None and not lr > 0:
            raise ConfigError(f"model.optimizer.init_args.lr must be > 0, got {lr}")


def config_file_arguments(args: list[str]) -> list[str]:
    """The files given with ``--config``/``-c`` (either ``--config F`` or ``--config=F``)."""
    files = [value for flag, value in zip(args, args[1:]) if flag in ("-c", "--config")]
    return files + [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]


def check_config_files(args: list[str]) -> None:
    """Fail in one line naming the file when a ``--config`` file is missing, unreadable or not YAML."""
    for name in config_file_arguments(args):
        path = Path(name)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"--config {name}: cannot read it ({error.strerror or error})") from None
        try:
            yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"--config {name}: not valid YAML{where}: {problem}") from None


def with_default_configs(args: list[str]) -> list[str]:
    """Insert the embedded default configs after the subcommand if no ``--config`` is given."""
    if not args or args[0] not in SUBCOMMANDS:
        return args
    if any(arg in ("-c", "--config") or arg.startswith("--config=") for arg in args):
        return args
    defaults = [item for path in default_config_files() for item in ("--config", path)]
    return [args[0], *defaults, *args[1:]]


def main(args: list[str] | None = None) -> None:
    """Run the CLI.

    Bad configuration ends with one ``error:`` line and exit code 2, before anything is built;
    non-finite training with one ``error:`` line and exit code 1; SIGTERM (after the current
    batch, Lightning's signal handling) with one line and exit code 143. Ctrl-C is Lightning's
    graceful shutdown (exit code 1). Collector processes are stopped in every case.
    """
    if args is None:
        sys.argv[1:] = with_default_configs(sys.argv[1:])
    else:
        args = with_default_configs(list(args))
    parser_kwargs = {"parser_mode": "omegaconf", "exit_on_error": False}
    try:
        check_config_files(sys.argv[1:] if args is None else args)
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
