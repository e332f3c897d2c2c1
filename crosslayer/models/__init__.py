"""The model zoo: one file per architecture family, each registering its models when imported here."""

from crosslayer.models import delugenet, densenet, fractalnet, resnet, wide_resnet  # noqa: F401  (they register)
from crosslayer.models._factory import create_model
from crosslayer.models._registry import list_models, model_info, register_model

__all__ = ["create_model", "list_models", "model_info", "register_model"]
