"""Everything a GPU should tell us, in one command that fits one call of a lent GPU machine:

    python -m benchmarks.gpu --budget-s 540         # on a machine with one CUDA GPU
    python -m benchmarks.gpu --device cpu --quick   # smoke run of the same code (the test suite runs it)
    python -m benchmarks.gpu --device cpu --quick --simulate-failures   # dry run of the failure handling

In order, each step only if the time budget (``--budget-s``, default 300 s) still has room for it;
a step that does not fit is skipped and listed as such in the output:

1. training and inference throughput and the peak memory of one training step
   (``torch.cuda.max_memory_allocated`` minus what was allocated before it) of DenseNet-BC-100 at
   batch 64 and 256 and DelugeNet-146 at batch 64: ours (fused, plain, memory-efficient, plain with
   the CUDA training defaults channels_last + bf16) and torchvision's DenseNet built to the same
   architecture (default, ``memory_efficient=True``, channels_last + bf16 autocast), all configurations of
   one suite built in one process and timed round-robin with CUDA synchronisation around every
   step (``benchmarks.core``);
2. the seconds of one CIFAR-sized training epoch (50,000 synthetic 32x32 images resident on the
   device, augmentation on the device, SGD step included) of DenseNet-BC-100 at the paper's
   batch 64 and at batch 256, with the device's training defaults (``crosslayer.ops.defaults``);
3. one real Fashion-MNIST epoch through ``crosslayer train`` (the demo's model and preset;
   ``--data-dir`` names the folder of its IDX files);
4. the ``cuda``-marked tests (``pytest -m cuda tests/test_cuda.py -rfEs --tb=short``, with
   ``CROSSLAYER_CPU_KERNELS=0`` so that their CPU references build no C++ kernels); the whole
   output goes to ``OUT/cuda-tests.log`` and its tail into ``gpu.json``;
5. with ``--compile`` only: ``torch.compile`` (ours plain and torchvision, each beside its eager
   twin), last because compiling takes minutes.

Every step but the tests runs in a child process of its own (``--step``) under a time limit
(:data:`TIMEOUT_S`, never past the budget): a step that fails, crashes or hangs is recorded with
its error (a hang is killed) and the next step runs. Inside a suite a configuration that fails (out
of memory, say) is marked not run with its error and the others are timed. ``OUT/gpu.json`` and
``OUT/gpu.md`` (tables with the GPU name, driver, CUDA, torch version and date) are rewritten after
every step, so a run cut short leaves everything measured so far. ``OUT`` is ``--out``, else the
environment's ``$OUT``, else ``runs/gpu-benchmark``. ``--write-docs docs/benchmarks.md`` also
replaces that file's ``bench:gpu`` section; ``--from-json gpu.json`` rebuilds the tables from a
returned file without measuring.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import crosslayer
from benchmarks import core, delugenet, densenet
from crosslayer.counting import SavedBytes
from crosslayer.ops.defaults import training_defaults, use_fused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BUDGET_S = 300.0
# rough seconds each step takes on an H100/H200-class GPU (full run) and on 2 CPU cores (--quick):
# a step starts only when the budget has at least this much left
ESTIMATE_S = {"tests": (120, 30), "suite": (25, 10), "epoch64": (40, 5), "epoch256": (25, 5),
              "fashion-mnist": (30, 15), "compile": (150, 60), "hang": (1, 1)}
# the most seconds a step may run (full run, --quick) before it is killed, never past the budget:
# a hang costs one step, not the call
TIMEOUT_S = {"tests": (240, 600), "suite": (150, 600), "epoch64": (120, 300), "epoch256": (90, 300),
             "fashion-mnist": (150, 600), "compile": (300, 600), "hang": (3, 3)}
TAIL_CHARS = 6000  # of the tests' output kept in gpu.json
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class Budget:
    """Wall-clock budget of the whole run; ``allows`` records what it had to skip."""

    def __init__(self, seconds: float, quick: bool, log=print):
        self.seconds, self.quick, self.log = seconds, quick, log
        self.t0 = time.perf_counter()
        self.skipped: list[str] = []

    def used(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.used()

    def allows(self, what: str, kind: str) -> bool:
        need = ESTIMATE_S[kind][1 if self.quick else 0]
        if self.left() >= need:
            return True
        msg = (f"{what}: skipped, {max(self.left(), 0):.0f} s of the {self.seconds:.0f} s budget left and it "
               f"needs about {need} s (--budget-s raises the budget)")
        self.skipped.append(msg)
        self.log(f"[gpu] {msg}")
        return False


# ------------------------------------------------------------------------------------- machine

def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gpu_info(device: str) -> dict:
    """``benchmarks.core.machine_info`` plus the GPU, driver, CUDA and cuDNN versions and the
    float32 settings that change what "float32" means on a GPU."""
    info = core.machine_info(device)
    info.update(device=device, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                cudnn_benchmark=torch.backends.cudnn.benchmark,
                conv_fp32_precision=torch.backends.cudnn.conv.fp32_precision,
                matmul_fp32_precision=torch.backends.cuda.matmul.fp32_precision)
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    capability=f"{props.major}.{props.minor}", driver=_driver_version())
    else:
        info.update(gpu=None, driver=None)
    return info


# ------------------------------------------------------------------------------------- configs

def _ours_densenet(fused: bool | None, memory_efficient: bool = False):
    return lambda n: crosslayer.create_model(densenet.MODEL, num_classes=n, fused=fused,
                                             memory_efficient=memory_efficient)


def _ours_delugenet(fused: bool | None, memory_efficient: bool = False):
    return lambda n: crosslayer.create_model(delugenet.MODEL, num_classes=n, fused=fused,
                                             memory_efficient=memory_efficient)


def _variant(name: str, label: str, build, **options) -> tuple[core.Config, dict]:
    """A configuration and the ``core.Options`` fields it changes (amp, channels_last, compile)."""
    return core.Config(name, label, build), options


BF16 = dict(amp="bf16", channels_last=True)


def densenet_configs() -> dict:
    tv = densenet.torchvision_densenet_bc100
    return {v[0]: _variant(*v[:3], **v[3]) for v in [
        ("tv", "torchvision DenseNet (default: memory_efficient=False, fp32)", tv, {}),
        ("tv_me", "torchvision DenseNet (memory_efficient=True)", lambda n: tv(n, True), {}),
        ("tv_cl_bf16", "torchvision DenseNet, channels_last + bf16 autocast", tv, BF16),
        ("fused", "ours, fused blocks (fused=True)", _ours_densenet(True), {}),
        ("plain", "ours, plain modules (fused=False; the CUDA default)", _ours_densenet(False), {}),
        ("me", "ours, fused + memory_efficient", _ours_densenet(True, True), {}),
        ("plain_me", "ours, plain + memory_efficient (checkpointed)", _ours_densenet(False, True), {}),
        ("fused_cl_bf16", "ours, fused, channels_last + bf16 autocast", _ours_densenet(True), BF16),
        ("default_cl_bf16", "ours, the CUDA training defaults (fused=None, channels_last + bf16)",
         _ours_densenet(None), BF16),
    ]}


def delugenet_configs() -> dict:
    return {v[0]: _variant(*v[:3], **v[3]) for v in [
        ("reference", "per-consumer reference (crosslayer/models/reference.py)", delugenet.reference, {}),
        ("fused", "ours, gradient bank (fused=True)", _ours_delugenet(True), {}),
        ("plain", "ours, plain autograd (fused=False)", _ours_delugenet(False), {}),
        ("me", "ours, fused + memory_efficient", _ours_delugenet(True, True), {}),
        ("default_cl_bf16", "ours, the CUDA training defaults (fused=None, channels_last + bf16)",
         _ours_delugenet(None), BF16),
    ]}


def compile_configs(model: str) -> dict:
    """Each compiled configuration beside its eager twin, timed in the same rounds."""
    if model == "delugenet":
        ours = _ours_delugenet(False)
        pairs = [("plain", "ours, plain (eager)", ours, {}),
                 ("plain_compile", "ours, plain + torch.compile", ours, dict(compile=True))]
    else:
        tv, ours = densenet.torchvision_densenet_bc100, _ours_densenet(False)
        pairs = [("tv", "torchvision DenseNet (eager)", tv, {}),
                 ("tv_compile", "torchvision DenseNet + torch.compile", tv, dict(compile=True)),
                 ("plain", "ours, plain (eager)", ours, {}),
                 ("plain_compile", "ours, plain + torch.compile", ours, dict(compile=True))]
    return {v[0]: _variant(*v[:3], **v[3]) for v in pairs}


# ---------------------------------------------------------------------------------- measuring

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_memory(model, train_step, device: str, compiled: bool = False) -> dict:
    """Memory of one training step: on CUDA the peak (``torch.cuda.max_memory_allocated`` minus
    what was allocated before the step); on any device the bytes the autograd graph saves for
    backward (distinct storages, parameters excluded; not for compiled models, whose graph
    saves inside the compiled region)."""
    out = {}
    if device.startswith("cuda"):
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step()
        _sync(device)
        out["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    if not compiled:
        with SavedBytes(exclude=model.parameters()) as saved:
            train_step()
        _sync(device)
        out["saved_mb"] = saved.total / 2 ** 20
    return out


def _timing(times: list[float], batch: int) -> dict:
    med = statistics.median(times)
    return {"times": times, "median_ms": 1e3 * med, "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times),
            "img_s": batch / med}


def _simulated_oom():
    raise torch.OutOfMemoryError("CUDA out of memory (simulated by --simulate-failures)")


def run_suite(configs: dict, opts: core.Options, log=print, fail: str | None = None) -> dict:
    """Build every configuration in this process, time training and inference steps round-robin
    (``core.time_interleaved``: synchronised around every step), then one step's memory each. A
    configuration that fails to build or to run is marked ``not_run`` with its error; the others
    are timed. ``fail``: a configuration whose training step runs out of memory (a dry run)."""
    prepared, out = {}, {}
    for k, (config, changes) in configs.items():
        try:
            prepared[k] = core.prepare(config, dataclasses.replace(opts, **changes))
        except Exception as e:  # noqa: BLE001 - e.g. a model without that option, out of memory
            out[k] = {"label": config.label, "not_run": core.error_line(e)}
    if fail in prepared:
        model, x, _, infer_step = prepared[fail]
        prepared[fail] = (model, x, _simulated_oom, infer_step)
    log(f"[gpu] {len(prepared)} configurations, batch {opts.batch_size}: {opts.reps} interleaved rounds")
    failed: dict[str, str] = {}
    t_train = core.time_interleaved({k: p[2] for k, p in prepared.items()}, opts.reps, opts.warmup, opts.device,
                                    failed=failed)
    t_infer = core.time_interleaved({k: p[3] for k, p in prepared.items() if k in t_train}, opts.reps,
                                    opts.warmup, opts.device, failed=failed)
    for k, (model, _, train_step, _) in prepared.items():
        config, changes = configs[k]
        if k in failed:
            out[k] = {"label": config.label, "options": changes, "not_run": failed[k]}
            log(f"[gpu] {k}: not run ({failed[k]})")
            continue
        r = {"label": config.label, "options": changes, "params": sum(p.numel() for p in model.parameters()),
             "train": _timing(t_train[k], opts.batch_size), "infer": _timing(t_infer[k], opts.batch_size)}
        try:
            r.update(step_memory(model, train_step, opts.device, bool(changes.get("compile"))))
        except Exception as e:  # noqa: BLE001 - the times stand without the memory
            r["memory_error"] = core.error_line(e)
        out[k] = r
    del prepared
    gc.collect()
    if opts.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {k: out[k] for k in configs}  # in the configurations' order


def cifar_epoch(device: str, batch_size: int, n_images: int, image_size: int = 32, log=print) -> dict:
    """Seconds of one training epoch of DenseNet-BC-100 over ``n_images`` synthetic uint8 images
    (``image_size`` square: CIFAR's 32 unless a smoke run) resident on the device (the library's
    DeviceLoader: normalisation, flip, pad-crop on the device), SGD step included, with the
    device's training defaults; after 3 warm-up steps."""
    from crosslayer.data.loaders import DeviceLoader
    from crosslayer.data.transforms import Augment

    dev, settings = torch.device(device), training_defaults(torch.device(device).type)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n_images,), generator=g)
    loader = DeviceLoader(images, labels, CIFAR_MEAN, CIFAR_STD, Augment(), batch_size, dev, train=True,
                          channels_last=settings["channels_last"])
    torch.manual_seed(0)
    model = crosslayer.create_model(densenet.MODEL).to(dev)
    if settings["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)

    def step(x, y):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=settings["amp"] == "bf16"):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    loader.set_epoch(1)
    for i, (x, y) in enumerate(loader):  # warm-up: cuDNN and allocator, not counted
        step(x, y)
        if i == 2:
            break
    loader.set_epoch(0)
    _sync(device)
    t0, steps = time.perf_counter(), 0
    for x, y in loader:
        loss = step(x, y)
        steps += 1
    _sync(device)
    seconds = time.perf_counter() - t0
    log(f"[gpu] epoch of {n_images} images at batch {batch_size}: {seconds:.1f} s")
    return {"batch_size": batch_size, "images": n_images, "image_size": image_size, "steps": steps, "seconds": seconds,
            "images_per_s": n_images / seconds, "final_loss": loss.item(), **settings,
            "fused": use_fused(model.fused, dev.type)}


