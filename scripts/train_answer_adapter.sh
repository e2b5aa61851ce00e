#!/usr/bin/env bash
# How the shipped answer adapter (kb/assets/answer-lora) was made, start to end, on the CPU.
# Data the project may redistribute: the `train` split of CMRC 2018 (CC BY-SA 4.0; 40% of its
# paragraphs, eval.data.split_of) with its real questions, and hand-written questions (some with no
# answer in the documents: refusals) on four fictional English policy documents in
# scripts/adapter_data (Apache-2.0, written for this). The `kb` and `out` splits and the sample
# documents stay held out for evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."
CMRC=${CMRC:-../shared/data/cmrc2018/cmrc2018_trial.json}
W=${WORK:-work/answer_adapter}
LIMIT=${LIMIT:-200}
export KB_HOME=$W/kb_data KB_MODELS__DIR=${KB_MODELS__DIR:-$PWD/models}
kb=.venv/bin/kb
mkdir -p "$W"
.venv/bin/python -m eval.squad_docs "$CMRC" "$W/cmrc_train" --splits train --questions "$W/cmrc_train.jsonl"
# the passages come from the KB's own retrieval, as at answer time; no LLM writes the data
export KB_LLM__BACKEND=extractive
$kb ingest "$W/cmrc_train" --kb cmrc_train -q
$kb ingest scripts/adapter_data/en_docs --kb en_train -q
$kb finetune data --kb cmrc_train --questions "$W/cmrc_train.jsonl" --limit "$LIMIT" --out "$W/zh.jsonl"
$kb finetune data --kb en_train --questions scripts/adapter_data/en_questions.jsonl --out "$W/en.jsonl"
# the English rows twice: they are few, and the model must answer in the question's language
cat "$W/zh.jsonl" "$W/en.jsonl" "$W/en.jsonl" > "$W/data.jsonl"
unset KB_LLM__BACKEND
$kb finetune llm --config configs/answer_adapter.yaml --data "$W/data.jsonl" --out "$W/adapter" --json \
    | tee "$W/train.json"
mkdir -p kb/assets/answer-lora
cp "$W/adapter/adapter_model.safetensors" "$W/adapter/adapter_config.json" "$W/adapter/train_result.json" \
    "$W/adapter/loss.png" kb/assets/answer-lora/
