"""Every numeric key ``htrmrl fit --print_config`` shows, at 0 and at -1.

A value the run cannot use ends with exit code 2 and one ``error:`` line naming the key, before
anything heavy is built; a value it can use (``ACCEPTED``) is taken. The keys are read from the
printed config of one experiment per class that holds them (both benchmarks, the three encoders,
``meta_test.metaworld``), so a key added to any config group is swept without editing this file.
Everything runs in this process: ``cli.main`` parses and instantiates, ``Trainer.fit`` is a no-op.
"""

from __future__ import annotations

import contextlib
import io
import sys
import traceback
from pathlib import Path

import yaml
from lightning.pytorch import Trainer

from lightning_htrmrl.cli import main

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# One experiment per class that owns numeric keys; keys already swept in an earlier one are skipped.
EXPERIMENTS = {
    "ml1_reach+htrmrl+metaworld_protocol": [
        "conf/benchmark/ml1_reach.yaml",
        "conf/model/htrmrl.yaml",
        "--meta_test.protocol", "metaworld",
        "--meta_test.metaworld", "{}",
    ],
    "point_robot+trmrl": ["conf/benchmark/point_robot.yaml", "conf/model/trmrl.yaml"],
    "ml10+mlp": ["conf/benchmark/ml10.yaml", "conf/model/mlp.yaml"],
}  # fmt: skip

# Keys (list entries as key[i]) where 0 or -1 is a setting the run can use, with what it means.
ACCEPTED = {
    "seed_everything": {0},  # a seed
    "trainer.max_epochs": {-1},  # no epoch limit
    "trainer.max_steps": {-1},  # no step limit
    "trainer.num_sanity_val_steps": {-1},  # all (there is no validation loop in fit)
    "trainer.overfit_batches": {0},  # off
    "trainer.reload_dataloaders_every_n_epochs": {0},  # never
    "model.gamma": {0},  # myopic discount
    "model.gae_lambda": {0},  # one-step TD advantages
    "model.entropy_coeff": {0},  # no entropy bonus
    "model.encoder.init_args.state_embedding_dim": {0},  # no phi2(s_t) branch (TrMRL, an ablation)
    "model.optimizer.init_args.betas[0]": {0},  # torch's Adam: 0 <= beta < 1
    "model.optimizer.init_args.eps": {0},  # torch's Adam allows eps >= 0
    "model.optimizer.init_args.weight_decay": {0},  # none
    "model.lr_scheduler.init_args.end_factor": {0},  # anneal to zero
    "data.benchmark.init_args.seed": {0},
    "data.benchmark.init_args.hidden_observation_dims[0]": {0},  # an observation index
    "data.seed": {0},
    "meta_test.seed": {0},
    # callbacks and loggers by class: CLASS.ARG
    "TaskEmbeddingTSNE.seed": {0},
    "ModelCheckpoint.save_top_k": {0, -1},  # none, every one
    "ModelCheckpoint.every_n_epochs": {0},  # only at the end of training
    "ModelCheckpoint.every_n_train_steps": {0},  # off
}


def accepted(key: str, owner: str) -> set:
    """The values ``ACCEPTED`` lists for ``key`` (a callback's or logger's by its class name)."""
    if key.startswith(("trainer.callbacks[", "trainer.logger[")):
        key = f"{owner.rsplit('.', 1)[-1]}.{key.rsplit('.', 1)[-1]}"
    return ACCEPTED.get(key, set())


def numeric_leaves(node, prefix: str = "", owner: str = "") -> dict[str, tuple[str, float]]:
    """``{dotted key: (owning class_path, value)}`` for every int / float leaf of a printed config;
    of a list of numbers only the first entry (the entries share one check)."""
    leaves = {}
    if isinstance(node, dict):
        owner = node.get("class_path", owner)
        for name, value in node.items():
            leaves |= numeric_leaves(value, f"{prefix}.{name}" if prefix else name, owner)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            if index and isinstance(value, (int, float)):
                break
            leaves |= numeric_leaves(value, f"{prefix}[{index}]", owner)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        leaves[prefix] = (owner, node)
    return leaves


def run_main(args: list[str]) -> tuple[int, str, str]:
    """``htrmrl ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except Exception:  # noqa: BLE001 (a traceback is what this test reports)
            code = -1
            err.write(f"Traceback: {traceback.format_exc(limit=-3)}")
    return code, out.getvalue(), err.getvalue()


def set_value(config: dict, key: str, value: float) -> dict:
    """A copy of ``config`` with the leaf at dotted ``key`` (``a.b[1].c``) set to ``value``."""
    config = yaml.safe_load(yaml.safe_dump(config))
    parts = [int(p) if p.isdigit() else p for p in key.replace("[", ".").replace("]", "").split(".")]
    node = config
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value
    return config


def printed_config(files_and_options: list[str], tmp_path: Path) -> dict:
    args = ["fit", "--config", str(CONF / "base.yaml")]
    for item in files_and_options:
        args += ["--config", str(REPO / item)] if item.endswith(".yaml") else [item]
    code, out, err = run_main([*args, "--print_config"])
    assert code == 0, err
    return yaml.safe_load(out)


def test_every_numeric_key_at_zero_and_minus_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["htrmrl"])  # main(args) is the whole command line
    monkeypatch.setattr(Trainer, "fit", lambda *args, **kwargs: None)
    swept, failures = set(), []
    for name, files_and_options in EXPERIMENTS.items():
        config = printed_config(files_and_options, tmp_path)
        for key, (owner, default) in numeric_leaves(config).items():
            if (key, owner) in swept:
                continue
            swept.add((key, owner))
            for value in (0, -1):
                if value == default:
                    continue
                path = tmp_path / "config.yaml"
                path.write_text(yaml.safe_dump(set_value(config, key, value)))
                code, _, err = run_main(["fit", "--config", str(path)])
                errors = [line for line in err.splitlines() if line.startswith("error:")]
                bare = key.split("[")[0].rsplit(".", 1)[-1]
                if value in accepted(key, owner):
                    if code != 0:
                        failures.append(f"{name}: {key}={value} is valid but exited {code}: {err.strip()[-300:]}")
                elif code != 2 or len(errors) != 1 or bare not in errors[0] or "Traceback" in err:
                    failures.append(f"{name}: {key}={value} exited {code}: {err.strip()[-300:]}")
    assert len(swept) > 60, sorted(swept)
    assert not failures, "\n".join(failures)
