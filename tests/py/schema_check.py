"""Validates YAML files against a JSON Schema with the reference Python
implementation (jsonschema) and an independent YAML loader (PyYAML).

Usage: schema_check.py SCHEMA.json FILE.yaml [FILE.yaml ...]
Prints one line per file: "ok FILE" or "invalid FILE: reason"; exits 1 if
any file is invalid.
"""
import json
import sys

import jsonschema
import yaml


def main() -> int:
    schema = json.load(open(sys.argv[1]))
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema)
    bad = 0
    for path in sys.argv[2:]:
        doc = yaml.safe_load(open(path))
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        if errors:
            bad += 1
            reasons = "; ".join(
                f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in errors
            )
            print(f"invalid {path}: {reasons}")
        else:
            print(f"ok {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
