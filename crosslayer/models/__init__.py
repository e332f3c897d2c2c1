"""The model zoo: one file per architecture family, all reachable through the registry."""

from crosslayer.models._registry import create_model, list_models, model_info, register_model

__all__ = ["create_model", "list_models", "model_info", "register_model"]
