"""Print the GPU check's rows (JSON written by tests/gpu/conftest.py) as a table."""

import json
import sys
from pathlib import Path


def main(path: str) -> int:
    p = Path(path)
    rows = json.loads(p.read_text(encoding="utf-8")) if p.is_file() and p.stat().st_size else []
    if not rows:
        print("no GPU check results (the tests did not run)")
        return 1
    w1 = max(len(r["check"]) for r in rows)
    w2 = max(len(str(r["value"])) for r in rows)
    print(f"| {'check':<{w1}} | {'value':<{w2}} | note")
    print(f"| {'-' * w1} | {'-' * w2} | ---")
    for r in rows:
        print(f"| {r['check']:<{w1}} | {str(r['value']):<{w2}} | {r['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
