"""Issue 19 item 5: a PEFT (LoRA) adapter folder builds as its base merged by peft's merge_and_unload, gated
against the unmerged PeftModel; without a local base, one clear line naming --base."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import build_tiny_checkpoint
from serving_helpers import corpus_texts

LABELS = ["negative", "neutral", "positive"]
N_EVAL = 24


def build_lora_adapter(base: Path, out: Path, *, seed: int = 7) -> Path:
    """A LoRA adapter (query/value, the classifier head trained too) with random non-zero weights, saved as peft
    saves it (adapter_config.json + adapter_model.safetensors); its base_model_name_or_path is ``base``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base)
    peft = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero: the merge would equal the base
                param.normal_(0, 0.5)
    peft.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("peft")
    base = build_tiny_checkpoint(root / "base", seed=2)
    path = build_lora_adapter(base, root / "adapter")
    data = root / "test.csv"
    with open(data, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([["text", "label"]] + [[t, LABELS[i % 3]] for i, t in
                                                        enumerate(corpus_texts(N_EVAL, seed=9))])
    return {"base": base, "path": path, "data": data, "root": root}


def test_adapter_builds_merged_and_gated_against_the_peft_model(adapter, tmp_path, reuse_exports):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from exporter.cli import main

    out = tmp_path / "build"
    assert main(["build", str(adapter["path"]), "--eval-data", str(adapter["data"]), "--out", str(out),
                 "--no-repository", "--precisions", "fp32", "--no-openvino", "--eval-size", str(N_EVAL),
                 "--speed-seconds", "0.2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoint"] == str(adapter["path"].absolute()) and report["selected"] == "fp32"
    assert any("merge_and_unload" in w for w in report["warnings"])
    # the adapter changes the model: a build of the base alone (or an unapplied adapter) would be far off
    texts = corpus_texts(16, seed=13)
    tok = AutoTokenizer.from_pretrained(adapter["base"])
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    base = AutoModelForSequenceClassification.from_pretrained(adapter["base"]).eval()
    with torch.no_grad():
        base_logits = base(**enc).logits.numpy()
        peft_logits = PeftModel.from_pretrained(base, adapter["path"]).eval()(**enc).logits.numpy()
    assert np.abs(peft_logits - base_logits).max() > 1e-2
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / report["variants"]["fp32"]["file"]), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    got = session.run(["logits"], {k: v.numpy() for k, v in enc.items() if k in names})[0]
    np.testing.assert_allclose(got, peft_logits, atol=1e-4)


def test_adapter_with_base_option_and_without_a_local_base(adapter, tmp_path, capsys, reuse_exports):
    from exporter.cli import main

    moved = tmp_path / "adapter"
    moved.mkdir()
    for f in adapter["path"].iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/not-on-this-disk"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    args = ["build", str(moved), "--eval-data", str(adapter["data"]), "--no-repository", "--precisions", "fp32",
            "--no-openvino", "--eval-size", str(N_EVAL), "--speed-seconds", "0.2"]
    assert main([*args, "--out", str(tmp_path / "b1")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--base" in err[0] and "not-on-this-disk" in err[0]
    assert main([*args, "--out", str(tmp_path / "b2"), "--base", str(adapter["base"])]) == 0
    capsys.readouterr()
    assert main(["build", str(adapter["base"]), "--base", str(adapter["base"]), "--out", str(tmp_path / "b3"),
                 "--eval-data", str(adapter["data"]), "--no-repository"]) != 0
    assert "--base is for PEFT adapter" in capsys.readouterr().err
