"""Gradio 3.41 panels (the version A1111 pins), built from the host's services; the same for the WebUI tab
and the standalone app. No torch at import: model work happens inside handlers."""
