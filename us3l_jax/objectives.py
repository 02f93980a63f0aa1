"""SSL objectives of US3L: NT-Xent, InfoNCE distillation and negative cosine.

Pure functions on arrays (how they relate to the official losses: docs/fidelity.md,
"Losses"). All math runs in float32 whatever the input dtype, and the contrastive losses use
log-sum-exp (the official code uses plain exp/log, which overflows for
small temperatures; the values agree otherwise).

Negatives can be restricted to groups of ``group_size`` consecutive examples: the batch is
reshaped to (B/g, g, D), each group is an independent NT-Xent problem, and the loss is the mean
over groups. The official CNN code computes its losses per GPU (128 examples, no all_gather),
so ``group_size=128`` reproduces it on any number of devices; ``None`` uses the whole batch.

Nothing here stops gradients: callers pass ``jax.lax.stop_gradient(teacher)`` where the
official code detaches (momentum-teacher outputs, SimSiam/BYOL targets).

Arguments a config sets (temperatures, group sizes) raise ``ValueError``; arrays of the wrong
rank or shape are a bug in the caller and fail chex assertions (``AssertionError``), checked
when the step is traced.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping

import chex
import jax
import jax.numpy as jnp

Array = jax.Array

# Names accepted by the lookups; "mse" is the paper's name for the negative cosine.

_NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize
_COSINE_EPS = 1e-8  # torch.nn.CosineSimilarity


def l2_normalize(x: Array, eps: float = _NORMALIZE_EPS) -> Array:
    """Rows divided by ``max(||x||, eps)`` in float32, as ``F.normalize(x, dim=-1)``.

    The norm is ``sqrt(max(sum x², eps²))``: the same value as clamping the norm, but with a
    finite gradient at a zero row (``sqrt`` at 0 has none).
    """
    x = jnp.asarray(x, jnp.float32)
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _check_tau(tau: float) -> None:
    # A traced temperature (e.g. a schedule) cannot be checked here; concrete ones must be > 0.
    if isinstance(tau, numbers.Real) and not tau > 0:
        raise ValueError(f"temperature tau must be > 0, got {tau!r}")


def _check_pair(a: Array, b: Array, what: str) -> None:
    chex.assert_rank([a, b], 2, custom_message=f"{what} takes (batch, dim) embeddings")
    chex.assert_equal_shape([a, b], custom_message=f"{what} takes two arrays of the same shape")


def _groups(batch: int, group_size: int | None) -> int:
    """Group size to use; raises if ``batch`` does not split into whole groups."""
    if group_size is None:
        return batch
    g = int(group_size)
    if g != group_size or g <= 0 or batch % g:
        raise ValueError(
            f"batch {batch} is not divisible by the loss group size {group_size!r}; use a "
            f"positive divisor of the batch, or None for the whole batch")
    return g


def nt_xent(a: Array, b: Array, tau: float, group_size: int | None = None) -> Array:
    """NT-Xent with the official ``nt_xentv2`` semantics.

    Rows of ``a`` and ``b`` (B, D) are L2-normalised and stacked to X = [n(a); n(b)] (2B rows).
    Row i's positive is its partner in the other half; its denominator sums over all 2B−1 other
    rows (positive included, self excluded). Returns the mean over the 2B rows (and over groups
    when ``group_size`` splits the batch). Symmetric: ``nt_xent(a, b) == nt_xent(b, a)``.
    """
    _check_tau(tau)
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    _check_pair(a, b, "nt_xent")
    batch, dim = a.shape
    g = _groups(batch, group_size)
    za = l2_normalize(a).reshape(batch // g, g, dim)
    zb = l2_normalize(b).reshape(batch // g, g, dim)
    x = jnp.concatenate([za, zb], axis=1)  # (groups, 2g, D)
    # The similarity matrix is tiny next to the backbone: keep it in full float32 precision
    # (no TF32/bf16 passes on accelerators).
    logits = jnp.einsum("nid,njd->nij", x, x, precision=jax.lax.Precision.HIGHEST) / tau
    self_mask = jnp.eye(2 * g, dtype=bool)
    logits = jnp.where(self_mask, -jnp.inf, logits)
    pos = jnp.sum(za * zb, axis=-1) / tau  # (groups, g)
    pos = jnp.concatenate([pos, pos], axis=1)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - pos)


def simclr_infonce(z1: Array, z2: Array, tau: float, group_size: int | None = None) -> Array:
    """SimCLR base loss (``InfoNCEv2``): NT-Xent between the two online views."""
    return nt_xent(z1, z2, tau, group_size)


def infonce_distill(s1: Array, s2: Array, t1: Array, t2: Array, tau: float,
                    group_size: int | None = None) -> Array:
    """``InfoNCEv2_distill``: ½[NT-Xent(s1, t2) + NT-Xent(s2, t1)].

    Cross-view pairs only (student view v against teacher view u ≠ v). This is the US3L base
    loss (students = online max-width outputs, teachers = momentum-encoder outputs) and the
    InfoNCE distillation loss of paper Eq. 7. The teacher arrays are used as given: wrap them
    in ``jax.lax.stop_gradient`` where the teacher must not learn (as the official code does).
    """
    return 0.5 * (nt_xent(s1, t2, tau, group_size) + nt_xent(s2, t1, tau, group_size))


def moco_v3_contrast(q: Array, k: Array, tau: float, group_size: int | None = None) -> Array:
    """MoCo v3's ``contrastive_loss``: cross-entropy of the logits n(q)·n(k)ᵀ/τ with the
    positive on the diagonal (query i against key i; the other keys are negatives), times 2τ.
    Keys from the **whole batch** (``group_size=None``) equal the official all-gathered keys:
    the official per-GPU losses over local queries against all keys, averaged by DDP, are the
    mean over all queries. A ``group_size`` splits the batch into independent problems."""
    _check_tau(tau)
    q, k = jnp.asarray(q), jnp.asarray(k)
    _check_pair(q, k, "moco_v3_contrast")
    batch, dim = q.shape
    g = _groups(batch, group_size)
    qn = l2_normalize(q).reshape(batch // g, g, dim)
    kn = l2_normalize(k).reshape(batch // g, g, dim)
    logits = jnp.einsum("nid,njd->nij", qn, kn, precision=jax.lax.Precision.HIGHEST) / tau
    pos = jnp.sum(qn * kn, axis=-1) / tau
    return 2.0 * tau * jnp.mean(jax.nn.logsumexp(logits, axis=-1) - pos)


def moco_v3(q1: Array, q2: Array, k1: Array, k2: Array, tau: float,
            group_size: int | None = None) -> Array:
    """The symmetric MoCo v3 loss ctr(q1, k2) + ctr(q2, k1) (a sum, as the official code):
    the base loss of MoCo v3 and, with students' queries, the ViT US3L distillation loss."""
    return moco_v3_contrast(q1, k2, tau, group_size) + moco_v3_contrast(q2, k1, tau, group_size)


