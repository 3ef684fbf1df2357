"""What a lent text encoder's backward keeps, and where (memory/saved_in_ram.py, used by memory/plan.py
`text_encoder_lent`): the lent weights are packed as references to their RAM originals, never copied out;
activations are copied to RAM; on the CPU nothing is packed. The lending itself: tests/test_text_encoder_lending.py.

Only the CPU is here: "meta" stands for the GPU (it has no data, so the device -> host copy is recorded and
stood in for), or the "device copies" are CPU copies of the weights, in other storage."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from lent_on_cpu import lent_in_other_storage

from ti_trainer.backends.tiny_xl import tiny_xl_backend
from ti_trainer.memory import saved_in_ram
from ti_trainer.memory.plan import text_encoder_lent
from ti_trainer.memory.saved_in_ram import from_ram_view, lent_index, lent_weight_view


class Encoder(torch.nn.Module):
    """A text encoder's pieces: LayerNorm, attention on a permuted (sequence-first, non-contiguous) input, so
    that its in-projection's weight is saved transposed and expanded, stride 0; Linear, GELU, and a buffer."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.attention = torch.nn.MultiheadAttention(width, 2)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU())
        self.out = torch.nn.Linear(2 * width, width)
        self.register_buffer("scale", torch.full((width,), 0.5))
        self.requires_grad_(False)  # only the embedding learns

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        x = self.norm(vectors).permute(1, 0, 2)  # NLD -> LND
        x = x + self.attention(x, x, x, need_weights=False)[0]
        return self.out(self.mlp(x)).permute(1, 0, 2) * self.scale


def encoder_and_vectors(seed: int = 0, device: str = "cpu") -> tuple[Encoder, torch.Tensor]:
    torch.manual_seed(seed)
    encoder = Encoder()
    vectors = torch.randn(2, 5, 8).to(device).requires_grad_()
    return encoder, vectors


