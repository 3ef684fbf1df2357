"""modules.shared: the WebUI's globals the extension reads (settings, flags, job state, the loaded model)."""

from types import SimpleNamespace

from modules import options, shared_state

OptionInfo = options.OptionInfo
options_section = options.options_section

models_path = "models"
data_path = "."


def default_cmd_opts(**overrides):
    """The command-line flags the extension reads, with the WebUI's defaults."""
    flags = dict(
        embeddings_dir="embeddings",
        textual_inversion_templates_dir="textual_inversion_templates",
        api=False,  # --api: serve the WebUI's HTTP API beside the UI
        nowebui=False,  # --nowebui: serve the API only
        api_auth=None,  # --api-auth "user:pass,user2:pass2": basic auth on the API
        gradio_auth=None,  # --gradio-auth "user:pass": a login for the UI's pages only
        lowvram=False,
        medvram=False,
        medvram_sdxl=False,
        skip_install=False,
    )
    flags.update(overrides)
    return SimpleNamespace(**flags)


def default_options():
    """The built-in settings the extension reads (subset of shared_options.py, same keys and defaults)."""
    options.categories.register_category("training", "Training")
    return options.Options(
        {
            "emphasis": OptionInfo("Original", "Emphasis mode"),
            "comma_padding_backtrack": OptionInfo(20, "Prompt word wrap length limit"),
            "CLIP_stop_at_last_layers": OptionInfo(1, "Clip skip"),
            "textual_inversion_print_at_load": OptionInfo(
                False, "Print a list of Textual Inversion embeddings"
            ),
            "textual_inversion_add_hashes_to_infotext": OptionInfo(True, "Add Textual Inversion hashes"),
            "unload_models_when_training": OptionInfo(False, "Move VAE and CLIP to RAM when training"),
            "samples_format": OptionInfo("png", "File format for images"),
            "sdxl_clip_l_skip": OptionInfo(False, "Clip skip SDXL"),
            "sdxl_crop_top": OptionInfo(0, "crop top coordinate"),
            "sdxl_crop_left": OptionInfo(0, "crop left coordinate"),
            "sdxl_refiner_low_aesthetic_score": OptionInfo(2.5, "SDXL low aesthetic score"),
            "sdxl_refiner_high_aesthetic_score": OptionInfo(6.0, "SDXL high aesthetic score"),
            "fp8_storage": OptionInfo("Disable", "FP8 weight"),
            "cache_fp16_weight": OptionInfo(False, "Cache FP16 weight for LoRA"),
        }
    )


cmd_opts = default_cmd_opts()
opts = default_options()
state = shared_state.State()
sd_model = None
parallel_processing_allowed = True
interrogator = None  # the fixture puts a captioner here; A1111: interrogate.InterrogateModels
