"""us3l_jax: universally slimmable self-supervised learning (US3L, CVPR 2023) in JAX/Flax.

Versions are pinned to a set verified together on Python 3.11 (CPU, 2026-11-21):
`pip install -e .[test]` then `pip check` is clean.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-datasets==4.9.10",
    "ml-collections==1.1.0",
    "chex==0.1.92",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    # Streaming input for ImageNet-size data: tfds.data_source + grain need no TensorFlow.
    "grain==0.2.18",
    # Bundled offline digits dataset for demos and real-data tests.
    "scikit-learn==1.9.1",
    # Colour-space ops with documented semantics (jitter, grayscale) instead of our own.
    "dm-pix==0.4.5",
    # Torch-layout weight files without a torch dependency.
    "safetensors==0.8.0",
    # TensorBoard event files without TensorFlow.
    "tensorboardX==2.6.5",
    # Width-sweep plots.
    "matplotlib==3.11.2",
]

# ONNX export (python -m us3l_jax.export) and its verification. jax2onnx 0.13.0 is the newest
# release compatible with orbax-checkpoint 0.12.8 (0.13.1+ require orbax-checkpoint < 0.11.37).
EXPORT_REQUIRES = ["jax2onnx==0.13.0", "onnxruntime==1.32.0"]

setup(
    name="us3l_jax",
    version="0.1.0",
    description="Universally slimmable self-supervised learning (US3L) in JAX/Flax",
    packages=find_packages(include=["us3l_jax", "us3l_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest==9.2.0", *EXPORT_REQUIRES], "export": EXPORT_REQUIRES},
    entry_points={"console_scripts": ["us3l=us3l_jax.main:run"]},
)
