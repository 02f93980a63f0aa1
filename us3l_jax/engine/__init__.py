"""The training engine: runs any ``us3l_jax.methods`` method over sampled widths."""
from us3l_jax.engine.engine import UPDATE_MODES, Engine, init_state
from us3l_jax.engine.grads import device_local_groups
from us3l_jax.engine.programs import Programs
from us3l_jax.engine.state import TrainState

__all__ = ["Engine", "Programs", "TrainState", "UPDATE_MODES", "device_local_groups",
           "init_state"]
