"""The VRAM estimate under the WebUI's own libraries (this suite runs under A1111's pins: diffusers 0.27,
transformers 4.30; and Forge's), where the panel's "Estimate GPU memory" runs it: the same figures as under
the core venv's (tests/vram_figures.py), as the step it counts is the same."""

from __future__ import annotations

import pytest
from vram_figures import CASES, RECORDED, TEXT_ENCODER_ATTENTION, figures


def test_the_estimate_under_these_pins_is_the_core_venvs():
    """Checkpointed blocks included, which these diffusers checkpoint through torch.utils.checkpoint
    themselves. Where the text encoder is on the GPU, its attention may differ (TEXT_ENCODER_ATTENTION says
    why): within that; without it, the same to the byte."""
    here = figures()
    assert set(here) == set(CASES)
    for name, figure in here.items():
        if CASES[name][1].text_encoder_on_gpu:
            assert figure == pytest.approx(RECORDED[name], rel=TEXT_ENCODER_ATTENTION), name
        else:
            assert figure == RECORDED[name], name
