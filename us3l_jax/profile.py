"""Parameters and MACs of a backbone at a width, counted exactly on the host.

The model's forward at the width is traced abstractly (``jax.eval_shape``, nothing computed)
while ``flax.linen.intercept_methods`` records every conv / BN / dense call with its input and
output shapes, so the counts follow the architecture code itself. Two conventions:

* ``paper`` (default) reproduces the paper's Tables 6 and 12: thop's classic
  hooks on a plain network with a ``num_classes`` classifier. Params = conv + BN affine +
  classifier weight and bias. MACs = conv (+1 per output for a conv bias) + classifier
  (in x out) + BN 2 x (elements of its input) + global average pool (H*W + 1) x C.
  ReLU and max-pool count 0. At 1.0/0.75/0.5/0.25 the slimmable channels (make_divisible)
  equal the paper's int(c*w).
* ``backbone``: the sliced backbone actually trained: params = conv + BN
  affine, MACs = conv only; no classifier.

CLI: ``python -m us3l_jax.profile --model=resnet50 --widths=1.0,0.75,0.5,0.25
--input_size=224 --num_classes=1000 [--json] [--convention=paper|backbone]``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags as absl_flags
from flax import linen as nn

from us3l_jax import cli, models, slim
from us3l_jax.slim import SlimBatchNorm, SlimConv, SlimDense

CONVENTIONS = ("paper", "backbone")
_KINDS = {SlimConv: "conv", SlimBatchNorm: "bn", SlimDense: "dense"}

# Tables 6 and 12 of the paper: 224x224, 1000 classes, paper convention.
PAPER_FIGURES: dict[tuple[str, float], tuple[str, str]] = {
    ("resnet50", 1.0): ("22.56M", "4.11G"), ("resnet50", 0.75): ("14.77M", "2.34G"),
    ("resnet50", 0.5): ("6.92M", "1.06G"), ("resnet50", 0.25): ("1.99M", "0.28G"),
    ("resnet18", 1.0): ("11.69M", "n/a"), ("resnet18", 0.75): ("6.68M", "1.05G"),
    ("resnet18", 0.5): ("3.06M", "0.49G"), ("resnet18", 0.25): ("0.83M", "0.14G"),
}
PAPER_NOTES: dict[tuple[str, float], str] = {
    ("resnet50", 1.0): "paper's 22.56M is a typo for 25.56M",
    ("resnet18", 1.0): "paper's MACs cell is garbled ('1'); 1.82G expected",
}


@dataclasses.dataclass(frozen=True)
class Layer:
    """One conv / BN / dense call seen while tracing: shapes are (N, H, W, C) or (N, C)."""
    kind: str
    path: tuple[str, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel_size: int = 1
    strides: int = 1
    depthwise: bool = False
    use_bias: bool = False


def trace_layers(module: nn.Module, input_shape: Sequence[int], **call_kw: Any) -> list[Layer]:
    """Every slimmable-layer call of ``module.init(rng, x, **call_kw)`` for ``x`` of
    ``input_shape``, in call order (abstract evaluation: no compute, no memory)."""
    layers: list[Layer] = []

    def record(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        m = context.module
        kind = next((k for cls, k in _KINDS.items() if isinstance(m, cls)), None)
        if kind is not None and context.method_name == "__call__":
            layers.append(Layer(kind, tuple(m.path), tuple(args[0].shape), tuple(y.shape),
                                getattr(m, "kernel_size", 1), getattr(m, "strides", 1),
                                getattr(m, "depthwise", False),
                                getattr(m, "use_bias", False)))
        return y

    def init(x):
        with nn.intercept_methods(record):
            return module.init(jax.random.key(0), x, **call_kw)

    jax.eval_shape(init, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
    return layers


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; valid: {', '.join(CONVENTIONS)}")


def count(layers: Sequence[Layer], convention: str = "paper") -> dict[str, int]:
    """Params and MACs of traced ``layers`` (batch 1) under ``convention``, with a breakdown."""
    _check_convention(convention)
    paper = convention == "paper"
    c = dict(conv_params=0, bn_params=0, fc_params=0, conv_macs=0, bn_macs=0, fc_macs=0,
             pool_macs=0)
    for layer in layers:
        cin, cout = layer.in_shape[-1], layer.out_shape[-1]
        out_elems = math.prod(layer.out_shape[1:])
        if layer.kind == "conv":
            per_out = layer.kernel_size ** 2 * (1 if layer.depthwise else cin)
            c["conv_params"] += per_out * cout + (cout if layer.use_bias else 0)
            c["conv_macs"] += out_elems * (per_out + (1 if layer.use_bias else 0))
        elif layer.kind == "bn":
            c["bn_params"] += 2 * cin
            c["bn_macs"] += 2 * math.prod(layer.in_shape[1:]) if paper else 0
        elif paper:  # the classifier; the backbone convention has none
            c["fc_params"] += cin * cout + (cout if layer.use_bias else 0)
            c["fc_macs"] += cin * cout
    maps = [layer for layer in layers if layer.kind != "dense"]
    if paper and maps:
        # Global average pool of the last feature map: thop counts (kernel adds + 1 div) per
        # output, i.e. (H*W + 1) * C.
        _, h, w, ch = maps[-1].out_shape
        c["pool_macs"] = (h * w + 1) * ch
    c["params"] = c["conv_params"] + c["bn_params"] + c["fc_params"]
    c["macs"] = c["conv_macs"] + c["bn_macs"] + c["fc_macs"] + c["pool_macs"]
    return c


def vit_count(model: Any, width: float, input_size: int,
              num_classes: int | None = None) -> dict[str, int]:
    """Params and MACs of a slimmable ViT at ``width`` for one image, from the sizes its
    forward uses (``VisionTransformer.dims``). Params: patch embedding, class token, every
    LayerNorm's affine, the block Linears as sliced at this width (official: inputs only;
    embed: inputs and outputs), the head if ``num_classes``; the fixed position table is not
    a parameter. MACs: the patch embedding, each Linear (tokens x in x out), and attention
    (q kᵀ and attn·v: 2 x tokens² x heads x head_dim per block) at the heads computed; the
    head. LayerNorm, softmax, GELU and biases count 0 MACs."""
    d = model.dims(width)
    p = model.patch_size
    if input_size % p:
        raise ValueError(f"input_size {input_size} is not divisible by the patch {p}")
    patches = (input_size // p) ** 2
    n = patches + 1
    qkv_out = 3 * d.heads * (model.dim // model.heads)
    linears = [(d.block_in, qkv_out), (d.block_in, d.embed), (d.block_in, d.hidden),
               (d.fc2_in, d.embed)]
    c = dict(patch_params=p * p * 3 * d.embed + d.embed, patch_macs=patches * p * p * 3 * d.embed,
             norm_params=(2 * model.depth + 1) * 2 * d.embed, token_params=d.embed)
    c["linear_params"] = model.depth * sum(i * o + o for i, o in linears)
    c["linear_macs"] = model.depth * n * sum(i * o for i, o in linears)
    c["attn_macs"] = model.depth * 2 * n * n * qkv_out // 3
    c["fc_params"] = d.embed * num_classes + num_classes if num_classes else 0
    c["fc_macs"] = d.embed * num_classes if num_classes else 0
    c["params"] = sum(v for k, v in c.items() if k.endswith("_params"))
    c["macs"] = sum(v for k, v in c.items() if k.endswith("_macs"))
    return c


def profile(name: str, width: float, input_size: int = 224, num_classes: int | None = 1000,
            convention: str = "paper", in_channels: int = 3, **model_kw: Any) -> dict[str, Any]:
    """Params and MACs of backbone ``name`` at ``width`` for one ``input_size`` image.

    Returns a dict with ``params``, ``macs``, their breakdown (``conv_/bn_/fc_params``,
    ``conv_/bn_/fc_/pool_macs``) and the arguments. ``convention='backbone'`` ignores
    ``num_classes``. ``model_kw`` goes to ``models.create`` (e.g. ``base_width`` for tests).
    Raises ``ValueError`` for an unknown name or convention, a bad size, or a width outside
    the model's range.
    """
    _check_convention(convention)
    if not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"input_size must be a positive integer, got {input_size!r}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}")
    classes = num_classes if convention == "paper" else None
    model = models.create(name, num_classes=classes, **model_kw)
    width = slim.validate_width(width, model.min_width)
    if name in models.VIT_NAMES:
        return dict(name=name, width=width, input_size=input_size, num_classes=classes,
                    convention=convention, slicing=model.slicing,
                    **vit_count(model, width, input_size, classes))
    layers = trace_layers(model, (1, input_size, input_size, in_channels), width=width,
                          train=True)
    return dict(name=name, width=width, input_size=input_size, num_classes=classes,
                convention=convention, **count(layers, convention))


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


def paper_figures(r: dict[str, Any]) -> dict[str, str]:
    """The paper's figures (and a note) for a ``profile`` row of a Table 6/12 setting, else {}.
    Only meaningful for default model arguments."""
    key = (r["name"], r["width"])
    if (r["convention"] != "paper" or r["input_size"] != 224
            or r["num_classes"] != 1000 or key not in PAPER_FIGURES):
        return {}
    p, m = PAPER_FIGURES[key]
    return dict(paper_params=p, paper_macs=m, note=PAPER_NOTES.get(key, ""))


def _human(n: int) -> str:
    """4111514624 -> '4.11G', 555417600 -> '555.4M' (the paper's styles)."""
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.2f}M" if n < 1e8 else f"{n / 1e6:.1f}M"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text table of ``profile`` rows (with the paper's figures where present)."""
    head = ["width", "params", "MACs", "~params", "~MACs"]
    with_slicing = any("slicing" in r for r in rows)
    if with_slicing:
        head = ["slicing"] + head
    with_paper = any("paper_params" in r for r in rows)
    if with_paper:
        head += ["paper params", "paper MACs", "note"]
    body = []
    for r in rows:
        line = [f"{r['width']}", f"{r['params']:,}", f"{r['macs']:,}",
                _human(r["params"]), _human(r["macs"])]
        if with_slicing:
            line = [r.get("slicing", "")] + line
        if with_paper:
            line += [r.get("paper_params", ""), r.get("paper_macs", ""), r.get("note", "")]
        body.append(line)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]

    def fmt(cells: list[str]) -> str:  # numbers right-aligned, the note left-aligned
        out = [c.ljust(w) if h == "note" else c.rjust(w) for c, w, h in zip(cells, widths, head)]
        return "  ".join(out).rstrip()

    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


