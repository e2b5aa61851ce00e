"""One typed settings object, loaded from `configs/*.yaml` with environment overrides.

Precedence (highest first): environment variables (`KB_<SECTION>__<KEY>`, e.g.
`KB_CHUNKING__THRESHOLD=0.4`; `KB_HOME` for the data folder), then the YAML file, then the
defaults below.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


class Section(BaseModel):
    """A settings section; each field's docstring is its description (`kb config defaults` prints it)."""

    model_config = ConfigDict(use_attribute_docstrings=True)


class ModelsConfig(Section):
    """Model names or paths; resolved offline by `kb.models.resolve_model`."""

    embedder: str = "model:e5-small"
    """multilingual-e5-small from `kb models install`; also `model:minilm` (English), a cached hub
    name (BAAI/bge-base-zh-v1.5) or a folder."""
    nsp: str | None = None
    """A pretrained next-sentence-prediction model (e.g. bert-base-chinese). None: train a head."""
    nsp_encoder: str = "model:e5-small"
    """Encoder that `kb train-nsp` puts a next-sentence head on when `nsp` is None."""
    llm: str | None = "model:qwen2.5-0.5b-instruct"
    """The generative model (`kb models install` puts it in place). A `model:` spec that is not
    installed means extractive answers (with a warning) under `llm.backend: auto`; None: no LLM."""
    reranker: str | None = None
    """A cross-encoder reranking retrieval's candidates (e.g. `model:rerank-e5`); None: none."""
    device: str = "auto"
    """`auto` (cuda when present), `cpu`, `cuda`, `cuda:1`."""
    dir: Path | None = None
    """Where `kb models install` puts converted models and `model:<name>` specs resolve;
    None: `models/` beside KB_HOME."""


class ParseConfig(Section):
    pdf_strategy: Literal["fast", "hi_res", "ocr_only", "auto"] = "fast"
    """unstructured's PDF strategy: fast (pdfminer text, no layout model), hi_res, ocr_only, auto."""
    max_file_mb: float = 100.0
    """Files larger than this many MiB fail with that reason before parsing."""
    languages: list[str] = Field(default_factory=lambda: ["eng", "zho"])
    """Document languages passed to unstructured's partitioners (ISO 639-3 codes)."""
    isolate: bool = True
    """Parse each file in a worker process (reused across the files of a batch, restarted after a
    timeout or crash) under the time and memory limits below; False parses in-process, unlimited."""
    timeout_s: float = 120.0
    """A file whose parsing takes longer fails with that reason (its worker is killed); isolate only."""
    max_memory_mb: float = 2048.0
    """Memory one file's parsing may take on top of the loaded parser libraries (about 0.9 GiB), as
    the worker's data-segment limit (RLIMIT_DATA); isolate only."""
    workers: int = Field(0, ge=0)
    """Worker processes parsing a batch at once, each file under the limits above (isolate only;
    in-process parsing is one file at a time). 0 = auto: one per usable CPU core, at most 4. Each
    worker may take max_memory_mb beyond the parser libraries, which the workers share."""
    max_unzipped_mb: float = 500.0
    """Office/zip files (docx, xlsx, pptx) whose members unpack to more than this fail before parsing."""
    max_zip_ratio: float = 100.0
    """...as does a zip member that expands more than this many times its stored size (a zip bomb),
    when it unpacks to more than 4 MiB."""
    max_line_chars: int = 10_000
    """Text lines longer than this are wrapped at whitespace before parsing (a one-line 20 MB file
    would otherwise take the text partitioner minutes: its cost grows faster than the line)."""
    ocr: Literal["auto", "tesseract", "rapidocr", "off"] = "auto"
    """OCR of images and of PDF pages without a text layer (ingest/ocr.py): tesseract (Debian
    tesseract-ocr + language packs), rapidocr (PyPI rapidocr-onnxruntime), auto = the default engine
    (tesseract, chosen by bench/ocr.py) if installed, else the other, else off with a warning. Off or
    missing: a scanned file fails with that reason; a PDF with some text pages keeps them (warning)."""
    ocr_languages: list[str] = Field(default_factory=lambda: ["chi_sim", "eng"])
    """Tesseract language packs to recognise with (chi_sim, chi_tra, eng, ...); rapidocr reads
    Chinese and English whatever this says."""
    ocr_dpi: int = Field(300, ge=50, le=600)
    """Resolution at which scanned PDF pages are rendered for OCR (and told to tesseract)."""


class CleanConfig(Section):
    drop_repeated_headers: bool = True
    """Drop short lines repeated across pages (running headers and footers)."""
    repeat_min_pages: int = 3
    """A short line on at least this many pages (and half of them) is a header/footer."""
    min_chars: int = 2
    """Blocks shorter than this (after normalising) are junk and dropped."""


