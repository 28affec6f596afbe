"""Text cleaners: pure str -> str (or list -> list) functions that turn what a package ships into
clean running text. `sources.py` applies them while it extracts a corpus; they know nothing about
archives, registries or the cache, so each is tested directly (tests/test_textclean.py).

    >>> decode_text(b"\\xef\\xbb\\xbfone\\r\\ntwo\\r")          # BOM dropped, newlines made \\n
    'one\\ntwo\\n'
    >>> untag_words("迈向/v  充满/v  希望/n")                  # POS tags off, words rejoined
    '迈向充满希望'

- `decode_text`: bytes -> str (UTF-8, BOM dropped, bad bytes -> U+FFFD, CRLF / CR -> LF)
- `strip_gutenberg`: cut the Project Gutenberg header and footer
- `strip_wiki`: MediaWiki markup -> plain text
- `untag_words`: segmented, POS-tagged Chinese -> running text
- `dedup_labeled`: drop repeats within a class and texts claimed by two classes
"""

from __future__ import annotations

import html
import re


def decode_text(data: bytes) -> str:
    """Package file bytes -> str: UTF-8 (a BOM dropped, bad bytes become U+FFFD), newlines `\\n`.

    >>> decode_text(b"caf\\xe9\\r\\nbar\\r").split("\\n")
    ['caf\\ufffd', 'bar', '']
    """
    return data.decode("utf-8-sig", errors="replace").replace("\r\n", "\n").replace("\r", "\n")


# ---------------------------------------------------------------------------------------------
# Project Gutenberg boilerplate

_GUT_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUT_END = re.compile(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
                      re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Keep what lies between the Project Gutenberg START and END markers (all of it if unmarked).

    >>> strip_gutenberg("licence\\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\\nHamlet.\\n"
    ...                 "*** END OF THE PROJECT GUTENBERG EBOOK X ***\\nmore licence")
    '\\nHamlet.\\n'
    """
    start = _GUT_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUT_END.search(text)
    return text[: end.start()] if end else text


# ---------------------------------------------------------------------------------------------
# MediaWiki markup

_DROP_SECTIONS = re.compile(r"^==+\s*(See also|References|External links|Further reading|Notes|"
                            r"Bibliography|Sources|Footnotes)\s*==+\s*$", re.M | re.I)
_WIKI_SUBS = [  # applied in order, after templates / tables / links are gone
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I), ""),
    (re.compile(r"<(math|gallery|timeline|score|syntaxhighlight|source)[^>]*>.*?</\1>", re.S | re.I), ""),
    (re.compile(r"</?[a-zA-Z][^>]*>"), ""),  # other tags: keep their content
    (re.compile(r"'{2,}"), ""),  # bold / italic
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),  # == Heading == -> Heading
    (re.compile(r"^[*#:;]+\s*", re.M), ""),  # list / indent markers
    (re.compile(r"__[A-Z]+__"), ""),  # __NOTOC__ and friends
    (re.compile(r"[ \t]+$", re.M), ""),
    (re.compile(r"\n{3,}"), "\n\n"),
]
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)
_NS_LINK = re.compile(r"\[\[\s*(?:File|Image|Category|Media|[a-z]{2,3}(?:-[a-z]+)?)\s*:[^\[\]]*\]\]", re.I)
_EXT_LINK = re.compile(r"\[(?:https?:)?//[^\s\[\]]+ ?([^\[\]]*)\]")  # [http://x label] -> label
_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")


def _until_stable(pattern: re.Pattern, repl: str, text: str) -> str:
    while True:  # innermost first, so nested {{ {{ }} }} and [[File:..[[link]]..]] come apart
        text, n = pattern.subn(repl, text)
        if not n:
            return text


def strip_wiki(markup: str) -> str:
    """Wikitext -> plain text: templates, tables, refs, files, categories and trailing reference
    sections go; links keep their label.

    >>> strip_wiki("'''Anarchism''' is a [[political philosophy|philosophy]].{{cite}}<ref>x</ref>")
    'Anarchism is a philosophy.'
    """
    text = html.unescape(markup)
    cut = _DROP_SECTIONS.search(text)
    text = text[: cut.start()] if cut else text
    text = _until_stable(_TEMPLATE, "", text)
    text = _until_stable(_TABLE, "", text)
    while True:
        before = text
        text = _EXT_LINK.sub(r"\1", _LINK.sub(r"\1", _NS_LINK.sub("", text)))
        if text == before:
            break
    for pattern, repl in _WIKI_SUBS:
        text = pattern.sub(repl, text)
    return html.unescape(text).strip()


# ---------------------------------------------------------------------------------------------
# segmented Chinese, labeled sets

_TAG = re.compile(r"/[A-Za-z]+\d*$")


def untag_words(line: str) -> str:
    """A segmented, POS-tagged line -> running text: drop `/tag`, rejoin words (no spaces in Chinese).

    >>> untag_words("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  。/w")
    '迈向充满希望的新世纪。'
    """
    return "".join(_TAG.sub("", word) for word in line.split())


def dedup_labeled(by_label: dict[str, list[str]]) -> dict[str, list[str]]:
    """Drop empty texts, repeats within a class and texts found in more than one class (first-seen
    order kept).

    >>> dedup_labeled({"pos": ["a", "b", "a", "c"], "neg": ["c", "d", "d"]})
    {'pos': ['a', 'b'], 'neg': ['d']}
    """
    unique = {label: list(dict.fromkeys(t for t in texts if t)) for label, texts in by_label.items()}
    seen: dict[str, int] = {}
    for texts in unique.values():
        for t in texts:
            seen[t] = seen.get(t, 0) + 1
    return {label: [t for t in texts if seen[t] == 1] for label, texts in unique.items()}