def _cosine(x: Array, y: Array) -> Array:
    """Row-wise cosine similarity, each norm clamped at 1e-8 (``nn.CosineSimilarity(dim=1)``)."""
    return jnp.sum(l2_normalize(x, _COSINE_EPS) * l2_normalize(y, _COSINE_EPS), axis=-1)


def neg_cosine(p1: Array, p2: Array, t1: Array, t2: Array) -> Array:
    """The paper's "MSE" loss, really −cos: −½[mean cos(p2, t1) + mean cos(p1, t2)].

    Cross-view pairs only; range [−1, 1]. (The true MSE of normalised vectors, 2 − 2cos, has
    twice this gradient; the official learning rates assume this convention.)
    """
    for p, t in ((p1, t2), (p2, t1)):
        _check_pair(jnp.asarray(p), jnp.asarray(t), "neg_cosine")
    return -0.5 * (jnp.mean(_cosine(p2, t1)) + jnp.mean(_cosine(p1, t2)))


def feature_mse(s1: Mapping[str, Array], s2: Mapping[str, Array], t1: Mapping[str, Array],
                t2: Mapping[str, Array]) -> Array:
    """Intermediate-feature distillation loss (official ResNet-50 configs; docs/fidelity.md).

    ``s1``/``s2``: the student's feature maps of views 1/2 by layer (already mapped to full
    width), ``t1``/``t2``: the teacher's. Mean squared error over all elements of each pair,
    averaged over the layers and the two cross-view pairs (s1 vs t2, s2 vs t1). As in the
    official code, the paired maps come from different crops, so they are not spatially
    aligned. Float32 whatever the input dtype.
    """
    if not (set(s1) == set(s2) == set(t1) == set(t2)) or not s1:
        raise ValueError(f"feature_mse needs the same non-empty layers in every argument, got "
                         f"{sorted(s1)}, {sorted(s2)}, {sorted(t1)}, {sorted(t2)}")
    terms = []
    for name in s1:
        for s, t in ((s1[name], t2[name]), (s2[name], t1[name])):
            chex.assert_equal_shape([s, t], custom_message=f"feature_mse: layer {name!r}, "
                                    f"student and teacher maps differ")
            d = jnp.asarray(s, jnp.float32) - jnp.asarray(t, jnp.float32)
            terms.append(jnp.mean(jnp.square(d)))
    return sum(terms) / len(terms)


