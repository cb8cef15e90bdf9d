"""Monitoring that ships with the manifests: Prometheus alert rules (a prometheus-operator ``PrometheusRule``)
and a Grafana dashboard (JSON, also as a ConfigMap the Grafana sidecar picks up).

Every expression names metrics the server exports: Triton's ``nv_inference_*`` counters and latency
summaries (``--metrics-config summary_latencies=true``, serving.triton_args) and the models' ``textclf_*``
(serving/models/metrics.py; docs/METRICS.md). The label-mix and confidence alerts compare live traffic with
the ``textclf_baseline_*`` gauges each model exports from the baseline its build wrote (exporter: the eval
set's label shares and mean top-1 probability), so a new model version brings its own baseline.
``python -m serving manifests`` writes them as ``prometheusrule.yaml`` and ``grafana-dashboard.yaml``;
serving/deploy/k8s/monitoring/ holds the plain files (a Prometheus rules file and the dashboard JSON, for a
Prometheus or Grafana outside the operator), rendered by ``python -m serving.manifests.monitoring`` (a test
keeps them current).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from pathlib import Path

from serving.manifests.config import ManifestConfig

DASHBOARD_UID = "textclf-serving"
DASHBOARD_FILE = "textclf-dashboard.json"
RULES_FILE = "textclf-rules.yaml"
_RATE = "5m"  # the dashboard's and the fast alerts' window
_SHIFT = "1h"  # the label-mix and confidence windows: long enough for a stable mix


@dataclass(frozen=True)
class AlertThresholds:
    """When the alerts fire (docs/METRICS.md explains each)."""

    error_ratio: float = 0.01  # failed / all requests over 5 min
    p99_latency_ms: float = 500.0  # Triton's p99 request latency, per model
    queue_ms: float = 50.0  # mean queue time per request over 5 min
    label_share_shift: float = 0.15  # |live share - baseline share| of any label, over 1 h
    confidence_shift: float = 0.10  # |live mean top-1 probability - baseline| over 1 h
    min_rows: int = 200  # rows in the hour before a shift alert may fire


def _sum_rate(metric: str, by: str = "model", window: str = _RATE, selector: str = "") -> str:
    return f"sum by ({by}) (rate({metric}{selector}[{window}]))"


# recording rules: name -> expression (per model; label share also per label)
RECORDS = {
    "textclf:request_error_ratio:rate5m": (
        f"{_sum_rate('nv_inference_request_failure')} / clamp_min({_sum_rate('nv_inference_request_failure')} + "
        f"{_sum_rate('nv_inference_request_success')}, 1e-9)"),
    "textclf:queue_us_per_request:rate5m": (
        f"{_sum_rate('nv_inference_queue_duration_us')} / clamp_min({_sum_rate('nv_inference_request_success')}, "
        "1e-9)"),
    "textclf:label_share:rate1h": (
        f"{_sum_rate('textclf_predictions_total', 'model, label', _SHIFT)} / ignoring (label) group_left "
        f"clamp_min({_sum_rate('textclf_rows_total', 'model', _SHIFT)}, 1e-9)"),
    "textclf:confidence_mean:rate1h": (
        f"{_sum_rate('textclf_confidence_sum', 'model', _SHIFT)} / "
        f"clamp_min({_sum_rate('textclf_confidence_count', 'model', _SHIFT)}, 1e-9)"),
    "textclf:rows:increase1h": f"sum by (model) (increase(textclf_rows_total[{_SHIFT}]))",
}


def _alert(name: str, expr: str, duration: str, severity: str, summary: str) -> dict[str, Any]:
    return {"alert": name, "expr": expr, "for": duration, "labels": {"severity": severity},
            "annotations": {"summary": summary, "runbook": "docs/METRICS.md#alerts"}}


def alert_rules(t: AlertThresholds = AlertThresholds()) -> list[dict[str, Any]]:
    """The alerts, on the recording rules and the baseline gauges."""
    enough = f"and on (model) (textclf:rows:increase1h > {t.min_rows})"
    return [
        _alert("TextclfErrorRatioHigh", f"textclf:request_error_ratio:rate5m > {t.error_ratio}", "5m", "critical",
               "{{ $labels.model }}: {{ $value | humanizePercentage }} of requests fail"),
        _alert("TextclfP99LatencyHigh",
               f'max by (model) (nv_inference_request_summary_us{{quantile="0.99"}}) > {t.p99_latency_ms * 1000:g}',
               "10m", "warning", "{{ $labels.model }}: p99 request latency {{ $value }} us"),
        _alert("TextclfQueueTimeHigh", f"textclf:queue_us_per_request:rate5m > {t.queue_ms * 1000:g}", "5m",
               "warning", "{{ $labels.model }}: requests wait {{ $value }} us in the queue (scale out)"),
        _alert("TextclfLabelMixShift",
               f"abs(textclf:label_share:rate1h - on (model, label) max by (model, label) "
               f"(textclf_baseline_label_share)) > {t.label_share_shift} {enough}", "30m", "warning",
               "{{ $labels.model }}: label {{ $labels.label }} share is {{ $value }} off its build baseline"),
        _alert("TextclfConfidenceShift",
               f"abs(textclf:confidence_mean:rate1h - on (model) max by (model) "
               f"(textclf_baseline_confidence_mean)) > {t.confidence_shift} {enough}", "30m", "warning",
               "{{ $labels.model }}: mean confidence is {{ $value }} off its build baseline"),
    ]


def rule_groups(t: AlertThresholds = AlertThresholds()) -> list[dict[str, Any]]:
    """Prometheus rule groups (the ``groups`` of a rules file or a PrometheusRule's spec)."""
    return [{"name": "textclf.records", "interval": "1m",
             "rules": [{"record": name, "expr": expr} for name, expr in RECORDS.items()]},
            {"name": "textclf.alerts", "rules": alert_rules(t)}]


def prometheus_rule(config: ManifestConfig, t: AlertThresholds = AlertThresholds()) -> dict[str, Any]:
    """The prometheus-operator PrometheusRule (labelled like the ServiceMonitor, so the same Prometheus
    selects it)."""
    from serving.manifests.objects import _meta

    meta = _meta(config, f"{config.name}-textclf")
    meta["labels"].update(config.service_monitor_labels)
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": meta,
            "spec": {"groups": rule_groups(t)}}