def fashion_mnist_epoch(device: str, data_dir: str | None, quick: bool, log=print) -> dict:
    """One real Fashion-MNIST epoch through ``crosslayer train`` (the demo's DenseNet-BC-40 and
    preset, the device's training defaults), evaluation included; the run directory is temporary."""
    from crosslayer.cli import main as crosslayer_cli

    with tempfile.TemporaryDirectory(prefix="crosslayer-gpu-fmnist-") as tmp:
        argv = ["--model", "densenet_bc40_k12", "--data", "fashion-mnist", "--preset", "demo", "--epochs", "1",
                "--device", device]
        argv += (["--data-dir", data_dir] if data_dir else []) + (["--limit", "64"] if quick else [])
        run_dir, err = os.path.join(tmp, "run"), io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = crosslayer_cli(["train", *argv, "--out", run_dir, "--quiet", "--no-progress"])
        if rc != 0:  # e.g. no data set files here: say so, go on
            return {"not_run": f"crosslayer train exited {rc}: {err.getvalue().strip()[-300:]}"}
        res = json.load(open(os.path.join(run_dir, "results.json")))
        row = json.loads(open(os.path.join(run_dir, "metrics.jsonl")).readline())
        run_cfg = json.load(open(os.path.join(run_dir, "config.json")))
    log(f"[gpu] Fashion-MNIST epoch: {row['epoch_time_s']:.1f} s, test error {res['test_err']:.2f}%")
    return {"command": "crosslayer train " + " ".join(shlex.quote(a) for a in argv),
            "train_images": run_cfg["train_images"], "epoch_time_s": row["epoch_time_s"],
            "images_per_s": row["images_per_s"], "test_err": res["test_err"], "wall_time_s": res["wall_time_s"],
            "amp": run_cfg["amp"], "channels_last": run_cfg["channels_last"]}


