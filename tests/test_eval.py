"""Evaluation: multiple choice on the real CMMLU files, open-ended answers and retrieval on a
small CMRC knowledge base, side-by-side comparisons, text metrics, malformed input."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest

from cli import main as kb_main
from eval.choice import LETTERS, LoglikScorer, load_choice, parse_choice
from eval.data import Question
from eval.judge import Judge
from eval.open import cited, content_units, evaluate_open, summarize, write_report
from eval.textmetrics import contains_answer, exact_match, f1, rouge_l
from serve.chain import Answer
from tests.conftest import SHARED, cmrc_subset

CMMLU_TEST = SHARED / "cmmlu" / "test"


def _rows(folder) -> int:
    return sum(1 for f in folder.glob("*.csv") for _ in csv.DictReader(f.open(encoding="utf-8")))


def _rows_file(f) -> int:
    return sum(1 for _ in csv.DictReader(f.open(encoding="utf-8")))


def _run(capsys, *argv) -> dict:
    code = kb_main([*argv, "--json", "-q"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


# multiple choice ---------------------------------------------------------------------------------
def test_choice_on_cmmlu_with_a_tiny_random_model_is_near_chance(tiny_llm_dir, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("KB_MODELS__LLM", str(tiny_llm_dir))
    monkeypatch.setenv("KB_MODELS__DEVICE", "cpu")
    r = _run(capsys, "eval", "choice", str(CMMLU_TEST), "--shots", "2", "--report", str(tmp_path / "c.html"))
    assert r["n"] == _rows(CMMLU_TEST) == len(r["per_question"])
    assert sum(s["n"] for s in r["per_subject"].values()) == r["n"]
    assert set(r["per_subject"]) == {f.stem for f in CMMLU_TEST.glob("*.csv")}
    assert abs(r["accuracy"] - 0.25) < 0.07  # random weights: chance, whatever letter it favours
    assert r["correct"] == sum(q["correct"] for q in r["per_question"])
    assert "<img" in (tmp_path / "c.html").read_text() and json.loads((tmp_path / "c.json").read_text())["n"] == r["n"]


def test_batched_letter_scores_equal_a_plain_forward_pass(tiny_llm_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llm_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir)).eval()
    prompts = ["question one? answer:", "a much longer question with many more words in it? answer:",
               "mid length question here? answer:"]
    batched = LoglikScorer(model, tok, batch_size=3).scores(prompts)
    scorer = LoglikScorer(model, tok, batch_size=1)
    for p, row in zip(prompts, batched):
        ids = torch.tensor([tok(p)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, -1], -1)
        want = [torch.logsumexp(logp[lids], -1).item() for lids in scorer.letter_ids]
        np.testing.assert_allclose(row, want, atol=1e-4)
    assert len({tuple(x) for x in scorer.letter_ids}) == 4  # four distinct letters


def test_malformed_rows_are_reported_with_line_numbers_and_skipped(tmp_path, capsys):
    f = tmp_path / "test" / "demo.csv"
    f.parent.mkdir()
    f.write_text(",Question,A,B,C,D,Answer\n0,好问题,甲,乙,丙,丁,B\n1,缺选项,甲,,丙,丁,A\n"
                 "2,答案错,甲,乙,丙,丁,E\n3,\"多行\n问题\",甲,乙,丙,丁,c\n", encoding="utf-8")
    items, problems = load_choice(f)
    assert [(i.line, i.answer) for i in items] == [(2, "B"), (6, "C")]
    assert problems == ["demo.csv:3: skipped (empty B)", "demo.csv:4: skipped (answer 'E' is not one of A-D)"]
    r = _run(capsys, "eval", "choice", str(f), "--mode", "embed")
    assert r["n"] == 2 and r["skipped_rows"] == problems


def test_choice_without_an_llm_uses_the_embedder_or_says_how_to_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KB_MODELS__LLM", "")  # no LLM configured
    r = _run(capsys, "eval", "choice", str(CMMLU_TEST / "marketing.csv"))
    assert r["mode"] == "embed" and r["n"] == _rows_file(CMMLU_TEST / "marketing.csv")
    assert kb_main(["eval", "choice", str(CMMLU_TEST / "marketing.csv"), "--mode", "loglik"]) == 2
    assert "--mode embed" in capsys.readouterr().err
    assert kb_main(["eval", "choice", str(tmp_path / "nope.csv")]) == 2
    assert kb_main(["eval", "choice", str(CMMLU_TEST / "marketing.csv"), "--shots", "3", "--dev",
                    str(tmp_path)]) == 2  # a dev folder with no CSVs


@pytest.mark.parametrize("text, letter", [
    ("答案是B。", "B"), ("答案：C选项正确", "C"), ("我选D，因为", "D"), ("A. 因为…", "A"), ("(B)", "B"),
    ("The answer is C.", "C"), ("正确的是 D", "D"), ("无法判断", None), ("All of them", None)])
def test_parse_choice(text, letter):
    assert parse_choice(text) == letter


# text metrics ------------------------------------------------------------------------------------
def test_text_metrics_on_chinese_and_english():
    assert exact_match("北京。[1]", ["北京"]) == 1.0 and exact_match("在北京", ["北京"]) == 0.0
    assert f1("在北京", ["北京"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert f1("the red car [2]", ["a red car"]) == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert rouge_l("北京是首都", ["首都北京"]) == pytest.approx(2 * 0.4 * 0.5 / 0.9)  # LCS 北京 = 2
    assert contains_answer("答案：1998年的夏天", ["1998年"]) == 1.0 and f1("", ["x"]) == 0.0


def test_judge_grade_and_summary():
    class Fixed:  # a judge endpoint's reply
        def __init__(self, reply):
            self.reply = reply

        def generate(self, messages):
            return self.reply

    assert Judge(Fixed("Grade: 4")).grade("q", ["a"], "a") == 0.75
    assert Judge(Fixed("no idea")).grade("q", ["a"], "a") is None
    base = {"exact_match": 0.0, "f1": 0.5, "rouge_l": 0.5, "contains_answer": 1.0, "faithfulness": 1.0,
            "citation_correct": 1.0, "context_has_answer": 1.0, "refused": 0.0, "fallback": 0.0, "cites": 1.0,
            "seconds": 0.1}
    s = summarize([{**base, "judge": 0.75}, {**base, "judge": None, "fallback": 1.0}])
    assert s["judge"] == 0.75 and s["judge_unparsed"] == 1 and s["fallback_rate"] == 0.5 and s["answered"] == 1


def test_fallbacks_are_counted_apart_for_questions_outside_the_kb():
    base = {"exact_match": 0.0, "f1": 0.5, "rouge_l": 0.5, "contains_answer": 1.0, "faithfulness": 1.0,
            "citation_correct": 1.0, "context_has_answer": 1.0, "refused": 0.0, "fallback": 0.0, "cites": 1.0,
            "seconds": 0.1}
    rows = [{**base, "in_kb": True}, {**base, "in_kb": True, "fallback": 1.0, "cites": 0.0, "f1": 0.0},
            {**base, "in_kb": True, "context_has_answer": 0.0, "fallback": 1.0, "cites": 0.0},
            {**base, "in_kb": True, "cites": 0.0},
            {**base, "in_kb": False, "fallback": 1.0, "f1": 0.0}, {**base, "in_kb": False, "fallback": 1.0},
            {**base, "in_kb": False, "f1": 1.0}]
    s = summarize(rows)
    assert (s["n"], s["n_in_kb"], s["n_not_in_kb"]) == (7, 4, 3)
    assert s["false_fallback_rate"] == 0.5                     # 2 of the 4 answerable
    assert s["fallback_rate"] == pytest.approx(4 / 7, abs=1e-4)  # of every question asked
    assert s["false_fallback_when_retrieved"] == pytest.approx(1 / 3, abs=1e-4)  # 1 of the 3 retrieved
    assert s["refusal_correct"] == pytest.approx(2 / 3, abs=1e-4)  # 2 of the 3 not in the KB fell back
    assert s["citation_rate"] == 0.5                           # of the 2 answered in-KB replies
    assert s["f1"] == 0.375                                    # quality only over in-KB questions


# answer-level metrics on hand-made chain results -------------------------------------------------
P_CAPITAL, P_CITY = "北京是中国的首都。", "上海是中国最大的城市。"
REFUSAL = "资料中没有答案。"


class FixedChain:
    """A chain whose ask() returns fixed results: question -> (answer, passage texts, fallback, draft)."""

    def __init__(self, replies: dict[str, tuple[str, list[str], bool, str]]) -> None:
        self.replies = replies
        self.kb, self.llm = SimpleNamespace(name="fixed"), None
        # the settings the real chain has, as far as eval.open reads them
        self.settings = SimpleNamespace(compliance=SimpleNamespace(min_grounding=0.5),
                                        answer=SimpleNamespace(max_context_chars=1000))

    def ask(self, question: str) -> Answer:
        answer, texts, fallback, draft = self.replies[question]
        return Answer(answer, [{"text": t} for t in texts], fallback, "fell back" if fallback else None, question,
                      0.5, None, "fixed", seconds=0.01, draft=draft)

    def is_refusal(self, question: str, draft: str) -> bool:
        return draft == REFUSAL


def _ask_all(replies: dict, golds: dict, in_kb: dict | None = None) -> dict:
    qs = [Question(str(i), q, [golds[q]], meta={"in_kb": (in_kb or {}).get(q, True)}) for i, q in enumerate(replies)]
    return evaluate_open(FixedChain(replies), qs, progress=False)


def test_citations_and_content_units():
    assert cited("甲[2]乙[1，3]丙[9] [1, 2]", 3) == [1, 2, 3]  # [9] names no passage
    assert content_units("北京，是 首都[2]上海 in 2018 Year") == ["北京", "是首", "首都", "上海", "in", "2018", "year"]


def test_faithfulness_and_citation_correctness_disagree_with_fallback_and_citation_rates(tmp_path):
    both = [P_CAPITAL, P_CITY]
    replies = {"中国的首都是哪里？": ("北京是中国的首都。[1]", both, False, "北京是中国的首都。[1]"),
               # the wrong passage
               "中国最大的城市是哪个？": ("上海是中国最大的城市。[1]", both, False, "上海是中国最大的城市。[1]"),
               "首都在哪？": ("北京是中国的首都。", both, False, "北京是中国的首都。"),  # cites nothing
               "两个城市？": ("北京是中国的首都，上海是中国最大的城市。[1, 2]", both, False, "")}
    golds = dict(zip(replies, ["北京", "上海", "北京", "上海"]))
    r = _ask_all(replies, golds)
    assert r["fallback_rate"] == 0.0 and r["answered"] == 4
    # 上海是中国最大的城市: 9 bigrams, of which only 是中 and 中国 are in the cited passage [1]
    assert [q["faithfulness"] for q in r["per_question"]] == [1.0, round(2 / 9, 4), 0.0, 1.0]
    assert r["faithfulness"] == pytest.approx((1 + 2 / 9 + 0 + 1) / 4, abs=1e-4)
    assert r["faithful_rate"] == 0.5  # nothing fell back, yet half are unfaithful
    assert "supported_rate" not in r
    assert r["citation_rate"] == 0.75                          # 3 of 4 cite a passage
    assert r["citation_correct"] == pytest.approx(2 / 3, abs=1e-4)  # the wrong passage holds no 上海
    write_report(r, str(tmp_path / "open.html"))
    html = (tmp_path / "open.html").read_text(encoding="utf-8")
    assert "faithful_rate" in html and "citation_correct" in html and "Least faithful" in html


def test_refusal_correct_counts_only_questions_outside_the_kb():
    replies = {"内1": ("抱歉。", [P_CAPITAL], True, ""),                          # false fallback
               "内2": ("北京是中国的首都。[1]", [P_CAPITAL], False, "北京是中国的首都。[1]"),
               "外1": ("抱歉。", [P_CITY], True, ""),                             # fell back: right
               "外2": ("抱歉。", [P_CITY], True, REFUSAL),                        # refused, so it fell back: right
               # answered: wrong
               "外3": ("上海是中国最大的城市。[1]", [P_CITY], False, "上海是中国最大的城市。[1]")}
    golds = dict.fromkeys(replies, "北京")
    r = _ask_all(replies, golds, in_kb={q: q.startswith("内") for q in replies})
    assert (r["n_in_kb"], r["n_not_in_kb"]) == (2, 3)
    assert r["refusal_correct"] == pytest.approx(2 / 3, abs=1e-4)  # over every question: 3/5
    assert r["fallback_rate"] == pytest.approx(3 / 5, abs=1e-4)
    assert r["false_fallback_rate"] == 0.5 and r["answered"] == 1
    assert _ask_all({"内2": replies["内2"]}, golds)["refusal_correct"] is None  # no question outside the KB


# open-ended and retrieval on a small CMRC knowledge base -----------------------------------------
@pytest.fixture(scope="module")
def cmrc_small(tmp_path_factory, tiny_nsp_dir):
    """The first 12 CMRC articles as a KB (default and baseline configs) and their questions."""
    root = tmp_path_factory.mktemp("cmrc")
    squad, _, questions = cmrc_subset(root, 12)
    home = root / "home"
    base = root / "base.yaml"
    base.write_text(f"home: {home}\nmodels: {{nsp: {tiny_nsp_dir}, device: cpu, llm: null}}\n", encoding="utf-8")
    baseline = root / "baseline.yaml"
    baseline.write_text(f"extends: {base}\nchunking: {{method: fixed, fixed_size: 500, fixed_overlap: 50}}\n"
                        "retrieval: {levels: [segment], embed_field: raw_text, hybrid: false, rerank: false}\n",
                        encoding="utf-8")
    assert kb_main(["ingest", str(root / "docs"), "--kb", "cmrc", "--config", str(base), "-q"]) == 0
    assert kb_main(["ingest", str(root / "docs"), "--kb", "cmrc_baseline", "--config", str(baseline), "-q"]) == 0
    return {"squad": squad, "base": base, "baseline": baseline, "n": len(questions)}


def test_open_eval_runs_the_answer_chain_end_to_end(cmrc_small, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("KB_HOME", raising=False)
    r = _run(capsys, "eval", "open", str(cmrc_small["squad"]), "--kb", "cmrc", "--config",
             str(cmrc_small["base"]), "--report", str(tmp_path / "open.html"))
    rows = r["per_question"]
    assert r["n"] == len(rows) == cmrc_small["n"]
    assert r["fallback_rate"] == pytest.approx(np.mean([q["fallback"] for q in rows]), abs=1e-4)
    assert r["answered"] == sum(not q["fallback"] for q in rows)
    # extractive answers are whole sentences: rarely an exact match, but they hold gold answers
    assert r["contains_answer"] > 0.2 and r["f1"] > 0.05 and r["latency_p95_s"] >= r["latency_p50_s"] > 0
    for q in rows:
        if q["fallback"]:
            assert q["reason"] and q["faithfulness"] is None
        else:  # extractive answers are sentences of the passages they cite, copied
            assert q["cited"] and q["faithfulness"] == 1.0, q
    assert r["faithfulness"] == r["faithful_rate"] == 1.0
    html = (tmp_path / "open.html").read_text()
    assert "Lowest F1" in html and "<img" in html


def test_compare_default_and_baseline_retrieval(cmrc_small, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("KB_HOME", raising=False)
    squad, base, baseline = str(cmrc_small["squad"]), cmrc_small["base"], cmrc_small["baseline"]
    a, b = f"{base}@cmrc", f"{baseline}@cmrc_baseline"
    cmp = _run(capsys, "eval", "retrieval", squad, "--compare", a, b, "--report", str(tmp_path / "cmp.html"))
    by = {m["metric"]: m for m in cmp["metrics"]}
    assert by["n"][a] == by["n"][b] == cmrc_small["n"]
    for m in cmp["metrics"]:
        assert m["diff"] == pytest.approx(m[b] - m[a], abs=1e-4)
    assert by["recall@5"][a] == cmp["runs"][a]["recall@5"]
    p = cmp["paired"]
    assert p["questions"] == cmrc_small["n"] == p["both"] + p[f"only {a}"] + p[f"only {b}"] + p["neither"]
    assert p["both"] + p[f"only {a}"] == round(by["recall@5"][a] * cmrc_small["n"])
    # the same comparison from saved results
    _run(capsys, "eval", "retrieval", squad, "--kb", "cmrc", "--config", str(base),
         "--report", str(tmp_path / "a.html"))
    again = _run(capsys, "eval", "retrieval", squad, "--compare", str(tmp_path / "a.json"), b)
    assert {m["metric"]: m["diff"] for m in again["metrics"]} == {m["metric"]: m["diff"] for m in cmp["metrics"]}
    assert "Side by side" in (tmp_path / "cmp.html").read_text()


def test_retrieval_augmented_choice_puts_kb_passages_into_the_prompt(cmrc_small, monkeypatch):
    from eval.choice import ChoiceItem, attach_context, build_prompt
    from kb.settings import load_settings
    from retrieval.knowledge_base import KnowledgeBase

    monkeypatch.delenv("KB_HOME", raising=False)
    data = json.loads(cmrc_small["squad"].read_text(encoding="utf-8"))
    qa = data["data"][0]["paragraphs"][0]["qas"][0]
    item = ChoiceItem("demo", 2, qa["question"], {L: f"选项{L}" for L in LETTERS}, "A")
    attach_context([item], KnowledgeBase(load_settings(str(cmrc_small["base"])), "cmrc"), k=2, max_chars=300)
    assert 1 <= len(item.context) <= 2 and sum(map(len, item.context)) <= 300
    assert any(qa["answers"][0]["text"] in c for c in item.context)  # the gold passage was retrieved
    prompt = build_prompt(item, [])
    assert prompt.index("资料1：") < prompt.index("题目：") and prompt.endswith("答案：")


def test_judge_from_config_loads_the_local_model(tiny_llm_dir):
    from eval.judge import build_judge
    from kb.settings import load_settings

    assert build_judge(load_settings(None)) is None  # no judge configured: no judge column
    s = load_settings(None, **{"eval.judge_model": str(tiny_llm_dir), "models.device": "cpu",
                               "llm.generation.max_new_tokens": 4, "llm.generation.temperature": 0.0})
    judge = build_judge(s)
    assert judge.llm.name == f"local:{tiny_llm_dir}"
    grade = judge.grade("q?", ["a"], "a")
    assert grade in (None, 0.0, 0.25, 0.5, 0.75, 1.0)  # random weights: any digit 1-5 scaled, or none


def test_passages_are_judged_as_the_llm_saw_them():
    """Faithfulness, citation correctness and context_has_answer read the passages cut to the
    context budget, not the whole hit text the LLM never saw."""
    from eval.open import answer_row

    q = Question("1", "天空是什么颜色？", ["红色"], None, {})
    passage = "无关的文字。" * 300 + "天空是红色的。"
    r = {"answer": "天空是红色的[1]。", "sources": [{"text": passage}], "fallback": False, "reason": "",
         "seconds": 0.1}
    whole, cut = answer_row(q, r, False, None), answer_row(q, r, False, 1000)
    assert whole["faithfulness"] == 1.0 and whole["citation_correct"] == 1.0 and whole["context_has_answer"] == 1.0
    assert cut["faithfulness"] < 0.5 and cut["citation_correct"] == 0.0 and cut["context_has_answer"] == 0.0
