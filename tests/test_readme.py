"""Every ``htrmrl`` command in the README's code blocks parses as written (``--print_config``), so
the README cannot fall behind the CLI. The DDP and torchrun commands also train at tiny sizes
(``tests/test_ddp.py``)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
import yaml

from lightning_htrmrl.cli import main
from tests.test_cli import REPO


def readme_commands(program: str) -> list[list[str]]:
    """The README's commands that start with ``program`` (continuation lines joined, comments dropped)."""
    text = (REPO / "README.md").read_text()
    blocks = [block.split("```", 1)[0] for block in text.split("```bash\n")[1:]]
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command, comments=True)
            if words and words[0] == program:
                commands.append(words)
    return commands


def _as_run_here(words: list[str]) -> list[str]:
    """The arguments of a README command, with the repository's ``conf/`` files and ``...`` dropped."""
    return [str(REPO / word) if word.startswith("conf/") else word for word in words[1:] if word != "..."]


def test_the_readme_shows_the_commands_a_user_needs() -> None:
    subcommands = {words[1] for words in readme_commands("htrmrl")}
    assert {"fit", "validate", "test"} <= subcommands
    assert len(readme_commands("htrmrl")) >= 15


@pytest.mark.parametrize("words", readme_commands("htrmrl"), ids=lambda words: " ".join(words[1:4]))
def test_every_readme_command_parses(words: list[str], tmp_path: Path, monkeypatch, capsys) -> None:
    # A saved run where a command names one (runs/htrmrl/version_3/): its config.yaml is a real one.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["htrmrl"])  # LightningCLI warns when args and sys.argv both carry options
    for saved in {word for word in words if word.startswith("runs/") and word.endswith("config.yaml")}:
        with pytest.raises(SystemExit):
            main(["fit", "--print_config"])
        Path(saved).parent.mkdir(parents=True, exist_ok=True)
        Path(saved).write_text(capsys.readouterr().out)
    args = _as_run_here(words)
    if "--help" not in args and "--print_config" not in args:
        args.append("--print_config")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    output = capsys.readouterr()
    assert exit_info.value.code in (0, None), output.err[-2000:]
    if "--help" not in args:
        config = yaml.safe_load(output.out)
        assert config["data"]["benchmark"]["class_path"].startswith("lightning_htrmrl.envs.")