SIMULATED_TESTS = """
def test_passes():
    pass


def test_fails():
    assert 1 + 1 == 3, "a CUDA test failure simulated by --simulate-failures"
"""


def _run(cmd: list[str], timeout: float, **popen) -> int | None:
    """Run ``cmd`` in a process group of its own; its return code, or None when it outlived
    ``timeout`` seconds (the whole group, compile workers included, is killed)."""
    p = subprocess.Popen(cmd, start_new_session=True, **popen)
    try:
        return p.wait(timeout=timeout)
    except BaseException as e:  # the timeout, or this process interrupted: leave nothing running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        if isinstance(e, subprocess.TimeoutExpired):
            return None
        raise


def run_cuda_tests(args, timeout: float, log=print) -> dict:
    """``pytest -m cuda tests/test_cuda.py`` in a subprocess (failures with short tracebacks, skips
    with their reasons), its output in ``OUT/cuda-tests.log`` and its tail in the result.
    ``--simulate-failures`` runs a file with one passing and one failing test instead."""
    flags = ["-v", "-o", "addopts=", "-rfEs", "--tb=short", "-p", "no:cacheprovider", "-o", "faulthandler_timeout=60"]
    with tempfile.TemporaryDirectory(prefix="crosslayer-gpu-tests-") as tmp:
        if args.simulate_failures:
            target = os.path.join(tmp, "test_simulated.py")
            with open(target, "w") as f:
                f.write(SIMULATED_TESTS)
            cmd = [sys.executable, "-m", "pytest", *flags, "--rootdir", tmp, target]
        else:
            cmd = [sys.executable, "-m", "pytest", "-m", "cuda", *flags, "tests/test_cuda.py"]
        path = os.path.join(args.out, "cuda-tests.log")
        env = dict(os.environ, CROSSLAYER_CPU_KERNELS="0", PYTHONUNBUFFERED="1")
        t0 = time.perf_counter()
        with open(path, "w") as f:
            rc = _run(cmd, timeout, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        seconds = time.perf_counter() - t0
    text = open(path, errors="replace").read()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    summary = lines[-1].strip("= ") if lines else "no output"
    if rc is None:
        summary = f"timed out after {timeout:.0f} s (killed); last line: {summary}"
    res = {"command": "CROSSLAYER_CPU_KERNELS=0 python " + " ".join(shlex.quote(a) for a in cmd[1:]),
           "returncode": rc, "summary": summary,
           "failed": [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))],
           "seconds": round(seconds, 1), "log": path, "output_tail": text[-TAIL_CHARS:]}
    log(f"[gpu] cuda tests: {summary}")
    return res


