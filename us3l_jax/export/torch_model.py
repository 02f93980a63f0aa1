"""Plain-PyTorch builder for an export's ``model.safetensors`` (written beside it as
``model.py``; it imports only torch and safetensors, never us3l_jax).

Usage, from the export directory (``model_card.json`` and ``model.safetensors`` beside it)::

    import model                      # this file
    net = model.load(".")             # torch.nn.Module in eval mode, weights loaded (strict)
    features = net(images)            # images: float32 NCHW (batch, 3, size, size),
                                      # normalised as model_card.json's "input" says

``model.build(arch)`` builds the network of ``model_card.json``'s ``"torch_arch"`` without
weights. The networks are the exported width exactly (every channel count is in ``arch``):

* ``resnet``: torchvision ``ResNet`` names and blocks (basic or bottleneck, the stride of a
  bottleneck on its 3x3 conv, a 1x1 conv + BN shortcut where the block has one). The
  ``cifar`` stem is a 3x3 stride-1 conv with **no max-pool**; the ``imagenet`` stem is
  torchvision's 7x7 stride-2 conv + 3x3 stride-2 max-pool.
* ``mobilenet_v2``: torchvision ``mobilenet_v2`` names (``features.*``); the stem stride is
  1 for 32-px (CIFAR) inputs, else 2; a block adds its input only where the full-width block
  does (``residual`` per block in ``arch``).
* ``vit``: timm / MoCo v3 names (``patch_embed.proj``, ``cls_token``, ``pos_embed`` (the
  fixed sin-cos table, stored in the file), ``blocks.{i}``, ``norm``), LayerNorm eps 1e-6,
  exact GELU; the output is the normalised class token.

The output is the global-average-pooled features (CNNs) or the class token (ViT), with no
classifier, as in the other exported files. BN eps is 1e-5 (torch's default).
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn


class ResBlock(nn.Module):
    """torchvision's BasicBlock (two convs) or Bottleneck (three; v1.5, the stride on the
    3x3) at given channel counts: ``conv{i}``/``bn{i}`` with ReLU between them, then the
    shortcut (``downsample``: 1x1 conv + BN, where the block has one), add, ReLU."""

    def __init__(self, convs, down):
        super().__init__()
        for i, (k, s, cin, cout) in enumerate(convs, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, k, s, k // 2, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(cout))
        self.num_convs = len(convs)
        self.relu = nn.ReLU(inplace=True)
        cin, cout = convs[0][2], convs[-1][3]
        self.downsample = None if down is None else nn.Sequential(
            nn.Conv2d(cin, cout, 1, down, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = x
        for i in range(1, self.num_convs + 1):
            y = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(y))
            if i < self.num_convs:
                y = self.relu(y)
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """``arch``: ``stem`` ('cifar' or 'imagenet'), ``stem_channels``, ``blocks[stage][i] =
    [convs, downsample stride or None]`` with ``convs`` = [kernel, stride, in, out] per conv."""

    def __init__(self, arch):
        super().__init__()
        cifar = arch["stem"] == "cifar"
        k, s, p = (3, 1, 1) if cifar else (7, 2, 3)
        self.conv1 = nn.Conv2d(arch.get("in_channels", 3), arch["stem_channels"], k, s, p,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(arch["stem_channels"])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(3, 2, 1)
        for i, stage in enumerate(arch["blocks"]):
            setattr(self, f"layer{i + 1}", nn.Sequential(*[ResBlock(c, d) for c, d in stage]))
        self.num_stages = len(arch["blocks"])

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x.mean((2, 3))


def _conv_bn(cin, cout, k, s, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    return nn.Sequential(*(layers + [nn.ReLU6(inplace=True)] if act else layers))


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block (``conv.*`` names) at given channel counts."""

    def __init__(self, inp, hidden, out, stride, expand, residual):
        super().__init__()
        layers = [_conv_bn(inp, hidden, 1, 1)] if expand else []
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out, 1, 1, 0, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)
        self.residual = residual

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    """``arch``: ``stem_channels``, ``stem_stride``, ``head_channels`` and ``blocks`` =
    [in, hidden, out, stride, expand, residual] per block."""

    def __init__(self, arch):
        super().__init__()
        blocks = arch["blocks"]
        layers = [_conv_bn(arch.get("in_channels", 3), arch["stem_channels"], 3,
                           arch["stem_stride"])]
        layers += [InvertedResidual(*b) for b in blocks]
        layers.append(_conv_bn(blocks[-1][2], arch["head_channels"], 1, 1))
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x).mean((2, 3))


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (b, heads, n, head_dim)
        attn = ((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_channels, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """``arch``: ``image_size``, ``patch_size``, ``dim``, ``depth``, ``heads``, ``mlp_ratio``,
    ``eps``. ``pos_embed`` is a buffer-like parameter loaded from the file."""

    def __init__(self, arch):
        super().__init__()
        d, grid = arch["dim"], arch["image_size"] // arch["patch_size"]
        self.patch_embed = PatchEmbed(arch.get("in_channels", 3), d, arch["patch_size"])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, d), requires_grad=False)
        self.blocks = nn.Sequential(*[Block(d, arch["heads"], arch["mlp_ratio"], arch["eps"])
                                      for _ in range(arch["depth"])])
        self.norm = nn.LayerNorm(d, eps=arch["eps"])

    def forward(self, x):
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed
        return self.norm(self.blocks(t))[:, 0]


FAMILIES = {"resnet": ResNet, "mobilenet_v2": MobileNetV2, "vit": VisionTransformer}


def build(arch: dict) -> nn.Module:
    """The network described by ``arch`` (``model_card.json``'s ``"torch_arch"``), without
    weights."""
    if arch.get("family") not in FAMILIES:
        raise ValueError(f"unknown family {arch.get('family')!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[arch["family"]](arch)


def load(directory: str = ".") -> nn.Module:
    """The exported network of ``directory`` in eval mode, ``model.safetensors`` loaded with
    every key matched (strict)."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, "model_card.json")) as f:
        net = build(json.load(f)["torch_arch"])
    net.load_state_dict(load_file(os.path.join(directory, "model.safetensors")), strict=True)
    return net.eval()


if __name__ == "__main__":  # python model.py [DIR]: load and run one zero batch
    import sys

    directory = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(directory, "model_card.json")) as f:
        size = json.load(f)["input"]["shape"][1]
    net = load(directory)
    with torch.no_grad():
        print(tuple(net(torch.zeros(2, 3, size, size)).shape))
