"""End-to-end training frames/s with 1 and 2 DDP processes (CPU gloo here; GPUs with NCCL).

Each figure is a real ``htrmrl fit`` run in its own process group on the same benchmark config;
the frame rate is the steady-state ``time/fps`` the module logs (frames of all processes per
second, first batch excluded). The global meta-batch is the same in both runs (``data.num_envs``
counts slots over all processes). The last output line is one JSON object with the ratio.

Usage: ``python benchmarks/ddp_scaling.py [--benchmark point_robot] [--accelerator cpu|gpu] [--epochs 2]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CONF = Path(__file__).resolve().parents[1] / "conf"
DDP_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fit_fps(args: argparse.Namespace, devices: int) -> float:
    """Median steady-state frames/s of one fit with ``devices`` processes."""
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable, "-m", "lightning_htrmrl", "fit",
            "--config", str(CONF / "base.yaml"),
            "--config", str(CONF / "benchmark" / f"{args.benchmark}.yaml"),
            "--config", str(CONF / "model" / "htrmrl.yaml"),
            "--trainer.max_epochs", str(args.epochs),
            "--trainer.accelerator", args.accelerator,
            "--trainer.enable_progress_bar", "false",
            "--meta_test.every_n_epochs", "1000",
        ]  # fmt: skip
        if devices > 1:
            command += ["--config", str(CONF / "trainer" / "ddp.yaml"), "--trainer.devices", str(devices)]
        env = {key: value for key, value in os.environ.items() if key not in DDP_VARS}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONWARNINGS="ignore")
        subprocess.run(command, cwd=folder, env=env, check=True, capture_output=True)
        (metrics,) = Path(folder).glob("runs/htrmrl/version_*/metrics.csv")
        rates = [float(row["time/fps"]) for row in csv.DictReader(metrics.open()) if row.get("time/fps")]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", default="point_robot", help="a conf/benchmark/*.yaml name")
    # Two GPUs when present (NCCL, one per process), else CPU processes (gloo).
    default_accelerator = "gpu" if torch.cuda.device_count() >= 2 else "cpu"
    parser.add_argument("--accelerator", default=default_accelerator, choices=("cpu", "gpu"))
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    one = fit_fps(args, 1)
    print(f"1 process: {one:.0f} frames/s", flush=True)
    two = fit_fps(args, 2)
    print(f"2 processes: {two:.0f} frames/s", flush=True)
    result = {
        "benchmark": "ddp_scaling",
        "task": args.benchmark,
        "fps_1_process": round(one, 1),
        "fps_2_processes": round(two, 1),
        "speedup_2_vs_1": round(two / one, 3),
        "settings": vars(args),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args.accelerator == "gpu" else "cpu",
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
