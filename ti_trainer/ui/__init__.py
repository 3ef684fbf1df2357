"""Gradio panels, built from the host's services; the same for the WebUI tab (A1111's Gradio 3.41, Forge's
4.40) and the standalone app. Where the two Gradios differ they go through compat.py. No torch at import:
model work happens inside handlers."""
