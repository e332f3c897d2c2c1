"""Optional timm integration: register crosslayer's models in timm's model registry, so that
``timm.create_model`` and timm's scripts (``train.py``, ``validate.py``) build them.

    import crosslayer.timm_compat as tc
    tc.register_with_timm()                                 # once; needs `pip install timm`
    model = timm.create_model("crosslayer_densenet_bc100_k12", num_classes=100)

    python -m crosslayer.timm_compat path/to/timm/train.py --model crosslayer_densenet_bc40_k12 ...

Every model is registered as ``crosslayer_<name>`` (timm has its own ``densenet121``); its entry
point is :func:`crosslayer.models.create_model`, which takes timm's keywords. The models themselves
never import timm.
"""

from __future__ import annotations

import runpy
import sys

from crosslayer.models import create_model, list_models

PREFIX = "crosslayer_"


def _entrypoint(name: str):
    def entry(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kwargs):
        if hasattr(pretrained_cfg, "to_dict"):  # timm's PretrainedCfg
            pretrained_cfg = pretrained_cfg.to_dict()
        return create_model(name, pretrained=pretrained, pretrained_cfg=pretrained_cfg,
                            pretrained_cfg_overlay=pretrained_cfg_overlay, **kwargs)

    entry.__name__ = entry.__qualname__ = PREFIX + name
    entry.__module__ = __name__
    entry.__doc__ = f"crosslayer's {name} (crosslayer.models.create_model)."
    return entry


def register_with_timm() -> list[str]:
    """Register every crosslayer model in timm's registry (again: no change); returns the timm names."""
    from timm.models import is_model, register_model

    names = []
    for name in list_models():
        timm_name = PREFIX + name
        if not is_model(timm_name):
            register_model(_entrypoint(name))
        names.append(timm_name)
    return names


def main(argv: list[str] | None = None) -> None:
    """``python -m crosslayer.timm_compat SCRIPT [ARGS...]``: run a timm script (``train.py``,
    ``validate.py``, ...) as ``__main__`` with crosslayer's models registered."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    register_with_timm()
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
