#!/usr/bin/env bash
# The KB -> fine-tune -> better answers loop on the packaged models, on the CPU, start to end.
# KB: the CMRC 2018 `kb` split (paragraphs the shipped models never saw). Questions: the first N
# of the `kb` split (answerable) and `out` split (their paragraphs are not in the KB: the right
# reply is the fallback), in file order. Four answerers, one at a time: extractive (no LLM), the
# packaged Qwen as it is, + the project's answer adapter (the default), + a LoRA trained on this
# KB (`kb finetune data` from its documents, continuing the project's adapter). Then CMMLU
# log-likelihood before/after (general ability), and compare reports.
set -euo pipefail
cd "$(dirname "$0")/.."
CMRC=${CMRC:-../shared/data/cmrc2018/cmrc2018_trial.json}
CMMLU=${CMMLU:-../shared/data/cmmlu/test}
W=${WORK:-work/loop}
N=${N:-90}              # held-out questions per answerer
CMMLU_N=${CMMLU_N:-100}
KB_DATA_LIMIT=${KB_DATA_LIMIT:-}   # cap the KB LoRA's training rows (CPU time)
R=${RESULTS:-bench/results}
export KB_HOME=$W/kb_data KB_MODELS__DIR=${KB_MODELS__DIR:-$PWD/models}
kb=.venv/bin/kb
mkdir -p "$W" "$R"
.venv/bin/python -m eval.squad_docs "$CMRC" "$W/docs" --splits kb --questions "$W/questions.jsonl" --ask kb,out
$kb ingest "$W/docs" --kb loop -q

cat > "$W/extractive.yaml" <<EOF
extends: $PWD/configs/default.yaml
llm: {backend: extractive}
EOF
cat > "$W/base.yaml" <<EOF
extends: $PWD/configs/default.yaml
llm: {adapter: null}
EOF
echo "extends: $PWD/configs/default.yaml" > "$W/adapter.yaml"   # the shipped default
# the KB's own LoRA: training data from its documents only (no question of the evaluation)
KB_LLM__BACKEND=extractive $kb finetune data --kb loop --out "$W/kb_sft.jsonl"
if [ -n "$KB_DATA_LIMIT" ]; then head -n "$KB_DATA_LIMIT" "$W/kb_sft.jsonl" > "$W/kb_sft.cut.jsonl"; mv "$W/kb_sft.cut.jsonl" "$W/kb_sft.jsonl"; fi
$kb finetune llm --config configs/answer_adapter.yaml --adapter model:answer-lora --data "$W/kb_sft.jsonl" \
    --out "$W/kb_lora" --json > "$W/kb_lora.json"
cat > "$W/kb_lora.yaml" <<EOF
extends: $PWD/configs/default.yaml
llm: {adapter: $PWD/$W/kb_lora}
EOF

for side in extractive base adapter kb_lora; do
    $kb eval open "$W/questions.jsonl" --kb loop --limit "$N" --config "$W/$side.yaml" -q \
        --report "$R/loop_open_$side.html"
done
$kb eval open "$W/questions.jsonl" --compare "$R/loop_open_base.json" "$R/loop_open_adapter.json" --report "$R/loop_compare_base_adapter.html"
$kb eval open "$W/questions.jsonl" --compare "$R/loop_open_adapter.json" "$R/loop_open_kb_lora.json" --report "$R/loop_compare_adapter_kb_lora.html"
for side in base adapter kb_lora; do
    $kb eval choice "$CMMLU" --mode loglik --limit "$CMMLU_N" --config "$W/$side.yaml" -q --report "$R/loop_cmmlu_$side.html"
done
