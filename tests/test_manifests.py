"""Kubernetes manifests: rendered from one config, validated offline against the Kubernetes schemas."""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from serving import manifests as m
from serving.repository import ENSEMBLE, RepositoryConfig, Target

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE = "registry.example.com:5000/ml/triton-textclf:24.08-py3-1"
LOCUST_IMAGE = "registry.example.com/ml/triton-textclf-locust:0.1.0"
URIS = ("s3://models-bucket/textclf/repo", "s3://https://minio.storage.svc:9000/models/repo",
        "gs://models-bucket/textclf/repo", "pvc://model-store/repos/v3")


def make(**overrides) -> m.ManifestConfig:
    values = {"image": IMAGE, "repository_uri": URIS[0], "replicas": 2, "locust_image": LOCUST_IMAGE}
    values.update(overrides)
    return m.ManifestConfig(**values)


def one(files, rel, kind=None):
    docs = [d for d in files[rel] if kind is None or d["kind"] == kind]
    assert len(docs) == 1, (rel, kind, docs)
    return docs[0]


def flags(args: list[str]) -> dict[str, str]:
    assert args[0] == "tritonserver"
    out = {}
    for arg in args[1:]:
        key, sep, value = arg.partition("=")
        assert arg.startswith("--") and sep, f"flag {arg!r} is not --name=value"
        assert key not in out, f"{key} given twice"
        out[key] = value
    return out


def triton_container(files):
    spec = one(files, "deployment.yaml")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


# ----------------------------------------------------------------------------------- schema validation

@pytest.mark.parametrize("uri", URIS)
@pytest.mark.parametrize("version", [m.KUBERNETES_VERSION, "1.37"])
def test_every_object_validates_offline(uri, version):
    files = m.render_manifests(make(repository_uri=uri))
    kinds = sorted({d.get("kind", "values") for docs in files.values() for d in docs})
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "InferenceService", "Kustomization",
                     "Namespace", "NetworkPolicy", "PodDisruptionBudget", "PrometheusRule", "Service", "ServiceAccount",
                     "ServiceMonitor", "values"]
    assert m.validate_manifests(files, version) == []


def test_validation_reports_broken_objects():
    """The validator can fail: typos and wrong types in core kinds, CRDs and the KServe container are caught."""
    files = copy.deepcopy(m.render_manifests(make()))
    _, container = triton_container(files)
    container["readinessProbe"]["httpGett"] = {"path": "/v2/health/ready"}
    files["service.yaml"][0]["spec"]["ports"][0]["port"] = "http"
    files["hpa.yaml"][0]["spec"]["maxReplicas"] = "four"
    files["servicemonitor.yaml"][0]["spec"]["endpoints"][0]["interval"] = "15 seconds"
    files["kserve/inferenceservice.yaml"][0]["spec"]["predictor"]["model"]["volumeMount"] = []
    files["kserve/inferenceservice.yaml"][0]["spec"]["predictor"]["model"]["storageUri"] = "ftp://x/y"
    files["kustomization.yaml"][0]["resource"] = ["deployment.yaml"]
    files["prometheus-adapter/values.yaml"][0]["rules"]["custom"][0]["metricsQuery"] = "sum(up)"
    problems = m.validate_manifests(files)
    text = "\n".join(problems)
    for needle in ("httpGett", "spec.ports.0.port", "maxReplicas", "interval", "volumeMount", "ftp://",
                   "kustomization.yaml", "<<.LabelMatchers>>"):
        assert needle in text, (needle, text)


# ----------------------------------------------------------------------------------- consistency

