"""Times one iteration of a PyTorch re-statement of the official US3L CIFAR step, for a
side-by-side throughput ratio with ``accelerator_bench.py`` on the same GPU and batch.

    python experiments/official_step_torch.py --out torch_step.json [--batch 512] \
        [--widths 1.0,0.625,0.25] [--steps 10] [--bf16] [--device cuda|cpu] \
        [--image-size 32] [--base-width 64] [--threads N]

Needs PyTorch (exits with status 1 and a message otherwise); ``--device cuda`` (the default)
needs a CUDA device, ``--device cpu`` times the same iteration on this machine's cores (the
ratio to our CPU step: ``experiments/cpu_ratio.py``, which interleaves ``make_iteration``
with our step). ``--image-size`` / ``--base-width`` shrink the network for a quick check (the
defaults are the paper's CIFAR ResNet-18). Imports nothing of the official repository: it
re-states the official per-iteration loop in plain PyTorch: EMA update
of the teacher, the teacher's forward of both views at full width, then for every width (the
base first) a forward of both views, its loss (InfoNCE against the teacher's other view for
the base network, negative cosine through an auxiliary head for the sub-networks; tau 0.5),
backward and one SGD update (the official one update per width, ``per_width`` here). The
CIFAR ResNet-18 at a width is a plain network with that many channels (the same convolution
shapes, and so FLOPs, as the official sliced layers; the slicing itself is not timed), with
the 2048/256 projector and the 2048-wide auxiliary head. Views are random tensors already on
the GPU: the official CPU-side augmentation is not timed, so this is the official step's
lower bound.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


def _floats(text: str) -> tuple[float, ...]:
    try:
        out = tuple(float(w) for w in text.split(",") if w.strip())
    except ValueError:
        out = ()
    if not out or not all(0 < w <= 1 for w in out):
        raise argparse.ArgumentTypeError(f"expected comma-separated widths in (0, 1], got {text!r}")
    return out


def build(torch, width: float, head: bool, base: int = 64):
    nn = torch.nn

    def ch(c):
        return max(1, int(round(c * width)))

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.short = nn.Sequential()
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                           nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            return torch.relu(self.b2(self.c2(y)) + self.short(x))

    layers = [nn.Conv2d(3, ch(base), 3, 1, 1, bias=False), nn.BatchNorm2d(ch(base)), nn.ReLU()]
    cin = ch(base)
    for planes, stride in ((base, 1), (2 * base, 2), (4 * base, 2), (8 * base, 2)):
        layers += [Block(cin, ch(planes), stride), Block(ch(planes), ch(planes), 1)]
        cin = ch(planes)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(cin, 2048), nn.BatchNorm1d(2048), nn.ReLU(),
               nn.Linear(2048, 2048), nn.BatchNorm1d(2048), nn.ReLU(), nn.Linear(2048, 256)]
    if head:
        layers += [nn.Linear(256, 2048), nn.BatchNorm1d(2048), nn.ReLU(), nn.Linear(2048, 256)]
    return nn.Sequential(*layers)


def make_iteration(torch, widths: Sequence[float], batch: int, *, device: str = "cpu",
                   image_size: int = 32, base_width: int = 64,
                   bf16: bool = False) -> Callable[[], None]:
    """The official iteration as a callable (networks, teacher, optimizers and views built
    once, seed 0), so that ``cpu_ratio.py`` can interleave it with our step."""
    torch.manual_seed(0)
    F = torch.nn.functional
    dev = torch.device(device)
    nets = [build(torch, w, head=i > 0, base=base_width).to(dev)
            for i, w in enumerate(widths)]
    teacher = build(torch, widths[0], head=False, base=base_width).to(dev)
    teacher.load_state_dict(nets[0].state_dict())
    opts = [torch.optim.SGD(n.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
            for n in nets]
    v1, v2 = (torch.randn(batch, 3, image_size, image_size, device=dev)
              for _ in range(2))

    def infonce(q, k):
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        return F.cross_entropy(q @ k.t() / 0.5, torch.arange(len(q), device=dev))

    def iteration():
        with torch.no_grad():
            for pt, po in zip(teacher.parameters(), nets[0].parameters()):
                pt.mul_(0.99).add_(po, alpha=0.01)
            with torch.autocast(device, torch.bfloat16, enabled=bf16):
                k1, k2 = teacher(v1), teacher(v2)
        for i, (net, opt) in enumerate(zip(nets, opts)):
            with torch.autocast(device, torch.bfloat16, enabled=bf16):
                o1, o2 = net(v1), net(v2)
                if i == 0:
                    loss = infonce(o1, k2) + infonce(o2, k1)
                else:
                    loss = -(F.cosine_similarity(o1, k2).mean()
                             + F.cosine_similarity(o2, k1).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return iteration


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--widths", type=_floats, default=(1.0, 0.625, 0.25),
                   help="base width first, then the sub-widths")
    p.add_argument("--steps", type=int, default=10, help="timed iterations after 3 warm-up")
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--base-width", type=int, default=64, help="stage-1 channels at width 1.0")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    args = p.parse_args(argv)
    if args.batch < 2 or args.steps < 1:
        p.error(f"--batch must be >= 2 and --steps >= 1, got {args.batch} / {args.steps}")
    try:
        import torch
    except ImportError:
        print("official_step_torch: PyTorch is not installed; this driver needs PyTorch",
              file=sys.stderr)
        sys.exit(1)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print(f"official_step_torch: torch {torch.__version__} sees no CUDA device; use "
              "--device cpu to time the step on this machine's cores", file=sys.stderr)
        sys.exit(1)
    if cuda:
        # What a tuned PyTorch run sets: cuDNN picks the fastest algorithm per shape.
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    iteration = make_iteration(torch, args.widths, args.batch, device=args.device,
                               image_size=args.image_size, base_width=args.base_width,
                               bf16=args.bf16)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        iteration()
    times = []
    for _ in range(args.steps):
        sync()
        t = time.perf_counter()
        iteration()
        sync()
        times.append(time.perf_counter() - t)
    step = statistics.median(times)
    out = dict(driver="official_step_torch",
               device=torch.cuda.get_device_name() if cuda else "cpu",
               threads=torch.get_num_threads(), torch=torch.__version__, batch=args.batch,
               image_size=args.image_size, base_width=args.base_width,
               widths=list(args.widths), bf16=args.bf16,
               cudnn_benchmark=bool(cuda and torch.backends.cudnn.benchmark), step_s=step,
               step_times=times, images_per_s=args.batch / step,
               note="augmentation not timed (random views on the GPU): a lower bound")
    print(f"{out['device']}: batch {args.batch}, widths {args.widths}, "
          f"{'bf16' if args.bf16 else 'fp32'}: {1e3 * step:.2f} ms/iteration, "
          f"{out['images_per_s']:.0f} images/s")
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
