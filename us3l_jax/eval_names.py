"""The names of the evaluation choices a config can make, without the code behind them.

``config.validate`` checks ``config.eval.*`` against these tuples, so the schema imports no
evaluation code; the modules that implement the names (``us3l_jax.calibration``,
``us3l_jax.evaluate.evaluator``, ``.online``, ``.linear``) take them from here, so each name
is stated once.
"""
# Evaluation protocols (us3l_jax.evaluate.evaluator): the fast softmax probe, weighted kNN,
# the paper's linear evaluation, a supervised run's own classifier, fine-tuning transfer.
PROTOCOLS = ("fast", "knn", "paper", "top1", "finetune")
# The protocols cheap enough to monitor pretraining (us3l_jax.evaluate.online).
ONLINE_PROTOCOLS = ("knn", "fast")
# BN calibration (us3l_jax.calibration): named procedures, accumulation modes, inputs.
CALIBRATION_PRESETS = ("custom", "official_cifar", "official_imagenet")
CALIBRATION_MODES = ("cumulative", "ema")
CALIBRATION_AUGMENTS = ("linear_train", "none", "ssl")
# The paper's linear-evaluation recipes (us3l_jax.evaluate.linear.RECIPES), besides "auto".
LINEAR_RECIPES = ("cifar", "transfer", "imagenet", "vit")
# The official fine-tuning recipes (us3l_jax.evaluate.finetune.RECIPES).
FINETUNE_RECIPES = ("us", "r50_dtd", "r50_flowers", "r50_pets", "r50_aircraft", "r18_aircraft")
