"""Export a trained checkpoint for deployment (``crosslayer export``).

Formats: ``onnx`` (TorchScript-based exporter, batch dimension dynamic; checked through
onnxruntime), ``safetensors`` (the weights and the run config as metadata; checked by rebuilding
the model from them), ``torchscript`` (``torch.jit.trace``) and ``exported-program``
(``torch.export``, saved with ``torch.export.save``). Every output is written to a temporary
file beside the target, loaded back and run on random input against the eager model, and only
then renamed into place: a failed export leaves nothing behind. Models take their plain module
path under tracers (``crosslayer.ops.dispatch.is_tracing``), so DenseNets and DelugeNets export
in every format.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch
import torch.nn as nn

from crosslayer.errors import CrosslayerError, check_output_dir
from crosslayer.io import beside_checkpoint, os_error_in, refuse_overwrite
from crosslayer.models import create_model
from crosslayer.train.checkpoint import export_safetensors, input_shape, load_model_from_checkpoint, resolve_checkpoint

NOTES = {"torchscript": "TorchScript is deprecated in PyTorch; --format exported-program is its successor"}

# format -> file suffix of the default output name
FORMATS = {"onnx": ".onnx", "safetensors": ".safetensors", "torchscript": ".torchscript.pt",
           "exported-program": ".pt2"}


class ExportError(CrosslayerError):
    """A model cannot be exported in a format, or the export does not reproduce the eager model."""


def default_output(checkpoint: str, fmt: str) -> str:
    """``runs/x/best.pt`` -> ``runs/x/best.onnx`` (and so on)."""
    return beside_checkpoint(checkpoint, FORMATS[fmt])


def _write_onnx(model: nn.Module, x: torch.Tensor, path: str, cfg: dict) -> None:
    with warnings.catch_warnings():  # the TorchScript-based exporter warns that it is deprecated
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})


def _run_onnx(path: str, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def _write_safetensors(model: nn.Module, x: torch.Tensor, path: str, cfg: dict) -> None:
    export_safetensors(model, path, metadata={"config": cfg})


def _run_safetensors(path: str, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    from safetensors.torch import load_file


    model = create_model(cfg["model"], num_classes=int(cfg["num_classes"]), in_channels=int(cfg.get("in_channels", 3)),
                         **(cfg.get("model_kwargs") or {}))
    model.load_state_dict(load_file(path))
    with torch.no_grad():
        return model.eval()(x)


def _write_torchscript(model: nn.Module, x: torch.Tensor, path: str, cfg: dict) -> None:
    with warnings.catch_warnings(), torch.no_grad():  # TracerWarnings (Python branches on shapes), deprecations
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, (x,), check_trace=False), path)


def _run_torchscript(path: str, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.jit.load(path, map_location="cpu")(x)


def _write_exported_program(model: nn.Module, x: torch.Tensor, path: str, cfg: dict) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)


def _run_exported_program(path: str, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.export.load(path).module()(x)


_WRITERS = {"onnx": (_write_onnx, _run_onnx), "safetensors": (_write_safetensors, _run_safetensors),
            "torchscript": (_write_torchscript, _run_torchscript),
            "exported-program": (_write_exported_program, _run_exported_program)}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _check_output(out: str, fmt: str, checkpoint: str, force: bool) -> None:
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ExportError(f"--out {out}: no such directory {parent}")
    if os.path.isdir(out):
        raise ExportError(f"--out {out}: is a directory; give a file name (e.g. model{FORMATS[fmt]})")
    try:  # read-only or not ours: say so before any work
        check_output_dir(parent)
    except CrosslayerError as e:
        why = str(e).rsplit("(", 1)[-1].split(")")[0]
        raise ExportError(f"--out {out}: cannot write into {parent} ({why})") from None
    refuse_overwrite(out, force, reads=[checkpoint])


def export_checkpoint(checkpoint: str, fmt: str, out: str | None = None, atol: float = 1e-4, seed: int = 0,
                      force: bool = False) -> dict:
    """Export ``checkpoint`` (a file or a run directory) as ``fmt`` to ``out`` (default
    :func:`default_output`), verified first; an existing ``out`` is replaced only with ``force``,
    and never when it is ``checkpoint`` itself.

    The output is loaded back and run on random inputs of batch 2 (the export's example) and 3
    (a different batch size) of the input shape the checkpoint was trained on; the largest absolute
    difference to the eager model must be below ``atol``. Returns ``{"path", "format",
    "max_abs_diff", "bytes", "note"}``."""
    checkpoint = resolve_checkpoint(checkpoint)
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        raise ExportError("--format onnx checks the file with onnxruntime, which is not installed: "
                          "pip install 'crosslayer[export]'")
    out = os.fspath(out) if out else default_output(os.fspath(checkpoint), fmt)
    _check_output(out, fmt, checkpoint, force)
    model, ckpt = load_model_from_checkpoint(checkpoint, map_location="cpu")
    cfg = {k: v for k, v in (ckpt.get("config") or {}).items() if not k.startswith("_")}
    g = torch.Generator().manual_seed(seed)
    shape = input_shape(cfg, checkpoint)
    xs = [torch.randn(n, *shape, generator=g) for n in (2, 3)]
    write, run = _WRITERS[fmt]
    base, ext = os.path.splitext(os.path.basename(out))  # the temporary file keeps the suffix (torch.export wants .pt2)
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{base}.tmp{os.getpid()}{ext}")
    try:
        try:
            write(model, xs[0], tmp, cfg)
            got = [run(tmp, cfg, x).float() for x in xs]
        except Exception as e:  # noqa: BLE001 - an exporter failure is a property of this model and format
            ose = os_error_in(e)
            if ose is not None and ose.errno is not None:  # the folder, the disk: not the model
                raise ExportError(f"--out {out}: cannot write into {os.path.dirname(tmp)} "
                                  f"({ose.strerror or os.strerror(ose.errno)})") from None
            raise ExportError(f"{checkpoint}: {cfg.get('model', 'the model')} cannot be exported as {fmt} "
                              f"({type(e).__name__}: {_first_line(e)})") from None
        with torch.no_grad():
            want = [model(x).float() for x in xs]
        diff = max(float((a - b).abs().max()) for a, b in zip(got, want))
        if not diff < atol:
            raise ExportError(f"{checkpoint}: the {fmt} export differs from the eager model by {diff:.3g} "
                              f"(> {atol:g}); nothing written")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"path": out, "format": fmt, "max_abs_diff": diff, "bytes": os.path.getsize(out), "note": NOTES.get(fmt)}
