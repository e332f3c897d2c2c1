"""Micro-benchmark: one cross-layer depthwise convolution's weighted sum, out = sum_l w[:, l] * x_l,
computed as today's chain of in-place ``addcmul_`` over separate channels_last tensors, or over a
stacked (L, P, C) buffer in one call (``einsum``, product + sum, chunked product + sum).
Interleaved rounds in one process; medians and ranges.

    python -m benchmarks.cldc_weighted_sum [--batch 64 --channels 128 --size 16 --inputs 16 --reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def variants(n: int, c: int, h: int, num_inputs: int) -> dict:
    p = n * h * h
    xs = [torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last) for _ in range(num_inputs)]
    stacked = torch.stack([x.permute(0, 2, 3, 1).reshape(p, c) for x in xs])  # (L, P, C)
    w = torch.randn(c, num_inputs)
    wt = w.t().contiguous()

    def chain():
        out = torch.mul(xs[0], w[:, 0, None, None])
        for i in range(1, num_inputs):
            out.addcmul_(xs[i], w[:, i, None, None])
        return out.permute(0, 2, 3, 1).reshape(p, c)

    def chunked(step: int = 1024):
        out = torch.empty(p, c)
        for s in range(0, p, step):
            torch.sum(stacked[:, s:s + step] * wt[:, None, :], 0, out=out[s:s + step])
        return out

    return {"addcmul_ chain (today)": chain,
            "einsum over stacked buffer": lambda: torch.einsum("lpc,lc->pc", stacked, wt),
            "stacked product + sum": lambda: (stacked * wt[:, None, :]).sum(0),
            "stacked, chunked": chunked}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--inputs", type=int, default=16)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    fns = variants(a.batch, a.channels, a.size, a.inputs)
    ref = next(iter(fns.values()))()
    for name, fn in fns.items():
        assert torch.allclose(fn(), ref, atol=1e-3), name
    times = {k: [] for k in fns}
    for _ in range(a.reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    for k, v in times.items():
        print(f"{k:28s} {statistics.median(v) * 1e3:8.1f} ms  (range {min(v) * 1e3:.1f}-{max(v) * 1e3:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
