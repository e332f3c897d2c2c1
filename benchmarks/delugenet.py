"""DelugeNet-146 (CIFAR 32x32): our shared-normalisation implementation against the straightforward
per-consumer form (every cross-layer depthwise convolution normalises each of its inputs itself, as
the official Lua module does; ``crosslayer/models/reference.py``), same weights, in one run.

    python -m benchmarks.delugenet [--quick] [--device cuda --amp bf16 --channels-last --compile]
"""

from __future__ import annotations

import os
import sys

import crosslayer
from benchmarks import core
from crosslayer.counting import count_macs

MODEL = "delugenet146"
PARAMS = 6_686_250


def reference(num_classes: int = 10):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from crosslayer.models.reference import ReferenceDelugeNet  # the per-consumer form the tests prove equal

    return ReferenceDelugeNet(crosslayer.create_model(MODEL, num_classes=num_classes))


def configs() -> dict[str, core.Config]:
    return {
        "reference": core.Config("reference", "per-consumer normalisation (crosslayer/models/reference.py)", reference,
                                 note="its parameter count includes a second copy of the CLDC weights"),
        "ours": core.Config("ours", "crosslayer delugenet146 (defaults: shared normalisation, "
                            "channels_last in training on CPU)",
                            lambda n: crosslayer.create_model(MODEL, num_classes=n)),
        "ours_ops": core.Config("ours_ops", "crosslayer delugenet146, PyTorch operators only (no compiled CPU "
                                "kernels: CROSSLAYER_CPU_KERNELS=0)",
                                lambda n: core.WithoutKernels(crosslayer.create_model(MODEL, num_classes=n))),
        "ours_me": core.Config("ours_me", "crosslayer delugenet146 (memory_efficient=True)",
                               lambda n: crosslayer.create_model(MODEL, num_classes=n, memory_efficient=True)),
        "ours_nocl": core.Config("ours_nocl", "crosslayer delugenet146 in NCHW (cpu_channels_last=False)", _nchw),
    }


def _nchw(num_classes: int):
    m = crosslayer.create_model(MODEL, num_classes=num_classes)
    m.cpu_channels_last = False
    return m


def summarize(res: dict) -> tuple[str, dict]:
    r = lambda a, b, k: core.ratio(res, a, b, k)  # noqa: E731
    goals = {"train_speedup_vs_reference": r("ours", "reference", "train_img_s"),
             "infer_speedup_vs_reference": r("ours", "reference", "infer_img_s"),
             "nchw_speedup_vs_reference": r("ours_nocl", "reference", "train_img_s"),
             "ops_speedup_vs_reference": r("ours_ops", "reference", "train_img_s"),
             "me_slowdown_vs_fast": 1 - r("ours_me", "ours", "train_img_s")}
    lines = [f"- training throughput, ours / per-consumer reference: **{goals['train_speedup_vs_reference']:.2f}×** "
             f"(target ≥ 3×); inference {goals['infer_speedup_vs_reference']:.2f}×; in the reference's own NCHW "
             f"layout ours is {goals['nchw_speedup_vs_reference']:.2f}×; on PyTorch operators only (no compiled "
             f"kernels) {goals['ops_speedup_vs_reference']:.2f}×",
             f"- memory-efficient slowdown vs our fast mode: {goals['me_slowdown_vs_fast'] * 100:.0f}%"]
    if "peak_mb" in res["configs"]["ours"]:
        goals["peak_vs_reference"] = r("ours", "reference", "peak_mb")
        goals["me_peak_vs_reference"] = r("ours_me", "reference", "peak_mb")
        goals["me_peak_vs_fast"] = r("ours_me", "ours", "peak_mb")
        lines.append(f"- peak step memory vs the reference: ours {goals['peak_vs_reference'] * 100:.0f}%, "
                     f"memory-efficient {goals['me_peak_vs_reference'] * 100:.0f}% "
                     f"({goals['me_peak_vs_fast'] * 100:.0f}% of our fast mode)")
    return "\n".join(lines), goals


def run(opts: core.Options, log=print) -> dict:
    cfgs = configs()
    macs = count_macs(MODEL, opts.num_classes)
    res = core.run_suite("delugenet", cfgs, opts, {k: 2 * macs for k in cfgs}, log=log)
    if opts.num_classes == 10 and res["configs"]["ours"]["params"] != PARAMS:
        raise AssertionError(f"delugenet146 has {res['configs']['ours']['params']:,} parameters, expected {PARAMS:,}")
    res["summary"], res["goals"] = summarize(res)
    return res


def markdown(res: dict, command: str) -> str:
    return "\n\n".join([core.report_header(res, command), core.format_results(res, "reference"), res["summary"]])


def main(argv=None) -> int:
    return core.benchmark_main("delugenet", __doc__, run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
