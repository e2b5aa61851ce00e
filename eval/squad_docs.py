"""Write the paragraphs of a SQuAD-style file as text documents, one file each, to build a KB.

    python -m eval.squad_docs ../shared/data/cmrc2018/cmrc2018_trial.json data/cmrc_docs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_docs(squad: str | Path, out: str | Path) -> int:
    data = json.loads(Path(squad).read_text(encoding="utf-8"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for a, art in enumerate(data["data"]):
        for p, para in enumerate(art["paragraphs"]):
            title = art.get("title", "").strip()
            text = f"{title}\n\n{para['context'].strip()}\n" if title else para["context"].strip() + "\n"
            (out / f"{a:04d}-{p:02d}.txt").write_text(text, encoding="utf-8")
            n += 1
    return n


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(f"{write_docs(sys.argv[1], sys.argv[2])} documents -> {sys.argv[2]}")
