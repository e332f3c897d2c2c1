"""timm's model contract where timm's own tests do not look (no timm needed): create_model's
keywords, the classifier on the model's device and dtype after num_classes=0, what drop_rate means,
pretrained_cfg statistics, pretrained stems adapted to other channel counts, old run records."""

from __future__ import annotations

import pytest
import torch

from crosslayer.errors import CrosslayerError
from crosslayer.models import create_model


def test_reset_classifier_after_no_classifier_keeps_device_and_dtype():
    model = create_model("resnet20", num_classes=0).double()
    model.reset_classifier(7)
    assert model.classifier.weight.dtype == torch.float64
    assert model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).shape == (2, 7)


def test_reset_classifier_on_meta_stays_on_meta():
    with torch.device("meta"):
        model = create_model("densenet_bc16_k8", num_classes=0)
    model.reset_classifier(3)
    assert model.classifier.weight.device.type == "meta"


def test_create_model_takes_timm_keywords_and_drops_none():
    model = create_model("densenet_bc16_k8", in_chans=1, num_classes=4, drop_rate=None, drop_path_rate=None,
                         global_pool="max", scriptable=None, pretrained_cfg_overlay=dict(crop_pct=0.9))
    assert model.in_chans == 1 and model.global_pool == "max" and model.head_drop_rate == 0.0
    assert model.pretrained_cfg["crop_pct"] == 0.9 and model.pretrained_cfg["input_size"][0] == 1
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 4)


@pytest.mark.parametrize("kwargs", [dict(not_a_model_arg=1), dict(in_chans=1, in_channels=3)])
def test_unknown_or_conflicting_keyword_is_a_type_error_naming_it(kwargs):
    with pytest.raises(TypeError, match=next(iter(kwargs))) as e:
        create_model("resnet20", **kwargs)
    assert isinstance(e.value, CrosslayerError)  # still one line for the command-line tools


def test_drop_path_rate_where_the_family_has_none_must_be_zero():
    create_model("densenet_bc16_k8", drop_path_rate=0.0)
    with pytest.raises(ValueError, match="drop_path_rate"):
        create_model("densenet_bc16_k8", drop_path_rate=0.1)
    assert create_model("resnet20", drop_path_rate=0.2).layers[-1].survival_prob == pytest.approx(0.8)


def test_drop_rate_is_classifier_dropout_conv_drop_rate_the_papers():
    head = create_model("densenet_bc16_k8", drop_rate=0.5)
    assert head.head_drop_rate == 0.5 and all(getattr(m, "drop_rate", 0) == 0 for m in head.features.modules())
    conv = create_model("densenet_bc16_k8", conv_drop_rate=0.2)
    assert conv.head_drop_rate == 0 and conv.features.denseblock1.denselayer1.drop_rate == 0.2
    wrn = create_model("wrn16_4", conv_drop_rate=0.3, drop_rate=0.1)
    assert wrn.blocks[0].drop_rate == 0.3 and wrn.head_drop_rate == 0.1
    feats = head.eval().forward_features(torch.randn(4, 3, 28, 28))
    kept = head.forward_head(feats, pre_logits=True)
    head.train()  # classifier dropout: pooled features dropped, the others scaled by 1 / (1 - p)
    pre = head.forward_head(feats, pre_logits=True)
    dropped = (pre == 0) & (kept != 0)
    assert dropped.any() and torch.allclose(pre[~dropped], 2 * kept[~dropped])


def test_pretrained_cfg_describes_the_native_data():
    from crosslayer.data.bundle import IMAGENET
    from crosslayer.data.registry import VARIANTS

    fmnist = create_model("densenet_bc16_k8", in_chans=1).pretrained_cfg  # a Fashion-MNIST study model
    assert fmnist["input_size"] == (1, 28, 28) and fmnist["mean"] == pytest.approx(VARIANTS["fashion-mnist"].mean)
    c10 = create_model("wrn16_4").pretrained_cfg
    assert c10["input_size"] == (3, 32, 32) and c10["crop_pct"] == 1.0
    assert c10["mean"] == pytest.approx(VARIANTS["c10"].mean) and c10["std"] == pytest.approx(VARIANTS["c10"].std)
    with torch.device("meta"):
        imagenet = create_model("densenet121").pretrained_cfg
    assert imagenet["input_size"] == (3, 224, 224) and imagenet["pool_size"] == (7, 7)
    assert imagenet["mean"] == pytest.approx(IMAGENET["mean"]) and imagenet["first_conv"] == "features.conv0"