def _panel(title: str, exprs: dict[str, str], x: int, y: int, unit: str = "short", w: int = 12) -> dict[str, Any]:
    targets = [{"expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i),
                "datasource": {"type": "prometheus", "uid": "${datasource}"}}
               for i, (legend, expr) in enumerate(exprs.items())]
    return {"type": "timeseries", "title": title, "gridPos": {"h": 8, "w": w, "x": x, "y": y},
            "datasource": {"type": "prometheus", "uid": "${datasource}"}, "targets": targets,
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []}}


def _panels() -> list[tuple[str, dict[str, str], str]]:
    m = '{model=~"$model"}'
    return [
        ("Requests / s", {"{{model}} ok": _sum_rate("nv_inference_request_success", selector=m),
                          "{{model}} failed": _sum_rate("nv_inference_request_failure", selector=m)}, "reqps"),
        ("Texts / s", {"{{model}}": _sum_rate("textclf_rows_total", selector=m)}, "short"),
        ("Request latency (Triton summary)", {
            f"{{{{model}}}} p{q}": f'max by (model) (nv_inference_request_summary_us{{model=~"$model",quantile="0.{q}"}})'
            for q in ("5", "9", "99")}, "µs"),
        ("Queue time per request", {"{{model}}": f"{_sum_rate('nv_inference_queue_duration_us', selector=m)} / "
                                                 f"clamp_min({_sum_rate('nv_inference_request_success', selector=m)}, 1e-9)"},
         "µs"),
        ("Label mix (live vs build baseline)", {
            "{{model}} {{label}}": f"{_sum_rate('textclf_predictions_total', 'model, label', selector=m)} / ignoring "
                                   f"(label) group_left clamp_min({_sum_rate('textclf_rows_total', selector=m)}, 1e-9)",
            "{{model}} {{label}} baseline": f"max by (model, label) (textclf_baseline_label_share{m})"}, "percentunit"),
        ("Mean confidence (live vs build baseline)", {
            "{{model}}": f"{_sum_rate('textclf_confidence_sum', selector=m)} / "
                         f"clamp_min({_sum_rate('textclf_confidence_count', selector=m)}, 1e-9)",
            "{{model}} baseline": f"max by (model) (textclf_baseline_confidence_mean{m})"}, "percentunit"),
        ("Input tokens per text", {
            f"{{{{model}}}} p{q}": f"histogram_quantile(0.{q}, sum by (model, le) "
                                   f"(rate(textclf_input_tokens_bucket{m}[{_RATE}])))" for q in ("5", "95")}, "short"),
        ("Computed / real tokens, truncated and windows per text", {
            "{{model}} computed/real": f"{_sum_rate('textclf_computed_tokens_total', selector=m)} / "
                                       f"clamp_min({_sum_rate('textclf_input_tokens_total', selector=m)}, 1e-9)",
            "{{model}} truncated share": f"{_sum_rate('textclf_truncated_rows_total', selector=m)} / "
                                         f"clamp_min({_sum_rate('textclf_rows_total', selector=m)}, 1e-9)",
            "{{model}} windows/text": f"{_sum_rate('textclf_windows_total', selector=m)} / "
                                      f"clamp_min({_sum_rate('textclf_rows_total', selector=m)}, 1e-9)"}, "short"),
    ]


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard (JSON model): traffic, errors, latency, queue, label mix and confidence
    against the build baseline, tokens, truncation and windows; one ``model`` variable."""
    panels = [_panel(title, exprs, 12 * (i % 2), 8 * (i // 2), unit) for i, (title, exprs, unit) in enumerate(_panels())]
    variables = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
        {"name": "model", "type": "query", "label": "model", "multi": True, "includeAll": True, "allValue": ".*",
         "datasource": {"type": "prometheus", "uid": "${datasource}"}, "refresh": 2,
         "query": {"query": "label_values(textclf_rows_total, model)", "refId": "models"},
         "definition": "label_values(textclf_rows_total, model)"},
    ]
    return {"uid": DASHBOARD_UID, "title": "triton-textclf serving", "tags": ["triton", "textclf"],
            "schemaVersion": 39, "version": 1, "editable": True, "time": {"from": "now-6h", "to": "now"},
            "refresh": "30s", "templating": {"list": variables}, "panels": panels}


def dashboard_config_map(config: ManifestConfig) -> dict[str, Any]:
    """The dashboard as a ConfigMap labelled ``grafana_dashboard: "1"`` (the Grafana chart's sidecar loads it)."""
    from serving.manifests.objects import _meta

    meta = _meta(config, f"{config.name}-textclf-dashboard")
    meta["labels"]["grafana_dashboard"] = "1"
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
            "data": {DASHBOARD_FILE: json.dumps(dashboard(), indent=2, sort_keys=True)}}


