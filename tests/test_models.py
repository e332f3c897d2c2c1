"""The model zoo: exact parameter counts against the specs, interface, and torchvision parity."""

import math

import pytest
import torch
import torch.nn as nn

import crosslayer
from crosslayer.cli.models import format_table, zoo_rows
from crosslayer.counting import count_macs
from crosslayer.errors import CrosslayerError

# Exact counts: docs/architecture.md derives each one.
CIFAR_COUNTS = {  # name: (10 classes, 100 classes or None = derive)
    "densenet40_k12": (1_019_722, 1_060_132),
    "densenet100_k12": (6_979_642, 7_084_852),
    "densenet100_k24": (27_249_082, 27_457_972),
    "densenet_bc100_k12": (769_162, 800_032),
    "densenet_bc250_k24": (15_324_406, 15_480_556),
    "densenet_bc190_k40": (25_624_430, 25_821_620),
    "delugenet146": (6_686_250, 6_709_380),
    "delugenet218": (9_981_738, 10_004_868),
    "wide_delugenet146": (20_150_658, 20_191_068),
    "resnet20": (269_722, None),
    "resnet110": (1_727_962, None),
    "preact_resnet110": (1_727_962, None),  # zero-padding shortcuts (fb.resnet.torch preresnet.lua)
    "preact_resnet164": (1_703_258, None),
    "preact_resnet1001": (10_327_706, None),
    "resnet110_sd": (1_732_010, None),
    "resnet152_sd": (2_414_090, None),  # the stochastic-depth code with -N 25 (its SVHN network)
    "resnet1202_sd": (19_421_274, None),
    "wrn16_4": (2_748_890, None),
    "wrn16_8": (10_961_370, None),
    "wrn28_10": (36_479_194, None),
    "wrn40_4": (8_949_210, None),
    "fractalnet20": (33_714_314, None),  # BN without scale/shift (Caffe BatchNorm, no Scale layer)
}
IMAGENET_COUNTS = {
    "densenet121": 7_978_856, "densenet169": 14_149_480, "densenet201": 20_013_928,
    "densenet264": 33_337_704, "densenet161": 28_681_000,
    "delugenet92": 43_404_072, "delugenet104": 51_353_896, "delugenet122": 63_620_392,
}
# Printed figures known to be wrong in the tables (corrections in `crosslayer models`).
MISPRINTED = {"resnet1202_sd", "fractalnet20", "wrn40_4", "preact_resnet1001"}


def n_params(name, **kw):
    with torch.device("meta"):  # counts only: no memory, no init cost
        return sum(p.numel() for p in crosslayer.create_model(name, **kw).parameters())


def rounds_to(count, printed):
    decimals = len(repr(printed).split(".")[1]) if "." in repr(printed) else 0
    return round(count / 1e6, decimals) == printed


@pytest.mark.parametrize("name", sorted(CIFAR_COUNTS))
def test_cifar_param_counts_exact(name):
    c10, c100 = CIFAR_COUNTS[name]
    assert n_params(name, num_classes=10) == c10
    with torch.device("meta"):
        num_features = crosslayer.create_model(name).num_features
    expected_100 = c100 if c100 is not None else c10 + 90 * (num_features + 1)
    assert n_params(name, num_classes=100) == expected_100


@pytest.mark.parametrize("name", sorted(IMAGENET_COUNTS))
def test_imagenet_param_counts_exact(name):
    assert n_params(name) == IMAGENET_COUNTS[name]  # 1000 classes by default


@pytest.mark.parametrize("name", sorted(CIFAR_COUNTS) + sorted(IMAGENET_COUNTS))
def test_count_rounds_to_paper_figure(name):
    info = crosslayer.model_info(name)
    if info.paper_params_m is None:
        pytest.skip("no printed figure")
    count = n_params(name)
    if name in MISPRINTED:
        assert not rounds_to(count, info.paper_params_m) and info.note
    else:
        assert rounds_to(count, info.paper_params_m), (count, info.paper_params_m)


