"""BLIP captions: a tiny BLIP built from config (no download), the first-use message, the offline error."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_prepare_drawing import BLUE_GREEN, ORANGE, folder_fingerprint, painting

from ti_trainer.errors import UserError
from ti_trainer.prepare import blip
from ti_trainer.prepare.blip import BlipCaptioner, load_blip_captioner
from ti_trainer.prepare.captioners import BLIP_LABEL, build_captioner, captioner_labels
from ti_trainer.prepare.preprocess import PrepareOptions, prepare_dataset

REPO = Path(__file__).resolve().parents[1]
WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "[DEC]",
    "a",
    "cat",
    "dog",
    "painting",
    "of",
    "tree",
    "sky",
]


@pytest.fixture(scope="module")
def tiny_blip_folder(tmp_path_factory) -> Path:
    """A BLIP captioning model with random weights and a 13-word tokenizer, saved like a downloaded one."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip import BlipImageProcessor

    folder = tmp_path_factory.mktemp("tiny-blip")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    processor = BlipProcessor(
        BlipImageProcessor(size={"height": 32, "width": 32}), BertTokenizer(str(vocab), bos_token="[DEC]")
    )
    text = dict(
        vocab_size=len(WORDS),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        bos_token_id=WORDS.index("[DEC]"),
        pad_token_id=0,
        sep_token_id=3,
        eos_token_id=3,
    )
    vision = dict(
        hidden_size=32,
        image_size=32,
        patch_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(
        BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    vocab.unlink()  # the processor saved its own copy; what is left is what a download holds
    return folder


def quick(folder: Path, models_dir: Path):
    """Random weights write random words up to the limit: a short limit and no beams keep the tests fast."""
    return load_blip_captioner(str(folder), models_dir, device="cpu", max_new_tokens=4, num_beams=1)


def test_tiny_blip_captions_an_image(tiny_blip_folder, tmp_path):
    messages = []
    captioner = load_blip_captioner(
        str(tiny_blip_folder), tmp_path / "models", device="cpu", on_message=messages.append, max_new_tokens=6
    )
    image = painting(0, ORANGE, (80, 60))
    caption = captioner(image)
    assert caption == captioner(image)
    assert caption and set(caption.split()) <= set(WORDS[6:])  # its own words, special tokens removed
    assert messages == []  # a local folder downloads nothing and says nothing
    assert not (tmp_path / "models").exists()


def test_blip_is_a_captioner_choice(tiny_blip_folder, tmp_path):
    captioner = build_captioner([BLIP_LABEL], {}, str(tiny_blip_folder), tmp_path / "models")
    [blip_part] = captioner.parts
    assert isinstance(blip_part, BlipCaptioner) and blip_part.num_beams == 3
    captioner.close()
    assert blip_part.model is None  # its memory is released after a run


def test_prepare_writes_blip_captions_for_each_output(tiny_blip_folder, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    painting(0, BLUE_GREEN, (96, 96)).save(source / "lake.png")
    before = folder_fingerprint(source)
    captioner = quick(tiny_blip_folder, tmp_path / "models")
    result = prepare_dataset(
        source, tmp_path / "out", PrepareOptions(size=64, flips=("horizontal",)), captioner
    )
    crop, mirrored = result.written
    expected = captioner(Image.open(crop).convert("RGB"))
    assert expected and crop.with_suffix(".txt").read_text(encoding="utf-8") == expected
    assert mirrored.with_suffix(".txt").read_text(encoding="utf-8") == expected  # captioned once, shared
    assert folder_fingerprint(source) == before


def test_host_captioners_are_offered_and_joined():
    host = {"deepbooru": lambda image: "1girl, piano", "BLIP (WebUI)": lambda image: "  "}
    assert captioner_labels(host) == [BLIP_LABEL, "deepbooru", "BLIP (WebUI)"]
    both = build_captioner(["deepbooru", "BLIP (WebUI)"], host)
    assert both(Image.new("RGB", (8, 8))) == "1girl, piano"  # empty parts are left out of the join
    assert build_captioner([], host) is None
    with pytest.raises(UserError, match="no captioner called 'clip'"):
        build_captioner(["clip"], host)


class Answers:
    """A stand-in for urllib.request.urlopen: the Hub answers (or does not), no packet leaves the machine."""

    def __init__(self, error: Exception | None = None):
        self.error = error
        self.timeouts: list[float] = []

    def __call__(self, request, timeout=None):
        self.timeouts.append(timeout)
        if self.error is not None:
            raise self.error
        return contextlib.nullcontext()


def not_in_the_cache(calls: list):
    def fake_from_pretrained(name, cache_dir, local_files_only):
        calls.append((name, cache_dir, local_files_only))
        if local_files_only:
            raise OSError("not in the cache")
        return torch.nn.Linear(1, 1), object()

    return fake_from_pretrained


@pytest.fixture
def online(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    answers = Answers()
    monkeypatch.setattr(urllib.request, "urlopen", answers)
    return answers


def test_first_use_downloads_into_the_models_folder_with_a_message(monkeypatch, tmp_path, online):
    calls = []

    def fake_from_pretrained(name, cache_dir, local_files_only):
        calls.append((name, cache_dir, local_files_only))
        if local_files_only:
            raise OSError("not in the cache")
        return torch.nn.Linear(1, 1), object()

    monkeypatch.setattr(blip, "_from_pretrained", fake_from_pretrained)
    messages = []
    load_blip_captioner("someone/blip", tmp_path / "models", device="cpu", on_message=messages.append)
    assert calls == [
        ("someone/blip", tmp_path / "models", True),
        ("someone/blip", tmp_path / "models", False),
    ]
    assert (
        "Downloading the captioning model someone/blip" in messages[0]
        and str(tmp_path / "models") in messages[0]
    )


def test_a_folder_that_is_not_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not hold a BLIP captioning model"):
        load_blip_captioner(str(tmp_path), device="cpu", on_message=lambda text: None)


def test_offline_without_the_model_is_a_clear_error_before_any_image(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    painting(0, BLUE_GREEN, (96, 96)).save(source / "a.png")
    dest = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "ti_trainer",
        "preprocess",
        str(source),
        str(dest),
        "--size",
        "64",
        "--caption",
    ]
    command += ["--blip-model", "nobody-here/no-such-blip", "--models-dir", str(tmp_path / "models")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert done.returncode == 2
    assert "nobody-here/no-such-blip" in done.stderr and "offline mode is on" in done.stderr
    assert "Traceback" not in done.stderr
    assert not dest.exists()  # the model is loaded before any image is touched


def test_offline_mode_fails_at_once_without_announcing_a_download(monkeypatch, tmp_path):
    calls, messages = [], []
    monkeypatch.setattr(blip, "_from_pretrained", not_in_the_cache(calls))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as caught:
        load_blip_captioner("someone/blip", tmp_path / "models", device="cpu", on_message=messages.append)
    assert calls == [("someone/blip", tmp_path / "models", True)]  # the cache only: no download tried
    assert messages == []  # no "Downloading (about 1 GB)" that never comes
    text = str(caught.value)
    assert "someone/blip" in text and "offline mode is on" in text
    assert "caption editor" in text and "folder" in text  # how to go on


def test_no_network_is_found_out_in_seconds_before_any_download(monkeypatch, tmp_path, online):
    online.error = urllib.error.URLError(OSError(101, "Network is unreachable"))
    calls, messages = [], []
    monkeypatch.setattr(blip, "_from_pretrained", not_in_the_cache(calls))
    with pytest.raises(UserError) as caught:
        load_blip_captioner("someone/blip", tmp_path / "models", device="cpu", on_message=messages.append)
    assert calls == [("someone/blip", tmp_path / "models", True)]
    assert messages == []
    assert online.timeouts and all(0 < timeout <= 5 for timeout in online.timeouts)
    text = str(caught.value)
    assert "cannot be reached" in text and "Network is unreachable" in text and "caption editor" in text


def test_an_http_error_status_still_means_the_network_is_there(monkeypatch, tmp_path, online):
    online.error = urllib.error.HTTPError("https://huggingface.co", 405, "Method Not Allowed", {}, None)
    calls = []
    monkeypatch.setattr(blip, "_from_pretrained", not_in_the_cache(calls))
    load_blip_captioner("someone/blip", tmp_path / "models", device="cpu", on_message=lambda text: None)
    assert [local for _, _, local in calls] == [True, False]


def test_a_model_in_the_cache_needs_no_network(monkeypatch, tmp_path):
    def unreachable(request, timeout=None):
        raise AssertionError("the network was asked although the model is in the cache")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    monkeypatch.setattr(
        blip, "_from_pretrained", lambda name, cache_dir, local_files_only: (torch.nn.Linear(1, 1), object())
    )
    load_blip_captioner("someone/blip", tmp_path / "models", device="cpu", on_message=lambda text: None)


def test_captioning_that_fails_midway_keeps_the_prepared_images(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for index in range(4):
        painting(index, BLUE_GREEN, (96, 96)).save(source / f"{index}.png")

    def gives_up(image):
        gives_up.calls += 1
        if gives_up.calls >= 2:
            raise UserError("The captioning model ran out of GPU memory.")
        return "a lake"

    gives_up.calls = 0
    result = prepare_dataset(source, tmp_path / "out", PrepareOptions(size=64), captioner=gives_up)
    assert len(result.written) == 4 and result.skipped == []  # every image still cropped and written
    assert gives_up.calls == 2  # not asked again after it gave up
    assert result.written[0].with_suffix(".txt").read_text(encoding="utf-8") == "a lake"
    assert not any(path.with_suffix(".txt").exists() for path in result.written[1:])
    text = "\n".join(result.lines())
    assert "Captioning stopped at 1.png" in text and "ran out of GPU memory" in text
    assert "caption editor" in text
