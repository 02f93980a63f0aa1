"""US3L on ImageNet, 100 epochs (paper Table 4 "Ours").

    python -m us3l_jax.main --config=configs/us3l_imagenet.py:resnet50 --workdir=runs/us3l_in_r50 \
        --config.data.data_dir=/path/to/tensorflow_datasets
    python -m us3l_jax.main --config=configs/us3l_imagenet.py:resnet18 --workdir=runs/us3l_in_r18 \
        --config.data.data_dir=/path/to/tensorflow_datasets
    python -m us3l_jax.main --config=configs/us3l_imagenet.py:resnet50,paper --workdir=runs/us3l_in_r50_paper

Arguments: ``<resnet18|resnet50>[,<official|paper>]``. Expected ImageNet linear accuracy
(paper Table 4, %) at widths 1.0 0.75 0.5 0.25:

    resnet18  56.9 54.5 48.7 40.7
    resnet50  68.4 66.7 63.4 57.7

``official`` (default): the official ``us_resnet{18,50}_simclr_featdistill_imagenet`` configs,
whose checkpoints the official linear-evaluation and transfer configs load: InfoNCE base loss
(tau 0.5) with a momentum teacher (m 0.99), 256/2048 heads, negative-cosine distillation of
the sub-networks through a new head, sandwich rule with 3 widths and dynamic sampling "A",
group regularization (lambda 5e-5, alpha 0.05, 8 groups, warm-up 50 epochs), SGD lr 0.5
cosine per epoch, 100 epochs, one update per width. Batch 480 = 8 GPUs x 60 for ResNet-50
(BN and negatives per 60 images) with intermediate-feature distillation (the last block of
stages 2-4, weight 1.0); batch 1024 = 8 x 128 for ResNet-18 (per 128), without it.
``paper``: the paper's text, batch 512 (BN per 64 / 128 images), no feature distillation.
bfloat16 compute in place of the official AMP. docs/fidelity.md ("ImageNet configs") lists
each field against the official files.

Linear evaluation (``--protocol=paper``) as the official configs: LARS, lr 0.8, batch 1024,
cosine over 60 epochs (the paper says it follows SimSiam, whose protocol runs 90 epochs at
batch 4096; ``--epochs=90`` for its length). BN statistics per width: the official ImageNet
calibration (EMA over 501 batches of one BN group, with the SSL views). Data: ImageNet
prepared as ArrayRecord with ``python -m us3l_jax.data.prepare imagenet2012
--manual_dir=<dir with ILSVRC2012_img_train.tar> --data_dir=...``; it streams from the host
(decode + crops on ``config.data.num_threads`` threads, measured ~370 images/s per core).
"""
from us3l_jax import recipes


def get_config(arg: str | None = None):
    a = recipes.parse_args(arg, ("arch", "variant"), ("resnet50", "official"))
    c = recipes.us3l_imagenet(a["arch"], a["variant"])
    c.eval.paper_row = f"table4/{a['arch']}/ours"
    return c
