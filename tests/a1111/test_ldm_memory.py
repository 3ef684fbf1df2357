"""The memory levers on the ldm model A1111 runs (tiny SD 2.x built from config), and placement under
--medvram/--lowvram: each lever active while training, everything put back exactly afterwards."""

from __future__ import annotations

import contextlib

import ldm.modules.attention
import ldm.modules.diffusionmodules.model
import pytest
import torch

from ti_trainer.backends import ldm_memory
from ti_trainer.backends.ldm_memory import (
    TrainingPlacement,
    ldm_attention,
    ldm_checkpointing,
    ldm_memory_levers,
    lowvram_hooks,
)
from ti_trainer.memory.plan import MemoryPlan


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny SD 2.x LatentDiffusion of this module's own: every test also checks it is left as found."""
    import tiny_ldm

    tiny_ldm.register_tiny_open_clip(tmp_path_factory.mktemp("open_clip"))
    built = tiny_ldm.build_tiny_sd2("v")
    built.requires_grad_(False)  # as LdmBackend.training_session leaves it for a run
    return built


def modules_of(model, class_name: str) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == class_name]


def text_conditioning(model, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(2, 77, 32, generator=generator)


def unet_step(model, context: torch.Tensor) -> torch.Tensor:
    """One UNet forward (and backward when `context` requires grad), as a training step runs it."""
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    out = model.apply_model(latents, torch.tensor([10, 700]), context)
    if context.requires_grad:
        out.square().mean().backward()
    return out


@contextlib.contextmanager
def forward_counts(modules: dict[str, torch.nn.Module]):
    counts = dict.fromkeys(modules, 0)
    handles = [
        module.register_forward_pre_hook(
            lambda m, args, name=name: counts.__setitem__(name, counts[name] + 1)
        )
        for name, module in modules.items()
    ]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


# --- attention ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "upcast"), [("sdpa", False), ("sdpa", True), ("math", True)])
def test_attention_is_patched_per_instance_matches_ldm_and_is_restored(model, kind, upcast, monkeypatch):
    calls = []
    real_attention = ldm_memory.attention
    monkeypatch.setattr(
        ldm_memory, "attention", lambda *a, **k: calls.append(a[3]) or real_attention(*a, **k)
    )
    generator = torch.Generator().manual_seed(0)
    context = text_conditioning(model, generator)
    pixels = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    with torch.no_grad():
        expected = unet_step(model, context), model.encode_first_stage(pixels).mean
        with ldm_attention(model, kind, upcast):
            patched = modules_of(model, "CrossAttention") + modules_of(model, "AttnBlock")
            assert patched and all("forward" in vars(m) for m in patched)
            assert modules_of(model.first_stage_model, "AttnBlock"), "the VAE's attention is patched too"
            got = unet_step(model, context), model.encode_first_stage(pixels).mean
    encoder_attention = modules_of(model.first_stage_model.encoder, "AttnBlock")  # (the decoder's is unused)
    assert len(calls) == len(modules_of(model.model, "CrossAttention")) + len(encoder_attention)
    assert set(calls) == {kind}
    for ours, theirs in zip(got, expected):
        assert torch.allclose(ours, theirs, atol=1e-5)
    assert not any("forward" in vars(m) for m in patched)


def test_the_webuis_class_patches_show_through_again_afterwards(model, monkeypatch):
    # A1111 replaces CrossAttention.forward / AttnBlock.forward class-wide with its chosen optimization.
    used = []
    original = ldm.modules.attention.CrossAttention.forward

    def webui_forward(self, x, context=None, mask=None):
        used.append(True)
        return original(self, x, context, mask)

    monkeypatch.setattr(ldm.modules.attention.CrossAttention, "forward", webui_forward)
    context = text_conditioning(model, torch.Generator().manual_seed(1))
    with torch.no_grad(), ldm_attention(model, "sdpa", False):
        unet_step(model, context)
        assert used == []
    with torch.no_grad():
        unet_step(model, context)
    assert used and ldm.modules.attention.CrossAttention.forward is webui_forward
    assert (
        ldm.modules.diffusionmodules.model.AttnBlock.forward.__module__
        == "ldm.modules.diffusionmodules.model"
    )


def test_the_hosts_context_hook_is_applied(model):
    # A1111's attentions pass the text through loaded hypernetworks (k and v may differ); the hook keeps that.
    seen = []

    def hypernetwork(context):
        seen.append(context.shape)
        return context * 2, context

    context = text_conditioning(model, torch.Generator().manual_seed(2))
    with torch.no_grad():
        with ldm_attention(model, "sdpa", False):
            plain = unet_step(model, context)
        with ldm_attention(model, "sdpa", False, context_hook=hypernetwork):
            hooked = unet_step(model, context)
    assert seen and not torch.allclose(plain, hooked)


# --- checkpointing -------------------------------------------------------------------------------------------


def test_checkpointing_recomputes_the_chosen_blocks_and_gives_the_same_gradient(model):
    unet = model.model.diffusion_model
    blocks = checkpoint_probes(unet)
    gradients = {}
    for level in ("off", "high-res", "all"):
        context = text_conditioning(model, torch.Generator().manual_seed(3)).requires_grad_(True)
        with ldm_checkpointing(unet, level) as checkpointed, forward_counts(blocks) as counts:
            assert not model.training and not any(p.requires_grad for p in model.parameters())
            unet_step(model, context)
        gradients[level] = context.grad
        if level == "off":
            assert checkpointed == [] and set(counts.values()) == {1}
        elif level == "high-res":
            assert counts == {"first_transformer": 2, "last_resblock": 2, "low_res_resblock": 1, "middle": 1}
        else:
            assert set(counts.values()) == {2}
    assert gradients["off"].abs().sum() > 0
    for level in ("high-res", "all"):
        assert torch.allclose(gradients[level], gradients["off"], atol=1e-6)
    assert not any("forward" in vars(m) for m in unet.modules())


def checkpoint_probes(unet) -> dict[str, torch.nn.Module]:
    # Blocks on the gradient's path (after the first cross-attention, where the text enters), counted by a
    # layer inside them: a recomputation calls the block's forward function, not the block module itself.
    return {
        "first_transformer": unet.input_blocks[1][1].transformer_blocks[0].attn1,
        "last_resblock": unet.output_blocks[-1][0].in_layers,
        "low_res_resblock": unet.output_blocks[0][0].in_layers,
        "middle": unet.middle_block[0].in_layers,
    }


def test_ldms_own_checkpoint_flags_are_switched_off_for_frozen_weights_and_put_back(model):
    # ldm's checkpoint helper differentiates the block's weights; frozen, they make it fail.
    unet = model.model.diffusion_model
    blocks = modules_of(unet, "BasicTransformerBlock") + modules_of(unet, "ResBlock")
    flag = {"BasicTransformerBlock": "checkpoint", "ResBlock": "use_checkpoint"}
    context = text_conditioning(model, torch.Generator().manual_seed(4))
    try:
        for block in blocks:
            setattr(block, flag[type(block).__name__], True)
        with pytest.raises(RuntimeError, match="does not require grad"):
            unet_step(model, context.clone().requires_grad_(True))
        for level in ("off", "high-res"):
            with ldm_checkpointing(unet, level):
                assert not any(getattr(b, flag[type(b).__name__]) for b in blocks)
                unet_step(model, context.clone().requires_grad_(True))
        assert all(getattr(b, flag[type(b).__name__]) for b in blocks)
    finally:
        for block in blocks:
            setattr(block, flag[type(block).__name__], False)


def test_levers_together_then_the_model_bit_for_bit(model):
    before = {name: t.clone() for name, t in model.state_dict().items()}
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    context = text_conditioning(model, torch.Generator().manual_seed(6)).requires_grad_(True)
    with ldm_memory_levers(model, MemoryPlan(attention="sdpa", checkpointing="all", upcast_attention=True)):
        unet_step(model, context)
    assert context.grad.abs().sum() > 0
    # (ldm's GroupNorm32 runs in fp32 with bf16 weights only under CUDA's autocast: no step on the CPU here)
    with ldm_memory_levers(model, MemoryPlan(precision="bf16", half_weights=True)):
        assert next(model.model.parameters()).dtype == torch.bfloat16
        assert next(model.cond_stage_model.parameters()).dtype == torch.bfloat16
        assert next(model.first_stage_model.parameters()).dtype == torch.float32
    assert {name: p.dtype for name, p in model.named_parameters()} == dtypes
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert not any("forward" in vars(m) for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


# --- placement under --medvram / --lowvram ----------------------------------------------------------------------


class LowVram:
    """A stand-in for what A1111's modules/lowvram.py does to a model (v1.10.1 behaviour, not its code):
    one part on the GPU at a time, moved by forward pre-hooks, and the VAE's encode/decode wrapped."""

    def __init__(self):
        self.moves: list[str] = []


def setup_for_low_vram(model, use_medvram: bool, state: LowVram) -> None:
    # The name matters: A1111's hooks and wrappers are functions defined inside `setup_for_low_vram`.
    parents = {model.cond_stage_model.model: model.cond_stage_model}
    parents[model.cond_stage_model.model.token_embedding] = model.cond_stage_model

    def send_me_to_gpu(module, _):
        state.moves.append(type(parents.get(module, module)).__name__)

    vae = model.first_stage_model
    encode, decode = vae.encode, vae.decode

    def first_stage_model_encode_wrap(x):
        send_me_to_gpu(vae, None)
        return encode(x)

    def first_stage_model_decode_wrap(z):
        send_me_to_gpu(vae, None)
        return decode(z)

    model.cond_stage_model.model.register_forward_pre_hook(send_me_to_gpu)
    model.cond_stage_model.model.token_embedding.register_forward_pre_hook(send_me_to_gpu)
    vae.register_forward_pre_hook(send_me_to_gpu)
    vae.encode, vae.decode = first_stage_model_encode_wrap, first_stage_model_decode_wrap
    if use_medvram:
        model.model.register_forward_pre_hook(send_me_to_gpu)
    else:
        unet = model.model.diffusion_model
        for block in [unet.time_embed, *unet.input_blocks, unet.middle_block, *unet.output_blocks]:
            block.register_forward_pre_hook(send_me_to_gpu)
    model.lowvram = True


def remove_low_vram(model) -> None:
    for module, key, _ in lowvram_hooks(model):
        del module._forward_pre_hooks[key]
    for name in ("encode", "decode"):
        vars(model.first_stage_model).pop(name, None)
    del model.lowvram


def pre_hooks(model) -> list[tuple[int, list]]:
    return [(id(m), list(m._forward_pre_hooks.items())) for m in model.modules() if m._forward_pre_hooks]


def placement(model) -> dict[str, tuple]:
    return {name: (p.device, p.data_ptr()) for name, p in model.named_parameters()}


def text_forward(model) -> None:
    model.cond_stage_model.encode_with_transformer(torch.zeros(1, 77, dtype=torch.long))


@contextlib.contextmanager
def recorded_moves(model):
    """On a CPU-only machine the GPU is simulated: the parts' moves are recorded instead of made."""
    moved = []
    parts = {"unet": model.model, "text": model.cond_stage_model, "vae": model.first_stage_model}
    for name, part in parts.items():
        part.to = lambda device, name=name: moved.append((name, torch.device(device).type))
    try:
        yield moved
    finally:
        for part in parts.values():
            del part.to


@pytest.mark.parametrize("medvram", [True, False], ids=["medvram", "lowvram"])
def test_training_takes_over_placement_and_hands_it_back_unchanged(model, medvram):
    state = LowVram()
    setup_for_low_vram(model, medvram, state)
    try:
        hooks, where = pre_hooks(model), placement(model)
        wrappers = {name: vars(model.first_stage_model)[name] for name in ("encode", "decode")}
        unet = model.model.diffusion_model
        blocks = 1 if medvram else 2 + len(unet.input_blocks) + len(unet.output_blocks)
        assert len(lowvram_hooks(model)) == 3 + blocks  # text encoder (2), VAE, and the UNet's

        with (
            recorded_moves(model) as moved,
            TrainingPlacement(model, device="cuda", vae_device="cpu") as held,
        ):
            # What must sit on the GPU (UNet, text encoder) goes there; the VAE waits in RAM.
            assert moved == [("unet", "cuda"), ("text", "cuda"), ("vae", "cpu")]
            assert held.parts_on_device == [model.model, model.cond_stage_model]
            assert lowvram_hooks(model) == []
            assert "encode" not in vars(model.first_stage_model) and "decode" not in vars(
                model.first_stage_model
            )
            text_forward(model)
            assert state.moves == []  # A1111's hooks no longer move anything
            with held.lent_to_host():  # e.g. a preview through the WebUI's txt2img
                assert pre_hooks(model) == hooks
                text_forward(model)
                assert state.moves == ["FrozenOpenCLIPEmbedder"]
            assert lowvram_hooks(model) == []

        assert pre_hooks(model) == hooks  # the same hooks, ids and order
        assert {name: vars(model.first_stage_model)[name] for name in ("encode", "decode")} == wrappers
        assert placement(model) == where  # every tensor on its device, the very same RAM storage
        assert model.lowvram
    finally:
        remove_low_vram(model)


def test_hooks_added_by_others_while_training_are_kept(model):
    setup_for_low_vram(model, True, LowVram())
    try:
        unet = model.model
        theirs = unet.register_forward_pre_hook(lambda m, a: None)
        with recorded_moves(model), TrainingPlacement(model, device="cuda"):
            later = unet.register_forward_pre_hook(lambda m, a: None)
        keys = list(unet._forward_pre_hooks)
        assert keys[-1] == later.id and theirs.id in keys and len(lowvram_hooks(model)) == 4
        theirs.remove()
        later.remove()
    finally:
        remove_low_vram(model)


def test_without_low_vram_modes_nothing_else_changes(model):
    where, hooks = placement(model), pre_hooks(model)
    with recorded_moves(model) as moved, TrainingPlacement(model, device="cuda") as held:
        assert moved == [("unet", "cuda"), ("text", "cuda"), ("vae", "cpu")]
        with held.vae_on_device():
            pass
    assert placement(model) == where and pre_hooks(model) == hooks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: real device placement")
def test_on_a_gpu_medvram_parts_come_to_the_gpu_and_go_back_to_the_same_ram(model):
    # As A1111 leaves a --medvram model: the root on the GPU, the big parts in RAM behind hooks.
    parts = (model.model, model.cond_stage_model, model.first_stage_model)
    model.to("cuda")
    for part in parts:
        part.to("cpu")
    setup_for_low_vram(model, True, LowVram())
    try:
        where = placement(model)
        with TrainingPlacement(model, device="cuda") as held:
            assert {p.device.type for p in model.model.parameters()} == {"cuda"}
            assert {p.device.type for p in model.cond_stage_model.parameters()} == {"cuda"}
            assert {p.device.type for p in model.first_stage_model.parameters()} == {"cpu"}
            with held.vae_on_device():
                assert next(model.first_stage_model.parameters()).device.type == "cuda"
            assert next(model.first_stage_model.parameters()).device.type == "cpu"
        assert placement(model) == where
    finally:
        remove_low_vram(model)
        model.to("cpu")


# --- diffusers 0.27 (this environment's pin): checkpointing engages on a frozen model in eval mode ---------


def test_diffusers_027_checkpointing_engages_in_eval_mode():
    import diffusers

    from ti_trainer.backends.tiny import tiny_backend
    from ti_trainer.training.fit import training_step_probe

    assert diffusers.__version__.startswith("0.27")
    backend = tiny_backend("v")
    block = backend.unet.up_blocks[-1].resnets[0]
    step = training_step_probe(backend, (8, 8), "fp32")
    for level, expected in (("off", 1), ("high-res", 2)):
        with (
            backend.memory_levers(MemoryPlan(checkpointing=level)),
            forward_counts({"block": block}) as counts,
        ):
            assert not backend.unet.training
            step(1)
        assert counts["block"] == expected
    assert not any(getattr(m, "gradient_checkpointing", False) or m.training for m in backend.unet.modules())
