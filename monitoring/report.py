"""One monitoring run per (version, window): metrics, tags, and the report artifacts.

Metrics carry the window's end as their timestamp, so the runs of one version
line up in time in the MLflow UI (filter ``tags.stageflow.version = "3"``, chart
``psi.<column>`` or ``live_accuracy``). Artifacts: ``report/report.md``,
``report/report.json`` and ``report/plots/<column>.png`` for every drifted column
(and the predictions, when they drifted).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

from monitoring import assess, labels

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
_METRIC_CHARACTERS = re.compile(r"[^\w.\- ]")


def metric_name(text: str) -> str:
    """A column name as an MLflow metric key (characters MLflow refuses become ``_``)."""
    return _METRIC_CHARACTERS.sub("_", str(text)).strip()[:200] or "_"


def metrics_of(report) -> dict[str, float]:
    """The figures of one version's window as MLflow metrics."""
    values = {
        "rows": report.rows,
        "requests": report.requests,
        "refusal_rate": report.refusal_rate,
        "flag_rate": report.flag_rate,
        "error_rate": report.error_rate,
        "drifted_columns": len(report.drifted_columns),
        "prediction_drift": float(report.prediction_drift),
        "alarms": len(report.alarm_details),
        "labelled_rows": report.labelled_rows,
    }
    if report.latency_p50_ms is not None:
        values["latency_p50_ms"] = report.latency_p50_ms
        values["latency_p99_ms"] = report.latency_p99_ms
    for column in report.columns:
        name = metric_name(column.column)
        if column.psi is not None:
            values[f"psi.{name}"] = column.psi
        if column.p_value is not None:
            values[f"p_value.{name}"] = column.p_value
    if report.prediction and report.prediction.psi is not None:
        values["prediction_psi"] = report.prediction.psi
        if report.prediction.p_value is not None:
            values["prediction_p_value"] = report.prediction.p_value
    if report.live:
        live = report.live
        values[f"live_{live.metric}"] = live.value
        values[f"live_{live.metric}_low"] = live.low
        values[f"live_{live.metric}_high"] = live.high
        if live.test_value is not None:
            values[f"test_{live.metric}"] = live.test_value
        for name, value in live.others.items():
            values[f"live_{name}"] = value
        for name, (low, high) in live.intervals.items():
            values[f"live_{name}_low"] = low
            values[f"live_{name}_high"] = high
        for name, value in live.test_others.items():
            values[f"test_{name}"] = value
    return {k: float(v) for k, v in values.items()}


def log_run(client, model: str, report, window, policy_source: str, cfg: dict) -> str:
    """Record ``report`` as a run in ``stageflow-monitoring``; its run id."""
    from mlflow.entities import Metric, RunTag  # noqa: PLC0415

    experiment_id = labels.experiment(client)
    end_ms = int(window.end.timestamp() * 1000)
    tags = {
        "stageflow.kind": assess.MONITOR_KIND,
        "stageflow.model": model,
        "stageflow.version": report.version,
        "stageflow.role": report.role,
        "stageflow.since": window.since,
        "stageflow.window_start": window.start.isoformat(),
        "stageflow.window_end": window.end.isoformat(),
        "stageflow.policy": policy_source,
        "stageflow.reference": report.reference_source,
        "stageflow.alarm": str(bool(report.alarm_details)).lower(),
        "stageflow.drifted_columns": ", ".join(report.drifted_columns)[:5000],
    }
    if assess.project_run_id():
        tags["stageflow.project_run_id"] = assess.project_run_id()
    run = client.create_run(
        experiment_id,
        start_time=end_ms,
        run_name=f"monitor-{model}-v{report.version}-{window.end:%Y%m%dT%H%M%SZ}",
        tags=tags,
    )
    run_id = run.info.run_id
    try:
        metrics = [Metric(k, v, end_ms, 0) for k, v in metrics_of(report).items()]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            client.log_batch(run_id, metrics=metrics[start : start + 1000])
        client.log_batch(run_id, tags=[RunTag("mlflow.note.content", summary(report, window))])
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / REPORT_DIR
            write_report(folder, model, report, window, policy_source, cfg)
            client.log_artifacts(run_id, str(folder), REPORT_DIR)
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id)
    return run_id


