"""Micro-benchmark: the compiled CPU kernels (crosslayer/ops/csrc/cpu_kernels.cpp) against the PyTorch
operators they replace, forward + backward, interleaved rounds in one process, medians.

- DenseNet: one bottleneck consumer, BN affine + ReLU + 1x1 convolution (48 outputs) over the first
  c columns of a dense block's (P, C_total) feature buffer, and its backward into the shared
  gradient buffer, at DenseNet-BC-100 (k=12) shapes: maps 32/16/8, a few prefixes c per block.
- DelugeNet: one cross-layer depthwise convolution (weighted sum of L channels_last inputs) and its
  backward into the gradient bank.

    python -m benchmarks.cpu_kernels [--batch 64] [--reps 7]

``--model NAME`` times whole training steps (forward, backward, SGD step) of that model instead,
with and without the kernel, two copies of the same weights, alternating which goes first:

    python -m benchmarks.cpu_kernels --model densenet_bc100_k12 --batch 16 --reps 9
    python -m benchmarks.cpu_kernels --model densenet_bc40_k12_s2 --in-channels 1 --image-size 28
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

from crosslayer.ops import cpu_kernels
from crosslayer.ops.deluge import GradBank, WeightedSum
from crosslayer.ops.dense_block import conv1x1_matrix, kernel_rows

DENSENET_SHAPES = [(32, 216, c) for c in (24, 72, 120, 168, 204)] + [(16, 300, c) for c in (108, 200, 288)] + \
                  [(8, 342, c) for c in (150, 250, 330)]
CLDC_SHAPES = [(32, 128, 8), (32, 128, 16), (16, 256, 16), (8, 512, 16)]  # map, channels, inputs


def consumer_ops(buf, c, w, b, weight, n, h, gout, ghat):
    """What crosslayer.ops.dense_block runs without the kernel (training, non-recompute)."""
    y = torch.addcmul(b, buf[:, :c], w).relu_()
    y4 = y.view(n, h, h, c).permute(0, 3, 1, 2)
    F.conv2d(y4, weight)
    g4 = gout.view(n, h, h, -1).permute(0, 3, 1, 2)
    gy = torch.ops.aten.convolution_backward(g4, y4, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                             [True, True, False])[0]
    gy = gy.permute(0, 2, 3, 1).reshape(-1, c)
    gy = torch.ops.aten.threshold_backward.grad_input(gy, y, 0, grad_input=gy)
    gy.sum(0)
    ghat[:, :c].addcmul_(gy, w)
    gy.mul_(buf[:, :c]).sum(0)


def consumer_kernel(kernels, buf, c, w, b, weight, n, h, gout, ghat):
    wt, rows = conv1x1_matrix(weight), kernel_rows(buf, c)  # as crosslayer.ops.dense_block calls it
    kernels.consume_conv1x1(buf, c, w, b, wt, rows)
    kernels.consume_conv1x1_backward(gout, buf, c, w, b, wt, ghat, rows)


def model_steps(a) -> dict:
    """Training-step times (ms) of ``a.model`` with the kernel and on operators, alternating order."""
    import copy

    import crosslayer

    torch.manual_seed(0)
    nets = {"kernel": crosslayer.create_model(a.model, in_channels=a.in_channels)}
    nets["operators"] = copy.deepcopy(nets["kernel"])
    x = torch.randn(a.batch, a.in_channels, a.image_size, a.image_size)
    y = torch.randint(0, 10, (a.batch,))
    sgd = {k: torch.optim.SGD(n.parameters(), lr=1e-3, momentum=0.9, nesterov=True) for k, n in nets.items()}

    def step(k):
        with contextlib.nullcontext() if k == "kernel" else cpu_kernels.disabled():
            nets[k].zero_grad()
            F.cross_entropy(nets[k](x), y).backward()
            sgd[k].step()
    times = {k: [] for k in nets}
    for r in range(a.reps + 1):  # round 0 warms up
        for k in (["kernel", "operators"] if r % 2 else ["operators", "kernel"]):
            t0 = time.perf_counter()
            step(k)
            if r:
                times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def cldc_step(xs, weight, bias, grad, kernels=True):
    with contextlib.nullcontext() if kernels else cpu_kernels.disabled():
        out = WeightedSum.apply(weight, bias, GradBank(), *xs)
    out.backward(grad)  # backward follows the path forward chose


def timed(fns: dict, reps: int) -> dict:
    times = {k: [] for k in fns}
    for r in range(reps + 1):  # round 0 warms up
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--model", default=None, help="time whole training steps of this model instead")
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    a = p.parse_args(argv)
    kernels = cpu_kernels.get()
    if kernels is None:
        print(f"the compiled kernels are not available here: {cpu_kernels._state['reason'] or 'switched off'}")
        return 1
    torch.manual_seed(0)
    print(f"{torch.__version__}, {torch.get_num_threads()} threads, batch {a.batch}, median of {a.reps} interleaved rounds")
    if a.model:
        t = model_steps(a)
        med = {k: statistics.median(v) for k, v in t.items()}
        for k, v in t.items():
            print(f"{a.model} training step, {k}: median {med[k]:.1f} ms (range {min(v):.1f}–{max(v):.1f})")
        print(f"kernel / operators: {med['operators'] / med['kernel']:.2f}× faster")
        return 0
    print("\n| DenseNet consumer: map, C_total, c | operators ms | kernel ms | speed-up |\n|---|---:|---:|---:|")
    for h, total, c in DENSENET_SHAPES:
        p_rows = a.batch * h * h
        buf, ghat, gout = torch.randn(p_rows, total), torch.randn(p_rows, total), torch.randn(p_rows, 48)
        w, b, weight = torch.rand(c) + 0.5, torch.randn(c), torch.randn(48, c, 1, 1)
        args = (buf, c, w, b, weight, a.batch, h, gout, ghat)
        t = timed({"ops": partial(consumer_ops, *args), "kernel": partial(consumer_kernel, kernels, *args)}, a.reps)
        print(f"| {h}×{h}, {total}, {c} | {t['ops']:.2f} | {t['kernel']:.2f} | {t['ops'] / t['kernel']:.2f}× |", flush=True)
    print("\n| DelugeNet CLDC: map, channels, inputs | operators ms | kernel ms | speed-up |\n|---|---:|---:|---:|")
    for h, ch, n_in in CLDC_SHAPES:
        cl = dict(memory_format=torch.channels_last)
        xs = [torch.randn(a.batch, ch, h, h).contiguous(**cl) for _ in range(n_in)]
        grad = torch.randn(a.batch, ch, h, h).contiguous(**cl)
        weight, bias = torch.randn(ch, n_in, requires_grad=True), torch.zeros(ch, n_in, requires_grad=True)
        args = (xs, weight, bias, grad)
        t = timed({"ops": partial(cldc_step, *args, kernels=False), "kernel": partial(cldc_step, *args)}, a.reps)
        print(f"| {h}×{h}, {ch}, {n_in} | {t['ops']:.2f} | {t['kernel']:.2f} | {t['ops'] / t['kernel']:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
