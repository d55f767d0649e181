"""A Griffe extension for the API pages: reStructuredText math in docstrings (``.. math::`` blocks,
``:math:`x``` roles) becomes ``$$ ... $$`` / ``$ ... $`` for pymdownx.arithmatex and MathJax, and an
``Example:`` header becomes ``Examples:`` so that its ``>>>`` lines render as code."""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":math:`([^`]+)`")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$")


def rst_math_to_dollars(text: str) -> str:
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if not stripped.startswith(".. math::"):
            out.append(_EXAMPLE.sub(r"\1Examples:", _ROLE.sub(r"$\1$", line)))
            i += 1
            continue
        indent = line[: len(line) - len(stripped)]
        body = [stripped[len(".. math::"):].strip()]
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i].strip())
            i += 1
        math = "\n".join(indent + b for b in body if b)
        out += ["", f"{indent}$$", math, f"{indent}$$", ""]
    return "\n".join(out)


class RstMath(griffe.Extension):
    def on_object(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_math_to_dollars(obj.docstring.value)
