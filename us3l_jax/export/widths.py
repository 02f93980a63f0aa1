"""Which width to ship: every distinct sub-network of a run, its cost, and a budget picker.

A slimmable backbone has finitely many distinct sub-networks: channel counts are rounded
(``slim.channels``), so a whole interval of widths gives the same network. ``candidates``
lists one width per distinct channel configuration in the run's range; ``costs`` gives its
params and MACs exactly (``us3l_jax.profile``, backbone convention: what is exported, no
classifier), and ``measure_latency`` its median wall time on the current device.
``pick`` returns the widest candidate within a budget.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from us3l_jax import profile as profile_lib, slim
from us3l_jax.export.fold import fold_batchnorm
from us3l_jax.models.plain import slice_module

# Budget kinds: the CLI flag and the row key they bound.
BUDGETS = {"max_macs": "macs", "max_params": "params", "max_latency_ms": "latency_ms"}
_SUFFIX = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9}


def parse_count(text: str | int | float, what: str = "count") -> float:
    """``'300M'`` -> 3e8, ``'2.5k'`` -> 2500, ``'1G'`` -> 1e9, ``'5'`` -> 5 (k/M/G are
    powers of 1000). Raises ``ValueError`` naming the text and the allowed form."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmg]?)\s*",
                     str(text), re.IGNORECASE)
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"{what} {text!r} is not a positive number (e.g. 300M, 2.5k, 1G, 5)")
    return float(m.group(1)) * _SUFFIX[m.group(2).lower()]


def _nice(lo: float, hi: float, same: Callable[[float], bool]) -> float:
    """The roundest width in ``[lo, hi]`` for which ``same`` holds: fewest decimals, then a
    multiple of 5 in the last one (0.25 before 0.27), then the widest; ``lo`` if none."""
    for decimals in range(1, 7):
        q = 10 ** decimals
        ks = [k for k in range(math.ceil(lo * q - 1e-9), math.floor(hi * q + 1e-9) + 1)
              if lo <= k / q <= hi and same(k / q)]
        if ks:
            fives = [k for k in ks if k % 5 == 0]
            return round(max(fives or ks) / q, decimals)
    return lo


def candidates(backbone: nn.Module, lo: float, hi: float = slim.MAX_WIDTH) -> list[float]:
    """One width per distinct channel configuration of ``backbone`` in ``[lo, hi]``, ascending:
    the roundest number that gives it (e.g. 0.5 or 1.0 rather than 0.46875003)."""
    starts = slim.distinct_widths(backbone.channel_config, lo, hi)
    out = []
    for i, start in enumerate(starts):
        config = backbone.channel_config(start)
        # The configuration holds on [start, next start); 1e-6 keeps off the next change.
        end = starts[i + 1] - 1e-6 if i + 1 < len(starts) else hi
        out.append(_nice(start, end, lambda w: backbone.channel_config(w) == config))
    return out


def costs(backbone: nn.Module, width: float, image_size: int, in_channels: int = 3
          ) -> dict[str, int]:
    """``{'params', 'macs'}`` of the backbone at ``width`` for one image (profile's
    ``backbone`` convention: conv + BN affine params, conv MACs; no classifier). A ViT is
    counted from the sizes its forward uses (``profile.vit_count``): it has no convolutions
    or BN for the layer trace to count (which gave 0 and 0)."""
    if hasattr(backbone, "dims"):
        c = profile_lib.vit_count(backbone, float(width), image_size)
        return {"params": c["params"], "macs": c["macs"]}
    # Traced in train mode at batch 1, where per-group BN statistics cannot be taken; the
    # group size changes no count.
    layers = profile_lib.trace_layers(backbone.clone(bn_group_size=None),
                                      (1, image_size, image_size, in_channels),
                                      width=float(width), train=True)
    c = profile_lib.count(layers, "backbone")
    return {"params": c["params"], "macs": c["macs"]}


def device_name() -> str:
    """``'cpu (cpu)'``, ``'NVIDIA H200 (gpu)'``: the device latencies are measured on."""
    d = jax.devices()[0]
    return f"{d.device_kind} ({d.platform})"


