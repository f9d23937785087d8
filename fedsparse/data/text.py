"""Offline text classification datasets: topics of the chatterbot-corpus (DATA.md §3.1).

The ``chatterbot-corpus`` wheel holds 237 YAML files, ``data/<language>/<topic>.yml``, each
a list of conversations; every utterance is one example labelled with its file's topic.
Texts are de-duplicated (case-folded, whitespace-normalised; a text found under two topics
is dropped) before the fixed, stratified 80/20 train/test split, so no test text is seen in
training. Two datasets:

- ``chatterbot_en``: the English files, topics with at least 30 distinct texts (15 topics,
  about 1,700 texts); for Dirichlet label skew over clients;
- ``chatterbot``: every language, the 18 topics that at least 8 languages have (about
  12,000 texts); each training text's language is its *group*, so ``partition = "natural"``
  makes one client per language (27 clients of very different sizes, the way LEAF splits by
  writer).

Texts are tokenised once per process with MiniLM's WordPiece tokenizer
(``fedsparse/models/pretrained.py``), padded or truncated to ``MAX_LENGTH`` tokens: the
features are int64 token ids, 0 = padding, so the data path is the images' one.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from fedsparse.data.datasets import DatasetUnavailable

MAX_LENGTH = 48  # tokens; about 95% of the utterances fit, longer ones are truncated
SPLIT_SEED = 0  # the fixed train/test split
CORPUS_INSTALL = "pip install --no-deps chatterbot-corpus==1.3.3"


@dataclass(frozen=True)
class TextDataset:
    """Token ids of a text classification dataset, with the images' interface."""

    name: str
    x_train: np.ndarray  # int64 token ids, (N, MAX_LENGTH), 0 = padding
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    classes: tuple[str, ...]
    groups: np.ndarray | None = None  # natural split: group index of each training text
    group_names: tuple[str, ...] = ()

    @property
    def input_shape(self) -> tuple[int]:
        return (self.x_train.shape[1],)

    @staticmethod
    def features(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.int64)

    @staticmethod
    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(y)).to(torch.int64)


def corpus() -> list[tuple[str, str, str]]:
    """Every utterance of the corpus as ``(language, topic, text)``."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailable(f"chatterbot-corpus is not installed: {CORPUS_INSTALL}")
    root = os.path.join(spec.submodule_search_locations[0], "data")
    rows = []
    for path in sorted(glob.glob(os.path.join(root, "*", "*.yml"))):
        language = os.path.basename(os.path.dirname(path))
        topic = os.path.splitext(os.path.basename(path))[0]
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh) or {}
        for conversation in doc.get("conversations") or []:
            turns = [conversation] if isinstance(conversation, str) else conversation
            rows += [(language, topic, text) for text in turns
                     if isinstance(text, str) and text.strip()]
    return rows


def _key(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def deduplicate(rows: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """One row per distinct text (the first seen); texts under two topics are dropped."""
    topics: dict[str, set[str]] = defaultdict(set)
    first: dict[str, tuple[str, str, str]] = {}
    for row in rows:
        topics[_key(row[2])].add(row[1])
        first.setdefault(_key(row[2]), row)
    return [row for key, row in first.items() if len(topics[key]) == 1]


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices, ``round(test_fraction * n_c)`` of each class in test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(test_fraction * len(members))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def tokenize(texts: list[str]) -> np.ndarray:
    from fedsparse.models.pretrained import tokenizer

    encoded = tokenizer()(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                          return_tensors="np")
    return encoded["input_ids"].astype(np.int64)


def build(name: str, rows: list[tuple[str, str, str]], with_groups: bool) -> TextDataset:
    """Tokenise ``rows`` (language, topic, text) and split them 80/20, stratified."""
    classes = tuple(sorted({topic for _, topic, _ in rows}))
    labels = np.array([classes.index(topic) for _, topic, _ in rows], np.int64)
    x = tokenize([text for _, _, text in rows])
    train, test = stratified_split(labels, 0.2, SPLIT_SEED)
    languages = tuple(sorted({language for language, _, _ in rows}))
    groups = np.array([languages.index(rows[i][0]) for i in train], np.int64) \
        if with_groups else None
    return TextDataset(name, x[train], labels[train], x[test], labels[test], len(classes),
                       classes, groups, languages if with_groups else ())


def chatterbot_en() -> TextDataset:
    rows = deduplicate([r for r in corpus() if r[0] == "english"])
    counts = Counter(topic for _, topic, _ in rows)
    return build("chatterbot_en", [r for r in rows if counts[r[1]] >= 30], with_groups=False)


def chatterbot() -> TextDataset:
    rows = deduplicate(corpus())
    languages: dict[str, set[str]] = defaultdict(set)
    for language, topic, _ in rows:
        languages[topic].add(language)
    return build("chatterbot", [r for r in rows if len(languages[r[1]]) >= 8],
                 with_groups=True)