def test_every_table_model_is_registered():
    names = set(crosslayer.list_models())
    wanted = {"densenet40_k12", "densenet100_k12", "densenet100_k24", "densenet_bc100_k12", "densenet_bc250_k24",
              "densenet_bc190_k40", "densenet121", "densenet169", "densenet201", "densenet264", "densenet161",
              "delugenet146", "delugenet218", "wide_delugenet146", "delugenet92", "delugenet104", "delugenet122",
              "resnet110", "preact_resnet110", "preact_resnet164", "preact_resnet1001", "wrn16_4", "wrn16_8",
              "wrn28_10", "wrn40_4", "resnet110_sd", "resnet152_sd", "resnet1202_sd", "fractalnet20"}
    assert wanted <= names
    assert crosslayer.list_models("wrn*") == ["wrn16_4", "wrn16_8", "wrn28_10", "wrn40_4"]


@pytest.mark.parametrize("name", ["densenet_bc40_k12", "densenet40_k12", "delugenet20", "resnet20",
                                  "preact_resnet110", "resnet110_sd", "wrn16_4", "fractalnet20"])
def test_forward_interface(name):
    torch.manual_seed(0)
    model = crosslayer.create_model(name, num_classes=7, in_channels=1)
    x = torch.randn(2, 1, 32, 32)
    model.train()
    assert model(x).shape == (2, 7)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[:2] == (2, model.num_features)
        assert torch.allclose(model.forward_head(feats), model(x), atol=1e-5)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3


def test_dense_connectivity_channel_walk():
    # DenseNet-BC-100 k=12: 24 -> 216 -> 108 -> 300 -> 150 -> 342 (densenet.md §1.2)
    with torch.device("meta"):
        m = crosslayer.create_model("densenet_bc100_k12")
    f = m.features
    assert f.conv0.out_channels == 24
    assert f.transition1.conv.in_channels == 216 and f.transition1.conv.out_channels == 108
    assert f.transition2.conv.in_channels == 300 and f.transition2.conv.out_channels == 150
    assert m.num_features == 342
    assert f.denseblock1.denselayer16.conv1.in_channels == 24 + 15 * 12


def test_he_fan_out_init():
    torch.manual_seed(0)
    m = crosslayer.create_model("densenet100_k12")
    w = m.features.denseblock3.denselayer1.conv1.weight  # 3x3, 12 outputs
    expected = math.sqrt(2 / (3 * 3 * 12))
    assert abs(w.std().item() - expected) / expected < 0.05


def test_dropout_after_every_conv_but_stem():
    m = crosslayer.create_model("densenet_bc40_k12", conv_drop_rate=0.2, growth_rate=4)
    m.train()
    seen = []
    hooks = [mod.register_forward_hook(lambda mod, i, o: seen.append(mod)) for mod in m.modules()
             if isinstance(mod, nn.Dropout)]
    calls = {"n": 0}
    orig = torch.nn.functional.dropout

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    torch.nn.functional.dropout = counting
    try:
        m(torch.randn(2, 3, 32, 32))
    finally:
        torch.nn.functional.dropout = orig
        for h in hooks:
            h.remove()
    n_layers = sum(m.block_config)
    # after the 1x1 and the 3x3 of every bottleneck layer, and after both transition convs
    # (nn.Dropout calls F.dropout too); never after the stem conv nor before the classifier
    assert calls["n"] == 2 * n_layers + 2
    assert len(seen) == 2


def test_stochastic_depth_train_and_test_behaviour():
    torch.manual_seed(0)
    m = crosslayer.create_model("resnet110_sd")
    probs = [b.survival_prob for b in m.layers]
    assert probs[0] == pytest.approx(1 - 1 / 54 * 0.5) and probs[-1] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(probs, probs[1:]))
    block = m.layers[-1]
    x = torch.randn(4, 64, 8, 8)
    block.eval()
    with torch.no_grad():
        branch = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        assert torch.allclose(block(x), torch.relu(x + 0.5 * branch), atol=1e-6)
    block.train()
    outs = {bool(torch.equal(block(x), torch.relu(x))) for _ in range(40)}
    assert outs == {True, False}  # sometimes dropped, sometimes not


def test_unknown_model_and_bad_override_are_user_errors():
    with pytest.raises(CrosslayerError, match="unknown model"):
        crosslayer.create_model("densenet_bc99")
    with pytest.raises(CrosslayerError, match="densenet_bc40_k12"):
        crosslayer.create_model("densenet_bc40_k12", no_such_option=1)


