"""What a run says before its first step: the batch plan it will really train, resumed settings that changed,
learning rates and captions that will not train as the artist expects."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import draw_dataset

from ti_trainer.cli.main import main
from ti_trainer.embeddings.create import create_embedding
from ti_trainer.training.loop import TrainingHooks, train


def settings_of(log_dir: Path) -> dict:
    (path,) = sorted(log_dir.glob("*/*/settings-*.json"))
    return json.loads(path.read_text(encoding="utf-8"))


def test_cli_prints_the_plan_it_trains_and_records_the_capped_values(tmp_path, backend, capsys):
    data = draw_dataset(tmp_path / "data", count=17, size=64)
    create_embedding(backend, "capped", "painting", 1, tmp_path / "emb")
    argv = [
        "train", "capped", "--data", str(data), "--embeddings-dir", str(tmp_path / "emb"),
        "--log-dir", str(tmp_path / "logs"), "--template", "filewords_name.txt", "--batch", "3",
        "--grad-accum", "11", "--steps", "2", "--width", "64", "--height", "64", "--save-every", "0",
        "--preview-every", "0", "--validate-every", "0", "--seed", "1",
    ]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "17 images; batch 3 x accumulation 5 = 15 images per step; 1 step per epoch" in err
    assert "Accumulation 11 needs more images than the dataset has: training uses 5." in err
    assert "2 of 17 images sit out each epoch" in err

    settings = settings_of(tmp_path / "logs")
    assert (settings["batch_size"], settings["gradient_step"]) == (3, 5)
    assert settings["ti_trainer_config"]["gradient_accumulation"] == 5
    assert settings["requested"] == {"batch_size": 3, "gradient_accumulation": 11}


def test_the_plan_reaches_every_host_through_the_message_hook(make_config, backend):
    messages = []
    train(make_config(batch_size=9, max_steps=2), backend, TrainingHooks(on_message=messages.append))
    assert "Batch size 9 is more than the 4 images: training uses 4." in messages
    assert any(m.startswith("Plan: 4 images; batch 4 x accumulation 1") for m in messages)


def test_resuming_with_changed_settings_says_what_changed(make_config, backend):
    quiet = TrainingHooks(on_message=lambda text: None)
    train(make_config(max_steps=2, learn_rate="0.005"), backend, quiet)

    messages = []
    resumed = make_config(create=False, max_steps=4, learn_rate="0.001", batch_size=1, template="style.txt")
    train(resumed, backend, TrainingHooks(on_message=messages.append))
    (changes,) = [m for m in messages if m.startswith("Resuming 'testemb' from step 2 with settings changed")]
    assert "learn_rate: 0.005 -> 0.001" in changes
    assert "batch_size: 2 -> 1" in changes
    assert "template: filewords_name.txt -> style.txt" in changes
    assert "max_steps: 2 -> 4" in changes
    assert "seed" not in changes and "data_dir" not in changes  # what did not change is not listed

    messages.clear()
    train(make_config(create=False, max_steps=5, learn_rate="0.001", batch_size=1, template="style.txt"), backend,
          TrainingHooks(on_message=messages.append))  # fmt: skip
    (changes,) = [m for m in messages if "settings changed" in m]
    assert changes.splitlines()[1:] == ["  max_steps: 4 -> 5"]  # compared with the latest run, not the first


def messages_before_the_first_step(config, backend) -> list[str]:
    messages = []

    def no_step(report):
        raise AssertionError("the warnings must come before any step; this test stops the run before one")

    train(
        config, backend, TrainingHooks(on_message=messages.append, on_step=no_step, should_stop=lambda: True)
    )
    return messages


def test_an_insane_learning_rate_is_warned_about_before_training(make_config, backend):
    warned = messages_before_the_first_step(make_config(learn_rate="0.005:2, 1e9"), backend)
    (warning,) = [m for m in warned if "far above what textual inversion uses" in m]
    assert "1e+09" in warning and "0.005:2, 1e9" in warning
    warned = messages_before_the_first_step(make_config(create=False, learn_rate="5"), backend)
    assert any("Learning rate 5 " in m for m in warned)


def test_a_sane_learning_rate_is_not_warned_about(make_config, backend):
    quiet = messages_before_the_first_step(make_config(learn_rate="0.05:2, 0.005:4, 1e-4"), backend)
    assert not any("far above" in m for m in quiet)


def test_captions_over_the_token_budget_are_named_before_training(make_config, backend, dataset):
    essay = dataset / "01-square.txt"
    essay.write_text("a long pasted essay about squares, " * 300, encoding="utf-8")
    warned = messages_before_the_first_step(make_config(), backend)
    (warning,) = [m for m in warned if "longer than one 75-token chunk" in m]
    assert warning.startswith("1 caption(s)")
    tokens = int(warning.split("01-square.txt: ")[1].split(" tokens")[0])
    assert tokens > 300 * 7  # the whole essay is counted, with the template and the vectors
    assert f"({-(-tokens // 75)} chunks)" in warning
    assert "00-circle" not in warning and "02-triangle" not in warning  # the short captions fit


def test_captions_within_budget_get_no_warning(make_config, backend):
    assert not any("token chunk" in m for m in messages_before_the_first_step(make_config(), backend))
