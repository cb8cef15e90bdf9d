"""Fuzz the KServe v2 HTTP endpoint of a real tritonserver (loopback) with random and mutated JSON bodies.

Bounded (``N_BODIES`` bodies or ``BUDGET_S`` seconds, whichever first) and seeded, so a failure replays.
The server must never crash (same tritonserver and stub pids at the end), every answer must be 2xx or 4xx,
except Triton's own JSON parse errors, which its HTTP front answers with 500 (pinned in
tests/test_serving.py::test_bad_requests_over_http); those are counted apart and must carry a parse
message. It stays ready and a good request succeeds at the end.
"""
from __future__ import annotations

import copy
import json
import random
import re
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest

from serving.repository import RepositoryConfig, write_repository
from serving.server import LocalTritonServer, ServerConfig
from serving.supervisor import stub_processes

pytestmark = pytest.mark.server

SEED = 20261129
N_BODIES = 300
BUDGET_S = 30.0
MAX_BATCH = 8
LABELS = ["negative", "neutral", "positive"]
# Triton 2.51's HTTP front: JSON it cannot parse or map onto a request -> 500 with one of these messages
PARSE_500 = re.compile(r'^\{"error":"(failed to parse the request JSON buffer|Unable to parse (\'\w+\'|JSON bytes array)|failed to get request params)')


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tiny_onnx, tmp_path_factory):
    repo = write_repository(
        tmp_path_factory.mktemp("fuzz") / "model_repository", onnx_model=tiny_onnx, tokenizer_dir=tiny_checkpoint,
        id2label=dict(enumerate(LABELS)),
        config=RepositoryConfig(max_batch_size=MAX_BATCH, intra_op_threads=1, max_request_bytes=1 << 20),
    )
    with LocalTritonServer(ServerConfig(repo)) as srv:
        yield srv


def good_body(rng: random.Random) -> dict:
    rows = rng.randint(1, MAX_BATCH)
    return {"id": str(rng.randint(0, 999)),
            "inputs": [{"name": "TEXT", "shape": [rows, 1], "datatype": "BYTES",
                        "data": [rng.choice(["good", "bad day", "", "ünïcödé ✓", "x" * 50]) for _ in range(rows)]}],
            "outputs": [{"name": "LABEL"}, {"name": "PROBABILITIES"}]}


def junk(rng: random.Random, depth: int = 0):
    kinds = ["null", "true", "int", "bigint", "float", "str", "unicode", "list", "dict"]
    kind = rng.choice(kinds if depth < 3 else kinds[:7])
    if kind == "null":
        return None
    if kind == "true":
        return rng.random() < 0.5
    if kind == "int":
        return rng.randint(-10, 10)
    if kind == "bigint":
        return rng.choice([2**31, 2**63 - 1, -(2**63), 10**30])
    if kind == "float":
        return rng.choice([0.5, -1.5, 1e308, -0.0])
    if kind == "str":
        return rng.choice(["", "TEXT", "BYTES", "FP32", "INT64", "a" * rng.randint(1, 3000), "\x00", "../../etc"])
    if kind == "unicode":
        return "".join(chr(rng.randint(1, 0x2FFFF)) for _ in range(rng.randint(1, 20)))
    if kind == "list":
        return [junk(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["name", "shape", "datatype", "data", "inputs", "outputs", "parameters", "id", "k"]):
            junk(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def mutate(body: dict, rng: random.Random) -> dict:
    """Replace, drop or add one field somewhere in a valid body."""
    body = copy.deepcopy(body)
    tensor = body["inputs"][0]
    choice = rng.randrange(12)
    if choice == 0:
        tensor[rng.choice(list(tensor))] = junk(rng)
    elif choice == 1:
        del tensor[rng.choice(list(tensor))]
    elif choice == 2:
        tensor["shape"] = [rng.choice([-1, 0, 1, 2, MAX_BATCH + 1, 2**31, 10**12]) for _ in range(rng.randint(0, 3))]
    elif choice == 3:
        tensor["datatype"] = rng.choice(["FP32", "INT64", "BOOL", "UINT8", "FP16", "BF16", "STRING", "bytes", ""])
    elif choice == 4:
        tensor["data"] = junk(rng)
    elif choice == 5:
        tensor["data"] = tensor["data"] + ["extra"] * rng.randint(1, 3)
    elif choice == 6:
        tensor["name"] = rng.choice(["TXT", "", "input_ids", "LABEL", "TEXT\x00"])
    elif choice == 7:
        body["inputs"] = body["inputs"] * rng.randint(2, 3)
    elif choice == 8:
        body["outputs"] = [{"name": rng.choice(["NOPE", "LOGITS", "", 7])}]
    elif choice == 9:
        body["parameters"] = junk(rng)
        tensor["parameters"] = {"binary_data_size": rng.choice([-1, 0, 10**9])}
    elif choice == 10:
        body[rng.choice(["inputs", "outputs", "id"])] = junk(rng)
    else:
        tensor["data"] = ["x" * rng.choice([5000, (1 << 20) + 1])] + tensor["data"][1:]  # long; over max_request_bytes
    return body


def byte_mutation(raw: bytes, rng: random.Random) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 8)):
        op, pos = rng.randrange(3), rng.randrange(max(1, len(data)))
        if op == 0 and data:
            data[pos] = rng.randrange(256)
        elif op == 1:
            data.insert(pos, rng.randrange(256))
        elif data:
            del data[pos]
    return bytes(data)


