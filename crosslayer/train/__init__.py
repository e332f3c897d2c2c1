"""Training: :class:`TrainConfig` (preset, then overrides, then validation) and :class:`Trainer`
(the loop, one process or many under torchrun), with atomic checkpoints and run directories.

    from crosslayer.train import TrainConfig, Trainer
    Trainer(TrainConfig(model="resnet20", data="fashion-mnist", preset="demo", epochs=1), "runs/r20").run()

Names are imported on first use (PEP 562), so importing a submodule stays cheap.
"""

from __future__ import annotations

from crosslayer._lazy import lazy_exports

_EXPORTS = {"TrainConfig": "crosslayer.train.config", "Trainer": "crosslayer.train.loop"}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
