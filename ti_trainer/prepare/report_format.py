"""The dataset report and the caption lint as text (CLI) and HTML (the panel): presentation only."""

from __future__ import annotations

import json
from dataclasses import asdict
from html import escape

from ti_trainer.prepare.colours import Swatch
from ti_trainer.prepare.lint import LintReport
from ti_trainer.prepare.report import DatasetReport


def report_json(report: DatasetReport, lint: LintReport | None = None) -> str:
    data = {"report": report.to_dict(), "lint": asdict(lint) if lint is not None else None}
    return json.dumps(data, indent=2)


def _swatches_text(swatches: list[Swatch]) -> str:
    return ", ".join(f"{s.name} {s.hex} {s.share:.0%}" for s in swatches)


def report_text(report: DatasetReport) -> str:
    lines = [f"Dataset {report.folder}: {report.count} images"]
    lines.append("Sizes: " + ", ".join(f"{size} x{n}" for size, n in report.sizes.items()))
    if report.smaller_than_size:
        lines.append(
            f"Smaller than {report.size}x{report.size} (enlarged in training, blurry): "
            + ", ".join(report.smaller_than_size)
        )
    lines.append("Batch x gradient accumulation that use every image each epoch:")
    lines += [f"  {plan.text(report.count)}" for plan in report.batch_plans]
    for count, batches in report.nearby_counts:
        lines.append(f"  with {count} images, batch {', '.join(map(str, batches))} would also fit")
    lines.append("Palette of the set: " + _swatches_text(report.palette))
    if report.outliers:
        lines.append("Stand out from the rest (may dominate what the embedding learns):")
        for outlier in report.outliers:
            lines += [f"  {outlier.name}: {reason}" for reason in outlier.reasons]
    else:
        lines.append("No image stands out in colour or composition.")
    if report.near_duplicates:
        lines.append("Near-duplicates (each counts double):")
        lines += [f"  {' ~ '.join(group)}" for group in report.near_duplicates]
    lines.append("Images:")
    lines += [f"  {s.name} {s.width}x{s.height}: {_swatches_text(s.colours[:3])}" for s in report.images]
    lines += [f"skipped {name}: {reason}" for name, reason in report.skipped]
    return "\n".join(lines + report.notes)


def lint_text(report: LintReport) -> str:
    if not report.findings:
        return "\n".join(["Captions: nothing to fix.", *report.notes])
    lines = [f"Captions: {len(report.findings)} findings"]
    lines += [f"  {finding.image} [{finding.kind}]: {finding.message}" for finding in report.findings]
    return "\n".join(lines + report.notes)


def _swatches_html(swatches: list[Swatch], height: int = 18) -> str:
    cells = "".join(
        f'<span title="{escape(s.name)} {s.hex} {s.share:.0%}" style="display:inline-block;'
        f'width:{max(2, round(s.share * 160))}px;height:{height}px;background:{s.hex}"></span>'
        for s in swatches
    )
    return f'<span style="display:inline-flex;border:1px solid #8884">{cells}</span>'


def report_html(report: DatasetReport) -> str:
    parts = [f"<h3>{report.count} images in {escape(report.folder)}</h3>"]
    parts.append(
        "<p>Sizes: " + escape(", ".join(f"{size} ×{n}" for size, n in report.sizes.items())) + "</p>"
    )
    if report.smaller_than_size:
        parts.append(
            f"<p><b>Smaller than {report.size}×{report.size}</b> (blurry when enlarged): "
            f"{escape(', '.join(report.smaller_than_size))}</p>"
        )
    plans = "".join(f"<li>{escape(plan.text(report.count))}</li>" for plan in report.batch_plans)
    nearby = "".join(
        f"<li>with {count} images, batch {escape(', '.join(map(str, batches)))} would also fit</li>"
        for count, batches in report.nearby_counts
    )
    parts.append(
        f"<p>Batch × gradient accumulation that use every image each epoch:</p><ul>{plans}{nearby}</ul>"
    )
    parts.append(f"<p>Palette of the set: {_swatches_html(report.palette, 24)}</p>")
    if report.outliers:
        items = "".join(
            f"<li><b>{escape(o.name)}</b>: {escape('; '.join(o.reasons))}</li>" for o in report.outliers
        )
        parts.append(
            f"<p><b>Stand out from the rest</b> (may dominate what the embedding learns):</p><ul>{items}</ul>"
        )
    else:
        parts.append("<p>No image stands out in colour or composition.</p>")
    if report.near_duplicates:
        items = "".join(f"<li>{escape(' ~ '.join(group))}</li>" for group in report.near_duplicates)
        parts.append(f"<p><b>Near-duplicates</b> (each counts double):</p><ul>{items}</ul>")
    rows = "".join(
        f"<tr><td>{escape(s.name)}</td><td>{s.width}×{s.height}</td><td>{_swatches_html(s.colours)}</td></tr>"
        for s in report.images
    )
    parts.append(f"<table><tr><th>image</th><th>size</th><th>colours</th></tr>{rows}</table>")
    if report.skipped:
        items = "".join(f"<li>{escape(name)}: {escape(reason)}</li>" for name, reason in report.skipped)
        parts.append(f"<p>Skipped:</p><ul>{items}</ul>")
    parts += [f"<p>{escape(note)}</p>" for note in report.notes]
    return "\n".join(parts)