def test_ports_probes_and_args_agree():
    config = make(http_port=9000, grpc_port=9001, metrics_port=9002)
    files = m.render_manifests(config)
    _, container = triton_container(files)
    args = flags(container["args"])
    # the command replaces the image's ENTRYPOINT (serving/docker/Dockerfile's names another repository)
    assert container["command"] == [m.NGC_ENTRYPOINT]
    assert args["--model-control-mode"] == "none" and args["--strict-readiness"] == "true"
    assert args["--model-repository"] == config.repository_uri
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named == {"http": int(args["--http-port"]), "grpc": int(args["--grpc-port"]),
                     "metrics": int(args["--metrics-port"])} == {"http": 9000, "grpc": 9001, "metrics": 9002}
    for probe, path in (("startupProbe", "/v2/health/live"), ("readinessProbe", "/v2/health/ready")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and named[get["port"]] == config.http_port
    script = container["livenessProbe"]["exec"]["command"][-1]  # one-row inference on the served model
    assert f"http://127.0.0.1:{config.http_port}/v2/models/{ENSEMBLE}/infer" in script
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= config.startup_timeout_s
    main, headless = files["service.yaml"]
    for service in (main, headless):
        for port in service["spec"]["ports"]:
            assert named[port["targetPort"]] == port["port"] == named[port["name"]]
        assert service["spec"]["selector"].items() <= container_labels(files).items()
    assert {p["name"] for p in main["spec"]["ports"]} == {"http", "grpc", "metrics"}
    assert headless["spec"]["clusterIP"] == "None"
    annotations = one(files, "deployment.yaml")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == args["--metrics-port"]


def container_labels(files):
    return one(files, "deployment.yaml")["spec"]["template"]["metadata"]["labels"]


def test_shared_memory_grace_period_resources_and_security():
    config = make(shm_size="2Gi", memory="24Gi", gpus_per_pod=2, exit_timeout_s=45)
    files = m.render_manifests(config)
    spec, container = triton_container(files)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {v["mountPath"]: v["name"] for v in container["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": "2Gi"}
    assert "/tmp" in mounts and "sizeLimit" in volumes[mounts["/tmp"]]["emptyDir"]
    exit_timeout = int(flags(container["args"])["--exit-timeout-secs"])
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert exit_timeout == 45 and spec["terminationGracePeriodSeconds"] > exit_timeout + pre_stop
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == 2
    assert m.parse_quantity(limits["memory"]) > m.parse_quantity(shm["sizeLimit"])
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True and security["capabilities"] == {"drop": ["ALL"]}
    assert spec["securityContext"]["runAsUser"] == m.TRITON_UID
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


def test_hpa_scales_the_deployment_on_the_adapter_metric():
    config = make(replicas=2, max_replicas=6, target_queue_us=30_000)
    files = m.render_manifests(config)
    deployment = one(files, "deployment.yaml")
    hpa = one(files, "hpa.yaml")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "30000"}
    (rule,) = one(files, "prometheus-adapter/values.yaml")["rules"]["custom"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert rule["seriesQuery"].startswith(m.QUEUE_METRIC + "{")
    assert f'model="{ENSEMBLE}"' in rule["metricsQuery"] and m.SUCCESS_METRIC in rule["metricsQuery"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    # the adapter's pod label must find these pods: the ServiceMonitor scrapes the main Service only
    monitor = one(files, "servicemonitor.yaml")["spec"]
    main, headless = files["service.yaml"]
    assert monitor["selector"]["matchLabels"].items() <= main["metadata"]["labels"].items()
    assert not monitor["selector"]["matchLabels"].items() <= headless["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] == "metrics"
    assert one(files, "pdb.yaml")["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_fixed_replicas_without_autoscaling():
    files = m.render_manifests(make(replicas=3, autoscale=False))
    assert one(files, "deployment.yaml")["spec"]["replicas"] == 3
    assert "hpa.yaml" not in files and "prometheus-adapter/values.yaml" not in files
    assert "hpa.yaml" not in one(files, "kustomization.yaml")["resources"]
    predictor = one(files, "kserve/inferenceservice.yaml")["spec"]["predictor"]
    assert predictor["minReplicas"] == predictor["maxReplicas"] == 3


@pytest.mark.parametrize("uri", URIS)
def test_repository_delivery(uri):
    config = make(repository_uri=uri)
    spec, container = triton_container(m.render_manifests(config))
    repo = flags(container["args"])["--model-repository"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    if uri.startswith("pvc://"):
        assert repo == f"{m.PVC_MOUNT}/repos/v3"
        assert volumes["model-repository"]["persistentVolumeClaim"] == {"claimName": "model-store", "readOnly": True}
        (mount,) = [v for v in container["volumeMounts"] if v["name"] == "model-repository"]
        assert mount["readOnly"] is True and repo.startswith(mount["mountPath"])
    elif uri.startswith("gs://"):
        assert repo == uri
        env = {e["name"]: e.get("value") for e in container["env"]}
        key = volumes["gcs-credentials"]["secret"]
        assert key["secretName"] == config.credentials_secret
        assert env["GOOGLE_APPLICATION_CREDENTIALS"] == f"{m.GCS_KEY_DIR}/{key['items'][0]['path']}"
    else:
        assert repo == uri  # Triton reads s3:// (and s3://[https://]host:port/...) itself
        assert "envFrom" not in container  # one secretKeyRef per key, never the whole Secret
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
        assert refs["AWS_ACCESS_KEY_ID"] == {"name": config.credentials_secret, "key": "AWS_ACCESS_KEY_ID"}
        assert refs["AWS_SECRET_ACCESS_KEY"]["key"] == "AWS_SECRET_ACCESS_KEY"
        assert refs["AWS_DEFAULT_REGION"]["optional"] is True


def test_workload_identity_needs_no_secret():
    files = m.render_manifests(make(credentials_secret="", service_account_annotations=[
        "eks.amazonaws.com/role-arn=arn:aws:iam::123456789012:role/triton-read"]))
    _, container = triton_container(files)
    assert "envFrom" not in container and not any(e["name"].startswith("AWS_") for e in container["env"])
    account = one(files, "serviceaccount.yaml")
    assert account["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/triton-read"}
    assert "kserve/serviceaccount.yaml" not in files


def test_kserve_alternative():
    config = make(repository_uri=URIS[1])
    files = m.render_manifests(config)
    isvc = one(files, "kserve/inferenceservice.yaml")
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "triton"} and model["runtime"] == m.KSERVE_RUNTIME
    assert model["storageUri"] == "s3://models/repo"  # KServe takes the endpoint from the credentials
    assert model["image"] == IMAGE and model["command"] == [m.NGC_ENTRYPOINT]
    args = flags(["tritonserver", *model["args"]])
    assert "--model-repository" not in args and "--model-store" not in args  # KServe's runtime passes it
    assert args["--strict-readiness"] == "true"
    assert predictor["terminationGracePeriodSeconds"] > int(args["--exit-timeout-secs"])
    shm = {v["name"]: v for v in predictor["volumes"]}["dshm"]["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": config.shm_size}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in model["volumeMounts"]
    assert model["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": m.KSERVE_HTTP_PORT}
    account = one(files, "kserve/serviceaccount.yaml")
    assert predictor["serviceAccountName"] == account["metadata"]["name"]
    assert account["secrets"] == [{"name": config.credentials_secret}]
    assert set(one(files, "kserve/kustomization.yaml")["resources"]) == {
        "namespace.yaml", "inferenceservice.yaml", "serviceaccount.yaml", "networkpolicy.yaml"}


def test_locust_objects_point_at_the_service():
    config = make(locust_workers=4)
    master, workers, service, policy = m.render_manifests(config)["locust/locust.yaml"]
    (mc,), (wc,) = master["spec"]["template"]["spec"]["containers"], workers["spec"]["template"]["spec"]["containers"]
    assert f"--host=http://{config.name}.{config.namespace}.svc.cluster.local:{config.http_port}" in mc["args"]
    assert "--master" in mc["args"] and "--expect-workers=4" in mc["args"] and workers["spec"]["replicas"] == 4
    assert f"--master-host={service['metadata']['name']}" in wc["args"]
    assert service["spec"]["selector"] == master["spec"]["selector"]["matchLabels"]
    # not exposed cluster-wide: the web UI binds the pod's loopback (kubectl port-forward), the Service has
    # only the worker port, and only worker pods may reach it
    assert "--web-host=127.0.0.1" in mc["args"] and [p["name"] for p in service["spec"]["ports"]] == ["master"]
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["podSelector"] == master["spec"]["selector"]
    ((rule,),) = [policy["spec"]["ingress"]]
    assert rule["from"] == [{"podSelector": workers["spec"]["selector"]}]
    grpc = m.render_manifests(make(locust_user_class="TritonGrpcUser"))["locust/locust.yaml"][0]
    assert any(a.startswith("--host=grpc://") and a.endswith(":8001")
               for a in grpc["spec"]["template"]["spec"]["containers"][0]["args"])


# ----------------------------------------------------------------------------------- security

RESTRICTED = "shared-memory,model-repository,logging,trace,statistics:triton-admin-key=$(TRITON_ADMIN_KEY)"


def test_admin_apis_restricted_to_the_secret_key_in_deployment_and_kserve():
    """Both server kinds get the same restriction flags from serving.triton_args, the key from one Secret key."""
    config = make(admin_secret="my-admin")
    files = m.render_manifests(config)
    _, container = triton_container(files)
    model = one(files, "kserve/inferenceservice.yaml")["spec"]["predictor"]["model"]
    for args, env in ((flags(container["args"]), container["env"]), (flags(["tritonserver", *model["args"]]),
                                                                      model["env"])):
        assert args["--http-restricted-api"] == args["--grpc-restricted-protocol"] == RESTRICTED
        (ref,) = [e["valueFrom"]["secretKeyRef"] for e in env if e["name"] == "TRITON_ADMIN_KEY"]
        assert ref == {"name": "my-admin", "key": m.ADMIN_SECRET_KEY}
    assert "Secret" not in {d.get("kind") for docs in files.values() for d in docs}  # never a key in a manifest


def test_network_policies_open_inference_to_the_namespace_and_metrics_to_monitoring():
    config = make(ingress_namespace="ingress-nginx", monitoring_namespace="observability")
    files = m.render_manifests(config)
    policy = one(files, "networkpolicy.yaml")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= container_labels(files).items()
    inference, metrics = policy["spec"]["ingress"]
    assert [p["port"] for p in inference["ports"]] == ["http", "grpc"]
    assert inference["from"] == [{"podSelector": {}}, {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "ingress-nginx"}}}]
    assert [p["port"] for p in metrics["ports"]] == ["metrics"]
    assert metrics["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "observability"}}}]
    kserve = one(files, "kserve/networkpolicy.yaml")
    assert [p["port"] for p in kserve["spec"]["ingress"][0]["ports"]] == [m.KSERVE_HTTP_PORT, 9000]
    none = m.render_manifests(make(network_policy=False, kserve_mode="Serverless"))
    assert "networkpolicy.yaml" not in none and "kserve/networkpolicy.yaml" not in none


def test_kserve_canary_rollout_is_generated_for_serverless_only():
    """The canary path: a new --repository-uri with --canary-percent 10 sends 10 % to the new revision;
    100 promotes it, 0 rolls back. KServe splits traffic between Knative revisions: Serverless only."""
    plain = one(m.render_manifests(make(kserve_mode="Serverless")), "kserve/inferenceservice.yaml")
    assert "canaryTrafficPercent" not in plain["spec"]["predictor"]
    files = m.render_manifests(make(kserve_mode="Serverless", repository_uri=URIS[3], canary_percent=10))
    predictor = one(files, "kserve/inferenceservice.yaml")["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 10 and predictor["model"]["storageUri"] == "pvc://model-store/repos/v3"
    assert m.validate_manifests(files) == []
    assert one(m.render_manifests(make(kserve_mode="Serverless", canary_percent=0)),
               "kserve/inferenceservice.yaml")["spec"]["predictor"]["canaryTrafficPercent"] == 0
    with pytest.raises(m.ManifestError, match="Serverless"):
        make(canary_percent=10)  # RawDeployment: no revisions to split between
    with pytest.raises(m.ManifestError, match="0..100"):
        make(kserve_mode="Serverless", canary_percent=101)


def test_images_pinnable_by_digest():
    digest = "registry.example.com/ml/triton@sha256:" + "a" * 64
    assert one(m.render_manifests(make(image=digest, locust_image=None, require_digest=True)),
               "deployment.yaml")["spec"]["template"]["spec"]["containers"][0]["image"] == digest
    with pytest.raises(m.ManifestError, match="not pinned by digest"):
        make(require_digest=True)


# ----------------------------------------------------------------------------------- bad values

@pytest.mark.parametrize("overrides, needle", [
    ({"replicas": 0}, "replicas"),
    ({"repository_uri": "ftp://bucket/repo"}, "s3://, gs:// or pvc://"),
    ({"repository_uri": "models/repo"}, "must be s3://"),
    ({"repository_uri": "s3://Bad_Bucket/repo"}, "bucket name"),
    ({"repository_uri": "pvc://store/../etc"}, "'..'"),
    ({"image": "Registry.Example.com/ML/Triton:1"}, "not a valid image reference"),
    ({"image": "nvcr.io/nvidia/tritonserver"}, "no tag"),
    ({"image": "nvcr.io/nvidia/tritonserver:latest"}, "latest"),
    ({"image": "triton server:1"}, "not a valid image reference"),
    ({"shm_size": "1GB"}, "not a Kubernetes quantity"),
    ({"shm_size": "1Mi"}, "floor"),
    ({"memory": "1Gi", "shm_size": "1Gi"}, "must exceed shm size"),
    ({"grace_period_s": 30}, "grace period"),
    ({"min_replicas": 3, "max_replicas": 2}, "min (3) <= max (2)"),
    ({"target_queue_us": 2000}, "dynamic-batching floor"),
    ({"gpus_per_pod": 0}, "runs on CUDA"),
    ({"name": "Triton"}, "DNS label"),
    ({"service_type": "Ingress"}, "ClusterIP"),
])
def test_bad_values_are_refused(overrides, needle):
    with pytest.raises(m.ManifestError) as info:
        make(**overrides)
    assert needle in str(info.value)


@pytest.mark.parametrize("image", [
    "nvcr.io/nvidia/tritonserver:24.08-py3", "localhost:5000/triton:1.0", "triton-textclf:0.1",
    "registry.example.com/a/b@sha256:" + "a" * 64, "ghcr.io/org/img:v1.2.3@sha256:" + "0" * 64])
def test_good_image_references(image):
    assert m.check_image(image) == image


def test_cpu_only_pods_with_the_cpu_target():
    files = m.render_manifests(make(gpus_per_pod=0, repository=RepositoryConfig(target=Target.CPU)))
    spec, container = triton_container(files)
    assert "nvidia.com/gpu" not in container["resources"]["limits"] and "tolerations" not in spec
    assert flags(container["args"])["--allow-gpu-metrics"] == "false"
    assert m.validate_manifests(files) == []


def test_shm_floor_follows_the_repository_config():
    small = m.estimate_shm_bytes(RepositoryConfig(target=Target.GPU))
    big = m.estimate_shm_bytes(RepositoryConfig(target=Target.GPU, max_batch_size=256, max_length=512,
                                                encoder_instances=8))
    assert 0 < small < big
    with pytest.raises(m.ManifestError, match="floor"):
        make(shm_size="64Mi", repository=RepositoryConfig(target=Target.GPU, max_batch_size=256, max_length=512,
                                                           encoder_instances=12))


# ----------------------------------------------------------------------------------- CLI

ARGS = ["--image", IMAGE, "--repository-uri", URIS[2], "--replicas", "2", "--namespace", "serving",
        "--shm-size", "2Gi", "--max-replicas", "5", "--target-queue-us", "25000", "--validate"]


def test_cli_writes_every_file(tmp_path, capsys):
    out = tmp_path / "k8s"
    (out / "stale").mkdir(parents=True)
    (out / "stale" / "old.yaml").write_text("kind: Old\n")
    assert m.main([*ARGS, "--out", str(out)]) == 0
    assert not (out / "stale").exists()  # the directory is replaced whole
    config = m.config_from_args(_parse(ARGS))
    expected = m.render_manifests(config)
    written = {str(p.relative_to(out)) for p in out.rglob("*.yaml")}
    assert written == set(expected)
    for rel, docs in expected.items():
        assert list(yaml.safe_load_all((out / rel).read_text())) == docs
    for kustomization in out.rglob("kustomization.yaml"):
        for resource in yaml.safe_load(kustomization.read_text())["resources"]:
            assert (kustomization.parent / resource).is_file()
    record = json.loads((out / "render.json").read_text())
    assert record["config"]["namespace"] == "serving" and record["config"]["shm_size"] == "2Gi"
    assert one(expected, "hpa.yaml")["spec"]["maxReplicas"] == 5
    assert "kubectl apply -k" in capsys.readouterr().out


def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    m.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("bad", [
    ["--replicas", "0"], ["--repository-uri", "http://bucket/repo"], ["--image", "UPPER/case:1"],
    ["--shm-size", "lots"], ["--node-selector", "novalue"]])
def test_cli_bad_value_one_line_nothing_written(tmp_path, capsys, bad):
    out = tmp_path / "k8s"
    argv = ["--image", IMAGE, "--repository-uri", URIS[0], "--out", str(out), *bad]
    assert m.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("python -m serving manifests: error: "), err
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- distributed Locust

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rendered_locust_master_and_workers_run_distributed(tmp_path):
    """Run the rendered master/worker command lines with the real locustfile on loopback.

    Only the addresses change (cluster DNS -> 127.0.0.1) plus a short headless run. The target port has
    nothing listening, so requests fail fast: this checks the distributed wiring and the arguments, not
    the server.
    """
    config = make(locust_workers=2)
    master, workers, _, _ = m.render_manifests(config)["locust/locust.yaml"]
    (mc,), (wc,) = master["spec"]["template"]["spec"]["containers"], workers["spec"]["template"]["spec"]["containers"]
    bind, dead = _free_port(), _free_port()
    env = {**os.environ, **{e["name"]: e["value"] for e in mc["env"]}, "PYTHONPATH": str(REPO_ROOT),
           "LOCUST_LOCUSTFILE": str(REPO_ROOT / "loadtest" / "locustfile.py"), "HOME": str(tmp_path)}

    def localize(args):
        out = []
        for a in args:
            if a.startswith("--host="):
                a = f"--host=http://127.0.0.1:{dead}"
            elif a.startswith(("--master-bind-port=", "--master-port=")):
                a = a.split("=")[0] + f"={bind}"
            elif a.startswith("--master-host="):
                a = "--master-host=127.0.0.1"
            out.append(a)
        return out

    locust = [sys.executable, "-m", "locust"]
    master_cmd = [*locust, *localize(mc["args"]), "--master-bind-host=127.0.0.1", "--headless", "-u", "2",
                  "-r", "2", "-t", "2s", "--csv", str(tmp_path / "run"), "--texts-per-request", "1",
                  "--request-timeout", "2", "--check-labels", "false"]
    master_proc = subprocess.Popen(master_cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
    worker_procs = [subprocess.Popen([*locust, *localize(wc["args"])], env=env, cwd=tmp_path,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    for _ in range(workers["spec"]["replicas"])]
    try:
        output, _ = master_proc.communicate(timeout=90)
    finally:
        for proc in worker_procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if master_proc.poll() is None:
            master_proc.kill()
    assert "2 workers connected" in output or "(2 total workers)" in output, output[-3000:]
    stats = (tmp_path / "run_stats.csv").read_text().splitlines()
    aggregated = [line for line in stats if ",Aggregated," in line]
    assert aggregated, stats
    requests = int(aggregated[0].split(",")[2])
    assert requests > 0  # workers sent requests (they fail: nothing listens on the port)


def test_public_entry_python_m_serving_manifests(tmp_path, capsys):
    """`python -m serving manifests` (serving.cli) registers these flags and maps errors to one line."""
    from serving.cli import main as serving_main

    out = tmp_path / "k8s"
    assert serving_main(["manifests", *ARGS, "--out", str(out)]) == 0
    assert (out / "kustomization.yaml").is_file() and (out / "kserve" / "inferenceservice.yaml").is_file()
    assert serving_main(["manifests", "--image", IMAGE, "--repository-uri", "hdfs://x/y",
                         "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
    assert "error: repository URI 'hdfs://x/y'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- real tritonserver

@pytest.mark.server
def test_rendered_triton_args_probes_and_adapter_metric_on_a_real_server(tiny_checkpoint, tmp_path):
    """The rendered container command line runs the bundled tritonserver (CPU target, loopback).

    Only the repository path (the PVC mount -> a local directory) and the bind addresses change. Then the
    Deployment's probe paths must answer 200 on the named port, and the prometheus-adapter rule, evaluated
    on two real /metrics scrapes around real requests, must find its series and give a queue time per
    request between 0 and the measured request latency.
    """
    import re
    import threading
    import urllib.error
    import urllib.request

    from serving_helpers import corpus_texts, export_tiny_onnx

    from serving.repository import write_repository
    from serving.server import LocalTritonServer, ServerConfig, free_port

    repo_config = RepositoryConfig(max_batch_size=8, max_queue_delay_us=1000, intra_op_threads=1)
    repository = write_repository(tmp_path / "repos" / "v1", onnx_model=export_tiny_onnx(
        tiny_checkpoint, tmp_path / "model.onnx"), tokenizer_dir=tiny_checkpoint,
        id2label={0: "negative", 1: "neutral", 2: "positive"}, config=repo_config)
    ports = sorted({free_port() for _ in range(6)})[:3]
    config = make(repository_uri="pvc://model-store/repos/v1", gpus_per_pod=0, repository=repo_config,
                  http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2], exit_timeout_s=5)
    files = m.render_manifests(config)
    _, container = triton_container(files)
    rendered = flags(container["args"])
    assert rendered["--model-repository"] == f"{m.PVC_MOUNT}/repos/v1"

    class RenderedServer(LocalTritonServer):
        def command(self, backends):  # the kubelet expands $(TRITON_ADMIN_KEY) from the Secret
            args = [a.replace(m.PVC_MOUNT, str(tmp_path)).replace("$(TRITON_ADMIN_KEY)", self.admin_key)
                    for a in container["args"][1:]]
            return [str(super().command(backends)[0]), *args, f"--backend-directory={backends}",
                    "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"]

    texts = corpus_texts(64)
    latencies: list[float] = []
    with RenderedServer(ServerConfig(repository, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
                                     startup_timeout_s=120, exit_timeout_s=config.exit_timeout_s)) as server:
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("startupProbe", "readinessProbe"):
            get = container[probe]["httpGet"]
            with urllib.request.urlopen(f"http://127.0.0.1:{named[get['port']]}{get['path']}", timeout=5) as resp:
                assert resp.status == 200, probe
        liveness = [sys.executable if c == "python3" else c for c in container["livenessProbe"]["exec"]["command"]]
        assert subprocess.run(liveness, timeout=10).returncode == 0
        admin = urllib.request.Request(f"http://{server.http_url}/v2/repository/index", data=b"{}")
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(admin, timeout=5)

        def scrape() -> list[tuple[str, dict[str, str], float]]:
            with urllib.request.urlopen(f"http://127.0.0.1:{named['metrics']}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            samples = []
            for line in text.splitlines():
                match = re.match(r"^(\w+)\{([^}]*)\} (\S+)$", line)
                if match:
                    labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
                    samples.append((match.group(1), labels, float(match.group(3))))
            return samples

        def send(chunk: list[str]) -> None:
            body = json.dumps({"inputs": [{"name": "TEXT", "shape": [len(chunk), 1], "datatype": "BYTES",
                                           "data": chunk}]}).encode()
            request = urllib.request.Request(f"http://{server.http_url}/v2/models/{ENSEMBLE}/infer", data=body,
                                             headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(request, timeout=60) as resp:
                assert resp.status == 200
            latencies.append((time.perf_counter() - t0) * 1e6)

        before = scrape()
        threads = [threading.Thread(target=send, args=(texts[i:i + 4],)) for i in range(0, len(texts), 4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # Triton counts a success when it releases the request, which can come after the client has its
        # answer: scrape until every request sent is counted (or 10 s pass, and the assertion below says so)
        after = _settled(scrape, before, m.SUCCESS_METRIC, len(threads))
        # a dead python stub: /v2/health/live stays 200, the liveness exec probe fails
        from serving.supervisor import stub_processes

        stubs = stub_processes(server.process.pid)
        for stub in stubs.values():  # every instance: a request must not find a healthy one
            stub.kill()
        time.sleep(1.0)
        with urllib.request.urlopen(f"http://{server.http_url}/v2/health/live", timeout=5) as resp:
            assert resp.status == 200
        assert subprocess.run(liveness, timeout=10, capture_output=True).returncode == 1
        t_stop = time.perf_counter()
    stop_s = time.perf_counter() - t_stop
    assert len(latencies) == len(threads) == 16
    assert stop_s < config.grace_period_s  # an idle server exits well inside the grace period

    (rule,) = m.adapter_values(config)["rules"]["custom"]
    series = rule["seriesQuery"].split("{")[0]
    assert any(name == series for name, _, _ in after)
    selectors = re.findall(r'(\w+)\{<<\.LabelMatchers>>,model(=~?)"([\w|]+)"\}', rule["metricsQuery"])
    assert [s[0] for s in selectors] == [m.QUEUE_METRIC, m.SUCCESS_METRIC]

    def delta(name: str, op: str, model: str) -> tuple[float, int]:
        def pick(samples):
            return {tuple(sorted(lab.items())): v for n, lab, v in samples
                    if n == name and re.fullmatch(model, lab.get("model", ""))}
        old, new = pick(before), pick(after)
        assert new, f"no series {name}{{model{op}{model!r}}} on the real server"
        return sum(v - old.get(k, 0.0) for k, v in new.items()), len(new)

    queue_us, queue_series = delta(*selectors[0])
    successes, _ = delta(*selectors[1])
    assert queue_series == len(m.batched_models(Target.CPU)) == 1  # the one CPU model
    assert successes == len(threads)
    per_request = queue_us / successes
    print(f"adapter metric on the real server: {per_request:.0f} us queued per request, mean latency "
          f"{sum(latencies) / len(latencies):.0f} us over {successes:.0f} requests; idle stop {stop_s:.2f} s")
    assert 0 < per_request < sum(latencies) / len(latencies), (per_request, latencies)


def _settled(scrape, before, name: str, expected: int, timeout_s: float = 10.0):
    """``scrape()`` once the counter ``name`` has grown by ``expected`` since ``before`` (or at the timeout)."""
    def total(samples) -> float:
        return sum(v for n, _, v in samples if n == name)

    deadline = time.monotonic() + timeout_s
    after = scrape()
    while total(after) - total(before) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
        after = scrape()
    return after


@pytest.mark.skipif(__import__("shutil").which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_builds_each_directory(tmp_path):
    """`kubectl kustomize` (offline) builds every rendered kustomization into exactly the rendered objects."""
    config = make()
    files = m.write_manifests(config, tmp_path / "k8s")
    for sub in ("", "kserve", "locust"):
        directory = tmp_path / "k8s" / sub
        proc = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        built = sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(proc.stdout) if d)
        listed = one(files, f"{sub}/kustomization.yaml".lstrip("/"))["resources"]
        expected = sorted((d["kind"], d["metadata"]["name"])
                          for rel in listed for d in files[f"{sub}/{rel}".lstrip("/")])
        assert built == expected and built


GATEWAY_IMAGE = "registry.example.com/ml/triton-textclf-gateway:0.1.0"


def test_gateway_container_beside_tritonserver():
    """--gateway-image: the gateway runs in every pod on the pvc repository, its key from a Secret, its port in
    the Service and the NetworkPolicy; without a volume repository it is refused with one line."""
    files = m.render_manifests(make(repository_uri=URIS[3], gateway_image=GATEWAY_IMAGE, gateway_port=8080))
    assert m.validate_manifests(files, m.KUBERNETES_VERSION) == []
    spec = one(files, "deployment.yaml")["spec"]["template"]["spec"]
    triton, gateway = spec["containers"]
    assert triton["name"] == "tritonserver" and gateway["image"] == GATEWAY_IMAGE
    args = gateway["args"]
    assert args[:4] == ["python", "-m", "serving", "gateway"]
    assert args[args.index("--repository") + 1] == flags(triton["args"])["--model-repository"]
    assert args[args.index("--triton-url") + 1] == "127.0.0.1:8001"
    assert gateway["env"][1] == {"name": "TEXTCLF_API_KEY", "valueFrom": {"secretKeyRef": {
        "name": "textclf-gateway", "key": "api-key"}}}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/health", "port": "gateway"}
    assert gateway["securityContext"]["readOnlyRootFilesystem"] and gateway["securityContext"]["runAsNonRoot"]
    assert {"name": "model-repository", "mountPath": "/mnt/model-repository", "readOnly": True} in gateway["volumeMounts"]
    service = next(s for s in files["service.yaml"] if not s["metadata"]["name"].endswith("headless"))
    assert {"name": "gateway", "port": 8080, "targetPort": "gateway", "protocol": "TCP"} in service["spec"]["ports"]
    assert [p["port"] for p in one(files, "networkpolicy.yaml")["spec"]["ingress"][0]["ports"]] == [
        "http", "grpc", "gateway"]
    with pytest.raises(m.ManifestError, match="pvc://"):
        make(gateway_image=GATEWAY_IMAGE)
    assert len(triton_container(m.render_manifests(make()))[0]["containers"]) == 1  # off without an image


def test_dashboard_and_alert_rules_ship_with_the_manifests():
    """The PrometheusRule (with the ServiceMonitor) and the dashboard ConfigMap are rendered and applied by
    kustomize; the plain copies in serving/deploy/k8s/monitoring/ are what the module renders now."""
    from serving.manifests import monitoring

    files = m.render_manifests(make())
    rule = one(files, "prometheusrule.yaml", "PrometheusRule")
    assert [g["name"] for g in rule["spec"]["groups"]] == ["textclf.records", "textclf.alerts"]
    alerts = {r["alert"] for r in rule["spec"]["groups"][1]["rules"]}
    assert alerts == {"TextclfErrorRatioHigh", "TextclfP99LatencyHigh", "TextclfQueueTimeHigh",
                      "TextclfLabelMixShift", "TextclfConfidenceShift"}
    board = json.loads(one(files, "grafana-dashboard.yaml", "ConfigMap")["data"][monitoring.DASHBOARD_FILE])
    assert board == monitoring.dashboard()
    assert {"prometheusrule.yaml", "grafana-dashboard.yaml"} <= set(one(files, "kustomization.yaml")["resources"])
    assert "prometheusrule.yaml" not in m.render_manifests(make(service_monitor=False))
    assert "--metrics-config=summary_latencies=true" in m.triton_args(make())  # the p99 and queue summaries
    for name, text in monitoring.static_files().items():
        assert (monitoring.STATIC_DIR / name).read_text() == text, f"regenerate: python -m serving.manifests.monitoring"
