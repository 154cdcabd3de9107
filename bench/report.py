"""BENCHMARKS.md upkeep: each benchmark owns one `## <title>` section and replaces it whole."""

from __future__ import annotations

import re
from pathlib import Path

HEADER = ("# Benchmarks\n\nMeasured by the scripts in `bench/`, each against a floor measured in "
          "the same run (ratios, not absolute seconds: the machines are shared and noisy).\n")


def replace_section(path: Path, title: str, body: str) -> None:
    text = path.read_text() if path.exists() else HEADER
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)
