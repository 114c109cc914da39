"""Structured output: per-token overhead of a JSON-schema constraint and schema compile time.

Placeholder: the overhead bench lands in the next commit.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TRICKY = json.loads((ROOT / "tests" / "fixtures" / "tricky_schemas.json").read_text(encoding="utf-8"))


def wide_schema(fields: int = 30) -> dict:
    """An extraction-style object of ``fields`` required fields of mixed kinds."""
    kinds = [{"type": "string", "maxLength": 40}, {"type": "integer", "minimum": 0},
             {"type": "number"}, {"type": "boolean"}, {"enum": ["low", "medium", "high"]},
             {"type": "array", "items": {"type": "string"}, "maxItems": 5},
             {"anyOf": [{"type": "string"}, {"type": "null"}]}]
    props = {f"field_{i}": kinds[i % len(kinds)] for i in range(fields)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}
