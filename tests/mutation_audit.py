"""Break one behaviour at a time in a scratch copy of the repository and run the tests that claim it.

    python tests/mutation_audit.py            # every break; a Markdown table of caught / missed
    python tests/mutation_audit.py --list     # the breaks and the tests each one runs
    python tests/mutation_audit.py --only label-smoothing cifar-pad-2

``BREAKS`` is a hand-kept list: a name, the file, a piece of its text, what it is replaced with, and
the pytest arguments that should catch it. The working tree (tracked and untracked, not ignored
files) is copied to a temporary folder once; each break is written there, its tests run with one
thread (``OMP_NUM_THREADS=1``), the file is restored. Caught = pytest failed; missed = it passed;
stale = the text is no longer in the file (the code moved: update the entry). Exit status 1 when a
break is missed or stale. Not part of ``make test`` (``make audit``): it runs pytest once per break.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "tests/test_recipe_reaches_training.py"


@dataclass(frozen=True)
class Break:
    name: str
    what: str  # the behaviour it breaks
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments


BREAKS = [
    # the optimiser, the loss and the augmentation that training builds
    Break("label-smoothing", "the loss ignores the preset's label smoothing", "crosslayer/train/loop.py",
          "nn.CrossEntropyLoss(label_smoothing=float(cfg.label_smoothing or 0.0))", "nn.CrossEntropyLoss()",
          (RECIPE, "-k", "loss")),
    Break("no-nesterov", "SGD without Nesterov although the preset says Nesterov", "crosslayer/train/loop.py",
          "nesterov=bool(cfg.nesterov) and cfg.momentum > 0,", "nesterov=False,", (RECIPE, "-k", "optimizer")),
    Break("decay-weights-only", "weight decay on the weights only, not on BatchNorm and biases",
          "crosslayer/train/loop.py", 'else [{"params": list(self.model.parameters())}])',
          "else [{'params': [p for p in self.model.parameters() if p.dim() > 1]}, "
          "{'params': [p for p in self.model.parameters() if p.dim() <= 1], 'weight_decay': 0.0}])",
          (RECIPE, "-k", "optimizer")),
    Break("preset-milestone-shift", "the DenseNet preset decays one epoch late (Lua 1-indexing lost)",
          "crosslayer/train/presets.py", "milestone_shift=-1, drop_rate_no_aug=0.2,", "milestone_shift=0, drop_rate_no_aug=0.2,",
          ("tests/test_train.py", "-k", "presets_match")),
    Break("preset-docs-stale", "a preset changed and docs/protocols.md's tables not regenerated",
          "crosslayer/train/presets.py", "epochs=164, batch_size=128,", "epochs=165, batch_size=128,",
          ("tests/test_docs.py", "-k", "protocol_tables")),
    Break("cifar-pad-2", "CIFAR random crop of a 2-px instead of a 4-px padding", "crosslayer/data/registry.py",
          "_CIFAR_AUG = Augment(pad=4, flip=True)", "_CIFAR_AUG = Augment(pad=2, flip=True)",
          (RECIPE, "-k", "augmentation")),
    Break("svhn-augmented", "SVHN gets the CIFAR augmentation", "crosslayer/data/registry.py",
          '"svhn": Variant("svhn", None, **_SVHN,', '"svhn": Variant("svhn", _CIFAR_AUG, **_SVHN,',
          (RECIPE, "-k", "augmentation")),
    Break("gray-flip", "Fashion-MNIST+/MNIST+ mirrored", "crosslayer/data/registry.py",
          "_GRAY_AUG = Augment(pad=2, flip=False)", "_GRAY_AUG = Augment(pad=2, flip=True)",
          (RECIPE, "-k", "augmentation")),
    Break("fast-path-no-flip", "the device-resident loader never mirrors", "crosslayer/data/transforms.py",
          "cols = torch.where(flip[:, None], (wp - 1) - cols, cols)", "cols = cols", (RECIPE, "-k", "augmentation")),
    Break("wrn-pad-mode-ignored", "the WRN preset's reflection padding never reaches the data", "crosslayer/data/registry.py",
          "classes, mean, std, with_padding(v.aug, pad_mode), source,", "classes, mean, std, v.aug, source,",
          (RECIPE, "-k", "wrn")),
    # data loaders
    Break("epoch-order-fixed", "every epoch visits the images in the same order", "crosslayer/data/loaders.py",
          "g.manual_seed(seed + epoch)", "g.manual_seed(seed)", ("tests/test_data.py",)),
    Break("eval-augmented", "evaluation batches get the training augmentation", "crosslayer/data/loaders.py",
          'want_aug = bool(train and split == "train" and bundle.augment)', "want_aug = bool(bundle.augment)",
          (RECIPE, "-k", "evaluation")),
    # compiled-kernel cache
    Break("cache-key-cpu-flags", "the kernel cache name ignores the CPU flags", "crosslayer/ops/cpu_kernels.py",
          " + _cpu_flags().encode()", "", ("tests/test_cpu_kernels.py", "-k", "cache_key")),
    Break("cache-key-torch", "the kernel cache name ignores the torch version", "crosslayer/ops/cpu_kernels.py",
          "torch.__version__.encode() + ", "", ("tests/test_cpu_kernels.py", "-k", "cache_key")),
    # fused vs plain, memory-efficient mode, double backward
    Break("fused-transition-pool", "the fused transition max-pools instead of averaging", "crosslayer/ops/dense_block.py",
          "                pooled = F.avg_pool2d(feats.nchw(y), 2)",
          "                pooled = F.max_pool2d(feats.nchw(y), 2)",
          ("tests/test_memory_efficient.py", "-k", "equal_plain_form")),
    Break("deluge-bank-drops-grad", "DelugeNet's shared norm drops the gradient that does not come through the bank",
          "crosslayer/ops/deluge.py", "grad = banked if grad is None else grad if banked is None else grad + banked",
          "grad = banked if banked is not None else grad", ("tests/test_delugenet.py", "-k", "direct_gradient")),
    Break("fused-dropout-mask-unused", "the fused blocks' backward ignores the dropout masks", "crosslayer/ops/dense_block.py",
          "    return grad if mask is None else grad * mask", "    return grad",
          ("tests/test_memory_efficient.py", "-k", "equal_plain_form")),
    Break("fused-check-never-renewed", "the fused path's cached structure check ignores in-place attribute changes",
          "crosslayer/ops/dispatch.py", " or e.snapshot() != e.values:", ":",
          ("tests/test_memory_efficient.py", "-k", "once_per_structure")),
    Break("memory-efficient-ignored", "memory-efficient mode keeps what it should recompute",
          "crosslayer/ops/dense_block.py", "recompute = any(layer.memory_efficient for layer in block.values())",
          "recompute = False",
          ("tests/test_memory_efficient.py", "-k", "saves_less")),
    Break("double-backward-allowed", "double backward through the fused paths is not refused",
          "crosslayer/ops/defaults.py", "    if torch.is_grad_enabled():\n        raise RuntimeError(f\"{node}",
          "    if False:\n        raise RuntimeError(f\"{node}", ("tests/test_ops.py", "-k", "double")),
    Break("densenet-bottleneck-2k", "DenseNet-B bottleneck of 2k instead of 4k channels", "crosslayer/models/densenet.py",
          "compression: float = 0.5, bn_size: int = 4,", "compression: float = 0.5, bn_size: int = 2,",
          ("tests/test_models.py", "-k", "cifar_param_counts")),
    # resume exactness and checkpoints
    Break("resume-rng-lost", "a resumed run does not restore the RNG state", "crosslayer/train/loop.py",
          '            ck.restore_rng_state(st.get("rng"))', "            pass",
          ("tests/test_resume_proof.py::test_mid_epoch_resume_runs_only_the_remaining_steps",)),
    Break("resume-restarts-epoch", "a mid-epoch resume reruns the epoch from its first batch",
          "crosslayer/data/loaders.py", "for b in range(self.start_batch, len(self)):", "for b in range(len(self)):",
          ("tests/test_resume_proof.py::test_mid_epoch_resume_runs_only_the_remaining_steps",)),
    Break("checkpoint-not-atomic", "checkpoints written in place instead of to a temporary file and renamed",
          "crosslayer/io.py", "        _write_tmp(tmp, content)\n", "        _write_tmp(path, content)\n",
          ("tests/test_reliability.py", "-k", "full_disk_keeps_previous or interrupt_during_write")),
    Break("checkpoint-prev-dropped", "the previous checkpoint is not kept as .prev",
          "crosslayer/train/checkpoint/save.py", "before_replace=_keep_previous if keep_previous else None",
          "before_replace=None", ("tests/test_reliability.py", "-k", "previous_checkpoint_is_kept")),
    Break("non-finite-loss-ignored", "a NaN loss does not stop training", "crosslayer/train/loop.py",
          "bad = (~torch.isfinite(torch.stack(losses))).float() if losses else signal[:0]",
          "bad = torch.zeros(len(losses), device=signal.device) if losses else signal[:0]",
          ("tests/test_reliability.py", "-k", "nan_loss")),
    # evaluation, predict, export
    Break("tta-flip-ignored", "--tta flip evaluates the image only", "crosslayer/train/evaluate.py",
          'return (out + model(x.flip(3)).float()) / 2 if tta == "flip" else out', "return out",
          ("tests/test_tta.py", "-k", "mirror or changes_the_predictions")),
    Break("predict-not-normalised", "predict feeds unnormalised images", "crosslayer/models/pretrained.py",
          "T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))])",
          "T.ToDtype(torch.float32, scale=True)])", ("tests/test_predict.py", "-k", "normalisation")),
    # the study
    Break("study-models-filter-ignored", "--models trains every model of the converged study",
          "crosslayer/analysis/study.py", "and (only is None or models[size] in only)]", "]",
          ("tests/test_study.py", "-k", "models_flag")),
    Break("study-busy-run-fails", "a run another process holds stops the study instead of being skipped",
          "crosslayer/analysis/study.py", "except RunDirBusy as e:", "except KeyError as e:",
          ("tests/test_study.py", "-k", "another_process")),
    Break("study-workers-ignored", "--workers N trains in one process", "crosslayer/analysis/study.py",
          "    if workers > 1:\n", "    if False:\n", ("tests/test_study.py", "-k", "two_workers")),
    Break("export-check-skipped", "an export that differs from the eager model is written", "crosslayer/export.py",
          "if not diff < atol:", "if False:", ("tests/test_export.py", "-k", "fails_atomically")),
]


def scratch_copy(dst: Path) -> None:
    """The working tree's tracked and untracked (not ignored) files, copied under ``dst``."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def run_break(b: Break, copy: Path, timeout: int) -> str:
    path = copy / b.file
    original = path.read_text()
    if original.count(b.old) != 1:
        return "stale"
    path.write_text(original.replace(b.old, b.new))
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *b.tests], cwd=copy,
                           env=env, capture_output=True, text=True, timeout=timeout)
        return {0: "missed", 1: "caught"}.get(r.returncode, f"error (pytest exit {r.returncode})")
    except subprocess.TimeoutExpired:
        return "timeout"
    finally:
        path.write_text(original)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these breaks only")
    p.add_argument("--list", action="store_true", help="print the breaks and their tests, run nothing")
    p.add_argument("--timeout", type=int, default=900, help="seconds per break (default 900)")
    args = p.parse_args(argv)
    known = {b.name for b in BREAKS}
    unknown = sorted(set(args.only or ()) - known)
    if unknown:
        p.error(f"--only: unknown break {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    breaks = [b for b in BREAKS if not args.only or b.name in args.only]
    if args.list:
        for b in breaks:
            print(f"{b.name:<26} {b.file}: {b.what}\n{'':<26} pytest {' '.join(b.tests)}")
        return 0
    print("| break | what it breaks | tests run | result |\n|---|---|---|---|", flush=True)
    bad = 0
    with tempfile.TemporaryDirectory(prefix="crosslayer-audit-") as tmp:
        scratch_copy(Path(tmp))
        for b in breaks:
            result = run_break(b, Path(tmp), args.timeout)
            bad += result != "caught"
            print(f"| {b.name} | {b.what} (`{b.file}`) | `{' '.join(b.tests)}` | {result} |", flush=True)
    print(f"\n{len(breaks) - bad} of {len(breaks)} breaks caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
