"""Stage 1: PyTorch checkpoint -> ONNX with Optimum, plus the head's `probabilities` output (Softmax for
single-label, Sigmoid for multi-label, none for regression)."""
from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from exporter import inputs
from exporter.errors import CheckpointError, ExporterError
from exporter.memory import release_memory
from exporter.optimize import save_model
from serving.contract import ENCODER_INPUTS, ENCODER_LOGITS, ENCODER_PROBABILITIES, TOKEN_TYPE_IDS, Head

log = logging.getLogger(__name__)


def export_onnx(checkpoint: Path, out_dir: Path, *, opset: int | None = None) -> Path:
    """Export ``checkpoint`` to ``out_dir/model.onnx`` (dynamic batch/sequence axes) and return the path.

    The graph gets the head's ``probabilities`` output (:func:`add_probabilities`), every model input is int64 and
    named as in :data:`serving.contract.ENCODER_INPUTS`, and the result passes ``onnx.checker``.
    """
    import onnx
    from optimum.exporters.onnx import main_export

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with weights_apart() as weights:
            main_export(
                str(checkpoint), out_dir, task="text-classification", opset=opset, do_validation=False,
                local_files_only=True, library_name="transformers",
            )
    except (OSError, ValueError, KeyError) as exc:  # unreadable weights, unsupported architecture
        raise CheckpointError(f"cannot export {checkpoint} to ONNX: {exc}") from exc
    release_memory()  # the torch exporter's buffers, before the graph is loaded
    path = out_dir / "model.onnx"
    model = onnx.load(str(path))  # the graph alone when the weights were kept apart
    keep = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    add_probabilities(model, checkpoint_head(checkpoint))
    ensure_token_type_ids(model)
    opsets = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    # one tensor at a time: onnx.save would copy the whole model twice
    save_model(model, path, (_initializer(name, weights.pop(name)) for name in list(weights)))
    del model
    release_memory()
    onnx.checker.check_model(str(path), full_check=True)  # by path: checked in C++, no Python copy
    # Optimum copies tokenizer/config files beside the model; the optimizer needs config.json only.
    for extra in out_dir.iterdir():
        if extra.name not in ("model.onnx", "config.json"):
            shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
    log.info("exported %s (opset %s)", path, opsets)
    return path


@contextlib.contextmanager
def weights_apart():
    """Inside, the torch exporter writes the graph without its weights (they become graph inputs); the dict
    yielded maps each one's name to its torch tensor, for :func:`save_model` to write one at a time.

    The torch exporter builds the whole ModelProto, serializes it and copies that to Python at once (three
    copies of the weights: 2.3 GB peak on BERT-base); without weights it writes a few hundred kB and the
    tensors stay the model's own. The graph and the initializers written are those of a plain export, byte
    for byte. Where the exporter's hook is missing, nothing is kept apart and the export is plain."""
    import torch

    weights: dict = {}
    graph_type = getattr(torch._C, "Graph", None)
    original = getattr(graph_type, "_export_onnx", None)
    if original is None:  # no such hook in this torch: a plain export
        yield weights
        return

    def export_without_weights(graph, params, *args, **kwargs):
        weights.update(params)
        return original(graph, {}, *args, **kwargs)

    graph_type._export_onnx = export_without_weights
    try:
        yield weights
    finally:
        graph_type._export_onnx = original


def _initializer(name: str, tensor):
    """An ONNX initializer of a torch tensor, with the bytes the torch exporter writes (bf16 as raw bits)."""
    import torch
    from onnx import TensorProto, numpy_helper

    tensor = tensor.detach().cpu()
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
