"""timm's own generic model tests (``tests/test_models.py`` of the installed timm release, fetched as a
test dependency by :mod:`tests.timm_sources`), run unchanged over one small model of every family with
``create_model`` / ``list_models`` pointed at crosslayer: forward, backward, pretrained_cfg and
head/pooling contract, features_only (also with grad checkpointing), forward_intermediates,
prune_intermediate_layers and head_hidden_size, FX forward and backward, reset_classifier keeping
the pooling. TorchScript is left out (timm leaves DenseNets out of it too)."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("timm")

from crosslayer.models import create_model, list_models  # noqa: E402
from tests.timm_sources import load_timm_test_module  # noqa: E402

# one small model of each family (DenseNet, DenseNet-BC, ImageNet DenseNet, DelugeNet, ResNet,
# pre-activation ResNet, Wide ResNet, stochastic depth, FractalNet)
FAMILIES = ["densenet40_k12", "densenet_bc40_k12", "densenet121", "delugenet20", "resnet20", "preact_resnet20",
            "wrn16_4", "resnet110_sd", "fractalnet20"]
RGB = [m for m in FAMILIES if m != "preact_resnet20"]  # timm's pooling test feeds 3-channel images

try:
    upstream = load_timm_test_module()
except RuntimeError as e:  # no timm sdist here and no package index to fetch it from
    pytest.skip(str(e), allow_module_level=True)


def _pretrained_cfg_value(name: str, key: str):
    with torch.device("meta"):
        return create_model(name).pretrained_cfg.get(key)


# timm's tests look these up in their module's globals at call time
upstream.create_model = create_model
upstream.list_models = list_models
upstream.get_pretrained_cfg_value = _pretrained_cfg_value
cfg_device = upstream.cfg_device  # the fixture timm's cfg test takes


def _ours(name: str, **params):
    """timm's test function ``name`` (same code, same module globals) parametrized with ``params``."""
    fn = getattr(upstream, name)
    test = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    test.__doc__ = fn.__doc__
    for arg, values in params.items():
        test = pytest.mark.parametrize(arg, values)(test)
    return test


test_model_forward = _ours("test_model_forward", model_name=FAMILIES, batch_size=[1])
test_model_backward = _ours("test_model_backward", model_name=FAMILIES, batch_size=[2])
test_model_default_cfgs = _ours("test_model_default_cfgs", model_name=FAMILIES, batch_size=[1])
test_model_forward_features = _ours("test_model_forward_features", model_name=FAMILIES, batch_size=[1])
test_model_forward_intermediates_features = _ours("test_model_forward_intermediates_features",
                                                  model_name=FAMILIES, batch_size=[1])
test_model_forward_intermediates = _ours("test_model_forward_intermediates", model_name=FAMILIES, batch_size=[1])
test_model_forward_fx = _ours("test_model_forward_fx", model_name=FAMILIES, batch_size=[1])
test_model_backward_fx = _ours("test_model_backward_fx", model_name=FAMILIES, batch_size=[2])
test_reset_classifier_keeps_pool = _ours("test_reset_classifier_keeps_pool", model_name=RGB)
test_head_hidden_size = _ours("test_head_hidden_size", model_name=RGB, model_kwargs=[{}])
test_prune_intermediate_layers_params_used = _ours("test_prune_intermediate_layers_params_used", model_name=RGB)
test_prune_intermediate_layers_contract = _ours("test_prune_intermediate_layers_contract", model_name=RGB)
test_forward_after_prune_intermediate_layers = _ours("test_forward_after_prune_intermediate_layers", model_name=RGB)
test_features_only_grad_checkpointing_backward = _ours("test_features_only_grad_checkpointing_backward",
                                                    model_name=RGB)
