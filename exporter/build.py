"""`python -m exporter build`: checkpoint -> ONNX variants -> parity gate -> report -> Triton repository."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from exporter.config import BuildConfig, Precision, Target
from exporter.errors import CheckpointError, ExporterError
from exporter.inputs import (Checkpoint, Examples, check_writable, load_checkpoint, read_checkpoint_examples,
                             resolve_columns, resolve_eval_data, split_sources)

log = logging.getLogger(__name__)

FP32, FP16, INT8_DYNAMIC, INT8_STATIC = "fp32", "fp16", "int8_dynamic", "int8_static"
SERVABLE = {Target.CPU: (FP32, FP16, INT8_DYNAMIC, INT8_STATIC), Target.GPU: (FP32, FP16)}
EXIT_OK, EXIT_NO_VARIANT = 0, 1
SINGLE_ROWS = 64  # texts used for batch-1 latency


@dataclass
class BuildResult:
    report: dict
    out: Path

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.report.get("selected") else EXIT_NO_VARIANT


class _Stages:
    """Logs one line per stage with its time and keeps the times for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        log.info("stage %s ...", name)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        log.info("stage %s done in %.1fs", name, self.seconds[name])


@dataclass
class _Inputs:
    checkpoint: Checkpoint
    eval_set: Examples
    calibration: Examples
    tuning: Examples
    warnings: list[str]


def validate(config: BuildConfig) -> _Inputs:
    """Every check that can fail on bad input, done before any slow work."""
    checkpoint = load_checkpoint(config.checkpoint, tokenizer=config.tokenizer, max_length=config.max_length)
    columns = resolve_columns(checkpoint, config.text_column, config.label_column, config.text_pair_column)
    if columns.text_pair is not None:  # read by exporter.inputs; the served TEXT_PAIR input comes later
        raise ExporterError("text pairs (--text-pair-column) are not exported yet")
    eval_path = resolve_eval_data(checkpoint, config.eval_data)
    eval_set = read_checkpoint_examples(checkpoint, eval_path, columns, limit=config.eval_size)
    warnings = []
    if len(eval_set) < min(1000, config.eval_size):
        warnings.append(f"only {len(eval_set)} evaluation rows (fewer than 1000)")
    # Calibration from training text (what the brief of static quantization asks); the int8 tuning rows
    # from validation text, which the model did not fit (training rows would flatter the agreement).
    sources = split_sources(checkpoint, eval_path)
    rng = random.Random(config.seed)
    rows = {}
    for name, src in sources.items():
        ex = read_checkpoint_examples(checkpoint, src, columns)
        rows[name] = list(zip(ex.texts, ex.labels))
        rng.shuffle(rows[name])
    train, val = rows.get("train", []), rows.get("validation", [])
    if not train and not val:
        warnings.append("no train.csv/validation.csv beside the data record: calibration and tuning use the "
                        "evaluation rows themselves")
        train = val = list(zip(eval_set.texts, eval_set.labels))
    calib = (train or val)[:config.calibration_size]
    tuning = val[:config.tuning_size] if val else train[config.calibration_size:][:config.tuning_size] or train[:config.tuning_size]
    calib_src = sources.get("train") or sources.get("validation") or eval_path
    tuning_src = sources.get("validation") or sources.get("train") or eval_path
    check_writable(config.out, "output directory")
    if config.repository is not None:
        check_writable(config.repository, "repository")
        try:
            import serving.repository  # noqa: F401  (the writer must exist before hours of work)
        except ImportError as exc:
            raise ExporterError(f"cannot import serving.repository to write {config.repository}: {exc}") from None
    return _Inputs(
        checkpoint, eval_set,
        Examples(calib_src, [t for t, _ in calib], [lab for _, lab in calib]),
        Examples(tuning_src, [t for t, _ in tuning], [lab for _, lab in tuning]),
        warnings,
    )


