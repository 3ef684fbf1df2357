"""A built Blocks' event listeners as one shape under Gradio 3.41 and 4.x, for the tests that drive the panels.

Gradio 3 keeps them as two parallel lists (`blocks.dependencies`: dicts of targets and trigger; `blocks.fns`:
the functions); Gradio 4 as one dict of BlockFunction objects whose targets are (block id, event) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr


@dataclass
class Event:
    key: int  # what `after` of a chained event refers to
    fn: object
    inputs: list
    outputs: list
    triggers: list[tuple[int, str]]  # (block id, event name); a `.then` has the event name "then"
    after: int | None  # the event this one is chained after with `.then`
    js: str | None

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", "fn")


def events(blocks: gr.Blocks) -> list[Event]:
    if int(gr.__version__.split(".")[0]) >= 4:
        return [
            Event(
                key,
                function.fn,
                function.inputs,
                function.outputs,
                [(block_id, trigger) for block_id, trigger in function.targets],
                function.trigger_after,
                function.js,
            )
            for key, function in blocks.fns.items()
        ]
    return [
        Event(
            index,
            function.fn,
            function.inputs,
            function.outputs,
            # Gradio 3's page load has no target: it belongs to the page.
            [(block_id, dependency["trigger"]) for block_id in dependency["targets"] or [None]],
            dependency.get("trigger_after"),
            dependency.get("js"),
        )
        for index, (function, dependency) in enumerate(zip(blocks.fns, blocks.dependencies, strict=True))
    ]
