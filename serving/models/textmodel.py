"""Shared code of the python-backend models (copied beside each ``model.py`` as ``textmodel.py``).

The python backend puts a model's version directory on ``sys.path``, so ``model.py`` imports this module
and ``contract.py`` (serving.contract) from there. It owns what every model does the same way: reading its
config parameters, the tokenizer set up from the checkpoint's settings, decoding TEXT rows, the outputs of
a classification head, and the error boundary that keeps internals away from clients.
"""
import json
import os
import time
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

import contract
import metrics
import runtime  # ONNX Runtime or OpenVINO, by the files of the version directory
import tokenization
from tokenization import RowTokens  # noqa: F401 - per-row facts (tokens, truncation, windows) for metrics

INTERNAL_ERROR = "internal error (see server log)"


class InputError(Exception):
    """Bad client input; the message is safe to return to the client (INVALID_ARG, HTTP 400)."""


def read_config(args):
    """(model config dict, {parameter: string value}, ServedModel) of a model being initialised."""
    config = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    model = contract.ServedModel.from_parameters(params, max_batch_size=int(config.get("max_batch_size", 0)))
    return config, params, model


def length_tokenizer(args, params):
    """The checkpoint's tokenizer as a tokenization.LengthTokenizer: any text answered as saved, cut before
    tokenizing; windows when the model is chunked (``long_text`` chunk)."""
    from tokenizers import Tokenizer

    path = os.path.join(args["model_repository"], args["model_version"], "tokenizer", "tokenizer.json")
    return tokenization.LengthTokenizer(
        Tokenizer.from_file(path), int(params["max_length"]), params.get("truncation_side", "right"),
        long_text=params.get("long_text", tokenization.TRUNCATE), overlap=int(params.get("chunk_overlap", "0")),
        max_windows=int(params.get("max_chunks", "1")))


def decode_texts(request, name=contract.TEXT):
    """(rows of the request's ``name`` tensor (TEXT, or TEXT_PAIR) as strings, their UTF-8 bytes); InputError
    naming the first bad row."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise InputError(f"missing input {name}")
    out, size = [], 0
    for i, value in enumerate(tensor.as_numpy().reshape(-1)):
        if isinstance(value, str):
            text = value
            size += len(value.encode("utf-8", "surrogatepass"))
        else:
            try:
                text = bytes(value).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{name} row {i} is not valid UTF-8 (byte {exc.start})") from None
            except TypeError:
                raise InputError(f"{name} row {i} is not a string") from None
            size += len(value)
        out.append(text)
    return out, size


def decode_rows(request, model, max_bytes):
    """(texts, pairs) of a request: pairs is None unless the model takes TEXT_PAIR (then one per text).
    InputError when the text rows total more than ``max_bytes`` UTF-8 bytes (max_request_bytes)."""
    texts, size = decode_texts(request)
    pairs = None
    if model.text_pair:
        pairs, more = decode_texts(request, contract.TEXT_PAIR)
        size += more
        if len(pairs) != len(texts):
            raise InputError(f"{len(texts)} {contract.TEXT} rows but {len(pairs)} {contract.TEXT_PAIR} rows")
    if size > max_bytes:
        raise InputError(f"the request has {size} bytes of text; the limit is {max_bytes} (max_request_bytes)")
    return texts, pairs


def windows_output(rows):
    """The served WINDOWS tensor (INT32 [rows, 1]) of chunked models from the rows' RowTokens."""
    return pb_utils.Tensor(contract.WINDOWS, np.array([[r.windows] for r in rows], dtype=np.int32).reshape(-1, 1))


