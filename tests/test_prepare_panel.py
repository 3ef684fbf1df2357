"""The Prepare panel's handlers, driven as Gradio would call them, without Gradio or a browser."""

from __future__ import annotations

import sys
from pathlib import Path

from test_prepare_drawing import BLUE_GREEN, ORANGE, folder_fingerprint, painting

from ti_trainer.backends.clip_bpe import tiny_tokenizer
from ti_trainer.host.base import HostServices
from ti_trainer.text.conditioning import PromptChunker, TokenIds
from ti_trainer.text.templates import BUILTIN_TEMPLATES_DIR
from ti_trainer.ui import prepare_panel as panel
from ti_trainer.ui.prepare_panel import PAGE_SIZE, Interrupt


class FakeBackend:
    """Only what the lint reads from a backend: its prompt chunker."""

    def __init__(self):
        tokenizer = tiny_tokenizer()
        ids = TokenIds(start=tokenizer.start_id, end=tokenizer.end_id, pad=0, comma=tokenizer.comma_id)
        self.prompt_encoder = type("Encoder", (), {"chunker": PromptChunker(tokenizer, ids)})()


def services(tmp_path: Path, captioners=None) -> HostServices:
    return HostServices(
        name="standalone",
        embeddings_dir=tmp_path / "embeddings",
        templates_dirs=[BUILTIN_TEMPLATES_DIR],
        log_dir=tmp_path / "logs",
        models_dir=tmp_path / "models",
        get_backend=FakeBackend,
        captioners=captioners or {},
    )


def prepare_args(source: Path, dest: Path, captioners=(), flips=()) -> list:
    """The panel's inputs in order: folders, size, crop, focal weights, split, flips, captioning."""
    return [
        str(source),
        str(dest),
        64,
        "center",
        0.9,
        0.15,
        0.5,
        False,
        0.5,
        0.2,
        list(flips),
        list(captioners),
        "unused/blip",
        "keep",
    ]


def source_folder(tmp_path: Path, count: int) -> Path:
    source = tmp_path / "src"
    source.mkdir()
    for index in range(count):
        painting(index, BLUE_GREEN, (96, 96)).save(source / f"{index:02d}.png")
    (source / "broken.jpg").write_bytes(b"not a jpeg")
    return source


def test_the_panel_module_does_not_import_gradio():
    assert "gradio" not in sys.modules


def test_prepare_runs_with_a_host_captioner_and_points_the_editor_at_the_result(tmp_path):
    source = source_folder(tmp_path, 3)
    before = folder_fingerprint(source)
    dest = tmp_path / "prepared"
    host = services(tmp_path, {"deepbooru": lambda image: "1girl, lake"})
    steps = list(
        panel.run_prepare(host, Interrupt(), *prepare_args(source, dest, ["deepbooru"], ["horizontal"]))
    )
    log, editor_folder, report_folder = steps[-1]
    assert "Done: 4 of 4 source images processed, 6 images written, 1 file skipped" in log
    assert "skipped broken.jpg: not an image" in log
    assert editor_folder == {"__type__": "update", "value": str(dest)} == report_folder
    assert all(step[1] == {"__type__": "update"} for step in steps[:-1])  # folders change only at the end
    assert sorted(p.read_text(encoding="utf-8") for p in dest.glob("*.txt")) == ["1girl, lake"] * 6
    assert folder_fingerprint(source) == before


def test_interrupt_stops_after_the_current_image(tmp_path):
    source = source_folder(tmp_path, 4)
    interrupt = Interrupt()

    def captioner(image):
        interrupt.request()  # the artist presses Interrupt while the first image is being captioned
        return "a field"

    host = services(tmp_path, {"slow": captioner})
    log = list(panel.run_prepare(host, interrupt, *prepare_args(source, tmp_path / "out", ["slow"])))[-1][0]
    assert log.startswith("Interrupted: 1 of 5 source images processed, 1 image written")
    assert [p.name for p in (tmp_path / "out").glob("*.png")] == ["00000-0-00.png"]


def test_prepare_reports_errors_in_the_log(tmp_path):
    host = services(tmp_path)
    log = list(panel.run_prepare(host, Interrupt(), *prepare_args(tmp_path / "missing", tmp_path / "out")))[
        -1
    ][0]
    assert log.startswith("Error: The source folder") and "does not exist" in log
    log = list(panel.run_prepare(host, Interrupt(), *prepare_args(tmp_path, tmp_path / "out", ["nope"])))[-1][
        0
    ]
    assert "no captioner called 'nope'" in log


