"""DenseNet-BC-100 (k=12, CIFAR 32x32) against torchvision's DenseNet code built to the identical
architecture: training / inference images per second and peak memory, in one run, side by side.

    python -m benchmarks.densenet [--quick] [--device cuda --amp bf16 --channels-last --compile]
    python -m benchmarks.densenet --batch-sizes 16,64,128,256 --with-compile --sgd-step

``--batch-sizes`` adds a sweep (torchvision, torchvision compiled, ours; no memory runs) after the
main run at ``--batch-size``; ``--with-compile`` adds ``torch.compile(torchvision DenseNet)``
(inductor, default mode, same precision and layout options), timed in steady state, its first
steps (the compilation) reported beside ours.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

import crosslayer
from benchmarks import core
from crosslayer.counting import count_macs

MODEL = "densenet_bc100_k12"
PARAMS = 769_162  # DenseNet-BC (L=100, k=12), 10 classes: docs/architecture.md


def torchvision_densenet_bc100(num_classes: int = 10, memory_efficient: bool = False) -> nn.Module:
    """torchvision's DenseNet class with our CIFAR DenseNet-BC-100 geometry: growth 12, blocks
    (16, 16, 16), 24 initial features, bottleneck 4k, compression 0.5 (torchvision's transitions
    always halve), and its ImageNet stem (7x7/2 conv, BN, ReLU, max-pool) replaced by one 3x3
    conv with 24 outputs. Same parameter count as ours (769,162 at 10 classes)."""
    from torchvision.models.densenet import DenseNet

    m = DenseNet(growth_rate=12, block_config=(16, 16, 16), num_init_features=24, bn_size=4, drop_rate=0,
                 num_classes=num_classes, memory_efficient=memory_efficient)
    m.features.conv0 = nn.Conv2d(3, 24, 3, padding=1, bias=False)
    del m.features.norm0, m.features.relu0, m.features.pool0
    nn.init.kaiming_normal_(m.features.conv0.weight)
    return m


def _ours(memory_efficient: bool = False, fused: bool = True, cpu_channels_last: bool = True):
    def build(num_classes):
        m = crosslayer.create_model(MODEL, num_classes=num_classes, memory_efficient=memory_efficient, fused=fused)
        m.cpu_channels_last = cpu_channels_last
        return m
    return build


class _ChannelsLast(nn.Module):
    """Runs a model with its weights and input in channels_last (what our DenseNet does on CPU)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x):
        return self.model(x.contiguous(memory_format=torch.channels_last))


SWEEP = ("torchvision", "torchvision_compiled", "ours", "ours_ops")  # the configurations of the batch-size sweep


def configs() -> dict[str, core.Config]:
    """Every configuration; ``torchvision_compiled`` runs only with ``--with-compile``."""
    compiled = {"torchvision_compiled": core.Config(
        "torchvision_compiled", "torch.compile(torchvision DenseNet) (inductor, default mode)",
        lambda n: torchvision_densenet_bc100(n, False), compile=True)}
    return compiled | {
        "torchvision": core.Config("torchvision", "torchvision DenseNet (memory_efficient=False, its default)",
                                   lambda n: torchvision_densenet_bc100(n, False)),
        "torchvision_me": core.Config("torchvision_me", "torchvision DenseNet (memory_efficient=True)",
                                      lambda n: torchvision_densenet_bc100(n, True)),
        "torchvision_cl": core.Config("torchvision_cl", "torchvision DenseNet, model in channels_last",
                                      lambda n: _ChannelsLast(torchvision_densenet_bc100(n, False))),
        "ours": core.Config("ours", "crosslayer densenet_bc100_k12 (defaults: fused blocks, channels_last on CPU)",
                            _ours()),
        "ours_ops": core.Config("ours_ops", "crosslayer densenet_bc100_k12, PyTorch operators only (no compiled "
                                "CPU kernels: CROSSLAYER_CPU_KERNELS=0)", lambda n: core.WithoutKernels(_ours()(n))),
        "ours_me": core.Config("ours_me", "crosslayer densenet_bc100_k12 (memory_efficient=True)", _ours(True)),
        "ours_plain": core.Config("ours_plain", "crosslayer, plain per-layer modules (fused=False)",
                                  _ours(False, False)),
        "ours_plain_me": core.Config("ours_plain_me", "crosslayer, plain modules + memory_efficient "
                                     "(checkpointed cat-BN-ReLU-conv1)",
                                     _ours(True, False)),
        "ours_nocl": core.Config("ours_nocl", "crosslayer fused blocks, stem and transitions in NCHW "
                                 "(cpu_channels_last=False)",
                                 _ours(False, True, False)),
    }


