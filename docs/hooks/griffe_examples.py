"""Griffe extension: read a Google-style ``Example:`` section as ``Examples:``.

finetunekit's docstrings head their doctest-style samples with ``Example:``, which the
Google style guide and Sphinx's napoleon accept. Griffe 2 parses only ``Examples:`` as an
examples section and renders ``Example:`` as an admonition of plain Markdown, where ``>>>``
lines become nested block quotes and ``x[0]["key"]`` reads as a reference link. Renaming the
section header before parsing renders those lines as Python code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADER = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is not None:
            docstring.value = _EXAMPLE_HEADER.sub(r"\1Examples:", docstring.value)
