"""Shared benchmark harness: interleaved timing, honest peak memory, FLOP counting, machine info.

Timing protocol (the machine is shared and noisy): every configuration is built and warmed up in
ONE process, then the configurations are timed round-robin (A B C A B C ...) and the median step
time of each is reported; ratios are only ever taken between numbers of the same run.

Peak memory (CPU): each configuration runs in a FRESH subprocess (``python -m benchmarks.core
--memory-child ...``) with glibc's mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_``) so freed
tensors go back to the OS. After one warm-up step the process trims its heap, resets the kernel's
peak-RSS counter (``/proc/self/clear_refs`` = 5) and runs one training step; the reported number is
peak RSS (``VmHWM``; not ``ru_maxrss``, which Linux inherits from the parent across exec) during
that step minus the RSS just before it. The same child also reports
the bytes the autograd graph saves for backward (``torch.autograd.graph.saved_tensors_hooks``,
distinct storages, parameters excluded). On CUDA: ``torch.cuda.max_memory_allocated`` minus the
allocated bytes before the step.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from crosslayer.counting import SavedBytes


@dataclass
class Config:
    """One benchmarked model variant. ``build(num_classes)`` returns a fresh nn.Module."""

    name: str
    label: str
    build: Callable[[int], nn.Module]
    note: str = ""
    compile: bool = False  # torch.compile this configuration (inductor); its first steps then compile


@dataclass
class Options:
    batch_size: int = 64
    reps: int = 7
    warmup: int = 2
    device: str = "cpu"
    amp: str = "none"  # none | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    memory: bool = True
    threads: int | None = None
    num_classes: int = 10
    image_size: int = 32
    sgd_step: bool = False  # the training step includes an SGD (momentum, Nesterov) optimiser step
    keep_freed_memory: bool = False  # glibc keeps freed blocks for reuse (keep_freed_memory)
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- machine

def machine_info(device: str = "cpu") -> dict:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    with contextlib.suppress(Exception):
        import torchvision
        info["torchvision"] = torchvision.__version__
    with contextlib.suppress(OSError):
        info["loadavg_start"] = os.getloadavg()[0]
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def matmul_rate(device: str = "cpu", n: int = 2048, reps: int = 3) -> float:
    """FLOP/s of a large float32 torch.mm (2 n^3 per product), median of ``reps``."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


def forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass (conv + linear + matmuls) by torch.utils.flop_counter, per batch."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train(was)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------- running

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _autocast(opts: Options):
    if opts.amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[opts.amp]
    return torch.autocast(opts.device.split(":")[0], dtype=dtype)


