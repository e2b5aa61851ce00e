from ingest.sentences import is_chinese, split_sentences


def test_chinese_sentences_keep_closing_quotes():
    text = "他说：“今天下雨。”我们留在家里！明天呢？也许晴天；也许不。"
    assert split_sentences(text) == ["他说：“今天下雨。”", "我们留在家里！", "明天呢？", "也许晴天；", "也许不。"]


def test_english_abbreviations_do_not_split():
    text = "Dr. Smith met Mr. Jones at 5 p.m. on Friday. They talked, e.g. about U.S. law. Then they left!"
    assert split_sentences(text) == [
        "Dr. Smith met Mr. Jones at 5 p.m. on Friday.", "They talked, e.g. about U.S. law.", "Then they left!"]


def test_mixed_text_and_paragraphs():
    text = "The API returns JSON. 接口返回数据。\n\nSecond paragraph here."
    assert split_sentences(text) == ["The API returns JSON.", "接口返回数据。", "Second paragraph here."]


def test_short_pieces_join_previous():
    assert split_sentences("Hello there. OK. Fine then.", min_chars=4) == ["Hello there. OK.", "Fine then."]


def test_language_detection():
    assert is_chinese("这是中文文本，包含一些English。")
    assert not is_chinese("Plain English text with 一 char.")
