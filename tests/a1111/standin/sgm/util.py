"""sgm.util: config instantiation and the small helpers the engine and its parts use."""

import importlib

import torch


def get_obj_from_str(string):
    module, name = string.rsplit(".", 1)
    importlib.invalidate_caches()
    return getattr(importlib.import_module(module), name)


def instantiate_from_config(config):
    if "target" not in config:
        raise KeyError("Expected key `target` to instantiate.")
    return get_obj_from_str(config["target"])(**config.get("params", dict()))


def default(value, fallback):
    return fallback if value is None else value


def disabled_train(self, mode=True):
    """Put in place of a frozen part's `train`, so that `model.train()` leaves it in eval mode."""
    return self


def append_dims(x, target_dims):
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def append_zero(x):
    return torch.cat([x, x.new_zeros([1])])
