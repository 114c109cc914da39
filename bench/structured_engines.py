"""Grammar engines side by side on LFM2's tokenizer: llguidance, xgrammar, outlines-core.

For each tricky schema: compile time, per-token mask time along random walks (a random allowed
token each step, EOS taken with p=0.3 when allowed), and correctness (every text at which the
engine allows EOS must parse and validate with ``jsonschema``). Engines not installed are skipped.

    python bench/structured_engines.py --walks 8
"""

import argparse
import json
import random
import statistics
import time

import numpy as np

from structured import REFERENCE, TRICKY, wide_schema


def byte_level_vocab(tok):
    """Token id -> bytes (GPT-2 byte-level decoding) for the engines that want raw bytes;
    special tokens -> None (they must never match text)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    inv = {chr(c): b for b, c in zip(bs, cs)}
    special = {i for i, a in tok.get_added_tokens_decoder().items() if a.special}
    out = []
    for i in range(tok.get_vocab_size(True)):
        s = tok.id_to_token(i)
        if i in special or s is None:
            out.append(None)
        else:
            out.append(bytes(inv[c] for c in s))
    return out


class LLG:
    name = "llguidance"

    def __init__(self, tok, eos):
        import llguidance as llg

        self.llg = llg
        t = time.perf_counter()
        self.tok = llg.LLTokenizer(tok.to_str(), eos_token=eos)
        self.setup_s = time.perf_counter() - t
        self.n = self.tok.vocab_size

    def compile(self, schema, regex=False):
        g = self.llg.LLMatcher.grammar_from_regex(schema) if regex else self.llg.LLMatcher.grammar_from_json_schema(schema)
        m = self.llg.LLMatcher(self.tok, g, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def mask(self, m):
        t = time.perf_counter()
        raw = m.compute_bitmask()
        self.last = time.perf_counter() - t
        return np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[: self.n].astype(bool)

    def advance(self, m, t):
        assert m.consume_token(t), m.get_error()


class XGR:
    name = "xgrammar"

    def __init__(self, tok, eos):
        import xgrammar as xgr

        self.xgr = xgr
        t = time.perf_counter()
        vocab = [b if b is not None else b"" for b in byte_level_vocab(tok)]
        self.info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, stop_token_ids=[eos])
        self.setup_s = time.perf_counter() - t
        self.n = len(vocab)
        self.bitmask = xgr.allocate_token_bitmask(1, self.n)

    def compile(self, schema, regex=False):
        c = self.xgr.GrammarCompiler(self.info, cache_enabled=False, max_threads=1)
        g = c.compile_regex(schema) if regex else c.compile_json_schema(json.dumps(schema))
        return self.xgr.GrammarMatcher(g)

    def mask(self, m):
        t = time.perf_counter()
        m.fill_next_token_bitmask(self.bitmask)
        self.last = time.perf_counter() - t
        return np.unpackbits(self.bitmask.numpy().view(np.uint8), bitorder="little")[: self.n].astype(bool)

    def advance(self, m, t):
        assert m.accept_token(t)


class OUT:
    name = "outlines-core"

    def __init__(self, tok, eos):
        import outlines_core as oc

        self.oc = oc
        t = time.perf_counter()
        mapping = {}
        for i, b in enumerate(byte_level_vocab(tok)):
            if b is not None and i != eos:
                mapping.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(eos, mapping)
        self.setup_s = time.perf_counter() - t
        self.n, self.eos = tok.get_vocab_size(True), eos

    def compile(self, schema, regex=False):
        rx = schema if regex else self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Guide(self.oc.Index(rx, self.vocab))

    def mask(self, m):
        words = np.zeros((self.n + 31) // 32, np.int32)
        t = time.perf_counter()
        m.write_mask_into(words.ctypes.data, words.size, 4)
        self.last = time.perf_counter() - t
        return np.unpackbits(words.view(np.uint8), bitorder="little")[: self.n].astype(bool)

    def advance(self, m, t):
        m.advance(t, return_tokens=False)


def walk(engine, matcher, eos, rng, check, max_steps=300):
    """One random walk; returns (mask seconds per step list, texts at EOS-allowed points, bad)."""
    times, ids, bad, done = [], [], [], False
    for _ in range(max_steps):
        allowed = engine.mask(matcher)
        times.append(engine.last)
        choices = np.flatnonzero(allowed)
        if allowed[eos]:
            text = engine.decode(ids)
            if not check(text):
                bad.append(text)
            if rng.random() < 0.3 or len(choices) == 1:
                done = True
                break
            choices = choices[choices != eos]
        if len(choices) == 0:
            bad.append("<dead end> " + engine.decode(ids))
            break
        tok = int(rng.choice(choices))
        engine.advance(matcher, tok)
        ids.append(tok)
    return times, done, bad


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--walks", type=int, default=8)
    p.add_argument("--engines", nargs="*", default=["llguidance", "xgrammar", "outlines-core"])
    a = p.parse_args()
    import jsonschema
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(REFERENCE / "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    report = {}
    for cls in (LLG, XGR, OUT):
        if cls.name not in a.engines:
            continue
        try:
            engine = cls(tok, eos)
        except ImportError as e:
            report[cls.name] = {"skipped": str(e)}
            continue
        engine.decode = lambda ids: tok.decode(ids, skip_special_tokens=False)
        r = {"tokenizer_setup_s": engine.setup_s, "schemas": {}}
        cases = [(k, s, False) for k, s in TRICKY.items()] + [("wide30", wide_schema(30), False),
                                                              ("regex_phone", r"\+?[0-9]{1,3} \([0-9]{3}\) [0-9]{3}-[0-9]{4}", True)]
        for name, schema, regex in cases:
            row = {}
            try:
                t = time.perf_counter()
                m0 = engine.compile(schema, regex)
                row["compile_ms"] = (time.perf_counter() - t) * 1e3
                engine.mask(m0)  # engines that build lazily pay here
                row["compile_plus_first_mask_ms"] = (time.perf_counter() - t) * 1e3
            except Exception as e:  # an engine that cannot compile this schema
                row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                r["schemas"][name] = row
                continue
            if regex:
                import re

                check = lambda s, rx=re.compile(schema): rx.fullmatch(s) is not None  # noqa: E731
            else:
                v = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())

                def check(s, v=v):
                    try:
                        return v.is_valid(json.loads(s))
                    except ValueError:
                        return False
            times, finished, bad = [], 0, []
            for w in range(a.walks):
                m = engine.compile(schema, regex)
                ts, done, b = walk(engine, m, eos, random.Random(w), check)
                times += ts
                finished += done
                bad += b
            row.update(mask_ms_median=statistics.median(times) * 1e3,
                       mask_ms_p90=sorted(times)[int(0.9 * len(times))] * 1e3, steps=len(times),
                       finished=finished, invalid_accepts=len(bad), example_invalid=bad[:2])
            r["schemas"][name] = row
            print(cls.name, name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        report[cls.name] = r
    print(json.dumps({"bench": "structured_engines", "walks": a.walks, "report": report}))


if __name__ == "__main__":
    main()
