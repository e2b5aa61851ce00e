#!/usr/bin/env bash
# Debian packages the document readers use: OCR (tesseract with Chinese and English), pandoc
# (EPUB/ODT/RTF), LibreOffice headless (DOC/PPT/XLS) and a CJK font (the OCR tests and
# bench/ocr.py render pages with it); and postgresql, the server binaries the tests start a
# throwaway PostgreSQL on loopback with (tests/pg.py; store.url: postgresql://...); a C++ compiler,
# which DeepSpeed builds its CPU ops with (tests/test_deepspeed.py). Installs what
# is missing when it can (root or sudo without a password); otherwise it names the packages and
# goes on: the readers that need them then fail per file with the package to install (and the
# PostgreSQL tests fail naming it).
set -euo pipefail
PACKAGES=(tesseract-ocr tesseract-ocr-chi-sim tesseract-ocr-chi-tra tesseract-ocr-eng pandoc
          libreoffice-writer-nogui libreoffice-calc-nogui libreoffice-impress-nogui fonts-wqy-microhei
          postgresql g++)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo"; else
    echo "note: not installing Debian packages (needs root): ${missing[*]}" >&2; exit 0
fi
command -v apt-get >/dev/null || { echo "note: no apt-get; install: ${missing[*]}" >&2; exit 0; }
$SUDO apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
echo "installed Debian packages: ${missing[*]}" >&2