def embedding_std(z: Array) -> Array:
    """Per-dimension std over the batch of L2-normalised embeddings, averaged over dimensions.

    SimSiam's collapse monitor: about 1/sqrt(D) for well-spread embeddings, 0 when all
    outputs collapse to one vector. Population std (ddof 0).
    """
    z = jnp.asarray(z)
    chex.assert_rank(z, 2, custom_message="embedding_std takes (batch, dim) embeddings")
    return jnp.mean(jnp.std(l2_normalize(z), axis=0))


def _queue_logits(x: Array, pos: Array, queue: Array, tau: float) -> Array:
    """[x·pos, x·queue_1, ..., x·queue_K] / tau for L2-normalised rows (B, 1 + K)."""
    chex.assert_shape(queue, (None, x.shape[-1]), custom_message=(
        "the key queue is (size, dim), one key a row (the official MoCo buffer, (dim, size), "
        "transposed)"))
    l_pos = jnp.sum(x * pos, axis=-1, keepdims=True)
    l_neg = jnp.einsum("nd,kd->nk", x, jnp.asarray(queue, jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([l_pos, l_neg], axis=1) / tau


def seed_distill(student: Array, teacher: Array, queue: Array, tau_student: float,
                 tau_teacher: float) -> Array:
    """SEED's loss: soft cross-entropy between the teacher's and the student's similarity
    distributions over [the teacher embedding, the K queued teacher embeddings].

    Both embeddings are L2-normalised; the student's logits are [s·t, s·Q] / tau_student, the
    teacher's target is softmax([t·t, t·Q] / tau_teacher) (detached by the caller). Returns
    −Σ p_teacher · log_softmax(student logits), averaged over the batch.
    """
    _check_tau(tau_student)
    _check_tau(tau_teacher)
    _check_pair(jnp.asarray(student), jnp.asarray(teacher), "seed_distill")
    s, t = l2_normalize(student), l2_normalize(teacher)
    p_teacher = jax.nn.softmax(_queue_logits(t, t, queue, tau_teacher), axis=-1)
    log_p_student = jax.nn.log_softmax(_queue_logits(s, t, queue, tau_student), axis=-1)
    return -jnp.mean(jnp.sum(p_teacher * log_p_student, axis=-1))


def moco_infonce(q: Array, k: Array, queue: Array, tau: float) -> Array:
    """MoCo v2's loss: cross-entropy of logits [q·k, q·Q] / tau with the positive key at index
    0, averaged over the batch (q, k L2-normalised here; k and the queue detached by the
    caller)."""
    _check_tau(tau)
    _check_pair(jnp.asarray(q), jnp.asarray(k), "moco_infonce")
    logits = _queue_logits(l2_normalize(q), l2_normalize(k), queue, tau)
    return -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[:, 0])


def vicreg(za: Array, zb: Array, group_size: int | None = None,
           weights: tuple[float, float, float] = (25.0, 25.0, 1.0)) -> Array:
    """VICReg (Bardes et al., 2022): ``sim * invariance + var * variance + cov * covariance``
    of two (batch, dim) embeddings, float32. Invariance: the mean squared difference;
    variance: the hinge ``relu(1 - sqrt(var + 1e-4))`` per dimension, averaged, for each
    branch (mean of the two); covariance: the squared off-diagonal covariances divided by
    the dimension, summed over the branches. Statistics are per group of ``group_size``
    consecutive examples (the mean over groups), as the other losses' negatives."""
    _check_pair(za, zb, "vicreg")
    b, d = za.shape
    g = _groups(b, group_size)
    if g < 2:  # the unbiased variance and covariance of one example divide by zero
        raise ValueError(f"vicreg needs at least 2 examples per group, got group size {g}")
    za, zb = (jnp.asarray(z, jnp.float32).reshape(b // g, g, d) for z in (za, zb))
    invariance = jnp.mean(jnp.square(za - zb))

    def regularizers(z):
        z = z - jnp.mean(z, axis=1, keepdims=True)
        std = jnp.sqrt(jnp.var(z, axis=1, ddof=1) + 1e-4)
        cov = jnp.einsum("ngi,ngj->nij", z, z) / (g - 1)
        off = jnp.sum(jnp.square(cov), axis=(1, 2)) - jnp.sum(
            jnp.square(jnp.diagonal(cov, axis1=1, axis2=2)), axis=1)
        return jnp.mean(jax.nn.relu(1.0 - std)), jnp.mean(off) / d

    (va, ca), (vb, cb) = regularizers(za), regularizers(zb)
    sim, var, cov = weights
    return sim * invariance + var * (va + vb) / 2 + cov * (ca + cb)
