"""The standalone app in a real browser: create an embedding, train a few steps, see the result on the page.

Debian's chromium (the Makefile installs it) driven by Playwright, headless, against `python -m ti_trainer app`
on a free localhost port with the built-in tiny model.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ti_trainer.cli.demo import make_dataset
from ti_trainer.embeddings.files import load_embedding

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO = Path(__file__).parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("app")


@pytest.fixture(scope="module")
def app_url(workspace):
    tmp_path = workspace
    port = free_port()
    log = (tmp_path / "app.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see tests/ui/conftest.py
    command = [sys.executable, "-m", "ti_trainer", "app", "--model", "tiny", "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--workspace", str(tmp_path / "workspace")],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the app did not start:\n{(tmp_path / 'app.log').read_text()}")
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture
def page():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make test-a1111` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)  # a loaded 2-core CI machine is slow; nothing here waits that long
        yield page
        browser.close()


def settled(page, selector: str, value) -> None:
    """The field shows `value` once the server's answer to the last event has arrived: the page updates a
    field when that answer comes, which on a loaded machine can be seconds after the click."""
    from playwright.sync_api import expect

    expect(page.locator(selector).first).to_have_value(value, timeout=30_000)


def fill(page, elem_id: str, value: str, commit: bool = False) -> None:
    field = page.locator(f"#{elem_id} input:not([type=range]), #{elem_id} textarea").first
    field.fill(value)
    if commit:
        field.press("Enter")


def test_create_then_train_in_the_browser(app_url, page, workspace):
    dataset = make_dataset(workspace / "dataset", count=4, size=64)
    page.goto(app_url)
    page.wait_for_selector("#ti_trainer_create_name")

    fill(page, "ti_trainer_create_name", "browser-style")
    page.wait_for_selector("#ti_trainer_create_name_status .ti-trainer-ok")
    fill(page, "ti_trainer_create_init_text", "painting")
    fill(page, "ti_trainer_create_vectors", "2", commit=True)
    page.wait_for_selector("#ti_trainer_create_init_status >> text=takes 2 of the 75 tokens")
    page.click("#ti_trainer_create_button")
    page.wait_for_selector("#ti_trainer_create_result .ti-trainer-ok", timeout=60_000)

    page.locator("#ti_trainer_tabs button", has_text="Train").first.click()
    # The new embedding is already listed and chosen.
    settled(page, "#ti_trainer_train_embedding_name input", "browser-style")
    # Tooltips on the field and on its label (inside the WebUI, labels would otherwise get txt2img's).
    assert "accumulation" in page.get_attribute("#ti_trainer_train_batch_size", "title")
    assert "accumulation" in page.get_attribute(
        "#ti_trainer_train_batch_size [data-testid=block-info]", "title"
    )
    fill(page, "ti_trainer_train_data_dir", str(dataset))
    page.wait_for_selector("#ti_trainer_plan >> text=4 images")
    for elem_id, value in [("width", "64"), ("height", "64"), ("max_steps", "4"), ("batch_size", "2")]:
        fill(page, f"ti_trainer_train_{elem_id}", value, commit=True)
    for elem_id in ("save_every", "preview_every"):
        fill(page, f"ti_trainer_train_{elem_id}", "2", commit=True)
    page.wait_for_selector("#ti_trainer_plan >> text=2 steps per epoch")
    page.click("#ti_trainer_train_button")

    page.wait_for_selector("#ti_trainer_train_result .ti-trainer-ok", timeout=120_000)
    assert "finished at 4 steps" in page.inner_text("#ti_trainer_train_result")
    page.wait_for_selector('#ti_trainer_progress [data-state="finished"]')
    assert "Step 4 / 4" in page.inner_text("#ti_trainer_progress")
    page.wait_for_selector("#ti_trainer_previews img")
    assert page.locator("#ti_trainer_previews img").count() >= 2
    # Gradio 4 shows a file's stem and suffix in separate boxes, on two lines of inner text.
    assert "browser-style.pt" in "".join(page.inner_text("#ti_trainer_last_saved").split())
    page.wait_for_selector("#ti_trainer_train_embedding_status >> text=Already trained 4 steps")
    page.screenshot(path=str(workspace / "after-training.png"), full_page=True)
    check_what_gradio_lays_out_differently(page)

    saved = load_embedding(workspace / "workspace" / "embeddings" / "browser-style.pt")
    assert saved.step == 4 and saved.vectors.shape[0] == 2

    # A fresh page: the finished run beside the form it ran with, and the lists as they are now.
    (workspace / "workspace" / "embeddings" / "copied-in.pt").write_bytes(
        (workspace / "workspace" / "embeddings" / "browser-style.pt").read_bytes()
    )
    page.goto(app_url)
    page.locator("#ti_trainer_tabs button", has_text="Train").first.click()
    page.wait_for_selector('#ti_trainer_progress [data-state="finished"]')
    settled(page, "#ti_trainer_train_embedding_name input", "browser-style")
    settled(page, "#ti_trainer_train_data_dir :is(input, textarea)", str(dataset))
    settled(page, "#ti_trainer_train_max_steps input", "4")
    page.click("#ti_trainer_train_embedding_name input")
    page.wait_for_selector("#ti_trainer_train_embedding_name li >> text=copied-in")
    page.keyboard.press("Escape")
    page.locator("#ti_trainer_tabs button", has_text="Results").first.click()
    settled(page, "#ti_trainer_results_run input", re.compile(r".*/browser-style$"))
    page.screenshot(path=str(workspace / "fresh-page-results.png"), full_page=True)


# Gradio 3.41 fades the wrapper of an HTML box to 0.2 while its event is pending (4.40 leaves it).
PROGRESS_OPACITY_WHILE_PENDING = """async () => {
    const wrapper = document.querySelector('#ti_trainer_progress .prose').parentElement;
    wrapper.classList.add('pending');
    await new Promise((resolve) => setTimeout(resolve, 500));  // past Gradio's fade transition
    const opacity = getComputedStyle(wrapper).opacity;
    wrapper.classList.remove('pending');
    return opacity;
}"""


def check_what_gradio_lays_out_differently(page) -> None:
    """The page's parts whose markup Gradio 3.41 and 4.40 build differently, after a run."""
    # Tooltips where the script finds them by Gradio's markup: the sub-tabs' buttons, an accordion's header.
    assert "Train an embedding" in page.locator(
        "#ti_trainer_tabs button", has_text="Train"
    ).first.get_attribute("title")
    assert "preview pictures" in page.get_attribute("#ti_trainer_train_previews .label-wrap", "title")
    # The loss plot's box holds the whole chart, its legend included (Gradio 4's height is the box's).
    page.wait_for_selector("#ti_trainer_loss_plot canvas")
    page.wait_for_timeout(500)  # the chart is laid out after it appears
    cut_off = page.evaluate(
        "(() => { const box = document.querySelector('#ti_trainer_loss_plot');"
        " return box.scrollHeight - box.clientHeight; })()"
    )
    assert cut_off <= 1, f"the loss plot's box cuts off {cut_off}px of the chart"
    # Polled every second while a run goes, the progress box must not fade each time (style.css).
    assert page.evaluate(PROGRESS_OPACITY_WHILE_PENDING) == "1"


