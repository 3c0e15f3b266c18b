"""The networks people train in federated learning, as presets: not built for R-CONV, attacked as they are.

Each is a plain nn.Module with PyTorch's default initialisation. `NETWORKS` maps a name to its
class, its dataset and its image side; `build_model` (rconv.cases.models) builds them by name.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class TutorialCNN(nn.Module):
    """PyTorch's CIFAR10 tutorial net, also Flower's quickstart Net: conv-ReLU-MaxPool twice, then
    Linear 400-120-84-10, written with a functional forward."""

    def __init__(self, in_channels=3, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LeNet5(nn.Sequential):
    """LeCun's LeNet-5 on 32-px images: Tanh and AvgPool after each conv layer, three Linear layers."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__(nn.Conv2d(in_channels, 6, 5), nn.Tanh(), nn.AvgPool2d(2),
                         nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(16 * 5 * 5, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(),
                         nn.Linear(84, num_classes))


class CNN6(nn.Sequential):
    """R-GAP's CNN6 in its shape: six conv layers and a Linear layer, none with a bias, a 4x4 first kernel
    with stride 2, LeakyReLU between them."""

    def __init__(self, in_channels=3, num_classes=10):
        def conv(a, b, kernel, stride, padding):
            return [nn.Conv2d(a, b, kernel, stride, padding, bias=False), nn.LeakyReLU(0.2)]
        super().__init__(*conv(in_channels, 12, 4, 2, 1), *conv(12, 36, 3, 2, 1), *conv(36, 36, 3, 1, 1),
                         *conv(36, 36, 3, 1, 1), *conv(36, 64, 3, 2, 1), *conv(64, 128, 3, 1, 1), nn.Flatten(),
                         nn.Linear(128 * 4 * 4, num_classes, bias=False))


class VGGStyle(nn.Sequential):
    """A small VGG: three conv-BatchNorm-ReLU-MaxPool blocks (16, 32, 64 filters) and an MLP head with
    Dropout, in eval mode (its BatchNorm uses its running statistics)."""

    def __init__(self, in_channels=3, num_classes=10):
        def block(a, b):
            return [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
        super().__init__(*block(in_channels, 16), *block(16, 32), *block(32, 64), nn.Flatten(),
                         nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, num_classes))


class _Residual(nn.Module):
    """x + conv(ReLU(conv(x))), then ReLU."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class SmallResNet(nn.Sequential):
    """A conv stem (16 filters, stride 2), two residual blocks, global average pooling and a Linear layer."""

    def __init__(self, in_channels=3, num_classes=10):
        super().__init__(nn.Conv2d(in_channels, 16, 3, stride=2, padding=1), nn.ReLU(), _Residual(16),
                         _Residual(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


class NetworkPreset(NamedTuple):
    """A network people train, as build_model finds it."""

    build: type  # called as build(in_channels, num_classes)
    dataset: str  # the dataset it goes with
    input_size: int  # its image side
    eval_mode: bool = False  # built in eval mode (BatchNorm with running statistics, Dropout off)


NETWORKS = {
    "tutorial_cnn": NetworkPreset(TutorialCNN, "cifar10", 32),
    "lenet5": NetworkPreset(LeNet5, "mnist", 32),
    "cnn6": NetworkPreset(CNN6, "cifar10", 32),
    "vgg_style": NetworkPreset(VGGStyle, "cifar10", 32, eval_mode=True),
    "small_resnet": NetworkPreset(SmallResNet, "cifar10", 32),
}