def tensors_of(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


def input_gradient(encoder: torch.nn.Module, vectors: torch.Tensor, run=None) -> torch.Tensor:
    vectors = vectors.detach().requires_grad_()
    out = encoder(vectors) if run is None else run(vectors)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return vectors.grad


# --- which saved tensor is a lent weight: a small pure function -----------------------------------------------


def test_a_lent_weight_or_a_view_of_it_is_packed_as_its_ram_original_and_comes_back_the_same():
    original = torch.randn(6, 4)
    copy = original.clone()  # the device copy: other storage, the same values
    index = lent_index([(copy, original)])
    for saved in (copy, copy.t(), copy.t().expand(3, 4, 6), copy[2:4], copy.t()[1]):
        view = lent_weight_view(saved, index)
        assert view is not None and view.original is original
        back = from_ram_view(view, torch.device("cpu"))
        assert torch.equal(back, saved) and back.stride() == saved.stride()
        assert back.untyped_storage().data_ptr() not in (copy.data_ptr(), original.data_ptr())
    # Anything else is copied to RAM as before: an activation, a cast copy, the weight's bytes as another
    # dtype, a weight that was not lent.
    for saved in (copy * 2, copy.to(torch.bfloat16), copy.view(torch.int32), original, torch.randn(6, 4)):
        assert lent_weight_view(saved, index) is None


def test_an_expanded_ram_buffer_comes_back_as_its_device_copy_was_laid_out():
    original = torch.arange(5).expand(2, 5)  # as CLIP's position_ids buffer
    copy = original.to("meta")  # a device copy is dense
    view = lent_weight_view(copy, lent_index([(copy, original)]))
    assert view is not None
    assert view.copy_layout[1] == copy.stride() == (5, 1) and view.storage_elements == 10
    back = from_ram_view(view, torch.device("cpu"))
    assert torch.equal(back, original) and back.stride() == (5, 1)


# --- lent to a device ("meta" stands for the GPU) ----------------------------------------------------------------


@pytest.fixture
def copied_out(monkeypatch):
    """The tensors the device -> host copy of saved tensors receives; a CPU tensor of the same shape stands
    in for the copy (meta tensors have no data to copy)."""
    calls = []

    def recorded(tensor, pin_memory):
        calls.append(tensor)
        return torch.empty(tensor.shape, dtype=tensor.dtype)

    monkeypatch.setattr(saved_in_ram, "to_ram", recorded)
    return calls


def test_lent_weights_are_not_copied_to_ram_but_activations_are(copied_out, monkeypatch):
    encoder, vectors = encoder_and_vectors(device="meta")
    in_ram = {name: t.data_ptr() for name, t in tensors_of(encoder)}
    packed_views = []
    real_view = saved_in_ram.lent_weight_view

    def recorded_view(saved, index):
        view = real_view(saved, index)
        if view is not None:
            packed_views.append(view)
        return view

    monkeypatch.setattr(saved_in_ram, "lent_weight_view", recorded_view)
    with text_encoder_lent(encoder, torch.device("meta")):
        lent = {saved_in_ram.storage_key(t): name for name, t in tensors_of(encoder)}
        saved = []  # what the same forward saves, counted by hooks of the test's own (innermost, so they win)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            encoder(vectors)
        out = encoder(vectors)
    assert copied_out, "the activations are copied to RAM"
    assert all(saved_in_ram.storage_key(t) not in lent for t in copied_out), "no lent weight is copied out"
    # Every saved view of a weight (each Linear's and LayerNorm's, the buffer) is packed as a reference to
    # the module's own RAM storage instead.
    saved_weights = [lent[key] for t in saved if (key := saved_in_ram.storage_key(t)) in lent]
    assert {"norm.weight", "attention.in_proj_weight", "out.weight", "scale"} <= set(saved_weights)
    assert sorted(view.original.data_ptr() for view in packed_views) == sorted(
        in_ram[name] for name in saved_weights
    )
    assert len(copied_out) + len(packed_views) == len(saved)

    unpacked = []
    real_back = saved_in_ram.from_ram_view
    monkeypatch.setattr(
        saved_in_ram, "from_ram_view", lambda view, device: unpacked.append(device) or real_back(view, device)
    )
    out.sum().backward()
    assert vectors.grad.shape == vectors.shape and vectors.grad.device.type == "meta"
    # Each weight comes back to the device once, for the backward.
    assert unpacked == [torch.device("meta")] * len(packed_views)


def test_the_device_copies_are_let_go_when_the_forward_ends_not_at_the_backward(copied_out):
    encoder, vectors = encoder_and_vectors(device="meta")
    with text_encoder_lent(encoder, torch.device("meta")):
        copies = [weakref.ref(t) for t in (*encoder.parameters(), *encoder.buffers())]
        out = encoder(vectors)
    gc.collect()
    assert all(ref() is None for ref in copies)  # the graph (`out`) still waits for its backward
    out.sum().backward()


# --- the input gradient is unchanged -----------------------------------------------------------------------------


def test_with_the_hooks_the_input_gradient_is_bit_identical_and_the_weights_come_from_ram(monkeypatch):
    # On the CPU, with the weights' "device copies" in other CPU storage, and activations really copied.
    monkeypatch.setattr(saved_in_ram, "to_ram", lambda tensor, pin_memory: tensor.clone())
    xl = tiny_xl_backend()
    text = xl.text_encoder_2
    ids = torch.tensor([xl.tokenize(["a red cat, simple shapes"])[0]])
    token_vectors = text.text_model.embeddings.token_embedding(ids).detach()

    def clip_g(vectors):
        # The vectors in place of the token embedding's output, as the trainer's injector puts them.
        handle = text.text_model.embeddings.token_embedding.register_forward_hook(lambda m, a, o: vectors)
        try:
            out = text(input_ids=ids, output_hidden_states=True)
        finally:
            handle.remove()
        return torch.cat([out.hidden_states[-2].flatten(), out.text_embeds.flatten()])

    encoder, vectors = encoder_and_vectors()
    for module, inputs, run in ((encoder, vectors, None), (text, token_vectors, clip_g)):
        plain = input_gradient(module, inputs, run)

        def through_the_hooks(vectors, module=module, run=run):
            # The copies are NaN once the forward ends: the backward must read the RAM originals.
            with lent_in_other_storage(module, torch.device("cpu")):
                return module(vectors) if run is None else run(vectors)

        assert torch.equal(input_gradient(module, inputs, through_the_hooks), plain)


# --- on the CPU nothing is packed ------------------------------------------------------------------------------


def test_lent_on_the_cpu_nothing_is_packed():
    encoder, vectors = encoder_and_vectors()
    reached = []  # saved tensors that reach these outer hooks: none were packed by the lending's own hooks
    with torch.autograd.graph.saved_tensors_hooks(lambda t: reached.append(t) or t, lambda t: t):
        encoder(vectors)
        plain = len(reached)
        reached.clear()
        with text_encoder_lent(encoder, torch.device("cpu")):
            out = encoder(vectors)
    assert plain > 0 and len(reached) == plain
    out.sum().backward()
    assert vectors.grad is not None
