"""Learning-rate and clip-value schedules in A1111's syntax (reference/a1111.md §1.6).

`"0.005:100, 1e-3:1000, 1e-5"` means 0.005 for the first 100 steps, 1e-3 until step 1000, then 1e-5 until
max steps. `rate:-1` runs to max steps. A schedule whose last item ends before max steps ends training there.
The rate is a pure function of the step, so a resumed run needs nothing but its step number.
"""

from __future__ import annotations

from dataclasses import dataclass

from ti_trainer.errors import UserError

EXAMPLE = "0.005:100, 1e-3:1000, 1e-5"


@dataclass(frozen=True)
class Schedule:
    """Pieces of `(value, end_step)`: `value` applies to steps with index `< end_step` (0-based)."""

    pieces: tuple[tuple[float, int], ...]
    text: str

    @property
    def end_step(self) -> int:
        return self.pieces[-1][1]

    def value_at(self, step_index: int) -> float:
        """The value for the optimizer step with 0-based index `step_index` (i.e. after `step_index` steps)."""
        for value, end in self.pieces:
            if step_index < end:
                return value
        return self.pieces[-1][0]


def parse_schedule(text: str, max_steps: int, what: str = "learning rate") -> Schedule:
    """Parse A1111's schedule syntax, or raise UserError quoting the bad part and a valid example."""
    if max_steps < 1:
        raise UserError(f"Max steps must be at least 1 (got {max_steps}).")
    items = [item.strip() for item in str(text or "").split(",") if item.strip()]
    if not items:
        raise UserError(
            f"The {what} is empty. Write a number such as 0.005, or a schedule such as {EXAMPLE}."
        )
    # Read every item first, so a mistake is reported even where training would stop before reaching it.
    items_read: list[tuple[float, int | None]] = []
    previous_end = 0
    for index, item in enumerate(items):
        rate_text, _, step_text = item.partition(":")
        value = _number(rate_text, item, what)
        if value <= 0:
            raise UserError(f"The {what} {item!r} must be greater than 0. Example: {EXAMPLE}")
        end = _step(step_text, item, what) if step_text.strip() else None
        if end in (None, -1):
            if index != len(items) - 1:
                raise UserError(
                    f"In the {what} schedule {text!r}, {item!r} runs to the end, so nothing may follow it. "
                    f"Example: {EXAMPLE}"
                )
            end = None
        elif end <= previous_end:
            raise UserError(
                f"In the {what} schedule {text!r}, step {end} in {item!r} does not come after step {previous_end}. "
                f"Steps must increase, e.g. {EXAMPLE}"
            )
        else:
            previous_end = end
        items_read.append((value, end))
    pieces: list[tuple[float, int]] = []
    for value, end in items_read:
        pieces.append((value, max_steps if end is None else min(end, max_steps)))
        if end is None or end >= max_steps:
            break
    return Schedule(tuple(pieces), str(text))


def _number(text: str, item: str, what: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise UserError(
            f"Could not read the {what} {item!r}: {text.strip()!r} is not a number. "
            f"Write a number such as 0.005, or a schedule such as {EXAMPLE}"
        ) from None
    if value != value or value in (float("inf"), float("-inf")):
        raise UserError(f"The {what} {item!r} is not a finite number. Example: {EXAMPLE}")
    return value


def _step(text: str, item: str, what: str) -> int:
    try:
        step = int(text.strip())
    except ValueError:
        raise UserError(
            f"Could not read the {what} {item!r}: after ':' comes the step it lasts until, a whole number "
            f"(or -1 for 'until the end'). Example: {EXAMPLE}"
        ) from None
    if step < 1 and step != -1:
        raise UserError(f"The step in {item!r} must be a positive whole number or -1. Example: {EXAMPLE}")
    return step
