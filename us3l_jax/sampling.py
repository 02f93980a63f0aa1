"""Width sampling: the sandwich rule and US3L's dynamic schedule "A" (paper §3.2.2; official
details in docs/fidelity.md, "Width sampling").

``sample_widths(cfg, step, steps_per_epoch, total_steps)`` is a pure function of its
arguments: its random draws come from a numpy Generator seeded with ``(cfg.seed, step)``, so
every host of a multi-host job, and a resumed run, gets the same widths for the same step.

Schedule "A" splits training into 4 stages. Stage 1 trains only the largest width; stages
2/3/4 add sub-networks with the minimum width lo + (4 − stage)·(hi − lo)/3, i.e. 0.75 → 0.5 →
0.25 for the range [0.25, 1]. Stage boundaries are either by epoch, as the official code
(P = EPOCHS // 4, stage = epoch // P + 1), or by iteration, as paper Algorithm 1
(T_p = floor(T_iters / 4), stage = step // T_p + 1 with 0-based steps; Algorithm 1's literal
1-based indexing starts stages 3 and 4 one iteration earlier). When the run does not split
into 4 equal parts the remainder stays in stage 4 (the official formula would give a stage 5
with a minimum width below the range).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

NUM_STAGES = 4
# "A" = "max_first" + "gradual" (paper §3.2.2); the two halves alone are Table 13 cases 4 / 3.
SCHEDULES = (None, "A", "max_first", "gradual")
STAGE_UNITS = ("epoch", "iteration")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Settings of the width sampler.

    Attributes:
      width_range: (lo, hi), 0 < lo <= hi <= 1. ``hi`` is the base (teacher) width.
      num_samples: widths per iteration once sub-networks train (s; 3 in US3L, 4 in US-Net).
      sandwich: always include ``hi`` and the current minimum; the other s − 2 are random.
        Without it all s widths are random and the base step runs at the largest sampled
        width, which is below ``hi`` in stages 2-4 (the official behaviour).
      schedule: "A" (dynamic sampling) or None (the minimum width is ``lo`` from step 0), or
        one half of "A" (appendix Table 13): "max_first" (stage 1 trains only ``hi``, then the
        full range) or "gradual" (the minimum width steps 0.75 -> 0.5 -> 0.25 as in "A", with
        sub-networks from step 0: stage 1 uses stage 2's range).
      stage_by: "epoch" (official code) or "iteration" (paper Algorithm 1).
      grid: optional allowed widths (e.g. ``slim.distinct_widths(...)``); random draws pick
        uniformly among grid widths in the current range, which bounds the number of distinct
        sub-networks (compiled programs). None draws continuously, U[min, hi).
      individual_width: a single fixed width every step (the individually trained baselines,
        official ``NUM_SAMPLE_TRAINING == 1``); needs num_samples=1, sandwich=False and
        schedule=None. See ``SamplerConfig.individual``.
      seed: non-negative integer mixed with the step into each step's random draws.
    """
    width_range: tuple[float, float] = (0.25, 1.0)
    num_samples: int = 3
    sandwich: bool = True
    schedule: str | None = "A"
    stage_by: str = "epoch"
    grid: tuple[float, ...] | None = None
    individual_width: float | None = None
    seed: int = 0

    def __post_init__(self):
        try:
            lo, hi = (float(v) for v in self.width_range)
        except (TypeError, ValueError):
            raise ValueError(f"width_range must be a pair (lo, hi), got {self.width_range!r}")
        if not 0 < lo <= hi <= 1:
            raise ValueError(
                f"width_range {self.width_range!r} is invalid: need 0 < lo <= hi <= 1 "
                "(lo is the smallest width, hi the largest)")
        object.__setattr__(self, "width_range", (lo, hi))
        schedule = None if self.schedule in (None, "none", "") else self.schedule
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown width schedule {self.schedule!r}; valid: "
                             f"{', '.join(repr(x) for x in SCHEDULES[1:])} or None")
        object.__setattr__(self, "schedule", schedule)
        if self.stage_by not in STAGE_UNITS:
            raise ValueError(f"stage_by must be one of {STAGE_UNITS}, got {self.stage_by!r}")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {self.num_samples!r}")
        if self.sandwich and self.num_samples < 2:
            raise ValueError(
                f"the sandwich rule needs num_samples >= 2 (largest and smallest width), got "
                f"{self.num_samples}; set sandwich=False for a single width")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.individual_width is not None:
            w = float(self.individual_width)
            if not 0 < w <= 1:
                raise ValueError(f"individual_width must be in (0, 1], got {w!r}")
            if self.num_samples != 1 or self.sandwich or self.schedule is not None:
                raise ValueError(
                    "individual_width trains one fixed width: it needs num_samples=1, "
                    "sandwich=False and schedule=None (use SamplerConfig.individual(width)); got "
                    f"num_samples={self.num_samples}, sandwich={self.sandwich}, "
                    f"schedule={self.schedule!r}")
            object.__setattr__(self, "individual_width", w)
        if self.grid is not None:
            self._validate_grid()

    def _validate_grid(self) -> None:
        grid = tuple(sorted({float(w) for w in self.grid}))
        if not grid or not all(0 < w <= 1 for w in grid):
            raise ValueError(f"grid must be a non-empty list of widths in (0, 1], got {self.grid!r}")
        object.__setattr__(self, "grid", grid)
        if self.individual_width is not None:
            return
        hi = self.width_range[1]
        stages = range(1, NUM_STAGES + 1) if self.schedule else (NUM_STAGES,)
        for s in stages:
            lo = _stage_min(self, s)
            if lo == hi:  # only the base width trains: the grid is not consulted
                continue
            if not _grid_in(grid, lo, hi):
                raise ValueError(
                    f"grid {grid} has no width in [{lo}, {hi}], the range of stage {s}; add "
                    "widths to the grid or widen width_range")

    @classmethod
    def individual(cls, width: float, seed: int = 0) -> SamplerConfig:
        """One fixed width every step (an individually trained baseline)."""
        return cls(width_range=(width, width), num_samples=1, sandwich=False, schedule=None,
                   individual_width=width, seed=seed)