class ChunkingConfig(Section):
    method: Literal["nsp", "fixed", "sentence"] = "nsp"
    """nsp: merge adjacent units while the NSP model says the next continues the last; fixed:
    langchain's RecursiveCharacterTextSplitter (`fixed_size`, `fixed_overlap`); sentence: every unit
    (a sentence, or a whole table/list/code block) is its own chunk."""
    threshold: float = 0.6
    """Merge the next unit while P(continues) >= threshold. A trained head sees balanced pairs, so
    0.5 means no evidence either way; merging asks for some evidence of continuity."""
    temperature: float = 1.0
    """P(continues) = softmax(logits / temperature)."""
    max_chars: int = 600
    """A chunk never grows past this many characters (method nsp)."""
    min_chars: int = 40
    """A chunk shorter than this always takes the next unit."""
    batch_size: int = 64
    """Sentence pairs per forward pass of the NSP model."""
    max_seq_len: int = 128
    """Tokens of a sentence pair the NSP model sees (longer pairs are cut)."""
    fixed_size: int = 500
    """method fixed: characters per chunk."""
    fixed_overlap: int = 50
    """method fixed: characters shared by consecutive chunks."""
    table_whole_chars: int | None = None
    """A table whose grid text (column names line + " | " rows) is at most this many characters is
    one unit; a longer one is cut into row-wise units that repeat the column names. None:
    `max_chars`."""
    table_rows_per_unit: int = 1
    """Rows per unit of a long table, each row written "Column: value; ..." (fewer when the unit
    would pass `max_chars`); 1 retrieves a single row best (bench/table_units.py)."""


class NSPTrainConfig(Section):
    kind: Literal["pair_head", "cross"] = "pair_head"
    """pair_head: linear head on frozen-encoder + lexical features (CPU, default);
    cross: a cross-encoder: a LoRA adapter (top `train_layers` layers) and a 2-label head, on
    `models.nsp` when that is a sequence-classification cross-encoder (adapting e.g.
    `model:nsp-e5` to the KB), else on `models.nsp_encoder` (a BERT there gets a
    BertForNextSentencePrediction head with its top layers trained instead)."""
    max_pairs: int = 5000
    """Most sentence pairs built from the KB's documents (half continuations, half not)."""
    epochs: int = 1
    """Passes over the training pairs."""
    batch_size: int = 32
    """Pairs per training step."""
    lr: float = 1e-4
    """Learning rate of the encoder's trained layers (kind cross: of the LoRA)."""
    head_lr: float = 1e-3
    """Learning rate of the next-sentence head."""
    train_layers: int = 2
    """Top encoder layers fine-tuned with the head; the rest stay frozen (fast on CPU)."""
    lora_r: int = 16
    """kind cross on a sequence classifier: the LoRA rank (lr is the LoRA's learning rate)."""
    max_seconds: float | None = None
    """kind cross: stop training after this many seconds (None: all of `epochs`)."""
    max_seq_len: int = 96
    """Tokens of a pair the encoder sees while training."""
    heldout: float = 0.15
    """Share of the pairs held out to report the trained model's accuracy."""
    far_gap: int = 4
    """With a single document, a negative pair's units are at least this many units apart."""
    seed: int = 13
    """Seed of the pair sampling and the training."""
    min_pairs: int = 40
    """Fewer pairs than this: the KB has too little text, and training fails saying so."""


class KeyInfoConfig(Section):
    method: Literal["extractive"] = "extractive"
    """The key-information extractor: extractive (keywords, entities, a summary; CPU, no model)."""
    keywords: int = 8
    """Keywords kept per article and segment."""
    entities: int = 10
    """Named entities kept per article and segment."""
    summary_sentences: int = 2
    """Sentences in a segment's summary (an article's gets one more)."""
    summary_max_chars: int = 300
    """A summary is cut to this many characters."""
    sentence_level: bool = True
    """Also index each sentence of a multi-sentence segment as a sentence entry."""
    min_sentence_chars: int = 12
    """Sentences shorter than this get no sentence entry."""


