"""us3l_jax: universally slimmable self-supervised learning (US3L, CVPR 2023) in JAX/Flax.

Dependencies are compatible ranges: the floor is the version we test (the exact set, with
every transitive dependency, is ``requirements.lock``, which CI installs with
``pip install -c requirements.lock``), the ceiling is the next minor release, which we have
not tested. So ``pip install us3l_jax`` into Colab or a TPU VM keeps a preinstalled JAX that
is in range instead of replacing it.

A few ranges reach past the locked minor to releases verified on Python 3.12 (docs/launch.md,
"Verified versions"): JAX 0.11 and 0.12 (which need Python >= 3.12; CI's Python 3.11 set stays
on 0.10.2), NumPy 2.5, and orbax-checkpoint down to 0.12.4 (a GPU image's version).

Extras: ``[cuda12]`` / ``[cuda13]`` / ``[tpu]`` (JAX for NVIDIA GPUs with CUDA 12 or 13 /
Cloud TPUs, same range), ``[prepare]``
(TensorFlow, for ``python -m us3l_jax.data.prepare`` of CIFAR / ImageNet; training reads the
prepared ArrayRecord files without it), ``[wandb]`` (Weights & Biases, for
``--config.train.wandb_project``), ``[test]`` (pytest, pytest-xdist to run the suite on both
cores, nbclient + ipykernel to execute the notebook, and the export and wandb extras' packages).
"""
from setuptools import find_packages, setup

# 0.10.2 is CI's (Python 3.11); 0.11.2 and 0.12.0.1 were verified on Python 3.12.
JAX = ">=0.10.2,<0.13"

INSTALL_REQUIRES = [
    "jax" + JAX,
    "jaxlib" + JAX,
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    # 0.12.4: what a CUDA 13 image with JAX 0.11.2 ships; its checkpoint tests were run.
    "orbax-checkpoint>=0.12.4,<0.13",
    "tensorflow-datasets>=4.9.10,<4.10",
    "ml-collections>=1.1.0,<1.2",
    "chex>=0.1.92,<0.2",
    "absl-py>=2.5.1,<2.6",
    # 2.5 comes with JAX 0.11+ on Python 3.12 (verified there).
    "numpy>=2.4.6,<2.6",
    # Streaming input for ImageNet-size data: tfds.data_source + grain need no TensorFlow.
    "grain>=0.2.18,<0.3",
    # Bundled offline digits dataset for demos and real-data tests.
    "scikit-learn>=1.9.1,<1.10",
    # Colour-space ops with documented semantics (jitter, grayscale) instead of our own.
    "dm-pix>=0.4.5,<0.5",
    # The StableHLO export file: jax.export's serialization imports it, jax does not require it.
    "flatbuffers>=25.12.19,<25.13",
    # Torch-layout weight files without a torch dependency.
    "safetensors>=0.8.0,<0.9",
    # TensorBoard event files without TensorFlow.
    "tensorboardX>=2.6.5,<2.7",
    # Width-sweep plots.
    "matplotlib>=3.11.2,<3.12",
]

# ONNX export (python -m us3l_jax.export) and its verification. jax2onnx 0.13.0 is the newest
# release compatible with orbax-checkpoint 0.12.8 (0.13.1+ require orbax-checkpoint < 0.11.37,
# so pip's resolver keeps 0.13.0 within this range).
EXPORT_REQUIRES = ["jax2onnx>=0.13.0,<0.14", "onnxruntime>=1.32.0,<1.33"]

# Metrics to a Weights & Biases project as well (config.train.wandb_project).
WANDB_REQUIRES = ["wandb>=0.31.0,<0.32"]

EXTRAS_REQUIRE = {
    "cuda12": ["jax[cuda12]" + JAX],
    "cuda13": ["jax[cuda13]" + JAX],
    "tpu": ["jax[tpu]" + JAX],
    # TFDS builds with TensorFlow; etils needs importlib_resources for a builder's files.
    "prepare": ["tensorflow>=2.21.0,<2.22", "importlib-resources>=7.1.0,<7.2"],
    "export": EXPORT_REQUIRES,
    "wandb": WANDB_REQUIRES,
    "test": ["pytest>=9.2.0,<9.3", "pytest-xdist>=3.8.0,<3.9", "nbclient>=0.11.0,<0.12",
             "nbformat>=5.11.1,<5.12",
             "ipykernel>=7.4.0,<7.5", *EXPORT_REQUIRES, *WANDB_REQUIRES],
}

setup(
    name="us3l_jax",
    version="0.1.0",
    description="Universally slimmable self-supervised learning (US3L) in JAX/Flax",
    # The configs travel inside a wheel as us3l_jax/configs/*.py (a wheel carries no
    # configs/ folder of its own), so a wheel install, e.g. in Colab, can run them:
    # --config=configs/demo.py falls back to them where ./configs has no such file.
    packages=find_packages(include=["us3l_jax", "us3l_jax.*"]) + ["us3l_jax.configs"],
    package_dir={"us3l_jax.configs": "configs"},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["us3l=us3l_jax.main:run"]},
)
