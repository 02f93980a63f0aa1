"""The key queue of MoCo v2 / SEED: contents and pointer after k enqueues, as the official
``_dequeue_and_enqueue`` (write at the pointer, advance by the batch modulo K)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from us3l_jax import keyqueue


def test_init_is_unit_rows_and_pointer_zero():
    q = keyqueue.init(jax.random.key(0), 12, 5)
    assert q["keys"].shape == (12, 5) and int(q["ptr"]) == 0
    np.testing.assert_allclose(np.linalg.norm(q["keys"], axis=1), 1.0, rtol=1e-6)


def test_contents_after_k_enqueues():
    q = keyqueue.init(jax.random.key(0), 8, 3)
    initial = np.asarray(q["keys"])
    enq = jax.jit(keyqueue.enqueue)
    batches = [np.full((4, 3), float(i + 1), np.float32) for i in range(3)]
    q = enq(q, batches[0])
    np.testing.assert_array_equal(q["keys"][:4], batches[0])  # written at 0
    np.testing.assert_array_equal(q["keys"][4:], initial[4:])  # the rest untouched
    assert int(q["ptr"]) == 4
    q = enq(q, batches[1])
    assert int(q["ptr"]) == 0  # wrapped around
    q = enq(q, batches[2])  # the oldest batch (1) is replaced first
    np.testing.assert_array_equal(q["keys"], np.concatenate([batches[2], batches[1]]))
    assert int(q["ptr"]) == 4


def test_batch_must_divide_the_queue():
    q = keyqueue.init(jax.random.key(0), 8, 3)
    with pytest.raises(ValueError, match="queue size 8 must be a multiple of the batch size 3"):
        keyqueue.enqueue(q, jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match="queue size must be > 0"):
        keyqueue.init(jax.random.key(0), 0, 3)
