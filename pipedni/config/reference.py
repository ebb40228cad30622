"""The config reference: one markdown row per field, printed or updated in place in a docs page.

``python -m pipedni.config`` prints the table; ``python -m pipedni.config docs/config.md``
replaces the table embedded there (see pipedni.config.__main__; a test checks the docs match
the code).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from pipedni.config.sections import SECTIONS
from pipedni.config.typecheck import type_name

HEADER = "| key | type | default | meaning |"


def reference_markdown() -> str:
    """The config reference table embedded in docs/config.md (one row per field)."""
    lines = [HEADER, "| --- | --- | --- | --- |"]
    for section, section_type in SECTIONS.items():
        hints = typing.get_type_hints(section_type)
        for f in dataclasses.fields(section_type):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            tname = type_name(hints[f.name]).replace("|", "\\|")
            lines.append(f"| `{section}.{f.name}` | {tname} | `{default!r}` | {f.metadata['doc']} |")
    return "\n".join(lines) + "\n"


def update_reference(path: Path) -> None:
    """Replace the reference table embedded in the markdown file ``path`` with the current one."""
    text = path.read_text()
    start = text.index(HEADER)
    end = (text.find("\n\n", start) + 1) or len(text)
    path.write_text(text[:start] + reference_markdown() + text[end:])