# Just enough of the WebUI's page helpers (script.js, ui.js, progressbar.js) to see our script use them.
WEBUI_HELPERS = """
window.uiUpdateCallbacks = [];
window.gradioApp = () => document.querySelector('gradio-app').shadowRoot || document;
window.onUiUpdate = (callback) => uiUpdateCallbacks.push(callback);
window.randomId = () => 'task(webui-like)';
window.progressRequests = [];
window.requestProgress = (id, anchor, gallery, atEnd, onProgress) => progressRequests.push([id, anchor.id]);
new MutationObserver(() => uiUpdateCallbacks.forEach((callback) => callback()))
    .observe(document, {childList: true, subtree: true});
"""


def test_inside_the_webui_the_script_uses_its_helpers(app_url, page):
    page.add_init_script(WEBUI_HELPERS)
    page.goto(app_url)
    page.wait_for_selector("#ti_trainer_create_vectors")
    page.wait_for_function("document.querySelector('#ti_trainer_create_vectors').title.includes('75')")
    page.locator("#ti_trainer_tabs button", has_text="Train").first.click()
    # A dataset folder that is not there: the run fails with a message, shown once: in the progress box, not
    # again in the result.
    fill(page, "ti_trainer_train_data_dir", "/no/such/folder")
    page.click("#ti_trainer_train_button")
    page.wait_for_selector('#ti_trainer_progress [data-state="failed"]')
    message = page.inner_text("#ti_trainer_progress .ti-trainer-headline")
    assert message.strip()  # which check fails first depends on the form the page opened with
    assert message not in page.inner_text("#ti_trainer_train_result")
    assert page.evaluate("window.progressRequests") == [["task(webui-like)", "ti_trainer_train_result"]]


def test_an_even_split_fills_batch_size_and_accumulation(app_url, page, workspace):
    """The planner's splits are a Dataset whose samples an update replaced: Gradio 3 and 4 send a click on
    them differently (Gradio 4 looks the sample up on the server, in the page's own copy of the Dataset)."""
    dataset = make_dataset(workspace / "split-dataset", count=6, size=64)
    page.goto(app_url)
    page.locator("#ti_trainer_tabs button", has_text="Train").first.click()
    fill(page, "ti_trainer_train_data_dir", str(dataset))
    page.wait_for_selector("#ti_trainer_plan >> text=6 images")
    first_split = page.locator("#ti_trainer_plan_splits tbody tr").first
    assert [cell.strip() for cell in first_split.locator("td").all_inner_texts()] == ["3", "2", "1"]
    first_split.click()
    page.wait_for_function("document.querySelector('#ti_trainer_train_batch_size input').value === '3'")
    settled(page, "#ti_trainer_train_gradient_accumulation input", "2")
