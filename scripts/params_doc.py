"""Print (or --write into README.md) the params reference table generated from fedwhisper.params."""

import argparse
import json
import re
import sys
from pathlib import Path

from fedwhisper.params import iter_docs

BEGIN, END = "<!-- params:begin -->", "<!-- params:end -->"


def params_table() -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, type_name, default, doc in iter_docs():
        shown = json.dumps(default) if not isinstance(default, str) else default
        rows.append(f"| `{key}` | {type_name.replace('|', '/')} | `{shown}` | {doc.replace('|', '/')} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", type=Path, help="README to update between the params markers")
    args = parser.parse_args()
    table = params_table()
    if not args.write:
        print(table)
        return 0
    text = args.write.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        print(f"{args.write}: markers {BEGIN} ... {END} not found", file=sys.stderr)
        return 1
    args.write.write_text(pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
