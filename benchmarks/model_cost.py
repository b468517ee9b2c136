"""Hierarchical (HTrMRL) vs flat transformer over the same N x T context tokens.

Same width, heads and total depth (hierarchical: T1 2 layers + T2 1 layer; flat: 3 layers). For
N in {1, 5, 10} and T in {10, 25, 50} it measures, each configuration in its own process:

* ``params``: trainable parameters of the encoder;
* ``train_s``: forward + backward of the training path for a minibatch of episodes;
* ``peak_mb``: peak memory added by that forward + backward (resident memory on CPU, allocated
  memory on a GPU);
* ``infer_ms``: per-step inference for a batch of envs during collection (cached past encodings
  for the hierarchical encoder; the flat one must re-encode all N x T tokens every step).

It runs on the GPU when one is present (``--accelerator cpu`` to force the CPU). The last output line
is one JSON object with the ratios. Usage:
``python benchmarks/model_cost.py [--episodes 2 --episode-length 100 --envs 8] [--accelerator cpu]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import time

import torch

D_MODEL, HEADS, FF = 64, 4, 128
OBS, ACT = 39, 4


def _encoder(kind: str, n: int, t: int):
    from lightning_htrmrl.models import FlatTransformerEncoder, HierarchicalEncoder

    shared = dict(num_episodes=n, window=t, d_model=D_MODEL, num_heads=HEADS, ff_dim=FF, state_embedding_dim=64)
    if kind == "hierarchical":
        return HierarchicalEncoder(OBS, ACT, intra_layers=2, inter_layers=1, **shared)
    return FlatTransformerEncoder(OBS, ACT, num_layers=3, causal=True, **shared)


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated on a GPU, resident (``ru_maxrss``, which only grows) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(kind: str, n: int, t: int, args: dict, queue: mp.Queue) -> None:
    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    device = torch.device("cuda" if args["accelerator"] == "gpu" else "cpu")
    encoder = _encoder(kind, n, t).to(device)
    token_dim = encoder.token_dim
    e, length, envs = args["episodes"], max(args["episode_length"], t), args["envs"]
    tokens = torch.randn(e, length, token_dim, device=device)
    observation = tokens[..., :OBS]
    past = torch.randn(e, n - 1, t, token_dim, device=device)
    valid = torch.ones(e, n - 1, dtype=torch.bool, device=device)

    def train_step() -> None:
        encoder.zero_grad(set_to_none=True)
        encoder(tokens, observation, past, valid).square().mean().backward()

    base = _peak_memory_mb(device)  # before the first step
    train_step()  # warm-up
    peak = _peak_memory_mb(device) - base
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(args["repeats"]):
        train_step()
    _synchronize(device)
    train_s = (time.perf_counter() - start) / args["repeats"]

    with torch.no_grad():
        past_windows = torch.randn(envs, n - 1, t, token_dim, device=device)
        cache = encoder.begin_episode(past_windows, torch.ones(envs, n - 1, dtype=torch.bool, device=device))
        window = torch.randn(envs, t, token_dim, device=device)
        lengths = torch.full((envs,), t, device=device)
        obs = torch.randn(envs, OBS, device=device)
        for _ in range(5):
            encoder.step(cache, window, lengths, obs)
        steps = args["infer_steps"]
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            encoder.step(cache, window, lengths, obs)
        _synchronize(device)
        infer_ms = (time.perf_counter() - start) / steps * 1e3
    params = sum(p.numel() for p in encoder.parameters())
    queue.put({"params": params, "train_s": train_s, "peak_mb": peak, "infer_ms": infer_ms})


def measure(kind: str, n: int, t: int, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_measure, args=(kind, n, t, args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=2, help="episodes per training minibatch")
    parser.add_argument("--episode-length", type=int, default=100)
    parser.add_argument("--envs", type=int, default=8, help="envs per inference step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--infer-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    parser.add_argument("--accelerator", default="gpu" if torch.cuda.is_available() else "cpu", choices=("cpu", "gpu"))
    args = vars(parser.parse_args())

    table: dict[str, dict] = {}
    for n in (1, 5, 10):
        for t in (10, 25, 50):
            row = {kind: measure(kind, n, t, args) for kind in ("hierarchical", "flat")}
            h, f = row["hierarchical"], row["flat"]
            row["train_speedup"] = f["train_s"] / h["train_s"]
            row["memory_ratio"] = h["peak_mb"] / max(f["peak_mb"], 1e-9)
            table[f"N{n}_T{t}"] = row
            print(
                f"N={n:2d} T={t:2d}  hier {h['train_s'] * 1e3:8.1f} ms {h['peak_mb']:7.1f} MB"
                f" {h['infer_ms']:6.2f} ms/step"
                f" | flat {f['train_s'] * 1e3:8.1f} ms {f['peak_mb']:7.1f} MB {f['infer_ms']:6.2f} ms/step"
                f" | speedup {row['train_speedup']:.2f}x",
                flush=True,
            )
    h10 = table["N10_T50"]["hierarchical"]["infer_ms"]
    h1 = table["N1_T50"]["hierarchical"]["infer_ms"]
    result = {
        "benchmark": "model_cost",
        "train_speedup_N10_T50": round(table["N10_T50"]["train_speedup"], 3),
        "memory_ratio_N10_T50": round(table["N10_T50"]["memory_ratio"], 3),
        "infer_cost_N10_vs_N1": round(h10 / h1, 3),
        "params_hierarchical": table["N10_T50"]["hierarchical"]["params"],
        "params_flat": table["N10_T50"]["flat"]["params"],
        "table": {
            key: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if not isinstance(v, dict)}
            | {kind: {k: round(v, 4) for k, v in row[kind].items()} for kind in ("hierarchical", "flat")}
            for key, row in table.items()
        },
        "settings": args,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "threads": args["threads"],
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args["accelerator"] == "gpu" else "cpu",
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
