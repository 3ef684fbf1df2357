"""What training must leave as it found on the WebUI's model, as a value two states can be compared by."""

import torch


def model_fingerprint(model) -> dict:
    """Everything about a model that training must leave as it found it."""
    import ldm.modules.attention

    params = dict(model.named_parameters())
    return {
        "modules": [(name, id(module), module.training) for name, module in model.named_modules()],
        "requires_grad": {name: p.requires_grad for name, p in params.items()},
        "grads": {name for name, p in params.items() if p.grad is not None},
        "placement": {name: (p.device, p.dtype) for name, p in params.items()},
        "values": {name: p.detach().clone() for name, p in params.items()},
        "buffers": {name: b.detach().clone() for name, b in model.named_buffers()},
        "cross_attention_forward": ldm.modules.attention.CrossAttention.forward,
    }


def assert_same_fingerprint(before: dict, after: dict) -> None:
    for key in ("modules", "requires_grad", "grads", "placement", "cross_attention_forward"):
        assert before[key] == after[key], f"the model's {key} changed"
    for key in ("values", "buffers"):
        assert before[key].keys() == after[key].keys()
        changed = [name for name in before[key] if not torch.equal(before[key][name], after[key][name])]
        assert not changed, f"{key} changed: {changed[:5]}"
