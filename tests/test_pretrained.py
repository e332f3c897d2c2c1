"""What torchvision and timm users expect: ``pretrained=`` weights through torch.hub's
cache, ``hubconf.py``, ``num_classes=0`` features. No network: the download path is exercised with
``file://`` URLs and a pre-filled hub cache (TORCH_HOME in a temporary folder)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import urllib.error
import urllib.request
import warnings

import pytest
import torch
import torchvision

import crosslayer
from crosslayer.errors import CrosslayerError
from crosslayer.models import create_model, list_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED_121 = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1


@pytest.fixture(scope="module")
def tv_weights(tmp_path_factory):
    """A randomly initialised torchvision densenet121 (BatchNorm statistics and biases randomised
    too) saved as ``densenet121-<sha256[:8]>.pth``, the hub's naming, and its eval output."""
    torch.manual_seed(0)
    tv = torchvision.models.densenet121(weights=None).eval()
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.2, 0.2)
        tv.classifier.bias.uniform_(-1, 1)
    d = tmp_path_factory.mktemp("weights")
    raw = d / "raw.pth"
    torch.save(tv.state_dict(), raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    path = d / f"densenet121-{digest[:8]}.pth"
    raw.rename(path)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tv(x)
    return path, x, want


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def _out(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_pretrained_file_url_is_read_in_place_and_matches_torchvision(tv_weights, torch_home):
    """A ``file://`` URL is a local file: loaded where it is, never copied into the hub cache, and its
    name is the user's (``my-weights-abc.pth`` is not a hash prefix that must match)."""
    path, x, want = tv_weights
    model = create_model("densenet121", pretrained=path.as_uri())
    assert torch.allclose(_out(model, x), want, atol=1e-5)
    assert not (torch_home / "hub").exists()
    assert model.pretrained_cfg["source"] == path.as_uri() and len(model.pretrained_cfg["classes"]) == 1000
    mine = path.with_name("my weights-abc.pth")  # "-abc." reads as a (wrong) hash prefix to torch.hub
    os.link(path, mine)
    assert torch.allclose(_out(create_model("densenet121", pretrained=mine.as_uri()), x), want, atol=1e-5)
    assert not (torch_home / "hub").exists()
    # a plain path loads the same
    assert torch.allclose(_out(create_model("densenet121", pretrained=str(path)), x), want, atol=1e-5)


def test_pretrained_true_reads_the_published_file_from_the_cache(tv_weights, torch_home):
    path, x, want = tv_weights
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    os.link(path, cache / os.path.basename(PUBLISHED_121.url))  # what an earlier download left there
    model = create_model("densenet121", pretrained=True)
    assert torch.allclose(_out(model, x), want, atol=1e-5)
    cfg = model.pretrained_cfg
    assert cfg["url"] == PUBLISHED_121.url and cfg["classes"] == list(PUBLISHED_121.meta["categories"])
    assert cfg["crop_size"] == 224 and cfg["resize_size"] == 256 and cfg["mean"] == (0.485, 0.456, 0.406)
    from PIL import Image

    img = Image.new("RGB", (300, 260), (200, 30, 90))
    assert torch.allclose(cfg["transforms"](img), PUBLISHED_121.transforms()(img))
    # timm: another num_classes keeps the backbone and replaces the classifier; 0 = features
    ten = create_model("densenet121", pretrained=True, num_classes=10)
    feats = create_model("densenet121", pretrained=True, num_classes=0)
    assert _out(ten, x).shape == (2, 10) and ten.pretrained_cfg["classes"] is None
    with torch.no_grad():
        assert torch.allclose(_out(feats, x), model.forward_head(model.forward_features(x), pre_logits=True))


def test_published_weights_are_torchvisions_densenets():
    from crosslayer.models.pretrained import PUBLISHED, published_weights

    assert sorted(PUBLISHED) == ["densenet121", "densenet161", "densenet169", "densenet201"]
    for name in PUBLISHED:
        url = published_weights(name).url
        assert url == torchvision.models.get_model_weights(name).IMAGENET1K_V1.url
        assert os.path.basename(url).startswith(f"{name}-") and url.startswith("https://download.pytorch.org/")


def test_pretrained_errors_are_one_line(tv_weights, torch_home, monkeypatch):
    path, _, _ = tv_weights
    # a download whose SHA-256 does not start with the digits in its name (the server sends our file)
    monkeypatch.setattr(torch.hub, "urlopen", lambda *a, **k: urllib.request.urlopen(path.as_uri()))
    url = "https://example.invalid/densenet121-deadbeef.pth"
    with pytest.raises(CrosslayerError, match="hash check failed") as e:
        create_model("densenet121", pretrained=url)
    assert "\n" not in str(e.value)
    assert not (torch_home / "hub" / "checkpoints" / "densenet121-deadbeef.pth").exists()
    monkeypatch.undo()
    monkeypatch.setenv("TORCH_HOME", str(torch_home))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(CrosslayerError, match="cannot download") as e:
        create_model("densenet121", pretrained=True)
    assert "\n" not in str(e.value) and "pretrained=PATH" in str(e.value)
    with pytest.raises(CrosslayerError, match="no published pretrained weights for 'densenet_bc100_k12'"):
        create_model("densenet_bc100_k12", pretrained=True)
    with pytest.raises(CrosslayerError, match="no such file"):
        create_model("densenet121", pretrained=str(path) + ".missing")


@pytest.mark.parametrize("name,kw", [("densenet_bc40_k12", {"growth_rate": 4}), ("delugenet20", {}),
                                     ("resnet110", {}), ("wrn16_4", {}), ("fractalnet20", {"widths": (8, 8, 8, 8, 8)})])
def test_num_classes_zero_returns_pooled_features(name, kw):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # today: "Initializing zero-element tensors is a no-op"
        model = create_model(name, num_classes=0, **kw).eval()
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, model.num_features)
        assert torch.equal(out, model.forward_head(model.forward_features(x), pre_logits=True))
        full = create_model(name, **kw).eval()
        full.reset_classifier(0)
        assert full(x).shape == (2, full.num_features) and full.num_classes == 0
        full.reset_classifier(7)
        assert full(x).shape == (2, 7)


def _hubconf():
    spec = importlib.util.spec_from_file_location("hubconf", os.path.join(REPO, "hubconf.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hubconf_exposes_every_registered_model():
    hub = _hubconf()
    entries = {n for n in dir(hub) if not n.startswith("_") and callable(getattr(hub, n))}
    assert entries == set(list_models()) and hub.dependencies == ["torch", "torchvision"]
    torch.manual_seed(0)
    model = torch.hub.load(REPO, "densenet_bc40_k12", source="local", growth_rate=4, num_classes=3, trust_repo=True)
    assert type(model) is crosslayer.models.densenet.DenseNet and model.growth_rate == 4
    assert _out(model, torch.randn(1, 3, 32, 32)).shape == (1, 3)
    deluge = torch.hub.load(REPO, "delugenet20", source="local", num_classes=0)
    assert _out(deluge, torch.randn(1, 3, 32, 32)).shape == (1, deluge.num_features)
