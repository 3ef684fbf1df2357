"""modules.prompt_parser.SdConditioning (Forge: modules/prompt_parser.py): a list of prompts that also carries the
image's width and height and whether it holds negative prompts, which SDXL's engine reads for its size
conditioning and its zeroed empty negative prompt. Each value not given is taken from `copy_from` (by default
the prompts themselves, when they are an SdConditioning). Not here: prompt schedules."""


class SdConditioning(list):
    def __init__(
        self,
        prompts,
        is_negative_prompt=False,
        width=None,
        height=None,
        copy_from=None,
        distilled_cfg_scale=None,
    ):
        super().__init__()
        self.extend(prompts)
        if copy_from is None:
            copy_from = prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)
        self.distilled_cfg_scale = distilled_cfg_scale or getattr(copy_from, "distilled_cfg_scale", None)
