"""Stage 4: int8 variants (dynamic, static QDQ), the conversions a worker process runs.

Quantization runs on the fused fp32 graph. When a variant leaves its budget on the tuning rows, the
quantizable nodes are ranked by their local int8 error (each node's output with its weight and input
activation quantized, given fp32 inputs captured on tuning text: :func:`rank_sensitivity`) and the most
sensitive are excluded, a bounded number of times (the search: :mod:`exporter.int8_search`).
"""
from __future__ import annotations

import contextlib
import logging
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporter.calibration import calibrate_minmax
from exporter.optimize import clear_data_location, save_model
from exporter.parity import Batch
from exporter.progress import track

log = logging.getLogger(__name__)

DYNAMIC = "dynamic"
STATIC = "static"
# The projections carry the compute. Embedding tables (Gather) stay fp32: quantizing them saves file
# size, not time, and per-tensor table quantization flipped labels in measurements here.
DYNAMIC_OPS = ("MatMul", "Attention")
# Static QDQ: weights and activations of the projections; fused contrib ops (Attention) stay fp32.
STATIC_OPS = ("MatMul",)


def cpu_preset() -> str:
    """The Optimum AutoQuantizationConfig preset that fits this CPU."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"


@dataclass
class QuantSettings:
    """Quantizer parameters taken from an Optimum preset."""

    preset: str
    is_static: bool
    per_channel: bool
    reduce_range: bool
    activation_type: object
    weight_type: object

    @classmethod
    def from_preset(cls, preset: str, *, is_static: bool, per_channel: bool = True) -> "QuantSettings":
        from optimum.onnxruntime.configuration import AutoQuantizationConfig

        qc = getattr(AutoQuantizationConfig, preset)(is_static=is_static, per_channel=per_channel)
        return cls(preset, is_static, qc.per_channel, qc.reduce_range, qc.activations_dtype, qc.weights_dtype)

    def describe(self) -> dict:
        return {"preset": self.preset, "per_channel": self.per_channel, "reduce_range": self.reduce_range,
                "activation_type": getattr(self.activation_type, "name", str(self.activation_type)),
                "weight_type": getattr(self.weight_type, "name", str(self.weight_type))}


@dataclass
class Candidate:
    name: str
    op_type: str
    activation: str | None  # input tensor quantized at run time (None for Gather tables)
    weight: str


def candidates(model, op_types: tuple[str, ...]) -> list[Candidate]:
    """Nodes the quantizer would touch: constant float weights feeding MatMul/Attention/Gather."""
    from onnx import TensorProto

    inits = {i.name: i for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        if node.op_type == "Gather":
            table = inits.get(node.input[0])
            if table is not None and table.data_type == TensorProto.FLOAT and len(table.dims) == 2:
                found.append(Candidate(node.name, node.op_type, None, table.name))
        elif len(node.input) > 1 and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            found.append(Candidate(node.name, node.op_type, node.input[0], node.input[1]))
    return found


def _fake_quant_activation(x: np.ndarray, rng: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 asymmetric per-tensor quantization then dequantization; the range is the tensor's own
    (DynamicQuantizeLinear) or, for static quantization, the calibrated ``rng``."""
    lo, hi = (float(x.min()), float(x.max())) if rng is None else rng
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255 or 1.0
    zero = np.clip(np.round(-lo / scale), 0, 255)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def _fake_quant_weight(w: np.ndarray, *, per_channel: bool, reduce_range: bool, amax=None) -> np.ndarray:
    """Symmetric int8 weight quantization (per output column when per_channel) then dequantize."""
    qmax = 63 if reduce_range else 127
    if amax is None:
        amax = np.abs(w).max(axis=0, keepdims=True) if per_channel else np.abs(w).max()
    scale = np.where(amax > 0, amax / qmax, 1.0)
    return np.clip(np.round(w / scale), -qmax, qmax) * scale


def rank_sensitivity(fp32_path: Path, batches: list[Batch], op_types: tuple[str, ...],
                     settings: QuantSettings, calibration: list[Batch] | None = None) -> list[dict]:
    """Nodes sorted by local relative output error under int8, most sensitive first.

    Each node sees fp32 inputs captured on ``batches``; its activation is quantized with its own range
    (dynamic) or with the MinMax range seen on ``calibration`` (static), its weight as the quantizer does.
    """
    cands, weights, sess, wanted = _capture_session(fp32_path, op_types)
    feeds = {i.name for i in sess.get_inputs()}
    errors: dict[str, list[float]] = {c.name: [] for c in cands}
    ranges: dict[str, tuple[float, float]] = {}
    for batch in (calibration or []) if settings.is_static else []:
        for name, x in zip(wanted, sess.run(wanted, {k: v for k, v in batch.items() if k in feeds})):
            lo, hi = ranges.get(name, (np.inf, -np.inf))
            ranges[name] = (min(lo, float(x.min())), max(hi, float(x.max())))
    for batch in track(batches, "int8 sensitivity", total=len(batches)):
        acts = dict(zip(wanted, sess.run(wanted, {k: v for k, v in batch.items() if k in feeds})))
        for c in cands:
            errors[c.name].append(_local_error(c, weights[c.weight], acts, ranges, batch, settings))
    ranked = [{"node": c.name, "op_type": c.op_type, "local_rel_error": round(float(np.mean(errors[c.name])), 6)}
              for c in cands]
    ranked.sort(key=lambda r: r["local_rel_error"], reverse=True)
    return ranked


