"""The request log: one line per finished request on stdout, what the GUI's request log reads."""
from __future__ import annotations

import json
import sys
import time


def print_log(as_json: bool):
    """One line per finished request on stdout: what the GUI's request log reads."""
    def log(entry: dict) -> None:
        entry = {"time": time.strftime("%H:%M:%S"), **entry}
        if as_json:
            line = json.dumps(entry, ensure_ascii=False)
        else:
            tokens = f" {entry.get('prompt_tokens', 0)}+{entry.get('completion_tokens', 0)} tokens" \
                if "prompt_tokens" in entry else ""
            dur = f" {entry['duration_s']:.2f} s" if "duration_s" in entry else ""
            line = f"{entry['time']} {entry['status']} {entry['endpoint']}{tokens}{dur}" + \
                (f" ({entry['error']})" if "error" in entry else "")
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    return log
