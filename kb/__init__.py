"""Core of the knowledge-base platform: settings, model registry, paths and the `kb` CLI.

Importing this package forces the Hugging Face libraries offline: every model comes from a
package that ships its weights or from a local path (see `kb.models`).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("UNSTRUCTURED_DISABLE_NOTICE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")  # unstructured's telemetry
os.environ.setdefault("SCARF_NO_ANALYTICS", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"
