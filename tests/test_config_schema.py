"""The TrainConfig fields and the flags of ``crosslayer train``, generated from the fields' declarations.

Every field has a flag (or says why not), the flag's value reaches the config unchanged, and a
value outside a field's declared range or choices is refused in one line naming the flag, exit 2,
both on the command line and from Python. The values are derived from the declarations, so a new
field with a flag is covered without touching this file; the bounds themselves are pinned by
``tests/test_train_inputs.py`` (``BAD_TRAIN``).
"""

from __future__ import annotations

import json
import re

import pytest

from crosslayer.cli import main as cli
from crosslayer.train.config import CLI_FIELDS, FIELDS, OFF_CLI, ConfigError, TrainConfig, flag, meta, value_type
from tests.helpers import assert_one_line_error

BASE = {"model": "resnet20", "data": "synthetic"}
# the fields deliberately without a flag (their reasons are in crosslayer/train/config.py)
EXPECTED_OFF_CLI = {"drop_rate_no_aug", "val_split", "command", "resume_commands"}
# values whose form the type does not tell: (the value, other fields it needs)
SPECIAL = {
    "model": ("densenet_bc40_k12", {}),
    "data": ("fashion-mnist", {}),
    "data_dir": ("/nonexistent/data", {}),
    "device": ("cpu", {}),
    "model_kwargs": ({"growth_rate": 4}, {}),
    "milestones": ([0.3, 0.6], {}),
    "pretrained": ("weights.pt", {}),
    "init_from": ("runs/earlier", {}),
    "ten_crop": (True, {"data": "imagenet:/nonexistent/imagenet"}),  # ImageNet only
    "freeze_epochs": (2, {"init_from": "runs/earlier"}),  # freezes starting weights only
}


def _argv(name: str, value) -> list[str]:
    """The command-line words that set field ``name`` to ``value``."""
    m, f = meta(name), flag(name)
    if value_type(name) is bool:
        if m["negatable"]:
            return [f if value else "--no-" + f[2:]]
        assert value == m["flag_value"], name
        return [f]
    if isinstance(value, dict):
        return [w for k, v in value.items() for w in (f, f"{k}={v!r}")]
    if isinstance(value, list):
        return [f, ",".join(str(v) for v in value)]
    return [f, str(value)]


def _number_inside(name: str, default):
    lo, hi, _, _ = meta(name)["range"]
    kind = value_type(name)
    if kind is int:
        value = (lo if lo is not None else 0) + 1
        return value + 1 if value == default else value
    value = (lo + hi) / 2 if hi is not None else (lo or 0) + 0.5
    return value + 0.25 if value == default else value


def _other_value(name: str, default):
    """A valid value of field ``name`` that is not ``default`` (the value without the flag)."""
    if name in SPECIAL:
        return SPECIAL[name][0]
    m, kind = meta(name), value_type(name)
    if kind is bool:
        return (not default) if m["negatable"] else m["flag_value"]
    if m["choices"]:
        return next(c for c in m["choices"] if c != default)
    if kind in (int, float):
        return _number_inside(name, default)
    return "some-text"


def _print_config(capsys, settings: dict) -> dict:
    argv = [w for name, value in settings.items() for w in _argv(name, value)]
    rc = cli(["train", *argv, "--print-config"])
    out, err = capsys.readouterr()
    assert rc == 0, (argv, err)
    return json.loads(out)


def test_every_field_has_a_flag_or_a_reason(capsys):
    assert cli(["train", "--help"]) == 0
    text = capsys.readouterr().out
    missing = [name for name in CLI_FIELDS if not re.search(rf"(?<![\w-]){re.escape(flag(name))}(?![\w-])", text)]
    assert not missing, f"fields without a flag in `crosslayer train --help`: {missing}"
    braced = {name: "{" + ",".join(meta(name)["choices"]) + "}" for name in CLI_FIELDS if meta(name)["choices"]}
    unlisted = [name for name, choices in braced.items() if choices not in text]
    assert not unlisted, f"flags whose --help does not list their choices: {unlisted}"
    assert set(CLI_FIELDS) | set(OFF_CLI) == set(FIELDS)
    assert set(OFF_CLI) == EXPECTED_OFF_CLI, "a field left off the command line: say why in its off_cli"
    assert all(len(why.split()) >= 3 for why in OFF_CLI.values()), OFF_CLI


@pytest.mark.parametrize("name", CLI_FIELDS)
def test_flag_value_reaches_the_config(capsys, name):
    """A non-default value on the command line is the config's value of that field."""
    context = {**BASE, **(SPECIAL.get(name, (None, {}))[1])}
    default = TrainConfig(**context).to_dict()[name]
    value = _other_value(name, default)
    assert value != default, (name, value)
    got = _print_config(capsys, {**context, name: value})[name]
    assert got == value, (name, value, got)


def _outside(name: str) -> list:
    """Values just outside field ``name``'s declared range, or not among its choices."""
    m, kind = meta(name), value_type(name)
    if m["choices"]:
        return ["no-such-choice"]
    if kind not in (int, float):
        return []
    lo, hi, lo_in, hi_in = m["range"]
    step = 1 if kind is int else 0.5
    return ([lo - step if lo_in else lo] if lo is not None else []) + ([hi + step if hi_in else hi]
                                                                       if hi is not None else [])


BAD = [(name, value) for name in FIELDS for value in _outside(name)]


def _needles(name: str) -> list[str]:
    """What the refusal must name: the flag and what is allowed (the bounds or a choice)."""
    m = meta(name)
    if m["choices"]:
        return [flag(name), m["choices"][-1]]
    return [flag(name), *(str(b) if isinstance(b, int) else f"{b:g}" for b in m["range"][:2] if b is not None)]


def test_every_declared_range_is_tested():
    ranged = {n for n in FIELDS if meta(n)["choices"] or any(b is not None for b in meta(n)["range"][:2])}
    assert ranged and ranged == {name for name, _ in BAD}


@pytest.mark.parametrize("name, value", [b for b in BAD if b[0] in CLI_FIELDS], ids=[f"{n}={v}" for n, v in BAD
                                                                                   if n in CLI_FIELDS])
def test_value_outside_its_range_is_one_line_naming_the_flag(capsys, name, value):
    context = {**BASE, **(SPECIAL.get(name, (None, {}))[1])}
    argv = [w for n, v in context.items() for w in _argv(n, v)]
    rc = cli(["train", *argv, flag(name), str(value), "--print-config"])
    out, err = capsys.readouterr()
    assert_one_line_error(rc, err, *_needles(name), out=out)


@pytest.mark.parametrize("name, value", BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_python_refuses_the_same_values(name, value):
    context = {**BASE, **(SPECIAL.get(name, (None, {}))[1])}
    with pytest.raises(ConfigError) as e:
        TrainConfig(**context, **{name: value})
    line = str(e.value)
    assert "\n" not in line and flag(name) in line, line