def test_torchvision_densenet121_loads_with_identical_outputs():
    tv_models = pytest.importorskip("torchvision.models")
    from crosslayer.models.densenet import load_torchvision_state_dict

    torch.manual_seed(0)
    tv = tv_models.densenet121(weights=None).eval()
    for m in tv.modules():  # non-trivial BN statistics so a mismatch would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ours = crosslayer.create_model("densenet121").eval()
    load_torchvision_state_dict(ours, tv.state_dict())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(ours(x), tv(x), atol=1e-5, rtol=1e-4)
    # the old key style (norm.1 / conv.1) of early torchvision releases loads too
    old = {k.replace("norm1", "norm.1").replace("conv1", "conv.1").replace("norm2", "norm.2").replace("conv2", "conv.2")
           if "denselayer" in k else k: v for k, v in tv.state_dict().items()}
    fresh = crosslayer.create_model("densenet121").eval()
    load_torchvision_state_dict(fresh, old)
    with torch.no_grad():
        assert torch.allclose(fresh(x), tv(x), atol=1e-5, rtol=1e-4)


def test_zoo_table_counts_and_macs():
    rows = {r["name"]: r for r in zoo_rows("densenet_bc100_k12")}
    assert rows["densenet_bc100_k12"]["params"] == 769_162
    # densenet.md §3: 0.288 GMACs at 32x32, counted here independently on the meta device
    assert rows["densenet_bc100_k12"]["gmacs"] == pytest.approx(0.288, abs=0.001)
    assert count_macs("wrn28_10") / 1e9 == pytest.approx(5.243, abs=0.001)
    text = format_table(zoo_rows("resnet1202_sd", macs=False))
    assert "19,421,274" in text and "10.2M" in text and "19.4M" in text


def _small(name):
    """A shallow member of each family (deep nets at init amplify rounding differences chaotically)."""
    from crosslayer.models.delugenet import delugenet_cifar
    from crosslayer.models.fractalnet import FractalNet
    from crosslayer.models.resnet import preact_resnet_cifar, stochastic_depth_resnet
    from crosslayer.models.wide_resnet import wide_resnet

    return {"densenet": lambda: crosslayer.create_model("densenet_bc40_k12", growth_rate=4),
            "delugenet": lambda: delugenet_cifar(1, 0.5),
            "preact": lambda: preact_resnet_cifar(20),
            "sd": lambda: stochastic_depth_resnet(20, death_rate=0.0),
            "wrn": lambda: wide_resnet(10, 1),
            "fractalnet": lambda: FractalNet(2, (16, 32, 32, 32, 32), (0.0,) * 5, drop_path=0.0)}[name]()


