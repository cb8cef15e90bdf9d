"""Measure: CPU per row of the served tokenizer path, before and after issue 22 item 3's change.

    python scripts/tokenizer_row_cost.py TOKENIZER_JSON TEXTS_CSV [--max-length 256] [--rounds 6]

`LengthTokenizer.encode` (serving/models/tokenization.py) cuts a text with an encoding without special tokens,
and used to tokenize the kept piece a second time for the answer; it now post-processes the cut's encoding
(truncation and special tokens), which is what ``Tokenizer.encode`` does after tokenizing. This script checks
the two give the same ids, attention mask and type ids on every text, then times both one row at a time
(``time.process_time``, interleaved rounds in alternating order) and prints microseconds of CPU per row.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "serving" / "models"))

import tokenization  # noqa: E402 - the served module, as the python backend imports it


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tokenizer_json")
    ap.add_argument("texts_csv")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--n-texts", type=int, default=1024)
    args = ap.parse_args()
    from tokenizers import Tokenizer

    lt = tokenization.LengthTokenizer(Tokenizer.from_file(args.tokenizer_json), args.max_length)
    with open(args.texts_csv, newline="", encoding="utf-8") as fh:
        texts = [row["text"] for row in csv.DictReader(fh)][:args.n_texts]

    def retokenize(text):  # before: the kept piece tokenized again
        return lt.tokenizer.encode(lt.cut(text, lt.max_length)[0])

    def served(text):  # now: LengthTokenizer.encode
        return lt.encode(text).encodings[0]

    for text in texts:
        a, b = retokenize(text), served(text)
        if (a.ids, a.attention_mask, a.type_ids) != (b.ids, b.attention_mask, b.type_ids):
            raise SystemExit(f"different encodings for {text!r}")
    times: dict[str, list[float]] = {"retokenize": [], "served": []}
    for r in range(args.rounds):
        order = (("retokenize", retokenize), ("served", served))
        for name, fn in order if r % 2 == 0 else order[::-1]:
            t0 = time.process_time()
            for text in texts:
                fn(text)
            times[name].append((time.process_time() - t0) / len(texts) * 1e6)
    for name, values in times.items():
        print(f"{name:>10}: {statistics.median(values):6.1f} us CPU/row (rounds {' '.join(f'{v:.1f}' for v in values)})")
    print(f"{len(texts)} texts, identical encodings")


if __name__ == "__main__":
    main()
