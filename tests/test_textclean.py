"""Text cleaners, called directly: decoding, Gutenberg / wiki boilerplate, POS tags, labeled dedup."""

from __future__ import annotations

import pytest

from lmforge.data.textclean import decode_text, dedup_labeled, strip_gutenberg, strip_wiki, untag_words


def test_decode_text_drops_bom_unifies_newlines_and_replaces_bad_bytes():
    assert decode_text("\ufeffone\r\ntwo\rthree\n".encode()) == "one\ntwo\nthree\n"
    assert decode_text(b"caf\xe9 ok") == "caf\ufffd ok"  # latin-1 byte: replaced, never an error
    assert decode_text("a\ufeffb".encode()) == "a\ufeffb"  # only a leading BOM is a BOM


@pytest.mark.parametrize("head,foot", [
    ("*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***", "*** END OF THIS PROJECT GUTENBERG EBOOK X ***"),
    ("***START OF THE PROJECT GUTENBERG EBOOK HAMLET***", "End of the Project Gutenberg EBook of Hamlet"),
    ("*** start of the project gutenberg ebook hamlet ***", "End of Project Gutenberg's Hamlet"),
])
def test_strip_gutenberg_keeps_the_text_between_the_markers(head, foot):
    text = f"The Project Gutenberg EBook of Hamlet\nlicence\n{head}\nHAMLET\n\nTo be.\n{foot}\nmore licence\n"
    assert strip_gutenberg(text) == "\nHAMLET\n\nTo be.\n"


def test_strip_gutenberg_without_markers_keeps_everything():
    assert strip_gutenberg("Sonnet I\n\nFrom fairest creatures\n") == "Sonnet I\n\nFrom fairest creatures\n"
    assert strip_gutenberg("*** START OF THE PROJECT GUTENBERG EBOOK X ***\nbody") == "\nbody"


WIKI = """{{Infobox|a={{nested|x}}}}
'''Alpha''' is a [[Greek alphabet|letter]] and a [[vowel]].<ref name="s">Smith 2001</ref><ref name="s"/>
[[File:Alpha.png|thumb|An [[alpha]] sign]]
{| class="wikitable"
| cell {{flag|GR}}
|}
== History ==
It is [http://example.org old] &amp;amp; ''used''.<!-- hidden -->
* First item
# Second item
<math>x^2</math>__NOTOC__
== See also ==
* [[Beta]]
[[Category:Letters]]"""


def test_strip_wiki_by_hand():
    assert strip_wiki(WIKI) == ("Alpha is a letter and a vowel.\n\nHistory\n"
                                "It is old & used.\nFirst item\nSecond item")


def test_strip_wiki_keeps_apostrophes():
    """Only runs of 2+ quotes are bold / italic markup: a single one is an apostrophe."""
    assert strip_wiki("Don't panic: it's ''fine'', O'Brien's '''bold''' [[x|y's]].") == \
        "Don't panic: it's fine, O'Brien's bold y's."


def test_untag_words_drops_tags_with_digits_and_capitals():
    assert untag_words("１２月/t  ３１日/t  ，/w  江/nr  泽民/nr  摄/Vg") == "１２月３１日，江泽民摄"
    assert untag_words("Ａ/nx  股/n  ２/m") == "Ａ股２"
    assert untag_words("   ") == ""


def test_dedup_labeled_by_hand():
    got = dedup_labeled({"pos": ["好", "好", "", "都行", "赞"], "neg": ["差", "都行", "差", "慢"]})
    assert got == {"pos": ["好", "赞"], "neg": ["差", "慢"]}


def test_untag_words_drops_tags_ending_in_digits():
    assert untag_words("江/nr1  泽民/nr2  ２/m  ３１日/t") == "江泽民２３１日"
