"""A tiny ViT's variables with every leaf perturbed (non-zero biases, class token, LayerNorm
shifts), so that every slice of every parameter is exercised."""
import jax
import jax.numpy as jnp


def perturbed_init(model, size=8):
    def init(key):
        k0, k1 = jax.random.split(key)
        v = model.init(k0, jnp.zeros((1, size, size, 3)))
        leaves, tree = jax.tree.flatten(v)
        keys = jax.random.split(k1, len(leaves))
        return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                         for x, k in zip(leaves, keys)])
    return init
