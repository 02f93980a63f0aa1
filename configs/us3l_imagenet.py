"""US3L on ImageNet, 100 epochs (paper Table 4 "Ours").

    python -m us3l_jax.main --config=configs/us3l_imagenet.py:resnet50 --workdir=runs/us3l_in_r50 \
        --config.data.data_dir=/path/to/tensorflow_datasets
    python -m us3l_jax.main --config=configs/us3l_imagenet.py:resnet18 --workdir=runs/us3l_in_r18 \
        --config.data.data_dir=/path/to/tensorflow_datasets

Expected ImageNet linear accuracy (paper Table 4, %) at widths 1.0 0.75 0.5 0.25:

    resnet18  56.9 54.5 48.7 40.7
    resnet50  68.4 66.7 63.4 57.7

Linear evaluation (``--protocol=paper``) as the official configs: LARS, lr 0.8, batch 1024,
cosine over 60 epochs (the paper says it follows SimSiam, whose protocol runs 90 epochs at
batch 4096; ``--epochs=90`` for its length). BN statistics per width: the official ImageNet
calibration (EMA over 501 batches of 64 images with the SSL views).

Recipe: ``us3l_jax.recipes.us3l_imagenet`` (the paper's InfoNCE base loss, batch 512, lr 0.5,
group regularization from epoch 50, bfloat16 compute). The official README instead
recommends a BYOL-based config (lr 0.05, batch 480). Data: ImageNet prepared
as ArrayRecord with ``python -m us3l_jax.data.prepare imagenet2012
--manual_dir=<dir with ILSVRC2012_img_train.tar> --data_dir=...``; it streams from the host
(decode + crops on ``config.data.num_threads`` threads, measured ~370 images/s per core).
"""
from us3l_jax import recipes


def get_config(arg: str | None = None):
    a = recipes.parse_args(arg, ("arch",), ("resnet50",))
    c = recipes.us3l_imagenet(a["arch"])
    c.eval.paper_row = f"table4/{a['arch']}/ours"
    return c