def head_outputs(model, logits, probabilities, model_metrics=None):
    """The served output tensors of the head (FP32): regression SCORE (the raw prediction; a reranker's
    activation of it, with LOGITS beside); classifiers
    LABEL (single-label: the argmax; multi-label: the JSON list of labels >= threshold), PROBABILITIES
    (softmax / sigmoid, as the graph computed them) and LOGITS. ``model_metrics`` (metrics.ModelMetrics)
    is told the labels given and each row's top-1 probability."""
    if model.head is contract.Head.REGRESSION:
        raw = np.ascontiguousarray(np.asarray(logits, dtype=np.float32).reshape(-1, 1))
        if model.activation is contract.Activation.NONE:
            return [pb_utils.Tensor(contract.SCORE, raw)]
        score = np.ascontiguousarray(model.activation.apply(raw))  # a reranker: as CrossEncoder.predict
        return [pb_utils.Tensor(contract.SCORE, score), pb_utils.Tensor(contract.LOGITS, raw)]
    probs = np.ascontiguousarray(np.asarray(probabilities, dtype=np.float32).reshape(len(logits), -1))
    logits = np.ascontiguousarray(np.asarray(logits, dtype=np.float32).reshape(probs.shape))
    labels = list(model.labels)
    if model.head is contract.Head.MULTI_LABEL:
        given = [[labels[j] for j in np.flatnonzero(p >= model.threshold)] for p in probs]
        rows = [contract.encode_label_set(g) for g in given]
    else:
        given = rows = [labels[int(j)] for j in probs.argmax(axis=1)] if len(probs) else []
    if model_metrics is not None:
        model_metrics.observe_predictions(given, probs.max(axis=1) if len(probs) else [])
    label = np.array([r.encode("utf-8") for r in rows], dtype=np.object_).reshape(-1, 1)
    return [pb_utils.Tensor(contract.LABEL, label), pb_utils.Tensor(contract.PROBABILITIES, probs),
            pb_utils.Tensor(contract.LOGITS, logits)]


def _log_error(text):
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        logger.log_error(text)
    else:  # older python backends: the stub's stderr goes to the server log
        import sys

        print(text, file=sys.stderr, flush=True)


def respond(requests, handle, where):
    """One response per request: ``handle(request)`` -> output tensors. Bad input fails only its own request
    with INVALID_ARG and a short message; any other failure is logged in full (with the traceback) on the
    server and answered with a generic message, so no paths, node names or tracebacks reach the client."""
    responses = []
    for request in requests:
        try:
            responses.append(pb_utils.InferenceResponse(output_tensors=handle(request)))
        except InputError as exc:
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[], error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)))
        except Exception:  # noqa: BLE001 - the error boundary: full text to the log, a generic one out
            _log_error(f"{where}: request failed:\n{traceback.format_exc()}")
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[], error=pb_utils.TritonError(INTERNAL_ERROR)))
    return responses


def row_session(args, params):
    """The CPU target's session over the version directory's model file: ``intra_op_threads`` from the config
    (1 by default, 0: the runtime's default). ONNX Runtime over model.onnx, or OpenVINO when the exporter
    selected an OpenVINO variant (model.xml beside it): runtime.open_session."""
    path = os.path.join(args["model_repository"], args["model_version"], runtime.ONNX_FILE)
    return runtime.open_session(path, int(params.get("intra_op_threads", "1")))


def embedding_output(model, rows):
    """The served EMBEDDING tensor (FP32 [rows, dim]) from per-row or batched encoder outputs."""
    if len(rows) == 0:
        return pb_utils.Tensor(contract.EMBEDDING, np.zeros((0, model.embedding_dim), np.float32))
    out = np.ascontiguousarray(np.asarray(rows, dtype=np.float32).reshape(-1, model.embedding_dim))
    return pb_utils.Tensor(contract.EMBEDDING, out)


def pin_instance(args, params):
    """Pin this instance's stub (all its threads) to cores of its own, as the ceiling's processes run: the
    instance's index picks ``intra_op_threads`` cores of the ones the server may use. Only when every
    instance fits (instances x threads <= cores), the threads are fixed (not 0) and no CPU quota applies.
    Returns the cores, or None when not pinned."""
    if params.get("pin_instances", "false") != "true" or not hasattr(os, "sched_setaffinity"):
        return None
    config = json.loads(args["model_config"])
    count = sum(int(g.get("count", 1)) for g in config.get("instance_group", []))
    threads = int(params.get("intra_op_threads", "1"))
    cores = sorted(os.sched_getaffinity(0))
    if not runtime.pinnable(count, threads, len(cores)):
        return None
    try:  # Triton names instances <group>_<index>
        index = int(str(args["model_instance_name"]).rsplit("_", 1)[-1]) % count
    except ValueError:
        return None
    mine = set(cores[index * threads:(index + 1) * threads])
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), mine)
        except OSError:  # a thread that ended meanwhile
            pass
    return mine


