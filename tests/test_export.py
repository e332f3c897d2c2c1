"""Deployment: the cross-layer models export with torch.export (TorchScript is deprecated)."""

import pytest
import torch

import crosslayer


@pytest.mark.parametrize("name,kw", [("densenet_bc40_k12", {"growth_rate": 4}), ("delugenet20", {})])
def test_torch_export_matches_eager(name, kw):
    torch.manual_seed(0)
    model = crosslayer.create_model(name, **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), model(x), atol=1e-5)
