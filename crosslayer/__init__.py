"""crosslayer: DenseNets, DelugeNets and the baselines they are measured against, in PyTorch.

The top-level names are loaded on first use (PEP 562), so ``import crosslayer`` does not import
torch: the command line can then catch Ctrl-C while torch is still being imported.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "model_info", "register_model", "__version__"]

_REGISTRY_NAMES = ("create_model", "list_models", "model_info", "register_model")


def __getattr__(name: str):
    if name in _REGISTRY_NAMES:
        return getattr(importlib.import_module("crosslayer.models"), name)
    try:
        return importlib.import_module(f"crosslayer.{name}")  # crosslayer.models, crosslayer.data, ...
    except ModuleNotFoundError:
        raise AttributeError(f"module 'crosslayer' has no attribute {name!r}") from None


def __dir__():
    return sorted(list(globals()) + list(_REGISTRY_NAMES))
