"""modules.script_callbacks (Forge keeps A1111's: modules/script_callbacks.py): extensions register functions the
WebUI calls while it builds the UI and the app, and when a model has loaded.

As in A1111, a failing callback is reported and skipped (its tab or routes are then simply missing).
"""

import dataclasses
import inspect
import traceback


@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: object
    name: str = "unnamed"


callback_map = dict(
    callbacks_app_started=[], callbacks_ui_tabs=[], callbacks_ui_settings=[], callbacks_model_loaded=[]
)
errors = []  # what the WebUI would print as "Error executing callback ..."


def _add(category, callback, name):
    frames = [frame.filename for frame in inspect.stack() if frame.filename != __file__]
    callback_map[f"callbacks_{category}"].append(ScriptCallback(frames[0], callback, name or "unnamed"))


def clear_callbacks():
    for callbacks in callback_map.values():
        callbacks.clear()
    errors.clear()


def on_app_started(callback, *, name=None):
    _add("app_started", callback, name)


def on_ui_tabs(callback, *, name=None):
    _add("ui_tabs", callback, name)


def on_ui_settings(callback, *, name=None):
    _add("ui_settings", callback, name)


def _report(callback, category):
    errors.append(f"Error executing callback {category} for {callback.script}:\n{traceback.format_exc()}")


def app_started_callback(demo, app):
    for callback in callback_map["callbacks_app_started"]:
        try:
            callback.callback(demo, app)
        except Exception:
            _report(callback, "app_started_callback")


def ui_tabs_callback():
    tabs = []
    for callback in callback_map["callbacks_ui_tabs"]:
        try:
            tabs += callback.callback() or []
        except Exception:
            _report(callback, "ui_tabs_callback")
    return tabs


def ui_settings_callback():
    for callback in callback_map["callbacks_ui_settings"]:
        try:
            callback.callback()
        except Exception:
            _report(callback, "ui_settings_callback")


def on_model_loaded(callback, *, name=None):
    _add("model_loaded", callback, name)


def model_loaded_callback(sd_model):
    for callback in callback_map["callbacks_model_loaded"]:
        try:
            callback.callback(sd_model)
        except Exception:
            _report(callback, "model_loaded_callback")
