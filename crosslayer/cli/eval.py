"""``crosslayer eval``: error %, per-class accuracy and the confusion matrix of a checkpoint.

    crosslayer eval --checkpoint runs/demo/best.pt --data fashion-mnist [--out DIR]

Writes ``eval.json`` and ``confusion.csv`` (rows = true class, columns = predicted class) into
``--out`` (default: the checkpoint's folder).
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by `crosslayer train` (best.pt, last.pt)")
    parser.add_argument("--data", default=None, help="data set (default: the one the checkpoint was trained on)")
    parser.add_argument("--data-dir", default=None, help="folder with the data set files")
    parser.add_argument("--download", action="store_true", help="download missing data set files from the official "
                        "URLs (md5-checked) into --data-dir")
    parser.add_argument("--split", default="test", choices=("test", "val", "train"), help="split to evaluate")
    parser.add_argument("--val-size", type=int, default=None, help="validation split size (default: the run's)")
    parser.add_argument("--out", default=None, help="where to write eval.json and confusion.csv (default: next to "
                                                    "the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--channels-last", action="store_true")



def main(args) -> int:
    from crosslayer.train.evaluate import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, args.data, out=args.out, split=args.split, batch_size=args.batch_size,
                        device=args.device, amp=args.amp, data_dir=args.data_dir, limit=args.limit,
                        val_size=args.val_size, channels_last=args.channels_last, download=args.download)
    return 0
