"""``crosslayer predict``: the most likely classes of image files under a trained checkpoint.

    crosslayer predict runs/demo/best.pt shirt.png boot.jpg [--topk 5] [--json]
    crosslayer predict runs/demo shirt.png              # a run directory: its best.pt (else last.pt)
    crosslayer export runs/demo/best.pt --format onnx   # once: predict then runs it in ONNX Runtime

Each image goes through the run's evaluation transform (channels, size, the training mean/std);
the class names and their softmax probabilities are printed, or one JSON document with ``--json``.
"""

from __future__ import annotations

import json

from crosslayer.cli._args import add_device


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint written by `crosslayer train` "
                                                                 "(best.pt, last.pt) or its run directory (uses "
                                                                 "best.pt, else last.pt)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (anything PIL reads: PNG, JPEG, ...)")
    parser.add_argument("--topk", type=int, default=5, help="how many classes to print per image (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--runtime", choices=("auto", "torch", "onnxruntime"), default="auto",
                        help="auto (default): ONNX Runtime on the CPU when installed and the checkpoint's ONNX "
                             "export (crosslayer export CHECKPOINT --format onnx) is newer than it, else torch")
    add_device(parser, "where to run (default cpu)")
    parser.set_defaults(device="cpu")


def main(args) -> int:
    from crosslayer.predict import format_predictions, predict_images

    results = predict_images(args.checkpoint, args.images, topk=args.topk, device=args.device, runtime=args.runtime)
    print(json.dumps(results, indent=2) if args.json else format_predictions(results))
    return 0