@pytest.mark.parametrize("in_chans", [1, 6])  # exact for 1 and multiples of 3
def test_pretrained_rgb_stem_adapted_to_other_channel_counts(tmp_path, in_chans):
    rgb = create_model("resnet20").eval()
    path = tmp_path / "resnet20.pth"
    torch.save(rgb.state_dict(), path)
    model = create_model("resnet20", pretrained=str(path), in_chans=in_chans).eval()
    grey = torch.randn(2, 1, 32, 32)
    with torch.no_grad():  # a grey image on every channel gives what its RGB copy gave
        torch.testing.assert_close(model(grey.expand(-1, in_chans, -1, -1)), rgb(grey.expand(-1, 3, -1, -1)))


def test_checkpoint_path_loads_a_state_dict_saved_by_a_trainer(tmp_path):
    src = create_model("resnet20", num_classes=3)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 0, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    loaded = create_model("resnet20", num_classes=3, checkpoint_path=str(path))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), loaded.state_dict().values()))


def test_old_run_records_name_the_papers_dropout_drop_rate():
    from crosslayer.train.config import saved_fields

    old = saved_fields({"model": "wrn16_4", "model_kwargs": {"drop_rate": 0.3}})
    assert old["model_kwargs"] == {"conv_drop_rate": 0.3}
    new = saved_fields({"model": "wrn16_4", "model_kwargs": {"drop_rate": 0.3}, "model_kwargs_format": 2})
    assert new["model_kwargs"] == {"drop_rate": 0.3}


@pytest.mark.parametrize("name", ["densenet_bc16_k8", "delugenet20", "resnet20", "preact_resnet20", "wrn16_4",
                                  "fractalnet20"])
def test_pruned_model_ends_at_the_tap_with_its_width(name):
    model = create_model(name, num_classes=5).eval()
    x = torch.randn(2, model.in_chans, 32, 32)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        assert model.prune_intermediate_layers([0], prune_head=False) == [0]
        assert len(model.feature_info) == 1 and model.num_features == taps[0].shape[1]
        assert torch.equal(model.forward_features(x), taps[0])
        assert model(x).shape == (2, 5)  # the classifier was rebuilt for the tap's width


def test_pruned_densenet_still_runs_its_fused_blocks_with_the_plain_modules_numbers():
    """Pruned to end at a transition, the features are still what the fused node implements."""
    from crosslayer.ops import dense_block

    torch.manual_seed(0)
    fused = create_model("densenet_bc16_k8", fused=True)
    fused.prune_intermediate_layers([1])
    assert dense_block.fusable_features(fused.features)
    plain = create_model("densenet_bc16_k8", fused=False)
    plain.prune_intermediate_layers([1])
    plain.load_state_dict(fused.state_dict())
    fused.double(), plain.double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    outs = [net.train().forward_features(x) for net in (fused, plain)]
    for out in outs:
        out.square().sum().backward()
    assert not torch.equal(outs[0], outs[1])  # two paths, not one
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    for (n, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=n)


def _stock_densenet():
    return create_model("densenet_bc16_k8", fused=True)


@pytest.mark.parametrize("change", ["none", "dropout", "hook", "sync_bn", "swapped", "frozen_bn"])
def test_fast_path_off_says_why_exactly_when_the_fused_blocks_step_aside(change):
    model = _stock_densenet() if change != "dropout" else create_model("densenet_bc16_k8", fused=True, conv_drop_rate=0.2)
    if change == "hook":
        model.features.denseblock1.denselayer1.conv1.register_forward_hook(lambda *a: None)
    elif change == "sync_bn":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif change == "swapped":
        model.features.transition1.pool = torch.nn.MaxPool2d(2)
    x = torch.randn(2, 3, 32, 32)
    frozen = model.train().features.denseblock2.denselayer1.norm1
    if change == "frozen_bn":  # frozen-BN fine-tuning: mixed modes take the plain path
        frozen.eval()
    runs_fused = model._use_fused(x)
    why = model.fast_path_off("cpu")
    assert frozen.training == (change != "frozen_bn")  # asking changed no module's mode
    assert runs_fused == (why is None), why
    assert runs_fused == (change in ("none", "dropout"))  # the papers' dropout runs on the fused blocks
    assert create_model("densenet_bc16_k8", fused=False, conv_drop_rate=0.2).fast_path_off("cpu") is None  # chosen off


@pytest.mark.parametrize("change", ["none", "sync_bn"])
def test_delugenet_fast_path_off_matches_its_gradient_bank(change):
    from crosslayer.ops.deluge import bank_applies

    model = create_model("delugenet20", fused=True)
    if change == "sync_bn":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    x = torch.randn(2, 16, 32, 32)
    banks = [bank_applies(stage.norms, x, model.fused) for stage in model.train().stages]
    assert all(banks) == (model.fast_path_off("cpu") is None) == (change == "none")
