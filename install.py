"""Run by the WebUI at every launch (and after "Install from URL"): install what it lacks, and only that.

The WebUI v1.10.1 already has everything the extension imports, so normally this installs nothing. Each entry
is checked with the WebUI's own `launch.is_installed` and installed through `launch.run_pip` (which honours
--skip-install and the user's index URL). torch is never installed from here: the WebUI chose its build.
"""

import launch

# Distribution name -> pip requirement, for what ti_trainer imports beyond the standard library. The versions
# are the WebUI's own pins, so a missing package is replaced by what the WebUI would have installed.
REQUIREMENTS = {
    "safetensors": "safetensors==0.4.2",
    "Pillow": "Pillow==9.5.0",
    "numpy": "numpy==1.26.2",
    "tqdm": "tqdm",
    "gradio": "gradio==3.41.2",
    "fastapi": "fastapi==0.94.0",
    "pandas": "pandas",  # Gradio's plots; gradio depends on it
}

for package, requirement in REQUIREMENTS.items():
    if not launch.is_installed(package):
        launch.run_pip(f"install {requirement}", f"ti_trainer requirement: {requirement}")
