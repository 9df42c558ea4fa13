"""The Inception-v3 graph of the 2015-12-05 TensorFlow release, as a PyTorch module with random weights.

Module names and the forward signature follow the TorchScript file clean-fid loads
(`inception-2015-12-05.pt`): `layers` (a Sequential from `conv` to `pool2`, 2048 features) and `output`
(a 2048 -> 1008 linear layer), and `forward(img, return_features, use_fp16, no_output_bias)` on uint8-range
NCHW images of any size. Every convolution is conv (no bias) + batch norm without scale (eps 1e-3) + ReLU.
`inception-random` instantiates this module with seeded weights; the extractor treats it and the real
TorchScript file the same way.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_SPATIAL_FEATURES = 17 * 17 * 7  # sFID: the first 7 channels of mixed_6/conv on its 17x17 grid
NUM_CLASSES = 1008  # the TF graph's softmax has 1008 outputs (1000 ImageNet classes + unused slots)


class ConvBN(nn.Module):
    """conv (no bias) -> batch norm without scale (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, padding=0, *, stride: int = 1):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride = stride
        self.padding = padding
        self.folded = False
        self.weight = nn.Parameter(torch.zeros(cout, cin, kh, kw))
        self.beta = nn.Parameter(torch.zeros(cout))
        self.mean = nn.Parameter(torch.zeros(cout))
        self.var = nn.Parameter(torch.ones(cout))

    @torch.no_grad()
    def fold_(self) -> None:
        """Fold the batch norm into the convolution's weight and bias (the same function, less work)."""
        if not self.folded:
            scale = torch.rsqrt(self.var + 1e-3)
            self.weight.mul_(scale[:, None, None, None])
            self.beta.sub_(self.mean * scale)
            self.folded = True

    def forward(self, x: Tensor) -> Tensor:
        if self.folded:
            return torch.relu_(F.conv2d(x, self.weight, self.beta, stride=self.stride, padding=self.padding))
        x = F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)
        x = F.batch_norm(x, self.mean, self.var, bias=self.beta, eps=1e-3)
        return torch.relu_(x)


