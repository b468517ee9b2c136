"""Wall time of Meta-World's own evaluator (``--meta_test.protocol metaworld``) on a trained-size policy.

Runs :func:`lightning_htrmrl.metaworld_protocol.play_rounds` (the rounds of ``evaluate``) at
Meta-World's default settings (10 rounds of 10 adaptation + 3 evaluation episodes of at most 500
steps) with the shipped HTrMRL model (``conf/model/htrmrl.yaml``) on ML1 reach-v3
(``conf/benchmark/ml1_reach.yaml``) or ML10 (``conf/benchmark/ml10.yaml``), with random weights, or
a checkpoint (``--ckpt``: its own benchmark and encoder, from the config stored in it).

Random weights rarely succeed, so evaluation episodes mostly run their full 500 steps: the wall
time is close to the worst case of a trained policy (successes end episodes early).
``s_per_agent_step`` is the wall time over the agent's steps of all rounds (one step acts for all
sub-envs), worker start-up included; ``worker_s_per_agent_step`` is that times the number of
workers. The last output line is one JSON object. Usage:
``python benchmarks/metaworld_evaluator.py [--benchmark ML10] [--num-evals 2] [--workers 2] [--ckpt PATH]``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

CONF = Path(__file__).resolve().parents[1] / "conf"
BENCHMARK_CONFIGS = {"ML1": "benchmark/ml1_reach.yaml", "ML10": "benchmark/ml10.yaml"}


def _encoder(entry: dict) -> functools.partial:
    """``model.encoder`` (``class_path`` + ``init_args``) as the factory MetaPPO takes."""
    module_name, class_name = entry["class_path"].rsplit(".", 1)
    return functools.partial(getattr(importlib.import_module(module_name), class_name), **entry.get("init_args", {}))


def build(benchmark_name: str, ckpt: str | None):
    """``(benchmark, module)``: the shipped configs with random weights, or a checkpoint and its own config."""
    from lightning_htrmrl.envs import MetaWorld
    from lightning_htrmrl.module import MetaPPO
    from lightning_htrmrl.runs import check_checkpoint

    if ckpt is None:
        data = yaml.safe_load((CONF / BENCHMARK_CONFIGS[benchmark_name]).read_text())["data"]
        model = yaml.safe_load((CONF / "model/htrmrl.yaml").read_text())["model"]
    else:
        stored = check_checkpoint(ckpt).get("config")
        if not stored:
            raise SystemExit(f"--ckpt: {ckpt} holds no config (it was not written by the htrmrl CLI)")
        config = yaml.safe_load(stored)
        data, model = config["data"], config["model"]
    benchmark = MetaWorld(**data["benchmark"]["init_args"])
    encoder = _encoder(model["encoder"])
    if ckpt is not None:
        return benchmark, MetaPPO.load_from_checkpoint(ckpt, map_location="cpu", encoder=encoder)
    torch.manual_seed(0)
    module = MetaPPO(
        benchmark.obs_dim,
        benchmark.action_dim,
        benchmark.episode_length,
        benchmark.episodes_per_trial,
        encoder=encoder,
        past_windows=model.get("past_windows", "uniform"),
    )
    return benchmark, module.eval()


def main() -> None:
    from lightning_htrmrl.metaworld_protocol import MetaWorldProtocol, play_rounds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", default="ML1", choices=sorted(BENCHMARK_CONFIGS), help="without --ckpt")
    parser.add_argument("--ckpt", default=None, help="a lightning_htrmrl checkpoint (default: random weights)")
    parser.add_argument("--num-evals", type=int, default=10, help="rounds (Meta-World's default: 10)")
    parser.add_argument("--adaptation-episodes", type=int, default=10)
    parser.add_argument("--evaluation-episodes", type=int, default=3)
    parser.add_argument("--max-episode-steps", type=int, default=500)
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    parser.add_argument("--deterministic", action="store_true", help="act with the mean (default: sample)")
    parser.add_argument("--seed", type=int, default=12345, help="meta_test.seed")
    args = parser.parse_args()

    torch.set_num_threads(1)
    benchmark, module = build(args.benchmark, args.ckpt)
    protocol = MetaWorldProtocol(
        num_evals=args.num_evals,
        adaptation_episodes=args.adaptation_episodes,
        evaluation_episodes=args.evaluation_episodes,
        max_episode_steps=args.max_episode_steps,
        num_workers=args.workers,
    )
    start = time.perf_counter()
    played = play_rounds(module, benchmark, protocol, args.deterministic, args.seed)
    wall = time.perf_counter() - start
    steps = sum(result.agent_steps for result in played)
    workers = protocol.workers()
    task = " ".join(part for part in (benchmark.benchmark, benchmark.task_name) if part)
    result = {
        "benchmark": "metaworld_evaluator",
        "task": task,
        "checkpoint": args.ckpt,
        "wall_s": round(wall, 1),
        "wall_min": round(wall / 60, 2),
        "agent_steps": steps,
        "s_per_agent_step": round(wall / steps, 5),
        "worker_s_per_agent_step": round(wall * workers / steps, 5),
        "success": round(sum(r.success for r in played) / len(played), 4),
        "success_per_round": [r.success for r in played],
        "settings": {
            **asdict(protocol),
            "num_workers": workers,
            "meta_batch_size": protocol.sub_envs(len(benchmark.classes("test"))),
            "deterministic": args.deterministic,
            "seed": args.seed,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
