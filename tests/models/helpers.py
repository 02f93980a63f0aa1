"""Shape-only inspection of models: output channels of every submodule at a width, traced with
``jax.eval_shape`` (no compilation, so full-size models are cheap to check)."""
import functools

import jax
import jax.numpy as jnp
from flax import traverse_util


@functools.lru_cache(maxsize=None)
def _abstract_params(model, size):
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)


def output_channels(model, width, size=32):
    """{'layer1_0/conv1': channels, ...} for every submodule, from traced shapes."""
    variables = _abstract_params(model, size)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)

    def run(v, x):
        return model.apply(v, x, width=width, train=True, capture_intermediates=True,
                           mutable=["intermediates"])

    out, state = jax.eval_shape(run, variables, x)
    flat = traverse_util.flatten_dict(state["intermediates"], sep="/")
    chans = {k[: -len("/__call__")]: v[0].shape[-1] for k, v in flat.items()
             if k.endswith("/__call__")}
    return out, chans