def bodies(rng: random.Random):
    while True:
        kind = rng.choices(["mutated", "junk", "bytes", "random"], weights=[6, 2, 2, 1])[0]
        if kind == "mutated":
            yield kind, json.dumps(mutate(good_body(rng), rng)).encode()
        elif kind == "junk":
            yield kind, json.dumps(junk(rng)).encode()
        elif kind == "bytes":
            yield kind, byte_mutation(json.dumps(good_body(rng)).encode(), rng)
        else:
            yield kind, bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))


def post(url: str, data: bytes) -> tuple[int, str]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def test_fuzz_kserve_v2_json(server):
    url = f"http://{server.http_url}/v2/models/classifier/infer"
    pid, stubs = server.process.pid, {n: p.pid for n, p in stub_processes(server.process.pid).items()}
    rng = random.Random(SEED)
    statuses: Counter = Counter()
    parse_500: Counter = Counter()
    unexpected = []
    deadline = time.monotonic() + BUDGET_S
    sent = 0
    for kind, data in bodies(rng):
        if sent >= N_BODIES or time.monotonic() > deadline:
            break
        status, text = post(url, data)
        sent += 1
        statuses[status // 100 * 100] += 1
        if status == 500 and PARSE_500.search(text):
            parse_500[re.sub(r"[0-9]+", "N", text)[:90]] += 1
        elif not (200 <= status < 300 or 400 <= status < 500):
            unexpected.append((kind, status, text[:200], data[:200]))
    print(f"\nFIGURES fuzz: {json.dumps({'sent': sent, 'by_class': dict(statuses), 'parse_500': sum(parse_500.values()), 'unexpected': len(unexpected), 'seed': SEED})}")
    for message, count in parse_500.most_common():
        print(f"  500 x{count}: {message}")
    assert sent >= 100, "the fuzz budget ran out before 100 bodies"
    assert unexpected == [], sorted({u[2] for u in unexpected})
    assert statuses[400] > 0 and statuses[200] > 0
    # never crashed: the same server and the same stub processes, still ready, still right
    assert server.is_alive() and server.process.pid == pid
    assert {n: p.pid for n, p in stub_processes(pid).items()} == stubs
    server.check()
    status, text = post(url, json.dumps(good_body(random.Random(1))).encode())
    assert status == 200 and json.loads(text)["outputs"]
