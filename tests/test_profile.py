"""Params / MACs per width: the paper's Tables 6 and 12, the trained backbones (the official
code's counts), XLA's own cost analysis, and the CLI."""
import functools
import json

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from us3l_jax import models, profile
from us3l_jax.models.plain import plain_network
from us3l_jax.slim import SlimConv, SlimDense

TINY = dict(base_width=16, stage_sizes=(1, 1, 1, 1))


# Official: thop-style counts at 224x224, 1000 classes.
@pytest.mark.parametrize("name,width,params,macs", [
    ("resnet50", 1.0, 25_557_032, 4_111_514_624),
    ("resnet50", 0.75, 14_771_992, 2_339_425_536),
    ("resnet50", 0.5, 6_917_640, 1_063_476_736),
    ("resnet50", 0.25, 1_993_976, 283_668_224),
    ("resnet18", 1.0, 11_689_512, 1_819_066_368),
    ("resnet18", 0.75, 6_675_352, 1_046_384_640),
    ("resnet18", 0.5, 3_055_880, 485_646_336),
    ("resnet18", 0.25, 831_096, 136_851_456),
])
def test_paper_tables_6_and_12(name, width, params, macs):
    r = profile.profile(name, width)
    assert (r["params"], r["macs"]) == (params, macs)
    assert r["params"] == r["conv_params"] + r["bn_params"] + r["fc_params"]
    # The paper's rounded figures, except R-50 1.0x params (typo 22.56M) and the garbled R-18
    # 1.0x MACs cell.
    paper_p, paper_m = profile.PAPER_FIGURES[(name, width)]
    if (name, width) != ("resnet50", 1.0):
        assert f"{params / 1e6:.2f}M" == paper_p
    if (name, width) != ("resnet18", 1.0):
        assert f"{macs / 1e9:.2f}G" == paper_m


def test_paper_convention_needs_bn_and_fc():
    # Official: conv + fc alone gives 4.089G for R-50; without the fc, 23.51M params.
    r = profile.profile("resnet50", 1.0)
    assert round((r["conv_macs"] + r["fc_macs"]) / 1e9, 3) == 4.089
    assert round((r["params"] - r["fc_params"]) / 1e6, 2) == 23.51
    assert r["fc_params"] == 2048 * 1000 + 1000
    assert r["pool_macs"] == (49 + 1) * 2048


@pytest.mark.slow
@pytest.mark.parametrize("name,widths,params", [
    ("cifar_resnet18", (1.0, 0.75, 0.5, 0.3, 0.25),
     (11_168_832, 6_284_592, 2_795_040, 1_027_352, 700_176)),
    ("cifar_resnet50", (1.0, 0.75, 0.5, 0.3, 0.25),
     (23_500_352, 13_229_232, 5_888_800, 2_156_808, 1_479_056)),
])
def test_trained_backbone_counts(name, widths, params):
    got = [profile.profile(name, w, 32, convention="backbone") for w in widths]
    assert tuple(r["params"] for r in got) == params
    assert all(r["fc_params"] == r["fc_macs"] == r["bn_macs"] == r["pool_macs"] == 0
               for r in got)
    if name == "cifar_resnet18":  # conv MACs, to 0.1M
        assert [round(r["macs"] / 1e6, 1) for r in got] == [555.4, 312.8, 139.3, 60.4, 35.0]


def test_mobilenet_v2_counts():
    # Official: plain MBv2 1.0x = 3,504,872 / 314.19M (same channels as the US model at
    # 1.0); the US-MBv2 at 0.25x (make_divisible, 8-channel minimums) 1,519,112 / 41.82M.
    full, quarter = (profile.profile("mobilenet_v2", w) for w in (1.0, 0.25))
    assert full["params"] == 3_504_872 and round(full["macs"] / 1e6, 2) == 314.19
    assert quarter["params"] == 1_519_112 and round(quarter["macs"] / 1e6, 2) == 41.82


@pytest.mark.parametrize("name,width", [("resnet50", 0.3), ("mobilenet_v2", 0.25)])
def test_plain_network_profiles_like_the_slimmable_one(name, width):
    model = models.create(name, num_classes=1000)
    shape = (1, 224, 224, 3)
    slim_layers = profile.trace_layers(model, shape, width=width, train=True)
    plain_layers = profile.trace_layers(plain_network(model, width), shape, train=True)
    assert [(l.kind, l.in_shape, l.out_shape) for l in slim_layers] == \
        [(l.kind, l.in_shape, l.out_shape) for l in plain_layers]
    assert profile.count(slim_layers) == profile.count(plain_layers)