PROG = "python -m us3l_jax.profile"
FLAGS = absl_flags.FlagValues()
absl_flags.DEFINE_string("model", None, "backbone (required): " + ", ".join(models.NAMES),
                         flag_values=FLAGS)
absl_flags.DEFINE_string("widths", "1.0,0.75,0.5,0.25", "comma-separated widths",
                         flag_values=FLAGS)
absl_flags.DEFINE_integer("input_size", 224, "square input size in pixels", flag_values=FLAGS)
absl_flags.DEFINE_integer("num_classes", 1000, "classifier outputs (paper convention)",
                          flag_values=FLAGS)
absl_flags.DEFINE_enum("convention", "paper", CONVENTIONS, "paper (thop, Tables 6/12) or "
                       "backbone (the sliced backbone as trained)", flag_values=FLAGS)
absl_flags.DEFINE_bool("json", False, "print JSON instead of a table", flag_values=FLAGS)
absl_flags.DEFINE_enum("slicing", "both", ("official", "embed", "both"),
                       "ViTs only: which slicing mode(s) to count", flag_values=FLAGS)
_NAMES = ("model", "widths", "input_size", "num_classes", "convention", "json", "slicing")


def _widths(text: str) -> list[float]:
    try:
        widths = [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        widths = []
    if not widths:
        raise ValueError(f"widths must be comma-separated numbers, got {text!r}")
    return widths


def usage() -> str:
    return (f"Params and MACs per width ({__doc__.splitlines()[0]})\n"
            f"  {PROG} --model=resnet50 --widths=1.0,0.75,0.5,0.25\n\n"
            f"Flags:\n{cli.format_flags(FLAGS, _NAMES)}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI (absl flags like ``python -m us3l_jax.main``; ``--input-size`` and the other
    earlier hyphenated spellings still work). Returns the exit status."""
    cli.parse(FLAGS, argv, PROG, usage)
    if not FLAGS.model:
        cli.fail(PROG, f"--model is required; one of: {', '.join(models.NAMES)}")
    try:
        rows = []
        vit = FLAGS.model in models.VIT_NAMES
        slicings = ((("official", "embed") if FLAGS.slicing == "both" else (FLAGS.slicing,))
                    if vit else (None,))
        for slicing in slicings:
            for w in _widths(FLAGS.widths):
                kw = {"slicing": slicing} if vit else {}
                r = profile(FLAGS.model, w, FLAGS.input_size, FLAGS.num_classes,
                            FLAGS.convention, **kw)
                rows.append({**r, **paper_figures(r)})
    except ValueError as e:
        cli.fail(PROG, e)
    if FLAGS.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{FLAGS.model}, {FLAGS.input_size}x{FLAGS.input_size}, convention "
              f"{FLAGS.convention}" + (f", {FLAGS.num_classes} classes"
                                       if FLAGS.convention == "paper" else ""))
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
