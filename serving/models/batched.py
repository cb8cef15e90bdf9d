"""Triton python-backend model `<name>` (GPU target, every head): TEXT (, TEXT_PAIR) -> tokenizer (unpadded)
-> ONNX Runtime in token-budget sub-batches -> the head's outputs (LABEL/PROBABILITIES/LOGITS, SCORE or
EMBEDDING, FP32), in one model.

Dynamic batching hands ``execute`` several requests; their rows are sorted by length and cut into
sub-batches, each padded only to its own longest row and capped by ``max_batch_tokens`` (token_batch.py);
every row's outputs go back to its own request. A bad request fails alone (INVALID_ARG). ONNX Runtime runs
with the CUDA provider (TensorRT first when the config asks for it; inputs and outputs through IOBinding)
where onnxruntime-gpu and a GPU are present, else with the CPU provider (this is how the repository is
served and tested on a machine without a GPU). Each call logs one ``token_batch`` line with its real and
computed tokens.
"""
import os
import traceback

import numpy as np
import runtime
import textmodel
import token_batch
import triton_python_backend_utils as pb_utils


def batch_session(args, params):
    """(session, whether it runs on a GPU) over the version directory's model.onnx."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    threads = int(params.get("intra_op_threads", "0"))
    if threads > 0:
        options.intra_op_num_threads = threads
    path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
    chosen = token_batch.providers(params, ort.get_available_providers(), int(params.get("device_id", "0")))
    session = ort.InferenceSession(path, sess_options=options, providers=[p for p, _ in chosen],
                                   provider_options=[o for _, o in chosen],
                                   disabled_optimizers=runtime.DISABLED_OPTIMIZERS)  # as the gate's session
    return session, session.get_providers()[0] in token_batch.GPU_PROVIDERS


class TritonPythonModel:
    def initialize(self, args):
        config, params, self.model = textmodel.read_config(args)
        self.max_bytes = int(params["max_request_bytes"])
        self.tokenizer = textmodel.length_tokenizer(args, params)  # any length, cut before tokenizing
        self.pad_id = int(params["pad_id"])  # padded on the right whatever padding_side says (token_batch.pad)
        self.budget = int(params.get("max_batch_tokens", token_batch.DEFAULT_MAX_BATCH_TOKENS))
        self.overhead = int(params.get("overhead_tokens", token_batch.DEFAULT_OVERHEAD_TOKENS))
        self.session, self.on_gpu = batch_session(args, params)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = list(self.model.encoder_outputs)
        self.totals = token_batch.BatchRecord()  # this instance's sums of every call's record (see stats())
        self.metrics = textmodel.model_metrics(self.model, params, args)
        self.warmup_left = textmodel.warmup_requests(config)  # Triton's warm-up requests: not counted
        pb_utils.Logger.log_info(f"{self.model.name}: ONNX Runtime providers {self.session.get_providers()}"
                                 f"{'' if self.on_gpu else ' (no CUDA provider or GPU: running on the CPU)'}, "
                                 f"max_batch_tokens {self.budget}")

    def stats(self):
        """This instance's rows, sub-batches, real and computed tokens so far (for metrics counters)."""
        return dict(vars(self.totals), ratio=self.totals.ratio)

    def _run(self, feeds):
        feeds = {name: feeds[name] for name in self.inputs}
        if not self.on_gpu:
            return self.session.run(self.outputs, feeds)
        binding = self.session.io_binding()  # one host->device copy per input, outputs fetched once
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in self.outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _tokenize(self, request):
        """(per-row token dicts, per-row RowTokens) of one request (InputError for bad input). The GPU target
        does not chunk (RepositoryConfig refuses it), so every row is one window."""
        texts, pairs = textmodel.decode_rows(request, self.model, self.max_bytes)
        encoded = [self.tokenizer.encode(text, None if pairs is None else pairs[i]) for i, text in enumerate(texts)]
        return ([{"input_ids": e.ids, "attention_mask": e.attention_mask, "token_type_ids": e.type_ids}
                 for e in (row.encodings[0] for row in encoded)], [row.tokens for row in encoded])

    def _outputs(self, results):
        """The served tensors of one request's rows."""
        if self.model.head is textmodel.contract.Head.EMBEDDING:
            return [textmodel.embedding_output(self.model, results[0])]
        return textmodel.head_outputs(self.model, results[0], results[-1], self.metrics)

    def _respond(self, where, results, error):
        """One request's response: its error, else its rows' outputs (a failure there is internal)."""
        if error is not None:
            return pb_utils.InferenceResponse(output_tensors=[], error=error)
        try:
            return pb_utils.InferenceResponse(output_tensors=self._outputs(results))
        except Exception:  # noqa: BLE001 - the error boundary: full text to the log, a generic one out
            pb_utils.Logger.log_error(f"{where}: response failed:\n{traceback.format_exc()}")
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(textmodel.INTERNAL_ERROR))

    def _observe(self, n, row_tokens, record, span):
        """Tell the metrics about request ``n``'s rows (real tokens; computed: their sub-batches' widths)."""
        for tokens, computed in zip(row_tokens, record.row_computed[span[0]:span[1]]):
            self.metrics.observe_row(tokens.input_tokens, computed, tokens.truncated, tokens.windows)

    def _commit(self, responses, warmup):
        """Keep the metrics of a call whose requests came from clients (not Triton's warm-up)."""
        if warmup or all(r.has_error() for r in responses):
            self.metrics.rollback()
        else:
            self.metrics.commit()
        return responses

    def finalize(self):
        self.metrics.close()

    def execute(self, requests):
        warmup = self.warmup_left > 0  # Triton's model_warmup before ready: neither logged nor counted
        self.warmup_left -= min(self.warmup_left, len(requests))
        rows, spans, errors, row_tokens = [], [], {}, []
        for n, request in enumerate(requests):
            try:
                mine, tokens = self._tokenize(request)
            except textmodel.InputError as exc:
                errors[n] = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                mine, tokens = [], []
            spans.append((len(rows), len(rows) + len(mine)))
            rows += mine
            row_tokens.append(tokens)
        try:
            results, record = token_batch.run_rows(self._run, rows, self.pad_id, max_batch_tokens=self.budget,
                                                   overhead_tokens=self.overhead)
            if not results:
                results = [np.zeros((0, self.model.num_outputs), np.float32) for _ in self.outputs]
        except Exception:  # noqa: BLE001 - the error boundary: full text to the log, a generic one out
            pb_utils.Logger.log_error(f"{self.model.name}: batch failed:\n{traceback.format_exc()}")
            failed = pb_utils.TritonError(textmodel.INTERNAL_ERROR)
            return [pb_utils.InferenceResponse(output_tensors=[], error=errors.get(n, failed))
                    for n in range(len(requests))]
        if not warmup:
            self.totals.add(record)
            pb_utils.Logger.log_info(f"{self.model.name}: {record.line()}")
        for n, span in enumerate(spans):
            if n not in errors:
                self._observe(n, row_tokens[n], record, span)
        return self._commit([self._respond(self.model.name, [r[a:b] for r in results], errors.get(n))
                             for n, (a, b) in enumerate(spans)], warmup)