def summarize(res: dict) -> tuple[str, dict]:
    r = lambda a, b, k: core.ratio(res, a, b, k)  # noqa: E731
    goals = {
        "train_speedup_vs_torchvision": r("ours", "torchvision", "train_img_s"),
        "infer_speedup_vs_torchvision": r("ours", "torchvision", "infer_img_s"),
        "train_speedup_vs_torchvision_cl": r("ours", "torchvision_cl", "train_img_s"),
        "fused_gain": r("ours", "ours_plain", "train_img_s"),
        "channels_last_gain": r("ours", "ours_nocl", "train_img_s"),
        "me_slowdown_vs_fast": 1 - r("ours_me", "ours", "train_img_s"),
        "plain_me_slowdown_vs_fast": 1 - r("ours_plain_me", "ours", "train_img_s"),
        "torchvision_me_slowdown": 1 - r("torchvision_me", "torchvision", "train_img_s"),
    }
    if "peak_mb" in res["configs"]["ours"]:
        goals["me_peak_vs_torchvision_naive"] = r("ours_me", "torchvision", "peak_mb")
        goals["fast_peak_vs_torchvision_naive"] = r("ours", "torchvision", "peak_mb")
        goals["torchvision_me_peak_vs_naive"] = r("torchvision_me", "torchvision", "peak_mb")
        goals["me_saved_vs_torchvision_naive"] = r("ours_me", "torchvision", "saved_mb")
        goals["plain_me_peak_vs_torchvision_naive"] = r("ours_plain_me", "torchvision", "peak_mb")
    lines = [f"- training throughput, ours / torchvision (defaults): **{goals['train_speedup_vs_torchvision']:.2f}×** "
             f"(goal ≥ 1.3×); inference {goals['infer_speedup_vs_torchvision']:.2f}×; ours / torchvision in "
             f"channels_last {goals['train_speedup_vs_torchvision_cl']:.2f}×; fused blocks alone (ours / ours "
             f"fused=False) {goals['fused_gain']:.2f}×; channels_last stem and transitions (ours / ours NCHW) "
             f"{goals['channels_last_gain']:.2f}×",
             f"- memory-efficient slowdown vs our fast mode: **{goals['me_slowdown_vs_fast'] * 100:.0f}%** "
             "(goal ≤ 25%); "
             f"torchvision's memory_efficient costs it {goals['torchvision_me_slowdown'] * 100:.0f}%; our plain "
             f"checkpointed form is {goals['plain_me_slowdown_vs_fast'] * 100:.0f}% slower than our fast mode"]
    if "me_peak_vs_torchvision_naive" in goals:
        lines.append(f"- peak step memory, ours memory-efficient / torchvision naive: "
                     f"**{goals['me_peak_vs_torchvision_naive'] * 100:.0f}%** (goal ≤ 40%); saved-for-backward bytes "
                     f"{goals['me_saved_vs_torchvision_naive'] * 100:.0f}%; ours fast "
                     f"{goals['fast_peak_vs_torchvision_naive'] * 100:.0f}%; our plain checkpointed form "
                     f"{goals['plain_me_peak_vs_torchvision_naive'] * 100:.0f}%; torchvision memory_efficient "
                     f"{goals['torchvision_me_peak_vs_naive'] * 100:.0f}%")
    return "\n".join(lines), goals


def executed_macs(num_classes: int = 10) -> int:
    """Multiply-adds per image our default (fused) inference forward executes, counted by PyTorch's
    FlopCounterMode: fewer than the architecture's (count_macs) because fused blocks average-pool
    before the transition's 1x1 convolution."""
    from unittest import mock

    from torch.utils.flop_counter import FlopCounterMode

    model = crosslayer.create_model(MODEL, num_classes=num_classes).eval()
    # FlopCounterMode tracks modules with global hooks, which make the model take its plain path
    # (hooks must fire); count the fused path the benchmark times instead
    with (mock.patch("crosslayer.models.densenet.has_hooks", lambda root: False),
          FlopCounterMode(display=False) as counter, torch.no_grad()):
        model(torch.zeros(1, 3, 32, 32))
    return counter.get_total_flops() // 2


def _selected(opts: core.Options, names=None) -> dict[str, core.Config]:
    cfgs = {k: c for k, c in configs().items() if names is None or k in names}
    if not opts.extra.get("with_compile"):
        cfgs.pop("torchvision_compiled", None)
    return cfgs


