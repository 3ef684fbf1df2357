"""Settings JSON with wrong types (CLI --config, the API, the form): one check in TrainConfig.from_dict names
the field and the type it wants, instead of a crash deep in the run."""

from __future__ import annotations

import json

import pytest

from ti_trainer.cli.main import main
from ti_trainer.config import TrainConfig
from ti_trainer.errors import UserError


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("batch_size", "2", "batch_size: expected a whole number, got text '2'"),
        ("max_steps", None, "max_steps: expected a whole number, got null"),
        ("width", [512], "width: expected a whole number, got list"),
        ("batch_size", 2.5, "batch_size: expected a whole number, got number 2.5"),
        ("batch_size", True, "batch_size: expected a whole number, got true/false"),
        ("tag_dropout", "0.1", "tag_dropout: expected a number, got text"),
        ("keep_size", 1, "keep_size: expected true or false, got number 1"),
        ("keep_size", "false", "keep_size: expected true or false, got text"),
        ("embedding_name", 5, "embedding_name: expected text, got number 5"),
        ("templates_dirs", "folder", "templates_dirs: expected a list of text, got text"),
        ("seed", "7", "seed: expected a whole number or null, got text"),
        ("learn_rate", None, "learn_rate: expected text, got null"),
    ],
)
def test_a_wrong_type_names_the_field_and_the_type_it_wants(field, value, expected):
    with pytest.raises(UserError) as error:
        TrainConfig.from_dict({"embedding_name": "x", field: value})
    assert expected in str(error.value)


def test_every_wrong_field_is_listed_at_once():
    with pytest.raises(UserError) as error:
        TrainConfig.from_dict({"batch_size": "2", "width": None, "keep_size": "yes"})
    message = str(error.value)
    assert "batch_size" in message and "width" in message and "keep_size" in message


def test_what_json_cannot_say_otherwise_is_accepted():
    config = TrainConfig.from_dict(
        {"batch_size": 2.0, "tag_dropout": 0, "seed": None, "learn_rate": 0.001, "clip_grad_value": 1}
    )
    assert config.batch_size == 2 and isinstance(config.batch_size, int)
    assert config.tag_dropout == 0.0 and isinstance(config.tag_dropout, float)
    assert config.seed is None
    assert config.learn_rate == "0.001" and config.clip_grad_value == "1"
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


def test_a_settings_file_that_is_not_an_object_is_refused(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(UserError, match="must be a JSON object.*it is a list"):
        TrainConfig.from_settings_file(path)
    path.write_text(json.dumps({"ti_trainer_config": "oops"}), encoding="utf-8")
    with pytest.raises(UserError, match="must be a JSON object.*it is a text"):
        TrainConfig.from_settings_file(path)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"ti_trainer_config": {"embedding_name": "x", "batch_size": "4"}}, "batch_size: expected a whole"),
        ({"embedding_name": "x", "learn_rate": [0.1]}, "learn_rate: expected text, got list"),
        ({"embedding_name": "x", "shuffle_tags": None}, "shuffle_tags: expected true or false, got null"),
        (["embedding_name", "x"], "must be a JSON object"),
    ],
)
def test_cli_train_config_with_wrong_types_is_a_message(tmp_path, capsys, settings, expected):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings), encoding="utf-8")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(path) in err