def measure_latency(fn: Callable[..., jax.Array], *args: Any, warmup: int = 3,
                    repeats: int = 20) -> float:
    """Median wall time in ms of ``fn(*args)`` (a jitted function: compiled and run
    ``warmup`` times first; each run waited for with ``block_until_ready``)."""
    if repeats < 1:
        raise ValueError(f"--repeats must be a positive integer, got {repeats!r}")
    for _ in range(max(1, warmup)):  # the first call compiles
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


@functools.lru_cache(maxsize=256)
def eval_fn(module: nn.Module) -> Callable[[Any, jax.Array], jax.Array]:
    """``jit(module.apply(variables, x, train=False))``, one per module (linen modules hash by
    their attributes), so timing a width twice in a process compiles it once."""
    return jax.jit(functools.partial(module.apply, train=False))


def folded_network(backbone: nn.Module, params: Any, batch_stats: Any | None, width: float
                   ) -> tuple[nn.Module, dict[str, Any]]:
    """The BN-folded plain network of ``width`` from full-size ``params`` and that width's
    full-size ``batch_stats`` (None: mean 0 / var 1, enough for timing)."""
    variables = {"params": params}
    if batch_stats is not None:
        variables["batch_stats"] = batch_stats
    plain, sliced = slice_module(backbone, variables, width)
    if batch_stats is None:
        sliced["batch_stats"] = _unit_stats(sliced["params"])
    return fold_batchnorm(plain, sliced)


def _unit_stats(params: Any) -> Any:
    """Mean 0 / var 1 statistics for every BN in ``params`` (those with a ``scale``)."""
    stats = {}
    for k, v in traverse_util.flatten_dict(params).items():
        if k[-1] == "scale":
            stats[k[:-1] + ("mean",)] = np.zeros(np.shape(v), np.float32)
            stats[k[:-1] + ("var",)] = np.ones(np.shape(v), np.float32)
    return traverse_util.unflatten_dict(stats)


def latency(backbone: nn.Module, params: Any, width: float, batch: int, image_size: int,
            warmup: int = 3, repeats: int = 20) -> float:
    """Median ms of the folded network of ``width`` on a ``batch`` of images (current device).
    The weights' values do not change the time, so uncalibrated statistics are used."""
    folded, fv = folded_network(backbone, params, None, width)
    x = jnp.zeros((batch, image_size, image_size, 3), jnp.float32)
    return measure_latency(eval_fn(folded), fv, x, warmup=warmup, repeats=repeats)


@dataclasses.dataclass(frozen=True)
class Row:
    """One distinct sub-network: its width, channels, exact costs, and what was measured."""
    width: float
    channels: tuple[int, ...]
    params: int
    macs: int
    latency_ms: float | None = None
    accuracy: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def value(self, key: str) -> float:
        v = getattr(self, key)
        if v is None:
            raise ValueError(f"no {key} measured for width {self.width}")
        return v


def _fmt(key: str, v: float) -> str:
    if key == "latency_ms":
        return f"{v:.3g} ms"
    return f"{v:,.0f} ({v / 1e6:.3g}M)"


def pick(rows: Sequence[Row], key: str, budget: float) -> Row:
    """The widest row whose ``key`` (``macs``, ``params`` or ``latency_ms``) is at most
    ``budget``. Raises ``ValueError`` naming the smallest width's cost when none fits."""
    if key not in BUDGETS.values():
        raise ValueError(f"unknown budget {key!r}; valid: {', '.join(BUDGETS.values())}")
    rows = sorted(rows, key=lambda r: r.width)
    fits = [r for r in rows if r.value(key) <= budget]
    if not fits:
        low = rows[0]
        raise ValueError(f"no width fits {key} <= {_fmt(key, budget)}: the smallest width "
                         f"{low.width} needs {_fmt(key, low.value(key))}")
    return fits[-1]


def pick_measured(rows: Sequence[Row], budget: float, measure: Callable[[float], float]
                  ) -> tuple[Row, int]:
    """``pick(rows, 'latency_ms', budget)`` with latency ``measure(width)`` taken widest
    first, stopping at the first width that fits (no monotonicity assumed: that is the widest
    that fits). Returns the row and how many widths were measured."""
    measured = []
    for r in sorted(rows, key=lambda r: -r.width):
        r = dataclasses.replace(r, latency_ms=measure(r.width))
        if r.latency_ms <= budget:
            return r, len(measured) + 1
        measured.append(r)
    return pick(measured, "latency_ms", budget), len(measured)  # raises: nothing fits


