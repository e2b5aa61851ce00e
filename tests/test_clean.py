from ingest.clean import clean_blocks, normalize_text
from ingest.types import Block


def test_broken_pdf_lines_and_hyphenation_are_joined():
    assert normalize_text("The quick brown\nfox jumps over the ex-\nample  dog.") == \
        "The quick brown fox jumps over the example dog."
    assert normalize_text("中文的句子\n被换行打断了。") == "中文的句子被换行打断了。"
    assert normalize_text("para one\n\n\npara two") == "para one\n\npara two"


def test_control_chars_and_odd_spaces():
    assert normalize_text("a\u00a0b\u3000c\x00d\u200b") == "a b cd"


def test_repeated_headers_and_page_numbers_dropped():
    blocks = []
    for page in range(1, 6):
        blocks += [Block("ACME Corp — Confidential", page=page), Block(f"Body text of page {page} is here.", page=page),
                   Block(f"Page {page} of 5", page=page)]
    out = clean_blocks(blocks)
    assert [b.text for b in out] == [f"Body text of page {p} is here." for p in range(1, 6)]


def test_junk_and_letter_spaced_text_dropped_tables_keep_rows():
    blocks = [Block("]"), Block("0 2 0 2 p e S"), Block("Real sentence."),
              Block("a | b\n1 | 2", kind="table")]
    out = clean_blocks(blocks)
    assert [b.text for b in out] == ["Real sentence.", "a | b\n1 | 2"]


def test_mojibake_is_repaired():
    # double-encoded UTF-8 as found in samples/docs/norwich-city.txt
    assert normalize_text("the 2003\u00e2\u0080\u009304 season") == "the 2003\u201304 season"
