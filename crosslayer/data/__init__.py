"""Data sets and loaders.

Variants (``load_dataset(name)``):

==================  =========================================  ===========================  =====================
name                data                                        normalisation                train augmentation
==================  =========================================  ===========================  =====================
c10 / c10+          CIFAR-10 50k/10k, 3x32x32                   mean/std (0-255 scale):      none / flip, 4-px zero
                                                                125.3,123.0,113.9 /          pad (after normalising)
                                                                63.0,62.1,66.7               + random 32x32 crop
c100 / c100+        CIFAR-100 (fine labels) 50k/10k             129.3,124.1,112.4 /          none / as c10+
                                                                68.2,65.4,70.4
svhn                SVHN train+extra 604,388 / test 26,032      pixels/255 (mean 0, std 1)   none
svhn-train          SVHN train 73,257 / test 26,032             pixels/255                   none
fashion-mnist(+)    Fashion-MNIST 60k/10k, 1x28x28              0.2860 / 0.3530              none / 2-px zero pad +
                                                                                             random crop, NO flip
mnist(+)            MNIST 60k/10k, 1x28x28                      0.1307 / 0.3081              none / as fashion-mnist+
synthetic(+)        seeded toy data 512/256, 3x32x32, 10 cls    train statistics             none / as c10+
imagefolder:ROOT    ROOT/train, ROOT/val|test class folders     ImageNet mean/std            none
imagefolder+:ROOT   same                                        ImageNet mean/std            flip + pad size/8 + crop
imagenet:ROOT       ROOT/train, ROOT/val (ILSVRC-2012 layout)   ImageNet mean/std            fb.resnet.torch: random-
                                                                                             resized crop 224, colour
                                                                                             jitter, PCA lighting, flip
==================  =========================================  ===========================  =====================

Augmentation order is the official DenseNet Lua code's: normalise → flip → zero-pad → crop, so the
pad value is the mean colour. Fashion-MNIST+ does not flip: every shoe in Fashion-MNIST (train and
test) points left, so mirrored shoes are off-distribution while the symmetric garments gain nothing.
Protocol options of :func:`load_dataset` (set by the presets, docs/protocols.md): ``pad_mode``
"reflect" (Wide ResNets), ``normalize="pixel_mean_global_std"`` (stochastic depth), ``normalize="zca"``
(Wide ResNets on CIFAR: pylearn2's contrast normalisation + ZCA, fitted on the training split,
:mod:`crosslayer.data.whitening`), ``ten_crop`` (``imagenet:`` test split, fb.resnet.torch's 10 crops) and
``val_split="svhn_balanced"`` (400 + 200 images per class, stochastic depth on SVHN).
``val_size`` holds out a seeded random subset of the training images (not augmented). The
DenseNet SVHN protocol is ``load_dataset("svhn", val_size=6000)`` (which 6,000 images the paper
used is not stated; ours is a seeded uniform subset of train+extra).

Files are read in their official formats (CIFAR python pickles or their .tar.gz, SVHN .mat, IDX
[.gz], ImageFolder); see :mod:`crosslayer.data.files` for where they are looked for.
"""

from crosslayer.data.bundle import DatasetBundle
from crosslayer.data.loaders import build_loader
from crosslayer.data.registry import DATASETS, bundle_from_tensors, load_dataset

__all__ = ["load_dataset", "build_loader", "DATASETS", "DatasetBundle", "bundle_from_tensors"]
