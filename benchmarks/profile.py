"""What bounds a training step: torch.profiler over a few steps of one benchmark configuration,
the self time of its aten operators grouped into convolutions, BatchNorm, elementwise passes,
copies and the rest, and the share of the wall time no operator accounts for (Python, autograd
and dispatcher overhead).

    python -m benchmarks.profile densenet ours --batch-size 16
    python -m benchmarks.profile delugenet ours --batch-size 64 --steps 3
    python -m benchmarks.profile densenet ours --batch-size 1 --inference     # one image, torch.inference_mode
    python -m benchmarks.profile densenet ours --batch-size 64 --amp bf16     # under bf16 autocast

The compiled CPU kernels (crosslayer/ops/cpu_kernels.py) are not aten operators: each call is
labelled ``crosslayer::<kernel>`` here, so its own passes (BN affine, ReLU, the gradient sums) are
their own group and the matrix products it calls (``aten::mm``) count as matmuls.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from crosslayer.ops import cpu_kernels

KERNEL = "compiled kernel's own passes"  # crosslayer::* ranges, less the aten ops inside them
GROUPS = {  # first matching substring of the operator name wins
    "convolution": ("conv", "mkldnn"),
    "batch norm": ("batch_norm",),
    "matmul / linear": ("mm", "linear", "addmm"),
    "copies / layout": ("copy_", "cat", "contiguous", "clone", "empty_like", "to_copy", "permute"),
    "pooling": ("pool",),
    "elementwise (affine, ReLU, sums)": ("add", "mul", "relu", "threshold", "sum", "rsqrt", "div", "sub", "fill",
                                         "zero"),
}


def group(name: str) -> str:
    if name.startswith("crosslayer::"):
        return KERNEL
    name = name.removeprefix("aten::")
    for g, keys in GROUPS.items():
        if any(k in name for k in keys):
            return g
    return "other"


class _Labelled:
    """The compiled kernels module with every call inside a profiler range of its own name."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        fn = getattr(self._module, name)

        def call(*args):
            with torch.profiler.record_function(f"crosslayer::{name}"):
                return fn(*args)
        return call


def label_kernels() -> None:
    """Label the compiled kernels' calls (loads them now; nothing happens when they are off)."""
    module = cpu_kernels.get()
    if module is not None and not isinstance(module, _Labelled):
        cpu_kernels._state["module"] = _Labelled(module)


def profile(suite: str, config: str, batch_size: int, steps: int = 3, inference: bool = False,
            amp: str = "none") -> dict:
    """Self CPU time per group over ``steps`` training steps (``inference``: forward passes under
    ``torch.inference_mode``), after two warm-up steps, the wall time of those steps and how many
    operator calls they made (per-call overhead bounds small batches)."""
    cfg = importlib.import_module(f"benchmarks.{suite}").configs()[config]
    label_kernels()
    torch.manual_seed(0)
    model = cfg.build(10).train()
    x = torch.randn(batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (batch_size,))

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()

    def step():
        if inference:
            with torch.inference_mode(), autocast:
                model.eval()(x)
            return
        for p in model.parameters():
            p.grad = None
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()

    for _ in range(2):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - t0
    times: dict[str, float] = defaultdict(float)
    calls = 0
    for e in prof.key_averages():
        if e.key.startswith(("aten::", "crosslayer::")):
            times[group(e.key)] += e.self_cpu_time_total / 1e6
            calls += e.count
    return dict(wall_s=wall / steps, groups={k: v / steps for k, v in times.items()}, calls=calls / steps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=("densenet", "delugenet"))
    p.add_argument("config", help="a configuration name of that suite (e.g. ours, torchvision)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--inference", action="store_true", help="forward passes under torch.inference_mode")
    p.add_argument("--amp", choices=("none", "bf16"), default="none")
    a = p.parse_args(argv)
    res = profile(a.suite, a.config, a.batch_size, a.steps, a.inference, a.amp)
    ops = sum(res["groups"].values())
    print(f"{a.suite}/{a.config} batch {a.batch_size}{' inference' if a.inference else ''}, {a.amp}: "
          f"{res['wall_s'] * 1e3:.1f} ms per step (profiled; {torch.get_num_threads()} threads), "
          f"{res['calls']:.0f} operator calls, {res['wall_s'] / res['calls'] * 1e6:.1f} µs of wall time per call")
    for g, t in sorted(res["groups"].items(), key=lambda kv: -kv[1]):
        print(f"  {g:34s} {t * 1e3:8.1f} ms  {t / res['wall_s'] * 100:5.1f}%")
    print(f"  {'not in any operator (overhead)':34s} {(res['wall_s'] - ops) * 1e3:8.1f} ms  "
          f"{(1 - ops / res['wall_s']) * 100:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
