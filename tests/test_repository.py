"""serving.repository: configs built as protobuf parse back with the right fields; offline validation."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from serving import repository as repo
from serving.errors import RepositoryError
from serving.repository import RepositoryConfig, Target, validate_repository, write_repository

LABELS = ["negative", "neutral", "positive"]
ID2LABEL = dict(enumerate(LABELS))


def _write(out, onnx_model, checkpoint, **cfg) -> Path:
    return write_repository(out, onnx_model=onnx_model, tokenizer_dir=checkpoint, id2label=ID2LABEL,
                            config=RepositoryConfig(**cfg), provenance={"variant": "fp32"})


def _parse(path: Path) -> pb.ModelConfig:
    return text_format.Parse(path.read_text(), pb.ModelConfig())


@pytest.fixture(scope="module")
def cpu_repo(tiny_onnx, tiny_checkpoint, tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("cpu") / "model_repository", tiny_onnx, tiny_checkpoint,
                  max_batch_size=32, max_length=64, intra_op_threads=2, preferred_batch_sizes=(8, 16),
                  max_queue_delay_us=1500, aux_queue_delay_us=250, max_queue_size=100, default_queue_timeout_us=5_000_000)


@pytest.fixture(scope="module")
def gpu_repo(tiny_onnx, tiny_checkpoint, tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("gpu") / "model_repository", tiny_onnx, tiny_checkpoint,
                  target="gpu", tensorrt=True, encoder_instances=2)


def test_cpu_configs_parse_back_with_contract_fields(cpu_repo):
    configs = {name: _parse(cpu_repo / name / "config.pbtxt") for name in repo.MODEL_NAMES}
    for name, cfg in configs.items():
        assert cfg.name == name
        assert cfg.max_batch_size == 32
        if name == repo.ENSEMBLE:
            continue
        batching = cfg.dynamic_batching
        assert list(batching.preferred_batch_size) == [8, 16]
        assert batching.max_queue_delay_microseconds == (1500 if name == repo.ENCODER else 250)
        policy = batching.default_queue_policy
        assert policy.timeout_action == pb.ModelQueuePolicy.REJECT
        assert (policy.max_queue_size, policy.default_timeout_microseconds) == (100, 5_000_000)
    tok, enc, post, ens = (configs[n] for n in repo.MODEL_NAMES)
    assert tok.backend == "python" and [o.dims for o in tok.output] == [[64]] * 3
    assert tok.input[0].data_type == pb.TYPE_STRING and list(tok.input[0].dims) == [1]
    assert tok.parameters["max_length"].string_value == "64"
    assert enc.backend == "python" and enc.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert enc.parameters["intra_op_threads"].string_value == "2"
    assert [(o.name, o.data_type, list(o.dims)) for o in enc.output] == [
        ("logits", pb.TYPE_FP32, [3]), ("probabilities", pb.TYPE_FP32, [3])]
    assert json.loads(post.parameters["labels"].string_value) == LABELS
    assert ens.platform == "ensemble"
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["tokenizer", "encoder", "postprocess"]
    assert {(o.name, o.data_type) for o in ens.output} == {
        ("LABEL", pb.TYPE_STRING), ("PROBABILITIES", pb.TYPE_FP32), ("LOGITS", pb.TYPE_FP32)}
    assert json.loads(ens.parameters["labels"].string_value) == LABELS


def test_cpu_repository_files_and_provenance(cpu_repo, tiny_onnx):
    for rel in ("tokenizer/1/model.py", "tokenizer/1/tokenizer/tokenizer.json", "encoder/1/model.onnx",
                "encoder/1/model.py", "postprocess/1/model.py"):
        assert (cpu_repo / rel).is_file(), rel
    assert (cpu_repo / "classifier" / "1").is_dir()
    prov = json.loads((cpu_repo / "provenance.json").read_text())
    from common.provenance import sha256_file

    assert prov["onnx"]["sha256"] == sha256_file(tiny_onnx)
    assert prov["files"]["encoder/1/model.onnx"] == prov["onnx"]["sha256"]
    assert prov["labels"] == LABELS and prov["exporter"] == {"variant": "fp32"}
    assert prov["target"] == "cpu" and "onnxruntime" in prov["versions"]
    assert validate_repository(cpu_repo, Target.CPU) == list(repo.MODEL_NAMES)


def test_gpu_target_config_and_offline_validation(gpu_repo):
    enc = _parse(gpu_repo / "encoder" / "config.pbtxt")
    assert enc.backend == "onnxruntime" and enc.default_model_filename == "model.onnx"
    assert enc.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU and enc.instance_group[0].count == 2
    accel = enc.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in accel] == ["tensorrt"] and accel[0].parameters["precision_mode"] == "FP16"
    assert not (gpu_repo / "encoder" / "1" / "model.py").exists()
    assert validate_repository(gpu_repo, Target.GPU) == list(repo.MODEL_NAMES)
    with pytest.raises(RepositoryError, match="target gpu, not cpu"):
        validate_repository(gpu_repo, Target.CPU)
    assert json.loads((gpu_repo / "provenance.json").read_text())["ngc_image"] == repo.NGC_IMAGE


@pytest.mark.parametrize("rel, match", [
    ("tokenizer/1/tokenizer/tokenizer.json", "tokenizer file"),
    ("encoder/1/model.onnx", "encoder ONNX model"),
    ("encoder/1/model.py", "python source of model 'encoder'"),
    ("postprocess/config.pbtxt", "config of model 'postprocess'"),
])
def test_validate_catches_a_missing_file(cpu_repo, tmp_path, rel, match):
    broken = tmp_path / "repo"
    shutil.copytree(cpu_repo, broken)
    (broken / rel).unlink()
    with pytest.raises(RepositoryError, match=match):
        validate_repository(broken)


@pytest.mark.parametrize("field, value, match", [
    ("opset", repo.NGC_MAX_OPSET + 1, f"opset {repo.NGC_MAX_OPSET + 1} > {repo.NGC_MAX_OPSET}"),
    ("ir", repo.NGC_MAX_IR_VERSION + 1, f"IR version {repo.NGC_MAX_IR_VERSION + 1} > {repo.NGC_MAX_IR_VERSION}")])
def test_validate_catches_onnx_newer_than_the_ngc_runtime(gpu_repo, tmp_path, field, value, match):
    import onnx

    broken = tmp_path / "repo"
    shutil.copytree(gpu_repo, broken)
    path = broken / "encoder" / "1" / "model.onnx"
    model = onnx.load(str(path))
    if field == "opset":
        next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = value
    else:
        model.ir_version = value
    onnx.save(model, str(path))
    with pytest.raises(RepositoryError, match=match):
        validate_repository(broken, Target.GPU)


def test_validate_catches_a_miswired_ensemble(cpu_repo, tmp_path):
    broken = tmp_path / "repo"
    shutil.copytree(cpu_repo, broken)
    cfg_path = broken / "classifier" / "config.pbtxt"
    cfg = _parse(cfg_path)
    cfg.ensemble_scheduling.step[1].input_map["input_ids"] = "_no_such_tensor"
    cfg_path.write_text(text_format.MessageToString(cfg))
    with pytest.raises(RepositoryError, match="_no_such_tensor"):
        validate_repository(broken)
    cfg.ensemble_scheduling.step[1].model_name = "nope"
    cfg_path.write_text(text_format.MessageToString(cfg))
    with pytest.raises(RepositoryError, match="unknown model 'nope'"):
        validate_repository(broken)
    cfg_path.write_text("this is { not a config")
    with pytest.raises(RepositoryError, match="cannot parse"):
        validate_repository(broken)


def test_failed_write_leaves_the_existing_repository_untouched(cpu_repo, tiny_checkpoint, tmp_path):
    import onnx

    out = tmp_path / "repo"
    shutil.copytree(cpu_repo, out)
    before = sorted(p.name for p in out.rglob("*"))
    bad = tmp_path / "new.onnx"
    model = onnx.load(str(cpu_repo / "encoder" / "1" / "model.onnx"))
    next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = repo.NGC_MAX_OPSET + 1
    onnx.save(model, str(bad))
    with pytest.raises(RepositoryError, match=f"opset {repo.NGC_MAX_OPSET + 1}"):
        _write(out, bad, tiny_checkpoint, target="gpu")
    assert sorted(p.name for p in out.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo.tmp")]


def test_write_rejects_bad_inputs(tiny_onnx, tiny_checkpoint, tmp_path):
    with pytest.raises(RepositoryError, match="id2label"):
        write_repository(tmp_path / "r", onnx_model=tiny_onnx, tokenizer_dir=tiny_checkpoint,
                         id2label={0: "a", 2: "b"}, config=RepositoryConfig())
    with pytest.raises(RepositoryError, match="tokenizer.json"):
        write_repository(tmp_path / "r", onnx_model=tiny_onnx, tokenizer_dir=tmp_path, id2label=ID2LABEL,
                         config=RepositoryConfig())
    with pytest.raises(RepositoryError, match="not found"):
        _write(tmp_path / "r", tmp_path / "missing.onnx", tiny_checkpoint)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kwargs, match", [
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"target": "tpu"}, "target"),
    ({"preferred_batch_sizes": (128,)}, "preferred"),
    ({"tensorrt": True}, "tensorrt needs target gpu"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(RepositoryError, match=match):
        RepositoryConfig(**kwargs)


def test_docker_files_match_the_pinned_image():
    import yaml

    docker = Path(repo.__file__).parent / "docker"
    assert f"ARG TRITON_IMAGE={repo.NGC_IMAGE}" in (docker / "Dockerfile").read_text()
    compose = yaml.safe_load((docker / "docker-compose.yml").read_text())
    service = compose["services"]["triton"]
    mount = next(v for v in service["volumes"] if v["target"] == "/models")
    assert mount["read_only"] is True
    assert service["shm_size"] == "1gb"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "/v2/health/ready" in " ".join(service["healthcheck"]["test"])
    assert {p.split(":")[-2] for p in service["ports"]} == {"8000", "8001", "8002"}


def test_cli_validate(cpu_repo, tmp_path, capsys):
    from serving.cli import main

    assert main(["validate", str(cpu_repo), "--target", "cpu"]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["validate", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "repository not found" in err[0]


def test_failure_inside_the_write_leaves_no_partial_output(cpu_repo, tiny_onnx, tiny_checkpoint, tmp_path,
                                                           monkeypatch):
    out = tmp_path / "repo"
    shutil.copytree(cpu_repo, out)
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")}

    def boom(path, target=None):
        assert (Path(path) / "encoder" / "1" / "model.onnx").is_file()  # called on the complete temp dir
        raise RepositoryError("boom")

    monkeypatch.setattr(repo, "validate_repository", boom)
    with pytest.raises(RepositoryError, match="boom"):
        _write(out, tiny_onnx, tiny_checkpoint, max_batch_size=8)
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]


def test_write_requires_the_encoder_tensor_contract(tiny_onnx, tiny_checkpoint, tmp_path):
    import onnx

    model = onnx.load(str(tiny_onnx))
    kept = [o for o in model.graph.output if o.name != "probabilities"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    no_probs = tmp_path / "no_probs.onnx"
    onnx.save(model, str(no_probs))
    with pytest.raises(RepositoryError, match=r"missing tensors \['probabilities'\]"):
        _write(tmp_path / "r", no_probs, tiny_checkpoint)
    assert not (tmp_path / "r").exists()
