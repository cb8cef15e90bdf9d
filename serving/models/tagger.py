"""Triton python-backend model `<name>` (CPU target, token classification): TEXT -> tokenizer -> ONNX Runtime,
or OpenVINO when the build selected ov_fp32 (runtime.py, through textmodel.row_session) (logits per token) ->
ENTITIES (BYTES [1]: a JSON list per text, as ``transformers.pipeline("token-classification",
aggregation_strategy=...)`` answers; ``entities.py`` beside it), in one model.

As for the classifier, every row runs ALONE at its own length (one pinned 1-thread instance per core), so a row's
entities depend on the row alone. A text is answered as saved: cut before tokenizing (tokenization.py), the
offsets still character offsets into the text as sent.
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

import contract
import entities
import textmodel


class TritonPythonModel(textmodel.RowModel):
    def initialize(self, args):
        super().initialize(args)
        path = os.path.join(args["model_repository"], args["model_version"], "tokenizer", "tokenizer_config.json")
        unk = None
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                unk = json.load(fh).get("unk_token")
            unk = unk.get("content") if isinstance(unk, dict) else unk
        self.vocab = entities.Vocabulary.of(self.tokenizer.probe, unk)
        self.labels = list(self.model.labels)
        self.strategy = self.model.aggregation.value

    def answer(self, texts, pairs=None):
        rows, self.last_rows = [], []
        for text in texts:
            found, tokens = self.tag(text)
            self.last_rows.append(tokens)
            rows.append(json.dumps(found, ensure_ascii=False).encode("utf-8"))
        return [pb_utils.Tensor(contract.ENTITIES, np.array(rows, dtype=np.object_).reshape(-1, 1))]

    def tag(self, text):
        """(the entities of one text, its RowTokens): each window run alone, at its own length."""
        row = self.tokenizer.encode(text)
        tokens = row.tokens
        self.metrics.observe_row(tokens.input_tokens, tokens.computed_tokens, tokens.truncated, tokens.windows)
        logits = []
        for enc in row.encodings:
            columns = {"input_ids": enc.ids, "attention_mask": enc.attention_mask, "token_type_ids": enc.type_ids}
            feeds = {name: np.asarray([columns[name]], dtype=np.int64) for name in self.inputs}
            logits.append(self.session.run(self.outputs, feeds)[0][0])
        found = entities.text_entities(text, row.encodings, logits, self.labels, self.vocab, self.strategy, row.shift)
        return found, tokens
