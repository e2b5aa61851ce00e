"""Documents are data, never instructions: what the answer prompt does to passages first.

A passage goes into the prompt as quoted text: chat-template control tokens are removed (a passage
cannot open a new message), bracketed numbers become (n) (a passage cannot open a numbered passage
or forge a citation), and sentences that address the assistant
with instructions ("ignore the instructions above…", "you are now…", "reveal your system
prompt…", a `system:` line; the same in Chinese) are left out, so the model never reads them.
Source names are reduced to a short single line. The system prompt says the passages are data.
"""

from __future__ import annotations

import re
import unicodedata
from difflib import SequenceMatcher

from ingest.sentences import split_sentences

CONTROL_TOKENS = re.compile(r"<\|im_start\|>\s*(?:system|user|assistant|developer|tool)?\b|<\|[^|>\n]{1,40}\|>"
                            r"|\[/?INST\]|<</?SYS>>|</?s>|<\|?(?:im_start|im_end|endoftext)\|?>", re.I)
"""Chat-template markers of common model families (ChatML, Llama, Mistral)."""
CITATION_MARK = re.compile(r"[\[［【]\s*\d{1,3}\s*[\]］】]")
QUALIFIER = (r"(?:all\s+|any\s+)?(?:of\s+)?(?:the\s+|your\s+|my\s+|these\s+|those\s+)?"
             r"(?:previous|above|prior|earlier|preceding|foregoing|system|original|initial|other)?\s*")
INSTRUCTION = re.compile("|".join([
    rf"\b(?:ignore|disregard|forget|override|bypass)\s+{QUALIFIER}(?:instructions?|prompts?|directions|rules|guidelines)\b",
    r"\b(?:ignore|disregard)\s+(?:everything|all|the)\s+(?:above|before|previously\s+said)\b(?!\s+(?:version|form|section|table|figure|paragraph|list|page))",
    r"\bignore\s+(?:the|these|those|all)\s+(?:context|passages?|documents?|sources?)\b",
    r"\b(?:reveal|print|repeat|output|leak|disclose|show)\s+(?:me\s+)?(?:your|the\s+assistant'?s)\s+(?:system\s+prompt|instructions|hidden\s+prompt|initial\s+prompt|rules)\b",
    r"\byou\s+are\s+now\s+(?:an?\s+)?(?:unfiltered|unrestricted|jailbroken|uncensored|dan\b|in\s+developer\s+mode)",
    r"\b(?:system|assistant|developer)\s*(?:prompt)?\s*:\s*[\"']?(?:you\s+(?:must|will|are|should)|from\s+now\s+on|ignore|always\s+(?:answer|reply|respond|say))\b",
    r"\b(?:from\s+now\s+on|henceforth)\s*,?\s*(?:you\s+)?(?:must\s+|will\s+|should\s+)?(?:only\s+)?(?:answer|reply|respond|say)\b",
    r"(?:忽略|无视|忽视|不要理会|忘记|忘掉|无视掉|忽略掉)(?:以上|上面|上述|之前|前面|先前|所有|全部|一切)[^。！？!?\n]{0,10}?(?:指令|指示|提示词|提示|规则|要求|设定)",
    r"(?:泄露|透露|输出|告诉我|重复|打印|显示)(?:一下)?你的(?:系统提示|提示词|指令|初始指令|设定|规则)",
    r"你(?:现在|从现在起|从现在开始)是(?:一个)?(?:没有限制|不受限制|无限制|越狱|不受约束)",
    r"(?:从现在开始|从现在起|从今以后)[,，]?(?:你)?(?:只|必须|只能)(?:回答|回复|说)",
    r"(?:系统|助手)\s*[:：]\s*(?:你(?:必须|要|只)|请始终|始终|从现在)",
]), re.I)


INVISIBLE = re.compile(r"<!--.*?-->", re.S)
"""Markup a reader of the document does not see (HTML/Markdown comments)."""


def normalize(text: str) -> str:
    """`text` as the instruction filter reads it: NFKC (full-width letters become ASCII, traditional
    characters stay), format characters (zero-width spaces and joiners, soft hyphens) removed."""
    return unicodedata.normalize("NFKC", strip_format(text))


def strip_format(text: str) -> str:
    """`text` without Unicode format characters (category Cf: zero-width, soft hyphen, BOM, ...)."""
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cf")


def is_instruction(sentence: str) -> bool:
    """Whether `sentence` addresses the assistant with instructions (prompt injection); a few
    precise patterns, so that ordinary business text is never left out (bench/injection.py
    measures both ways). The filter is one layer: the prompt declares passages data and the
    compliance step withholds replies that repeat the instructions."""
    return bool(INSTRUCTION.search(normalize(sentence)))


def quoted_lines(text: str) -> list[list[str]]:
    """The lines of `text` as lists of the sentences that may go into the prompt (without control
    tokens, citation marks or instructions); an empty list is a blank line."""
    out: list[list[str]] = []
    for line in CONTROL_TOKENS.sub("\n", INVISIBLE.sub(" ", strip_format(text))).splitlines():
        kept = []
        for sent in (s for s in split_sentences(line) for s in _finer(s)):
            if is_instruction(sent):
                continue
            sent = re.sub(r"\s+([.,;:!?。，；：！？])", r"\1", " ".join(CITATION_MARK.sub(_parenthesize, sent).split()))
            if sent:
                kept.append(sent)
        if kept or not line.strip():
            out.append(kept)
    return out


def quoted_sentences(text: str) -> list[str]:
    """The sentences of `text` that may go into the prompt (`quoted_lines`, flattened)."""
    return [s for line in quoted_lines(text) for s in line]


def _parenthesize(mark: re.Match) -> str:
    """A bracketed number in a document, as (n): kept, but unlike a citation of the prompt."""
    return f"({re.sub(r'[^0-9]', '', mark.group(0))})"


def _finer(sentence: str) -> list[str]:
    """An instruction-like sentence cut at every punctuation mark and heading marker, so that only
    its instruction-like parts are left out."""
    if not is_instruction(sentence):
        return [sentence]
    return [p for p in re.split(r"(?<=[.!?;])\s+|(?<=[。！？；])\s*|\s+(?=#)", sentence) if p.strip()]


def quote(text: str) -> str:
    """`text` as a passage for the prompt: its `quoted_lines` (paragraph breaks kept, which the
    model reads; a line can no longer open a numbered passage, a citation or a chat turn)."""
    lines = [re.sub(r"([。！？；])\s+", r"\1", " ".join(line)) for line in quoted_lines(text)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def clean_source(name: str, max_chars: int = 80) -> str:
    """A source name for the prompt: one short line without brackets, control tokens or
    instructions."""
    name = CONTROL_TOKENS.sub(" ", name or "")
    name = re.sub(r"[\x00-\x1f\x7f()\[\]（）［］【】<>{}]", " ", name)
    if is_instruction(name):
        return "document"
    return " ".join(name.split())[:max_chars] or "document"


def repeats(answer: str, instructions: str, min_chars: int = 24) -> bool:
    """Whether `answer` repeats a stretch of at least `min_chars` characters of `instructions`
    (a leaked system prompt), whitespace and case ignored."""
    a = "".join(answer.lower().split())
    b = "".join(instructions.lower().split())
    if len(a) < min_chars or len(b) < min_chars:
        return False
    m = SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b))
    return m.size >= min(min_chars, len(b))
