"""Forward passes of an ``SSLModel`` on the two views, shared by the SSL methods."""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from us3l_jax.models.heads import SSLModel


def pair(model: SSLModel, fn, params, a1, a2, *args):
    """``fn`` (an ``SSLModel`` method) applied to both views: as one pass of the concatenated
    batch when BN groups cannot straddle the views (the group size divides the batch), which
    gives the same statistics as two passes with half the program and larger matmuls."""
    b = a1.shape[0]
    g = model.bn_group_size
    if g is not None and b % g == 0:
        out = model.apply({"params": params}, jnp.concatenate([a1, a2]), *args, method=fn)
        return jax.tree.map(lambda o: o[:b], out), jax.tree.map(lambda o: o[b:], out)
    return tuple(model.apply({"params": params}, a, *args, method=fn) for a in (a1, a2))


def encode(model: SSLModel, params, v1, v2, width: float, features: bool = False):
    """Projections of both views and, with ``features``, the hooked backbone features of the
    same forward (else None): (z1, z2, (f1, f2) or None)."""
    if not features:
        return *pair(model, SSLModel.encode, params, v1, v2, width), None
    (z1, f1), (z2, f2) = pair(model, SSLModel.encode_features, params, v1, v2, width)
    return z1, z2, (f1, f2)


def head(model: SSLModel, params, z1, z2, name: str | None):
    """``name`` ('predictor', 'distill_head' or None: the projections themselves) of both
    projections."""
    if name is None:
        return z1, z2
    fn = {"predictor": SSLModel.predict, "distill_head": SSLModel.distill}[name]
    return pair(model, fn, params, z1, z2)


def teacher(model: SSLModel, params, v1, v2, width: float, features: bool = False):
    """The teacher's projections of both views (and hooked features), detached."""
    return jax.lax.stop_gradient(encode(model, params, v1, v2, width, features))


def init_params(model: SSLModel, key: jax.Array, view_spec: jax.ShapeDtypeStruct) -> dict:
    """Full-width parameters from ``model.init`` on a batch shaped like one view (so grouped
    BN sees a valid batch)."""
    return flax.core.unfreeze(
        model.init(key, jnp.zeros(view_spec.shape, jnp.float32), 1.0)["params"])
