"""How close an untrained policy's hand comes to the goal on ML1 reach-v3: which sparse rewards it can find.

An untrained actor samples ``tanh(N(mu, 1))`` with ``mu`` near 0 (``init_std`` 1), so its hand
wanders. For ``--episodes`` training goals this plays one episode of ``--steps`` steps with
``tanh(N(0, 1))`` actions and records the hand's closest distance to the goal (Meta-World's
``obj_to_target``). The fraction of episodes that come within 0.05 m (Meta-World's success, so the
``success`` reward) or within a radius (what ``near_goal`` with that ``reward_radius`` pays) is how
often PPO's first batches see any reward at all. One JSON line::

    python benchmarks/reach_exploration.py --episodes 100
"""

from __future__ import annotations

import argparse
import json
import platform

import numpy as np
import torch

from lightning_htrmrl.envs.metaworld import get_benchmark

RADII = (0.05, 0.1, 0.15, 0.2)


def closest_distances(episodes: int, steps: int, seed: int) -> np.ndarray:
    """Closest hand-to-goal distance (m) of each episode, shape ``[episodes]``."""
    benchmark = get_benchmark("ML1", "reach-v3", seed=0)
    env = benchmark.train_classes["reach-v3"](render_mode=None)
    env.seed(seed)
    rng = np.random.default_rng(seed)
    closest = np.empty(episodes)
    for episode in range(episodes):
        env.set_task(benchmark.train_tasks[episode % len(benchmark.train_tasks)])
        env.reset()
        distance = np.inf
        for _ in range(steps):
            _, _, _, _, info = env.step(np.tanh(rng.standard_normal(4)).astype(np.float32))
            distance = min(distance, info["obj_to_target"])
        closest[episode] = distance
    env.close()
    return closest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=200, help="steps per episode (conf/benchmark/ml1_reach.yaml: 200)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    closest = closest_distances(args.episodes, args.steps, args.seed)
    report = {
        "benchmark": "ML1 reach-v3, train goals, tanh(N(0, 1)) actions",
        "episodes": args.episodes,
        "steps": args.steps,
        "closest_distance_mean_m": round(float(closest.mean()), 3),
        "fraction_within_m": {f"{radius:g}": round(float((closest <= radius).mean()), 3) for radius in RADII},
        "machine": {"processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()},
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
