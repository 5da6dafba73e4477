"""Write tests/data/torchvision_resnet50_w4.safetensors: a torchvision-layout state dict
with PyTorch's logits for a fixed input, so the weight-import tests run without torch.

Needs torch (the ``bench`` extra), not torchvision: :class:`TorchResNet` below is a
ResNet written here in plain torch with torchvision's module names and structure
(``conv1``, ``bn1``, ``maxpool``, ``layer1``..``layer4`` of ``BasicBlock``/``Bottleneck``
with a ``downsample`` Sequential, ``fc``; v1.5, the stride on the bottleneck's 3x3),
so its ``state_dict()`` has exactly the keys and shapes of ``torchvision.models.resnet*``.
``tests/test_torchvision_weights.py`` imports it too, where torch is installed.

The fixture is a ResNet-50 layout at width 4 (stage widths 4, 8, 16, 32; ~100k
parameters, ~450 KB: width 8 would be 1.5 MB) with 10 classes, random weights and random
batch-norm statistics (so running mean and variance matter), plus ``input`` (NCHW,
2x3x32x32) and ``logits`` (PyTorch's, eval mode, float32). Run from the repository root:

    python tests/scripts/make_torchvision_fixture.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "torchvision_resnet50_w4.safetensors"
LAYOUTS = {
    "resnet18": ((2, 2, 2, 2), False), "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True), "resnet101": ((3, 4, 23, 3), True),
    "resnet152": ((3, 8, 36, 3), True),
}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class TorchResNet(nn.Module):
    """torchvision.models.ResNet's structure and names, at any width."""

    def __init__(self, layout: str = "resnet50", num_classes: int = 1000,
                 width: int = 64) -> None:
        super().__init__()
        stage_sizes, bottleneck = LAYOUTS[layout]
        block = Bottleneck if bottleneck else BasicBlock
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, blocks in enumerate(stage_sizes):
            setattr(self, f"layer{i + 1}",
                    self._make_layer(block, width * 2**i, blocks, 1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def randomized(layout: str, *, num_classes: int, width: int, seed: int = 0) -> TorchResNet:
    """A TorchResNet in eval mode with random weights and random batch-norm statistics
    (a fresh one has mean 0 / var 1, which would not test that they are carried)."""
    torch.manual_seed(seed)
    model = TorchResNet(layout, num_classes, width)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
        model.fc.weight.mul_(10.0)  # logits of order 1-10, not 0.1: a real comparison
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIXTURE)
    args = parser.parse_args()
    from safetensors.torch import save_file

    model = randomized("resnet50", num_classes=10, width=4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors["input"], tensors["logits"] = x.contiguous(), logits.contiguous()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata={"torch": torch.__version__,
                                                "layout": "resnet50", "width": "4"})
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