# ---------------------------------------------------------------------------------- the run

@dataclass
class Step:
    """One step of the run: its result goes to ``res[section][name]`` (the tests: ``res["tests"]``)."""

    section: str
    name: str
    kind: str  # the key of ESTIMATE_S and TIMEOUT_S
    thunk: object  # () -> dict, run in a child process

    @property
    def title(self) -> str:
        return "cuda tests" if self.section == "tests" else f"{self.section} {self.name}"


def _options(args) -> core.Options:
    # --quick: 8x8 images (the models' per-layer work is what the smoke run exercises, not their speed)
    return core.Options(device=args.device, reps=args.reps or (1 if args.quick else 10),
                        warmup=1 if args.quick else 3, memory=False, image_size=8 if args.quick else 32)


def _hang():
    time.sleep(3600)


def _steps(args, log=print) -> list[Step]:
    """The steps in the order they run: the measurements first, then the CUDA tests, compilation
    last. ``--simulate-failures``: a short run whose DenseNet suite has a configuration that runs
    out of memory, with a step that hangs past its time limit and a failing test."""
    opts = _options(args)
    small, large = (2, None) if args.quick else (64, 256)
    n_images = 4 if args.quick else 50_000

    def suite(configs, batch, fail=None):
        return lambda: run_suite(configs(), dataclasses.replace(opts, batch_size=batch), log, fail)

    def epoch(batch):
        return lambda: cifar_epoch(args.device, batch, n_images, opts.image_size, log)

    if args.simulate_failures:
        some = lambda: {k: v for k, v in densenet_configs().items() if k in ("tv", "fused", "plain")}  # noqa: E731
        return [Step("suites", f"densenet_bc100_b{small}", "suite", suite(some, small, fail="fused")),
                Step("simulated", "hang", "hang", _hang),
                Step("epochs", f"b{small}", "epoch64", epoch(small)),
                Step("tests", "cuda", "tests", None)]
    steps = [Step("suites", f"densenet_bc100_b{small}", "suite", suite(densenet_configs, small)),
             Step("epochs", f"b{small}", "epoch64", epoch(small))]
    if not args.quick:  # the same code at another batch size: not needed in a smoke run
        steps += [Step("suites", f"densenet_bc100_b{large}", "suite", suite(densenet_configs, large)),
                  Step("epochs", f"b{large}", "epoch256", epoch(large))]
    steps += [Step("suites", f"delugenet146_b{small}", "suite", suite(delugenet_configs, small)),
              Step("fashion_mnist", "epoch", "fashion-mnist",
                   lambda: fashion_mnist_epoch(args.device, args.data_dir, args.quick, log))]
    if not args.skip_tests:
        steps.append(Step("tests", "cuda", "tests", None))
    if args.compile and not args.quick:
        steps += [Step("compiled", f"densenet_bc100_b{small}", "compile",
                       suite(lambda: compile_configs("densenet"), small)),
                  Step("compiled", f"delugenet146_b{small}", "compile",
                       suite(lambda: compile_configs("delugenet"), small))]
    return steps


