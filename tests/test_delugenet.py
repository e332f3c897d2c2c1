"""DelugeNet: the shared-normalisation form equals the straightforward per-consumer form."""

import pytest
import torch

import crosslayer
from crosslayer.models.delugenet import CrossLayerDepthwiseConv
from crosslayer.models.reference import ReferenceDelugeNet


@pytest.mark.parametrize("n,channels_last", [(1, False), (2, True)])
def test_shared_normalisation_equals_per_consumer_reference(n, channels_last):
    """float64, so any difference beyond rounding is a bug; ours in channels_last on CPU (its
    default) or NCHW, the reference always NCHW."""
    from crosslayer.models.delugenet import delugenet_cifar

    torch.manual_seed(0)
    net = delugenet_cifar(n, 0.25, num_classes=5).double()
    net.cpu_channels_last = channels_last
    with torch.no_grad():
        for c in net.cross_layer_convs():
            c["module"].weight.uniform_(-1, 1)
            c["module"].bias.uniform_(-0.5, 0.5)
    ref = ReferenceDelugeNet(net).double()
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 5, (8,))
    for _ in range(2):  # two training steps: outputs, gradients, running statistics
        net.zero_grad()
        ref.zero_grad()
        out, out_ref = net(x), ref(x)
        assert torch.allclose(out, out_ref, atol=1e-10, rtol=1e-8)
        torch.nn.functional.cross_entropy(out, y).backward()
        torch.nn.functional.cross_entropy(out_ref, y).backward()
        ref_grads = {n.removeprefix("net."): p.grad for n, p in ref.named_parameters() if n.startswith("net.")}
        for c in net.cross_layer_convs():  # the reference keeps its CLDC parameters separately
            key = c["name"].replace(".", "_")
            ref_grads[c["name"] + ".weight"] = ref.cldcs[key].weight.grad
            ref_grads[c["name"] + ".bias"] = ref.cldcs[key].bias.grad
        for name, p in net.named_parameters():
            assert torch.allclose(p.grad, ref_grads[name], atol=1e-10, rtol=1e-8), name
    # every consumer's per-input running statistics equal the one shared statistic of that output
    for stage_idx, stage in enumerate(net.stages):
        for c in net.cross_layer_convs():
            if c["kind"] == "composite" and c["stage"] == stage_idx + 1:
                L = c["module"].num_inputs
                norms = ref.cldcs[c["name"].replace(".", "_")].norms
                for i in range(L):  # input i (newest first) = output L-1-i of the stage
                    shared = stage.norms[L - 1 - i]
                    assert torch.allclose(norms[i].running_mean, shared.running_mean, atol=1e-5)
                    assert torch.allclose(norms[i].running_var, shared.running_var, atol=1e-4)
    net.eval()
    ref.eval()
    with torch.no_grad():
        assert torch.allclose(net(x), ref(x), atol=1e-4, rtol=1e-4)


def test_cldc_bias_is_inert_and_init_is_uniform_average():
    torch.manual_seed(0)
    net = crosslayer.create_model("delugenet20")
    for c in net.cross_layer_convs():
        L = c["module"].num_inputs
        assert torch.allclose(c["module"].weight, torch.full_like(c["module"].weight, 1 / L))
    x = torch.randn(4, 3, 32, 32)
    net(x).sum().backward()
    for c in net.cross_layer_convs():
        assert c["module"].bias.grad.abs().max() < 1e-4  # removed by the following training-mode BN


def test_cldc_weight_order_newest_first():
    cldc = CrossLayerDepthwiseConv(2, 3)
    with torch.no_grad():
        cldc.weight.copy_(torch.tensor([[1.0, 10.0, 100.0], [2.0, 20.0, 200.0]]))
    newest, middle, oldest = (torch.full((1, 2, 1, 1), v) for v in (1.0, 2.0, 3.0))
    out = cldc([newest, middle, oldest])
    assert out.flatten().tolist() == [1 + 20 + 300, 2 + 40 + 600]


def test_cross_layer_conv_inventory_matches_spec():
    with torch.device("meta"):
        net = crosslayer.create_model("delugenet146")
    convs = net.cross_layer_convs()
    assert len(convs) == 47  # 6 + 15 + 23 composite CLDCs, 2 transitions, the head
    by_kind = [(c["stage"], c["kind"], c["module"].num_inputs) for c in convs]
    assert [L for s, k, L in by_kind if s == 1 and k == "composite"] == list(range(2, 8))
    assert (1, "transition", 8) in by_kind and (2, "transition", 17) in by_kind and (3, "head", 25) in by_kind
    assert [L for s, k, L in by_kind if s == 3 and k == "composite"] == list(range(2, 25))


def test_fused_backward_passes_saved_statistics_cuda_requires():
    """CUDA's batch-norm backward asserts that save_mean and save_invstd are defined tensors (CPU
    accepts None): every ``native_batch_norm_backward`` of a fused DelugeNet training step, on the
    operator path the GPU takes, passes both."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from crosslayer.models.delugenet import delugenet_cifar

    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.native_batch_norm_backward.default:
                calls.append(args[5:7])
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    net = delugenet_cifar(1, 0.25, num_classes=5)
    net.cpu_channels_last = False  # NCHW: the operator path, not the compiled CPU kernels
    out = net(torch.randn(4, 3, 32, 32))
    with Record():
        out.sum().backward()
    assert calls
    for save_mean, save_invstd in calls:
        assert isinstance(save_mean, torch.Tensor) and isinstance(save_invstd, torch.Tensor)
def test_shared_norm_adds_a_direct_gradient_to_the_banked_one():
    """A normalised stage output read both by a CLDC (its gradient goes through the bank) and
    directly (an ordinary gradient): the input gradient is the sum of both, as plain autograd
    through the module gives."""
    import torch.nn as nn

    from crosslayer.ops.deluge import GradBank, SharedBatchNorm, WeightedSum

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=g)
    weight, bias = torch.randn(3, 1, dtype=torch.float64, generator=g), torch.zeros(3, 1, dtype=torch.float64)
    probe = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=g)
    grads = []
    for fused in (False, True):
        bn = nn.BatchNorm2d(3, affine=False).double()
        xi = x.clone().requires_grad_()
        if fused:
            bank = GradBank()
            z = SharedBatchNorm.apply(xi, bn, bank, 0)
            y = WeightedSum.apply(weight, bias, bank, z)
        else:
            z = bn(xi)
            y = z * weight[:, 0, None, None]
        ((y + 3 * z) * probe).sum().backward()
        grads.append(xi.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-12)
