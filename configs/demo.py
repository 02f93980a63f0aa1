"""Demo: a tiny slimmable ResNet pretrained with the full US3L recipe on the offline digits set.

    python -m us3l_jax.main --config=configs/demo.py --workdir=/tmp/us3l_demo
    python -m us3l_jax.main --config=configs/demo.py:smoke --workdir=/tmp/us3l_smoke

Full US3L (paper Table 7 case 13: InfoNCE base loss against an EMA teacher, negative-cosine
distillation through an auxiliary head, sandwich rule with dynamic sampling "A", group
regularization) on scikit-learn's bundled 8x8 digits upsampled to 16x16, with a ResNet-18
layout of one block per stage and base width 16, widths [0.25, 1.0]. Needs no download.

Expected: ``demo`` runs 12 epochs (264 steps) in a few minutes on 2 CPU cores and ends with a
fast linear-probe sweep over widths 1.0/0.75/0.5/0.25 whose accuracies are all far above the
10% chance level (the digits are easy; see README for the figures we measured).
``smoke`` is the same run cut to 4 epochs (88 steps through all four sampling stages, on a
coarser width grid): well under a minute after compilation, for tests and quick checks.

Supervised slimmable training (paper Table 1) on the same data, model and number of steps
(12 epochs, 264 steps), ending with a top-1 sweep of the trained classifier per width:

    python -m us3l_jax.main --config=configs/demo.py:supervised_us --workdir=/tmp/us3l_sup_us
    python -m us3l_jax.main --config=configs/demo.py:s_net --workdir=/tmp/us3l_s_net

``supervised_us`` is US-Net (sandwich rule with 4 widths from the 0.125 grid, inplace
distillation from the largest width's soft predictions, one accumulated update per
iteration); ``s_net`` is S-Net (widths 1.0/0.75/0.5/0.25 every step, private BatchNorm per
width, cross-entropy at every width, one update per width as the official worker). Both use
SGD lr 0.1, weight decay 1e-4 and the linear-evaluation crops as augmentation.
"""
from us3l_jax import config as config_lib


def get_config(arg: str | None = None):
    c = config_lib.get_default()
    c.model.name = "cifar_resnet18"
    c.model.base_width = 16
    c.model.stage_sizes = (1, 1, 1, 1)
    c.heads.proj_hidden = 128
    c.heads.proj_out = 64
    c.heads.head_hidden = 128
    c.data.dataset = "digits"
    c.data.image_size = 16
    c.data.augment = "cifar"
    c.method.group_size = 32
    c.optim.batch_size = 64
    c.optim.epochs = 12
    c.optim.lr = 0.5
    c.sampler.grid_step = 0.125  # 7 distinct widths: few programs to compile on a CPU
    c.train.log_every_steps = 22
    c.eval.final_sweep = True
    c.eval.sweep_protocol = "fast"
    c.eval.sweep_widths = (1.0, 0.75, 0.5, 0.25)
    c.eval.batch_size = 64
    c.eval.calibration_batches = 20
    if arg == "smoke":
        # 4 epochs = 88 steps: every stage of schedule "A" (1.0 only; then min width 0.75,
        # 0.5, 0.25) runs; a coarse grid keeps the programs to compile few.
        c.optim.epochs = 4
        c.sampler.grid_step = 0.25
        c.train.log_every_steps = 11
        c.train.checkpoint_every_steps = 22
        c.eval.sweep_widths = (1.0, 0.25)
    elif arg in ("supervised_us", "s_net"):
        _supervised(c, s_net=arg == "s_net")
    elif arg:
        raise ValueError(f"unknown demo variant {arg!r}; valid: 'smoke', 'supervised_us', "
                         "'s_net' or none")
    return c


def _supervised(c, s_net: bool) -> None:
    c.train.objective = "supervised"
    c.optim.lr = 0.1
    c.optim.reg_alpha = 0.0  # plain weight decay 1e-4 (reg_lambda 5e-5)
    c.sampler.schedule = "none"
    c.eval.sweep_protocol = "top1"
    if s_net:
        c.model.switchable_widths = (1.0, 0.75, 0.5, 0.25)
        c.supervised.distill = False
        c.method.update_mode = "per_width"
    else:
        c.sampler.num_samples = 4
