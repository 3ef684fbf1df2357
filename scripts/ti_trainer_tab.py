"""The WebUI's entry point for this extension: it registers our tab, settings section and API routes (added
only where the WebUI serves its own API: --api or --nowebui).

The WebUI imports every file in scripts/ with the extension's folder on sys.path. Everything else lives in the
ti_trainer package; ti_trainer/host/a1111.py (AUTOMATIC1111) or ti_trainer/host/forge.py (Forge) is the one
module that talks to the WebUI it runs in.
"""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("ti_trainer") is None:  # loaded by something other than the WebUI's script loader
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Forge keeps A1111's `modules` package and adds its own `modules_forge` beside it; A1111 has no such package.
if importlib.util.find_spec("modules_forge") is not None:
    from ti_trainer.host import forge as host  # noqa: E402
else:
    from ti_trainer.host import a1111 as host  # noqa: E402

host.register_callbacks()
