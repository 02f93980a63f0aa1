"""model.py, the plain-PyTorch builder written beside model.safetensors: every family it
describes (ResNet with both stems and both blocks, MobileNetV2, ViT) rebuilt in torch from
``command.torch_arch`` computes the plain network of the width, at batches 1 and 7."""
import functools

import jax
import numpy as np
import pytest

from us3l_jax import export, models
from us3l_jax.export import command
from tests.export.conftest import random_variables

torch = pytest.importorskip(
    "torch", reason="torch not installed: CI must install the CPU build (pip install torch "
                    "--index-url https://download.pytorch.org/whl/cpu) so that model.py is tested")
from us3l_jax.export import torch_model  # noqa: E402 - needs torch

# name -> (model keywords, image size, width)
CASES = {
    "cifar_resnet18": (dict(base_width=16, stage_sizes=(1, 1, 1, 1)), 8, 0.5),
    "resnet50": (dict(base_width=16, stage_sizes=(1, 2, 1, 1)), 32, 0.3),
    "cifar_mobilenet_v2": ({}, 8, 0.25),
    "vit_tiny": (dict(dim=32, depth=2, heads=4, patch_size=4, image_size=8, slicing="embed"),
                 8, 0.5),
}


@functools.lru_cache(maxsize=None)
def _plain(name):
    """(plain network of the case's width, its sliced variables, image size)."""
    kw, size, width = CASES[name]
    model = models.create(name, **kw)
    x = np.zeros((1, size, size, 3), np.float32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, width=1.0,
                                                 train=False))
    variables = random_variables(dict(abstract))
    return export.slice_module(model, variables, width) + (size,)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_torch_network_computes_the_width(name):
    plain, sliced, size = _plain(name)
    arch = command.torch_arch(plain)
    net = torch_model.build(arch).eval()
    sd = {k: torch.from_numpy(np.array(v)) for k, v in
          export.plain_to_torch_state_dict(plain, sliced).items()}
    result = net.load_state_dict(sd, strict=True)  # every key matched, both ways
    assert not result.missing_keys and not result.unexpected_keys
    fn = jax.jit(lambda v, x: plain.apply(v, x, train=False))
    for batch in (1, 7):
        x = np.asarray(jax.random.normal(jax.random.key(batch), (batch, size, size, 3)),
                       np.float32)
        ref = np.asarray(fn(sliced, x))
        with torch.no_grad():
            got = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_stems_follow_the_run():
    """The CIFAR ResNet stem is a 3x3 stride-1 conv without max-pool; ImageNet's is 7x7
    stride 2 with max-pool; MobileNetV2 on 32-px inputs has a stride-1 stem."""
    cifar = torch_model.build(command.torch_arch(_plain("cifar_resnet18")[0]))
    assert (cifar.conv1.kernel_size, cifar.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(cifar.maxpool, torch.nn.Identity)
    imagenet = torch_model.build(command.torch_arch(_plain("resnet50")[0]))
    assert (imagenet.conv1.kernel_size, imagenet.conv1.stride) == ((7, 7), (2, 2))
    assert isinstance(imagenet.maxpool, torch.nn.MaxPool2d)
    assert imagenet.layer2[0].num_convs == 3 and cifar.layer2[0].num_convs == 2
    assert imagenet.layer2[0].conv2.stride == (2, 2)  # v1.5: the stride on the 3x3
    mbv2 = torch_model.build(command.torch_arch(_plain("cifar_mobilenet_v2")[0]))
    assert mbv2.features[0][0].stride == (1, 1) and mbv2.features[0][0].out_channels == 8
    with pytest.raises(ValueError, match="unknown family 'densenet'"):
        torch_model.build({"family": "densenet"})