class RetrievalConfig(Section):
    levels: list[Literal["article", "segment", "sentence"]] = Field(
        default_factory=lambda: ["article", "segment", "sentence"])
    """Key-information levels embedded into level 1 of the index."""
    embed_field: Literal["key_text", "raw_text"] = "key_text"
    """key_text: embed key information (two-level); raw_text: embed the raw chunk (single level)."""
    search: Literal["hybrid", "vector", "keyword"] = "hybrid"
    """hybrid: fuse BM25 keyword search (jieba tokens for Chinese) with the vector results;
    vector: embeddings only; keyword: BM25 only."""
    hybrid: bool | None = None
    """Deprecated spelling kept for old configs: `false` turns `search: hybrid` into `vector`
    (an override of `retrieval.search` clears it)."""
    fusion: Literal["rrf", "zscore", "weighted"] = "zscore"
    """How the vector and BM25 lists merge: zscore (score-aware), rrf (reciprocal rank), weighted
    (max-normalised scores)."""
    rrf_k: int = 60
    """The k of reciprocal-rank fusion: 1 / (k + rank)."""
    coverage_weighting: bool = True
    """Scale the vector list's weight by the share of the query's tokens the embedder knows."""
    vector_weight: float = 1.0
    """Weight of the vector list in fusion."""
    keyword_weight: float = 1.0
    """Weight of the BM25 list in fusion."""
    candidates: int = 50
    """Results taken from each retriever before fusion."""
    rerank: bool = True
    """Rerank with models.reranker (a cross-encoder) when one is configured."""
    rerank_candidates: int = 20
    """Fused results the reranker scores."""
    max_article_chars: int = 1500
    """An article hit longer than this returns its first max_article_chars and does not absorb
    its segment hits."""
    index_type: Literal["auto", "flat", "ivf", "hnsw"] = "auto"
    """The FAISS index: auto (flat up to flat_max vectors, HNSW above), flat, ivf, hnsw."""
    flat_max: int = 50_000
    """auto: exact IndexFlatIP up to this many vectors, HNSW above."""
    hnsw_m: int = 32
    """HNSW: neighbours per node."""
    hnsw_ef_search: int = 128
    """HNSW: candidate list size at search time (recall against speed)."""
    ivf_nprobe: int = 64
    """IVF: clusters searched per query."""
    backend: Literal["auto", "faiss", "torch", "milvus"] = "auto"
    """auto: faiss (GPU when faiss has one); torch exact search on a GPU that faiss cannot use;
    milvus: level 1 and its BM25 in a Milvus collection per KB (the `milvus` section), shared by
    every process that points at the same Milvus."""
    embed_batch_size: int = 64
    """Texts per batch of the embedder."""
    write_lock_timeout_s: float = 600.0
    """How long a writer of a KB (ingest, delete, reindex) waits for another process writing it."""

    @model_validator(mode="after")
    def _legacy_hybrid(self) -> RetrievalConfig:
        if self.hybrid is False and self.search == "hybrid":
            self.search = "vector"
        return self

    @property
    def uses_keywords(self) -> bool:
        """Whether the index needs its BM25 side (hybrid or keyword search)."""
        return self.search != "vector"


