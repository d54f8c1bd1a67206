"""Literal chat-control text in data: found, counted, escaped or set aside.

A prompt or response holding literal chat-template markers (``<|im_start|>system`` …)
turns into real control tokens when a chat template renders it: a user's text can then
open a system turn. ``CONTROL_MARKERS`` lists the markers of common model families (a
static list, plus any other ``<|name|>``-shaped token; no tokenizer is loaded), and
``ControlText`` applies a reading step's ``special_tokens`` setting:

* ``keep`` (the default): the text is unchanged, so existing datasets keep their ids and
  contents, but every row holding such text is counted (``control_text_rows``), so
  nothing passes unseen;
* ``escape``: a zero-width space (U+200B) is inserted after the marker's first
  character — ``<|im_start|>`` becomes ``<\u200b|im_start|>``, ``[INST]`` becomes
  ``[\u200bINST]`` — which reads the same, matches no special token, and is undone by
  deleting the U+200B characters;
* ``quarantine``: the row is set aside with reason ``control_text``, naming the field and
  the marker.

``CONTROL_PATTERN`` is written so that Python's ``re`` and polars (Rust regex) read it the
same way, so the vectorised import path finds exactly what the row loops find.
"""

from __future__ import annotations

import re

from prefdata.readers import BadRow

SPECIAL_TOKENS = ("keep", "escape", "quarantine")
CONTROL_MARKERS = (
    "<|im_start|>", "<|im_end|>", "<|im_sep|>",  # ChatML: Qwen, SmolLM, Phi-4, Hermes …
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|eom_id|>", "<|python_tag|>",  # Llama 3
    "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",  # GPT-2, Zephyr, Phi-3
    "<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>",  # Llama 2, Mistral
    "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>",  # Gemma
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",  # DeepSeek
)
ANY_PIPE_TOKEN = r"\|[A-Za-z][A-Za-z0-9_]*\|>"  # any other <|name|> token (after the '<')
ZWSP = "\u200b"


def _tail_pattern(first: str) -> str:
    tails = [re.sub(r"([\\.^$|?*+()\[\]{}])", r"\\\1", m[1:]) for m in CONTROL_MARKERS if m[0] == first]
    return "|".join(sorted(tails, key=len, reverse=True) + ([ANY_PIPE_TOKEN] if first == "<" else []))


# Group 1/3: the marker's first character; 2/4: the rest. The same text works in Python's
# re and in polars (Rust regex), so the vectorised paths find exactly what the row loops do.
CONTROL_PATTERN = rf"(<)({_tail_pattern('<')})|(\[)({_tail_pattern('[')})"
CONTROL_RE = re.compile(CONTROL_PATTERN)
ESCAPED = "${1}${3}" + ZWSP + "${2}${4}"  # polars' replacement for CONTROL_PATTERN


def escape_control_text(text: str) -> str:
    """Make every marker inert: a zero-width space after its first character."""
    return CONTROL_RE.sub(lambda m: m.group(0)[0] + ZWSP + m.group(0)[1:], text)


class ControlText:
    """A step's ``special_tokens`` policy applied to the texts of one row at a time."""

    def __init__(self, policy: str):
        self.policy = policy

    def text(self, text: str, where: str) -> tuple[str, bool]:
        """(the text to keep, whether it held control text); BadRow under ``quarantine``."""
        found = CONTROL_RE.search(text) if isinstance(text, str) else None
        if found is None:
            return text, False
        if self.policy == "quarantine":
            raise BadRow("control_text", where, f"the text holds the chat-control marker {found.group(0)!r}, "
                         "which a chat template would turn into a real control token",
                         "remove it, or set `special_tokens: escape` to make such markers inert "
                         "(or `keep` to leave them)")
        return (escape_control_text(text) if self.policy == "escape" else text), True

    def messages(self, messages: list[dict], where: str) -> tuple[list[dict], bool]:
        out, any_found = [], False
        for j, m in enumerate(messages):
            content, found = self.text(m["content"], f"{where}[{j}].content")
            out.append({**m, "content": content} if found else m)
            any_found |= found
        return out, any_found
