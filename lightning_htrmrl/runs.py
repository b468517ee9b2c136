"""Run folders and checkpoints: where a run's files go, and which checkpoint a path names.

A run's files (TensorBoard events, ``metrics.csv``, ``config.yaml``, checkpoints, plots,
``meta_test.json``) share one folder, ``<save_dir>/<name>/version_N`` of its file loggers:
``runs/htrmrl/version_N`` by default, ``<D>/htrmrl/version_N`` with ``trainer.default_root_dir D``.
Every run gets a new ``version_N``: nothing a previous run wrote is reused or overwritten.
``--ckpt_path last`` / ``best`` pick the newest checkpoint of the same experiment (benchmark and
encoder, read from each folder's ``config.yaml``), so runs of different experiments can share
``runs/htrmrl`` without one resuming another's weights.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_htrmrl.validation import ConfigError

DEFAULT_ROOT_DIR = "runs"
CHECKPOINT_KEY = "htrmrl"  # the entry of a checkpoint that lightning_htrmrl writes
CHECKPOINT_ALIASES = {"last": "last.ckpt", "best": "best-*.ckpt"}  # resolved here, not by Lightning


def _file_logger_args(loggers: object) -> list:
    """``init_args`` of the configured loggers that write files (those with a ``save_dir``)."""
    if not isinstance(loggers, list):
        return []
    args = [getattr(logger, "init_args", None) for logger in loggers]
    return [a for a in args if a is not None and "save_dir" in a]


def place_run_files(trainer_config) -> None:
    """Move file loggers at the default ``save_dir`` (``runs``) to ``trainer.default_root_dir``, if set.

    ``trainer_config`` is the parsed ``trainer`` namespace, edited in place. A logger given another
    ``save_dir`` keeps it (an explicit choice); without ``default_root_dir``, ``runs`` is the root,
    and ``default_root_dir`` is set to it (Lightning's own default would be the current folder).
    """
    root = trainer_config.get("default_root_dir")
    if root is None:
        trainer_config.default_root_dir = DEFAULT_ROOT_DIR
        return
    for args in _file_logger_args(trainer_config.get("logger")):
        if str(args.save_dir) == DEFAULT_ROOT_DIR:
            args.save_dir = root


def runs_folder(trainer_config) -> Path:
    """``<save_dir>/<name>`` of the first file logger: where this run name's ``version_N`` live."""
    args = _file_logger_args(trainer_config.get("logger"))
    if not args:
        return Path(trainer_config.default_root_dir)
    return Path(args[0].save_dir) / str(args[0].get("name", "lightning_logs"))


def share_run_directory(loggers: object) -> None:
    """Give file loggers that share ``save_dir`` and ``name`` one new ``version_N`` directory.

    TensorBoard and CSV loggers would otherwise each pick their own next version; this keeps the
    events, ``metrics.csv``, ``config.yaml`` and checkpoints of a run in one folder. Existing
    version folders are never reused (a saved ``config.yaml`` names its run's version: running it
    again gets a new one).
    """
    args = _file_logger_args(loggers)
    if not args or len(args) != len(loggers):
        return
    if len({(str(a.save_dir), str(a.get("name", "lightning_logs"))) for a in args}) != 1:
        return
    root = Path(args[0].save_dir) / str(args[0].get("name", "lightning_logs"))
    # The CSV logger finds the folder that the TensorBoard logger has just created and warns that
    # earlier log files in it "will be deleted": the folder is always a new one (below), so none are.
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    versions = {a.get("version") for a in args}
    if len(versions) == 1 and None not in versions and not (root / str(versions.pop())).exists():
        return  # one explicit, unused version (e.g. a re-used config.yaml of a fresh run)
    version = f"version_{max(_version_numbers(root), default=-1) + 1}"
    for a in args:
        a.version = version


def _version_numbers(root: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in root.glob("version_*") if p.name.split("_")[1].isdigit()]


VERSIONED_PACKAGES = (
    "lightning-htrmrl",
    "torch",
    "torchrl",
    "tensordict",
    "lightning",
    "metaworld",
    "mujoco",
    "gymnasium",
)


def library_versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on."""
    versions: dict[str, str | None] = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def experiment_of(config) -> str:
    """What makes two runs the same experiment: the benchmark (class, Meta-World benchmark and
    task) and the encoder class, e.g. ``MetaWorld ML1 reach-v3 / HierarchicalEncoder``.

    ``config`` is a run's config: the parsed namespace of a subcommand or a loaded ``config.yaml``.
    """
    benchmark = config.get("data", {}).get("benchmark") or {}
    args = benchmark.get("init_args") or {}
    names = [str(benchmark.get("class_path", "?")).rsplit(".", 1)[-1]]
    names += [str(args[key]) for key in ("benchmark", "task_name") if args.get(key)]
    encoder = config.get("model", {}).get("encoder") or {}
    return f"{' '.join(names)} / {str(encoder.get('class_path', '?')).rsplit('.', 1)[-1]}"


def _saved_experiment(version_folder: Path) -> str | None:
    try:
        return experiment_of(yaml.safe_load((version_folder / "config.yaml").read_text()))
    except (OSError, yaml.YAMLError, AttributeError):
        return None  # no readable config.yaml: the folder's experiment is unknown


def find_checkpoint(alias: str, runs: Path, experiment: str | None = None) -> Path:
    """The newest ``last.ckpt`` (``alias="last"``) or ``best-*.ckpt`` (``"best"``) of ``runs/version_*``
    whose run was ``experiment`` (see :func:`experiment_of`; None: any).

    Every run gets a new ``version_N``, so Lightning's own ``"last"`` (which looks in the new,
    empty folder) would silently start from scratch; this looks across the run name's folders.
    """
    pattern = CHECKPOINT_ALIASES[alias]
    found = sorted(
        (path for path in runs.glob(f"version_*/checkpoints/{pattern}") if path.is_file()),
        key=lambda path: path.stat().st_mtime_ns,
        reverse=True,
    )
    if not found:
        raise ConfigError(
            f"ckpt_path {alias}: no {pattern} under {runs}/version_*/checkpoints; "
            "drop --ckpt_path to start a new run, or give a checkpoint file"
        )
    for path in found:
        saved = _saved_experiment(path.parent.parent)
        if experiment is None or saved in (experiment, None):
            return path
    raise ConfigError(
        f"ckpt_path {alias}: the {pattern} files under {runs} are from other experiments (newest: {found[0]}, "
        f"{_saved_experiment(found[0].parent.parent)}), not this config's ({experiment}); give a checkpoint file, "
        "or drop --ckpt_path to start a new run"
    )


def check_checkpoint(path: str) -> dict:
    """Fail early, in one line, on a missing, unreadable or foreign checkpoint; returns its
    ``htrmrl`` entry (library versions, the benchmark's facts, the resolved config)."""
    if not Path(path).is_file():
        raise ConfigError(f"ckpt_path: no such file: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # noqa: BLE001 (any failure means the file is unusable)
        reason = str(error).split(". ")[0]
        raise ConfigError(f"ckpt_path: cannot read {path} (truncated or not a PyTorch checkpoint: {reason})") from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise ConfigError(f"ckpt_path: {path} was not written by lightning_htrmrl (no '{CHECKPOINT_KEY}' entry)")
    return checkpoint[CHECKPOINT_KEY]


def run_directory(trainer: Trainer) -> Path:
    """The run directory (the first logger's ``version_N`` folder, else ``default_root_dir``).

    Unlike ``trainer.log_dir`` this is not a collective, so rank-0-only code may call it.
    """
    if trainer.loggers:
        first = trainer.loggers[0]
        path = first.log_dir if isinstance(first, (TensorBoardLogger, CSVLogger)) else first.save_dir
        if path:
            return Path(path)
    return Path(trainer.default_root_dir)
