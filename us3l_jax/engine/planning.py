"""Which programs a run compiles: the sub-network widths its sampler can draw and the width
sets whose dry runs (``Engine.compile_ahead``) reach every program."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from us3l_jax import sampling, slim


def possible_sub_widths(sampler: sampling.SamplerConfig, config_key: Callable[[float], Any],
                        steps_per_epoch: int, total_steps: int) -> list[float]:
    """One width per channel configuration the sampler can draw, widest first (the order in
    which the schedule's stages need them). Continuous sampling maps every draw onto one of
    the distinct configurations, so these are all the sub-network programs a run compiles."""
    lo, hi = sampler.width_range
    if sampler.individual_width is not None:
        return []
    ws = set(sampler.grid) if sampler.grid is not None else \
        set(slim.distinct_widths(config_key, lo, hi))
    ws |= {sampling.min_width(sampler, k, steps_per_epoch, total_steps)
           for k in range(0, total_steps, max(1, steps_per_epoch))}
    unique = {config_key(w): w for w in sorted(ws) if w < hi}  # a sub-width is below hi
    return sorted(unique.values(), reverse=True)


def compile_width_sets(sampler: sampling.SamplerConfig, config_key: Callable[[float], Any],
                       steps_per_epoch: int, total_steps: int) -> list[tuple[float, ...]]:
    """Width sets whose dry runs reach every program of the run: the base-only step of
    stage 1 and a step with every possible sub-width (programs are per width, so one
    iteration covering them all is enough); without the sandwich rule any sampled width can
    also be the base."""
    if sampler.individual_width is not None:
        return [(sampler.individual_width,)]
    hi = sampler.width_range[1]
    subs = possible_sub_widths(sampler, config_key, steps_per_epoch, total_steps)
    bases = [hi] if sampler.sandwich else [hi] + subs
    return [(b,) for b in bases] + ([(hi, *subs)] if subs else [])
