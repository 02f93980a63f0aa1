"""us3l_jax: universally slimmable self-supervised learning (US3L) in JAX/Flax."""

__version__ = "0.1.0"
