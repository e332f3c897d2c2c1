"""The papers' dropout after every convolution (``conv_drop_rate``) on the fused dense blocks against
the plain modules, and the same model without dropout: a demo-sized DenseNet-BC (L=40, k=12,
stride-2 stem, 1x28x28), training steps with SGD, interleaved in one process.

    python -m benchmarks.dropout [--batch-size 64] [--reps 9]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

import crosslayer
from benchmarks import core


def train_step(drop: float, fused: bool | None, batch: int):
    torch.manual_seed(0)
    model = crosslayer.create_model("densenet_bc40_k12", num_classes=10, in_channels=1, stem="cifar-s2",
                                    conv_drop_rate=drop, fused=fused)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)

    def step():
        sgd.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        sgd.step()

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=9)
    a = p.parse_args(argv)
    steps = {"dropout 0.2, fused blocks": train_step(0.2, None, a.batch_size),
             "dropout 0.2, plain modules": train_step(0.2, False, a.batch_size),
             "no dropout, fused blocks": train_step(0.0, None, a.batch_size)}
    times = core.time_interleaved(steps, a.reps, 2, "cpu")
    m = core.machine_info()
    print(f"{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}, {m['date']}; batch {a.batch_size}, "
          f"median of {a.reps} interleaved rounds")
    for k, t in times.items():
        print(f"| {k} | {a.batch_size / statistics.median(t):.0f} img/s | ±{core.spread(t) * 100:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
