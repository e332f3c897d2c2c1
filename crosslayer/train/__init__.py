"""Training: :class:`TrainConfig` (preset, then overrides, then validation) and :class:`Trainer`
(the loop, one process or many under torchrun), with atomic checkpoints and run directories.

    from crosslayer.train import TrainConfig, Trainer
    Trainer(TrainConfig(model="resnet20", data="fashion-mnist", preset="demo", epochs=1), "runs/r20").run()

Names are imported on first use (PEP 562), so importing a submodule stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"TrainConfig": "crosslayer.train.config", "Trainer": "crosslayer.train.loop"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'crosslayer.train' has no attribute {name!r}")