def run_step(args) -> int:
    """The child process of one step (``--step TITLE``): its result, or its error, as JSON in
    ``--step-out``."""
    log = _log
    step = {s.title: s for s in _steps(args, log)}[args.step]
    try:
        out = {"result": step.thunk()}
    except Exception as e:  # noqa: BLE001 - the parent records it and goes on
        import traceback

        traceback.print_exc()
        out = {"error": core.error_line(e)}
    with open(args.step_out, "w") as f:
        json.dump(out, f, default=str)
    return 0


def run_in_child(args, step: Step, timeout: float) -> dict:
    """``{"result": ...}`` or ``{"error": ...}`` of ``step`` run by a child process (its output
    goes to this one's), killed after ``timeout`` seconds."""
    with tempfile.TemporaryDirectory(prefix="crosslayer-gpu-step-") as tmp:
        path = os.path.join(tmp, "step.json")
        cmd = [sys.executable, "-m", "benchmarks.gpu", *args.argv, "--step", step.title, "--step-out", path]
        sys.stdout.flush()
        path_env = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
        rc = _run(cmd, timeout, env=dict(os.environ, PYTHONPATH=path_env, PYTHONUNBUFFERED="1"))
        if rc is None:
            return {"error": f"timed out after {timeout:.0f} s (killed)"}
        if not os.path.exists(path):
            return {"error": f"its process exited with code {rc} and no result (a crash: see the log above)"}
        with open(path) as f:
            return json.load(f)


