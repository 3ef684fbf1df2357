"""What training must leave as it found on Forge's model and its memory manager, as a value two states can be
compared by."""

import torch


def model_parts(model) -> dict:
    objects = model.forge_objects_original
    return {
        "unet": objects.unet.model,
        "text": objects.clip.cond_stage_model,
        "vae": objects.vae.first_stage_model,
    }


def model_fingerprint(model) -> dict:
    """Every weight's values, kind (inference tensor or not), storage, device and dtype; requires_grad, held
    gradients, train/eval flags, and instance-level forwards (a lever left behind)."""
    state = {}
    for part, module in model_parts(model).items():
        tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        state[part] = {
            "values": {name: t.detach().clone() for name, t in tensors.items()},
            "kind": {
                name: (t.is_inference(), t.data_ptr(), t.device, t.dtype, getattr(t, "requires_grad", False))
                for name, t in tensors.items()
            },
            "grads": {name for name, p in module.named_parameters() if p.grad is not None},
            "modules": [
                (name, id(m), m.training, "forward" in vars(m)) for name, m in module.named_modules()
            ],
        }
    return state


def assert_same_fingerprint(before: dict, after: dict) -> None:
    for part in before:
        for key in ("kind", "grads", "modules"):
            assert before[part][key] == after[part][key], f"the {part}'s {key} changed"
        values_before, values_after = before[part]["values"], after[part]["values"]
        assert values_before.keys() == values_after.keys()
        changed = [name for name in values_before if not torch.equal(values_before[name], values_after[name])]
        assert not changed, f"{part} values changed: {changed[:5]}"


def memory_state():
    """Forge's memory manager: the loaded patchers, most recent first, and the reserve for computation."""
    from backend import memory_management

    return [
        loaded.model for loaded in memory_management.current_loaded_models
    ], memory_management.current_inference_memory


def recorded_loads(monkeypatch) -> list:
    """Every `load_models_gpu` call from now on, as (patchers, memory_required), still carried out."""
    from backend import memory_management

    calls = []
    real = memory_management.load_models_gpu

    def spy(models, memory_required=0, hard_memory_preservation=0):
        calls.append((list(models), memory_required))
        return real(models, memory_required, hard_memory_preservation)

    monkeypatch.setattr(memory_management, "load_models_gpu", spy)
    return calls
