"""backend.utils: attribute paths into a module (Forge: backend/utils.py get_attr / set_attr_raw)."""


def get_attr(obj, path):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr_raw(obj, path, value):
    *parents, last = path.split(".")
    for name in parents:
        obj = getattr(obj, name)
    setattr(obj, last, value)