def write_outputs(res: dict, out: str) -> None:
    """gpu.json and gpu.md in ``out``, each replaced whole (a reader never sees half a file)."""
    os.makedirs(out, exist_ok=True)
    for name, text in (("gpu.json", json.dumps(res, indent=1, default=str)), ("gpu.md", markdown(res))):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def run(args, log=print) -> dict:
    budget = Budget(args.budget_s, args.quick, log)
    res = {"machine": gpu_info(args.device), "command": args.command, "quick": args.quick,
           "budget_s": args.budget_s, "suites": {}, "epochs": {}, "compiled": {}, "fashion_mnist": {},
           "tests": None, "errors": {}, "step_seconds": {}, "skipped": budget.skipped, "seconds": 0.0, "goals": {}}
    if args.skip_tests:
        budget.skipped.append("cuda tests: skipped (--skip-tests)")
    if args.quick:
        budget.skipped.append("DenseNet-BC-100 at the second batch size (256): not run (--quick)")
    if args.quick or not args.compile:
        budget.skipped.append(f"torch.compile: not run ({'--quick' if args.quick else 'no --compile'})")
    write_outputs(res, args.out)
    for step in _steps(args, log):
        if not budget.allows(step.title, step.kind):
            continue
        timeout = min(TIMEOUT_S[step.kind][1 if args.quick else 0], max(budget.left(), 1.0))
        log(f"[gpu] {step.title} (at most {timeout:.0f} s)")
        t0 = time.perf_counter()
        if step.section == "tests":
            res["tests"] = run_cuda_tests(args, timeout, log)
        else:
            got = run_in_child(args, step, timeout)
            if "error" in got:
                res["errors"][step.title] = got["error"]
                log(f"[gpu] {step.title} failed: {got['error']}")
            else:
                res.setdefault(step.section, {})[step.name] = got["result"]
        res["step_seconds"][step.title] = round(time.perf_counter() - t0, 1)
        res["seconds"], res["goals"] = budget.used(), goals(res)
        write_outputs(res, args.out)
    res["seconds"] = budget.used()
    write_outputs(res, args.out)
    return res


# ---------------------------------------------------------------------------------- reporting

def _ratio(suite: dict, a: str, b: str, key: tuple) -> float | None:
    try:
        x, y = suite[a], suite[b]
        for k in key:
            x, y = x[k], y[k]
        return x / y
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def goals(res: dict) -> dict:
    """The goals for an H100/H200-class GPU (docs/benchmarks.md), where this run measured what they need."""
    g = {}
    s = res["suites"].get("densenet_bc100_b64") or {}
    for ours in ("fused", "plain"):
        g[f"train_{ours}_vs_torchvision_fp32"] = _ratio(s, ours, "tv", ("train", "img_s"))
    for ours in ("fused", "default"):
        g[f"train_{ours}_cl_bf16_vs_torchvision_cl_bf16"] = _ratio(s, f"{ours}_cl_bf16", "tv_cl_bf16",
                                                                   ("train", "img_s"))
    g["me_peak_vs_torchvision"] = _ratio(s, "me", "tv", ("peak_mb",))
    g["plain_me_peak_vs_torchvision"] = _ratio(s, "plain_me", "tv", ("peak_mb",))
    e = res["epochs"].get("b64") or {}
    g["epoch_b64_s"] = e.get("seconds") if e.get("images") == 50_000 else None
    return {k: v for k, v in g.items() if v is not None}


