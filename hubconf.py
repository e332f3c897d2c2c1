"""torch.hub entry points: one per registered crosslayer model (``crosslayer models`` lists them).

    model = torch.hub.load("/path/to/crosslayer", "densenet_bc100_k12", source="local", num_classes=10)
    model = torch.hub.load("/path/to/crosslayer", "densenet121", source="local", pretrained=True)

Each entry takes ``create_model``'s arguments: ``pretrained`` (True for the published ImageNet
DenseNet-121/169/201/161 weights, or a path / URL), ``num_classes`` (0 = pooled features),
``in_channels`` and the model's own options (``growth_rate``, ``conv_drop_rate``, ``memory_efficient``, ...).
"""

from crosslayer.models import create_model as _create_model
from crosslayer.models import list_models as _list_models
from crosslayer.models import model_info as _model_info

dependencies = ["torch", "torchvision"]


def _entry(name: str):
    def entry(pretrained=False, **kwargs):
        return _create_model(name, pretrained=pretrained, **kwargs)

    info = _model_info(name)
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"{(info.fn.__doc__ or name).strip()} {info.paper}\n\n"
                     f"Arguments: see crosslayer.create_model (pretrained, num_classes, in_channels, model options).")
    return entry


for _name in _list_models():
    globals()[_name] = _entry(_name)
