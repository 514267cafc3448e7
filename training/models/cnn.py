"""Lecture 10: the basic convolutional network."""

import torch
import torch.nn.functional as F
from torch import nn


class BasicCNN(nn.Module):
    """conv(1->10, k5) -> pool -> relu -> conv(10->20, k5) -> pool -> relu -> fc(320->10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.pooling = nn.MaxPool2d(2)
        self.fc = nn.Linear(320, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size = x.size(0)
        x = F.relu(self.pooling(self.conv1(x)))
        x = F.relu(self.pooling(self.conv2(x)))
        x = x.view(batch_size, -1)
        return self.fc(x)
