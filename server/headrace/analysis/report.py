"""Reports of backtests and drift: a JSON summary, Markdown, and an HTML page with PNG plots.

Plots are drawn with matplotlib's object API onto Agg canvases (no display, no global pyplot
state) from the bounded samples the comparisons keep.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from headrace.analysis.comparison import Comparison, LatencySample, OutputComparison
from headrace.analysis.drift import FeatureDrift, FeatureProfile

SUMMARY_FILE = "summary.json"
MARKDOWN_FILE = "report.md"
HTML_FILE = "report.html"


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)


def error_histogram(output: OutputComparison, path: Path) -> None:
    pairs = output.pairs.items
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    errors = pairs[:, 1] - pairs[:, 0] if len(pairs) else np.empty(0)
    if len(errors) and np.ptp(errors) > 0:
        axes.hist(errors, bins=50, color="#4472c4")
    else:
        axes.hist(errors, bins=1, color="#4472c4")
    # Errors that are all about one value (a shifted output) read better as plain numbers
    # than as matplotlib's "1e-5+5" offset notation.
    axes.ticklabel_format(axis="x", useOffset=False)
    axes.set_title(f"{output.name}: candidate - captured")
    axes.set_xlabel("error")
    axes.set_ylabel("elements (sample)")
    _save(figure, path)


def scatter(output: OutputComparison, path: Path) -> None:
    pairs = output.pairs.items
    figure = Figure(figsize=(5, 5))
    axes = figure.add_subplot()
    if len(pairs):
        axes.scatter(pairs[:, 0], pairs[:, 1], s=4, alpha=0.5, color="#4472c4")
        low, high = float(pairs.min()), float(pairs.max())
        axes.plot([low, high], [low, high], color="#c00000", linewidth=1, label="equal")
        axes.legend(loc="upper left")
    axes.set_title(f"{output.name}: captured vs candidate")
    axes.set_xlabel("captured")
    axes.set_ylabel("candidate")
    _save(figure, path)


def latency_distribution(
    captured: LatencySample, candidate: LatencySample, path: Path, labels: Sequence[str]
) -> None:
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    samples = [captured.reservoir.items * 1e3, candidate.reservoir.items * 1e3]
    values = np.concatenate(samples) if any(len(sample) for sample in samples) else np.empty(0)
    if len(values):
        positive = values[values > 0]
        low = float(positive.min()) if len(positive) else 1e-3
        high = max(float(values.max()), low * 10)
        bins = np.geomspace(low, high, 50).tolist()
        for sample, label in zip(samples, labels, strict=True):
            if len(sample):
                axes.hist(np.maximum(sample, low), bins=bins, alpha=0.6, label=label)
        axes.set_xscale("log")
        axes.legend()
    axes.set_title("latency")
    axes.set_xlabel("ms (log scale)")
    axes.set_ylabel("calls (sample)")
    _save(figure, path)


def feature_histogram(feature: FeatureProfile, name: str, current: np.ndarray, path: Path) -> None:
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    reference = np.asarray(feature.sample)
    both = np.concatenate([reference, current]) if len(current) else reference
    low, high = float(both.min()), float(both.max())
    bins = np.linspace(low, high, 41).tolist() if high > low else [low - 0.5, low + 0.5]
    axes.hist(reference, bins=bins, density=True, alpha=0.6, label="reference")
    if len(current):
        axes.hist(current, bins=bins, density=True, alpha=0.6, label="current")
    axes.set_title(name)
    axes.set_ylabel("density")
    axes.legend()
    _save(figure, path)


def _image(label: str, file: str) -> str:
    return (
        f"<img src='{html.escape(file)}' alt='{html.escape(label)}' title='{html.escape(label)}'>"
    )


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_number(value) for value in row) + " |" for row in rows]
    return lines


def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_number(value))}</td>" for value in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
    "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}"
    "th{background:#eee}img{max-width:48%;margin:4px}.fail{color:#c00000}.pass{color:#2e7d32}"
)

OUTPUT_HEADER = (
    "output",
    "kind",
    "calls",
    "shape mismatches",
    "mean abs error",
    "max abs error",
    "mean rel error",
    "max rel error",
    "equal share",
    "agreement",
)
LATENCY_HEADER = ("", "mean ms", "p50 ms", "p90 ms", "p99 ms", "max ms")


def write_backtest_report(
    summary: Mapping[str, Any],
    comparison: Comparison,
    directory: Path,
    latency_labels: Sequence[str] = ("captured", "candidate"),
) -> dict[str, Path]:
    """Write summary.json, report.md, report.html and the plots; returns the files by kind."""
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    plots: list[tuple[str, str]] = []
    for name, output in comparison.outputs.items():
        if output.kind != "numeric":
            continue
        histogram = directory / f"error_{_file_name(name)}.png"
        error_histogram(output, histogram)
        points = directory / f"scatter_{_file_name(name)}.png"
        scatter(output, points)
        plots += [(f"{name} error histogram", histogram.name), (f"{name} scatter", points.name)]
    latency = directory / "latency.png"
    latency_distribution(
        comparison.captured_latency, comparison.candidate_latency, latency, latency_labels
    )
    plots.append(("latency distribution", latency.name))

    files["json"] = directory / SUMMARY_FILE
    files["json"].write_text(json.dumps(summary, indent=1, default=str) + "\n")

    output_rows = [
        [
            name,
            entry["kind"],
            entry["calls"],
            entry["shape_mismatches"],
            entry["mean_abs_error"],
            entry["max_abs_error"],
            entry["mean_rel_error"],
            entry["max_rel_error"],
            entry["equal_share"],
            entry["agreement"],
        ]
        for name, entry in summary["outputs"].items()
    ]
    latency_rows = [
        [label, *summary["latency"][key].values()]
        for label, key in zip(latency_labels, ("captured", "candidate"), strict=True)
    ]
    verdict = "PASSED" if summary["passed"] else "FAILED"
    title = f"Backtest of {summary.get('model', '')}: {verdict}"
    facts = [
        ("captures", summary.get("captures")),
        ("candidate", summary.get("candidate")),
        ("calls compared", summary["calls"]),
        ("failed calls", sum(summary["failures"].values())),
        ("wall time s", summary.get("wall_s")),
        ("calls per s", summary.get("calls_per_s")),
    ]
    markdown = [f"# {title}", ""]
    markdown += [f"- {label}: {_number(value)}" for label, value in facts]
    markdown += ["", "## Outputs", "", *_markdown_table(OUTPUT_HEADER, output_rows)]
    markdown += ["", "## Latency", "", *_markdown_table(LATENCY_HEADER, latency_rows)]
    markdown += ["", "## Thresholds", ""]
    markdown += [f"- {key}: {_number(value)}" for key, value in summary["thresholds"].items()]
    markdown += [f"- violation: {problem}" for problem in summary["violations"]] or ["- all held"]
    markdown += ["", "## Plots", ""] + [f"![{label}]({file})" for label, file in plots]
    files["markdown"] = directory / MARKDOWN_FILE
    files["markdown"].write_text("\n".join(markdown) + "\n")

    css_class = "pass" if summary["passed"] else "fail"
    page = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Backtest of {html.escape(str(summary.get('model', '')))}: "
        f"<span class='{css_class}'>{verdict}</span></h1>",
        "<ul>"
        + "".join(
            f"<li>{html.escape(label)}: {html.escape(_number(value))}</li>"
            for label, value in facts
        )
        + "</ul>",
        "<h2>Outputs</h2>",
        _html_table(OUTPUT_HEADER, output_rows),
        "<h2>Latency</h2>",
        _html_table(LATENCY_HEADER, latency_rows),
        "<h2>Thresholds</h2><ul>"
        + "".join(f"<li>{html.escape(problem)}</li>" for problem in summary["violations"])
        + ("" if summary["violations"] else "<li>all held</li>")
        + "</ul>",
        "<h2>Plots</h2>",
        *(_image(label, file) for label, file in plots),
        "</body></html>",
    ]
    files["html"] = directory / HTML_FILE
    files["html"].write_text("\n".join(page) + "\n")
    return files


DRIFT_HEADER = (
    "feature",
    "PSI",
    "KS",
    "reference mean",
    "current mean",
    "reference std",
    "current std",
    "current rows",
    "drifted",
)


def write_drift_report(
    model: str,
    drifts: Sequence[FeatureDrift],
    features: Mapping[str, FeatureProfile],
    current: Mapping[str, np.ndarray],
    directory: Path,
    psi_threshold: float,
) -> dict[str, Path]:
    """Write summary.json, report.md, report.html and one histogram per feature."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    entries: list[dict[str, Any]] = []
    plots = []
    for drift in drifts:
        drifted = not math.isnan(drift.psi) and drift.psi > psi_threshold
        rows.append(
            [
                drift.feature,
                drift.psi,
                drift.ks,
                drift.reference_mean,
                drift.current_mean,
                drift.reference_std,
                drift.current_std,
                drift.current_count,
                "yes" if drifted else "no",
            ]
        )
        entries.append(
            {
                "feature": drift.feature,
                "psi": drift.psi,
                "ks": drift.ks,
                "reference_mean": drift.reference_mean,
                "current_mean": drift.current_mean,
                "reference_std": drift.reference_std,
                "current_std": drift.current_std,
                "current_rows": drift.current_count,
                "drifted": drifted,
            }
        )
        plot = directory / f"feature_{_file_name(drift.feature)}.png"
        feature_histogram(features[drift.feature], drift.feature, current[drift.feature], plot)
        plots.append((drift.feature, plot.name))
    drifted_features = [str(entry["feature"]) for entry in entries if entry["drifted"]]
    summary = {
        "model": model,
        "psi_threshold": psi_threshold,
        "features": entries,
        "drifted": drifted_features,
    }
    files = {"json": directory / SUMMARY_FILE}
    files["json"].write_text(json.dumps(summary, indent=1) + "\n")
    title = f"Drift of {model}"
    markdown = [f"# {title}", "", f"PSI threshold {psi_threshold:g}; drifted: "]
    markdown[-1] += ", ".join(drifted_features) or "none"
    markdown += ["", *_markdown_table(DRIFT_HEADER, rows), ""]
    markdown += [f"![{label}]({file})" for label, file in plots]
    files["markdown"] = directory / MARKDOWN_FILE
    files["markdown"].write_text("\n".join(markdown) + "\n")
    page = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        f"<p>PSI threshold {psi_threshold:g}; drifted: "
        f"{html.escape(', '.join(drifted_features) or 'none')}</p>",
        _html_table(DRIFT_HEADER, rows),
        *(_image(label, file) for label, file in plots),
        "</body></html>",
    ]
    files["html"] = directory / HTML_FILE
    files["html"].write_text("\n".join(page) + "\n")
    return files
