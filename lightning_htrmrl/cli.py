"""``htrmrl``: the LightningCLI entry point.

``--config`` files are merged left to right, the command-line options on top (see
:mod:`lightning_htrmrl.config_files` for the embedded default and experiment files). Env
dimensions and the trial structure are linked from the data module into the model, never
repeated in YAML.
"""

from __future__ import annotations

import logging
import sys
import warnings
from argparse import ArgumentError
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from lightning_htrmrl.callbacks import DDPScaling, MetaTestEvaluation, RunProgressBar
from lightning_htrmrl.config_checks import check_seed, check_slots_per_process, check_trainer_numbers
from lightning_htrmrl.config_files import SUBCOMMANDS, expand_config_files
from lightning_htrmrl.data import MetaRLDataModule
from lightning_htrmrl.finite import NonFiniteError
from lightning_htrmrl.metaworld_protocol import check_metaworld_benchmark
from lightning_htrmrl.module import MetaPPO
from lightning_htrmrl.runs import (
    CHECKPOINT_ALIASES,
    check_checkpoint,
    experiment_of,
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

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # No `predict`: a policy acts inside a collector or an evaluation, not on a dataloader's batches.
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in SUBCOMMANDS}

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
            check_seed(config.get("seed_everything"))  # LightningCLI seeds before building anything
            place_run_files(config.trainer)
            ckpt_path = config.get("ckpt_path")
            if ckpt_path in CHECKPOINT_ALIASES:
                alias = ckpt_path
                ckpt_path = str(find_checkpoint(alias, runs_folder(config.trainer), experiment_of(config)))
                config.ckpt_path = ckpt_path
                print(f"ckpt_path {alias}: {ckpt_path}", file=sys.stderr)
            trained = None
            if ckpt_path and ckpt_path not in ("hpc", "registry"):
                trained = check_checkpoint(ckpt_path).get("benchmark")
            if config.meta_test.protocol == "metaworld":
                benchmark = config.data.benchmark
                facts = {key: benchmark.init_args.get(key) for key in ("benchmark", "task_name")}
                check_metaworld_benchmark(benchmark.class_path.rsplit(".", 1)[-1], trained or None, facts)
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = self._get(self.config_init, "trainer", default={})
        configured = list(trainer.get("callbacks") or [])
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in configured):
            kwargs["callbacks"] = [*configured, RunProgressBar()]
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError) as error:  # Lightning's own checks
            if isinstance(error, ConfigError):
                raise
            raise ConfigError(f"trainer: {error}") from None

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_trainer_numbers(config.trainer)
        if self.subcommand == "fit":
            check_slots_per_process(config)
        place_run_files(config.trainer)
        share_run_directory(config.trainer.logger)


def quiet_library_notices() -> None:
    """Silence library messages that ask nothing of the user."""
    # Lightning 2.6's pytree helper calls an API that torch 2.13 deprecates.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # TrialBatches' length is exact: one iterator in the main process (no DataLoader workers).
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
    # TorchRL logs every replay-buffer storage it creates (one per PPO epoch) at INFO.
    logging.getLogger("torchrl").setLevel(logging.WARNING)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: "litlogger" not in record.getMessage())


def config_error_within(error: Exception) -> Exception:
    """The :class:`ConfigError` that ``error`` wraps, or ``error`` itself if it is one or an
    ``ArgumentError``; re-raises any other error.

    jsonargparse wraps an error raised while building a class given in a union-typed key (a
    callback, a logger, ``meta_test.metaworld``) in a ``ValueError`` listing every union member;
    the user needs only the one line from the class itself.
    """
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, (ConfigError, ArgumentError)):
            return cause
        cause = cause.__cause__
    raise error


def main(args: list[str] | None = None) -> None:
    """Run the CLI.

    Bad configuration ends with one ``error:`` line and exit code 2, before anything is built;
    non-finite training with one ``error:`` line and exit code 1; SIGTERM (after the current
    batch; under DDP every process at the same point, see ``DDPScaling``) with one line and exit
    code 143. Ctrl-C is Lightning's
    graceful shutdown (exit code 1). Collector processes are stopped in every case.
    """
    quiet_library_notices()
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
    except (ConfigError, ArgumentError, ValueError) as error:
        error = config_error_within(error)
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
