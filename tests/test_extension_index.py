"""The entry for the WebUI's extension index (docs/extension-index.json) passes the index's own checks."""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "docs" / "extension-index.json"

# The index's tags.json (AUTOMATIC1111/stable-diffusion-webui-extensions, shared/reference/a1111.md §6);
# "installed" is internal to the WebUI and not for entries.
VALID_TAGS = {
    "script",
    "localization",
    "tab",
    "dropdown",
    "ads",
    "training",
    "models",
    "UI related",
    "prompting",
    "editing",
    "manipulations",
    "online",
    "animation",
    "query",
    "science",
    "extras",
}
# The index's validate.py accepts an https URL, with or without ".git".
GIT_URL = re.compile(r"(https://[^ ]+?)(?:(?:\.git)$|$)")


def entry() -> dict:
    return json.loads(ENTRY.read_text(encoding="utf-8"))


def test_the_entry_has_the_fields_the_index_requires():
    data = entry()
    for key in ("name", "url", "description", "tags"):
        assert key in data, key
    assert isinstance(data["tags"], list) and data["tags"]
    assert all(isinstance(data[key], str) and data[key].strip() for key in ("name", "url", "description"))
    if "added" in data:
        datetime.date.fromisoformat(data["added"])
    assert set(data) <= {"name", "url", "description", "tags", "added"}


def test_every_tag_is_one_the_index_knows():
    tags = entry()["tags"]
    assert set(tags) <= VALID_TAGS, set(tags) - VALID_TAGS
    assert len(tags) == len(set(tags))
    assert "training" in tags and "tab" in tags
    # The BLIP captioner downloads its model on first use; the index requires "online" for that.
    assert "online" in tags


def test_the_url_is_the_projects_repository():
    match = GIT_URL.fullmatch(entry()["url"])
    assert match, entry()["url"]
    # Read without tomllib, which Python 3.10 (the WebUI's) lacks.
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    repository = re.search(r'^Repository = "([^"]+)"$', pyproject, re.MULTILINE)
    assert repository, "pyproject.toml has no [project.urls] Repository"
    assert match.group(1) == repository.group(1)
