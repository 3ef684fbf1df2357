"""backend.args: the flags Forge's backend reads, and `dynamic_args` (what the WebUI hands the loader).

Forge parses its own argparse namespace here; the stand-in keeps the few members the memory manager reads.
"""

from types import SimpleNamespace

args = SimpleNamespace(
    always_offload_from_vram=False,  # --always-offload-from-vram: free_memory unloads every other model
    pin_shared_memory=False,
)

# Filled by modules/sd_models.forge_model_reload before each load (Forge: backend/args.py).
dynamic_args = dict(embedding_dir=None, emphasis_name=None, forge_unet_storage_dtype=None)
