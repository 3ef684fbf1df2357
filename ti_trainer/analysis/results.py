"""A finished (or running) run read back for the artist: suggested step, warnings, charts, the image table.

Everything here reads the run's log folder only, so it works on a run trained yesterday, from the CLI or the
tab, without the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from ti_trainer.analysis import charts, early_stopping, norms
from ti_trainer.analysis.image_report import dominant
from ti_trainer.analysis.monitors import stopping_rule
from ti_trainer.analysis.run_files import RunInfo

TRAINING_TREND_WINDOW = 25  # steps averaged to show the trend of the noisy training loss


@dataclass
class RunAnalysis:
    run: RunInfo
    rule: early_stopping.StoppingRule
    suggested_step: int | None
    nearest_saved_step: int | None  # the saved copy to use for the suggestion
    stopped_early: bool
    norm_range: norms.NormRange | None
    departures: dict[int, int] = field(default_factory=dict)  # vector -> first step of its overgrowth
    last_ratio: float | None = None
    # An embedding with one set of vectors per text encoder (SDXL): each encoder's range and departures,
    # measured against its own ordinary words (norm_range and departures are then empty).
    encoder_norms: dict[str, tuple[norms.NormRange, dict[int, int]]] = field(default_factory=dict)


def analyse(run: RunInfo, rule: early_stopping.StoppingRule | None = None) -> RunAnalysis:
    """The DVAR suggestion re-read from the validation CSV (with `rule`, default: the run's own settings)."""
    rule = rule or stopping_rule(run.config)
    summary = run.summary()
    validation = run.validation_loss()
    suggested = early_stopping.first_plateau(validation.steps, validation.values, rule)
    last_ratio = early_stopping.check(validation.values, rule).ratio if validation.values else None
    saved = [step for step in run.saved_steps() if suggested is not None and step <= suggested]
    reference = norms.NormRange.from_dict(summary.get("norm_range"))
    steps, rows = run.norms()
    departures = norms.first_departures(steps, rows, reference) if reference else {}
    encoder_norms = {}
    for encoder, data in (summary.get("norm_ranges") or {}).items():
        encoder_reference = norms.NormRange.from_dict(data)
        if encoder_reference is not None:
            encoder_steps, encoder_rows = run.norms(encoder)
            found = norms.first_departures(encoder_steps, encoder_rows, encoder_reference)
            encoder_norms[encoder] = (encoder_reference, found)
    return RunAnalysis(
        run,
        rule,
        suggested,
        saved[-1] if saved else None,
        bool(summary.get("stopped_early")),
        reference,
        departures,
        last_ratio,
        encoder_norms,
    )


def summary_lines(analysis: RunAnalysis) -> list[str]:
    """What the artist should know, one point per line."""
    run, rule = analysis.run, analysis.rule
    lines = []
    saved = list(run.saved_steps())
    lines.append(
        f"Run {run.name!r}: {len(saved)} saved step(s)"
        + (f" ({', '.join(map(str, saved[:12]))}{' ...' if len(saved) > 12 else ''})." if saved else ".")
    )
    validation = run.validation_loss()
    if not validation.steps:
        lines.append("No validation loss was recorded (validation was off for this run).")
    elif analysis.suggested_step is None:
        ratio = "" if analysis.last_ratio is None else f" (latest DVAR ratio {analysis.last_ratio:.3f})"
        lines.append(
            f"Suggested step: none yet. The validation loss has not levelled off over a {rule.window_steps}-step "
            f"window{ratio}; train longer, or pick by eye in a comparison grid."
        )
    else:
        how = "training stopped there" if analysis.stopped_early else "training went on after it"
        use = ""
        if analysis.nearest_saved_step not in (None, analysis.suggested_step):
            use = f" The nearest saved copy before it is step {analysis.nearest_saved_step}."
        lines.append(
            f"Suggested step: {analysis.suggested_step}: the validation loss levelled off there "
            f"(DVAR: window {rule.window_steps} steps, threshold {rule.threshold}); {how}.{use} "
            "Check it, and the steps before it, in a comparison grid."
        )
    overbake = [("", analysis.norm_range, analysis.departures)] if analysis.norm_range else []
    overbake += [(f"{key} ", reference, found) for key, (reference, found) in analysis.encoder_norms.items()]
    for encoder, reference, departures in overbake:
        if departures:
            lines.append(
                f"Overbake warning: {encoder}{norms.describe_overgrowth(departures, reference)}. Steps after "
                "that may look harsh or swallow the subject."
            )
        else:
            lines.append(
                f"No {encoder}vector grew far past the model's ordinary words ({reference.low:.2f}-"
                f"{reference.high:.2f}; flagged past {norms.limit(reference):.2f})."
            )
    step, rows = run.image_report()
    heavy = dominant({row["image"]: float(row["gradient_share"]) for row in rows})
    if heavy:
        lines.append(
            f"At step {step}, {', '.join(heavy)} pull(s) on the embedding much harder than the rest: if its look "
            "takes over the results, consider culling it."
        )
    return lines


def loss_chart(analysis: RunAnalysis) -> Image.Image:
    """Training loss (raw and its trend) above the validation loss, with the suggested step marked."""
    run = analysis.run
    markers = []
    if analysis.suggested_step is not None:
        markers.append(charts.Marker(analysis.suggested_step, f"suggested {analysis.suggested_step}"))
    training = run.training_loss()
    top = charts.Chart(
        "Training loss: new images, noise and timesteps every step, so it is noisy",
        "loss",
        [
            charts.Series("each step", training.steps, training.values, (190, 190, 190), 1),
            charts.Series(
                f"average of {TRAINING_TREND_WINDOW} steps",
                training.steps,
                charts.moving_average(training.values, TRAINING_TREND_WINDOW),
                charts.PALETTE[0],
            ),
        ],
        markers=markers,
        empty_text="No training loss recorded yet.",
    )
    validation = run.validation_loss()
    bottom = charts.Chart(
        "Validation loss: fixed images, noise and timesteps; it moves only with the embedding",
        "loss",
        [charts.Series("fixed batch", validation.steps, validation.values, charts.PALETTE[1], dots=True)],
        markers=markers,
        empty_text="No validation loss recorded (validation was off for this run).",
    )
    return charts.stack([charts.render(top), charts.render(bottom)])


def norm_chart(analysis: RunAnalysis) -> Image.Image:
    """Each vector's length over training against the band of the model's ordinary words; with one set of
    vectors per text encoder (SDXL), one chart per encoder against that encoder's own band."""
    if analysis.encoder_norms:
        return charts.stack(
            [
                _norm_chart(analysis, f"{key} vector lengths", *analysis.run.norms(key), reference, found)
                for key, (reference, found) in analysis.encoder_norms.items()
            ]
        )
    steps, rows = analysis.run.norms()
    return _norm_chart(analysis, "Vector lengths", steps, rows, analysis.norm_range, analysis.departures)


def _norm_chart(analysis: RunAnalysis, title: str, steps, rows, reference, departures) -> Image.Image:
    series = [
        charts.Series(
            f"vector {index}",
            steps,
            [row[index] for row in rows],
            charts.PALETTE[index % len(charts.PALETTE)],
        )
        for index in range(len(rows[0]) if rows else 0)
    ]
    if len(series) > len(charts.PALETTE):  # many vectors: one legend entry would not fit, so draw them thin
        for item in series:
            item.width, item.label = 1, ""
        series[0].label = f"{len(series)} vectors"
    band = (reference.low, reference.high, "ordinary words") if reference else None
    markers = []
    if analysis.suggested_step is not None:
        markers.append(charts.Marker(analysis.suggested_step, f"suggested {analysis.suggested_step}"))
    for index, step in sorted(departures.items(), key=lambda item: item[1])[:1]:
        markers.append(charts.Marker(step, f"vector {index} overgrown", (214, 39, 40)))
    chart = charts.Chart(
        f"{title}: far above the band, the embedding overpowers prompts (overbaking)",
        "length",
        series,
        band,
        markers,
        empty_text="No vector lengths recorded yet.",
    )
    return charts.render(chart)


def image_table(run: RunInfo, step: int | None = None) -> tuple[int | None, list[list]]:
    """Rows for the per-image table, heaviest gradient share first."""
    chosen, rows = run.image_report(step)
    heavy = set(dominant({row["image"]: float(row["gradient_share"]) for row in rows}))
    table = []
    for row in sorted(rows, key=lambda r: -float(r["gradient_share"])):
        note = "pulls much harder than most: check it" if row["image"] in heavy else ""
        table.append(
            [
                row["image"],
                row["caption"],
                round(float(row["loss"]), 5),
                round(100 * float(row["gradient_share"]), 1),
                note,
            ]
        )
    return chosen, table
