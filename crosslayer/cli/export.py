"""``crosslayer export``: a checkpoint as ONNX, safetensors, TorchScript or a torch.export program.

    crosslayer export runs/demo/best.pt --format onnx [--out model.onnx] [--force]
    crosslayer export runs/demo --format safetensors       # a run directory: its best.pt (else last.pt)

Each output is loaded back and checked against the eager model on random input before it is
renamed into place (ONNX through onnxruntime); a failed check writes nothing. An existing output
file is replaced only with ``--force``, and the checkpoint being exported never.
"""

from __future__ import annotations

from crosslayer.export import FORMATS


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint written by `crosslayer train` "
                                                                 "(best.pt, last.pt) or its run directory (uses "
                                                                 "best.pt, else last.pt)")
    parser.add_argument("--format", required=True, metavar="FORMAT",
                        help=f"one of: {', '.join(FORMATS)}")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="output file (default: the checkpoint's name with the format's suffix: "
                             + ", ".join(FORMATS.values()) + ")")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists (never the checkpoint "
                                                             "being exported)")


def main(args) -> int:
    from crosslayer.export import export_checkpoint

    r = export_checkpoint(args.checkpoint, args.format, args.out, force=args.force)
    print(f"wrote {r['path']} ({r['format']}, {r['bytes'] / 1e6:.2f} MB; max |export - eager| = "
          f"{r['max_abs_diff']:.2g} on random input)")
    if r["note"]:
        print(f"note: {r['note']}")
    return 0