def _unpadded_taps(n_in, k, s):
    """Kernel taps along one axis that land inside the input, summed over outputs (pad k//2)."""
    p = k // 2
    n_out = (n_in + 2 * p - k) // s + 1
    return sum(0 <= o * s - p + t < n_in for o in range(n_out) for t in range(k))


def _unpadded_conv_macs(layers):
    """Conv MACs without the taps on zero padding (what XLA's cost analysis counts)."""
    total = 0
    for layer in layers:
        if layer.kind == "conv":
            _, h, w, cin = layer.in_shape
            k, s = layer.kernel_size, layer.strides
            total += layer.out_shape[-1] * (1 if layer.depthwise else cin) * \
                _unpadded_taps(h, k, s) * _unpadded_taps(w, k, s)
    return total


def _without_convs_and_dense(layers):
    """Interceptor replacing each conv/dense call (in traced order) by 0-flop data movement of
    the recorded output shape: strided slice, channel concatenation and slice."""
    it = iter([layer for layer in layers if layer.kind != "bn"])

    def intercept(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module,
                                                                 (SlimConv, SlimDense)):
            return next_fun(*args, **kwargs)
        rec, y = next(it), args[0]
        assert y.shape == rec.in_shape
        if y.ndim == 4:
            y = y[:, ::rec.strides, ::rec.strides, :]
        c = rec.out_shape[-1]
        return jnp.concatenate([y] * -(-c // y.shape[-1]), axis=-1)[..., :c]

    return intercept


XLA_CASES = [("cifar_resnet18", TINY, 16, 0.3), ("resnet50", TINY, 32, 0.5),
             ("cifar_mobilenet_v2", {}, 8, 0.25)]


@functools.lru_cache(maxsize=None)
def _xla_setup(name, width):
    (kw, size), = [(kw, size) for n, kw, size, w in XLA_CASES if (n, w) == (name, width)]
    model = models.create(name, num_classes=10, **kw)
    x = jnp.zeros((1, size, size, 3))
    layers = profile.trace_layers(model, x.shape, width=width, train=True)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)

    def forward(v, x, strip=False):
        if not strip:
            return model.apply(v, x, width=width, train=False)
        with nn.intercept_methods(_without_convs_and_dense(layers)):
            return model.apply(v, x, width=width, train=False)

    return forward, variables, x, layers


@pytest.mark.slow
@pytest.mark.parametrize("name,width", [(n, w) for n, _, _, w in XLA_CASES])
def test_conv_and_fc_macs_match_xla_exactly(name, width):
    """XLA's HloCostAnalysis counts 2 flops per multiply-add, skipping taps on zero padding
    (thop, and so the paper convention, counts them). The forward minus the same forward with
    every conv/dense replaced by 0-flop data movement isolates their flops; on the
    pre-optimisation HLO (``Lowered.cost_analysis``, no fusion to differ between the two) it
    equals 2 x (unpadded conv MACs + fc MACs) + the fc bias adds, up to 16 flops (observed:
    exact for the ResNets, 2 flops at MobileNetV2's classifier, out of 10^6-10^7)."""
    forward, variables, x, layers = _xla_setup(name, width)
    counts = profile.count(layers)
    flops = [jax.jit(functools.partial(forward, strip=strip)).lower(variables, x)
             .cost_analysis()["flops"] for strip in (False, True)]
    want = 2 * (_unpadded_conv_macs(layers) + counts["fc_macs"]) + 10  # bias: 1 image x 10
    assert abs(flops[0] - flops[1] - want) <= 16, (flops, want)
    # Padding taps are what separates the thop-style count from XLA's.
    assert _unpadded_conv_macs(layers) < counts["conv_macs"]


@pytest.mark.slow
@pytest.mark.parametrize("name,width", [(n, w) for n, _, _, w in XLA_CASES])
def test_macs_bound_compiled_xla_flops(name, width):
    """The compiled forward's flops (``.compile().cost_analysis()``) also count elementwise
    work (BN affine, ReLU, residual adds, pooling), fused as XLA chooses, so here the check is
    a bound: 0 <= flops - 2 x (unpadded conv + fc MACs) <= 8 x (BN input elements). Eval-mode
    BN + ReLU measured 5-6 flops per element; a missing conv of the traced size would add
    far more than the slack to the difference or push it below 0."""
    forward, variables, x, layers = _xla_setup(name, width)
    counts = profile.count(layers)
    flops = jax.jit(forward).lower(variables, x).compile().cost_analysis()["flops"]
    extra = flops - 2 * (_unpadded_conv_macs(layers) + counts["fc_macs"])
    assert 0 <= extra <= 8 * counts["bn_macs"] // 2, (flops, extra)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet99'.*resnet18"):
        profile.profile("resnet99", 1.0)
    with pytest.raises(ValueError, match=r"width 0\.2 is outside the allowed range"):
        profile.profile("resnet18", 0.2)
    with pytest.raises(ValueError, match="unknown convention 'thop'.*paper, backbone"):
        profile.profile("resnet18", 1.0, convention="thop")
    with pytest.raises(ValueError, match="input_size must be a positive integer, got 0"):
        profile.profile("resnet18", 1.0, input_size=0)


def test_cli_json_and_table(capsys):
    assert profile.main(["--model", "resnet50", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["width"] for r in rows] == [1.0, 0.75, 0.5, 0.25]
    assert [r["params"] for r in rows] == [25_557_032, 14_771_992, 6_917_640, 1_993_976]
    assert rows[0]["paper_params"] == "22.56M" and "typo" in rows[0]["note"]
    assert profile.main(["--model", "cifar_resnet18", "--widths", "1.0,0.3", "--input-size",
                         "32", "--convention", "backbone"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "convention backbone" in lines[0] and "paper" not in lines[1]
    assert "11,168,832" in lines[3] and "1,027,352" in lines[4] and len(lines) == 5


def test_cli_help_exits_0_and_lists_models(capsys):
    with pytest.raises(SystemExit) as e:
        profile.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--model: backbone (required): " in out and "resnet50" in out
    assert "--convention: <paper|backbone>: paper (thop" in out and "(default: paper)" in out


@pytest.mark.parametrize("argv,message", [
    (["--model", "resnet18", "--widths", "1.0,0.1"], "width 0.1 is outside the allowed range"),
    (["--model", "resnet99"], "unknown model 'resnet99'"),
    (["--model", "resnet18", "--widths", "a"], "widths must be comma-separated numbers"),
    (["--model", "resnet18", "--convention", "thop"],
     "python -m us3l_jax.profile: error: invalid flags: flag --convention=thop: value should "
     "be one of <paper|backbone>"),
    (["--widths", "1.0"], "--model is required; one of: "),
    (["--model", "resnet18", "extra"], "unexpected arguments ['extra']"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        profile.main(argv)
    rc = e.value.code
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_vit_counts_match_hand_count_and_parameter_trees():
    from us3l_jax.models.vit import plain_vit
    tiny = dict(dim=32, depth=2, heads=4, patch_size=4)
    # Hand count, official slicing at 0.5 on 8x8 (4 patches + cls = 5 tokens): qkv/proj/fc1
    # read md(16) = 16 inputs, fc2 reads md(64) = 64 hidden units, outputs full.
    r = profile.profile("vit_tiny", 0.5, input_size=8, convention="backbone", **tiny)
    block_params = (16 * 96 + 96) + (16 * 32 + 32) + (16 * 128 + 128) + (64 * 32 + 32)
    params = (4 * 4 * 3 * 32 + 32) + 32 + 5 * 2 * 32 + 2 * block_params
    block_macs = 5 * (16 * 96 + 16 * 32 + 16 * 128 + 64 * 32) + 2 * 25 * 32
    assert r["params"] == params and r["macs"] == 4 * 48 * 32 + 2 * block_macs
    assert r["attn_macs"] == 2 * 2 * 25 * 32  # unchanged by the width in official slicing
    # Width 1.0 (both modes), and every embed width, count exactly the model's parameters.
    x = jnp.zeros((1, 8, 8, 3))
    for slicing, width in (("official", 1.0), ("embed", 1.0), ("embed", 0.5), ("embed", 0.25)):
        model = models.create("vit_tiny", num_classes=10, slicing=slicing, **tiny)
        net = model if width == 1.0 else plain_vit(model, width)
        shapes = jax.eval_shape(net.init, jax.random.key(0), x)
        n = sum(a.size for a in jax.tree.leaves(shapes))
        got = profile.profile("vit_tiny", width, input_size=8, num_classes=10,
                              slicing=slicing, **tiny)
        assert got["params"] == n, (slicing, width)
