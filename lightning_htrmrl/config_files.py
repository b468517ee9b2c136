"""The ``--config`` files of a command line: the embedded default, experiment files, and checks.

- A subcommand given without any ``--config`` runs the embedded default: the packaged
  ``conf/base.yaml``, ``conf/benchmark/ml1_reach.yaml`` and ``conf/model/htrmrl.yaml``, in order.
- A config file may start with ``defaults:``, a list of config files (paths relative to it) that
  are merged before it: an experiment file (``conf/experiment/*.yaml``) names its base, benchmark,
  model and trainer files, so ``htrmrl fit --config conf/experiment/paper_ml10.yaml`` stands alone.
- A file that is missing, unreadable or not YAML fails in one line that names it.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import yaml

from lightning_htrmrl.validation import ConfigError

DEFAULT_CONFIGS = ("base.yaml", "benchmark/ml1_reach.yaml", "model/htrmrl.yaml")
SUBCOMMANDS = ("fit", "validate", "test")
CONFIG_FLAGS = ("-c", "--config")


def default_config_files() -> list[str]:
    """Paths of the packaged default config files, in merge order."""
    root = resources.files("lightning_htrmrl.conf")
    return [str(root.joinpath(name)) for name in DEFAULT_CONFIGS]


def config_file_arguments(args: list[str]) -> list[str]:
    """The files given with ``--config``/``-c`` (either ``--config F`` or ``--config=F``), in order."""
    files = []
    for index, arg in enumerate(args):
        if arg in CONFIG_FLAGS and index + 1 < len(args):
            files.append(args[index + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def read_config_file(name: str) -> object:
    """The parsed YAML of a ``--config`` file; one ``ConfigError`` line naming it if that fails."""
    try:
        text = Path(name).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--config {name}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"--config {name}: not valid YAML{where}: {problem}") from None


def with_defaults_of(name: str, including: tuple[str, ...] = ()) -> list[str]:
    """``name`` preceded by the files its ``defaults:`` lists (recursively, relative to it)."""
    content = read_config_file(name)
    bases = content.get("defaults") if isinstance(content, dict) else None
    if bases is None:
        return [name]
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigError(f"--config {name}: defaults must be a list of config files (paths relative to it)")
    here = str(Path(name).resolve())
    files: list[str] = []
    for base in bases:
        path = os.path.normpath(Path(name).parent / base)
        if str(Path(path).resolve()) in (*including, here):
            raise ConfigError(f"--config {name}: defaults include {base}, which includes it again")
        files += with_defaults_of(path, (*including, here))
    return [*files, name]


def expand_config_files(args: list[str]) -> list[str]:
    """The command line with the embedded default inserted (no ``--config`` given) or every
    ``--config F`` preceded by the files F's ``defaults:`` names; every file is checked."""
    if not args or args[0] not in SUBCOMMANDS:
        return args
    if not config_file_arguments(args):
        return [args[0], *(item for path in default_config_files() for item in ("--config", path)), *args[1:]]
    expanded: list[str] = []
    merged_defaults = False
    index = 0
    while index < len(args):
        arg = args[index]
        if arg in CONFIG_FLAGS and index + 1 < len(args):
            name, index = args[index + 1], index + 2
        elif arg.startswith("--config="):
            name, index = arg.split("=", 1)[1], index + 1
        else:
            expanded.append(arg)
            index += 1
            continue
        files = with_defaults_of(name)
        expanded += [item for path in files for item in ("--config", path)]
        merged_defaults = merged_defaults or len(files) > 1
    # The defaults are merged now: the printed and saved config must not name them again.
    return [*expanded, "--defaults=null"] if merged_defaults else expanded
