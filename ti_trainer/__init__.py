"""ti_trainer: Textual Inversion training for Stable Diffusion 1.x, 2.x and SDXL.

The core (embeddings, data, schedules, loop, previews) knows no host and no UI; backends wrap one loaded
model; hosts (the A1111 WebUI, Forge, or the standalone CLI/app) supply folders, progress and preview rendering.
"""

__version__ = "0.1.0"
