"""`FrozenBatchNorm2d`: open_clip imports it to freeze ResNet towers, which the tests never build."""

import torch


class FrozenBatchNorm2d(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision is an import-only shim in the A1111 tests")
