"""The tab as built: every run option on the form, a tooltip for every control, theme-aware CSS, no torch."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import gradio as gr
import pytest
from gradio_events import events

from ti_trainer.cli.main import build_parser
from ti_trainer.config import field_info
from ti_trainer.host.standalone import SCRIPT_FILE, STYLE_FILE, build_app, page_script
from ti_trainer.ui.tab import build_tab
from ti_trainer.ui.train_form import HOST_FIELDS, form_fields
from ti_trainer.ui.train_panel import build_train_panel

NOT_CONTROLS = {"ti_trainer_task_id", "ti_trainer_poll"}  # hidden plumbing, never seen


def tooltip_ids() -> set[str]:
    return set(re.findall(r"^\s+(ti_trainer_\w+):", SCRIPT_FILE.read_text(encoding="utf-8"), re.MULTILINE))


def test_every_run_option_is_on_the_train_form(services):
    with gr.Blocks():
        panel = build_train_panel(services)
    assert list(panel.form) and set(panel.form) == set(form_fields())
    assert not set(HOST_FIELDS) & set(panel.form)
    # The form starts from the host's defaults and folders.
    assert panel.form["log_dir"].value == str(services.log_dir)
    assert panel.form["template"].value == "style_filewords.txt"


def test_form_labels_and_choices_are_the_config_fields(services):
    with gr.Blocks():
        panel = build_train_panel(services)
    for name, component in panel.form.items():
        info = field_info(name)
        assert component.label == info.label, name
        if info.choices:
            values = [choice[1] if isinstance(choice, tuple) else choice for choice in component.choices]
            assert values == list(info.choices), name


def test_host_defaults_fill_the_form(services):
    services.defaults = {"learn_rate": "0.002", "batch_size": 3}
    with gr.Blocks():
        panel = build_train_panel(services)
    assert panel.form["learn_rate"].value == "0.002" and panel.form["batch_size"].value == 3


def test_every_control_has_a_tooltip_in_plain_words(services):
    tab = build_tab(services)
    controls = {
        block.elem_id
        for block in tab.blocks.values()
        if isinstance(block, gr.components.Component | gr.Accordion)
        and not isinstance(block, gr.HTML)  # messages, not controls
        and (block.elem_id or "").startswith("ti_trainer_")
        and block.elem_id not in NOT_CONTROLS
        and not block.elem_id.endswith("_status")
    }
    # Our panels' controls only: Prepare and Results bring their own.
    ours = {
        i for i in controls if i.startswith(("ti_trainer_create_", "ti_trainer_train_", "ti_trainer_plan"))
    }
    assert {"ti_trainer_train_batch_size", "ti_trainer_create_vectors"} <= ours
    missing = (
        ours
        - tooltip_ids()
        - {"ti_trainer_create_result", "ti_trainer_train_result", "ti_trainer_train_extra"}
    )
    assert not missing, f"controls without a tooltip in javascript/ti_trainer.js: {sorted(missing)}"


def test_tooltips_answer_what_the_tutorials_ask():
    script = SCRIPT_FILE.read_text(encoding="utf-8")
    tips = dict(re.findall(r"(ti_trainer_\w+):\s*((?:\"[^\"]*\"\s*\+?\s*)+)", script))
    text = {key: re.sub(r'"\s*\+\s*"', "", value).strip().strip('",') for key, value in tips.items()}
    assert "batch size × accumulation" in text["ti_trainer_train_batch_size"]
    assert "prompt" in text["ti_trainer_create_vectors"] and "75" in text["ti_trainer_create_vectors"]
    assert "overbake" in text["ti_trainer_train_learn_rate"]
    assert "deterministic" in text["ti_trainer_train_latent_sampling"]


def test_style_uses_the_theme_variables_only():
    css = STYLE_FILE.read_text(encoding="utf-8")
    colours = re.findall(
        r"#[0-9a-fA-F]{3,8}\b(?![\w-])|\brgba?\(|\bhsla?\(", re.sub(r"#ti_trainer\w*", "", css)
    )
    assert not colours, f"hard-coded colours in style.css: {colours}"
    assert "var(--color-accent)" in css and "var(--body-text-color)" in css


def test_ui_modules_load_without_torch():
    code = (
        "import sys\n"
        "import ti_trainer.ui.tab, ti_trainer.ui.train_panel, ti_trainer.ui.create_panel, ti_trainer.training.batch_plan\n"
        "loaded = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_the_app_serves_the_tab_with_our_script_and_style(services):
    app = build_app(services)
    assert "ti_trainer_start_training" in page_script() and page_script().startswith("() => {")
    assert ".ti-trainer-note" in app.css
    ids = {block.elem_id for block in app.blocks.values()}
    assert {"ti_trainer_tabs", "ti_trainer_train_button", "ti_trainer_create_button"} <= ids
    # The tab is rendered once (built outside the app's context, like the WebUI does).
    assert sum(1 for block in app.blocks.values() if block.elem_id == "ti_trainer_train_button") == 1
    loads = [event for event in events(app) if event.js and "TITLES" in event.js]
    assert len(loads) == 1


def test_app_verb():
    args = build_parser().parse_args(["app", "--port", "7999", "--workspace", "ws", "--model", "tiny"])
    assert (args.verb, args.port, str(args.workspace), args.model) == ("app", 7999, "ws", "tiny")


def test_a_panel_not_yet_installed_leaves_a_note_and_a_broken_one_raises(services, tmp_path, monkeypatch):
    from ti_trainer.ui.tab import _mount

    with gr.Blocks() as blocks:
        _mount("ti_trainer.ui.no_such_panel", "build", services)
    assert any(
        "not installed" in str(block.value) for block in blocks.blocks.values() if isinstance(block, gr.HTML)
    )

    (tmp_path / "broken_panel_for_test.py").write_text("import a_dependency_that_is_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_missing"), gr.Blocks():
        _mount("broken_panel_for_test", "build", services)


def test_standalone_jobs_run_one_at_a_time_and_start_uninterrupted(services):
    events = []

    def job(name):
        events.append(("start", name, services.interrupt_requested()))
        time.sleep(0.05)
        events.append(("end", name, None))

    services.request_interrupt()  # an Interrupt clicked while nothing ran must not stop the next job
    threads = [threading.Thread(target=services.wrap_job(job), args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [kind for kind, _, _ in events] == ["start", "end", "start", "end"]
    assert [flag for kind, _, flag in events if kind == "start"] == [False, False]


def test_every_button_has_readable_words_not_only_a_symbol(services):
    """Where no emoji font is installed a symbol is an empty box; screen readers skip it too."""
    tab = build_tab(services)
    buttons = [block for block in tab.blocks.values() if isinstance(block, gr.Button) and block.visible]
    assert len(buttons) > 10
    symbol_only = [button.value for button in buttons if not re.search(r"[A-Za-z]{3}", str(button.value))]
    assert not symbol_only, f"buttons with no words: {symbol_only}"


def test_the_results_charts_have_no_label_over_their_titles(services):
    """Gradio lays an image's label over its top-left corner, where each chart has its own title."""
    tab = build_tab(services)
    images = [block for block in tab.blocks.values() if isinstance(block, gr.Image)]
    charts = [
        image
        for image in images
        if image.label in ("Training and validation loss", "Vector lengths (overbake signal)")
    ]
    assert len(charts) == 2 and not any(image.show_label for image in charts)
