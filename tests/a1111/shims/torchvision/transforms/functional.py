"""Imported by open_clip's transform module as `F`; nothing in it is called by the tests."""
