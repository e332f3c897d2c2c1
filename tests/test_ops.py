"""The fast paths in crosslayer.ops recognise exactly the modules they implement.

Swap a module inside a DenseLayer, a Transition or a DelugeNet composite layer (another activation,
another norm, a differently padded conv) or insert one (squeeze-excitation), and the model must
compute what its plain modules compute: the same model forced ``fused=False``, in training
(outputs and every gradient) and in eval. The stock models must still take the fast paths.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import crosslayer
from crosslayer.models.delugenet import delugenet_cifar
from crosslayer.ops import deluge, dense_block
from tests.helpers import nontrivial_batchnorm


class SqueezeExcitation(nn.Module):
    """Hu et al., "Squeeze-and-Excitation Networks": channel gates from the global average."""

    def __init__(self, channels: int, hidden: int = 2):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


def _densenet(model="densenet_bc40_k12"):
    torch.manual_seed(0)
    return nontrivial_batchnorm(crosslayer.create_model(model, growth_rate=4, fused=True).double(), running_stats=True)


def _deluge():
    torch.manual_seed(0)
    net = delugenet_cifar(2, 0.25, num_classes=10, fused=True).double()
    with torch.no_grad():
        for c in net.cross_layer_convs():
            c["module"].weight.uniform_(-1, 1)
    return net


def _swap(name):
    """Modifications of DenseNet modules; each takes the (double) model and edits it in place."""
    def layer(net):
        return net.features.denseblock2.denselayer3

    def conv2_se(net):
        layer(net).conv2 = nn.Sequential(layer(net).conv2, SqueezeExcitation(4)).double()

    def norm2_group(net):
        layer(net).norm2 = nn.GroupNorm(4, 16).double()

    def reflect(net):
        layer(net).conv2.padding_mode = "reflect"

    return {"relu1_gelu": lambda net: setattr(layer(net), "relu1", nn.GELU()),
            "relu2_silu": lambda net: setattr(layer(net), "relu2", nn.SiLU()),
            "transition_relu_gelu": lambda net: setattr(net.features.transition1, "relu", nn.GELU()),
            "conv2_then_se": conv2_se, "norm2_groupnorm": norm2_group, "conv2_reflect_padding": reflect}[name]


def _step(net, x, y):
    net.zero_grad()
    out = net(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def _assert_same_function(net, x, y):
    """``net`` (fast paths allowed) computes what the same model with fused=False computes, in
    training (outputs, gradients) and in eval (outputs)."""
    plain = copy.deepcopy(net)
    plain.fused = False
    tol = dict(atol=1e-10, rtol=1e-8)
    out, grads = _step(net.train(), x, y)
    out_p, grads_p = _step(plain.train(), x, y)
    assert torch.allclose(out, out_p, **tol)
    assert grads.keys() == grads_p.keys()
    for name in grads:
        assert torch.allclose(grads[name], grads_p[name], **tol), name
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), plain.eval()(x), **tol)
    return out


def _data(n=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def test_stock_models_take_the_fast_paths():
    x, _ = _data(2)
    for model in ("densenet_bc40_k12", "densenet40_k12"):
        net = _densenet(model)
        assert dense_block.fusable_features(net.features) and net._use_fused(x)
    net = _deluge().train()
    assert all(deluge.bank_applies(stage.norms, x, True) for stage in net.stages)
    assert net.stages[0](net.stem(x), True).bank is not None


@pytest.mark.parametrize("swap", ["relu1_gelu", "relu2_silu", "transition_relu_gelu", "conv2_then_se",
                                  "norm2_groupnorm", "conv2_reflect_padding"])
def test_modified_densenet_computes_what_its_modules_say(swap):
    x, y = _data()
    stock = _densenet()
    net = copy.deepcopy(stock)
    _swap(swap)(net)
    assert not net._use_fused(x)
    out = _assert_same_function(net, x, y)
    assert not torch.allclose(out, _step(stock.train(), x, y)[0], atol=1e-6)  # the change is visible


def test_an_added_module_sends_the_densenet_down_the_plain_path():
    """A module registered in a DenseLayer that its fused node would not know about (here one the
    layer's forward does not call either): the fused path steps aside."""
    x, y = _data()
    net = _densenet()
    net.features.denseblock1.denselayer2.add_module("se", SqueezeExcitation(12).double())
    assert not net._use_fused(x)
    net.features.denseblock1.denselayer2.se = nn.Identity()
    assert not net._use_fused(x)
    del net.features.denseblock1.denselayer2.se
    assert net._use_fused(x)
    _assert_same_function(net, x, y)


@pytest.mark.parametrize("swap", ["pre_relu_silu", "body_relu_gelu", "body_se", "shared_norm_groupnorm"])
def test_modified_delugenet_computes_what_its_modules_say(swap):
    x, y = _data()
    stock = _deluge()
    net = copy.deepcopy(stock)
    stage = net.stages[1]
    layer = stage.layers[1]  # a composite layer with a CLDC over two inputs
    if swap == "pre_relu_silu":
        layer.relu = nn.SiLU()
    elif swap == "body_relu_gelu":
        layer.body.relu1 = nn.GELU()
    elif swap == "body_se":
        layer.body.add_module("se", SqueezeExcitation(32).double())
    else:
        stage.norms[1] = nn.GroupNorm(4, 32, affine=False).double()
        assert not deluge.bank_applies(stage.norms, x, True)
    out = _assert_same_function(net, x, y)
    assert not torch.allclose(out, _step(stock.train(), x, y)[0], atol=1e-6)


def test_fused_parameter_order_covers_each_parameter_once():
    net = _densenet()
    modules = list(net.features.children())
    for i, m in enumerate(modules):
        if isinstance(m, crosslayer.models.densenet.DenseBlock):
            params = dense_block.fused_parameters(m, modules[i + 1])
            expected = list(m.parameters()) + list(modules[i + 1].parameters())
            assert len(params) == len(expected) and {id(p) for p in params} == {id(p) for p in expected}


@pytest.mark.parametrize("name", ["densenet_bc40_k12", "delugenet20"])
def test_speed_switches_are_set_one_way(name, monkeypatch):
    kw = dict(growth_rate=4) if name.startswith("densenet") else {}
    net = crosslayer.create_model(name, memory_efficient=True, fused=False, cpu_channels_last=False, **kw)
    layers = [m for m in net.modules() if m is not net and "memory_efficient" in vars(m)]
    assert layers and all(m.memory_efficient for m in layers)
    assert (net.memory_efficient, net.fused, net.cpu_channels_last) == (True, False, False)
    assert net.set_speed(memory_efficient=False, fused=None, cpu_channels_last=True) is net
    assert (net.memory_efficient, net.fused, net.cpu_channels_last) == (False, None, True)
    assert not any(m.memory_efficient for m in layers)
    net.memory_efficient = True  # the attribute reaches the layers too
    assert all(m.memory_efficient for m in layers)
    net.set_grad_checkpointing(False)
    assert not any(m.memory_efficient for m in layers)
    with pytest.raises(TypeError, match="unknown speed switch"):
        net.set_speed(fast=True)


def test_fused_none_follows_the_device_default(monkeypatch):
    """``fused=None`` on DelugeNet resolves through crosslayer.ops.defaults, like DenseNet's."""
    x, _ = _data(2)
    net = _deluge().train().float()
    net.fused = None
    assert net.stages[0](net.stem(x.float()), net.fused).bank is not None
    monkeypatch.setitem(crosslayer.ops.defaults.FUSED_BY_DEFAULT, "cpu", False)
    assert net.stages[0](net.stem(x.float()), net.fused).bank is None
    dense = _densenet()
    dense.fused = None
    assert not dense._use_fused(x)


@pytest.mark.parametrize("name", ["densenet_bc40_k12", "delugenet20"])
def test_torch_jit_trace_records_the_plain_path(name):
    """torch.jit.trace cannot record the fused nodes; the models recognise it and trace their modules."""
    torch.manual_seed(0)
    kw = dict(growth_rate=4) if name.startswith("densenet") else {}
    model = crosslayer.create_model(name, **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        assert torch.allclose(traced(x), model(x), atol=1e-5)


@pytest.mark.parametrize("build", [_densenet, _deluge], ids=["densenet", "delugenet"])
def test_double_backward_fails_on_the_fused_path_and_names_the_way_out(build):
    """A second derivative (``create_graph=True``) needs the plain modules: the fused nodes write
    their gradients in place, which autograd cannot differentiate (DelugeNet's bank gave wrong
    numbers, the dense block torch's ``out=`` error). Fused, the first backward refuses in one line
    naming double backward and ``fused=False``; plain, both derivatives come out finite."""
    net = build().train()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    net.set_speed(fused=False)
    g, = torch.autograd.grad(net(x).square().sum(), x, create_graph=True)
    gg, = torch.autograd.grad(g.square().sum(), x)
    assert torch.isfinite(gg).all() and gg.abs().sum() > 0
    net.set_speed(fused=True)
    with pytest.raises(RuntimeError) as e:
        torch.autograd.grad(net(x).square().sum(), x, create_graph=True)
    msg = str(e.value)
    assert "\n" not in msg and "double backward (create_graph=True)" in msg and "fused=False" in msg, msg
    g1, = torch.autograd.grad(net(x).square().sum(), x)  # one derivative: the fused path as before
    assert torch.allclose(g1, g.detach(), rtol=1e-9, atol=1e-11)
