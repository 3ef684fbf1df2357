"""TrainConfig's fields are described once (config.py): every one has a label, help and a CLI flag."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from ti_trainer.cli.main import build_parser, config_from_args
from ti_trainer.config import TrainConfig, cli_flag, field_info

FIELDS = [field.name for field in dataclasses.fields(TrainConfig)]
TYPES = typing.get_type_hints(TrainConfig)
# The train verb's flags before they came from the metadata: scripts use them, so they keep working.
EARLIER_FLAGS = {
    "--data": "data_dir",
    "--embeddings-dir": "embeddings_dir",
    "--log-dir": "log_dir",
    "--template": "template",
    "--lr": "learn_rate",
    "--batch": "batch_size",
    "--grad-accum": "gradient_accumulation",
    "--steps": "max_steps",
    "--width": "width",
    "--height": "height",
    "--save-every": "save_every",
    "--preview-every": "preview_every",
    "--clip-value": "clip_grad_value",
    "--tag-dropout": "tag_dropout",
    "--preview-prompt": "preview_prompt",
    "--preview-negative": "preview_negative_prompt",
    "--preview-steps": "preview_steps",
    "--preview-seed": "preview_seed",
    "--seed": "seed",
    "--validate-every": "validate_every",
    "--early-stop-window": "early_stop_window",
    "--early-stop-threshold": "early_stop_threshold",
    "--clip-mode": "clip_grad_mode",
    "--latent-sampling": "latent_sampling",
    "--precision": "precision",
    "--shuffle-tags": "shuffle_tags",
    "--keep-size": "keep_size",
    "--buckets": "aspect_buckets",
    "--alpha-weight": "use_alpha_weight",
}


def parse_train(*args: str) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *args]))


def other_value(name: str):
    """A value for field `name` that differs from its default, as (command-line words, expected value)."""
    default, kind, info = getattr(TrainConfig(), name), TYPES[name], field_info(name)
    if info.choices:
        value = next(choice for choice in info.choices if choice != default)
        return [value], value
    if kind is bool:
        return [], not default
    if typing.get_origin(kind) is list:
        return ["folder a"], ["folder a"]
    if kind is str:
        return ["some text, 0.5"], "some text, 0.5"
    if kind is float:
        return ["0.375"], 0.375
    return ["7"], 7  # int, and the seed's int | None


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_is_described_and_set_from_the_cli(name):
    info = field_info(name)
    assert info.label and info.help
    words, expected = other_value(name)
    flag = cli_flag(name)
    if not flag.startswith("-"):
        args = words  # the positional argument (the embedding's name)
    elif TYPES[name] is bool:
        args = [flag if expected else "--no-" + flag.removeprefix("--")]
    else:
        args = [flag, *words]
    config = parse_train(*args)
    assert getattr(config, name) == expected
    others = {key: value for key, value in config.to_dict().items() if key != name}
    assert others == {key: value for key, value in TrainConfig().to_dict().items() if key != name}


def test_labels_and_flags_are_unique():
    labels = [field_info(name).label for name in FIELDS]
    flags = [cli_flag(name) for name in FIELDS]
    assert len(set(labels)) == len(labels) and len(set(flags)) == len(flags)


def test_earlier_flag_names_still_work():
    for flag, name in EARLIER_FLAGS.items():
        words, expected = other_value(name)
        args = [flag] if TYPES[name] is bool else [flag, *words]
        if TYPES[name] is bool and not expected:
            args = ["--no-" + flag.removeprefix("--")]
        assert getattr(parse_train(*args), name) == expected, flag
    assert parse_train("--no-early-stopping").early_stopping is False


def test_flags_override_a_settings_file_and_leave_the_rest(tmp_path):
    settings = tmp_path / "settings-1.json"
    saved = TrainConfig(embedding_name="old", batch_size=3, vae_offload=False, templates_dirs=["t"])
    settings.write_text(json.dumps({"ti_trainer_config": saved.to_dict()}))
    config = parse_train("--config", str(settings), "--steps", "9", "--vae-offload")
    assert (config.max_steps, config.vae_offload) == (9, True)
    assert (config.embedding_name, config.batch_size, config.templates_dirs) == ("old", 3, ["t"])
