"""modules.shared (Forge: modules/shared.py, modules/shared_items.py): the WebUI's globals the extension reads.

`sd_model` is a property of the module, as in Forge: it reads `sd_models.model_data`, which holds a
`FakeInitialModel` until the first generation (or `forge_model_reload()`) loads the checkpoint.
"""

import sys
from types import SimpleNamespace

from modules import options, shared_state

OptionInfo = options.OptionInfo
options_section = options.options_section

models_path = "models"
data_path = "."


def default_cmd_opts(**overrides):
    """The command-line flags the extension reads, with Forge's defaults (modules/cmd_args.py)."""
    flags = dict(
        embeddings_dir="embeddings",
        textual_inversion_templates_dir="textual_inversion_templates",  # the flag remains; Forge ships no folder
        api=False,
        nowebui=False,
        api_auth=None,
        gradio_auth=None,
        api_server_stop=False,
        always_cpu=True,  # the stand-in's devices are the CPU (backend/memory_management.py)
        skip_install=False,
    )
    flags.update(overrides)
    return SimpleNamespace(**flags)


def default_options():
    """The built-in settings the extension reads (Forge's shared_options.py and main_entry.py keys)."""
    options.categories.register_category("training", "Training")
    return options.Options(
        {
            "emphasis": OptionInfo("Original", "Emphasis mode"),
            "CLIP_stop_at_last_layers": OptionInfo(1, "Clip skip"),
            "sdxl_crop_top": OptionInfo(0, "crop top coordinate"),
            "sdxl_crop_left": OptionInfo(0, "crop left coordinate"),
            "samples_format": OptionInfo("png", "File format for images"),
            "forge_inference_memory": OptionInfo(1024, "GPU memory kept for computation (MB)"),
            "forge_async_loading": OptionInfo("Queue", "Swap method"),
            "forge_pin_shared_memory": OptionInfo("CPU", "Swap location"),
        }
    )


cmd_opts = default_cmd_opts()
opts = default_options()
state = shared_state.State()
parallel_processing_allowed = True
interrogator = None  # the tests put a captioner here; Forge: interrogate.InterrogateModels
device = None  # Forge sets this to memory_management.get_torch_device() at start-up


class Shared(sys.modules[__name__].__class__):
    @property
    def sd_model(self):
        import modules.sd_models

        return modules.sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):
        import modules.sd_models

        modules.sd_models.model_data.set_sd_model(value)


sys.modules[__name__].__class__ = Shared