def _fmt(v, spec=".1f", none="-"):
    return none if v is None else format(v, spec)


def suite_table(suite: dict, baseline: str) -> str:
    b = suite.get(baseline, {})
    lines = ["| configuration | train img/s | × base | train step ms, median [min–max] | infer img/s | × base "
             "| peak MB | ÷ base | saved-for-backward MB | ÷ base |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, r in suite.items():
        if "not_run" in r:
            lines.append(f"| {r['label']} | not run: {r['not_run']} |||||||||")
            continue
        t, i = r["train"], r["infer"]
        lines.append(
            f"| {r['label']} | {t['img_s']:.0f} | {_fmt(_ratio(suite, k, baseline, ('train', 'img_s')), '.2f')} | "
            f"{t['median_ms']:.1f} [{t['min_ms']:.1f}–{t['max_ms']:.1f}] | {i['img_s']:.0f} | "
            f"{_fmt(_ratio(suite, k, baseline, ('infer', 'img_s')), '.2f')} | {_fmt(r.get('peak_mb'), '.0f')} | "
            f"{_fmt(_ratio(suite, k, baseline, ('peak_mb',)), '.2f')} | {_fmt(r.get('saved_mb'), '.0f')} | "
            f"{_fmt(_ratio(suite, k, baseline, ('saved_mb',)), '.2f')} |")
    if not b:
        lines.append(f"\n(the baseline {baseline!r} was not measured: ratios omitted)")
    return "\n".join(lines)


def _header(res: dict) -> list[str]:
    m = res["machine"]
    gpu = (f"{m['gpu']} (compute capability {m['capability']}, {m['gpu_memory_gib']} GiB), driver {m['driver']}"
           if m.get("gpu") else "no GPU")
    out = [f"Command: `{res['command']}`  ",
           f"GPU: {gpu}; CUDA {m['cuda']}, cuDNN {m['cudnn']}; torch {m['torch']}, torchvision "
           f"{m.get('torchvision', '-')}; CPU {m['cpu']} (nproc {m['nproc']})  ",
           f"Date: {m['date']}; the run took {res['seconds']:.0f} s of its {res['budget_s']:.0f} s budget; float32 "
           f"convolutions {m['conv_fp32_precision']}, matmuls {m['matmul_fp32_precision']}; cudnn.benchmark "
           f"{m['cudnn_benchmark']}; throughput = median of the interleaved rounds"]
    if not m.get("gpu"):
        out.append(f"\n**Smoke run on {m['device']}: no GPU was measured; these numbers say nothing about a GPU.**")
    t = res.get("tests")
    out.append(f"\nCUDA tests (`{t['command']}`): {t['summary']}" if t else "\nCUDA tests: not run")
    out += [f"- {line}" for line in (t or {}).get("failed", [])]
    return out


def _epochs(res: dict) -> list[str]:
    if not res["epochs"]:
        return []
    lines = ["\n### DenseNet-BC-100 training epoch (synthetic data resident on the device)\n",
             "| batch | images | size | seconds | images/s | amp | channels_last | fused |",
             "|---:|---:|---:|---:|---:|---|---|---|"]
    for e in res["epochs"].values():
        lines.append(f"| {e['batch_size']} | {e['images']:,} | {e['image_size']}² | {e['seconds']:.1f} | "
                     f"{e['images_per_s']:.0f} | "
                     f"{e['amp']} | {e['channels_last']} | {e['fused']} |")
    return lines


def markdown(res: dict) -> str:
    out = _header(res)
    titles = {"densenet": ("DenseNet-BC-100 vs torchvision's same-architecture DenseNet", "tv"),
              "delugenet": ("DelugeNet-146 vs the per-consumer reference", "reference")}
    for section, prefix in (("suites", ""), ("compiled", "torch.compile: ")):
        for name, suite in res[section].items():
            title, base = titles["densenet" if name.startswith("densenet") else "delugenet"]
            base = base if section == "suites" else next(iter(suite))
            out += [f"\n### {prefix}{title}, batch {name.rsplit('_b', 1)[1]}\n", suite_table(suite, base)]
    out += _epochs(res)
    f = res["fashion_mnist"].get("epoch")
    if f:
        out.append(f"\nFashion-MNIST, one epoch: not run ({f['not_run']})" if "not_run" in f else
                   f"\nFashion-MNIST, one epoch (`{f['command']}`, {f['train_images']:,} images, amp {f['amp']}, "
                   f"channels_last {f['channels_last']}): {f['epoch_time_s']:.1f} s with evaluation, "
                   f"{f['images_per_s']:.0f} img/s in training, test error {f['test_err']:.2f}%")
    if res["goals"]:
        out.append("\nGoals: " + "; ".join(f"{k} {v:.2f}" for k, v in res["goals"].items()))
    for title, items in (("Skipped", res["skipped"]), ("Failed", [f"{k}: {v}" for k, v in res["errors"].items()])):
        if items:
            out.append(f"\n{title}:\n" + "\n".join(f"- {s}" for s in items))
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------- command line

def _log(msg: str) -> None:
    print(msg, flush=True)  # a piped log is block-buffered: a killed run would lose its last lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--quick", action="store_true", help="smoke run: 8x8 images, batch 2 only, 1 round, 4-image "
                                                        "epochs, 64 Fashion-MNIST images, no torch.compile")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall-clock budget in seconds "
                   "(default 300); steps that would not fit are skipped and listed")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join("runs", "gpu-benchmark"),
                   help="folder for gpu.json, gpu.md and cuda-tests.log (default: $OUT if set, else runs/gpu-benchmark)")
    p.add_argument("--write-docs", metavar="MD", help="also replace the bench:gpu section of this markdown file")
    p.add_argument("--from-json", metavar="GPU_JSON", help="measure nothing: print the tables of this gpu.json "
                   "(with --write-docs: put them in the docs)")
    p.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files (default: the standard places)")
    p.add_argument("--reps", type=int, help="interleaved timing rounds (default 10; --quick 1)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the cuda tests")
    p.add_argument("--compile", action="store_true", help="also time torch.compile, last (minutes of compiling)")
    p.add_argument("--simulate-failures", action="store_true",
                   help="dry run of the failure handling (implies --quick): a configuration that runs out of "
                        "memory, a step that hangs past its time limit, a failing test")
    p.add_argument("--step", help=argparse.SUPPRESS)  # the child process of one step
    p.add_argument("--step-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.quick = args.quick or args.simulate_failures
    args.command = "python -m benchmarks.gpu " + " ".join(shlex.quote(a) for a in args.argv)
    return args


def check_args(args) -> str | None:
    """One line naming the flag and what is allowed, or None."""
    if args.from_json:
        return None if os.path.isfile(args.from_json) else f"--from-json {args.from_json}: no such file"
    try:
        dev = torch.device(args.device)
    except (RuntimeError, ValueError):
        return f"--device {args.device}: not a device; use cuda, cuda:N or cpu"
    if dev.type not in ("cuda", "cpu"):
        return f"--device {args.device}: use cuda, cuda:N or cpu"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return f"--device {args.device}: CUDA is not available on this machine (the smoke run: --device cpu --quick)"
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    if args.budget_s < 0:
        return f"--budget-s {args.budget_s:g}: must be 0 or more seconds"
    if args.reps is not None and args.reps < 1:
        return f"--reps {args.reps}: must be at least 1"
    if args.data_dir and not os.path.isdir(args.data_dir):
        return f"--data-dir {args.data_dir}: not a folder (it should hold the Fashion-MNIST IDX files)"
    return None


def from_json(args) -> int:
    try:
        with open(args.from_json) as f:
            text = markdown(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"benchmarks.gpu: --from-json {args.from_json}: not a gpu.json this can read ({core.error_line(e)})",
              file=sys.stderr)
        return 2
    if args.write_docs:
        core.update_markdown_section(args.write_docs, "bench:gpu", text)
    print(text)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"benchmarks.gpu: {problem}", file=sys.stderr)
        return 2
    if args.from_json:
        return from_json(args)
    if torch.device(args.device).index is not None:
        torch.cuda.set_device(torch.device(args.device))
    if args.step:
        return run_step(args)
    res = run(args, _log)
    text = markdown(res)
    if args.write_docs:
        core.update_markdown_section(args.write_docs, "bench:gpu", text)
    print(text)
    _log(f"[gpu] wrote {os.path.join(args.out, 'gpu.json')} and gpu.md in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
