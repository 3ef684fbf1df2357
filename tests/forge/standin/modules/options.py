"""modules.options: settings and their descriptions (OptionInfo), as the Settings page shows them."""


class OptionInfo:
    def __init__(
        self,
        default=None,
        label="",
        component=None,
        component_args=None,
        onchange=None,
        section=None,
        refresh=None,
        comment_before="",
        comment_after="",
        infotext=None,
        restrict_api=False,
        category_id=None,
    ):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.category_id = category_id
        self.refresh = refresh
        self.comment_before = comment_before
        self.comment_after = comment_after
        self.infotext = infotext
        self.restrict_api = restrict_api
        self.do_not_save = False

    def info(self, text):
        self.comment_after += f"<span class='info'>({text})</span>"
        return self

    def needs_reload_ui(self):
        self.comment_after += " <span class='info'>(requires Reload UI)</span>"
        return self


def options_section(section_identifier, options_dict):
    for info in options_dict.values():
        info.section = section_identifier[:2]
        if len(section_identifier) == 3:
            info.category_id = section_identifier[2]
    return options_dict


class Options:
    """Attribute access to setting values; unknown names raise AttributeError like the WebUI's."""

    _own = ("data_labels", "data")

    def __init__(self, data_labels):
        self.data_labels = dict(data_labels)
        self.data = {key: info.default for key, info in self.data_labels.items()}

    def __setattr__(self, key, value):
        if key in Options._own:
            return super().__setattr__(key, value)
        if key in self.data_labels:
            self.data[key] = value
            return None
        return super().__setattr__(key, value)

    def __getattr__(self, item):
        if item in Options._own:
            return super().__getattribute__(item)
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        return super().__getattribute__(item)

    def add_option(self, key, info):
        self.data_labels[key] = info
        if key not in self.data:
            self.data[key] = info.default


class OptionsCategories:
    def __init__(self):
        self.mapping = {}

    def register_category(self, category_id, label):
        self.mapping.setdefault(category_id, label)
        return category_id


categories = OptionsCategories()