def _grid_in(grid: tuple[float, ...], lo: float, hi: float, open_: bool = False) -> list[float]:
    eps = 1e-9  # widths computed by arithmetic, e.g. 0.25 + 2 * 0.75 / 3
    if open_:
        return [w for w in grid if lo + eps < w < hi - eps]
    return [w for w in grid if lo - eps <= w <= hi + eps]


def _stage_min(cfg: SamplerConfig, stage_: int) -> float:
    lo, hi = cfg.width_range
    if stage_ == 1 and cfg.schedule in ("A", "max_first"):
        return hi
    if cfg.schedule in ("A", "gradual"):
        return lo + (NUM_STAGES - max(stage_, 2)) * (hi - lo) / (NUM_STAGES - 1)
    return lo


def _check_run(step: int, steps_per_epoch: int, total_steps: int) -> None:
    for name, v in (("steps_per_epoch", steps_per_epoch), ("total_steps", total_steps)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if int(step) != step or not 0 <= step < total_steps:
        raise ValueError(f"step must be an integer in [0, total_steps={total_steps}), got {step!r}")


def _stage_of(cfg: SamplerConfig, steps: np.ndarray, steps_per_epoch: int,
              total_steps: int) -> np.ndarray:
    """Stage (1..4) of each 0-based step; vectorised so a whole run can be counted at once."""
    if cfg.schedule is None or cfg.individual_width is not None:
        return np.full(np.shape(steps), NUM_STAGES)
    if cfg.stage_by == "epoch":
        # A partial last epoch counts as an epoch (official loaders without drop_last).
        units, pos = math.ceil(total_steps / steps_per_epoch), steps // steps_per_epoch
    else:
        units, pos = total_steps, steps
    period = units // NUM_STAGES
    if period < 1:
        raise ValueError(
            f"schedule {cfg.schedule!r} needs at least {NUM_STAGES} {cfg.stage_by}s, got {units} "
            f"(total_steps={total_steps}, steps_per_epoch={steps_per_epoch})")
    return np.minimum(pos // period + 1, NUM_STAGES)


def stage(cfg: SamplerConfig, step: int, steps_per_epoch: int, total_steps: int) -> int:
    """Schedule stage (1-4) at 0-based ``step``; always 4 without a schedule (full range)."""
    _check_run(step, steps_per_epoch, total_steps)
    return int(_stage_of(cfg, np.asarray(int(step)), steps_per_epoch, total_steps))


def min_width(cfg: SamplerConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """The current smallest width (for logging); ``hi`` in stage 1 of schedule "A"."""
    if cfg.individual_width is not None:
        _check_run(step, steps_per_epoch, total_steps)
        return cfg.individual_width
    return _stage_min(cfg, stage(cfg, step, steps_per_epoch, total_steps))


def _num_widths(cfg: SamplerConfig, stages: np.ndarray) -> np.ndarray:
    """Widths per step: 1 while the range is a single width (stage 1, or lo == hi), else s."""
    single = np.array([_stage_min(cfg, s) == cfg.width_range[1] for s in range(NUM_STAGES + 1)])
    return np.where(single[stages], 1, cfg.num_samples)


def sample_widths(cfg: SamplerConfig, step: int, steps_per_epoch: int,
                  total_steps: int) -> tuple[float, ...]:
    """Widths to train at ``step``, sorted descending; ``widths[0]`` is the base network's.

    Stage 1 of schedule "A": ``(hi,)``. Later, with the sandwich rule:
    ``(hi, min)`` plus s − 2 random widths; without: s random widths. Exactly s widths (the
    official code's N ≥ 4 sandwich bug, which duplicates hi and min, is not reproduced).
    In grid mode the sandwich's random widths come from grid widths strictly between min and
    hi when there are any (the endpoints are trained anyway), else from [min, hi].
    """
    if cfg.individual_width is not None:
        _check_run(step, steps_per_epoch, total_steps)
        return (cfg.individual_width,)
    st = stage(cfg, step, steps_per_epoch, total_steps)
    hi = cfg.width_range[1]
    lo = _stage_min(cfg, st)
    if lo == hi:  # stage 1, or a one-width range
        return (hi,)
    rng = np.random.default_rng((cfg.seed, int(step)))
    n_random = cfg.num_samples - 2 if cfg.sandwich else cfg.num_samples
    if cfg.grid is None:
        random = [float(w) for w in rng.uniform(lo, hi, size=n_random)]
    else:
        pool = (cfg.sandwich and _grid_in(cfg.grid, lo, hi, open_=True)) or \
            _grid_in(cfg.grid, lo, hi)
        random = [pool[i] for i in rng.integers(0, len(pool), size=n_random)]
    fixed = [hi, lo] if cfg.sandwich else []
    return tuple(sorted(fixed + random, reverse=True))


def first_sub_network_step(cfg: SamplerConfig, steps_per_epoch: int,
                           total_steps: int) -> int | None:
    """The first iteration that trains more than the base width (the start of stage 2 with
    schedule "A", 0 without a schedule), or None if none does (individual baselines)."""
    _check_run(0, steps_per_epoch, total_steps)
    if cfg.individual_width is not None:
        return None
    stages = _stage_of(cfg, np.arange(total_steps), steps_per_epoch, total_steps)
    multi = np.flatnonzero(_num_widths(cfg, stages) > 1)
    return int(multi[0]) if multi.size else None


def expected_forward_count(cfg: SamplerConfig, total_steps: int, steps_per_epoch: int) -> int:
    """Network passes (forward + backward, one per sampled width) over a whole run.

    Computed from the schedule: 1 per stage-1 step, s per later step. For the US3L default
    (s = 3, sandwich, schedule "A" on 4 equal stages) this is 2.5·T (appendix Eq. 12).
    """
    _check_run(0, steps_per_epoch, total_steps)
    if cfg.individual_width is not None:
        return total_steps
    stages = _stage_of(cfg, np.arange(total_steps), steps_per_epoch, total_steps)
    return int(np.sum(_num_widths(cfg, stages)))