def _capture_session(fp32_path: Path, op_types: tuple[str, ...]):
    """(candidates, their weights, a session that also outputs every candidate's input, those names).

    The model proto is dropped before the session is created, and the session neither prepacks weights
    nor keeps an arena: only the weights and one session are alive while the ranking runs.
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(fp32_path))
    cands = candidates(model, op_types)
    inits = {i.name: i for i in model.graph.initializer}
    wanted = sorted({c.activation for c in cands if c.activation})
    have = {o.name for o in model.graph.output}
    for name in wanted:
        if name not in have:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    weights = {c.weight: numpy_helper.to_array(inits[c.weight]) for c in cands}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.disable_prepacking", "1")
    with tempfile.TemporaryDirectory(prefix="int8-capture-") as tmp:
        path = Path(tmp) / "capture.onnx"
        onnx.save(model, str(path))
        del model, inits
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return cands, weights, sess, wanted


def _local_error(c: Candidate, w: np.ndarray, acts: dict, ranges: dict, batch: Batch, settings: QuantSettings) -> float:
    """Relative output error of one candidate node under int8, on one batch."""
    if c.activation is None:  # embedding table: weight-only error on the rows looked up
        ids = np.unique(batch["input_ids"])
        ids = ids[ids < w.shape[0]] if w.shape[0] > 1024 else np.arange(w.shape[0])
        rows = w[ids]
        rows_q = _fake_quant_weight(rows, per_channel=False, reduce_range=False, amax=np.abs(w).max())
        return float(np.linalg.norm(rows_q - rows) / (np.linalg.norm(rows) or 1.0))
    x = acts[c.activation]
    mask = batch["attention_mask"].astype(bool)
    # the range covers the whole tensor (padding included, as DynamicQuantizeLinear sees it);
    # the error is measured on real tokens only
    rng = ranges.get(c.activation) or (float(x.min()), float(x.max()))
    if x.ndim == 3 and x.shape[:2] == mask.shape:
        x = x[mask]
    x = x.reshape(-1, x.shape[-1])
    y = x @ w
    yq = _fake_quant_activation(x, rng) @ _fake_quant_weight(w, per_channel=settings.per_channel,
                                                            reduce_range=settings.reduce_range)
    # per-token relative error, averaged: a coarse range ruins small-norm tokens that a norm over the
    # whole tensor would hide
    per_token = np.linalg.norm(yq - y, axis=1) / np.maximum(np.linalg.norm(y, axis=1), 1e-12)
    return float(per_token.mean())


def quantize_here(kind: str, src: Path, dst: Path, settings: QuantSettings, *, exclude: list[str],
                  calibration: list[Batch] | None = None, calibration_cache: Path | None = None) -> None:
    """Write the ``kind`` int8 variant of ``src`` to ``dst``, keeping ``exclude`` nodes in fp32.

    Static quantization calibrates once: the tensor ranges go to ``calibration_cache`` and later rounds
    (which only exclude nodes, so need a subset of the ranges) reuse them.
    """
    import onnx

    extra = {"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT}
    with _quiet_root_logger():
        _quantize(kind, src, dst, settings, exclude, calibration, extra, calibration_cache)


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime.quantization logs per-tensor chatter on the root logger; keep warnings only."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def _quantize(kind, src, dst, settings, exclude, calibration, extra, calibration_cache) -> None:
    """Quantize into a scratch directory with external weights (onnxruntime's own single-file save holds
    the model's serialization twice), then write ``dst`` as one file, one tensor at a time."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="int8-", dir=Path(dst).parent) as tmp:
        out = Path(tmp) / "model.onnx"
        _quantize_to(kind, src, out, settings, exclude, calibration, extra, calibration_cache)
        model = onnx.load(str(out))
        clear_data_location(model)
        save_model(model, Path(dst))


def _quantize_to(kind, src, dst, settings, exclude, calibration, extra, calibration_cache) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_dynamic, quantize_static

    if kind == DYNAMIC:
        quantize_dynamic(src, dst, op_types_to_quantize=list(DYNAMIC_OPS), per_channel=settings.per_channel,
                         reduce_range=settings.reduce_range, weight_type=settings.weight_type,
                         nodes_to_exclude=exclude, extra_options=extra, use_external_data_format=True)
        return
    cache = Path(calibration_cache) if calibration_cache else Path(dst).parent / "calibration.json"
    if not cache.is_file():  # calibrated here, lean (exporter.calibration); quantize_static reads the cache
        calibrate_minmax(Path(src), calibration or [], cache, STATIC_OPS)
    quantize_static(src, dst, None, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(STATIC_OPS), per_channel=settings.per_channel,
                    reduce_range=settings.reduce_range, activation_type=settings.activation_type,
                    weight_type=settings.weight_type, nodes_to_exclude=exclude,
                    calibrate_method=CalibrationMethod.MinMax, extra_options=extra,
                    calibration_cache_path=cache, use_external_data_format=True)