def requested_only(request, outputs):
    """The output tensors the request asked for (all when it named none): the ones Triton would drop anyway
    are not handed over the python backend's shared memory (clients ask for LOGITS only on request)."""
    wanted = request.requested_output_names()
    return [t for t in outputs if t.name() in wanted] if wanted else outputs


def warmup_requests(config):
    """How many requests Triton's model_warmup sends each instance before the model is ready (a sample's
    ``count`` 0 means once): the first requests an instance executes, which no client can have sent."""
    return sum(max(int(w.get("count", 0) or 0), 1) for w in config.get("model_warmup", []))


def model_metrics(model, params, args):
    """The metrics of this instance of the served model (metrics.ModelMetrics, labelled with the version it
    serves); the ``metrics`` parameter "false" turns them off."""
    return metrics.ModelMetrics(model.name, model.head, model.labels,
                                baseline=metrics.parse_baseline(params.get("baseline")),
                                enabled=params.get("metrics", "true") != "false", version=args["model_version"])


class RowModel:
    """What the CPU target's one-model python models share: the contract from the config, the length-aware
    tokenizer, a row session, ``run_row`` (one row alone, each window at its own length) and the model's
    metrics (sent by their own thread; the model_warmup requests Triton sends before ready are not counted).

    A subclass implements ``answer(texts, pairs)`` -> output tensors (through ``run_rows``); ``_handle``
    decodes a request and answers it. ``last_rows`` holds the RowTokens of the rows handled last."""

    def initialize(self, args):
        config, params, self.model = read_config(args)
        pin_instance(args, params)
        self.max_bytes = int(params["max_request_bytes"])
        self.tokenizer = length_tokenizer(args, params)
        self.session = row_session(args, params)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = list(self.model.encoder_outputs)
        self.metrics = model_metrics(self.model, params, args)
        self.warmup_left = warmup_requests(config)
        self.last_rows = []
        self.stage_ns = dict.fromkeys(metrics.STAGES, 0)  # this execute call's parts (metrics.STAGES)

    def run_row(self, text, pair=None):
        """(the session's outputs of each window of one row, each a batch of one, unpadded; its RowTokens)."""
        clock, stage_ns = time.perf_counter_ns, self.stage_ns
        t0 = clock()
        row = self.tokenizer.encode(text, pair)
        t1 = clock()
        stage_ns["tokenize"] += t1 - t0
        tokens = row.tokens
        self.metrics.observe_row(tokens.input_tokens, tokens.computed_tokens, tokens.truncated, tokens.windows)
        results = []
        for enc in row.encodings:
            columns = {"input_ids": enc.ids, "attention_mask": enc.attention_mask, "token_type_ids": enc.type_ids}
            feeds = {name: np.asarray([columns[name]], dtype=np.int64) for name in self.inputs}
            t1 = clock()
            results.append(self.session.run(self.outputs, feeds))
            stage_ns["encoder"] += clock() - t1
        return results, tokens

    def run_rows(self, texts, pairs):
        """(window outputs of every row, RowTokens of every row) of a request; ``last_rows`` set."""
        done = [self.run_row(text, None if pairs is None else pairs[i]) for i, text in enumerate(texts)]
        self.last_rows = [tokens for _, tokens in done]
        return [windows for windows, _ in done], self.last_rows

    def _handle(self, request):
        t0 = time.perf_counter_ns()
        texts, pairs = decode_rows(request, self.model, self.max_bytes)
        t1 = time.perf_counter_ns()
        outputs = self.answer(texts, pairs)
        self.stage_ns["decode"] += t1 - t0
        self.stage_ns["answer"] += time.perf_counter_ns() - t1
        return requested_only(request, outputs)

    def _counted(self, request):
        warmup = self.warmup_left > 0  # Triton's warm-up, before ready: not a client's request
        self.warmup_left -= int(warmup)
        try:
            outputs = self._handle(request)
        except BaseException:
            self.metrics.rollback()
            raise
        if warmup:
            self.metrics.rollback()
        else:
            self.metrics.commit()
        return outputs

    def execute(self, requests):
        t0 = time.perf_counter_ns()
        responses = respond(requests, self._counted, self.model.name)
        self.stage_ns["execute"] += time.perf_counter_ns() - t0
        self.metrics.add_stage_ns(self.stage_ns)
        self.stage_ns = dict.fromkeys(metrics.STAGES, 0)
        return responses

    def finalize(self):
        self.metrics.close()
