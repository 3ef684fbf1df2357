"""Learning-rate / clip-value schedules: A1111's syntax and semantics (reference/a1111.md §1.6), and messages
that quote a valid example for strings that are not schedules."""

from __future__ import annotations

import pytest

from ti_trainer.errors import UserError
from ti_trainer.training.schedule import EXAMPLE, parse_schedule


def a1111_rate_at(text: str, max_steps: int, step: int, cur_step: int = 0) -> float | None:
    """What A1111's LearnRateScheduler sets for the optimizer step taken when `step` steps are done.

    Written from §1.6: items `rate:step` with step > cur_step give (rate, min(step, max_steps)) and parsing stops
    once step > max_steps; `rate:-1` and a bare rate run to max_steps and stop parsing; items at or before
    cur_step are skipped. The scheduler starts at the first pair and moves to the next one when
    step >= its end step; past the last pair training is finished (None).
    """
    pairs = []
    for item in text.split(","):
        if not item.strip():
            continue
        rate, _, end = item.partition(":")
        if end:
            end_step = int(end)
            if end_step > cur_step:
                pairs.append((float(rate), min(end_step, max_steps)))
                if end_step > max_steps:
                    break
            elif end_step == -1:
                pairs.append((float(rate), max_steps))
                break
        else:
            pairs.append((float(rate), max_steps))
            break
    index = 0
    while step >= pairs[index][1]:
        index += 1
        if index == len(pairs):
            return None
    return pairs[index][0]


def rates(schedule, steps) -> list[float]:
    return [schedule.value_at(step) for step in steps]


def test_the_documented_example():
    schedule = parse_schedule("0.005:100, 1e-3:1000, 1e-5", max_steps=3000)
    assert rates(schedule, [0, 99, 100, 999, 1000, 2999]) == [0.005, 0.005, 1e-3, 1e-3, 1e-5, 1e-5]
    assert schedule.end_step == 3000


def test_a_single_rate_lasts_until_max_steps():
    schedule = parse_schedule("0.005", max_steps=500)
    assert rates(schedule, [0, 250, 499]) == [0.005] * 3
    assert schedule.end_step == 500


def test_minus_one_runs_to_max_steps():
    schedule = parse_schedule("0.01:10, 0.002:-1", max_steps=300)
    assert rates(schedule, [0, 9, 10, 299]) == [0.01, 0.01, 0.002, 0.002]
    assert schedule.end_step == 300


def test_a_schedule_ending_before_max_steps_ends_training_there():
    schedule = parse_schedule("0.005:100, 1e-3:250", max_steps=1000)
    assert schedule.end_step == 250
    assert rates(schedule, [0, 100, 249]) == [0.005, 1e-3, 1e-3]


def test_steps_past_max_steps_are_cut_to_max_steps():
    schedule = parse_schedule("0.005:100, 1e-3:1000, 1e-5", max_steps=400)
    assert schedule.end_step == 400
    assert rates(schedule, [99, 100, 399]) == [0.005, 1e-3, 1e-3]
    assert parse_schedule("0.005:100, 1e-3:1000, 1e-5", max_steps=60).end_step == 60


@pytest.mark.parametrize(
    ("text", "max_steps"),
    [
        ("0.005:100, 1e-3:1000, 1e-5", 3000),
        ("0.005:100, 1e-3:1000, 1e-5", 400),
        ("0.01:10, 0.002:-1", 50),
        ("0.05:3, 0.04:7, 0.03:8, 0.02", 20),
        ("0.005:100, 1e-3:250", 1000),
        (" 0.005 : 100 ,, 1e-3 ", 200),
    ],
)
def test_every_step_matches_a1111_from_a_fresh_start_and_from_any_resume(text, max_steps):
    schedule = parse_schedule(text, max_steps)
    for step in range(schedule.end_step):
        assert schedule.value_at(step) == a1111_rate_at(text, max_steps, step), step
    # A1111 stops when the pairs run out; our loop stops at end_step: the same step.
    assert a1111_rate_at(text, max_steps, schedule.end_step) is None
    for resume_at in range(0, schedule.end_step, 3):  # a resumed run parses again with cur_step
        for step in range(resume_at, schedule.end_step):
            assert schedule.value_at(step) == a1111_rate_at(text, max_steps, step, cur_step=resume_at)


def test_parsing_is_a_pure_function_of_the_text():
    first = parse_schedule("0.005:100, 1e-3:1000, 1e-5", 2000)
    again = parse_schedule("0.005:100, 1e-3:1000, 1e-5", 2000)
    assert first == again
    assert first.value_at(1500) == again.value_at(1500) == 1e-5


def assert_refused_with_example(text: str, *quoted: str, max_steps: int = 1000) -> str:
    with pytest.raises(UserError) as raised:
        parse_schedule(text, max_steps)
    message = str(raised.value)
    assert EXAMPLE in message
    for part in quoted:
        assert part in message
    # The example the message quotes must itself be valid.
    parse_schedule(EXAMPLE, max_steps)
    return message


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("abc", ["abc"]),
        ("0.005:x", ["0.005:x"]),
        (":100", [":100"]),
        ("0.005:100, oops", ["oops"]),
        ("0.005:100:200", ["0.005:100:200"]),
        ("0.005:1.5", ["0.005:1.5"]),
        ("-0.005", ["-0.005"]),
        ("0", ["0"]),
        ("0.005:-5", ["0.005:-5"]),
        ("0.005:0", ["0.005:0"]),
        ("nan", ["nan"]),
        ("inf:100", ["inf"]),
        ("0.005:100, 1e-3:50", ["50"]),
        ("0.005:100, 1e-3:100", ["100"]),
    ],
)
def test_unparsable_schedules_are_refused_with_a_valid_example(text, quoted):
    assert_refused_with_example(text, *quoted)


@pytest.mark.parametrize("text", ["0.01:10, 0.002:-1, 0.5:2000", "0.005, 1e-3:1000", "1e-3, 1e-4"])
def test_items_after_one_that_runs_to_the_end_are_refused(text):
    """A1111 silently drops them; we say so, since the artist evidently meant them to apply."""
    assert_refused_with_example(text, "runs to the end")


def test_mistakes_past_max_steps_are_still_reported():
    assert parse_schedule("0.005:100, 1e-3:1000", max_steps=50).end_step == 50
    assert_refused_with_example("0.005:100, 1e-3:1000, abc", "abc", max_steps=50)
    assert_refused_with_example("0.005:100, 1e-3:1000, 1e-4:500", "500", max_steps=50)


@pytest.mark.parametrize("text", ["", "   ", ",", " , ,", None])
def test_an_empty_schedule_is_refused_with_a_valid_example(text):
    message = assert_refused_with_example(text)
    assert "empty" in message


def test_the_message_names_what_is_being_scheduled():
    with pytest.raises(UserError, match="gradient clip"):
        parse_schedule("abc", 100, what="gradient clip value")


def test_max_steps_must_be_positive():
    with pytest.raises(UserError, match="Max steps"):
        parse_schedule("0.005", max_steps=0)
