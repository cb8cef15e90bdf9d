"""Stage 7: the build report rendered from the typed BuildReport: report.json (through
exporter.artifacts), report.md (table) and report.png (speed vs accuracy, the selected variant marked)."""
from __future__ import annotations

import logging
from pathlib import Path

from common.atomic import atomic_write_text
from exporter.artifacts import BuildReport, GateMode, write_embedding_report_json, write_report_json

log = logging.getLogger(__name__)

COLUMNS = ("variant", "size", "p50 ms", "seq/s", "max diff", "agreement", "accuracy", "drop (pts)", "verdict")


def _mb(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.1f} MB"


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def table_rows(report: BuildReport) -> list[tuple[str, ...]]:
    """One row per variant (PyTorch reference first), as strings."""
    ref, speed = report.reference, report.reference.speed
    rows = [("pytorch (reference)", _mb(ref.size_bytes), _f(speed and speed.latency_ms_p50, ".2f"),
             _f(speed and speed.throughput_seq_s, ".1f"), "0", "100.00%", _pct(ref.accuracy), "0.00", "reference")]
    for name, v in report.variants.items():
        p, s = v.parity, v.speed
        verdict = ("PASS" if p.passed else "FAIL" if p.gated else "not gated") + \
            (" (selected)" if name == report.selected else "")
        seq_s = _f(s and s.throughput_seq_s, ".1f") + (" (probe)" if s and s.probe else "")
        rows.append((name, _mb(v.size_bytes), _f(s and s.latency_ms_p50, ".2f"), seq_s,
                     _f(p.max_abs_diff, ".2e"), _pct(p.label_agreement if p.n_examples else None), _pct(p.accuracy),
                     _f(p.accuracy_drop_pts, ".2f"), verdict))
    return rows


def how_measured(report: BuildReport) -> str:
    """One sentence on how parity and speed were measured (the gate mode)."""
    st = report.settings
    if report.gate_mode is GateMode.PER_ROW:
        return (f"gate mode **per_row**: parity on {report.reference.n_examples} held-out rows of "
                f"`{report.eval_data}`, each row run alone, unpadded (max_length {st['max_length']}), in a session "
                "with 1 intra-op thread, as the CPU server runs it. Speed: one text at a time, tokenization "
                "included, 1 thread (the per-core ceiling; seq/s is what selection compares).")
    return (f"gate mode **batched**: parity on {report.reference.n_examples} held-out rows of `{report.eval_data}` "
            f"(batches of {st['batch_size']}, padded to the longest row, max_length {st['max_length']}). Speed: "
            f"in-process, batch 1 latency and batch {st['batch_size']} throughput on the same texts.")


def openvino_note(name: str, settings: dict, budget: str) -> str:
    """One report line of an OpenVINO variant: the runtime, the precision that ran and the budget judging it."""
    quant = (settings.get("quantization") or {}).get("tool")
    return (f"- {name}: OpenVINO {str(settings.get('openvino_version', '')).split('-')[0]} IR, inference precision "
            f"{settings.get('inference_precision')} (judged by the {budget} budget)" + (f", {quant}" if quant else ""))