def table(backbone: nn.Module, params: Any, lo: float, image_size: int, batch: int = 1,
          accuracy: Mapping[tuple[int, ...], Mapping[str, float]] | None = None,
          measure: bool = True, repeats: int = 20) -> list[Row]:
    """A :class:`Row` per distinct width in ``[lo, 1]``, ascending; latency measured unless
    ``measure`` is False; ``accuracy`` maps channel configurations to probe accuracies."""
    rows = []
    for w in candidates(backbone, lo):
        cfg = tuple(backbone.channel_config(w))
        c = costs(backbone, w, image_size)
        ms = latency(backbone, params, w, batch, image_size, repeats=repeats) if measure else None
        rows.append(Row(w, cfg, c["params"], c["macs"], ms, dict((accuracy or {}).get(cfg, {}))))
    return rows


def sweep_accuracy(backbone: nn.Module, records: Sequence[Mapping[str, Any]]
                   ) -> dict[tuple[int, ...], dict[str, float]]:
    """Probe accuracies (%) of ``sweep.json`` records by channel configuration, so that a
    swept width (0.5) labels the row of the network it is (whatever width names the row)."""
    out: dict[tuple[int, ...], dict[str, float]] = {}
    for r in records:
        out.setdefault(tuple(backbone.channel_config(r["width"])), {})[r["protocol"]] = \
            float(r["accuracy"])
    return out


def format_rows(rows: Sequence[Row], device: str, batch: int) -> str:
    """Plain-text table, widest first: width, params, MACs, latency, accuracy per protocol."""
    protocols = list(dict.fromkeys(p for r in rows for p in r.accuracy))
    head = ["width", "params", "MACs", f"latency ms (batch {batch})"] + \
        [f"{p} top-1 %" for p in protocols]
    body = [[f"{r.width:g}", f"{r.params:,}", f"{r.macs:,}",
             "" if r.latency_ms is None else f"{r.latency_ms:.3f}"] +
            [f"{r.accuracy[p]:.1f}" if p in r.accuracy else "" for p in protocols]
            for r in sorted(rows, key=lambda r: -r.width)]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = [head, ["-" * w for w in widths]] + body
    text = "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)
    return f"{text}\nlatency measured on {device}: median of repeats after warm-up"


def plot_rows(rows: Sequence[Row], title: str) -> bytes:
    """PNG bytes: MACs, params and latency against width (left), and accuracy against
    MACs when a sweep labelled some rows (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no global backend change
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax_c, ax_a = fig.subplots(1, 2)
    rows = sorted(rows, key=lambda r: r.width)
    ws = [r.width for r in rows]
    ax_c.plot(ws, [r.macs / 1e6 for r in rows], "o-", label="MACs (M)")
    ax_c.plot(ws, [r.params / 1e6 for r in rows], "s-", label="params (M)")
    ax_c.set_yscale("log")
    ax_c.set_xlabel("width")
    ax_c.grid(alpha=0.3)
    if any(r.latency_ms is not None for r in rows):
        ax_l = ax_c.twinx()
        ax_l.plot(ws, [r.latency_ms for r in rows], "^--", color="tab:red", label="latency")
        ax_l.set_ylabel("latency (ms)", color="tab:red")
    ax_c.legend(fontsize=8, loc="upper left")
    for p in dict.fromkeys(p for r in rows for p in r.accuracy):
        pts = [(r.macs / 1e6, r.accuracy[p]) for r in rows if p in r.accuracy]
        ax_a.plot(*zip(*pts), "o-", label=p)
    if ax_a.lines:
        ax_a.legend(fontsize=8)
    else:
        ax_a.text(0.5, 0.5, "no sweep.json: run python -m us3l_jax.evaluate", ha="center",
                  va="center", transform=ax_a.transAxes)
    ax_a.set_xlabel("MACs (M)")
    ax_a.set_ylabel("top-1 accuracy (%)")
    ax_a.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
