"""Fine-tuning on tiny random-weight models: reply-only labels, packing without cross-talk, the
fused loss against torch's, every method producing weights that load back and change the
output, merge equal to the adapter at run time, resume, training data from a KB, the embedder."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from cli import main as kb_main
from finetune.formats import load_conversations, load_pairs, to_messages
from finetune.fused_loss import IGNORE, FusedLinearCrossEntropy, fused_ce_sum
from finetune.sft import PackedCollator, PaddedCollator, tokenize

CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "refund time?"},
        {"role": "assistant", "content": "five days"}, {"role": "user", "content": "and shipping?"},
        {"role": "assistant", "content": "two days"}]


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _run(capsys, *argv) -> dict:
    code = kb_main([*argv, "--json", "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return json.loads(captured.out)


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("fixture", ["tiny_chat_llm_dir", "tiny_llm_dir"])
def test_labels_cover_the_replies_only(fixture, request):
    tok = _tok(request.getfixturevalue(fixture))
    ex = tokenize(tok, CONV, 512)
    trained = [i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
    assert [lab for lab in ex.labels if lab != IGNORE] == trained
    chat = fixture == "tiny_chat_llm_dir"
    want = []
    for reply in ("five days", "two days"):
        # ChatML: the reply and its end marker; no template: " reply" after "assistant:"
        piece = tok(reply + "<|im_end|>\n" if chat else " " + reply, add_special_tokens=False)["input_ids"]
        want += [*piece, tok.eos_token_id] if tok.eos_token_id is not None else piece
    assert trained == want
    assert tokenize(tok, CONV, 16).input_ids == ex.input_ids[-16:]  # long examples keep their end


def test_packed_examples_do_not_attend_to_each_other(tiny_llm_dir):
    from transformers import AutoModelForCausalLM

    from finetune.sft import Example

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir)).eval()
    a, b = list(range(1000, 1013)), list(range(2000, 2009))
    batch = PackedCollator(pad_id=0, width=32)([[Example(a, a), Example(b, b)]])
    assert batch["position_ids"][0, :13].tolist() == list(range(13)) and batch["position_ids"][0, 13] == 0
    with torch.no_grad():
        # as in training: no KV cache (with one, transformers does not build the per-example mask)
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    torch.testing.assert_close(packed[:13], _logits(model, a), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[13:22], _logits(model, b), atol=1e-5, rtol=1e-4)
    assert batch["n_tokens"] == 22 and type(batch["n_tokens"]) is int and (batch["labels"][0, 22:] == IGNORE).all()
    padded = PaddedCollator(pad_id=0)([Example(a, a), Example(b, b)])
    assert padded["n_tokens"] == 22 and type(padded["n_tokens"]) is int


def test_fused_cross_entropy_equals_torch():
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = IGNORE
    loss, n = fused_ce_sum(hidden, weight, labels)
    loss.backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = hidden[:, :-1] @ weight.t()
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=IGNORE,
                                            reduction="sum")
    ref.backward()
    assert n == int((labels[:, 1:] != IGNORE).sum())
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, hidden.grad)
    torch.testing.assert_close(gw, weight.grad)
    h = torch.randn(9, 16)  # chunking: 3 rows at a time gives the same sum
    t = torch.randint(0, 50, (9,))
    torch.testing.assert_close(FusedLinearCrossEntropy.apply(h, weight.detach(), t, 3),
                               FusedLinearCrossEntropy.apply(h, weight.detach(), t, 4096))


@pytest.fixture()
def sft_file(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"question {i} about refunds"},
                          {"role": "assistant", "content": f"answer {i}: refunds take {i} days"}]} for i in range(12)]
    rows.append({"prompt": "and shipping?", "response": "two days", "history": [["hi", "hello"]]})
    rows.append({"instruction": "say hi", "output": "hi"})
    f = tmp_path / "sft.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n{\"messages\": []}\n", encoding="utf-8")
    return f


@pytest.fixture()
def ft_config(tmp_path, tiny_chat_llm_dir):
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"models: {{llm: {tiny_chat_llm_dir}, device: cpu}}\n"
                   "finetune: {max_length: 64, batch_size: 2, grad_accum: 1, learning_rate: 0.05, save_steps: 2,"
                   " weight_decay: 0.01, logging_steps: 1, prefix_tokens: 4, lora: {r: 4, alpha: 8, dropout: 0.0}}\n",
                   encoding="utf-8")
    return cfg


@pytest.mark.parametrize("method", ["lora", "ptuning", "full"])
def test_each_method_trains_weights_that_load_back_and_change_the_output(method, sft_file, ft_config, tmp_path,
                                                                         capsys, tiny_chat_llm_dir):
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    r = _run(capsys, "finetune", "llm", "--data", str(sft_file), "--out", str(out), "--method", method,
             "--max-steps", "3", "--config", str(ft_config))
    assert {"out", "steps", "train_loss", "tokens_per_s", "peak_mem_gib"} <= set(r) and r["steps"] == 3
    assert r["examples"] == 14 and len(r["skipped_rows"]) == 2 and "sft.jsonl:15" in r["skipped_rows"][0]
    assert (out / "loss.png").stat().st_size > 0 and r["tokens_per_s"] > 0
    args = torch.load(out / "training_args.bin", weights_only=False)  # the config reached the Trainer
    assert args.weight_decay == 0.01 and args.learning_rate == 0.05 and args.per_device_train_batch_size == 2
    base = AutoModelForCausalLM.from_pretrained(str(tiny_chat_llm_dir)).eval()
    ids = _tok(tiny_chat_llm_dir)("question 3 about refunds")["input_ids"]
    if method == "full":
        tuned = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    else:
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_chat_llm_dir)), str(out)).eval()
    assert (_logits(tuned, ids) - _logits(base, ids)).abs().max() > 1e-3


def test_merge_equals_the_adapter_applied_at_run_time(sft_file, ft_config, tmp_path, capsys, tiny_chat_llm_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter, merged = tmp_path / "lora", tmp_path / "merged"
    _run(capsys, "finetune", "llm", "--data", str(sft_file), "--out", str(adapter), "--max-steps", "3",
         "--config", str(ft_config))
    r = _run(capsys, "finetune", "merge", "--adapter", str(adapter), "--out", str(merged), "--config", str(ft_config))
    assert r["out"] == str(merged)
    ids = _tok(tiny_chat_llm_dir)("question 5 about refunds")["input_ids"]
    live = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_chat_llm_dir)), str(adapter)).eval()
    folded = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    torch.testing.assert_close(_logits(folded, ids), _logits(live, ids), atol=1e-4, rtol=1e-4)
    assert not (merged.parent / "merged.tmp").exists()


def test_resume_continues_from_the_last_checkpoint(sft_file, ft_config, tmp_path, capsys):
    out = tmp_path / "run"
    first = _run(capsys, "finetune", "llm", "--data", str(sft_file), "--out", str(out), "--max-steps", "2",
                 "--config", str(ft_config))
    assert (out / "checkpoint-2").is_dir()
    again = _run(capsys, "finetune", "llm", "--data", str(sft_file), "--out", str(out), "--max-steps", "4",
                 "--resume", "--config", str(ft_config))
    assert again["steps"] == 4
    assert again["tokens"] <= first["tokens"] * 1.5  # only steps 3-4 ran


def test_bad_methods_and_missing_packages_are_clear_errors(sft_file, ft_config, tmp_path, capsys, monkeypatch):
    assert kb_main(["finetune", "llm", "--data", str(sft_file), "--out", str(tmp_path / "q"), "--method", "qlora",
                    "--config", str(ft_config)]) == 2
    assert "bitsandbytes" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed (the test extra has it)
    assert kb_main(["finetune", "llm", "--data", str(sft_file), "--out", str(tmp_path / "d"), "--deepspeed",
                    "configs/deepspeed/zero2.json", "--config", str(ft_config)]) == 2
    assert "DeepSpeed" in capsys.readouterr().err
    assert kb_main(["finetune", "llm", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x"),
                    "--config", str(ft_config)]) == 2


def test_deepspeed_configs_are_complete():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"
    stages = {}
    for name in ("zero2", "zero3", "zero3_offload"):
        cfg = json.loads((root / f"{name}.json").read_text())
        stages[name] = cfg["zero_optimization"]["stage"]
        assert cfg["train_micro_batch_size_per_gpu"] == "auto" and cfg["bf16"]["enabled"] == "auto"
    assert stages == {"zero2": 2, "zero3": 3, "zero3_offload": 3}
    offload = json.loads((root / "zero3_offload.json").read_text())["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == offload["offload_param"]["device"] == "cpu"


def test_formats(tmp_path):
    assert to_messages({"prompt": "q2", "response": "a2", "history": [["q1", "a1"]], "system": "s"}) == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    with pytest.raises(ValueError, match="assistant"):
        to_messages({"messages": [{"role": "user", "content": "q"}]})
    f = tmp_path / "p.jsonl"
    f.write_text('{"query": "q", "pos": "p", "neg": ["n"]}\n{"query": "q"}\n[1]\n', encoding="utf-8")
    pairs, problems = load_pairs(f)
    assert pairs == [{"query": "q", "pos": ["p"], "neg": ["n"]}]
    assert problems == ['p.jsonl:2: skipped (needs "query" and "pos")', "p.jsonl:3: skipped (not a JSON object)"]


def test_training_data_from_a_kb(settings, tmp_path, capsys):
    from retrieval.knowledge_base import KnowledgeBase
    from tests.conftest import SAMPLES

    kb_ = KnowledgeBase(settings, "samples", create=True)
    kb_.add_paths([SAMPLES / "fake-memo.pdf", SAMPLES / "norwich-city.txt", SAMPLES / "simple.docx"], progress=False)
    general = tmp_path / "general.jsonl"
    general.write_text("\n".join(json.dumps({"instruction": f"count to {i}", "output": " ".join(map(str, range(i)))})
                                 for i in range(1, 60)), encoding="utf-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"models: {{nsp: {settings.models.nsp}, device: cpu, llm: null}}\n"
                   "finetune: {assistant_name: Ada, company: Acme, general_ratio: 0.2}\n", encoding="utf-8")
    out = tmp_path / "train.jsonl"
    r = _run(capsys, "finetune", "data", "--kb", "samples", "--out", str(out), "--general", str(general),
             "--config", str(cfg))
    conv, problems = load_conversations(out)
    assert not problems and len(conv) == r["examples"] == r["domain"] + r["refusals"] + r["identity"] + r["general"]
    assert r["domain"] > 5 and r["general"] == min(59, round((r["domain"] + r["refusals"]) * 0.2))
    assert sum("Ada" in c[-1]["content"] and "Acme" in c[-1]["content"] for c in conv) == r["identity"] > 0
    cited = [c for c in conv if c[0]["role"] == "system" and "[" in c[-1]["content"]]
    assert cited and all("Context:" in c[1]["content"] for c in cited)  # the answer chain's own prompt
    for c in cited:  # the cited number points at a real passage that holds the answer
        n, answer = _citation(c[-1]["content"])
        passage = _passages(c[1]["content"])[n]
        assert answer in passage["text"] and passage["source"], (n, answer, passage)
    pairs, _ = load_pairs(r["embed_out"])
    assert len(pairs) == r["embed_examples"] and r["with_hard_negatives"] > 0
    for p in pairs:
        assert all(n != p["pos"][0] and p["pos"][0] not in n for n in p["neg"])
    r2 = _run(capsys, "finetune", "data", "--kb", "samples", "--out", str(tmp_path / "pr.jsonl"), "--format", "prompt",
              "--config", str(cfg))
    row = json.loads((tmp_path / "pr.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert {"prompt", "response", "history"} <= set(row) and r2["general"] == 0


def test_embedder_fine_tune_learns_the_pairs_and_the_characters(tmp_path, capsys, minilm_dir):
    import numpy as np

    from retrieval.embedder import Embedder

    topics = [("退款", "退款一般在五个工作日内退回原支付账户。"), ("发货", "订单在付款后四十八小时内从仓库发货。"),
              ("保修", "整机保修两年，电池保修一年。"), ("发票", "电子发票在确认收货后由系统自动开具。"),
              ("会员", "会员积分可以在下单时抵扣现金。"), ("门店", "线下门店营业时间为上午十点到晚上九点。")]
    rows = [{"query": f"{t}怎么办理？", "pos": p, "neg": [topics[(i + 1) % len(topics)][1]]}
            for i, (t, p) in enumerate(topics)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    cfg = tmp_path / "e.yaml"
    cfg.write_text("models: {device: cpu}\nfinetune: {embed_batch_size: 6, embed_learning_rate: 0.0005, "
                   "embed_max_length: 48, embed_epochs: 8}\n", encoding="utf-8")
    out = tmp_path / "emb"
    r = _run(capsys, "finetune", "embed", "--data", str(data), "--out", str(out), "--config", str(cfg),
             "--model", str(minilm_dir))
    assert r["added_tokens"] > 0 and r["steps"] == 8 and {"tokens_per_s", "peak_mem_gib"} <= set(r)

    def margin(model_dir) -> float:
        e = Embedder(str(model_dir), "cpu")
        q, p = e.encode_queries([x["query"] for x in rows]), e.encode_passages([x["pos"] for x in rows])
        sims = q @ p.T
        return float(np.mean(np.diag(sims)) - np.mean(sims[~np.eye(len(rows), dtype=bool)]))

    before, after = margin(minilm_dir), margin(out)
    assert after > before + 0.05
    text = [rows[0]["pos"]]
    assert Embedder(str(out), "cpu").coverage(text)[0] > Embedder(str(minilm_dir), "cpu").coverage(text)[0]


def test_fused_loss_in_the_trainer_equals_the_models_own_loss(tiny_chat_llm_dir, tmp_path):
    """The trainer's fused path (hidden states of the wrapped model's forward + fused head/loss)
    reports the same first loss as the model's own cross-entropy on the same batch."""
    from transformers import AutoModelForCausalLM

    from finetune.sft import train
    from kb.settings import FinetuneConfig

    tok = _tok(tiny_chat_llm_dir)
    exs = [tokenize(tok, [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i} b c"}], 64)
           for i in range(8)]
    losses = []
    for fused in (True, False):
        cfg = FinetuneConfig(batch_size=4, grad_accum=1, max_length=64, logging_steps=1, fused_ce=fused, packing=False,
                             learning_rate=0.0, compile="off")
        model = AutoModelForCausalLM.from_pretrained(str(tiny_chat_llm_dir))
        res = train(model, tok, exs, cfg, tmp_path / str(fused), method="full", max_steps=1, save=False, progress=False)
        losses.append(res.first_loss)
    assert losses[0] > 1.0 and losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_the_loop_reads_nothing_back_from_the_device(tiny_chat_llm_dir, tmp_path, monkeypatch):
    """Between a step's begin and end, neither the Trainer's loop nor the project's code reads a
    tensor back through Python (each read is a device sync on a GPU: the CPU could not launch the
    next step while the GPU runs this one); the token count is the collators' ints. A check at the
    Python level, on the CPU, of the direct caller: syncs inside C++ operators (nonzero, masks) are
    not seen. transformers' model code is not ours and is left out (its packed-row check reads a
    tensor once per forward)."""
    import sys

    from transformers import AutoModelForCausalLM, TrainerCallback

    from finetune.sft import train
    from kb.settings import FinetuneConfig

    ours = ("/transformers/trainer.py", "/accelerate/", "/finetune/")
    state = {"in_step": False, "args": None}
    reads: list[str] = []

    def watch(name):
        real = getattr(torch.Tensor, name)

        def read(t, *a):
            where = sys._getframe(1).f_code.co_filename
            if state["in_step"] and any(part in where for part in ours):
                reads.append(f"{name} in {where}:{sys._getframe(1).f_lineno}")
            return real(t, *a)
        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "__int__", "__float__", "__bool__", "__index__", "__format__", "tolist", "cpu", "numpy"):
        watch(name)

    class Steps(TrainerCallback):
        def on_train_begin(self, args, state_, control, **kw):
            state["args"] = args

        def on_step_begin(self, args, state_, control, **kw):
            state["in_step"] = True

        def on_step_end(self, args, state_, control, **kw):
            state["in_step"] = False

    tok = _tok(tiny_chat_llm_dir)
    exs = [tokenize(tok, [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}], 64)
           for i in range(4)]
    for packing in (True, False):
        cfg = FinetuneConfig(batch_size=2, grad_accum=1, max_length=64, logging_steps=5, learning_rate=1e-3,
                             compile="off", packing=packing)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_chat_llm_dir))
        res = train(model, tok, exs, cfg, tmp_path / str(packing), method="full", max_steps=2, save=False,
                    progress=False, callbacks=[Steps()])
        assert not reads, reads
        assert type(res.tokens) is int and res.tokens == sum(len(e) for e in exs)
    args = state["args"]
    assert args.logging_nan_inf_filter is False and args.logging_first_step is True


