"""Argument types shared by the verbs: a value argparse refuses is one line naming the flag and
what is allowed (``crosslayer eval: error: argument --batch-size: must be an integer from 1 to
2147483647, got 0``), exit status 2. Also the flags of the training settings, generated from the
TrainConfig fields' declarations (:func:`add_config_arguments`), and the values given with them
(:func:`config_values`)."""

from __future__ import annotations

import argparse
import ast
import re

from crosslayer.train import config as schema

INT_MAX = 2**31 - 1  # a count above this is a typo, not a request
SEED_MAX = schema.SEED_MAX  # --seed: NumPy's and CUDA's generators take 32-bit seeds
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


def floats(text: str) -> list[float]:
    """An argparse ``type`` for comma-separated numbers (``0.5,0.75``)."""
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def key_value(text: str):
    """An argparse ``type`` for ``KEY=VALUE``; VALUE is a Python literal where it parses as one."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        v = ast.literal_eval(v)
    except (ValueError, SyntaxError):
        pass
    return k.strip(), v


# ----------------------------------------------------------------------------------------------
# the flags of the TrainConfig fields, generated from their declarations (crosslayer.train.config.setting)
# ----------------------------------------------------------------------------------------------

def _parse_kwargs(name: str) -> dict:
    """How argparse reads field ``name``: its action, type or choices, from its type and declaration."""
    m, kind = schema.meta(name), schema.value_type(name)
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction} if m["negatable"] else \
            {"action": "store_const", "const": m["flag_value"]}
    if kind == (bool, str):  # the flag alone means True
        return {"nargs": "?", "const": True}
    if kind is dict:
        return {"action": "append", "type": key_value}
    if kind is list:
        return {"type": floats}
    if m["choices"]:
        return {"choices": m["choices"]}
    lo, hi, lo_in, hi_in = m["range"]
    if kind is int and lo is not None and hi is not None and lo_in and hi_in:
        return {"type": count(lo, hi)}  # both bounds: argparse names them (``must be an integer from 0 to N``)
    return {"type": kind}


def add_config_arguments(parser, names=None, helps=None, grouped: bool = True) -> dict:
    """Add the flags of TrainConfig fields ``names`` (default: all that have one) to ``parser``, each as
    its field declares it; ``helps`` replaces a field's help text (a verb with its own defaults).
    Every flag defaults to None, so a flag left out keeps the preset's (or the saved run's) value.
    With ``grouped``, each goes into its field's help group; returns the groups by title."""
    names = names or schema.CLI_FIELDS
    used = {schema.meta(n)["group"] for n in names} if grouped else ()
    groups = {title: parser.add_argument_group(title) for title in schema.GROUPS if title in used}
    for name in names:
        m = schema.meta(name)
        text = (helps or {}).get(name, m["help"])
        kwargs = _parse_kwargs(name) | ({"metavar": m["metavar"]} if m["metavar"] else {})
        (groups[m["group"]] if grouped else parser).add_argument(
            schema.flag(name), dest=name, default=None, help=text.replace("%", "%%") or None, **kwargs)
    return groups


def config_values(args, names=None) -> dict:
    """The TrainConfig fields given on the command line (a flag left out is None and not included)."""
    given = {n: getattr(args, n) for n in names or schema.CLI_FIELDS if getattr(args, n, None) is not None}
    if "model_kwargs" in given:  # --model-arg KEY=VALUE, repeated
        given["model_kwargs"] = dict(given["model_kwargs"])
    return given
