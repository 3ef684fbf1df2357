"""Import-only stand-in for torchvision, for the A1111 tests (tests/a1111/conftest.py puts it on sys.path).

Why: the ldm code A1111 runs (`stable-diffusion-sdkit`) and open_clip import torchvision at module level, but
torchvision has no CPU build for the torch pinned in .venv-a1111, and the CUDA build that open_clip pulls in
cannot load. Nothing we test uses torchvision's functions: ldm imports `make_grid` for logging, open_clip builds
image transforms for a vision tower that ldm deletes. So this package provides only the imported names; calling
any of them raises. No `torchvision` distribution metadata exists, so transformers and diffusers, which check
for it, still see torchvision as absent.
"""

__version__ = "0.0+import-shim"


def _unavailable(*args, **kwargs):
    raise RuntimeError(
        "torchvision is an import-only shim in the A1111 tests; this function is not available"
    )
