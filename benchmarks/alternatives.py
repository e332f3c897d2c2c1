"""Ours against what a user would pick instead, float32 and bfloat16, training and inference.

DenseNet-BC-100 (k=12) against torchvision's DenseNet class built to the same architecture, in its
default layout, in ``channels_last`` (one line for a user) and under ``torch.compile`` (inductor,
channels_last, a static compilation per batch size: its compile time is reported); DelugeNet-146
against its per-consumer reference form (crosslayer/models/reference.py) in the same three ways.
Inference adds ONNX Runtime running our own ONNX export of the same weights, with as many threads
as PyTorch. Every configuration of a batch size, in both precisions, is timed in one process,
round-robin (``benchmarks.core.time_interleaved``); figures are medians with the half-range of the
rounds as spread. A training step is forward + backward + SGD (Nesterov momentum).

FLOP/s are the architecture's multiply-adds x 2 (x 3 for a training step: forward, and backward's
two products) per image, as a share of a 2048x2048 matmul timed in the same run and precision.

    python -m benchmarks.alternatives                                  # DenseNet-BC-100, the full table
    python -m benchmarks.alternatives --model delugenet --train-batches 64 --infer-batches 1,64
    python -m benchmarks.alternatives --quick                          # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import crosslayer
from benchmarks import core, delugenet, densenet
from crosslayer.counting import count_macs
from crosslayer.export import _write_onnx
from crosslayer.ops.defaults import cpu_bf16_native

AMP = {"fp32": None, "bf16": torch.bfloat16}


def alternatives(model: str, with_compile: bool) -> dict[str, tuple[str, callable, bool]]:
    """name -> (label, build(num_classes), compiled) of the models ours is compared with."""
    if model == "densenet":
        base, label = densenet.torchvision_densenet_bc100, "torchvision DenseNet"
    else:
        base, label = delugenet.reference, "per-consumer reference"
    alts = {"alt": (f"{label} (default layout)", base, False),
            "alt_cl": (f"{label}, channels_last", lambda n: densenet._ChannelsLast(base(n)), False)}
    if with_compile:
        alts["alt_compiled"] = (f"torch.compile({label}, channels_last)",
                                lambda n: densenet._ChannelsLast(base(n)), True)
    return alts


def ours(model: str):
    name = densenet.MODEL if model == "densenet" else delugenet.MODEL
    return name, lambda n: crosslayer.create_model(name, num_classes=n)


def matmul_rates(precisions) -> dict[str, float]:
    """FLOP/s of a 2048² torch.mm in each precision (median of 3)."""
    out = {}
    for p in precisions:
        a, b = (torch.randn(2048, 2048, dtype=AMP[p] or torch.float32) for _ in range(2))
        torch.mm(a, b)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        out[p] = 2 * 2048 ** 3 / statistics.median(times)
    return out


def _autocast(precision: str):
    dtype = AMP[precision]
    return torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()


def train_step(model: nn.Module, compiled: bool, batch: int, precision: str):
    torch.manual_seed(0)
    runner = torch.compile(model) if compiled else model
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)

    def step():
        sgd.zero_grad(set_to_none=True)
        with _autocast(precision):
            loss = F.cross_entropy(runner(x), y)
        loss.backward()
        sgd.step()

    return step


def infer_step(fn, batch: int, precision: str, calls: int):
    """``calls`` inferences of one batch (several at small batches: one would be below the timer's noise)."""
    x = torch.randn(batch, 3, 32, 32)

    def step():
        with torch.inference_mode(), _autocast(precision):
            for _ in range(calls):
                fn(x)

    return step


def ort_session(model: nn.Module, path: str):
    """ONNX Runtime on our export of ``model``'s weights, PyTorch's thread count, all graph optimisations."""
    import onnxruntime as ort

    _write_onnx(model.eval(), torch.randn(1, 3, 32, 32), path, {})
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = torch.get_num_threads(), 1
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": x.numpy()})[0]


def _stats(times: list[float], images: int) -> dict:
    med = statistics.median(times)
    return {"img_s": images / med, "ms": med * 1e3, "spread": core.spread(times)}


def time_training(model: str, batch: int, precisions, with_compile: bool, reps: int, log) -> dict:
    name, build = ours(model)
    steps, labels = {}, {}
    for p in precisions:
        steps[f"ours/{p}"], labels[f"ours/{p}"] = train_step(build(10), False, batch, p), f"crosslayer {name}"
        for k, (label, make, compiled) in alternatives(model, with_compile).items():
            steps[f"{k}/{p}"], labels[f"{k}/{p}"] = train_step(make(10), compiled, batch, p), label
    torch._dynamo.reset()  # a fresh static compilation for this batch size
    first, failed = {}, {}
    log(f"[alternatives] training, batch {batch}: {len(steps)} configurations, {reps} interleaved rounds ...")
    times = core.time_interleaved(steps, reps, 2, "cpu", first, failed)
    out = {k: _stats(t, batch) | {"label": labels[k], "first_s": first.get(k)} for k, t in times.items()}
    return out | {k: {"label": labels[k], "error": e} for k, e in failed.items()}


def time_inference(model: str, batch: int, precisions, with_compile: bool, reps: int, log) -> dict:
    name, build = ours(model)
    calls = max(1, 32 // batch)
    steps, labels, nets = {}, {}, {"ours": build(10).eval()}
    for k, (label, make, compiled) in alternatives(model, with_compile).items():
        nets[k] = make(10).eval()
        labels.update({f"{k}/{p}": label for p in precisions})
        if compiled:
            nets[k] = torch.compile(nets[k])
    labels.update({f"ours/{p}": f"crosslayer {name}" for p in precisions})
    for p in precisions:
        for k, net in nets.items():
            steps[f"{k}/{p}"] = infer_step(net, batch, p, calls)
    with tempfile.TemporaryDirectory() as tmp:
        ort = ort_session(nets["ours"], f"{tmp}/model.onnx")
        steps["ort/fp32"], labels["ort/fp32"] = infer_step(ort, batch, "fp32", calls), "ONNX Runtime, our export"
        x = torch.randn(batch, 3, 32, 32)
        with torch.inference_mode():
            ref = nets["ours"](x)
            plain = build(10).eval()
            plain.load_state_dict(nets["ours"].state_dict())
            plain.fused = False
            scale = ref.abs().max().item()  # an untrained model's logits are large: report the relative difference
            agree = {"plain": (ref - plain(x)).abs().max().item() / scale,
                     "ort": (ref - torch.from_numpy(ort(x))).abs().max().item() / scale}
        torch._dynamo.reset()
        first, failed = {}, {}
        log(f"[alternatives] inference, batch {batch} ({calls} call(s) per timing): {len(steps)} configurations ...")
        times = core.time_interleaved(steps, reps, 2, "cpu", first, failed)
    out = {k: _stats(t, batch * calls) | {"label": labels[k], "ms": statistics.median(t) / calls * 1e3,
                                          "first_s": first.get(k)} for k, t in times.items()}
    return out | {k: {"label": labels[k], "error": e} for k, e in failed.items()} | {"max_abs_diff": agree}


def run(args, log=print) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = ["fp32"] + (["bf16"] if args.bf16 == "yes" or (args.bf16 == "auto" and cpu_bf16_native()) else [])
    name = ours(args.model)[0]
    res = {"model": name, "machine": core.machine_info("cpu"), "precisions": precisions,
           "flops_per_image": 2 * count_macs(name, 10), "reps": args.reps, "train": {}, "infer": {}}
    for b in args.train_batches:
        res["train"][b] = time_training(args.model, b, precisions, b in args.compile_batches, args.reps, log)
    for b in args.infer_batches:
        res["infer"][b] = time_inference(args.model, b, precisions, b in args.compile_batches, args.reps, log)
    res["matmul_flops_per_s"] = matmul_rates(precisions)
    return res


def _ratio(a: dict, b: dict) -> str:
    return f"{a['img_s'] / b['img_s']:.2f}× ±{(a['spread'] + b['spread']) * a['img_s'] / b['img_s']:.2f}"


def _fastest(rows: dict, precision: str, exclude=("ours",)) -> str | None:
    cands = [k for k, r in rows.items() if k.endswith(f"/{precision}") and "img_s" in r
             and k.split("/")[0] not in exclude]
    return max(cands, key=lambda k: rows[k]["img_s"], default=None)


def _cell(r: dict | None, shown: str, flops: float, rate: float, note: str, width: int) -> str:
    """A table cell: '-' for a configuration not run, its error, or ``shown`` with the share of
    ``rate`` that ``flops`` per image at its images/s make."""
    if r is None:
        return "-"
    if "error" in r:
        return f"failed: {r['error'][:width]}"
    return f"{shown} ({flops * r['img_s'] / rate * 100:.0f}%{note})"


def markdown(res: dict, command: str) -> str:
    m, rates = res["machine"], res["matmul_flops_per_s"]
    lines = [f"Command: `{command}`  \nMachine: {m['cpu']}, nproc {m['nproc']}, torch {m['torch']} "
             f"({m['torch_threads']} threads), torchvision {m.get('torchvision', '-')}; date {m['date']}; "
             f"median of {res['reps']} interleaved rounds, ± the rounds' half-range (ratios: both rows' added). "
             f"Matmul rate (2048² torch.mm) in this run: "
             + ", ".join(f"{p} {rates[p] / 1e9:.0f} GFLOP/s" for p in res["precisions"]) + "."]
    flops = res["flops_per_image"]
    for p in res["precisions"]:
        lines += ["", f"Training, {p}{' (autocast)' if p != 'fp32' else ''}: images/s (share of the {p} matmul rate)",
                  "", "| batch | ours | default layout | channels_last | torch.compile | ours ÷ fastest alternative |"
                  + (" ours bf16 ÷ ours fp32 |" if p == "bf16" else ""),
                  "|---:|---:|---:|---:|---:|---:|" + ("---:|" if p == "bf16" else "")]
        for b, rows in res["train"].items():
            def cell(k, rows=rows, p=p):
                r = rows.get(f"{k}/{p}")
                comp = f", compile {r['first_s']:.0f} s" if k == "alt_compiled" and r and r.get("first_s") else ""
                return _cell(r, f"{r['img_s']:.0f}" if r and "img_s" in r else "", 3 * flops, rates[p], comp, 60)
            best = _fastest(rows, p)
            row = (f"| {b} | {cell('ours')} | {cell('alt')} | {cell('alt_cl')} | {cell('alt_compiled')} | "
                   f"{_ratio(rows[f'ours/{p}'], rows[best]) if best else '-'} |")
            if p == "bf16":
                row += f" {_ratio(rows['ours/bf16'], rows['ours/fp32'])} |"
            lines.append(row)
    lines += ["", "Inference (`torch.inference_mode()`; ONNX Runtime in float32 in both tables: its CPU provider "
              "has no bf16 convolutions): ms per batch (share of that precision's matmul rate)", "",
              "| batch | precision | ours | default layout | channels_last | torch.compile | ONNX Runtime | "
              "ours ÷ ONNX Runtime (speed) | ours ÷ fastest alternative | max difference ours vs plain / ORT, relative |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for b, rows in res["infer"].items():
        for p in res["precisions"]:
            def ms(k, p=p, rows=rows):
                r = rows.get(f"{k}/{p}")
                return _cell(r, f"{r['ms']:.2f}" if r and "ms" in r else "", flops, rates[p], "", 40)  # forward only
            ort = rows.get("ort/fp32", {})
            best = _fastest({k: v for k, v in rows.items() if isinstance(v, dict) and "label" in v}, p)
            cands = [best] if best else []
            if "img_s" in ort:
                cands.append("ort/fp32")
            fastest = max(cands, key=lambda k: rows[k]["img_s"], default=None)
            d = rows["max_abs_diff"]
            lines.append(f"| {b} | {p} | {ms('ours')} | {ms('alt')} | {ms('alt_cl')} | {ms('alt_compiled')} | "
                         f"{ms('ort', 'fp32')} | {_ratio(rows[f'ours/{p}'], ort) if 'img_s' in ort else '-'} | "
                         f"{_ratio(rows[f'ours/{p}'], rows[fastest]) if fastest else '-'} | "
                         f"{d['plain']:.1e} / {d['ort']:.1e} |")
    return "\n".join(lines)


def _batches(text: str) -> list[int]:
    if text == "none":
        return []
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated batch sizes, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated batch sizes >= 1, got {text!r}")
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["densenet", "delugenet"], default="densenet")
    p.add_argument("--train-batches", type=_batches, default=[16, 64, 128, 256])
    p.add_argument("--infer-batches", type=_batches, default=[1, 16, 64, 256])
    p.add_argument("--compile-batches", type=_batches, default=[16, 64, 128, 256],
                   help="batch sizes with a torch.compile row (each compiles anew; default all but 1; none)")
    p.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto",
                   help="bf16 rows (auto: where the CPU computes bf16 natively)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: batches 2 and 1, 2 rounds, no compile, fp32")
    p.add_argument("--json", default=None)
    p.add_argument("--write-docs", default=None, metavar="MD")
    args = p.parse_args(argv)
    if args.quick:
        args.train_batches, args.infer_batches, args.compile_batches, args.reps, args.bf16 = [2], [1], [], 2, "no"
    res = run(args)
    command = "python -m benchmarks.alternatives " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(res, command.strip())
    print(text)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    if args.write_docs:
        core.update_markdown_section(args.write_docs, f"bench:alternatives-{args.model}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
