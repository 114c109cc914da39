"""The hostile request classes of ``fuzz_server.py``: slow readers, schema mutations, huge stop
lists and large bodies. Each sends one request and records it in the ``Tally``."""

from __future__ import annotations

import copy
import json
import random
import socket
import time

BASE_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1},
                                                "days": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
                                                "unit": {"enum": ["c", "f"]}},
               "required": ["city"], "$defs": {"d": {"type": "number"}}}
KEYWORDS = ["type", "properties", "required", "enum", "minItems", "maxItems", "items", "$ref", "$defs", "anyOf",
            "oneOf", "allOf", "minLength", "pattern", "additionalProperties", "const", "format", "prefixItems"]
VALUES = [5, -1, "x", "2", [], [5], {}, {"a": 5}, None, True, ["string", 5], ["string", "null", "integer"],
          "#/$defs/missing", "#/$defs/d", "(", [{"type": "string"}, 7], {"type": ["object", "array"]}, 10**9]


def schema_mutation(rng: random.Random) -> dict:
    s = copy.deepcopy(BASE_SCHEMA)
    targets = [s, *s["properties"].values()]  # taken first: a mutation may replace "properties"
    for _ in range(rng.randint(1, 4)):
        rng.choice(targets)[rng.choice(KEYWORDS)] = copy.deepcopy(rng.choice(VALUES))
    if rng.random() < 0.2:  # types as lists, nested a few levels: the grammar blow-up of issue 27
        for _ in range(rng.randint(1, 6)):
            s = {"type": ["object", "array", "string", "null"], "properties": {"a": s, "b": s}, "items": s}
    return s


def schema_request(rng: random.Random) -> tuple[str, dict]:
    schema, user = schema_mutation(rng), [{"role": "user", "content": "weather?"}]
    fn = {"name": "get_weather", "description": "d", "parameters": schema}
    return rng.choice([
        ("/v1/chat/completions", {"messages": user, "max_tokens": 8, "tools": [{"type": "function", "function": fn}],
                                  "tool_choice": rng.choice(["required", {"type": "function", "function": {"name": "get_weather"}}])}),
        ("/v1/chat/completions", {"messages": user, "max_tokens": 8, "response_format":
                                  {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}}),
        ("/v1/messages", {"messages": user, "max_tokens": 8, "tools": [{"name": "get_weather", "input_schema": schema}],
                          "tool_choice": {"type": "tool", "name": "get_weather"}}),
        ("/v1/responses", {"input": "weather?", "max_output_tokens": 8, "tools": [{"type": "function", **fn}],
                           "tool_choice": "required"}),
        ("/api/chat", {"messages": user, "stream": False, "format": schema, "options": {"num_predict": 8}}),
    ])


def stop_request(rng: random.Random) -> tuple[str, dict]:
    n = rng.choice([1, 4, 5, 64, 1000])
    length = rng.choice([1, 16, 1024, 1025, 5000] if n <= 64 else [1, 16])  # bodies stay under the 4 MiB limit
    stops = ["".join(rng.choice("ab ") for _ in range(length)) for _ in range(n)]
    user = [{"role": "user", "content": "hi"}]
    if rng.random() < 0.5:
        return "/v1/chat/completions", {"messages": user, "max_tokens": 32, "stop": stops, "stream": rng.random() < 0.5}
    return "/v1/messages", {"messages": user, "max_tokens": 32, "stop_sequences": stops}


def large_body(rng: random.Random) -> tuple[str, dict]:
    content = "word, " * rng.randint(50_000, 350_000)  # 0.3-2.1 MB: rendered and tokenized off the loop, then over the context
    path = rng.choice(["/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens", "/api/chat"])
    return path, {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "stream": False}


def slow_reader(port: int, rng: random.Random, tally) -> None:
    """A stream asking for many tokens with top_logprobs that reads nothing for a while."""
    body = json.dumps({"messages": [{"role": "user", "content": "go"}], "max_tokens": rng.randint(200, 2000),
                       "stream": True, "logprobs": True, "top_logprobs": 20}).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(rng.uniform(0.5, 3))
        got = s.recv(64)
    finally:
        s.close()
    tally.add("slow-reader", int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/1.1 ") else "hung-up")
