"""Reading round-marks files in tests by what they mark, whatever their format."""

import json
from pathlib import Path


def mark_lines(path: Path) -> str:
    """The marks ``path`` holds, as format-1 lines (no header, no chain); "" when none."""
    out = ""
    for line in path.read_bytes().splitlines():
        obj = json.loads(line)
        if "round_marks" not in obj:
            obj.pop("prev", None)
            out += json.dumps(obj, separators=(",", ":")) + "\n"
    return out
