"""DelugeNet's memory-efficient mode keeps less for backward than the fast mode, measured
like DenseNet's in tests/test_memory_efficient.py: the bytes of the distinct tensors autograd saves
for backward (saved-tensor hooks), parameters excluded.

In the memory-efficient mode each composite layer recomputes its pre-activation (CLDC -> BN -> ReLU)
in backward instead of keeping it, so it keeps at least one activation of its input's size less.
That gives the bound checked here: saved(fast) - saved(memory-efficient) >= the sum of the
composite layers' input sizes (measured: 1.46x that sum for delugenet20 at batch 2)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import crosslayer
from crosslayer.counting import SavedBytes
from crosslayer.models.delugenet import CompositeLayer


def _saved_bytes(net, x, y):
    with SavedBytes(exclude=net.parameters()) as saved:
        F.cross_entropy(net(x), y).backward()
    return saved.total


def _composite_input_bytes(net, x):
    """Sum over the composite layers of the size of their (newest) input activation."""
    sizes = []
    handles = [m.register_forward_pre_hook(lambda m, args: sizes.append(args[0][0].nbytes))
               for m in net.modules() if isinstance(m, CompositeLayer)]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return sum(sizes), len(sizes)


def _data(n=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_delugenet_memory_efficient_saves_less_for_backward():
    x, y = _data()
    torch.manual_seed(0)
    fast = crosslayer.create_model("delugenet20").train()
    built_me = copy.deepcopy(fast)
    built_me.set_memory_efficient(True)
    ctor_me = crosslayer.create_model("delugenet20", memory_efficient=True).train()
    per_layer, layers = _composite_input_bytes(fast, x)
    assert layers == 6
    b_fast, b_me, b_ctor = (_saved_bytes(n, x, y) for n in (fast, built_me, ctor_me))
    assert b_fast - b_me >= per_layer, (b_fast, b_me, per_layer)
    assert b_ctor == b_me  # the constructor argument and set_memory_efficient are the same mode
    assert b_me < 0.9 * b_fast
    built_me.set_memory_efficient(False)
    assert _saved_bytes(built_me, x, y) == b_fast