class WithoutKernels(torch.nn.Module):
    """Runs a model on PyTorch operators only, without the compiled CPU kernels
    (``CROSSLAYER_CPU_KERNELS=0`` for this model alone): the fast paths choose in forward, and
    backward follows that choice."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        from crosslayer.ops import cpu_kernels

        with cpu_kernels.disabled():
            return self.model(x)


def prepare(config: Config, opts: Options):
    """Model (train mode, on device, optional channels_last / compile), input batch, labels,
    optimiser-free step functions."""
    torch.manual_seed(0)
    model = config.build(opts.num_classes).to(opts.device)
    fmt = torch.channels_last if opts.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(opts.batch_size, 3, opts.image_size, opts.image_size, device=opts.device)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, opts.num_classes, (opts.batch_size,), device=opts.device)
    runner = torch.compile(model) if opts.compile or config.compile else model
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True) if opts.sgd_step else None

    def train_step():
        model.train()
        for p in model.parameters():
            p.grad = None
        with _autocast(opts):
            loss = F.cross_entropy(runner(x), y)
        loss.backward()
        if sgd is not None:
            sgd.step()

    def infer_step():
        model.eval()
        with torch.inference_mode(), _autocast(opts):
            runner(x)

    return model, x, train_step, infer_step


def error_line(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters): what a failed step records."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def time_interleaved(steps: dict[str, Callable[[], None]], reps: int, warmup: int, device: str,
                     first: dict[str, float] | None = None,
                     failed: dict[str, str] | None = None) -> dict[str, list[float]]:
    """Median-ready step times, round-robin; ``first`` receives each configuration's first warm-up
    step time (the compile time of a torch.compile'd configuration). With ``failed``, a
    configuration whose step raises (out of memory, a compiler error) leaves the rounds with its
    error recorded there and the others are still timed; without it, the error propagates."""
    steps = dict(steps)

    def timed(k: str) -> float | None:
        try:
            _sync(device)
            t0 = time.perf_counter()
            steps[k]()
            _sync(device)
            return time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - recorded per configuration when asked to
            if failed is None:
                raise
            failed[k] = error_line(e)
            del steps[k]
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()  # what the failed step held goes back before the next one
            return None

    for k in list(steps):
        for i in range(warmup):
            t = timed(k)
            if t is None:
                break
            if i == 0 and first is not None:
                first[k] = t
    times = {k: [] for k in steps}
    for _ in range(reps):
        for k in list(steps):  # A B C A B C ...: load changes hit every configuration alike
            t = timed(k)
            if t is not None:
                times[k].append(t)
    return {k: times[k] for k in steps}


def _rss_kb(field: str = "VmRSS:") -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def measure_memory_inprocess(config: Config, opts: Options) -> dict:
    """Peak memory of ONE training step (run in a fresh process, see the module docstring)."""
    model, x, train_step, _ = prepare(config, opts)
    train_step()  # warm-up: one-time allocations (kernels' caches, grad buffers of the parameters)
    out = {}
    with SavedBytes(exclude=model.parameters()) as saved:
        if opts.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            train_step()
            torch.cuda.synchronize()
            out["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            out["method"] = "cuda.max_memory_allocated - allocated before the step"
        else:
            gc.collect()
            with contextlib.suppress(Exception):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak-RSS counter to the current RSS
                reset = True
            except OSError:
                reset = False
            base_kb = _rss_kb()
            train_step()
            # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork+exec
            peak_kb = _rss_kb("VmHWM:")
            out["peak_mb"] = (peak_kb - base_kb) / 1024 if reset else float("nan")
            out["method"] = "peak RSS (VmHWM) during one step - RSS before it (fresh process, clear_refs reset)"
    out["saved_mb"] = saved.total / 2 ** 20
    return out


def measure_memory(suite: str, config: str, opts: Options) -> dict:
    """Run :func:`measure_memory_inprocess` in a fresh interpreter."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, "-m", "benchmarks.core", "--memory-child", suite, config,
           "--options", json.dumps(opts.__dict__)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"memory child {suite}/{config} failed: {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ suites

def run_suite(suite: str, configs: dict[str, Config], opts: Options, flops_per_image: dict[str, int] | None = None,
              log=print) -> dict:
    """Time every configuration interleaved (train and inference), then measure memory per config in
    fresh processes. Returns a JSON-able dict with raw times, medians and derived numbers."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    info = machine_info(opts.device)
    log(f"[{suite}] {info['cpu']}, nproc {info['nproc']}, torch {info['torch']} ({info['torch_threads']} threads), "
        f"batch {opts.batch_size}, device {opts.device}, amp {opts.amp}, channels_last {opts.channels_last}")
    prepared = {k: prepare(c, opts) for k, c in configs.items()}
    results: dict = {"suite": suite, "machine": info, "options": opts.__dict__, "configs": {}}
    for k, c in configs.items():
        model, x, _, _ = prepared[k]
        n_params = sum(p.numel() for p in model.parameters())
        flops = (flops_per_image or {}).get(k)
        if flops is None:
            flops = forward_flops(model, x[:1].contiguous()) if not opts.compile else 0
        results["configs"][k] = {"label": c.label, "note": c.note, "params": n_params, "fwd_flops_per_image": flops}
    log(f"[{suite}] timing training steps, {opts.reps} interleaved rounds ...")
    first_train, first_infer = {}, {}
    t_train = time_interleaved({k: p[2] for k, p in prepared.items()}, opts.reps, opts.warmup, opts.device,
                               first_train)
    log(f"[{suite}] timing inference, {opts.reps} interleaved rounds ...")
    t_infer = time_interleaved({k: p[3] for k, p in prepared.items()}, opts.reps, opts.warmup, opts.device,
                               first_infer)
    del prepared
    gc.collect()
    mm_rate = matmul_rate(opts.device)
    results["matmul_flops_per_s"] = mm_rate
    with contextlib.suppress(OSError):
        results["machine"]["loadavg_end"] = os.getloadavg()[0]
    for k in configs:
        r = results["configs"][k]
        r["train_times"], r["infer_times"] = t_train[k], t_infer[k]
        r["first_train_s"], r["first_infer_s"] = first_train.get(k), first_infer.get(k)
        r["train_step_s"] = statistics.median(t_train[k])
        r["train_spread"] = spread(t_train[k])
        r["infer_spread"] = spread(t_infer[k])
        r["infer_step_s"] = statistics.median(t_infer[k])
        r["train_img_s"] = opts.batch_size / r["train_step_s"]
        r["infer_img_s"] = opts.batch_size / r["infer_step_s"]
        f = r["fwd_flops_per_image"]
        r["train_flop_frac"] = 3 * f * r["train_img_s"] / mm_rate if f else None
        r["infer_flop_frac"] = f * r["infer_img_s"] / mm_rate if f else None
    if opts.memory:
        for k in configs:
            if configs[k].compile:  # a fresh process would compile again: not measured
                continue
            log(f"[{suite}] peak memory of {k} (fresh process) ...")
            results["configs"][k].update(measure_memory(suite, k, opts))
    return results


def spread(times: list[float]) -> float:
    """Half the range of the step times relative to their median: +-x of a throughput figure."""
    med = statistics.median(times)
    return (max(times) - min(times)) / 2 / med if med else float("nan")


def format_results(res: dict, baseline: str, fast: str | None = None) -> str:
    """A markdown table; ratios relative to ``baseline`` (throughput: x faster; memory: fraction)."""
    b = res["configs"][baseline]
    has_mem = "peak_mb" in b
    head = "| configuration | params | train img/s | × baseline | infer img/s | × baseline |"
    sep = "|---|---:|---:|---:|---:|---:|"
    if has_mem:
        head += " peak step RSS MB | ÷ baseline | saved-for-backward MB | ÷ baseline |"
        sep += "---:|---:|---:|---:|"
    head += " train FLOP/s ÷ matmul |"
    sep += "---:|"
    lines = [head, sep]

    def times(r, kind):  # x the baseline, +- the two rows' spreads (half ranges) added
        x = r[f"{kind}_img_s"] / b[f"{kind}_img_s"]
        if r is b or f"{kind}_spread" not in r:
            return f"{x:.2f}"
        return f"{x:.2f} ±{(r[f'{kind}_spread'] + b[f'{kind}_spread']) * x:.2f}"
    for r in res["configs"].values():
        row = (f"| {r['label']} | {r['params']:,} | {r['train_img_s']:.1f} | {times(r, 'train')} | "
               f"{r['infer_img_s']:.1f} | {times(r, 'infer')} |")
        if has_mem and "peak_mb" in r:
            row += (f" {r['peak_mb']:.0f} | {r['peak_mb'] / b['peak_mb']:.2f} | {r['saved_mb']:.0f} | "
                    f"{r['saved_mb'] / b['saved_mb']:.2f} |")
        elif has_mem:
            row += " - | - | - | - |"
        frac = r.get("train_flop_frac")
        row += f" {frac * 100:.1f}% |" if frac else " - |"
        lines.append(row)
    return "\n".join(lines)


def ratio(res: dict, a: str, b: str, key: str) -> float:
    return res["configs"][a][key] / res["configs"][b][key]


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=7, help="interleaved timing rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile every model (timings exclude compile)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory subprocesses")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--sgd-step", action="store_true", help="include an SGD optimiser step in each training step")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="time with glibc keeping freed memory for reuse (all configurations alike; default: "
                        "glibc's defaults); peak memory is measured the same either way")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 8, 1 warm-up, 2 rounds")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--write-docs", default=None, metavar="MD",
                   help="update this markdown file's section for the benchmark (e.g. docs/benchmarks.md)")


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS
    (``--keep-freed-memory``): blocks up to 1 GiB from the heap (glibc's default maps each block
    above its dynamic threshold, at most 32 MB, afresh and unmaps it on free) and no trimming. A
    fairer footing for a model that allocates many large fresh tensors per step (docs/benchmarks.md,
    "The allocator"). False where it cannot apply: not glibc, or the user already set glibc's
    MALLOC_* / GLIBC_TUNABLES variables or preloaded another allocator."""
    if any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ) or os.environ.get("LD_PRELOAD"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    # older glibc refuses thresholds above 32 MB (its dynamic maximum): take that then
    heap = libc.mallopt(m_mmap_threshold, ctypes.c_int(1 << 30)) or libc.mallopt(m_mmap_threshold, ctypes.c_int(32 << 20))
    return bool(heap and libc.mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1)))


