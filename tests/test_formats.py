"""Formats read through converters (ingest/convert.py): legacy Office and OpenDocument files and RTF
through LibreOffice, EPUB through pandoc, EML and MSG messages with their attachments. Every file
is made here by bench/formats.py's builders: python-docx/openpyxl/python-pptx, converted by soffice,
written by pandoc from Markdown, the standard library's email package, and (MSG) a small OLE
compound-file writer."""

from __future__ import annotations

import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from bench.formats import DOCX_TEXT, PPTX_TEXT, email_with_attachments, make_formats, outlook_msg
from ingest import convert
from ingest.loaders import CONVERTED, SUPPORTED, ParseError, ZipLimits, parse_file
from ingest.sandbox import Limits, SandboxWorker


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """One file of every converted format (bench/formats.py's builders), made once for the module."""
    return make_formats(tmp_path_factory.mktemp("formats"))


def _texts(blocks) -> list[str]:
    return [b.text for b in blocks]


def _after(texts: list[str], title: str) -> str:
    """The text of the blocks between the title `title` and the next attachment title."""
    i = texts.index(title)
    rest = texts[i + 1:]
    end = next((k for k, t in enumerate(rest) if t.startswith("Attachment: ")), len(rest))
    return "\n".join(rest[:end])


# -- tests ----------------------------------------------------------------------------------------

def test_the_converted_formats_are_supported():
    assert set(convert.PANDOC) | set(convert.LIBREOFFICE) | {".msg"} == CONVERTED
    assert CONVERTED | {".eml"} <= SUPPORTED


def test_every_format_is_ingested_in_the_sandbox_and_bad_files_do_not_stop_the_batch(settings, made, tmp_path):
    from retrieval.knowledge_base import KnowledgeBase

    folder = tmp_path / "inbox"
    folder.mkdir()
    for ext in (".doc", ".xls", ".ppt", ".odt", ".ods", ".odp", ".rtf", ".epub"):
        shutil.copy(made[ext], folder / f"file{ext}")
    shutil.copy(made[".doc"], folder / "saved-as.docx")  # an old .doc renamed: the content decides
    (folder / "mail.eml").write_bytes(email_with_attachments(made[".docx"]))
    (folder / "broken.doc").write_bytes(bytes.fromhex("d0cf11e0a1b11ae1") + b"\x00junk" * 200)
    with zipfile.ZipFile(folder / "broken.epub", "w") as zf:
        zf.writestr("mimetype", "application/epub+zip")
    kb = KnowledgeBase(settings, "formats", create=True)
    report = kb.add_paths([folder], progress=False)
    failed = {Path(f["path"]).name: f["error"] for f in report["failed"]}
    assert set(failed) == {"broken.doc", "broken.epub"}, failed
    assert "damaged OLE file" in failed["broken.doc"]
    assert "pandoc could not read the EPUB" in failed["broken.epub"]
    assert report["ingested"] == 10
    text = {}
    with kb.store() as store:
        for d in kb.documents():
            text[Path(d["source"]).name] = "\n".join(" / ".join(c["title_path"]) + "\n" + c["text"]
                                                     for c in store.chunks(d["doc_id"]))
    expected = {
        "file.doc": ["遗留文档 Legacy memo", DOCX_TEXT], "saved-as.docx": [DOCX_TEXT],
        "file.xls": ["产品", "价格", "苹果 apple", "华东"], "file.ods": ["苹果 apple", "华东"],
        "file.ppt": ["季度汇报 Quarterly review", PPTX_TEXT], "file.odp": [PPTX_TEXT],
        "file.odt": ["开放文档 Handbook", "开放文档的正文", "城市", "人口", "上海"],
        "file.rtf": ["富文本中文", "rich text"], "file.epub": ["第一章 Chapter One", "电子书的中文内容"],
        "mail.eml": ["报销需要在三十天内提交", "附件说明.docx", DOCX_TEXT, "内层邮件正文", "上海"],
    }
    for name, needles in expected.items():
        for needle in needles:
            assert needle in text[name], (name, needle, text[name][:500])
    hits = kb.search("旧格式的年假规定", k=3)
    assert Path(hits[0].source).name in {"file.doc", "saved-as.docx"}


def test_message_attachments_are_parsed_after_a_title_and_a_bad_one_is_noted(made, tmp_path, monkeypatch):
    eml = tmp_path / "mail.eml"
    eml.write_bytes(email_with_attachments(made[".docx"]))
    texts = _texts(parse_file(eml))
    assert any("报销需要在三十天内提交" in t for t in texts)
    assert DOCX_TEXT in _after(texts, "Attachment: 附件说明.docx")
    assert _after(texts, "Attachment: broken.pdf").startswith("(attachment broken.pdf not read: ")
    assert "内层邮件正文" in _after(texts, "Attachment: 转发 Forwarded.eml")
    assert "上海 | 2400" in _after(texts, "Attachment: cities.csv")
    tight = _texts(parse_file(eml, limits=ZipLimits(max_unzipped_mb=0.01)))  # the limits reach attachments
    assert "parse.max_unzipped_mb=0.01" in _after(tight, "Attachment: 附件说明.docx")
    monkeypatch.setattr(convert, "MAX_ATTACHMENT_DEPTH", 1)
    shallow = _texts(parse_file(eml))
    assert "内层邮件正文" in _after(shallow, "Attachment: 转发 Forwarded.eml")
    assert "nested more than 1 deep" in _after(shallow, "Attachment: cities.csv")

    msg = tmp_path / "minutes.msg"
    msg.write_bytes(outlook_msg("会议纪要 Minutes", "预算已批准 the budget was approved.",
                                [("议程.docx", made[".docx"].read_bytes()),
                                 ("notes.txt", "纪要附件 plain attachment".encode()), ("link.url", None)]))
    texts = _texts(parse_file(msg))
    assert any("预算已批准" in t for t in texts)
    assert DOCX_TEXT in _after(texts, "Attachment: 议程.docx")
    assert "纪要附件 plain attachment" in _after(texts, "Attachment: notes.txt")
    assert "no data" in _after(texts, "Attachment: link.url")
    renamed = tmp_path / "minutes.doc"  # an OLE file: its streams say it is a message
    renamed.write_bytes(msg.read_bytes())
    assert _texts(parse_file(renamed)) == texts


