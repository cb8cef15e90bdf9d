"""Stage 1: PyTorch checkpoint -> ONNX with Optimum's export configuration and the TorchScript exporter, plus the
head's `probabilities` output (Softmax for single-label, Sigmoid for multi-label, none for regression)."""
from __future__ import annotations

import itertools
import logging
import shutil
from pathlib import Path

from exporter import inputs
from exporter.errors import CheckpointError, ExporterError
from exporter.memory import release_memory
from exporter.optimize import save_model
from serving.contract import ENCODER_INPUTS, ENCODER_LOGITS, ENCODER_PROBABILITIES, TOKEN_TYPE_IDS, Head

log = logging.getLogger(__name__)
TASK = "text-classification"
WEIGHTS_FILE = "weights.onnx.data"  # scratch external data beside the graph while the export runs


def export_onnx(checkpoint: Path, out_dir: Path, *, opset: int | None = None) -> Path:
    """Export ``checkpoint`` to ``out_dir/model.onnx`` (one file, dynamic batch/sequence axes) and return the path.

    The torch exporter writes the graph without its weights (``export_params=False``; holding the weights in
    its ModelProto, the serialized string and the Python copy at once cost 2.5 GB on BERT-base); the weights
    are then written from the model's own tensors as ONNX external data, one at a time, and streamed into the
    final file (:func:`exporter.optimize.save_model`). The graph gets the head's ``probabilities`` output
    (:func:`add_probabilities`), every model input is int64 and named as in
    :data:`serving.contract.ENCODER_INPUTS`, and the result passes ``onnx.checker``.
    """
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    path, data = out_dir / "model.onnx", out_dir / WEIGHTS_FILE
    try:
        model, config = _load(checkpoint)
        _export_graph(model, config, path, opset or config.DEFAULT_ONNX_OPSET)
    except (OSError, ValueError, KeyError) as exc:  # unreadable weights, unsupported architecture
        raise CheckpointError(f"cannot export {checkpoint} to ONNX: {exc}") from exc
    onnx_model = onnx.load(str(path))  # the graph alone: a few hundred kB
    attach_weights(onnx_model.graph, {**dict(model.named_parameters()), **dict(model.named_buffers())}, data)
    model.config.save_pretrained(out_dir)  # the fusions read config.json
    del model
    release_memory()  # the torch model, before the weights are read back
    add_probabilities(onnx_model, checkpoint_head(checkpoint))
    ensure_token_type_ids(onnx_model)
    opsets = [o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")]
    save_model(onnx_model, path, base_dir=out_dir)  # one file: each tensor read back from `data` and written in turn
    data.unlink()
    del onnx_model
    onnx.checker.check_model(str(path), full_check=True)  # by path: checked in C++, no Python copy
    for extra in out_dir.iterdir():
        if extra.name not in ("model.onnx", "config.json"):
            shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
    log.info("exported %s (opset %s)", path, opsets)
    return path


def _load(checkpoint: Path):
    """The checkpoint's PyTorch model (eval mode) and Optimum's ONNX export configuration for it."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX export configurations)
    from optimum.exporters.tasks import TasksManager

    model = TasksManager.get_model_from_task(TASK, str(checkpoint), framework="pt", library_name="transformers",
                                             local_files_only=True)
    constructor = TasksManager.get_exporter_config_constructor(exporter="onnx", model=model, task=TASK,
                                                               library_name="transformers")
    config = constructor(model.config)
    for key, value in (config.values_override or {}).items():
        setattr(model.config, key, value)
    model.config.return_dict = True
    return model.eval(), config


def _export_graph(model, config, path: Path, opset: int) -> None:
    """``torch.onnx.export`` (TorchScript) of ``model`` as Optimum's ``export_pytorch`` calls it, without the
    weights (they stay graph inputs named as the model's parameters) and without constant folding (which would
    compute new weights the graph would then lack; :func:`attach_weights` folds their transposes)."""
    import torch

    dummy = config.rename_ambiguous_inputs(config.generate_dummy_inputs(framework="pt"))
    with torch.no_grad(), config.patch_model_for_export(model):
        inputs = config.ordered_inputs(model)
        torch.onnx.export(model, (dummy,), str(path), input_names=list(inputs), output_names=list(config.outputs),
                          dynamic_axes=dict(itertools.chain(inputs.items(), config.outputs.items())),
                          opset_version=opset, export_params=False, do_constant_folding=False, dynamo=False)


def attach_weights(graph, weights: dict, data: Path) -> None:
    """Turn the graph inputs that are ``weights`` (name -> torch tensor) into initializers stored as ONNX
    external data in ``data``, one tensor at a time; a ``Transpose`` of a weight becomes the transposed weight
    (what the exporter's constant folding does), so MatMuls read initializers as the fusions and quantizers need."""
    from onnx import TensorProto, external_data_helper

    kept = [i for i in graph.input if i.name not in weights]
    params = {i.name: weights[i.name] for i in graph.input if i.name in weights}
    for node in [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in params]:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        tensor = params[node.input[0]]
        params[node.output[0]] = tensor.permute(perm or list(reversed(range(tensor.dim()))))
        graph.node.remove(node)
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    del graph.input[:]
    graph.input.extend(kept)
    with open(data, "wb") as fh:
        for name in [n for n in params if n in used]:
            proto = _initializer(name, params[name])
            offset = fh.tell()
            fh.write(proto.raw_data)
            external_data_helper.set_external_data(proto, data.name, offset, fh.tell() - offset)
            proto.ClearField("raw_data")
            proto.data_location = TensorProto.EXTERNAL
            graph.initializer.append(proto)


def _initializer(name: str, tensor):
    """An ONNX initializer of a torch tensor, with the bytes the torch exporter writes (bf16 as raw bits)."""
    import torch
    from onnx import TensorProto, numpy_helper

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype != torch.bfloat16:
        return numpy_helper.from_array(tensor.numpy(), name)
    proto = numpy_helper.from_array(tensor.view(torch.int16).numpy(), name)
    proto.data_type = TensorProto.BFLOAT16
    return proto


def checkpoint_head(checkpoint: Path) -> Head:
    """The head of a checkpoint as exporter.inputs reads it (problem_type, num_labels)."""
    raw = inputs._read_config(Path(checkpoint))
    return inputs._head(Path(checkpoint), raw, inputs._raw_labels(Path(checkpoint), raw))


def add_probabilities(model, head: Head = Head.SINGLE_LABEL) -> None:
    """Append the head's ``probabilities`` as a second graph output (idempotent): Softmax(logits, axis=-1)
    for single-label, Sigmoid(logits) for multi-label; regression serves the raw logits and gets none."""
    from onnx import TensorProto, helper

    outputs = [o.name for o in model.graph.output]
    if ENCODER_LOGITS not in outputs:
        raise ExporterError(f"exported graph has no {ENCODER_LOGITS!r} output (outputs: {outputs})")
    if ENCODER_PROBABILITIES in outputs or head is Head.REGRESSION:
        return
    logits = next(o for o in model.graph.output if o.name == ENCODER_LOGITS)
    dims = [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim]
    if head is Head.MULTI_LABEL:
        node = helper.make_node("Sigmoid", [ENCODER_LOGITS], [ENCODER_PROBABILITIES], name="probabilities_sigmoid")
    else:
        node = helper.make_node("Softmax", [ENCODER_LOGITS], [ENCODER_PROBABILITIES], axis=-1,
                                name="probabilities_softmax")
    model.graph.node.append(node)
    model.graph.output.append(helper.make_tensor_value_info(ENCODER_PROBABILITIES, TensorProto.FLOAT, dims))


def ensure_token_type_ids(model) -> None:
    """Check the served input contract: int64 inputs named input_ids, attention_mask, token_type_ids.

    Encoders without segment embeddings (e.g. DistilBERT) export no ``token_type_ids``; they get an
    unused graph input so every encoder answers the same request.
    """
    from onnx import TensorProto, helper

    names = [i.name for i in model.graph.input]
    for name in ENCODER_INPUTS:
        if name not in names and name != TOKEN_TYPE_IDS:
            raise ExporterError(f"exported graph lacks input {name!r} (inputs: {names})")
    if TOKEN_TYPE_IDS not in names:
        model.graph.input.append(
            helper.make_tensor_value_info(TOKEN_TYPE_IDS, TensorProto.INT64, ["batch_size", "sequence_length"])
        )
    for inp in model.graph.input:
        if inp.type.tensor_type.elem_type != TensorProto.INT64:
            raise ExporterError(f"input {inp.name} is not int64")
        dims = inp.type.tensor_type.shape.dim
        if len(dims) != 2 or not all(d.dim_param for d in dims):
            raise ExporterError(f"input {inp.name} lacks dynamic batch/sequence axes")
