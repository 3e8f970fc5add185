"""Characters that a terminal acts on instead of printing: find them in text, escape them.

Stored text such as a silence's reason reaches an operator's terminal through
walacorctl. C0 and C1 control characters can move the cursor, clear the screen or set
the window title (ESC starts an ANSI escape sequence, and U+009B is the one-byte CSI).
The Unicode bidirectional controls reorder how the rest of a line is displayed.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

# C0 controls with tab and line feed, DEL, C1 controls, and the bidirectional marks,
# embeddings, overrides and isolates.
CONTROL_CHARACTERS = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


# Unicode categories of characters that print nothing: format characters such as
# U+200B ZERO WIDTH SPACE, the line and paragraph separators, and lone surrogates.
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Zl", "Zp", "Cs"})
# The other characters of Unicode's Default_Ignorable_Code_Point property, which show
# as nothing: the combining grapheme joiner, the Hangul and Khmer fillers, the
# Mongolian free variation selectors, the variation selectors, and code points that
# Unicode reserves for more of them. Checked against the property as the `regex`
# package (2026.5.9) defines it: with the categories above, this is the whole property.
_INVISIBLE_CHARACTERS = re.compile(
    "[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u2065\u3164\ufe00-\ufe0f\uffa0"
    "\ufff0-\ufff8\U000e0000-\U000e0fff]")


# The zero width joiner and the text and emoji variation selectors, which join or style
# the character before them in emoji such as U+2764 U+FE0F (a red heart).
_EMOJI_JOINERS = frozenset("\u200d\ufe0e\ufe0f")
# The characters that U+FE0F U+20E3 turn into a keycap emoji, such as 1️⃣.
_KEYCAP_BASES = frozenset("0123456789#*")
# The tag digits and small letters that name a subdivision in a flag emoji.
_FLAG_TAG = re.compile("[\U000e0030-\U000e0039\U000e0061-\U000e007a]")


def find_nonprinting_character(text: str, *, prose: bool = False) -> tuple[int, str] | None:
    """Return the position and the first character in `text` that a terminal acts on or
    shows as nothing, or None.

    Those are the CONTROL_CHARACTERS and the invisible characters above. Text that
    must look like what it is, such as a silence matcher, rejects them. With `prose`,
    for free text such as a reason, an emoji joiner or variation selector right after
    a visible character is allowed, because it is part of an emoji.
    """
    found = CONTROL_CHARACTERS.search(text)
    end = len(text) if found is None else found.start()
    for position in range(end):
        character = text[position]
        if prose and _in_emoji(text, position):
            continue
        if (unicodedata.category(character) in _INVISIBLE_CATEGORIES
                or _INVISIBLE_CHARACTERS.match(character)):
            return position, character
    if found is None:
        return None
    return found.start(), found.group()


def _in_emoji(text: str, position: int) -> bool:
    """Return whether the invisible character at `position` is part of an emoji.

    Those are:
    - a variation selector right after a visible character outside ASCII, or after a
      keycap's digit, '#' or '*' when U+20E3 follows;
    - a joiner between two symbols;
    - the tag characters of a well-formed subdivision flag (see `_in_flag`).
    """
    character = text[position]
    if "\U000e0020" <= character <= "\U000e007f":
        return _in_flag(text, position)
    if character not in _EMOJI_JOINERS:
        return False
    before = text[position - 1] if position > 0 else ""
    if character != "\u200d":
        keycap = (before in _KEYCAP_BASES and position + 1 < len(text)
                  and text[position + 1] == "\u20e3")
        # Emoji bases are not all symbols: U+203C is punctuation, U+2139 a letter and
        # U+2194 a math symbol. Every one is outside ASCII.
        return keycap or (before > "\x7f" and not before.isspace()
                          and before not in _EMOJI_JOINERS
                          and unicodedata.category(before)[0] not in "CMZ")
    if before == "\ufe0f" and position > 1:
        before = text[position - 2]
    after = text[position + 1] if position + 1 < len(text) else ""
    # "Sk" before a joiner is a skin tone modifier, as in U+1F469 U+1F3FD U+200D U+1F4BB.
    return (bool(before) and bool(after) and unicodedata.category(before) in ("So", "Sk")
            and unicodedata.category(after) == "So")


def _in_flag(text: str, position: int) -> bool:
    """Return whether the tag character at `position` belongs to a well-formed
    subdivision flag: U+1F3F4, 2 to 7 tag letters or digits, then U+E007F CANCEL TAG.

    Any other run of tag characters could carry hidden text, so it is rejected.
    """
    start = end = position
    while start > 0 and "\U000e0020" <= text[start - 1] <= "\U000e007f":
        start -= 1
    while end + 1 < len(text) and "\U000e0020" <= text[end + 1] <= "\U000e007f":
        end += 1
    tags = text[start:end]  # without the last character, which must be CANCEL TAG
    return (start > 0 and text[start - 1] == "\U0001f3f4" and text[end] == "\U000e007f"
            and 2 <= len(tags) <= 7 and all(_FLAG_TAG.fullmatch(tag) for tag in tags))


def describe_character(character: str) -> str:
    """Return a character's kind and code point for an error message.

    Examples: "control character '\\x1b' (U+001B)" and
    "invisible character U+200B (ZERO WIDTH SPACE)".
    """
    code_point = f"U+{ord(character):04X}"
    if CONTROL_CHARACTERS.fullmatch(character):
        return f"control character {character!r} ({code_point})"
    name = unicodedata.name(character, "")
    return f"invisible character {code_point}" + (f" ({name})" if name else "")


def escape_control_characters(text: str) -> str:
    """Return `text` with each control character written as an escape such as `\\x1b`."""
    return CONTROL_CHARACTERS.sub(
        lambda found: found.group().encode("unicode_escape").decode("ascii"), text)


# The control characters that orjson leaves as they are, because it escapes only
# U+0000 to U+001F. In JSON text they can appear only inside strings.
_UNESCAPED_BY_JSON = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def escape_json_text(text: str) -> str:
    """Return JSON `text` with DEL, C1 and bidirectional controls written as `\\uXXXX`.

    The document means the same, because a JSON string may write any character as an
    escape, and it no longer acts on the terminal that prints it.
    """
    return _UNESCAPED_BY_JSON.sub(lambda found: f"\\u{ord(found.group()):04x}", text)


def shorten(text: str, limit: int) -> str:
    """Return `text`, or its first `limit - 3` characters and "..." when it is longer."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def utf8_text(text: str) -> str:
    """Return `text` with lone surrogates written as escapes, so it encodes as UTF-8.

    Python keeps bytes of file names and arguments that are not UTF-8 as lone
    surrogates (U+DC80 to U+DCFF), which UTF-8 encoders such as orjson reject. Those
    come back as `\\xNN`, other lone surrogates as `\\udNNN`.
    """
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def utf8_document(value: Any) -> Any:
    """Return a copy of a JSON-like `value` whose strings, keys included, are `utf8_text`."""
    if isinstance(value, str):
        return utf8_text(value)
    if isinstance(value, dict):
        return {utf8_document(key): utf8_document(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [utf8_document(item) for item in value]
    return value
