"""``htrmrl``: the LightningCLI entry point.

A subcommand given without any ``--config`` runs the embedded default: the packaged
``conf/base.yaml``, ``conf/benchmark/ml1_reach.yaml`` and ``conf/model/htrmrl.yaml``, in that order,
with the command-line options on top. ``--config`` files are merged left to right. Env dimensions and the trial structure are linked
from the data module into the model, never repeated in YAML.
"""

from __future__ import annotations

import sys
from importlib import resources

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_htrmrl.data import MetaRLDataModule
from lightning_htrmrl.envs.base import ConfigError
from lightning_htrmrl.module import MetaPPO

DEFAULT_CONFIGS = ("base.yaml", "benchmark/ml1_reach.yaml", "model/htrmrl.yaml")
LINKED_KEYS = ("obs_dim", "action_dim", "episode_length", "episodes_per_trial")
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def default_config_files() -> list[str]:
    """Paths of the packaged default config files, in merge order."""
    root = resources.files("lightning_htrmrl.conf")
    return [str(root.joinpath(name)) for name in DEFAULT_CONFIGS]


class HTrMRLCLI(LightningCLI):
    """LightningCLI with the data -> model links of this project."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key in LINKED_KEYS:
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")


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
    args = with_default_configs(list(sys.argv[1:] if args is None else args))
    sub_kwargs = {"parser_mode": "omegaconf"}
    try:
        HTrMRLCLI(
            MetaPPO,
            MetaRLDataModule,
            parser_kwargs={"parser_mode": "omegaconf", **{name: dict(sub_kwargs) for name in SUBCOMMANDS}},
            save_config_kwargs={"overwrite": False},
            auto_configure_optimizers=False,
            args=args,
        )
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