def caption_folder(tmp_path: Path, count: int) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for index in range(count):
        painting(index, BLUE_GREEN, (48, 48)).save(folder / f"{index:02d}.png")
        (folder / f"{index:02d}.txt").write_text(f"caption {index}", encoding="utf-8")
    return folder


def test_caption_pages_show_images_with_their_captions(tmp_path):
    folder = caption_folder(tmp_path, PAGE_SIZE + 2)
    names, page, status, *slots = panel.load_caption_page(str(folder), 1)
    assert page == 1 and len(names) == PAGE_SIZE and "Page 1 of 2" in status
    assert len(slots) == 2 * PAGE_SIZE
    assert slots[0]["value"] == str(folder / "00.png") and slots[1]["value"] == "caption 0"
    names, page, status, *slots = panel.next_page(str(folder), 1)
    assert page == 2 and names == ["12.png", "13.png"]
    assert [slot["visible"] for slot in slots[::2]] == [True, True] + [False] * (PAGE_SIZE - 2)
    assert panel.next_page(str(folder), 2)[1] == 2  # past the end stays on the last page
    assert panel.previous_page(str(folder), 1)[1] == 1
    assert panel.load_caption_page(str(tmp_path / "none"), 1)[2].startswith("Error: The dataset folder")


def test_the_editor_saves_changed_captions_only(tmp_path):
    folder = caption_folder(tmp_path, 3)
    names = panel.load_caption_page(str(folder), 1)[0]
    status = panel.save_caption_page(str(folder), names, "caption 0", "two boats at dawn\n", "caption 2")
    assert status == "Saved 1 caption: 01.png"
    assert (folder / "01.txt").read_text(encoding="utf-8") == "two boats at dawn"
    assert panel.load_caption_page(str(folder), 1)[3 + 3]["value"] == "two boats at dawn"
    # An image without a caption file gets one when a caption is typed for it.
    painting(9, BLUE_GREEN, (48, 48)).save(folder / "09.png")
    names = panel.load_caption_page(str(folder), 1)[0]
    assert panel.save_caption_page(
        str(folder), names, "caption 0", "two boats at dawn", "caption 2", "a pier"
    )
    assert (folder / "09.txt").read_text(encoding="utf-8") == "a pier"


def test_replace_in_all_captions_then_show_the_page(tmp_path):
    folder = caption_folder(tmp_path, 3)
    outputs = panel.replace_in_captions(str(folder), 1, "caption", "photo", False, False, True)
    assert outputs[2] == "Replaced 3 times in 3 caption files."
    assert outputs[3 + 1]["value"] == "photo 0"
    assert panel.replace_in_captions(str(folder), 1, "", "x", False, False, True)[2].startswith("Error:")


def test_check_captions_lints_init_words_and_the_token_budget(tmp_path):
    folder = caption_folder(tmp_path, 2)
    (folder / "00.txt").write_text("an oil painting of a harbour", encoding="utf-8")
    (folder / "01.txt").write_text(", ".join(["a very long winding road"] * 20), encoding="utf-8")
    html = panel.check_captions(
        services(tmp_path), str(folder), "oil painting", "style_filewords.txt", "myart", 4
    )
    assert "00.png [init-words]" in html and "01.png [token-budget]" in html
    missing = panel.check_captions(services(tmp_path), str(folder), "", "nope.txt", "myart", 4)
    assert "not found: the token budget was not checked" in missing


def test_report_panel_shows_the_outlier(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for index in range(6):
        painting(index, BLUE_GREEN).save(folder / f"{index}.png")
    painting(50, ORANGE).save(folder / "<orange>.png")
    html = panel.run_report(str(folder), 512, 8)
    assert "&lt;orange&gt;.png</b>" in html and "Stand out from the rest" in html
    assert "ti-trainer-error" in panel.run_report(str(tmp_path / "none"), 512, 8)
    assert "ti-trainer-error" in panel.check_captions(
        services(tmp_path), str(tmp_path / "none"), "", "", "", 1
    )


def test_a_captioner_that_gives_up_midway_leaves_the_prepared_images_in_the_log(tmp_path):
    from ti_trainer.errors import UserError

    source = source_folder(tmp_path, 3)

    def gives_up(image):
        raise UserError("The captioning model is gone.")

    host = services(tmp_path, {"flaky": gives_up})
    dest = tmp_path / "out"
    log, editor_folder, _ = list(
        panel.run_prepare(host, Interrupt(), *prepare_args(source, dest, ["flaky"]))
    )[-1]
    assert "Done: 4 of 4 source images processed, 3 images written" in log
    assert "Captioning stopped at 00.png" in log and "caption editor" in log
    assert editor_folder == {"__type__": "update", "value": str(dest)}  # the editor opens on the result
    assert len(list(dest.glob("*.png"))) == 3
