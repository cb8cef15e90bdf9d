"""serving.contract: the one owner of names, tensors, encoders and decoders."""
import json

import numpy as np
import pytest

from serving import contract as c


def test_endpoint_parsing_keeps_tls_and_refuses_contradictions():
    assert c.parse_endpoint("https://h:8000/") == c.Endpoint("h:8000", c.Protocol.HTTP, True)
    assert c.parse_endpoint("grpc://h:8001", "grpc") == c.Endpoint("h:8001", c.Protocol.GRPC, False)
    assert c.parse_endpoint("127.0.0.1:8001", "grpc").protocol is c.Protocol.GRPC
    with pytest.raises(c.ContractError):
        c.parse_endpoint("http://h:8000", "grpc")
    with pytest.raises(c.ContractError):
        c.parse_endpoint("h:8000/v2/models")


def test_signatures_per_head():
    single = c.ServedModel(labels=("neg", "pos"))
    assert [t.name for t in single.outputs] == [c.LABEL, c.PROBABILITIES, c.LOGITS]
    assert single.outputs[1].dims == (2,) and single.outputs[0].triton_type == "TYPE_STRING"
    assert single.default_outputs == (c.LABEL, c.PROBABILITIES)
    pair = c.ServedModel(labels=("a", "b", "c"), text_pair=True)
    assert [t.name for t in pair.inputs] == [c.TEXT, c.TEXT_PAIR]
    reg = c.ServedModel(head=c.Head.REGRESSION)
    assert [(t.name, t.dims) for t in reg.outputs] == [(c.SCORE, (1,))]
    emb = c.ServedModel(name="embedder", head="embedding", embedding_dim=384)
    assert [(t.name, t.dims) for t in emb.outputs] == [(c.EMBEDDING, (384,))]


@pytest.mark.parametrize("kwargs", [
    {"labels": ("only",)}, {"labels": ("a", "a")}, {"head": "embedding"}, {"name": "bad name", "labels": ("a", "b")},
    {"labels": ("a", "b"), "threshold": 1.0}, {"head": "nonsense"},
])
def test_invalid_contracts_are_refused(kwargs):
    with pytest.raises((c.ContractError, ValueError)):
        c.ServedModel(**kwargs)


def test_parameters_round_trip_through_http_and_grpc_config_shapes():
    model = c.ServedModel(labels=("a", "b", "c"), head=c.Head.MULTI_LABEL, threshold=0.3)
    params = model.to_parameters()
    http_cfg = {"name": "classifier", "max_batch_size": 64,
                "parameters": {k: {"string_value": v} for k, v in params.items()}}
    back = c.ServedModel.from_config(http_cfg)
    assert back.labels == model.labels and back.head is c.Head.MULTI_LABEL and back.threshold == 0.3
    assert back.max_batch_size == 64
    legacy = c.ServedModel.from_parameters({"labels": {"string_value": json.dumps(["x", "y"])}})
    assert legacy.labels == ("x", "y")
    with pytest.raises(c.ContractError):
        c.ServedModel.from_parameters({})


def test_http_body_and_pairs():
    body = c.http_infer_body(["a", "b"], pairs=["c", "d"])
    assert [i["name"] for i in body["inputs"]] == [c.TEXT, c.TEXT_PAIR]
    assert body["inputs"][0]["shape"] == [2, 1]
    with pytest.raises(c.ContractError):
        c.http_infer_body(["a"], pairs=["b", "c"])
    with pytest.raises(c.ContractError):
        c.http_infer_body([])


def test_infer_inputs_with_tritonclient():
    import tritonclient.http as httpclient

    inputs = c.infer_inputs(httpclient, ["héllo", "x"])
    assert inputs[0].name() == c.TEXT and inputs[0].shape() == [2, 1]


def test_check_and_decode_single_label():
    model = c.ServedModel(labels=("neg", "pos"))
    out = {c.LABEL: np.array([[b"pos"], [b"neg"]], dtype=object), c.PROBABILITIES: np.array([[0.2, 0.8], [0.9, 0.1]])}
    assert c.check_classification(model, out, 2) == ["pos", "neg"]
    preds = c.decode_classification(model, out)
    assert preds[0].label == "pos" and preds[0].score == pytest.approx(0.8)
    bad = dict(out, **{c.LABEL: np.array([[b"neg"], [b"neg"]], dtype=object)})
    with pytest.raises(c.ContractError, match="does not match"):
        c.check_classification(model, bad, 2)
    with pytest.raises(c.ContractError, match="sum to 1"):
        c.check_classification(model, dict(out, **{c.PROBABILITIES: np.array([[0.5, 0.8], [0.9, 0.1]])}), 2)
    with pytest.raises(c.ContractError, match="rows"):
        c.check_classification(model, out, 3)


@pytest.mark.parametrize("row", [[float("nan"), 0.5, 0.5], [float("inf"), 0.0, 0.0], [-float("inf"), 1.0, 1.0],
                                 [1.2, -0.2, 0.0], [0.5, 0.5, 0.0 - 2e-3]])
def test_check_classification_refuses_nan_inf_and_out_of_range(row):
    model = c.ServedModel(labels=("a", "b", "c"))
    out = {c.LABEL: np.array([[b"a"]], dtype=object), c.PROBABILITIES: np.array([row])}
    with pytest.raises(c.ContractError, match="outside"):
        c.check_classification(model, out, 1)


def test_check_and_decode_multi_label():
    model = c.ServedModel(labels=("a", "b", "c"), head=c.Head.MULTI_LABEL)
    row = c.encode_label_set(["a", "c"])
    out = {c.LABEL: np.array([[row.encode()]], dtype=object), c.PROBABILITIES: np.array([[0.9, 0.1, 0.5]])}
    assert c.check_classification(model, out, 1) == [row]
    pred = c.decode_classification(model, out)[0]
    assert pred.labels == ("a", "c") and pred.label == "a"


def test_http_outputs_reshapes():
    body = {"outputs": [{"name": c.LABEL, "datatype": "BYTES", "shape": [2, 1], "data": ["a", "b"]},
                        {"name": c.PROBABILITIES, "datatype": "FP32", "shape": [2, 2], "data": [1, 0, 0, 1]}]}
    outs = c.http_outputs(body)
    assert outs[c.PROBABILITIES].shape == (2, 2) and c.decode_strings(outs[c.LABEL]) == ["a", "b"]
    with pytest.raises(c.ContractError):
        c.http_outputs({"outputs": [{"name": "x"}]})
