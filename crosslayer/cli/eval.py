"""``crosslayer eval``: error %, per-class accuracy and the confusion matrix of a checkpoint.

    crosslayer eval runs/demo                  # a run directory: its best.pt (else last.pt)
    crosslayer eval runs/demo/last.pt --data fashion-mnist [--out DIR]

Writes ``eval.json`` and ``confusion.csv`` (rows = true class, columns = predicted class) into
``--out`` (default: the checkpoint's folder). ``--checkpoint PATH`` is still accepted (deprecated).
"""

from __future__ import annotations

import argparse

from crosslayer.cli._args import MAX_IMAGE_SIZE, add_device, count
from crosslayer.errors import CrosslayerError
from crosslayer.train.config import AMP_CHOICES, TTA_CHOICES


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT",
                        help="a checkpoint written by `crosslayer train` (best.pt, last.pt) or its run directory "
                             "(uses best.pt, else last.pt)")
    parser.add_argument("--checkpoint", dest="checkpoint_flag", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help="data set (default: the one the checkpoint was trained on)")
    parser.add_argument("--data-dir", default=None, help="folder with the data set files")
    parser.add_argument("--download", action="store_true", help="download missing data set files from the official "
                        "URLs (md5-checked) into --data-dir")
    parser.add_argument("--split", default="test", choices=("test", "val", "train"), help="split to evaluate")
    parser.add_argument("--val-size", type=count(0), default=None, metavar="N",
                        help="validation split size (default: the run's)")
    parser.add_argument("--image-size", type=count(1, MAX_IMAGE_SIZE), default=None, metavar="N",
                        help=f"image folders: resize the shorter side to N and centre-crop N x N (1..{MAX_IMAGE_SIZE}; "
                             "default: the images' own size, which must be square and the same for all)")
    parser.add_argument("--out", default=None, help="where to write eval.json and confusion.csv (default: next to "
                                                    "the checkpoint)")
    parser.add_argument("--batch-size", type=count(1), default=256, metavar="N", help="images per batch (default 256)")
    parser.add_argument("--limit", type=count(1), default=None, metavar="N", help="only the first N images")
    add_device(parser)
    parser.add_argument("--amp", choices=AMP_CHOICES, default="none")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--tta", choices=TTA_CHOICES, default=None,
                        help="test-time augmentation (default: the one the run evaluated with; flip = mean logits of "
                             "each image and its mirror)")
    parser.add_argument("--ten-crop", action=argparse.BooleanOptionalAction, default=None,
                        help="imagenet:ROOT test split: fb.resnet.torch's 10-crop evaluation (centre + 4 corners of the "
                             "256-pixel image and of its mirror, logits averaged; --batch-size / 10 images per batch); "
                             "default: the run's (on for the ImageNet presets)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (also off when not a terminal)")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors (eval.json is still written)")


def main(args) -> int:
    from crosslayer.train.evaluate import evaluate_checkpoint

    if args.checkpoint and args.checkpoint_flag:
        raise CrosslayerError("give the checkpoint once: CHECKPOINT or the deprecated --checkpoint, not both")
    checkpoint = args.checkpoint or args.checkpoint_flag
    if not checkpoint:
        raise CrosslayerError("give a CHECKPOINT (a .pt file or a run directory)")
    evaluate_checkpoint(checkpoint, args.data, out=args.out, split=args.split, batch_size=args.batch_size,
                        device=args.device, amp=args.amp, data_dir=args.data_dir, limit=args.limit,
                        val_size=args.val_size, channels_last=args.channels_last, download=args.download,
                        image_size=args.image_size, quiet=args.quiet, tta=args.tta, ten_crop=args.ten_crop,
                        progress=False if (args.quiet or args.no_progress) else None)
    return 0