def options_from_args(args) -> Options:
    opts = Options(batch_size=args.batch_size, reps=args.reps, warmup=args.warmup, device=args.device, amp=args.amp,
                   channels_last=args.channels_last, compile=args.compile, memory=not args.no_memory,
                   threads=args.threads, sgd_step=args.sgd_step, keep_freed_memory=args.keep_freed_memory)
    if args.quick:
        opts.batch_size, opts.reps, opts.warmup = min(opts.batch_size, 8), 2, 1
    return opts


def update_markdown_section(path: str, marker: str, body: str) -> None:
    """Replace the text between ``<!-- marker:start -->`` and ``<!-- marker:end -->`` in ``path``."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = open(path).read() if os.path.exists(path) else ""
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def report_header(res: dict, command: str) -> str:
    m = res["machine"]
    o = res["options"]
    load = (f"load average {m.get('loadavg_start', float('nan')):.1f} at start, "
            f"{m.get('loadavg_end', float('nan')):.1f} at end")
    return (f"Command: `{command}`  \nMachine: {m['cpu']}, nproc {m['nproc']}, torch {m['torch']} "
            f"({m['torch_threads']} threads), torchvision {m.get('torchvision', '-')}"
            f"{', ' + m['gpu'] if 'gpu' in m else ''}; "
            f"{load}  \nDate: {m['date']}; batch {o['batch_size']}, device {o['device']}, amp {o['amp']}, "
            f"channels_last {o['channels_last']}, compile {o['compile']}; training step = forward + backward"
            f"{' + SGD step' if o.get('sgd_step') else ''}; median of {o['reps']} interleaved rounds; "
            f"allocator: {'freed memory kept (--keep-freed-memory)' if o.get('keep_freed_memory') else 'glibc defaults'}; "
            f"matmul rate {res['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s (float32 2048² torch.mm).")


def benchmark_main(suite: str, doc: str, run, markdown, argv=None, extra_arguments=None) -> int:
    """The command line shared by the benchmarks: run the suite, print its Markdown table, and
    optionally save the raw results (--json) and rewrite its section of docs (--write-docs).
    ``extra_arguments(parser)`` adds a suite's own flags; their values reach ``run`` in ``opts.extra``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p)
    common = {a.dest for a in p._actions}
    if extra_arguments is not None:
        extra_arguments(p)
    args = p.parse_args(argv)
    opts = options_from_args(args)
    if opts.keep_freed_memory and not keep_freed_memory():
        p.error("--keep-freed-memory: not applied (needs glibc, and no MALLOC_*, GLIBC_TUNABLES or LD_PRELOAD set)")
    opts.extra = {k: v for k, v in vars(args).items() if k not in common}
    res = run(opts)
    command = f"python -m benchmarks.{suite} " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(res, command.strip())
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.write_docs:
        update_markdown_section(args.write_docs, f"bench:{suite}", text)
    return 0


def _child_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--memory-child", nargs=2, metavar=("SUITE", "CONFIG"), required=True)
    p.add_argument("--options", required=True)
    a = p.parse_args(argv)
    suite, name = a.memory_child
    opts = Options(**json.loads(a.options))
    if opts.threads:
        torch.set_num_threads(opts.threads)
    configs = importlib.import_module(f"benchmarks.{suite}").configs()
    print(json.dumps(measure_memory_inprocess(configs[name], opts)))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