def run(opts: core.Options, log=print) -> dict:
    cfgs = _selected(opts)
    macs = count_macs(MODEL, opts.num_classes)  # per image, conv + linear, the paper's architecture
    fused = executed_macs(opts.num_classes)
    flops = {k: 2 * (fused if k in ("ours", "ours_ops", "ours_me", "ours_nocl") else macs) for k in cfgs}
    res = {"macs": dict(architecture=macs, fused=fused), "sweep": {}}
    if not opts.extra.get("sweep_only"):
        res |= core.run_suite("densenet", cfgs, opts, flops, log=log)
        for k, c in res["configs"].items():
            if c["params"] != PARAMS and opts.num_classes == 10:
                raise AssertionError(f"{k} has {c['params']:,} parameters, expected {PARAMS:,}")
        res["summary"], res["goals"] = summarize(res)
    for b in opts.extra.get("batch_sizes") or []:
        torch._dynamo.reset()  # a fresh compilation per batch size, not a dynamic-shape one
        sweep_opts = core.Options(**{**opts.__dict__, "batch_size": b, "memory": False})
        sub = _selected(opts, SWEEP)
        r = core.run_suite("densenet", sub, sweep_opts, {k: flops[k] for k in sub}, log=log)
        for key in ("machine", "options", "matmul_flops_per_s"):
            res.setdefault(key, r[key])
        res["sweep"][b] = {k: {key: c[key] for key in ("train_img_s", "infer_img_s", "train_spread", "infer_spread",
                                                       "first_train_s", "first_infer_s", "train_flop_frac")}
                           for k, c in r["configs"].items()}
    return res


def sweep_markdown(res: dict) -> str:
    """The batch-size sweep as a table: ours / torchvision (and / its compiled form), +- the spread."""
    rows = ["| batch | ours train img/s | ours / torchvision, train | inference | ours / torch.compile(torchvision), "
            "train | inference | compile time (first train + first inference step) | ours FLOP/s ÷ matmul |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b, c in res["sweep"].items():
        ours, tv, comp = c["ours"], c["torchvision"], c.get("torchvision_compiled")

        def rel(a, base, key):
            spread = a[key.replace("img_s", "spread")] + base[key.replace("img_s", "spread")]
            return f"{a[key] / base[key]:.2f}× ±{spread * a[key] / base[key]:.2f}"

        comp_cols = (f"{rel(ours, comp, 'train_img_s')} | {rel(ours, comp, 'infer_img_s')} | "
                     f"{comp['first_train_s']:.0f} s + {comp['first_infer_s']:.0f} s (ours: first step "
                     f"{ours['first_train_s']:.1f} s)") if comp else "- | - | -"
        rows.append(f"| {b} | {ours['train_img_s']:.1f} | {rel(ours, tv, 'train_img_s')} | "
                    f"{rel(ours, tv, 'infer_img_s')} | {comp_cols} | {ours['train_flop_frac'] * 100:.1f}% |")
    return "\n".join(rows)


def extra_arguments(p) -> None:
    p.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="also sweep these batch sizes, e.g. 16,64,128,256 (torchvision, compiled, ours; no memory)")
    p.add_argument("--sweep-only", action="store_true", help="only the sweep, not the table at --batch-size")
    p.add_argument("--with-compile", action="store_true",
                   help="add torch.compile(torchvision DenseNet) (inductor); its compile time is reported")


def markdown(res: dict, command: str) -> str:
    m = res["macs"]
    note = (f"FLOP/s use the multiply-adds each configuration executes: {m['architecture'] / 1e6:.1f} M per image "
            f"for the architecture (PyTorch's FlopCounterMode), {m['fused'] / 1e6:.1f} M "
            f"({(1 - m['fused'] / m['architecture']) * 100:.1f}% fewer) for fused blocks, which average-pool before "
            f"the transition's 1x1 convolution (same function).")
    parts = [core.report_header(res, command)]
    if "configs" in res:
        parts += [core.format_results(res, "torchvision"), res["summary"], note]
    if res.get("sweep"):
        parts.append("Batch-size sweep (one process per command, configurations interleaved; ratios ± the sum of "
                     "the two configurations' relative half-ranges over the rounds):\n\n" + sweep_markdown(res))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    return core.benchmark_main("densenet", __doc__, run, markdown, argv, extra_arguments)


if __name__ == "__main__":
    sys.exit(main())
