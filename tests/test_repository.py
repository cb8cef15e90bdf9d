"""serving.repository: configs built as protobuf parse back with the right fields; offline validation."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from serving import contract
from serving import repository as repo
from serving.contract import ServedModel
from serving.errors import RepositoryError
from serving.models import token_batch
from serving.repository import RepositoryConfig, Target, read_repository, validate_repository, write_repository

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
                  max_queue_delay_us=1500, max_queue_size=100, default_queue_timeout_us=5_000_000)


@pytest.fixture(scope="module")
def gpu_repo(tiny_onnx, tiny_checkpoint, tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("gpu") / "model_repository", tiny_onnx, tiny_checkpoint,
                  target="gpu", tensorrt=True, encoder_instances=2, max_batch_tokens=4096)


def test_cpu_target_is_one_python_model_per_served_model(cpu_repo):
    assert sorted(p.name for p in cpu_repo.iterdir()) == ["classifier", "provenance.json"]
    cfg = _parse(cpu_repo / "classifier" / "config.pbtxt")
    assert cfg.name == "classifier" and cfg.backend == "python" and cfg.max_batch_size == 32
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.input] == [("TEXT", pb.TYPE_STRING, [1])]
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.output] == [
        ("LABEL", pb.TYPE_STRING, [1]), ("PROBABILITIES", pb.TYPE_FP32, [3]), ("LOGITS", pb.TYPE_FP32, [3])]
    [group] = cfg.instance_group
    assert group.kind == pb.ModelInstanceGroup.KIND_CPU and group.count == len(os.sched_getaffinity(0))
    batching = cfg.dynamic_batching
    assert list(batching.preferred_batch_size) == [8, 16] and batching.max_queue_delay_microseconds == 1500
    policy = batching.default_queue_policy
    assert policy.timeout_action == pb.ModelQueuePolicy.REJECT and not policy.allow_timeout_override
    assert (policy.max_queue_size, policy.default_timeout_microseconds) == (100, 5_000_000)
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["intra_op_threads"] == "2" and params["max_length"] == "64"
    assert params["max_request_bytes"] == str(repo.DEFAULT_MAX_REQUEST_BYTES) and "max_text_chars" not in params
    assert (params["long_text"], params["chunk_overlap"], params["max_chunks"]) == ("truncate", "32", "16")
    assert (params["pad_token"], params["pad_id"], params["truncation_side"]) == ("[PAD]", "0", "right")
    assert ServedModel.from_parameters(dict(cfg.parameters)) == ServedModel(labels=LABELS)
    assert json.loads(params["labels"]) == LABELS


def test_cpu_repository_files_and_provenance(cpu_repo, tiny_onnx):
    version = cpu_repo / "classifier" / "1"
    for rel in ("model.py", "textmodel.py", "tokenization.py", "contract.py", "tokenizer/tokenizer.json", "model.onnx"):
        assert (version / rel).is_file(), rel
    assert (version / "contract.py").read_text() == Path(contract.__file__).read_text()
    prov = json.loads((cpu_repo / "provenance.json").read_text())
    from common.provenance import sha256_file

    assert prov["onnx"]["sha256"] == sha256_file(tiny_onnx)
    assert prov["files"]["classifier/1/model.onnx"] == prov["onnx"]["sha256"]
    assert prov["labels"] == LABELS and prov["exporter"] == {"variant": "fp32"}
    assert prov["target"] == "cpu" and "onnxruntime" in prov["versions"]
    assert prov["resolved"] == {"instances": len(os.sched_getaffinity(0)), "max_request_bytes": 4 << 20}
    assert validate_repository(cpu_repo, Target.CPU) == ["classifier"]


def test_read_repository_round_trip(cpu_repo, gpu_repo, tiny_onnx, tiny_checkpoint):
    from common.provenance import sha256_file

    info = read_repository(cpu_repo)
    assert info.target is Target.CPU and list(info.models) == ["classifier"]
    m = info.model()
    assert m is info.model("classifier") and m.contract == ServedModel(labels=LABELS, max_batch_size=32)
    assert sha256_file(m.onnx_path) == sha256_file(tiny_onnx)
    assert (m.tokenizer_dir / "tokenizer.json").read_bytes() == (tiny_checkpoint / "tokenizer.json").read_bytes()
    assert (m.instances, m.intra_op_threads, m.max_batch_size) == (len(os.sched_getaffinity(0)), 2, 32)
    assert m.batching.max_queue_delay_microseconds == 1500 and m.parts == {}
    assert info.provenance["exporter"] == {"variant": "fp32"}
    with pytest.raises(RepositoryError, match="no served model 'embedder'"):
        info.model("embedder")

    g = read_repository(gpu_repo).model()
    assert g.target is Target.GPU and g.model_names == ["classifier"] and g.parts == {}
    assert g.onnx_path == gpu_repo / "classifier" / "1" / "model.onnx" and g.instances == 2
    assert g.encoder_config is g.config and g.config.backend == "python"


def test_several_served_models_in_one_repository(cpu_repo, tiny_onnx, tiny_checkpoint, tmp_path):
    other = write_repository(tmp_path / "other", onnx_model=tiny_onnx, tokenizer_dir=tiny_checkpoint,
                             id2label=ID2LABEL, config=RepositoryConfig(max_batch_size=8),
                             model=ServedModel(name="sentiment", labels=LABELS))
    both = tmp_path / "both"
    shutil.copytree(cpu_repo, both)
    shutil.copytree(other / "sentiment", both / "sentiment")
    info = read_repository(both)
    assert sorted(info.models) == ["classifier", "sentiment"]
    assert info.model("sentiment").contract.name == "sentiment" and info.model("sentiment").max_batch_size == 8
    assert sorted(validate_repository(both)) == ["classifier", "sentiment"]
    (both / "sentiment" / "1" / "model.onnx").unlink()
    with pytest.raises(RepositoryError, match="ONNX model of 'sentiment'"):
        validate_repository(both)
    with pytest.raises(RepositoryError, match="labels"):
        write_repository(tmp_path / "x", onnx_model=tiny_onnx, tokenizer_dir=tiny_checkpoint, id2label=ID2LABEL,
                         config=RepositoryConfig(), model=ServedModel(labels=("x", "y")))


def test_gpu_target_is_one_batched_python_model(gpu_repo):
    assert validate_repository(gpu_repo, Target.GPU) == ["classifier"]
    assert sorted(p.name for p in gpu_repo.iterdir()) == ["classifier", "provenance.json"]
    cfg = _parse(gpu_repo / "classifier" / "config.pbtxt")
    assert cfg.backend == "python" and cfg.max_batch_size == 64
    [group] = cfg.instance_group
    assert group.kind == pb.ModelInstanceGroup.KIND_MODEL and group.count == 2  # the model places itself
    assert cfg.dynamic_batching.max_queue_delay_microseconds == repo.GPU_QUEUE_DELAY_US > 0
    assert list(cfg.dynamic_batching.preferred_batch_size) == []
    assert [t.name for t in cfg.input] == ["TEXT"] and [t.name for t in cfg.output] == ["LABEL", "PROBABILITIES",
                                                                                        "LOGITS"]
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert (params["target"], params["max_batch_tokens"], params["tensorrt"]) == ("gpu", "4096", "true")
    assert params["overhead_tokens"] == str(token_batch.DEFAULT_OVERHEAD_TOKENS) and params["max_length"] == "128"
    assert ServedModel.from_parameters(dict(cfg.parameters)) == ServedModel(labels=LABELS)
    version = gpu_repo / "classifier" / "1"
    for rel in ("model.py", "textmodel.py", "contract.py", "token_batch.py", "tokenizer/tokenizer.json", "model.onnx"):
        assert (version / rel).is_file(), rel
    assert (version / "model.py").read_text() == (Path(repo.__file__).parent / "models" / "batched.py").read_text()
    with pytest.raises(RepositoryError, match="target gpu, not cpu"):
        validate_repository(gpu_repo, Target.CPU)
    assert json.loads((gpu_repo / "provenance.json").read_text())["ngc_image"] == repo.NGC_IMAGE


def test_validate_refuses_a_token_budget_below_max_length(gpu_repo, tmp_path):
    broken = tmp_path / "repo"
    shutil.copytree(gpu_repo, broken)
    cfg_path = broken / "classifier" / "config.pbtxt"
    cfg = _parse(cfg_path)
    cfg.parameters["max_batch_tokens"].string_value = "100"
    cfg_path.write_text(text_format.MessageToString(cfg))
    with pytest.raises(RepositoryError, match="max_batch_tokens 100 < max_length 128"):
        validate_repository(broken)
    with pytest.raises(RepositoryError, match="max_batch_tokens must be >= max_length"):
        RepositoryConfig(target="gpu", max_length=256, max_batch_tokens=255)


@pytest.mark.parametrize("which, rel, match", [
    ("cpu", "classifier/1/tokenizer/tokenizer.json", "tokenizer file"),
    ("cpu", "classifier/1/model.onnx", "ONNX model of 'classifier'"),
    ("cpu", "classifier/1/contract.py", "python source contract.py of model 'classifier'"),
    ("cpu", "classifier/config.pbtxt", "no served model"),
    ("gpu", "classifier/1/model.onnx", "ONNX model of 'classifier'"),
    ("gpu", "classifier/1/token_batch.py", "python source token_batch.py of model 'classifier'"),
    ("gpu", "classifier/1/model.py", "python source model.py of model 'classifier'"),
])
def test_validate_catches_a_missing_file(cpu_repo, gpu_repo, tmp_path, which, rel, match):
    broken = tmp_path / "repo"
    shutil.copytree(cpu_repo if which == "cpu" else gpu_repo, broken)
    (broken / rel).unlink()
    with pytest.raises(RepositoryError, match=match):
        validate_repository(broken)


def test_validate_catches_an_orphan_model(cpu_repo, tmp_path):
    broken = tmp_path / "repo"
    shutil.copytree(cpu_repo, broken)
    (broken / "stray" / "1").mkdir(parents=True)
    (broken / "stray" / "config.pbtxt").write_text('name: "stray" backend: "python" max_batch_size: 1')
    with pytest.raises(RepositoryError, match=r"\['stray'\] belong to no served model"):
        validate_repository(broken)


@pytest.mark.parametrize("field, value, match", [
    ("opset", repo.NGC_MAX_OPSET + 1, f"opset {repo.NGC_MAX_OPSET + 1} > {repo.NGC_MAX_OPSET}"),
    ("ir", repo.NGC_MAX_IR_VERSION + 1, f"IR version {repo.NGC_MAX_IR_VERSION + 1} > {repo.NGC_MAX_IR_VERSION}")])
def test_validate_catches_onnx_newer_than_the_ngc_runtime(gpu_repo, tmp_path, field, value, match):
    import onnx

    broken = tmp_path / "repo"
    shutil.copytree(gpu_repo, broken)
    path = read_repository(broken).model().onnx_path
    model = onnx.load(str(path))
    if field == "opset":
        next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = value
    else:
        model.ir_version = value
    onnx.save(model, str(path))
    with pytest.raises(RepositoryError, match=match):
        validate_repository(broken, Target.GPU)


def test_an_old_gpu_ensemble_is_refused_with_a_clear_message(gpu_repo, tmp_path):
    broken = tmp_path / "repo"
    shutil.copytree(gpu_repo, broken)
    cfg_path = broken / "classifier" / "config.pbtxt"
    cfg = _parse(cfg_path)
    cfg.ClearField("backend")
    cfg.platform = "ensemble"
    cfg_path.write_text(text_format.MessageToString(cfg))
    with pytest.raises(RepositoryError, match="GPU ensemble of an older build; rebuild"):
        validate_repository(broken)
    cfg_path.write_text("this is { not a config")
    with pytest.raises(RepositoryError, match="cannot parse"):
        validate_repository(broken)


def test_tokenizer_settings_follow_the_checkpoint(tiny_checkpoint, tiny_onnx, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    cfg_path = ck / "tokenizer_config.json"
    doc = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**doc, "truncation_side": "left", "padding_side": "left"}))
    assert repo.tokenizer_settings(ck)["truncation_side"] == "left"
    out = write_repository(tmp_path / "r", onnx_model=tiny_onnx, tokenizer_dir=ck, id2label=ID2LABEL,
                           config=RepositoryConfig(target="gpu"))
    params = _parse(out / "classifier" / "config.pbtxt").parameters
    assert (params["truncation_side"].string_value, params["padding_side"].string_value) == ("left", "left")
    cfg_path.write_text(json.dumps({**doc, "truncation_side": "middle"}))
    with pytest.raises(RepositoryError, match="truncation_side must be 'left' or 'right'"):
        repo.tokenizer_settings(ck)


def test_config_defaults_follow_the_machine_and_max_length():
    cfg = RepositoryConfig(max_length=64)
    assert cfg.instances == len(os.sched_getaffinity(0)) and cfg.max_request_bytes == 4 << 20
    assert RepositoryConfig(encoder_instances=3, max_request_bytes=1 << 20).instances == 3
    for bad in (dict(max_request_bytes=(1 << 20) - 1), dict(long_text="middle"), dict(chunk_overlap=-1),
                dict(max_chunks=0), dict(long_text="chunk", target="gpu"),
                dict(long_text="chunk", max_length=32, chunk_overlap=16), dict(normalize=True)):
        with pytest.raises(RepositoryError):
            RepositoryConfig(**bad)
    assert RepositoryConfig(target="gpu").instances == 1


def test_failed_write_leaves_the_existing_repository_untouched(cpu_repo, tiny_checkpoint, tmp_path):
    import onnx

    out = tmp_path / "repo"
    shutil.copytree(cpu_repo, out)
    before = sorted(p.name for p in out.rglob("*"))
    bad = tmp_path / "new.onnx"
    model = onnx.load(str(read_repository(cpu_repo).model().onnx_path))
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
    ({"target": "gpu", "overhead_tokens": -1}, "overhead_tokens >= 0"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(RepositoryError, match=match):
        RepositoryConfig(**kwargs)


def test_docker_files_match_the_pinned_image():
    import yaml

    docker = Path(repo.__file__).parent / "docker"
    dockerfile = (docker / "Dockerfile").read_text()
    assert f"ARG TRITON_IMAGE={repo.NGC_IMAGE}" in dockerfile
    # the model runs the onnxruntime-gpu wheel the image installs: the version the offline IR/opset check assumes
    assert f"ARG ORT_GPU_VERSION={repo.NGC_ORT_VERSION}" in dockerfile
    assert '"onnxruntime-gpu==${ORT_GPU_VERSION}"' in dockerfile and '"numpy<2"' in dockerfile
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
        assert read_repository(path).model().onnx_path.is_file()  # called on the complete temp dir
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


def test_queue_delay_and_pinning_defaults_follow_the_target():
    """CPU rows run alone, so the CPU model does not wait to batch (delay 0), takes one request per execute call
    and pins its instances; the GPU encoder batches (2000 us). Explicit values win on either target."""
    cpu, gpu = RepositoryConfig(), RepositoryConfig(target=Target.GPU)
    assert (cpu.max_queue_delay_us, gpu.max_queue_delay_us) == (0, repo.GPU_QUEUE_DELAY_US)
    assert (cpu.preferred_batch_sizes, gpu.preferred_batch_sizes) == ((1,), ())  # cpu: one request per execute
    assert RepositoryConfig(preferred_batch_sizes=()).preferred_batch_sizes == ()
    assert RepositoryConfig(max_queue_delay_us=700).max_queue_delay_us == 700
    model = ServedModel(name="classifier", labels=("a", "b"))
    cfg = repo._cpu_config(pb, cpu, model, {"pad_id": 0})
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 0
    assert cfg.parameters["pin_instances"].string_value == "true"
    off = repo._cpu_config(pb, RepositoryConfig(pin_instances=False), model, {"pad_id": 0})
    assert off.parameters["pin_instances"].string_value == "false"


# ------------------------------------------------------------------------------------------- versions


def test_a_build_into_a_repository_serving_the_model_writes_the_next_version(tiny_onnx, tiny_checkpoint, tmp_path):
    """Version 1, then 2 beside it, then 3 (the newest 2 kept), each with its own provenance record; the
    config lists the version directories and serves the newest (version_policy latest 1)."""
    from common.provenance import sha256_file
    from serving.integrity import verify_repository

    out = _write(tmp_path / "r", tiny_onnx, tiny_checkpoint, max_batch_size=8)
    model = read_repository(out).model().contract
    for version in (2, 3):
        repo.add_model(out, onnx_model=tiny_onnx, tokenizer_dir=tiny_checkpoint, model=model,
                       config=RepositoryConfig(max_batch_size=8), provenance={"variant": f"build {version}"})
        info = read_repository(out).model()
        assert info.version == version and info.onnx_path == out / "classifier" / str(version) / "model.onnx"
    assert info.versions == (2, 3) and not (out / "classifier" / "1").exists()
    cfg = _parse(out / "classifier" / "config.pbtxt")
    assert cfg.version_policy.latest.num_versions == 1 and cfg.parameters[repo.VERSIONS_PARAM].string_value == "2,3"
    served = read_repository(out).provenance["served"]["classifier"]
    assert served["version"] == 3 and sorted(served["versions"]) == ["2", "3"]
    assert served["versions"]["2"]["exporter"] == {"variant": "build 2"}
    for v in ("2", "3"):  # each version's own hashes, the same as the repository's
        files = served["versions"][v]["files"]
        assert files and all(k.startswith(f"classifier/{v}/") and sha256_file(out / k) == h for k, h in files.items())
    verify_repository(out)
    validate_repository(out)
    repo.add_model(out, onnx_model=tiny_onnx, tokenizer_dir=tiny_checkpoint, model=model,
                   config=RepositoryConfig(max_batch_size=8), keep_versions=3)
    assert read_repository(out).model().versions == (2, 3, 4)
    # a config the old versions do not fit (another batch size) starts over with the new version alone
    repo.add_model(out, onnx_model=tiny_onnx, tokenizer_dir=tiny_checkpoint, model=model,
                   config=RepositoryConfig(max_batch_size=4))
    assert read_repository(out).model().versions == (5,)
    with pytest.raises(RepositoryError, match="keep_versions"):
        repo.add_model(out, onnx_model=tiny_onnx, tokenizer_dir=tiny_checkpoint, model=model,
                       config=RepositoryConfig(max_batch_size=4), keep_versions=0)


def test_validation_refuses_a_version_list_that_differs_from_the_directories(tiny_onnx, tiny_checkpoint, tmp_path):
    out = _write(tmp_path / "r", tiny_onnx, tiny_checkpoint, max_batch_size=8)
    shutil.copytree(out / "classifier" / "1", out / "classifier" / "2")  # not written by the writer
    with pytest.raises(RepositoryError, match=r"config lists versions 1, the directories are \[1, 2\]"):
        validate_repository(out)
