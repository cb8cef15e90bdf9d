"""Helpers of the gateway tests: tiny served models of every head the gateway routes (softmax classifier,
multi-label, text-pair regression as reranker, embedder) in one repository, and the KServe path's answers."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.contract import Head, ServedModel

TAGS = ("sports", "music", "food", "travel")


def export_head_onnx(checkpoint: Path, out: Path, head: str) -> Path:
    """Export a tiny BERT classifier with the outputs the repository expects for ``head``: ``softmax`` /
    ``sigmoid`` (logits, probabilities), ``regression`` (logits), ``embedding`` (mean-pooled, normalised)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, attn_implementation="eager").eval()

    class Head_(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            if head == "embedding":
                hidden = self.inner.bert(input_ids=input_ids, attention_mask=attention_mask,
                                         token_type_ids=token_type_ids).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, dim=-1)
            logits = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                                token_type_ids=token_type_ids).logits
            if head == "regression":
                return logits
            return logits, (torch.sigmoid(logits) if head == "sigmoid" else torch.softmax(logits, dim=-1))

    names = ["input_ids", "attention_mask", "token_type_ids"]
    outputs = {"embedding": ["embedding"], "regression": ["logits"]}.get(head, ["logits", "probabilities"])
    dummy = torch.ones(2, 8, dtype=torch.long)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes.update({n: {0: "batch"} for n in outputs})
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(Head_(model), (dummy, dummy, torch.zeros_like(dummy)), str(out), input_names=names,
                          output_names=outputs, dynamic_axes=axes, opset_version=17, dynamo=False)
    return out


def build_gateway_repository(root: Path, tiny_checkpoint: Path, tiny_onnx: Path) -> Path:
    """``classifier`` (3 labels, softmax), ``embedder`` (32 dims), ``tags`` (multi-label, 4 labels) and
    ``reranker`` (text pairs, one regression output), one 1-instance CPU model each, max 16 rows a batch."""
    from conftest import build_tiny_checkpoint
    from serving.repository import RepositoryConfig, add_model, write_repository

    config = RepositoryConfig(max_batch_size=16, encoder_instances=1, max_length=64)
    repo = write_repository(root / "repo", onnx_model=tiny_onnx, tokenizer_dir=tiny_checkpoint,
                            id2label={0: "negative", 1: "neutral", 2: "positive"}, config=config)
    tags = build_tiny_checkpoint(root / "tags_ck", seed=1, num_labels=4)
    pair = build_tiny_checkpoint(root / "pair_ck", seed=2, num_labels=1)
    models = [
        (ServedModel("embedder", Head.EMBEDDING, embedding_dim=32), tiny_checkpoint, "embedding"),
        (ServedModel("tags", Head.MULTI_LABEL, labels=TAGS), tags, "sigmoid"),
        (ServedModel("reranker", Head.REGRESSION, labels=("LABEL_0",), text_pair=True), pair, "regression"),
    ]
    for model, checkpoint, head in models:
        onnx = export_head_onnx(checkpoint, root / "onnx" / f"{model.name}.onnx", head)
        add_model(repo, onnx_model=onnx, tokenizer_dir=checkpoint, model=model, config=config)
    return repo


def kserve(grpc_url: str, model: str, texts: list[str], pairs: list[str] | None = None,
           outputs: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The outputs tritonserver gives over gRPC for the same texts: the KServe path the gateway must equal."""
    import tritonclient.grpc as grpcclient

    from serving.contract import infer_inputs, requested_outputs

    client = grpcclient.InferenceServerClient(grpc_url)
    parts = []
    try:
        for i in range(0, len(texts), 16):  # the repository's max_batch_size
            result = client.infer(model, infer_inputs(grpcclient, texts[i:i + 16], pairs and pairs[i:i + 16]),
                                  outputs=requested_outputs(grpcclient, outputs))
            parts.append({name: result.as_numpy(name) for name in outputs})
    finally:
        client.close()
    return {name: np.concatenate([p[name] for p in parts]) for name in outputs}