def test_an_attachment_with_a_long_chinese_name_is_read_and_notes_hold_no_temp_path(tmp_path, monkeypatch):
    from email.message import EmailMessage

    m = EmailMessage()
    m["Subject"], m["From"], m["To"] = "长附件名", "a@example.com", "b@example.com"
    m.set_content("正文 the body.")
    m.add_attachment("附件内容 attachment body".encode(), maintype="text", subtype="plain",
                     filename="长" * 100 + ".txt")  # 304 bytes: over the 255 a file name may have
    eml = tmp_path / "long.eml"
    eml.write_bytes(m.as_bytes())
    texts = _texts(parse_file(eml))
    (title,) = [t for t in texts if t.startswith("Attachment: ")]
    assert title.endswith(".txt") and len(title.encode()) <= len("Attachment: ") + 200
    assert "附件内容 attachment body" in _after(texts, title)

    def fail(tmp, i, name, data, parse, depth):
        raise OSError(36, "File name too long", str(tmp / str(i) / name))

    monkeypatch.setattr(convert, "_parse_detached", fail)
    note = _after(_texts(parse_file(eml)), title)
    assert note.startswith("(attachment ") and "OSError: File name too long" in note and "kb-convert-" not in note


def test_a_missing_converter_is_a_clear_error(made, tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(ParseError, match=r"reading \.epub needs pandoc \(Debian package: pandoc\)"):
        parse_file(made[".epub"])
    with pytest.raises(ParseError, match=r"reading \.doc needs LibreOffice \(Debian: libreoffice-writer-nogui\); "
                                         r"or save it as DOCX first \(an old binary Office format\)"):
        parse_file(made[".doc"])
    with pytest.raises(ParseError, match=r"reading \.xls needs LibreOffice \(Debian: libreoffice-calc-nogui\)"):
        parse_file(made[".xls"])
    renamed = tmp_path / "slides.pptx"
    renamed.write_bytes(made[".ppt"].read_bytes())
    with pytest.raises(ParseError, match=r"reading \.ppt needs LibreOffice \(Debian: libreoffice-impress-nogui\)"):
        parse_file(renamed)
    with pytest.raises(ParseError, match=r"reading \.odt needs LibreOffice"):
        parse_file(made[".odt"])


def _gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie of ours counts as gone
            if Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_a_stuck_converter_is_killed_with_its_process_group_and_with_the_worker(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    with pytest.raises(ParseError, match="stuck took longer than 1 s"):
        convert.run_tool(["sh", "-c", f"sleep 600 & echo $! > {pidfile}; wait"], 1.0, "stuck")
    assert _gone(int(pidfile.read_text()))
    pidfile = tmp_path / "child.pid"
    with SandboxWorker(Limits(timeout_s=3)) as worker, pytest.raises(ParseError, match="parse.timeout_s=3"):
        worker.call(convert.run_tool, ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 600"], 600.0, "x")
    assert _gone(int(pidfile.read_text()))


def test_a_killed_libreoffice_leaves_no_temporary_files(tmp_path, monkeypatch):
    import tempfile

    from bench.formats import gbk_rtf

    if shutil.which("soffice") is None:
        pytest.skip("LibreOffice is not installed")
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    rtf = tmp_path / "t.rtf"
    rtf.write_bytes(gbk_rtf("中文内容", "english"))
    envs = []
    run_tool = convert.run_tool

    def spy(cmd, timeout_s, what, env=None):
        envs.append(env or {})
        return run_tool(cmd, timeout_s, what, env)

    monkeypatch.setattr(convert, "run_tool", spy)
    try:  # killed after a second (the time it takes to start and make its lu*.tmp), or done
        with convert.office_converted(rtf, ".rtf", timeout_s=1.2):
            pass
    except ParseError as e:
        assert "LibreOffice took longer than" in str(e)
    assert envs and all(Path(e.get("TMPDIR", "/")).parent.name.startswith("kb-convert-") for e in envs)
    assert list(system_tmp.iterdir()) == []  # no lu*.tmp, no kb-convert-* folder


def test_folders_left_by_a_killed_conversion_are_swept(tmp_path):
    import tempfile

    stale = Path(tempfile.gettempdir()) / "kb-convert-999999999-left"
    stale.mkdir(exist_ok=True)
    with convert.workdir() as d:
        assert d.name.startswith(f"kb-convert-{os.getpid()}-")
    assert not stale.exists() and not d.exists()