def _avg3() -> nn.Module:
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):  # 35x35: mixed, mixed_1, mixed_2
    def __init__(self, cin: int, pool_channels: int):
        super().__init__()
        self.conv = ConvBN(cin, 64, 1)
        self.tower = nn.Sequential(OrderedDict(conv=ConvBN(cin, 48, 1), conv_1=ConvBN(48, 64, 5, padding=2)))
        self.tower_1 = nn.Sequential(OrderedDict(conv=ConvBN(cin, 64, 1), conv_1=ConvBN(64, 96, 3, padding=1),
                                                 conv_2=ConvBN(96, 96, 3, padding=1)))
        self.tower_2 = nn.Sequential(OrderedDict(pool=_avg3(), conv=ConvBN(cin, pool_channels, 1)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class BlockB(nn.Module):  # 35x35 -> 17x17: mixed_3
    def __init__(self, cin: int):
        super().__init__()
        self.conv = ConvBN(cin, 384, 3, stride=2)
        self.tower = nn.Sequential(OrderedDict(conv=ConvBN(cin, 64, 1), conv_1=ConvBN(64, 96, 3, padding=1),
                                               conv_2=ConvBN(96, 96, 3, stride=2)))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class BlockC(nn.Module):  # 17x17: mixed_4 .. mixed_7 (ADM's spatial features are mixed_6/conv)
    def __init__(self, cin: int, mid: int):
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
        self.conv = ConvBN(cin, 192, 1)
        self.tower = nn.Sequential(OrderedDict(conv=ConvBN(cin, mid, 1), conv_1=ConvBN(mid, mid, *row),
                                               conv_2=ConvBN(mid, 192, *col)))
        self.tower_1 = nn.Sequential(OrderedDict(conv=ConvBN(cin, mid, 1), conv_1=ConvBN(mid, mid, *col),
                                                 conv_2=ConvBN(mid, mid, *row), conv_3=ConvBN(mid, mid, *col),
                                                 conv_4=ConvBN(mid, 192, *row)))
        self.tower_2 = nn.Sequential(OrderedDict(pool=_avg3(), conv=ConvBN(cin, 192, 1)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class BlockD(nn.Module):  # 17x17 -> 8x8: mixed_8
    def __init__(self, cin: int):
        super().__init__()
        self.tower = nn.Sequential(OrderedDict(conv=ConvBN(cin, 192, 1), conv_1=ConvBN(192, 320, 3, stride=2)))
        self.tower_1 = nn.Sequential(OrderedDict(conv=ConvBN(cin, 192, 1), conv_1=ConvBN(192, 192, (1, 7), (0, 3)),
                                                 conv_2=ConvBN(192, 192, (7, 1), (3, 0)),
                                                 conv_3=ConvBN(192, 192, 3, stride=2)))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class BlockE(nn.Module):  # 8x8: mixed_9 (average-pool branch), mixed_10 (max-pool branch)
    def __init__(self, cin: int, avg_pool: bool):
        super().__init__()
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = _avg3() if avg_pool else nn.MaxPool2d(3, stride=1, padding=1)
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


def tf_bilinear_resize(x: Tensor, size: int = 299) -> Tensor:
    """TensorFlow 1's `resize_bilinear(align_corners=False)` (no half-pixel centres), as the TF graph does.

    Output pixel i samples input coordinate i * in / out, interpolating between floor and floor + 1 with
    the last row/column repeated. Written with grid_sample (border padding) as the TorchScript model does.
    """
    n, h, w = x.shape[0], x.shape[2], x.shape[3]
    ys = torch.arange(size, device=x.device, dtype=torch.float32) * (h / size)
    xs = torch.arange(size, device=x.device, dtype=torch.float32) * (w / size)
    # grid_sample(align_corners=False) reads pixel p at normalised (2p + 1) / n - 1
    grid_y, grid_x = torch.meshgrid((2 * ys + 1) / h - 1, (2 * xs + 1) / w - 1, indexing="ij")
    grid = torch.stack([grid_x, grid_y], dim=-1).to(x.dtype).unsqueeze(0).expand(n, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionV3TF(nn.Module):
    """Inception-v3 (TF 2015-12-05 graph layout) with the TorchScript file's forward signature."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(OrderedDict(
            conv=ConvBN(3, 32, 3, stride=2),
            conv_1=ConvBN(32, 32, 3),
            conv_2=ConvBN(32, 64, 3, padding=1),
            pool0=nn.MaxPool2d(3, stride=2),
            conv_3=ConvBN(64, 80, 1),
            conv_4=ConvBN(80, 192, 3),
            pool1=nn.MaxPool2d(3, stride=2),
            mixed=BlockA(192, 32),
            mixed_1=BlockA(256, 64),
            mixed_2=BlockA(288, 64),
            mixed_3=BlockB(288),
            mixed_4=BlockC(768, 128),
            mixed_5=BlockC(768, 160),
            mixed_6=BlockC(768, 160),
            mixed_7=BlockC(768, 192),
            mixed_8=BlockD(768),
            mixed_9=BlockE(1280, avg_pool=True),
            mixed_10=BlockE(2048, avg_pool=False),
            pool2=nn.AvgPool2d(8),
        ))
        self.output = nn.Linear(NUM_FEATURES, NUM_CLASSES)

    def forward(self, img: Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> Tensor:
        x = tf_bilinear_resize(img.to(torch.float32))
        x = (x - 128) / 128
        features = self.layers(x).reshape(-1, 2048)
        if return_features:
            return features
        logits = F.linear(features, self.output.weight, None if no_output_bias else self.output.bias)
        return F.softmax(logits, dim=1)


def random_inception(seed: int = 0) -> InceptionV3TF:
    """The architecture with deterministic random weights (CPU generator, fixed parameter order).

    Convolutions are He-normal (fan-in), batch norm is the identity (mean 0, var 1, beta 0), the output
    layer is normal with std 1/sqrt(2048) and no bias, so activations keep their scale through the depth
    and the logits are O(1). The same seed gives the same weights on every machine and device.
    """
    model = InceptionV3TF()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".weight") and p.dim() == 4:
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                p.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen)
            elif name == "output.weight":
                p.normal_(0.0, NUM_FEATURES ** -0.5, generator=gen)
            elif name.endswith(".var"):
                p.fill_(1.0)
            else:
                p.zero_()
    return model.eval().requires_grad_(False)


def fold_batchnorm_(model: nn.Module) -> nn.Module:
    """Fold every ConvBN's batch norm into its convolution, in place (for inference)."""
    for module in model.modules():
        if isinstance(module, ConvBN):
            module.fold_()
    return model
