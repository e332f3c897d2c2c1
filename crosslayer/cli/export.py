"""``crosslayer export``: a checkpoint as ONNX, safetensors, TorchScript or a torch.export program.

    crosslayer export runs/demo/best.pt --format onnx [--out model.onnx]

Each output is loaded back and checked against the eager model on random input before it is
renamed into place (ONNX through onnxruntime); a failed check writes nothing.
"""

from __future__ import annotations

from crosslayer.export import FORMATS


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint written by `crosslayer train`")
    parser.add_argument("--format", required=True, metavar="FORMAT",
                        help=f"one of: {', '.join(FORMATS)}")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="output file (default: the checkpoint's name with the format's suffix: "
                             + ", ".join(FORMATS.values()) + ")")


def main(args) -> int:
    from crosslayer.export import export_checkpoint

    r = export_checkpoint(args.checkpoint, args.format, args.out)
    print(f"wrote {r['path']} ({r['format']}, {r['bytes'] / 1e6:.2f} MB; max |export - eager| = "
          f"{r['max_abs_diff']:.2g} on random input)")
    if r["note"]:
        print(f"note: {r['note']}")
    return 0
