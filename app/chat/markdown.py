"""An answer's Markdown with raw HTML turned into text, for QTextBrowser.setMarkdown.

Qt's Markdown (md4c) passes raw HTML through, so text that looks like a tag vanished from answers: a model
that wrote `<unused42205>` 256 times left an empty bubble, and `<div>`, `List<String>` or a special token
written as text lost those words. Outside code, `<` and `&` become entities, which Markdown shows as the
characters themselves (`>` opens no tag, and at a line's start it is a quote); inside code spans and fenced or
indented code blocks they are left alone (there Markdown shows text as written, and an entity would show as
`&lt;`). Emphasis, lists, links and code keep working: no other character changes.
"""
from __future__ import annotations

import re

ENTITIES = {"&": "&amp;", "<": "&lt;"}
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
LIST_ITEM = re.compile(r"^\s*([-*+]|\d+[.)])\s")


def escape_html(text: str) -> str:
    out, prose = [], []
    fence = None            # the opening fence's characters while inside a fenced block
    prev_blank, in_list, indented = True, False, False

    def flush():
        if prose:
            out.append(_escape_outside_spans("\n".join(prose)))
            prose.clear()
    for line in text.split("\n"):
        m = FENCE.match(line)
        if fence is not None:
            out.append(line)
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line[m.end():].strip():
                fence = None
            continue
        if m:
            flush()
            fence = m.group(1)
            out.append(line)
            prev_blank = False
            continue
        # An indented code block: 4 spaces (or a tab) after a blank line, not a list item's continuation.
        code = line.startswith(("    ", "\t")) and line.strip() and (prev_blank or indented) and not in_list
        if code:
            flush()
            out.append(line)
        else:
            prose.append(line)
        indented = bool(code)
        if line.strip() and not line.startswith((" ", "\t")):
            in_list = bool(LIST_ITEM.match(line))
        prev_blank = not line.strip()
    flush()
    return "\n".join(out)


def _escape_outside_spans(text: str) -> str:
    """Entities outside code spans: a run of N backticks opens one, the next run of exactly N closes it;
    a run with no match is literal backticks."""
    out, i, n = [], 0, len(text)
    while i < n:
        j = text.find("`", i)
        if j < 0:
            out.append(_entities(text[i:]))
            break
        out.append(_entities(text[i:j]))
        k = j
        while k < n and text[k] == "`":
            k += 1
        run = text[j:k]
        close = re.compile(r"(?<!`)" + run + r"(?!`)").search(text, k)
        if close is None:
            out.append(run)
            i = k
        else:
            out.append(text[j:close.end()])
            i = close.end()
    return "".join(out)


def _entities(s: str) -> str:
    return "".join(ENTITIES.get(c, c) for c in s)