def _first_conv_layout(model, x):
    """Memory format of the input of the model's first convolution, seen at the aten level (no hooks,
    so the fused paths stay on)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default and not seen:
                t = args[0]
                seen.append("NCHW" if t.is_contiguous() else
                            "NHWC" if t.is_contiguous(memory_format=torch.channels_last) else "other")
            return func(*args, **(kwargs or {}))

    with Record():
        out = model(x)
    return seen[0], out


# relative error ||g_bf16 - g_fp32|| / ||g_fp32|| of the gradients; measured 0.02-0.09 (FractalNet 0.27)
BF16_GRAD_REL_ERR = {"densenet": 0.2, "delugenet": 0.2, "preact": 0.2, "sd": 0.2, "wrn": 0.2, "fractalnet": 0.4}


@pytest.mark.parametrize("name", ["densenet", "delugenet", "preact", "sd", "wrn", "fractalnet"])
def test_channels_last_and_bf16_autocast_paths(name):
    """The CPU stand-ins of the CUDA paths: channels_last computes the same function as NCHW (the
    two really run in different layouts: the CPU NHWC switch of DenseNet/DelugeNet is off for the
    NCHW run), and a bf16 autocast training step gives finite gradients close to the fp32 ones in
    relative error (so a wrong scale would show, which a cosine similarity cannot see)."""
    torch.manual_seed(0)
    model = _small(name).eval()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        if hasattr(model, "cpu_channels_last"):
            model.cpu_channels_last = False
        layout, ref = _first_conv_layout(model, x)
        assert layout == "NCHW"
        if hasattr(model, "cpu_channels_last"):
            model.cpu_channels_last = True
        cl_model = model.to(memory_format=torch.channels_last)
        layout, cl = _first_conv_layout(cl_model, x.contiguous(memory_format=torch.channels_last))
        assert layout == "NHWC"
    assert torch.allclose(ref, cl, atol=1e-4, rtol=1e-3)
    model = model.to(memory_format=torch.contiguous_format).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model(x).logsumexp(1).mean().backward()
    fp32 = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.load_state_dict(state)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().logsumexp(1).mean().backward()
    bf16 = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.isfinite(bf16).all()
    # bf16 keeps ~3 significant digits; BN over small batches amplifies that noise in the gradients
    assert ((bf16 - fp32).norm() / fp32.norm()).item() < BF16_GRAD_REL_ERR[name]


@pytest.mark.parametrize("name,node", [("densenet_bc40_k12", "features.denseblock2.cat"),
                                       ("delugenet20", "stages.1.layers.0.body.conv3")])
def test_torchvision_feature_extractor_traces_the_module_path(name, node):
    """torchvision's create_feature_extractor (FX symbolic tracing) sees the plain modules, in
    train and eval mode alike, and returns the model's own logits (a DenseNet with its fast paths
    off: with them on, its graph calls the fused stages as one node, see test_densenet_fx_graph_runs_the_fused_stages)."""
    import warnings

    fx = pytest.importorskip("torchvision.models.feature_extraction")
    torch.manual_seed(0)
    m = crosslayer.create_model(name, num_classes=10, **({"fused": False} if name.startswith("densenet") else {})).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchvision warns when train- and eval-mode graphs differ
        train_nodes, eval_nodes = fx.get_graph_node_names(m)
    assert train_nodes == eval_nodes and node in eval_nodes
    fe = fx.create_feature_extractor(m, {node: "feat", "classifier": "logits"})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, ref = fe(x), m(x)
    assert out["feat"].dim() == 4 and torch.allclose(out["logits"], ref, atol=1e-5)



def test_densenet_fx_graph_runs_the_fused_stages():
    """With the fast paths on, a DenseNet's FX graph calls the fused stages (one node) so that it
    computes exactly what eager computes (eval mode, with and without autograd)."""
    fx = pytest.importorskip("torchvision.models.feature_extraction")
    torch.manual_seed(0)
    m = crosslayer.create_model("densenet_bc40_k12", num_classes=10, growth_rate=4)
    fe = fx.create_feature_extractor(m.eval(), {"classifier": "logits"})
    x = torch.randn(2, 3, 32, 32)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert torch.equal(fe(x)["logits"], m(x))


# Small variants of `crosslayer study` (not in the papers): (1-channel 28x28 Fashion-MNIST, 3-channel), 10 classes.
# Hand check of two rows: pre-act ResNet-8 = stem 144 + units 4,672 + 14,432 (1x1 projection 512) + 57,536
# (projection 2,048) + final BN 128 + classifier 650 = 77,562; DenseNet-BC-16 k=8 = conv0 144 + 3 blocks x
# (2,912 + 3,184) + 2 transitions x 576 + norm5 64 + classifier 330 = 19,978. A 3-channel stem adds 2 x 9 x c_0.
STUDY_COUNTS = {
    "densenet_bc16_k8": (19_978, 20_266),
    "densenet_bc28_k12": (102_298, 102_730),
    "preact_resnet8": (77_562, 77_850),
    "preact_resnet20": (271_994, 272_282),
    "preact_resnet44": (660_858, 661_146),
    "delugenet20_w25": (73_922, 74_066),
    "delugenet20_w50": (288_634, 288_922),
    "delugenet20_w75": (644_146, 644_578),
}


@pytest.mark.parametrize("name", sorted(STUDY_COUNTS))
def test_study_variant_param_counts_exact(name):
    gray, rgb = STUDY_COUNTS[name]
    assert n_params(name, num_classes=10, in_channels=1) == gray
    assert n_params(name, num_classes=10) == rgb
    assert crosslayer.model_info(name).note == "small variant for crosslayer study (not in the paper)"
