"""policyd.claims.shown, the one sanitizer of untrusted text in authentication prompts, against
hostile strings: whatever goes in, one quoted line of bounded printable ASCII comes out, with
no quote inside that could end the claim early. Pure functions: no daemons, no root.
"""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from policyd import claims
from policyd.bus import prompts

PRINTABLE = {chr(c) for c in range(0x20, 0x7F)}
HOSTILE = [
    "\u202e",  # RIGHT-TO-LEFT OVERRIDE: "gpj.exe" shows as "exe.jpg"
    "\u202d",  # LEFT-TO-RIGHT OVERRIDE
    "\u2066",  # LEFT-TO-RIGHT ISOLATE
    "\u2069",  # POP DIRECTIONAL ISOLATE
    "\u200f",  # RIGHT-TO-LEFT MARK
    "\u200b",  # ZERO WIDTH SPACE
    "\u200d",  # ZERO WIDTH JOINER
    "\ufeff",  # BYTE ORDER MARK / ZERO WIDTH NO-BREAK SPACE
    "\u0301",  # COMBINING ACUTE ACCENT
    "\u05d0",  # HEBREW LETTER ALEF: a strong right-to-left letter reorders the text around it
    "\u0430",  # CYRILLIC SMALL LETTER A: looks like "a"
    "\n",
    "\r",
    "\t",
    "\x1b",  # ESC: terminal escape sequences
    "\x00",
    "\x7f",
    "\u0085",  # NEXT LINE
    "\u2028",  # LINE SEPARATOR
    "\u2029",  # PARAGRAPH SEPARATOR
    "'",  # the quote: would end the claim early
    "\udc80",  # a lone surrogate (never from D-Bus, but the sanitizer does not care)
]
hostile_text = st.lists(
    st.one_of(st.sampled_from(HOSTILE), st.characters(), st.text(max_size=3)), max_size=400
).map("".join)


def body_of(shown: str) -> str:
    assert shown.startswith(claims.QUOTE) and shown.endswith(claims.QUOTE), shown
    return shown[len(claims.QUOTE) : -len(claims.QUOTE)]


@settings(max_examples=500, deadline=None)
@given(hostile_text, st.integers(min_value=claims.MIN_SHOWN, max_value=300))
@example("SanDisk \u202egnp.exe' (claimed: 'x')\nVM dom0", claims.MAX_SHOWN)
@example("a" + "\u0301" * 5000, claims.MAX_SHOWN)
@example("x" * 100_000, claims.MAX_SHOWN)
def test_shown_is_one_bounded_line_of_printable_ascii(text: str, limit: int) -> None:
    shown = claims.shown(text, limit)
    assert len(shown) <= limit
    body = body_of(shown)
    assert set(body) <= PRINTABLE - {claims.QUOTE}
    assert all(unicodedata.category(c) not in ("Cc", "Cf", "Mn", "Me", "Zl", "Zp") for c in shown)
    assert shown == claims.shown(text, limit)  # deterministic


@given(st.text(alphabet=sorted(PRINTABLE - {claims.QUOTE}), max_size=62))
def test_plain_text_is_shown_unchanged(text: str) -> None:
    assert claims.shown(text) == f"'{text}'"


@given(st.text(alphabet=sorted(PRINTABLE - {claims.QUOTE}), min_size=63, max_size=1000))
def test_long_text_keeps_both_ends(text: str) -> None:
    body = body_of(claims.shown(text))
    room = claims.MAX_SHOWN - 2 * len(claims.QUOTE)
    head_len = (room - len(claims.ELLIPSIS) + 1) // 2
    head, tail = body[:head_len], body[head_len + len(claims.ELLIPSIS) :]
    assert len(body) == room and body[head_len:].startswith(claims.ELLIPSIS)
    assert text.startswith(head) and text.endswith(tail) and head and tail


@pytest.mark.parametrize("bad", HOSTILE)
def test_each_hostile_character_becomes_the_replacement(bad: str) -> None:
    assert claims.shown(f"a{bad}b") == "'a?b'"


def test_a_limit_too_small_for_the_ellipsis_is_refused() -> None:
    with pytest.raises(ValueError, match="below"):
        claims.shown("x", claims.MIN_SHOWN - 1)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (None, "size unknown"),
        (0, "0 bytes"),
        (1023, "1023 bytes"),
        (1024, "1.0 KiB"),
        (1 << 20, "1.0 MiB"),
        (int(7.5 * (1 << 30)), "7.5 GiB"),
        (1 << 70, "1024.0 EiB"),
        (2**64 - 1, "16.0 EiB"),
    ],
)
def test_size_text(size: int | None, text: str) -> None:
    assert claims.size_text(size) == text


@given(hostile_text)
def test_export_details_of_a_hostile_path_stay_one_line(text: str) -> None:
    details = prompts.export(claims.shown(text, prompts.PATH_SHOWN), None, "work", True)
    assert not any(k.startswith("polkit.") for k in details)
    for value in details.values():
        assert set(value) <= PRINTABLE, value
