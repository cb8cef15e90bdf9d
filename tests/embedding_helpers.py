"""A tiny random-init sentence-transformers-style model, built locally (no downloads)."""
from __future__ import annotations

import json
from pathlib import Path


def build_tiny_sentence_transformer(out: Path, *, pooling: str = "mean", normalize: bool = True,
                                    seed: int = 0, max_seq_length: int = 64) -> Path:
    """Save a 2-layer random BERT + packaged tokenizer + modules.json, 1_Pooling and (optionally) 2_Normalize."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from conftest import packaged_encoder_dir

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, initializer_range=0.2)
    BertModel(config).eval().save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(packaged_encoder_dir()).save_pretrained(out)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (out / "2_Normalize").mkdir()
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    (out / "1_Pooling").mkdir()
    flags = {f"pooling_mode_{k}": pooling == v for k, v in (("cls_token", "cls"), ("mean_tokens", "mean"),
                                                            ("max_tokens", "max"), ("mean_sqrt_len_tokens", "mean_sqrt_len_tokens"))}
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags}))
    return out