class MilvusConfig(Section):
    uri: str = ""
    """Where Milvus is: a server (http://host:19530: Milvus Standalone or Distributed, or
    `milvus-lite server`), which any number of processes share, or a local file (Milvus Lite),
    which one process at a time opens; empty: the file milvus.db in the data folder."""
    token_env: str = ""
    """The environment variable holding the server's credentials ("user:password" or an API key),
    never the credentials themselves; empty: none."""
    db_name: str = ""
    """The Milvus database; empty: the server's default."""
    collection_prefix: str = Field(default="kb_", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Collections are named prefix + KB name + _g<generation>, reached through the alias prefix +
    KB name. Give each data folder its own prefix when several share one Milvus."""
    insert_batch: int = Field(default=1000, ge=1)
    """Rows per insert or delete request."""
    timeout_s: float = Field(default=60.0, gt=0)
    """Timeout of every request to Milvus."""


class StoreConfig(Section):
    url: str = "sqlite://"
    """Where the document store is (documents, chunks, key information, FAQ, edit audit, the
    ingest queue): `sqlite://`, a SQLite file in each KB's folder (one host); or
    `postgresql://user@host:5432/db`, one PostgreSQL database that every `kb serve` replica and
    `kb worker` shares (each KB a schema of its own). Credentials belong in `password_env`."""
    password_env: str = ""
    """The environment variable holding the PostgreSQL password, never the password itself;
    empty: none (or the URL's, or libpq's own ~/.pgpass and PG* variables)."""
    pool_size: int = Field(default=8, ge=2)
    """PostgreSQL connections a process keeps open at most (a write holds one for its store and
    takes short ones beside it; each KB write lock has a connection of its own). Requests beyond
    it wait up to `timeout_s` for one, then answer 503."""
    timeout_s: float = Field(default=30.0, gt=0)
    """Timeout of connecting to PostgreSQL and of each statement."""

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if v != "sqlite://" and not v.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"store.url must be 'sqlite://' (a file in each KB's folder) or "
                             f"'postgresql://user@host:port/database', not {v!r}")
        return v

    @property
    def shared(self) -> bool:
        """Whether the store is PostgreSQL, shared between hosts."""
        return self.url != "sqlite://"


class GenerationConfig(Section):
    max_new_tokens: int = 96
    """Tokens per reply. Answers are a sentence or two with a citation (the answer adapter's
    training replies: 16 tokens at the median, 47 at p95, 100 at most); the cap bounds the time
    of a reply that runs on, since each token costs a full decoding step on the CPU."""
    temperature: float = 0.2
    """Sampling temperature (0: greedy)."""
    top_p: float = 0.9
    """Nucleus sampling: the smallest set of tokens whose probability reaches this."""
    repetition_penalty: float = 1.1
    """Penalty on tokens already generated (1.0: none)."""


class LLMConfig(Section):
    backend: Literal["auto", "local", "openai", "extractive"] = "auto"
    """auto: openai when openai_base_url is set, else local when models.llm is set and installed,
    else extractive."""
    adapter: str | None = "model:answer-lora"
    """A LoRA adapter applied to the local model (a folder or a `model:` spec), merged into its
    weights at load; a `model:` spec that is not installed is skipped with a warning."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Local backend weights: auto is bf16 on a GPU and on a CPU that computes bf16 natively
    (AVX512-BF16/AMX; about 3x faster than fp32 there), else fp32."""
    prefix_cache: bool = True
    """Local backend: keep the KV cache of each system prompt and reuse a copy of it per request."""
    quantize: Literal["none", "int8"] = "none"
    """Local backend on a CPU: int8 is torch dynamic quantization of the Linear layers but the MLP
    down projections (int8 weights per output channel, activations quantized on the fly; the
    rest fp32): faster decoding, some loss of quality (bench/results/answer_latency_cpu.json)."""
    threads: int = 0
    """torch CPU threads, set when the local model loads (0: torch's default, one per core)."""
    openai_base_url: str | None = None
    """An OpenAI-compatible endpoint (vLLM, llama.cpp server, ...); set: backend auto uses it."""
    openai_model: str = "default"
    """The model name sent to the OpenAI-compatible endpoint."""
    openai_api_key_env: str = "OPENAI_API_KEY"
    """The environment variable that holds the endpoint's API key."""
    timeout_s: float = 60.0
    """Seconds to wait for the OpenAI-compatible endpoint."""
    static_cache: bool = False
    """Local backend: a fixed-size KV cache, which lets transformers compile the decoding step
    (faster per token on a GPU after a warm-up; see bench/results/generate_gpu.json)."""
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    """Decoding settings of every backend."""


class AnswerConfig(Section):
    k: int = 3
    """Passages in the prompt (the shipped answer adapter was trained with 3)."""
    max_context_chars: int = 1000
    """Characters of passages in the prompt: prompt length is most of a CPU answer's time."""
    condense_history: bool = True
    """Rewrite a follow-up into a standalone question (LLM backends; extractive prepends the last turn)."""
    refusal_zh: str = "根据已知信息无法回答该问题。"
    """The reply to a Chinese question the passages do not answer."""
    refusal_en: str = "The provided documents do not contain the answer to this question."
    """The reply to any other question the passages do not answer."""
    extractive_sentences: int = 2
    """Extractive backend: most sentences quoted in an answer."""
    stream_mode: Literal["live", "checked"] = "checked"
    """checked (default): nothing is sent until the whole reply passed compliance, then it is sent
    in pieces, so a withheld reply never reaches a client. live (opt-in): generated text is sent
    as it comes (sensitive words are held back and never sent), and a reply that then fails the
    final check (grounding, refusal) ends with a final event that replaces it: the client has
    already seen the withheld text."""


class ComplianceConfig(Section):
    approved_replies: str = "configs/approved_replies.yaml"
    """The approved fallback replies (a YAML list of text, intent, stage, lang); a relative path
    is taken from the repository root."""
    min_retrieval_confidence: float = 0.58
    """Below this (best hit's share of the question's content terms, or its vector similarity above
    the embedder's similarity for unrelated text, scaled by how much of the question the embedder
    knows), retrieval is weak: fall back. 0.58 is calibrated by bench/confidence.py on CMRC's train
    split (the highest threshold whose false-fallback rate stays within 10%)."""
    min_grounding: float = 0.5
    """Below this share of the answer's content terms found in the context, it is ungrounded."""
    sensitive_words: list[str] = Field(default_factory=list)
    """Words that, in a question or a reply, make the answer an approved `sensitive` reply instead."""
    require_approved: bool = False
    """Also fall back when the answer's similarity to its nearest approved reply is below approved_min."""
    approved_min: float = 0.6
    """require_approved: the least similarity to the nearest approved reply."""


class FaqConfig(Section):
    """FAQ entries (`kb faq import`) answered directly: a question close enough to an FAQ question
    gets the FAQ's answer, cited as the entry, without retrieval or an LLM call."""

    enabled: bool = True
    """Answer from the FAQ entries when a question matches one."""
    threshold: float = 0.9725
    """Answer directly when the embedder's cosine between the question and the nearest FAQ question
    (both embedded as queries) reaches this (no reranker in use). Calibrated by bench/faq.py for
    e5-small on CMRC 2018 questions (two folds, precision >= 0.97 on each calibration half; this is
    the higher fold's pick): 0.997 precision and 0.99 coverage of (rule-based) paraphrases on the
    half held out from its choice, 0.951 for the other fold's 0.9625 (bench/results/faq.json).
    Another embedder needs its own value."""
    rerank_threshold: float = 0.9
    """With a reranker in use (`use_reranker` and `models.reranker` set), the cross-encoder's score
    of (question, FAQ question) must reach this instead (bench/faq.py measures it too)."""
    candidates: int = 5
    """Nearest FAQ questions (by the embedder) that the reranker scores."""
    use_reranker: bool = False
    """Score the candidates with `models.reranker` when one is configured (else the embedder decides).
    Off by default: the packaged `rerank-e5` judges passages, not question pairs, and reaches no
    0.95 precision on FAQ matching (bench/results/faq.json); a question-pair cross-encoder may."""


class ServeConfig(Section):
    host: str = "127.0.0.1"
    """Address the HTTP API listens on."""
    port: int = 8000
    """Port the HTTP API listens on."""
    api_keys: dict[str, list[str]] = Field(default_factory=dict)
    """KEY -> knowledge bases it may read ("*" for all); add ":rw" to an entry ("docs:rw", "*:rw")
    to let the key also upload and delete documents. KB_API_KEYS (the same, as JSON) wins."""
    max_upload_mb: float = 50.0
    """Largest document upload, in MiB (a larger body is refused while it is read)."""
    cors_origins: list[str] = Field(default_factory=list)
    """Browser origins allowed to call the API (CORS); empty: none."""
    upload_wait_s: float = Field(default=30.0, ge=0)
    """With a shared store, uploads are queued for `kb worker`: how long an upload request waits
    for its job before answering 202 with the job to poll (GET /v1/jobs/{job_id})."""
    job_lease_s: float = Field(default=120.0, gt=0)
    """A worker's hold on a job, renewed every third of it while it works: a job whose worker died
    is taken again this long after its last renewal."""
    job_attempts: int = Field(default=3, ge=1)
    """Times a job is taken before it is marked failed (its worker died each time)."""
    job_retry_s: float = Field(default=3600.0, gt=0)
    """How long a job that fails for a passing reason (PostgreSQL, Milvus or the KB's write lock
    unavailable) is tried again, with growing pauses (5 s doubling, at most 5 min), counted from
    when it was queued; then it is marked failed."""
    worker_poll_s: float = Field(default=1.0, gt=0)
    """How often an idle `kb worker` looks for jobs."""


class EvalConfig(Section):
    choice_batch_size: int = 8
    """Prompts per forward pass of the log-likelihood scorer (multiple choice)."""
    choice_max_length: int = 2048
    """Prompt tokens kept (from the end) for the log-likelihood scorer."""
    choice_context_k: int = 3
    """Retrieval-augmented multiple choice (--kb): passages per question."""
    choice_context_chars: int = 1200
    """Retrieval-augmented multiple choice: passages and characters of context per question."""
    judge_model: str | None = None
    """A local model that grades open answers (LLM-as-judge); or an endpoint below."""
    judge_openai_base_url: str | None = None
    """An OpenAI-compatible endpoint that grades open answers (instead of judge_model)."""
    judge_openai_model: str = "default"
    """The judge endpoint's model name."""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """The environment variable that holds the judge endpoint's API key."""
    ablate_nsp: str = "model:nsp-e5"
    """`kb eval ablate`: the NSP cross-encoder of the `chunking=nsp-cross` row."""
    ablate_reranker: str = "model:rerank-e5"
    """`kb eval ablate`: the reranker of the `rerank=on` row."""
    ablate_pair_threshold: float = 0.35
    """`kb eval ablate`: the pair head's threshold of the `chunking=nsp-pair-tuned` row (the lowest
    WindowDiff on CMRC's train split: bench/results/segmentation_cmrc.json)."""
    ablate_cross_threshold: float = 0.05
    """`kb eval ablate`: the cross-encoder's threshold of `chunking=nsp-cross-tuned` (as above)."""


class LoRASettings(Section):
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = "all-linear"
    """Module names (e.g. [q_proj, v_proj]) or "all-linear"."""


class FinetuneConfig(Section):
    # training data from a knowledge base (`kb finetune data`)
    questions_per_chunk: int = 2
    """`kb finetune data`: questions generated per chunk."""
    hard_negatives: int = 3
    """Hard negatives per question, mined from the KB's index: high-scoring passages without
    the answer."""
    hard_negative_candidates: int = 20
    """Search results per question from which hard negatives are mined."""
    sft_style: Literal["rag", "closed"] = "rag"
    """rag: the answer chain's own prompt (retrieved passages + question) -> a cited answer;
    closed: question -> answer, no context."""
    refusal_share: float = 0.1
    """Share of extra examples whose passages lack the answer and whose target is the refusal."""
    assistant_name: str = "KB Assistant"
    """The assistant's name in the self-identity examples."""
    company: str = "Example Corp"
    """The company named in the self-identity examples."""
    general_data: str | None = None
    """A general instruction set (JSONL, any SFT format) mixed in against forgetting."""
    general_ratio: float = 0.15
    """General examples per domain example (1:5 to 1:10 general:domain is a common start)."""
    seed: int = 42
    """Seed of data sampling and training."""
    # LLM fine-tuning (`kb finetune llm`)
    method: Literal["lora", "qlora", "ptuning", "full"] = "lora"
    """`kb finetune llm`: lora, qlora (4-bit base), ptuning (P-Tuning v2), full."""
    lora: LoRASettings = Field(default_factory=LoRASettings)
    """LoRA adapter (methods lora and qlora)."""
    prefix_tokens: int = 32
    """P-Tuning v2: virtual tokens of the deep prompt (peft prefix tuning) in every layer."""
    max_length: int = 1024
    """Tokens per training row (examples are cut; packed rows fill up to it)."""
    packing: bool = True
    """Pack short examples into full rows; each keeps its own positions and attends only to itself."""
    batch_size: int = 4
    """Rows per device per step."""
    grad_accum: int = 4
    """Steps whose gradients are accumulated per optimizer update."""
    epochs: float = 1.0
    """Passes over the training data."""
    max_steps: int = -1
    """Stop after this many optimizer updates (-1: run all epochs)."""
    learning_rate: float = 2e-4
    """Peak learning rate."""
    warmup_ratio: float = 0.03
    """Share of the updates spent warming the learning rate up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_scheduler: str = "cosine"
    """transformers learning-rate schedule (cosine, linear, constant, ...)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto: bf16 on a GPU that has it, fp16 on one that does not; on CPU bf16 where the CPU computes
    it natively (AVX512-BF16/AMX), else fp32."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, more time."""
    fused_ce: bool = True
    """Cross-entropy fused with the LM head in chunks, only on answer tokens: no full logits."""
    compile: Literal["auto", "on", "off", "graphs"] = "auto"
    """torch.compile each decoder layer (auto: on CUDA, replayed as CUDA graphs where packed rows
    go through the fused layers); graphs: always replayed as CUDA graphs (fewer kernel launches)."""
    fused_layers: Literal["auto", "on", "off"] = "auto"
    """Llama-style decoder layers (Qwen2, Llama, Mistral) trained through one fused, compiled
    function each, recomputing only what the backward pass reads (auto: LoRA on CUDA without
    DeepSpeed; layers it cannot compute exactly keep the transformers forward)."""

    deepspeed: str | None = None
    """A DeepSpeed config (configs/deepspeed/zero2.json, zero3.json, zero3_offload.json)."""
    save_steps: int = 200
    """Save a checkpoint every this many updates."""
    save_total_limit: int = 2
    """Checkpoints kept (older ones are deleted)."""
    logging_steps: int = 10
    """Log the loss every this many updates."""
    # embedding fine-tuning (`kb finetune embed`)
    embed_method: Literal["full", "lora"] = "full"
    """`kb finetune embed`: full (all weights) or lora."""
    embed_epochs: float = 1.0
    """Embedder: passes over the training pairs."""
    embed_batch_size: int = 32
    """Embedder: pairs per step (the others in a batch are its negatives)."""
    embed_learning_rate: float = 2e-5
    """Embedder: learning rate."""
    embed_max_length: int = 256
    """Embedder: tokens per text."""
    embed_add_chars: bool = True
    """Add the training text's characters the tokenizer lacks ([UNK]) as new tokens."""
    # reranker fine-tuning (`kb finetune rerank`)
    rerank_negatives: int = 3
    """Hard negatives per query (rows with fewer are skipped); one group = positive + these."""
    rerank_epochs: float = 1.0
    """`kb finetune rerank`: passes over the query groups."""
    rerank_batch_size: int = 4
    """Query groups per step (each group is 1 + rerank_negatives pairs)."""
    rerank_learning_rate: float = 3.0e-4
    """Reranker: learning rate."""
    rerank_max_length: int = 256
    """Tokens of query + passage (the passage is cut)."""
    rerank_lora_r: int = 16
    """Reranker: LoRA rank."""
    rerank_top_layers: int = 4
    """Encoder layers (from the top) that get the LoRA adapter."""

    @field_validator("compile", "fused_layers", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        """YAML 1.1 reads a bare on/off as true/false: take them as the words."""
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class Settings(BaseSettings):
    """Everything configurable. Load with `load_settings()`."""

    model_config = SettingsConfigDict(env_prefix="KB_", env_nested_delimiter="__", extra="ignore",
                                      use_attribute_docstrings=True)

    home: Path = Field(default=Path("kb_data"))
    """The data folder: one subfolder per knowledge base. A relative path is taken from the working
    directory; KB_HOME wins."""
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    """Model names or paths, resolved offline (`model:<name>` specs from `kb models install`,
    folders, cached hub names)."""
    parse: ParseConfig = Field(default_factory=ParseConfig)
    """Reading documents (`kb ingest`): the partitioners, OCR, the parse workers' limits."""
    clean: CleanConfig = Field(default_factory=CleanConfig)
    """Normalising parsed blocks: junk lines and repeated headers/footers are dropped."""
    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig)
    """Cutting documents into chunks (NSP semantic merging, fixed size, or one sentence each)."""
    nsp_train: NSPTrainConfig = Field(default_factory=NSPTrainConfig)
    """Training the chunker's next-sentence model on a KB's own text (`kb train-nsp`)."""
    keyinfo: KeyInfoConfig = Field(default_factory=KeyInfoConfig)
    """Key information extracted per article, segment and sentence (level 1 of the index)."""
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    """Search: the two-level index, BM25, fusion and reranking."""
    milvus: MilvusConfig = Field(default_factory=MilvusConfig)
    """The Milvus server or file of `retrieval.backend: milvus`."""
    store: StoreConfig = Field(default_factory=StoreConfig)
    """The document store: SQLite in each KB's folder, or one PostgreSQL for several hosts."""
    llm: LLMConfig = Field(default_factory=LLMConfig)
    """The answering LLM: backend, adapter, precision, decoding."""
    answer: AnswerConfig = Field(default_factory=AnswerConfig)
    """The answer chain: prompt size, refusals, streaming."""
    compliance: ComplianceConfig = Field(default_factory=ComplianceConfig)
    """Checks on every reply: retrieval confidence, grounding, sensitive words, approved
    fallback replies."""
    faq: FaqConfig = Field(default_factory=FaqConfig)
    """FAQ entries (`kb faq import`): a question close to an FAQ question gets its answer."""
    serve: ServeConfig = Field(default_factory=ServeConfig)
    """The HTTP API (`kb serve`)."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Evaluation (`kb eval`): multiple choice, LLM-as-judge, the ablation's rows."""
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    """Fine-tuning (`kb finetune data|llm|embed|rerank`): data, LLM, embedder, reranker."""

    @model_validator(mode="after")
    def _shared_store_needs_shared_index(self) -> Settings:
        if self.store.shared and self.retrieval.backend != "milvus":
            raise ValueError("store.url names PostgreSQL, shared between hosts, but retrieval.backend is "
                             f"{self.retrieval.backend!r}, an index in one host's folder: set retrieval.backend: "
                             "milvus (and milvus.uri) so that every host searches the same index")
        return self

    @field_validator("home", mode="before")
    @classmethod
    def _expand(cls, v: Any) -> Any:
        return Path(v).expanduser() if isinstance(v, str | Path) else v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # the environment beats the YAML file (passed as init kwargs)
        return env_settings, init_settings

    def models_dir(self) -> Path:
        """The models folder: `models.dir`, or `models/` beside KB_HOME."""
        return self.models.dir if self.models.dir is not None else self.home.parent / "models"

    def kb_dir(self, kb: str) -> Path:
        """The folder that holds one knowledge base's state."""
        from kb.paths import kb_dir

        return kb_dir(self.home, kb)


class ConfigError(ValueError):
    """The configuration file is missing or invalid."""


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load `path` (default `configs/default.yaml`), then apply the environment and `overrides`."""
    cfg_path = Path(path) if path else DEFAULT_CONFIG
    data: dict[str, Any] = {}
    if path is not None and not cfg_path.is_file():
        raise ConfigError(f"config file not found: {cfg_path}")
    if cfg_path.is_file():
        try:
            data = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{cfg_path}: invalid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{cfg_path}: the top level must be a mapping")
        data = _resolve_extends(data, cfg_path)
    if problems := unknown_keys(data, Settings):
        raise ConfigError(f"{cfg_path}: " + "; ".join(problems))
    for key, value in _without_legacy(overrides).items():
        _set_dotted(data, key, value)
    if problems := unknown_keys(data, Settings) + unknown_env_keys(os.environ):
        raise ConfigError("; ".join(problems))
    try:
        settings = Settings(**data)
    except Exception as e:  # pydantic.ValidationError: say which file
        raise ConfigError(f"{cfg_path}: {e}") from e
    from kb.models import set_models_dir

    set_models_dir(settings.models_dir())
    return settings


def load_settings_as_written(path: str | Path) -> Settings:
    """The settings of config file `path` with the keys written in that file (not in the files it
    extends) winning over the environment: a second configuration beside the one in use, e.g.
    `kb migrate --to`, where KB_HOME must not move the data folder the file names. The models
    folder in use stays as it is."""
    from kb.models import models_dir, set_models_dir

    before = models_dir()
    settings = load_settings(path)
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    data.pop("extends", None)
    set_models_dir(before)
    written = _leaf_keys(data, settings)
    return apply_overrides(settings, written) if written else settings


def _leaf_keys(data: dict[str, Any], model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """`data` as dotted keys down to the settings' leaves (a section written in part keeps the
    rest of its values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        sub = getattr(model, key, None)
        if isinstance(value, dict) and isinstance(sub, BaseModel):
            out.update(_leaf_keys(value, sub, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def apply_overrides(settings: Settings, overrides: dict[str, Any]) -> Settings:
    """A copy of `settings` with dotted keys (`section.name`, or `home`) set and validated: unlike
    `load_settings` overrides, these win over the environment (an experiment's rows must get the
    values they name)."""
    data = settings.model_dump()
    for key, value in _without_legacy(overrides).items():
        _set_dotted(data, key, value)
    if problems := unknown_keys(data, Settings):
        raise ConfigError("; ".join(problems))
    update: dict[str, Any] = {}
    for top in {key.split(".")[0] for key in overrides}:
        field_type = type(getattr(settings, top))
        try:
            update[top] = field_type.model_validate(data[top]) if issubclass(field_type, BaseModel) else \
                Path(Settings._expand(data[top])) if top == "home" else Settings.model_fields[top].annotation(data[top])
        except Exception as e:  # pydantic.ValidationError
            raise ConfigError(f"{top}: {e}") from e
    return settings.model_copy(update=update)


def _without_legacy(overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides that set `retrieval.search` also clear the legacy `retrieval.hybrid` (whose
    `false` would otherwise turn an explicit `hybrid` search back into `vector`)."""
    if "retrieval.search" in overrides:
        return {"retrieval.hybrid": None, **overrides}
    return overrides


def _resolve_extends(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Support `extends: other.yaml` so variant configs state only what differs."""
    parent = data.pop("extends", None)
    if not parent:
        return data
    ppath = (path.parent / parent).resolve()
    base = yaml.safe_load(ppath.read_text(encoding="utf-8")) or {}
    base = _resolve_extends(base, ppath)
    return _deep_merge(base, data)


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


OTHER_ENV = {
    "KB_API_KEYS": "API keys as JSON (wins over serve.api_keys)",
    "KB_SKIP_MODELS": "scripts/setup.sh: skip `kb models install`",
    "KB_EXTRAS": "scripts/setup.sh: extra pip extras to install",
    "KB_FORCE_CPU": "run models on the CPU even where a GPU is present",
    "KB_FAULT": "tests: kill the process at a named fault-injection point",
    "KB_UI_SHOT": "tests: copy the UI test's screenshot here",
    "KB_DATA_LIMIT": "scripts/answer_loop.sh: cap the KB LoRA's training rows",
    "KB_SHARED_DATA": "tests and benchmarks: the folder of the shared public data sets",
}
"""The platform's `KB_` environment variables that are not settings (all others must name one)."""


def unknown_keys(data: Any, model: type[BaseModel], prefix: str = "") -> list[str]:
    """Problems with keys of `data` that `model` does not have, each naming the nearest valid key."""
    if not isinstance(data, dict):
        return []
    problems = []
    fields = model.model_fields
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            problems.append(f"unknown setting {path!r}{_nearest(str(key), list(fields), prefix)}")
            continue
        sub = _section_type(fields[key].annotation)
        if sub is not None:
            problems += unknown_keys(value, sub, f"{path}.")
    return problems


def unknown_env_keys(environ: Any) -> list[str]:
    """Problems with `KB_…` variables that name no setting (nested keys split on `__`)."""
    problems = []
    for name in sorted(environ):
        if not name.upper().startswith("KB_") or name.upper() in OTHER_ENV:
            continue
        parts = name[3:].lower().split("__")
        model: type[BaseModel] | None = Settings
        for i, part in enumerate(parts):
            fields = model.model_fields if model is not None else {}
            if model is None or part not in fields:
                env_names = ["KB_" + "__".join([*parts[:i], f]).upper() for f in fields]
                if i == 0:
                    env_names += list(OTHER_ENV)
                near = difflib.get_close_matches(name.upper(), env_names, n=1, cutoff=0.6)
                hint = f" (did you mean {near[0]}?)" if near else ""
                problems.append(f"environment variable {name} names no setting{hint}")
                break
            model = _section_type(fields[part].annotation)
            if model is None and i < len(parts) - 1:
                problems.append(f"environment variable {name}: {'.'.join(parts[: i + 1])} has no sub-keys")
                break
        else:
            if model is not None:  # a whole section as JSON: its keys too
                problems += [f"environment variable {name}: {p}"
                             for p in unknown_keys(_json_or_none(environ[name]), model, ".".join(parts) + ".")]
    return problems


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The settings section class behind a field's annotation (None for plain values)."""
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _nearest(key: str, valid: list[str], prefix: str) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{near[0]!s}?)" if near else f"; valid keys here: {', '.join(sorted(valid))}"
