"""backend.nn.base: ModuleDict / ObjectDict with attribute access (Forge: backend/nn/base.py)."""

import torch


class ModuleDict(torch.nn.Module):
    def __init__(self, module_dict):
        super().__init__()
        for key, module in module_dict.items():
            setattr(self, key, module)


class ObjectDict:
    def __init__(self, object_dict):
        for key, value in object_dict.items():
            setattr(self, key, value)
