"""timm's tools train crosslayer's models once they are registered in timm's registry
(:func:`crosslayer.timm_compat.register_with_timm`): ``timm.create_model`` with the keywords timm's
``train.py`` passes, timm's data pipeline configured from the model's pretrained_cfg, timm's
optimizer factory with layer-wise learning-rate decay (our ``group_matcher``), and, where a copy of
timm's ``train.py`` is given (``CROSSLAYER_TIMM_TRAIN_PY``; timm's source distribution does not ship
it), one epoch of that script on a tiny ImageFolder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

from crosslayer import timm_compat  # noqa: E402

MODEL = "crosslayer_densenet_bc16_k8"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Two classes of random 32x32 RGB images, ``train`` and ``validation`` splits (timm's names)."""
    from PIL import Image

    root, rng = tmp_path_factory.mktemp("images"), np.random.default_rng(0)
    for split in ("train", "validation"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def test_registered_models_build_through_timm():
    names = timm_compat.register_with_timm()
    assert len(names) == len(timm_compat.list_models()) and timm.is_model(MODEL)
    assert timm_compat.register_with_timm() == names  # again: nothing changes
    model = timm.create_model(MODEL, pretrained=False, in_chans=3, num_classes=2, drop_rate=0.0, drop_path_rate=None,
                              drop_block_rate=None, global_pool=None, bn_momentum=None, bn_eps=None, scriptable=None,
                              checkpoint_path=None)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == model.pretrained_cfg["input_size"] and cfg["mean"] == model.pretrained_cfg["mean"]


def test_timm_data_optimizer_and_scheduler_train_a_registered_model(image_folder, one_thread):
    from timm.data import create_dataset, create_loader, resolve_data_config
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    timm_compat.register_with_timm()
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=2, drop_rate=0.1)
    data = resolve_data_config({}, model=model)
    dataset = create_dataset("", root=str(image_folder), split="train", is_training=True)
    loader = create_loader(dataset, input_size=data["input_size"], batch_size=4, is_training=True, mean=data["mean"],
                           std=data["std"], num_workers=0, device=torch.device("cpu"))
    opt = create_optimizer_v2(model, "sgd", lr=0.05, weight_decay=1e-4, layer_decay=0.7)
    scales = {g.get("lr_scale") for g in opt.param_groups}
    assert len(scales) > 2  # layer-wise decay found the stem, the blocks and the head
    sched, epochs = create_scheduler_v2(opt, "cosine", num_epochs=1, warmup_epochs=0)
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sched.step(1)
    assert torch.isfinite(loss) and epochs == 1
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()) if a.numel() > 1)


def test_timm_task_ema_evaluator_and_checkpoint_train_and_resume_a_registered_model(image_folder, tmp_path, one_thread):
    """The pieces timm's ``train.py`` composes (timm.task): the classification task with label
    smoothing, an EMA of the weights, the evaluator on the validation split, the checkpoint saver,
    and ``resume_task_checkpoint`` restoring model, EMA and optimizer into a fresh task."""
    from timm.data import create_dataset, create_loader, resolve_data_config
    from timm.optim import create_optimizer_v2
    from timm.task import ClassificationTask, load_task_ema_checkpoint, resume_task_checkpoint
    from timm.utils import CheckpointSaver

    timm_compat.register_with_timm()
    torch.manual_seed(0)

    def task_and_optimizer():
        model = timm.create_model(MODEL, num_classes=2)
        task = ClassificationTask(model, criterion_kwargs=dict(smoothing=0.1), device=torch.device("cpu"), verbose=False)
        task.setup_ema(decay=0.9)
        return task, create_optimizer_v2(task.get_trainable_module(), "sgd", lr=0.05, momentum=0.9)

    task, opt = task_and_optimizer()
    data = resolve_data_config({}, model=task.get_trainable_module())

    def loader(split):
        dataset = create_dataset("", root=str(image_folder), split=split, is_training=split == "train")
        return create_loader(dataset, input_size=data["input_size"], batch_size=4, is_training=split == "train",
                             mean=data["mean"], std=data["std"], num_workers=0, device=torch.device("cpu"))

    before = [p.detach().clone() for p in task.get_trainable_module().parameters()]
    task.train()
    for x, y in loader("train"):
        loss = task(x, y)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        task.update_ema()
    assert torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, task.get_trainable_module().parameters()) if a.numel() > 1)
    for ema in (False, True):
        evaluator, model = task.create_evaluator(), task.get_eval_model(ema=ema).eval()
        with torch.no_grad():
            for x, y in loader("validation"):
                evaluator.update(model(x), y)
        metrics = evaluator.compute()
        assert evaluator.num_samples == 8 and 0 <= metrics["top1"] <= 100 and metrics["loss"] > 0

    saver = CheckpointSaver(task.get_trainable_module(), opt, model_ema=task.get_trainable_module(ema=True),
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), task=task)
    saver.save_checkpoint(0, metric=metrics["top1"])
    resumed, resumed_opt = task_and_optimizer()
    path = str(tmp_path / "last.pth.tar")
    assert resume_task_checkpoint(resumed, path, optimizer=resumed_opt, log_info=False) == 1  # the next epoch
    load_task_ema_checkpoint(resumed, path)
    for ema in (False, True):
        a, b = task.get_eval_model(ema=ema).state_dict(), resumed.get_eval_model(ema=ema).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed_opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


@pytest.mark.skipif(not os.environ.get("CROSSLAYER_TIMM_TRAIN_PY"),
                    reason="set CROSSLAYER_TIMM_TRAIN_PY to timm's train.py (pytorch-image-models at the installed "
                           "release) to run it; its source distribution does not ship it")
def test_timm_train_script_trains_a_registered_model(image_folder, tmp_path):
    script = os.environ["CROSSLAYER_TIMM_TRAIN_PY"]
    cmd = [sys.executable, "-m", "crosslayer.timm_compat", script, str(image_folder), "--model", MODEL,
           "--num-classes", "2", "--epochs", "1", "-b", "4", "--workers", "0", "--device", "cpu", "--opt", "sgd",
           "--lr", "0.01", "--sched", "cosine", "--warmup-epochs", "0", "--output", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    [checkpoint] = tmp_path.glob(f"*-{MODEL}-*/checkpoint-0.pth.tar")
    from crosslayer.models import create_model

    model = create_model(MODEL.removeprefix(timm_compat.PREFIX), num_classes=2, checkpoint_path=str(checkpoint))
    assert model(torch.randn(1, 3, 28, 28)).shape == (1, 2)
