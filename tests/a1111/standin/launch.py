"""The WebUI's `launch` module as install.py sees it: `is_installed` and `run_pip`. The tests set `installed`
and read `pip_calls`; nothing is installed or downloaded."""

installed = set()
pip_calls = []


def is_installed(package):
    return package in installed


def run_pip(command, desc=None, live=False):
    pip_calls.append((command, desc))
