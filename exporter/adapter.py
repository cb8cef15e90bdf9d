"""PEFT adapters: a folder with ``adapter_config.json`` and the adapter weights, built as the model it adapts.

The base is ``--base DIR``, else the adapter's ``base_model_name_or_path`` when that is a local folder
(nothing is downloaded). The build exports the base merged with the adapter by peft's own
``merge_and_unload`` (saved as a plain checkpoint in a scratch folder) and gates it against the unmerged
PeftModel: the reference is the base with the adapter's LoRA layers live, not the merge.

This module imports only the standard library and exporter.errors at module level (torch, transformers
and peft are loaded when an adapter is built), so the later task registry can move it as it is.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import CheckpointError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors",)  # a pickle (adapter_model.bin) is refused as checkpoints are
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


@dataclass(frozen=True)
class Adapter:
    """An adapter folder and the local base it applies to."""

    path: Path
    base: Path
    peft_type: str

    def peft_model(self):
        """The base with the adapter applied, unmerged (eval mode): the gate's reference."""
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        base = AutoModelForSequenceClassification.from_pretrained(self.base, local_files_only=True)
        return PeftModel.from_pretrained(base, self.path, is_trainable=False, local_files_only=True).eval()

    def reference_model(self):
        """The PeftModel's underlying model, LoRA layers live (its forward takes token_type_ids by name, as
        the exported graph does; PeftModel's own forward passes them through ``**kwargs``)."""
        return self.peft_model().get_base_model().eval()

    def merge(self, out: Path) -> Path:
        """Save base + adapter merged by peft's ``merge_and_unload`` as a checkpoint in ``out``, with the
        adapter's tokenizer (else the base's); return ``out``."""
        merged = self.peft_model().merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True)
        source = self.path if any((self.path / f).is_file() for f in TOKENIZER_FILES) else self.base
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, out / name)
        log.info("%s adapter %s merged into %s (peft merge_and_unload) at %s", self.peft_type, self.path,
                 self.base, out)
        return out


def is_adapter(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter(path: Path, base: Path | None = None) -> Adapter | None:
    """The adapter in ``path`` with its base resolved, or None when ``path`` is not an adapter folder.
    CheckpointError (one line naming ``--base``) when no local base is found."""
    path = Path(path)
    if not is_adapter(path):
        return None
    try:
        doc = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"adapter {path}: {ADAPTER_CONFIG} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"adapter {path}: {ADAPTER_CONFIG} is not a JSON object")
    if not any((path / w).is_file() for w in ADAPTER_WEIGHTS):
        raise CheckpointError(f"adapter {path} has no {ADAPTER_WEIGHTS[0]} (pickle adapter weights are not loaded)")
    named = doc.get("base_model_name_or_path")
    if base is not None:
        chosen = Path(base)
        if not (chosen / "config.json").is_file():
            raise CheckpointError(f"--base {base} is not a checkpoint folder (no config.json)")
    elif isinstance(named, str) and named and (Path(named) / "config.json").is_file():
        chosen = Path(named)
    else:
        raise CheckpointError(f"adapter {path} applies to {named or 'an unnamed base'!s}, which is not a local "
                              "folder: pass --base DIR (the base checkpoint the adapter was trained on)")
    return Adapter(path, chosen, str(doc.get("peft_type", "PEFT")))
