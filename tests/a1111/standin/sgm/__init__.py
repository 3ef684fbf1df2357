"""Stand-in for sgm (Stability-AI/generative-models at 45c443b3, the commit A1111 v1.10.1 clones), holding only
the surface the WebUI touches for SDXL. See ../README.md. Test code: not shipped.

sgm is not on PyPI. The networks are the real library classes (ldm's UNetModel and AutoencoderKL, transformers'
CLIPTextModel, open_clip's text tower); what sgm adds around them (engine, conditioner, embedders, wrapper,
denoiser, discretization) is written here in our own words with the same behaviour.
"""
