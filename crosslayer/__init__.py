"""crosslayer: DenseNets, DelugeNets and the baselines they are measured against, in PyTorch."""

from crosslayer.models._registry import create_model, list_models, model_info, register_model

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "model_info", "register_model", "__version__"]