def test_the_loop_settings_reach_the_trainer_arguments_on_a_gpu(tmp_path):
    """On CUDA the batches go to the GPU from pinned memory without blocking (accelerate's
    non_blocking); on the CPU neither is set."""
    from finetune.sft import training_args
    from kb.settings import FinetuneConfig

    cfg = FinetuneConfig()
    kw = {"prec": "fp32", "max_steps": 1, "save": False, "progress": False, "hf_checkpointing": False}
    gpu = training_args(cfg, tmp_path, on_cuda=True, **kw)
    cpu = training_args(cfg, tmp_path, on_cuda=False, **kw)
    assert gpu.accelerator_config.non_blocking is True and gpu.dataloader_pin_memory is True
    assert cpu.accelerator_config.non_blocking is False and cpu.dataloader_pin_memory is False
    assert gpu.logging_nan_inf_filter is False and gpu.logging_first_step is True
    assert gpu.logging_steps == cfg.logging_steps and gpu.per_device_train_batch_size == cfg.batch_size


def _citation(reply: str) -> tuple[int, str]:
    import re

    m = re.search(r"\s?\[(\d+)\][。.]?$", reply)
    assert m, reply
    return int(m.group(1)), reply[: m.start()]


def _passages(prompt: str) -> dict[int, dict]:
    import re

    body = prompt.split("Context:\n", 1)[1].rsplit("\n\nQuestion:", 1)[0]
    out = {}
    for m in re.finditer(r"(?:^|\n\n)\[(\d+)\] \(([^)]*)\) (.*?)(?=\n\n\[\d+\] \(|$)", body, re.S):
        out[int(m.group(1))] = {"source": m.group(2), "text": m.group(3)}
    return out


def test_a_loss_that_is_not_finite_is_reported_not_crashed_on(monkeypatch, tmp_path, capsys):
    """A run whose loss went NaN reports it as such on the command line (JSON: null), exit 0: the
    weights it saved are still there to inspect."""
    import finetune.sft

    def fake(s, data, out, **kw):
        return {"method": "lora", "steps": 3, "train_loss": None, "tokens_per_s": 10.0, "peak_mem_gib": 1.0,
                "out": str(out), "loss_plot": "loss.png"}

    monkeypatch.setattr(finetune.sft, "finetune_llm", fake)
    args = ["finetune", "llm", "--data", "d.jsonl", "--out", str(tmp_path / "o")]
    assert kb_main(args) == 0
    assert "loss not finite (NaN or inf)" in capsys.readouterr().out
    assert kb_main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train_loss"] is None
