"""Stage 7: the build report: report.json (machine), report.md (table), report.png (speed vs accuracy)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

COLUMNS = ("variant", "size", "p50 ms", "seq/s", "max diff", "agreement", "accuracy", "drop (pts)", "verdict")


def _mb(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.1f} MB"


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table_rows(report: dict) -> list[tuple[str, ...]]:
    """One row per variant (PyTorch reference first), as strings."""
    ref = report["reference"]
    speed = ref.get("speed") or {}
    rows = [("pytorch (reference)", _mb(ref.get("size_bytes")), _f(speed.get("latency_ms_p50"), ".2f"),
             _f(speed.get("throughput_seq_s"), ".1f"), "0", "100.00%", _f(ref["accuracy"] * 100, ".2f") + "%",
             "0.00", "reference")]
    for name, v in report["variants"].items():
        p, s = v.get("parity") or {}, v.get("speed") or {}
        verdict = "PASS" if p.get("passed") else "FAIL"
        if name == report.get("selected"):
            verdict += " (selected)"
        rows.append((
            name, _mb(v.get("size_bytes")), _f(s.get("latency_ms_p50"), ".2f"), _f(s.get("throughput_seq_s"), ".1f"),
            _f(p.get("max_abs_diff"), ".2e"), _f(None if p.get("label_agreement") is None else p["label_agreement"] * 100, ".2f") + "%",
            _f(None if p.get("accuracy") is None else p["accuracy"] * 100, ".2f") + "%",
            _f(p.get("accuracy_drop_pts"), ".2f"), verdict,
        ))
    return rows


def markdown(report: dict) -> str:
    rows = table_rows(report)
    lines = [
        f"# Export report: {report['checkpoint']}",
        "",
        f"Target **{report['target']}**, selected variant **{report.get('selected') or 'none'}**; "
        f"parity on {report['reference']['n_examples']} held-out rows of `{report['eval_data']}` "
        f"(batches of {report['settings']['batch_size']}, padded to the longest row, max_length "
        f"{report['settings']['max_length']}). Speed: in-process, batch 1 latency and batch "
        f"{report['settings']['batch_size']} throughput on the same texts.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]
    for name, v in report["variants"].items():
        p = v.get("parity") or {}
        if not p.get("passed"):
            lines.append(f"- **{name}** failed: {p.get('reason') or v.get('error')}")
        if p.get("label_agreement_batch1") is not None:
            lines.append(f"- {name}: label agreement one row at a time (as a request served alone) "
                         f"{p['label_agreement_batch1']:.2%}")
        if v.get("excluded_nodes"):
            lines.append(f"- {name}: {len(v['excluded_nodes'])} nodes kept in fp32 after the sensitivity search")
        if v.get("fp32_nodes") and v["precision"] == "fp16":
            lines.append(f"- {name}: {len(v['fp32_nodes'])} nodes kept in fp32 ({', '.join(v['fp32_ops_present'])}), "
                         "inputs/outputs float32")
    opt = report.get("optimization") or {}
    if opt:
        measured = ", ".join(f"{k} {v:.1f} seq/s" for k, v in (opt.get("throughput_seq_s") or {}).items())
        lines.append(f"- graph optimisation: {opt.get('level')} ({opt.get('tool')}), {opt.get('nodes_before')} -> "
                     f"{opt.get('nodes_after')} nodes, fused {opt.get('fused_ops')}; measured {measured or '-'}")
    lines.append(f"- repository: {report.get('repository') or 'not written'}")
    stages = report.get("stage_seconds") or {}
    if stages:
        lines.append("- stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Throughput (x) against accuracy (y) per variant; failing variants hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ref = report["reference"]
    if (ref.get("speed") or {}).get("throughput_seq_s"):
        ax.scatter([ref["speed"]["throughput_seq_s"]], [ref["accuracy"] * 100], marker="s", color="black")
        ax.annotate("pytorch", (ref["speed"]["throughput_seq_s"], ref["accuracy"] * 100), textcoords="offset points", xytext=(5, 5))
    for i, (name, v) in enumerate(report["variants"].items()):
        p, s = v.get("parity") or {}, v.get("speed") or {}
        if s.get("throughput_seq_s") is None or p.get("accuracy") is None:
            continue
        ok = bool(p.get("passed"))
        ax.scatter([s["throughput_seq_s"]], [p["accuracy"] * 100], s=60, facecolors="tab:green" if ok else "none",
                   edgecolors="tab:green" if ok else "tab:red")
        ax.annotate(name + ("" if ok else " (fail)"), (s["throughput_seq_s"], p["accuracy"] * 100),
                    textcoords="offset points", xytext=(5, -12 - 11 * (i % 2)))  # stagger: close points overlap
    ax.set_xlabel(f"throughput, batch {report['settings']['batch_size']} (seq/s)")
    ax.set_ylabel("accuracy on held-out text (%)")
    ax.set_title(f"{Path(report['checkpoint']).name}: speed vs accuracy ({report['target']})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(report: dict, out_dir: Path, *, figure: bool = True) -> None:
    """Write report.json and report.md (each atomically) and, unless ``figure`` is False, report.png."""
    from common.atomic import atomic_write_text

    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out_dir / "report.md", markdown(report))
    if figure:
        plot(report, out_dir / "report.png")