def build(config: BuildConfig) -> BuildResult:
    """Run the whole build; the report is written even when no variant passes."""
    from common.atomic import atomic_directory

    inputs = validate(config)
    for warning in inputs.warnings:
        log.warning("%s", warning)
    stage = _Stages()
    with tempfile.TemporaryDirectory(prefix="exporter-") as scratch, atomic_directory(config.out) as out:
        doc = _build(config, inputs, out, Path(scratch), stage)
    # The build directory is in place; only now does the selected file go to the served repository, so
    # the repository's provenance names a file that exists. A failure here leaves the old repository.
    if doc["selected"] and config.repository is not None:
        from exporter import report

        try:
            with stage("repository"):
                path = write_repo(config, inputs.checkpoint, config.out / doc["variants"][doc["selected"]]["file"], doc)
        except BaseException as exc:
            doc["repository_error"] = f"{type(exc).__name__}: {exc}"
            report.write(doc, config.out, figure=False)
            raise
        doc["repository"] = str(path.absolute())
        doc["stage_seconds"] = stage.seconds
        report.write(doc, config.out, figure=False)
    return BuildResult(doc, config.out)


def _build(config: BuildConfig, inputs: _Inputs, out: Path, scratch: Path, stage: _Stages) -> dict:
    import numpy as np

    from common.provenance import sha256_file, versions
    from exporter import export, fp16, int8, optimize, parity, report, speed

    ck = inputs.checkpoint
    variants: dict[str, dict] = {}

    with stage("reference"):
        try:
            tokenizer = ck.load_tokenizer()
            model = parity.load_torch_model(ck.path)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot load checkpoint {ck.path}: {exc}") from None
        if model.config.num_labels != len(ck.id2label):
            raise CheckpointError(f"checkpoint head has {model.config.num_labels} outputs but {len(ck.id2label)} labels")
        tok = dict(batch_size=config.batch_size, max_length=config.max_length)
        eval_batches = parity.tokenize(tokenizer, inputs.eval_set.texts, **tok)
        tuning_batches = parity.tokenize(tokenizer, inputs.tuning.texts, **tok)
        calib_batches = parity.tokenize(tokenizer, inputs.calibration.texts, **tok)
        singles = parity.tokenize(tokenizer, inputs.eval_set.texts[:SINGLE_ROWS], batch_size=1, max_length=config.max_length)
        ref = parity.Reference(parity.torch_logits(model, eval_batches), np.asarray(inputs.eval_set.labels))
        ref_record = {**ref.metrics, "size_bytes": _weights_size(ck.path)}
        log.info("pytorch reference: accuracy %.4f, macro-F1 %.4f on %d rows", ref_record["accuracy"],
                 ref_record["macro_f1"], ref_record["n_examples"])
    with stage("reference-speed"):
        ref_record["speed"] = speed.measure(speed.torch_runner(model), singles, eval_batches, config.speed_seconds)
        del model

    with stage("export"):
        export.export_onnx(ck.path, scratch / "raw")
    with stage("optimize"):
        base, opt_record = optimize.optimize_onnx(scratch / "raw", scratch / "optimized", config.target)
        # Measured, not assumed: batch throughput of the unfused export against the fused graph.
        measured = {}
        for label, path in (("unoptimized", scratch / "raw" / "model.onnx"), (opt_record["level"], base)):
            sess = parity.session(path, Precision.FP32)
            measured[label] = speed.measure(speed.ort_runner(sess), singles[:1], eval_batches[:4],
                                            min(config.speed_seconds, 0.5))["throughput_seq_s"]
        opt_record["throughput_seq_s"] = measured
        opt_record["note"] = ("the fused graph is the base of every variant: quantization must see the fusions "
                              "(Attention -> QAttention); onnxruntime applies the same fusions at load time, "
                              "so the two run at about the same speed on the CPU")
        log.info("graph optimisation: %s", measured)

    def add_variant(name: str, precision: Precision, path: Path, extra: dict | None = None) -> dict:
        record = {"precision": precision.value, "file": path.name, "size_bytes": path.stat().st_size, **(extra or {})}
        with stage(f"{name}-parity"):
            record["parity"] = parity.check_variant(path, precision, ref, eval_batches, config.budgets)
        with stage(f"{name}-speed"):
            sess = parity.session(path, precision)
            record["speed"] = speed.measure(speed.ort_runner(sess), singles, eval_batches, config.speed_seconds)
        variants[name] = record
        return record

    def failed_variant(name: str, precision: Precision, exc: BaseException) -> None:
        log.warning("variant %s failed to build: %s", name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        variants[name] = {"precision": precision.value, "file": None, "size_bytes": None, "error": str(exc),
                          "parity": {"passed": False, "reason": f"conversion failed: {exc}"}, "speed": {}}

    fp32_path = out / f"{FP32}.onnx"
    fp32_path.write_bytes(base.read_bytes())
    if Precision.FP32 in config.precisions:
        add_variant(FP32, Precision.FP32, fp32_path, {"fp32_nodes": "all"})

    if Precision.FP16 in config.precisions:
        with stage("fp16-convert"):
            try:
                info = fp16.convert_fp16(fp32_path, out / f"{FP16}.onnx")
            except Exception as exc:  # a converter failure fails the variant, not the build
                failed_variant(FP16, Precision.FP16, exc)
                info = None
        if info is not None:
            add_variant(FP16, Precision.FP16, out / f"{FP16}.onnx",
                        {"fp32_nodes": info["fp32_nodes"], "fp32_io": info["fp32_io"], "fp32_ops_present": info["fp32_ops_present"],
                         "converter": info["converter"]})

    if Precision.INT8 in config.precisions:
        preset = int8.cpu_preset()
        base_sess = parity.session(fp32_path, Precision.FP32)
        tune_ref = parity.Reference(parity.ort_outputs(base_sess, tuning_batches)[0], np.asarray(inputs.tuning.labels))
        del base_sess

        def tune(path: Path) -> dict:
            return parity.tuning_check(parity.session(path, Precision.INT8), tuning_batches, tune_ref, config.budgets)

        def final(path: Path) -> dict:
            return parity.check_variant(path, Precision.INT8, ref, eval_batches, config.budgets)

        def quick_throughput(path: Path) -> float:
            sess = parity.session(path, Precision.INT8)
            return speed.measure(speed.ort_runner(sess), singles[:1], eval_batches[:4], 0.5)["throughput_seq_s"]

        def best_passing() -> float | None:
            speeds = [v["speed"]["throughput_seq_s"] for n, v in variants.items()
                      if n in SERVABLE[config.target] and (v.get("parity") or {}).get("passed")]
            return max(speeds, default=None)

        for name, kind in ((INT8_DYNAMIC, int8.DYNAMIC), (INT8_STATIC, int8.STATIC)):
            settings = int8.QuantSettings.from_preset(preset, is_static=kind == int8.STATIC)
            dst = out / f"{name}.onnx"
            with stage(f"{name}-quantize"):
                try:
                    found = int8.search(kind, fp32_path, dst, settings, tune=tune, final=final,
                                        tuning_batches=tuning_batches, calibration=calib_batches,
                                        max_rounds=config.max_exclusion_rounds,
                                        calibration_cache=scratch / "calibration.json",
                                        throughput=quick_throughput,
                                        speed_floor=None if config.exhaustive_int8 else best_passing())
                except Exception as exc:  # a quantizer failure fails the variant, not the build
                    failed_variant(name, Precision.INT8, exc)
                    continue
            record = {"precision": "int8", "file": dst.name, "size_bytes": dst.stat().st_size,
                      "mode": kind, "quantization": settings.describe(), "excluded_nodes": found.excluded,
                      "fp32_nodes": found.excluded, "search": {"attempts": found.attempts, "skipped": found.skipped,
                                                               "most_sensitive": found.sensitivity},
                      "parity": found.eval_record}
            if kind == int8.STATIC:
                record["calibration"] = {"rows": len(inputs.calibration), "source": str(inputs.calibration.source),
                                         "method": "MinMax", "format": "QDQ"}
            with stage(f"{name}-speed"):
                sess = parity.session(dst, Precision.INT8)
                record["speed"] = speed.measure(speed.ort_runner(sess), singles, eval_batches, config.speed_seconds)
            variants[name] = record

    if Precision.FP32 not in config.precisions:
        fp32_path.unlink()

    for name, v in variants.items():
        v["servable"] = name in SERVABLE[config.target]  # int8 does not run as int8 on the CUDA provider
    selected = select(variants, config.target)
    doc = {
        "checkpoint": str(ck.path.absolute()),
        "target": config.target.value,
        "selected": selected,
        "reference": ref_record,
        "eval_data": str(inputs.eval_set.source),
        "int8_tuning_data": {"source": str(inputs.tuning.source), "rows": len(inputs.tuning)},
        "settings": {"precisions": [p.value for p in config.precisions], "batch_size": config.batch_size,
                     "max_length": config.max_length, "eval_size": config.eval_size,
                     "calibration_size": config.calibration_size, "tuning_size": config.tuning_size,
                     "speed_seconds": config.speed_seconds, "max_exclusion_rounds": config.max_exclusion_rounds,
                     "exhaustive_int8": config.exhaustive_int8, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                     "ort_intra_op_spinning": False,
                     "budgets": vars(config.budgets)},
        "labels": [ck.id2label[i] for i in range(len(ck.id2label))],
        "optimization": opt_record,
        "variants": variants,
        "warnings": inputs.warnings,
        "versions": versions(),
        "files": {p.name: sha256_file(p) for p in sorted(out.glob("*.onnx"))},
        "repository": None,
        "stage_seconds": stage.seconds,
    }
    if selected is None:
        log.error("no variant passed its parity gate: nothing is served, %s is left as it was",
                  config.repository or "the repository")
    report.write(doc, out)
    return doc


def select(variants: dict[str, dict], target: Target) -> str | None:
    """gpu: fp16 (else fp32); cpu: the passing variant with the highest batch throughput."""
    passing = [n for n, v in variants.items() if (v.get("parity") or {}).get("passed") and n in SERVABLE[target]]
    if not passing:
        return None
    if target is Target.GPU:
        return FP16 if FP16 in passing else passing[0]
    return max(passing, key=lambda n: variants[n]["speed"].get("throughput_seq_s") or 0.0)


def write_repo(config: BuildConfig, ck: Checkpoint, onnx_model: Path, doc: dict) -> Path:
    """Hand the selected variant to the serving stage's repository writer (atomic on its side)."""
    from serving.errors import ServingError
    from serving.repository import RepositoryConfig, write_repository

    selected = doc["selected"]
    provenance = {
        "source": "exporter",
        "checkpoint": doc["checkpoint"],
        "variant": selected,
        "precision": doc["variants"][selected]["precision"],
        "parity": doc["variants"][selected]["parity"],
        "speed": doc["variants"][selected]["speed"],
        "reference": {k: doc["reference"][k] for k in ("accuracy", "macro_f1", "n_examples")},
        "eval_data": doc["eval_data"],
        "settings": doc["settings"],
        "versions": doc["versions"],
        "files": {onnx_model.name: doc["files"].get(onnx_model.name)},
    }
    try:
        repo_config = RepositoryConfig(target=config.target, max_length=config.max_length)
        return Path(write_repository(Path(config.repository), onnx_model=onnx_model, tokenizer_dir=ck.tokenizer_dir,
                                     id2label=dict(ck.id2label), config=repo_config, provenance=provenance))
    except ServingError as exc:
        raise ExporterError(f"cannot write the repository {config.repository}: {exc}") from exc
    except NotImplementedError:
        raise ExporterError("serving.repository.write_repository is not implemented yet; "
                            "use --no-repository") from None


def _weights_size(path: Path) -> int | None:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return (path / name).stat().st_size
    return None
