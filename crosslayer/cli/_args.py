"""Argument types shared by the verbs: a value argparse refuses is one line naming the flag and
what is allowed (``crosslayer eval: error: argument --batch-size: must be an integer from 1 to
2147483647, got 0``), exit status 2."""

from __future__ import annotations

import argparse
import re

INT_MAX = 2**31 - 1  # a count above this is a typo, not a request
SEED_MAX = 2**32 - 1  # --seed: NumPy's and CUDA's generators take 32-bit seeds
MAX_IMAGE_SIZE = 4096  # --image-size: larger images would not fit any batch in memory
DEVICES = "auto, cpu, cuda, cuda:N or mps"


def count(minimum: int = 1, maximum: int = INT_MAX):
    """An argparse ``type`` for an integer in [minimum, maximum]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer from {minimum} to {maximum}, got {text!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be an integer from {minimum} to {maximum}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def device(text: str) -> str:
    """An argparse ``type`` for ``--device``: auto, cpu, cuda, cuda:N or mps (availability is checked
    when the device is picked)."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use {DEVICES}")
    return text


def add_device(parser, help_text: str = "where to run (default auto: cuda:LOCAL_RANK if available, else cpu)"):
    parser.add_argument("--device", default="auto", type=device, metavar="DEVICE", help=f"{help_text}; {DEVICES}")
