"""The wheel ships ``lightning_htrmrl.callbacks`` and the config files, and no bare top-level ``callbacks``."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build a wheel of the working tree (copied first, so no build/ or egg-info lands in the repo)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "runs", "lightning_logs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"
        ),
    )
    dist = root / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check", "--outdir", str(dist),
         str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    wheels = list(dist.glob("lightning_htrmrl-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contents(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_htrmrl/callbacks/__init__.py" in names
    assert "lightning_htrmrl/callbacks/meta_evaluation.py" in names
    assert "lightning_htrmrl/callbacks/tsne.py" in names
    assert "lightning_htrmrl/__main__.py" in names
    # every config fragment of the repo is shipped under lightning_htrmrl/conf
    repo_yaml = sorted(str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml"))
    assert "base.yaml" in repo_yaml and "benchmark/point_robot.yaml" in repo_yaml
    for name in repo_yaml:
        assert f"lightning_htrmrl/conf/{name}" in names, f"conf/{name} missing from the wheel"
    # no bare top-level package other than lightning_htrmrl
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"lightning_htrmrl"}, top_level
    assert not any(name.startswith("callbacks/") for name in names)
    info = next(name for name in names if name.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(info).decode().split() == ["lightning_htrmrl"]
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "htrmrl = lightning_htrmrl.cli:main" in entry_points


def test_installed_wheel_imports_callbacks(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "target"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (target / "lightning_htrmrl" / "callbacks" / "meta_evaluation.py").is_file()
    assert not (target / "callbacks").exists()
    # `python -S` skips .pth files, so the repo's editable-install finder cannot shadow the installed copy;
    # dependencies still come from the venv's site-packages, after the target.
    site_packages = [p for p in site.getsitepackages() if Path(p).is_dir()]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), *site_packages]), PYTHONWARNINGS="ignore")
    code = (
        "import importlib.util, os, sys\n"
        "import lightning_htrmrl, lightning_htrmrl.callbacks as cb\n"
        "from lightning_htrmrl.callbacks import MetaTestEvaluation\n"
        "from lightning_htrmrl.config_files import default_config_files\n"
        f"target = {str(target)!r}\n"
        "assert lightning_htrmrl.__file__.startswith(target), lightning_htrmrl.__file__\n"
        "assert cb.__file__.startswith(target), cb.__file__\n"
        "assert all(os.path.isfile(p) and p.startswith(target) for p in default_config_files())\n"
        "assert importlib.util.find_spec('callbacks') is None, 'a bare top-level callbacks module is importable'\n"
        "print('OK', MetaTestEvaluation.__module__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "OK lightning_htrmrl.callbacks.meta_evaluation" in result.stdout
