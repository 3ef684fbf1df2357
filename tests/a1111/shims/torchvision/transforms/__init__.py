"""The transform classes open_clip constructs for the vision tower (which ldm deletes). They build, never run."""

import enum


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


class _Transform:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __call__(self, *args, **kwargs):
        raise RuntimeError("torchvision is an import-only shim in the A1111 tests")


class Compose(_Transform):
    pass


class Normalize(_Transform):
    pass


class RandomResizedCrop(_Transform):
    pass


class ToTensor(_Transform):
    pass


class Resize(_Transform):
    pass


class CenterCrop(_Transform):
    pass