def expressions() -> list[str]:
    """Every PromQL expression the dashboard and the rules evaluate (what the tests check)."""
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]
    exprs += [r["expr"] for g in rule_groups() for r in g["rules"]]
    exprs += [v["definition"].removeprefix("label_values(").split(",")[0]
              for v in dashboard()["templating"]["list"] if "definition" in v]
    return exprs


STATIC_DIR = Path(__file__).parent.parent / "deploy" / "k8s" / "monitoring"


def static_files() -> dict[str, str]:
    """The plain files of serving/deploy/k8s/monitoring/: file name -> text."""
    import yaml

    return {DASHBOARD_FILE: json.dumps(dashboard(), indent=2, sort_keys=True) + "\n",
            RULES_FILE: yaml.safe_dump({"groups": rule_groups()}, sort_keys=False, width=120)}


def write_static(out_dir: Path = STATIC_DIR) -> list[Path]:
    """Write :func:`static_files` into ``out_dir`` (each file atomically)."""
    from common.atomic import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in static_files().items():
        atomic_write_text(out_dir / name, text)
        written.append(out_dir / name)
    return written


if __name__ == "__main__":  # pragma: no cover - regenerates the committed copies
    for path in write_static(Path(sys.argv[1]) if len(sys.argv) > 1 else STATIC_DIR):
        print(path)
