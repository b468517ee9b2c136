"""Frames per second on a Meta-World ML1 task: raw simulator vs collection vs end-to-end training.

All figures are measured in one run on the same cores:

* ``raw_sim_fps``: raw ``metaworld`` envs with random actions, one process per collector process
  (at most one per core) with as many envs as a collector process has slots, episodes of the same
  length including the resets between them; ``raw_step_only_fps`` is the ``env.step`` rate alone.
  Both are the mean of a measurement before and one after the others (``raw_sim_fps_before_after``);
* ``collect_fps``: the TorchRL Collector with the HTrMRL policy (episodic memory + encoder),
  ``num_collectors`` processes of ``num_envs`` slots each, no training;
* ``train_fps`` / ``mlp_train_fps``: Lightning ``fit`` (collection + PPO updates) with the HTrMRL
  encoder and with the memory-less MLP baseline, steady state (first iteration excluded);
  ``update_ms_per_frame`` / ``mlp_update_ms_per_frame``: the part of that wall time spent in the
  training steps (GAE + PPO epochs), per frame, next to ``raw_sim_ms_per_frame``.

The policy and the PPO update run on the GPU when one is present (``--accelerator cpu`` to force
the CPU); Meta-World always simulates on the CPU. The task is ML1 reach-v3 unless ``--task``. The
last output line is one JSON object. Usage:
``python benchmarks/throughput.py [--task push-v3] [--iterations 4] [--num-envs 16] [--accelerator cpu]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time

import numpy as np
import torch


def _raw_steps(task: str, num_envs: int, episode_length: int, steps: int, queue: mp.Queue) -> None:
    """Step ``num_envs`` raw envs with random actions, resetting each every ``episode_length`` steps."""
    import metaworld

    torch.set_num_threads(1)
    benchmark = metaworld.ML1(task, seed=0)
    envs = [benchmark.train_classes[task]() for _ in range(num_envs)]
    for i, env in enumerate(envs):
        env.set_task(benchmark.train_tasks[i % len(benchmark.train_tasks)])
        env.reset()
    actions = np.random.default_rng(0).uniform(-1, 1, size=(steps, num_envs, 4)).astype(np.float32)
    step_time = reset_time = 0.0
    for i in range(steps):
        start = time.perf_counter()
        for env, action in zip(envs, actions[i], strict=True):
            env.step(action)
        stepped = time.perf_counter()
        if (i + 1) % episode_length == 0:
            for env in envs:
                env.reset()
        step_time += stepped - start
        reset_time += time.perf_counter() - stepped
    frames = steps * num_envs
    queue.put((frames / (step_time + reset_time), frames / step_time))


def raw_sim_fps(task: str, processes: int, num_envs: int, episode_length: int, steps: int) -> tuple[float, float]:
    """Summed raw Meta-World rates of ``processes`` independent processes of ``num_envs`` envs each.

    Returns ``(with_resets, steps_only)``: frames/s of episodes of ``episode_length`` steps
    including the env resets between them (what any collector of those episodes must pay: a
    Meta-World reset runs about 50 physics steps), and the ``env.step`` rate alone.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    workers = [
        ctx.Process(target=_raw_steps, args=(task, num_envs, episode_length, steps, queue)) for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    rates = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    return float(sum(rate[0] for rate in rates)), float(sum(rate[1] for rate in rates))


SHIPPED_BENCHMARKS = {"reach-v3": "ml1_reach", "push-v3": "ml1_push", "pick-place-v3": "ml1_pick_place"}


def shipped(args: argparse.Namespace, model: str = "htrmrl"):
    """The shipped ML1 config of ``args.task`` (its ``conf/benchmark`` file, else reach's with the
    task swapped) and ``conf/model/<model>.yaml``, built by the CLI: ``(MetaPPO, MetaRLDataModule)``.

    Only the collector layout and the epoch length are overridden (``--num-envs``,
    ``--num-collectors``, ``--iterations``); the model (minibatches, discount, windows) is as shipped.
    """
    from importlib import resources

    from lightning_htrmrl.cli import HTrMRLCLI
    from lightning_htrmrl.data import MetaRLDataModule
    from lightning_htrmrl.module import MetaPPO

    conf = resources.files("lightning_htrmrl.conf")
    benchmark = SHIPPED_BENCHMARKS.get(args.task, "ml1_reach")
    files = [conf / "base.yaml", conf / f"benchmark/{benchmark}.yaml", conf / f"model/{model}.yaml"]
    overrides = [
        f"--data.benchmark.init_args.task_name={args.task}",
        f"--data.num_envs={args.num_envs}",
        f"--data.num_collectors={args.num_collectors}",
        f"--data.iterations_per_epoch={args.iterations + 1}",
        "--trainer.logger=false",
    ]
    cli = HTrMRLCLI(
        MetaPPO,
        MetaRLDataModule,
        run=False,
        args=[item for path in files for item in ("--config", str(path))] + overrides,
        save_config_callback=None,
        auto_configure_optimizers=False,
    )
    return cli.model, cli.datamodule


def collect_fps(args: argparse.Namespace) -> float:
    """Collector frames/s with the HTrMRL policy (no training)."""
    from lightning_htrmrl.data import shutdown_collector

    module, data = shipped(args)
    module = module.to("cuda" if args.accelerator == "gpu" else "cpu")
    collector = data.build_collector(module.make_policy(), module.device)
    batches = iter(collector)
    next(batches)  # start-up and first batch excluded
    start = time.perf_counter()
    frames = 0
    for _ in range(args.iterations):
        frames += next(batches).numel()
    elapsed = time.perf_counter() - start
    shutdown_collector(collector)
    return frames / elapsed


def train_fps(args: argparse.Namespace, encoder: str) -> tuple[float, float]:
    """End-to-end Lightning fit, first iteration excluded.

    Returns ``(frames/s, update ms per frame)``: the second figure is the time inside the training
    steps (GAE + PPO epochs) per collected frame; the rest of the wall time is collection.
    """
    from lightning.pytorch import Callback, Trainer

    class Clock(Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.frames: list[int] = []
            self.update_s: list[float] = []  # the training steps, as FrameRate's time/update_s
            self._start = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.ends.append(time.perf_counter())
            self.frames.append(int(pl_module.frames))
            self.update_s.append(self.ends[-1] - self._start)

    module, data = shipped(args, encoder)
    clock = Clock()
    trainer = Trainer(
        max_epochs=1,
        accelerator=args.accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(module, data)
    frames = clock.frames[-1] - clock.frames[0]
    return frames / (clock.ends[-1] - clock.ends[0]), 1000 * sum(clock.update_s[1:]) / frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="reach-v3", help="Meta-World ML1 task")
    parser.add_argument("--iterations", type=int, default=3, help="measured batches per figure")
    parser.add_argument("--num-envs", type=int, default=16, help="env slots per collector process (shipped: 16)")
    parser.add_argument("--num-collectors", type=int, default=2, help="collector processes (shipped: 2)")
    parser.add_argument("--raw-steps", type=int, default=1_000, help="raw steps of each env")
    parser.add_argument("--accelerator", default="gpu" if torch.cuda.is_available() else "cpu", choices=("cpu", "gpu"))
    args = parser.parse_args()
    try:  # a task Meta-World's ML1 lacks fails here, in one line, before any measurement
        from lightning_htrmrl.envs import MetaWorld

        MetaWorld("ML1", args.task).task_names("train")
    except ValueError as error:
        parser.error(f"--task: {error}")
    args.episode_length = 200  # every shipped ML1 config

    cores = len(os.sched_getaffinity(0))

    def measure_raw() -> tuple[float, float]:
        rates = raw_sim_fps(
            args.task, min(cores, args.num_collectors), args.num_envs, args.episode_length, args.raw_steps
        )
        print(f"raw_sim_fps {rates[0]:.0f} (env.step alone {rates[1]:.0f})", flush=True)
        return rates

    # The raw rate is measured before and after the other figures and averaged: the speed of a
    # shared machine drifts during a run, and every ratio divides by this number.
    raw_before = measure_raw()
    collect = collect_fps(args)
    print(f"collect_fps {collect:.0f}", flush=True)
    train, update_ms = train_fps(args, "htrmrl")
    print(f"train_fps {train:.0f} (update {update_ms:.3f} ms/frame)", flush=True)
    mlp, mlp_update_ms = train_fps(args, "mlp")
    print(f"mlp_train_fps {mlp:.0f} (update {mlp_update_ms:.3f} ms/frame)", flush=True)
    raw_after = measure_raw()
    raw, raw_steps_only = ((before + after) / 2 for before, after in zip(raw_before, raw_after, strict=True))
    result = {
        "benchmark": "throughput",
        "task": f"ML1 {args.task}",
        "raw_sim_fps": round(raw, 1),
        "raw_sim_fps_before_after": [round(raw_before[0], 1), round(raw_after[0], 1)],
        "raw_step_only_fps": round(raw_steps_only, 1),
        "collect_fps": round(collect, 1),
        "train_fps": round(train, 1),
        "mlp_train_fps": round(mlp, 1),
        "collect_ratio": round(collect / raw, 3),
        "collect_ratio_vs_step_only": round(collect / raw_steps_only, 3),
        "train_ratio": round(train / raw, 3),
        "mlp_train_ratio": round(mlp / raw, 3),
        "htrmrl_vs_mlp_time_per_frame": round(mlp / train, 3),
        # Where a training frame's wall time goes, in ms: the simulator alone, then the PPO update.
        "raw_sim_ms_per_frame": round(1000 / raw, 4),
        "update_ms_per_frame": round(update_ms, 4),
        "mlp_update_ms_per_frame": round(mlp_update_ms, 4),
        "update_vs_raw_sim_time": round(update_ms * raw / 1000, 3),
        "settings": vars(args),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cores": cores,
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args.accelerator == "gpu" else "cpu",
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
