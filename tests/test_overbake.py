"""The overbake rule (analysis/norms.py): only vectors far LONGER than the model's ordinary words, and than
their own start, for several checks in a row; each vector's own first step. Live (NormMonitor) and afterwards
(`analyze`) give the same verdict."""

from __future__ import annotations

from ti_trainer.analysis import norms
from ti_trainer.analysis.monitors import NormMonitor
from ti_trainer.analysis.results import analyse, summary_lines
from ti_trainer.analysis.run_files import RunInfo
from ti_trainer.embeddings.create import create_embedding
from ti_trainer.training.loop import TrainingHooks, train

RANGE = norms.NormRange(low=0.8, median=1.0, high=1.2, source="test")
FAR = 3 * RANGE.high  # clearly past MARGIN x the top


def flagged(rows: list[list[float]], steps: list[int] | None = None) -> dict[int, int]:
    return norms.first_departures(steps or [10 * i for i in range(len(rows))], rows, RANGE)


def test_a_vector_that_grows_far_past_the_range_is_flagged_from_its_own_first_step():
    rows = [[1.0, 1.0], [1.1, 1.1], [FAR, 1.1], [FAR, FAR], [FAR, FAR], [FAR, FAR]]
    assert flagged(rows) == {0: 20, 1: 30}


def test_vectors_below_the_range_are_never_flagged():
    # Zero-initialised vectors start (and may stay) below the ordinary words: weak, not overbaked.
    rows = [[0.0, 0.0], [0.01, 0.3], [0.02, 0.5], [0.03, 0.6], [0.05, 0.7]]
    assert flagged(rows) == {}


def test_just_above_the_top_of_the_range_is_not_overbaking():
    rows = [[1.0], *([[RANGE.high * (norms.MARGIN - 0.05)]] * 6)]
    assert flagged(rows) == {}


def test_a_vector_that_starts_long_is_not_flagged_for_where_it_started():
    start = 2 * norms.MARGIN * RANGE.high  # initialised from an unusually long token
    rows = [[start], [start * 1.1], [start * 1.2], [start * 1.1], [start * 1.3]]
    assert flagged(rows) == {}
    assert flagged([[start], *([[start * norms.GROWTH * 1.1]] * 3)]) == {0: 10}


def test_one_long_reading_is_not_enough_and_a_broken_streak_starts_over():
    needed = norms.CONSECUTIVE_CHECKS
    assert flagged([[1.0], *([[FAR]] * (needed - 1))]) == {}
    rows = [[1.0], [FAR], [FAR], [1.0], *([[FAR]] * needed)]
    assert flagged(rows) == {0: 40}  # the streak that held, not the first spike


def run_with_norm_monitor(make_config, backend, **overrides):
    events = []
    config = make_config(validate_every=0, save_every=1, **overrides)
    monitor = NormMonitor(every_steps=1, on_message=events.append)
    result = train(
        config,
        backend,
        TrainingHooks(on_message=lambda text: None, on_step=events.append, monitors=[monitor]),
    )
    return result, events


def test_an_ordinary_run_from_zero_vectors_does_not_warn(make_config, backend, tmp_path):
    create_embedding(backend, "zeros", "", 2, tmp_path / "embeddings")
    result, events = run_with_norm_monitor(
        make_config, backend, name="zeros", create=False, learn_rate="0.005"
    )
    assert not [event for event in events if isinstance(event, str)]
    analysis = analyse(RunInfo.open(result.log_folder))
    assert analysis.departures == {}
    assert not any("Overbake" in line for line in summary_lines(analysis))


def test_a_run_whose_vectors_blow_up_is_warned_about_and_analyze_agrees(make_config, backend):
    result, events = run_with_norm_monitor(make_config, backend, learn_rate="0.2", max_steps=8)
    warnings = [event for event in events if isinstance(event, str)]
    assert warnings, "vectors many times longer than any word must be flagged"
    assert all("may be overbaking" in warning for warning in warnings)
    steps_before = [event.step for event in events[: events.index(warnings[0])] if not isinstance(event, str)]
    assert steps_before[-1] >= norms.CONSECUTIVE_CHECKS  # never at the first check after the start

    analysis = analyse(RunInfo.open(result.log_folder))
    assert analysis.departures, "analyze reads the same rule from the CSV"
    for index, step in analysis.departures.items():
        assert f"vector {index} from step {step}" in " ".join(warnings)
    assert any(line.startswith("Overbake warning: vector") for line in summary_lines(analysis))
    # The command it suggests renders with the run's own (built-in) model: no --model needed.
    assert f"python -m ti_trainer compare {result.log_folder})" in warnings[0]


def test_the_suggested_compare_command_names_the_model_only_when_it_is_not_built_in(tmp_path):
    from ti_trainer.backends.loading import TINY, TINY_SDXL, built_in_model, compare_command

    assert built_in_model("tiny-sd2-v") == (TINY, "v") and built_in_model("tiny-sd1-eps") == (TINY, "eps")
    assert built_in_model("tiny-sdxl") == (TINY_SDXL, None)
    assert built_in_model("animeXL_v3") is None and built_in_model(None) is None
    assert compare_command(tmp_path, "tiny-sdxl") == f"python -m ti_trainer compare {tmp_path}"
    assert compare_command(tmp_path, "animeXL_v3") == (
        f"python -m ti_trainer compare {tmp_path} --model <your animeXL_v3 checkpoint>"
    )
