"""Input pipeline.

* ``datasets``: ``load(name, split)`` -> in-memory ``ArrayDataset`` (TFDS without TensorFlow,
  sklearn digits, an image folder); ``open_source`` for streaming; ``DatasetNotFoundError``
  (never downloads).
* ``folder``: your own images, ImageFolder layout (train/<class>/, val/<class>/) or
  unlabelled, read with PIL.
* ``feeding``: ``DeviceDataset`` (images once on device, sharded over ``data``),
  ``TrainFeeder`` (batch at step k = f(seed, k)), ``eval_batches`` (each example once, masked).
* ``streaming``: grain pipeline for ImageNet-size data (host decode + crops, resumable).
* ``augment``: jitted, per-example SSL / linear-eval / eval views on device.
* ``host_transforms``: torchvision-on-PIL geometry for the host side.
"""
