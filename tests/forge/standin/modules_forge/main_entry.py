"""modules_forge.main_entry (Forge: modules_forge/main_entry.py l.175-192): the "GPU Weights (MB)" slider and
the swap settings at the top of the page. `refresh_memory_management_settings(model_memory=...)` sets
`memory_management.current_inference_memory = total_vram - model_memory` (bytes): the reserve kept free for
computation. The stand-in's total is `total_vram` below (Forge reads the device's)."""

from backend import memory_management
from modules import shared

total_vram = 8192  # MB


def refresh_memory_management_settings(
    async_loading=None, inference_memory=None, pin_shared_memory=None, model_memory=None
):
    inference_memory = (
        inference_memory if inference_memory is not None else shared.opts.forge_inference_memory
    )
    if model_memory is not None:
        inference_memory = total_vram - model_memory
    shared.opts.forge_inference_memory = inference_memory
    memory_management.current_inference_memory = inference_memory * 1024 * 1024
