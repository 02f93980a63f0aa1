"""The evaluation names the config validates against (``us3l_jax.eval_names``) are the ones
the evaluation code accepts."""
from us3l_jax import calibration, eval_names
from us3l_jax.evaluate import evaluator, finetune, linear, online


def test_registry_names_are_the_implementations_names():
    assert tuple(linear.RECIPES) == eval_names.LINEAR_RECIPES
    assert tuple(finetune.RECIPES) == eval_names.FINETUNE_RECIPES
    assert evaluator.PROTOCOLS == eval_names.PROTOCOLS
    assert set(online.ONLINE_PROTOCOLS) <= set(eval_names.PROTOCOLS)
    assert (calibration.PRESETS, calibration.MODES, calibration.AUGMENTS) == (
        eval_names.CALIBRATION_PRESETS, eval_names.CALIBRATION_MODES,
        eval_names.CALIBRATION_AUGMENTS)