def _notes(report: BuildReport) -> list[str]:
    lines = []
    for name, v in report.variants.items():
        p = v.parity
        if not p.passed:
            lines.append(f"- **{name}** {p.reason}" if not p.gated else f"- **{name}** failed: {p.reason or v.error}")
        if p.label_agreement_batch1 is not None and report.gate_mode is GateMode.BATCHED:
            lines.append(f"- {name}: label agreement one row at a time (as a request served alone) "
                         f"{p.label_agreement_batch1:.2%}")
        if v.speed is not None and v.speed.probe:
            lines.append(f"- {name}: seq/s (probe) is {v.speed.probe}")
        if v.excluded_nodes:
            lines.append(f"- {name}: {len(v.excluded_nodes)} nodes kept in fp32 after the sensitivity search")
        if v.fp32_nodes and v.precision == "fp16" and not v.runtime_settings:
            lines.append(f"- {name}: {len(v.fp32_nodes)} nodes kept in fp32 ({', '.join(v.fp32_ops_present or [])}), "
                         "inputs/outputs float32")
        if v.runtime_settings:  # OpenVINO hook: which runtime and precision ran
            lines.append(openvino_note(name, v.runtime_settings, v.precision))
    opt = report.optimization
    if opt:
        measured = ", ".join(f"{k} {v:.1f} seq/s" for k, v in (opt.get("throughput_seq_s") or {}).items())
        lines.append(f"- graph optimisation: {opt.get('level')} ({opt.get('tool')}), {opt.get('nodes_before')} -> "
                     f"{opt.get('nodes_after')} nodes, fused {opt.get('fused_ops')}; measured {measured or 'with --exhaustive only'}")
    lines.append(f"- repository: {report.repository or 'not written'}")
    if report.stage_seconds:
        lines.append("- stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report.stage_seconds.items()))
    mem = report.memory
    if mem and mem.stages:
        ratio = f" = {mem.ratio:.1f}x the {mem.weights_bytes / 1e6:.0f} MB of fp32 weights" if mem.ratio else ""
        lines.append(f"- peak RSS of the build process {mem.peak_rss_bytes / 1e6:.0f} MB{ratio}; export worker "
                     f"process (largest) {mem.worker_peak_rss_bytes / 1e6:.0f} MB; both together about "
                     f"{mem.combined_peak_estimate_bytes / 1e6:.0f} MB; per stage in MB (peak, +raise): "
                     + ", ".join(f"{s.stage} {s.peak_rss_bytes / 1e6:.0f} (+{s.delta_bytes / 1e6:.0f})" for s in mem.stages))
    return lines


def markdown(report: BuildReport) -> str:
    if getattr(report, "task", None) == "embedding":  # an EmbeddingReport (exporter build --task embedding)
        return embedding_markdown(report)
    lines = [
        f"# Export report: {report.checkpoint}",
        "",
        f"Target **{report.target}**, selected variant **{report.selected or 'none'}**; {how_measured(report)}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
        *("| " + " | ".join(r) + " |" for r in table_rows(report)),
        "",
        *_notes(report),
    ]
    return "\n".join(lines) + "\n"


def plot(report: BuildReport, path: Path) -> None:
    """Throughput (x) against accuracy (y) per variant; failing variants hollow, the selected one starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ref = report.reference
    regression = ref.accuracy is None  # regression heads: MAE (lower is better) instead of accuracy
    quality = (lambda r: r.mae) if regression else (lambda r: None if r.accuracy is None else r.accuracy * 100)
    if ref.speed is not None and quality(ref) is not None:
        ax.scatter([ref.speed.throughput_seq_s], [quality(ref)], marker="s", color="black")
        ax.annotate("pytorch", (ref.speed.throughput_seq_s, quality(ref)), textcoords="offset points", xytext=(5, 5))
    for i, (name, v) in enumerate(report.variants.items()):
        if v.speed is None or quality(v.parity) is None:
            continue
        ok, xy = v.parity.passed, (v.speed.throughput_seq_s, quality(v.parity))
        ax.scatter([xy[0]], [xy[1]], s=60, facecolors="tab:green" if ok else "none",
                   edgecolors="tab:green" if ok else "tab:red")
        if name == report.selected:
            ax.scatter([xy[0]], [xy[1]], s=260, marker="*", color="gold", edgecolors="black", zorder=3,
                       label=f"selected: {name}")
        ax.annotate(name + ("" if ok else " (fail)") + (" (selected)" if name == report.selected else ""), xy,
                    textcoords="offset points", xytext=(5, -12 - 11 * (i % 2)))  # stagger: close points overlap
    if report.selected:
        ax.legend(loc="lower right")
    per_row = report.gate_mode is GateMode.PER_ROW
    ax.set_xlabel("throughput, one row at a time, 1 thread (seq/s)" if per_row
                  else f"throughput, batch {report.settings['batch_size']} (seq/s)")
    ax.set_ylabel("MAE on held-out text" if regression else "accuracy on held-out text (%)")
    ax.set_title(f"{Path(report.checkpoint).name}: speed vs {'MAE' if regression else 'accuracy'} ({report.target}, {report.gate_mode.value})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(report: BuildReport, out_dir: Path, *, figure: bool = True) -> None:
    """Write report.json and report.md (each atomically) and, unless ``figure`` is False, report.png."""
    write_report_json(report, out_dir)
    atomic_write_text(out_dir / "report.md", markdown(report))
    if figure:
        plot(report, out_dir / "report.png")


# ------------------------------------------------------------------------------------ embedding report

EMBEDDING_COLUMNS = ("variant", "size", "rows/s (1 thread)", "rows/CPU-s", "min cosine", "mean cosine",
                     "max norm gap", "top-k overlap", "verdict")


def embedding_table_rows(report) -> list[tuple[str, ...]]:
    """One row per embedding variant (sentence-transformers reference first), as strings."""
    ref = report.reference_speed
    rows = [("sentence-transformers (reference)", "-", _f(ref and ref.rows_per_s, ".1f"),
             _f(ref and ref.rows_per_cpu_s, ".1f"), "1", "1", "0", "100.00%", "reference")]
    for name, v in report.variants.items():
        g, s = v.gate, v.speed
        verdict = ("PASS" if v.passed else "not gated" if g is not None and not g.gated else "FAIL") \
            + (" (selected)" if name == report.selected else "")
        rows.append((name, _mb(v.size_bytes), _f(s and s.rows_per_s, ".1f"), _f(s and s.rows_per_cpu_s, ".1f"),
                     _f(g and g.min_cosine, ".6f"), _f(g and g.mean_cosine, ".6f"), _f(g and g.max_norm_gap, ".2e"),
                     _pct(g and g.topk_overlap), verdict))
    return rows


def embedding_markdown(report) -> str:
    p = report.pipeline
    ref = report.reference_speed
    lines = [
        f"# Embedding export report: {report.model_dir}",
        "",
        f"Served as **{report.model_name}**, target **{report.target}**, selected variant "
        f"**{report.selected or 'none'}**. Pipeline: {p.get('source')}, pooling {p.get('pooling')}, normalize "
        f"{p.get('normalize')}, dim {p.get('dim')}, max_seq_length {p.get('max_seq_length')}.",
        "",
        f"Gate: {report.n_texts} held-out texts of `{report.eval_data}`, each run alone at its own length in a "
        "1-intra-op-thread session (as the CPU server runs it), against sentence-transformers "
        + ("on the same windows (below); " if report.settings.get("long_text") == "chunk" else "`encode`; ") +
        f"top-{report.budgets.get('top_k')} neighbour overlap inside the held-out set. Speed: one text at a time, "
        "tokenization included, 1 thread (rows/s, the classifier's measure, is what selection compares; variants are "
        "gated fastest first until one passes, the slower ones not gated)."
        + (f" Reference: `encode` batch 32 with {ref.intra_op_threads} torch threads." if ref else ""),
        *_chunked_line(report.settings),
        "",
        "| " + " | ".join(EMBEDDING_COLUMNS) + " |",
        "|" + "|".join("---" for _ in EMBEDDING_COLUMNS) + "|",
        *("| " + " | ".join(r) + " |" for r in embedding_table_rows(report)),
        "",
        *(f"- {name}: {v.gate.reason if v.gate else v.error}" for name, v in report.variants.items()),
        *(openvino_note(name, v.runtime_settings, v.precision) for name, v in report.variants.items()
          if v.runtime_settings),  # OpenVINO hook
        *(f"- warning: {w}" for w in report.warnings),
        *([f"- repository: {report.repository}"] if report.repository else []),
        *([f"- repository error: {report.repository_error}"] if report.repository_error else []),
    ]
    return "\n".join(lines) + "\n"


def _chunked_line(settings: dict) -> list[str]:
    """The report's line on a --long-text chunk embedder (none for a truncating one)."""
    if settings.get("long_text") != "chunk":
        return []
    return ["", f"Long texts: **chunk** (overlap {settings.get('chunk_overlap')}, at most {settings.get('max_chunks')} "
                f"windows; {settings.get('windows')} windows gated, long texts joined from consecutive ones). The "
                "graph answers the vector before normalisation; the served model averages a text's windows"
                + (" and L2-normalises the mean" if settings.get("normalize_after_mean") else "")
                + ". The reference: sentence-transformers' modules before Normalize on the same windows, averaged"
                + (", normalised." if settings.get("normalize_after_mean") else ".")]


def embedding_plot(report, path: Path) -> None:
    """Per-row throughput (x) against minimum cosine (y); failing variants hollow, the selected starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for name, v in report.variants.items():
        if v.speed is None or v.gate is None or v.gate.min_cosine is None:
            continue
        xy = (v.speed.rows_per_s, v.gate.min_cosine)
        color = "tab:green" if v.passed else "tab:red"
        ax.scatter([xy[0]], [xy[1]], s=60, facecolors=color if v.passed else "none", edgecolors=color)
        if name == report.selected:
            ax.scatter([xy[0]], [xy[1]], s=260, marker="*", color="gold", edgecolors="black", zorder=3,
                       label=f"selected: {name}")
        ax.annotate(name + ("" if v.passed else " (fail)"), xy, textcoords="offset points", xytext=(5, -12))
    if report.selected:
        ax.legend(loc="lower right")
    ax.set_xlabel("throughput, one row at a time, 1 thread (rows/s)")
    ax.set_ylabel("min cosine to sentence-transformers")
    ax.set_title(f"{Path(report.model_dir).name}: embedding variants ({report.target})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_embedding(report, out_dir: Path, *, figure: bool = True) -> None:
    """report.json (exporter.artifacts), report.md and, unless ``figure`` is False, report.png."""

    write_embedding_report_json(report, out_dir)
    atomic_write_text(out_dir / "report.md", embedding_markdown(report))
    if figure:
        embedding_plot(report, out_dir / "report.png")
