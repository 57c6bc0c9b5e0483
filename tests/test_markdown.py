"""Answers shown as the model wrote them: text that looks like HTML is text, Markdown still renders."""
from __future__ import annotations

ANSWER = ("Use a **<div>** for the box, a `List<String>` in Java, and List<String> outside code too; "
          "the token <unused1> & &amp; stay as written.\n\n- one <b>item</b>\n- two\n\n"
          "```\n<p>kept</p>\n```\n\n> quoted")


def test_escape_keeps_code_and_markdown():
    from sol.app.chat.markdown import escape_html
    out = escape_html(ANSWER)
    assert "**&lt;div>**" in out and "`List<String>`" in out and "List&lt;String>" in out
    assert "&lt;unused1>" in out and "&amp; &amp;amp;" in out
    assert "```\n<p>kept</p>\n```" in out and "\n> quoted" in out
    assert escape_html("``a ` <b>`` <b>") == "``a ` <b>`` &lt;b>"      # a code span of two backticks
    assert escape_html("text\n\n    <indented code>\n\n- item\n    <in the item>") == (
        "text\n\n    <indented code>\n\n- item\n    &lt;in the item>")
    assert escape_html("~~~\n<x>\n~~~\n<x>") == "~~~\n<x>\n~~~\n&lt;x>"
    assert escape_html("<unused42205>" * 256) == "&lt;unused42205>" * 256


def shown(bubble) -> str:
    return bubble.body.toPlainText()


def check(text: str) -> None:
    for words in ("<div>", "List<String>", "<unused1>", "& &amp;", "<b>item</b>", "<p>kept</p>"):
        assert words in text, (words, text)
    assert "**" not in text and "```" not in text       # bold and the fence are Markdown, not text


def test_the_chat_shows_tags_as_text_streamed_and_reopened(window, qtbot):
    win, ctx = window
    chat = win.panel("chat")
    # as an answer streams in: tokens, then the finished message renders the Markdown
    chat._on_event({"type": "token", "text": ANSWER, "id": 1, "logprob": -1.0, "top": [], "forced": False})
    answer = chat.answer
    chat._on_event({"type": "message", "role": "assistant", "content": ANSWER, "id": None, "prompt_tokens": 3,
                    "completion_tokens": 1, "tokens_per_s": 1.0})
    check(shown(answer))
    # a stored conversation opened again
    cid = ctx.store.create_conversation("tags")
    u = ctx.store.add_message(cid, "user", "write some tags")
    ctx.store.add_message(cid, "assistant", ANSWER, u)
    chat.refresh_list()
    chat.open_conversation(cid)
    bubbles = [b for b in chat.bubbles if type(b).__name__ == "AnswerBubble" and b.isVisibleTo(chat)]
    check(shown(bubbles[-1]))
    # the empty bubble of issue 30: 256 special tokens written as text
    chat._on_event({"type": "message", "role": "assistant", "content": "<unused42205>" * 256, "id": None,
                    "prompt_tokens": 3, "completion_tokens": 256, "tokens_per_s": 1.0})
    last = [b for b in chat.bubbles if type(b).__name__ == "AnswerBubble" and b.isVisibleTo(chat)][-1]
    assert shown(last) == "<unused42205>" * 256