def write_report(folder: Path, model: str, report, window, policy_source: str, cfg: dict) -> None:
    """``report.md``, ``report.json`` and the plots of drifted columns into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    plots = folder / "plots"
    drawn = []
    targets = [c for c in report.columns if c.drifted]
    if report.prediction_drift:
        targets.append(report.prediction)
    for column in targets:
        if column.bins:
            plots.mkdir(exist_ok=True)
            path = plots / f"{_file_name(column.column)}.png"
            plot_column(column, path)
            drawn.append((column.column, f"plots/{path.name}"))
    document = {
        "model": model,
        "window": {"start": window.start.isoformat(), "end": window.end.isoformat()},
        "since": window.since,
        "policy": {"source": policy_source, "monitoring": cfg},
        **report.details(),
        "plots": dict(drawn),
    }
    (folder / "report.json").write_text(json.dumps(document, indent=1, ensure_ascii=False))
    (folder / "report.md").write_text(markdown(model, report, window, policy_source, cfg, drawn))


def summary(report, window) -> str:
    alarms = "; ".join(report.alarms) or "no alarms"
    return (
        f"v{report.version} ({report.role}), {window.label()}: {report.rows} rows, "
        f"{report.requests} requests; {alarms}"
    )


def markdown(model, report, window, policy_source, cfg, drawn) -> str:
    lines = [
        f"# {model} v{report.version} ({report.role}): {window.label()}",
        "",
        f"Policy: {policy_source} (min_rows {cfg['min_rows']}, drift PSI > {cfg['drift']['psi']}"
        f" and p < {cfg['drift']['p_value']}, live-metric margin "
        f"{cfg['live_metric']['margin']:.0%}). Reference: {report.reference_source}"
        + (f" ({report.reference_note})" if report.reference_note else "")
        + ".",
        "",
        "## Alarms",
        "",
        *([f"- {a}" for a in report.alarms] or ["None."]),
        "",
        "## Traffic",
        "",
        f"- rows {report.rows}, requests {report.requests}; by source "
        + ", ".join(f"{k} {v}" for k, v in sorted(report.sources.items())),
        f"- refusal rate {report.refusal_rate:.2%}, flag rate {report.flag_rate:.2%}, "
        f"error rate {report.error_rate:.2%}",
        f"- latency p50 {_ms(report.latency_p50_ms)}, p99 {_ms(report.latency_p99_ms)}",
    ]
    for kind, problems in sorted(report.problems.items()):
        listed = ", ".join(f"{p} {n}" for p, n in sorted(problems.items()))
        lines.append(f"- {kind} by problem: {listed}")
    lines += [
        "",
        "## Input drift",
        "",
        "| column | kind | rows | PSI | test | p-value | missing (ref → live) | drifted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in [*report.columns, *([report.prediction] if report.prediction else [])]:
        lines.append(
            f"| {c.column} | {c.kind} | {c.rows} | {_num(c.psi)} | {c.test or ''} | "
            f"{_num(c.p_value)} | {_num(c.reference_missing_rate)} → {_num(c.missing_rate)} | "
            f"{'**yes**' if c.drifted else c.note or 'no'} |"
        )
    lines += ["", "## Live performance", ""]
    if report.live:
        live = report.live
        lines.append(
            f"- {live.metric} {live.value:.4g} ({cfg['live_metric']['confidence']:.0%} CI "
            f"[{live.low:.4g}, {live.high:.4g}]) on {live.rows} labelled rows; "
            f"the version's test {live.metric}: {_num(live.test_value)}"
        )
        for name, value in live.others.items():
            interval = live.intervals.get(name)
            test = live.test_others.get(name)
            lines.append(
                f"- {name} {value:.4g}"
                + (f" (CI [{interval[0]:.4g}, {interval[1]:.4g}])" if interval else "")
                + (f"; test {test:.4g}" if test is not None else "")
            )
        if live.metric == "accuracy" and "log_loss" not in live.others:
            lines.append("- log loss: not computed (see the notes)")
    else:
        lines.append(f"No live metric ({report.labelled_rows} labelled rows in the window).")
    if report.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in report.notes]]
    if drawn:
        lines += ["", "## Drifted distributions", ""]
        lines += [f"![{name}]({path})" for name, path in drawn]
    return "\n".join(lines) + "\n"


def plot_column(column, path: Path) -> None:
    """Reference vs live share per bin (or category) of one column, as a PNG."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from experiments.evaluate import font_families  # noqa: PLC0415 - Hangul column names

    with plt.rc_context({"font.family": font_families()}):
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(column.bins) + 2), 4))
        positions = range(len(column.bins))
        ax.bar([p - 0.2 for p in positions], column.reference_share, width=0.4, label="reference")
        ax.bar([p + 0.2 for p in positions], column.live_share, width=0.4, label="live")
        ax.set_xticks(list(positions), column.bins, rotation=45, ha="right", fontsize="small")
        ax.set(ylabel="share of rows", title=f"{column.column}: PSI {_num(column.psi)}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)


def _file_name(text: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", str(text))[:100] or "column"


def _ms(value) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def _num(value) -> str:
    return "" if value is None else f"{value:.4g}"
