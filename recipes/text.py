"""Text for language modelling, through Hugging Face ``datasets``, as blocks of token ids.

``--dataset`` accepts:

* ``python-stdlib`` (the default, offline): the Python standard library's own source files -- real
  text (code, comments, docstrings) that ships with every Python installation and that nobody
  here wrote. The top-level modules of ``sysconfig.get_paths()["stdlib"]``, sorted by name; every
  tenth file is validation. (Another Python version ships other files: other numbers.)
* a hub id (``wikitext``, ``wikitext:wikitext-2-raw-v1`` for a configuration), for users with network;
* a directory written by ``Dataset.save_to_disk``, parquet files, or ``.txt`` files (one document
  per file), local.

Tokens come from the model's tokenizer when it has one (a hub model), else from bytes: ids
0..255 are the bytes of the UTF-8 text, 256 ends a document, so nothing needs a download.
Documents are concatenated and cut into blocks of ``block_size`` tokens.
"""

from __future__ import annotations

import glob
import math
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recipes.data import go_offline, hub_reachable

BYTE_VOCAB = 257  # 256 bytes + end of document
END = 256
STDLIB = "python-stdlib"
TEXT_FIX = (
    f"use --dataset {STDLIB} (bundled with Python, no network), or point --dataset at local text: a directory "
    "written by Dataset.save_to_disk, or parquet or .txt files"
)


@dataclass
class TextData:
    train: torch.Tensor  # blocks x block_size, int64
    validation: torch.Tensor
    vocab_size: int
    tokenizer: str  # "bytes" or the tokenizer's name
    documents: tuple[int, int]  # train and validation documents
    unigram_perplexity: float  # of the validation tokens under the training tokens' unigram distribution

    def describe(self) -> str:
        return (f"{self.documents[0]} training and {self.documents[1]} validation documents, "
                f"{self.train.numel():,} and {self.validation.numel():,} tokens ({self.tokenizer}); "
                f"unigram baseline: validation perplexity {self.unigram_perplexity:.2f}")  # fmt: skip


def load_text(dataset: str, *, block_size: int, tokenizer: Any = None, text_column: str | None = None) -> TextData:
    splits = _load(dataset)
    column = text_column or next((c for c in ("text", "content", "document") if c in splits["train"].column_names),
                                 splits["train"].column_names[0])  # fmt: skip
    if column not in splits["train"].column_names:
        raise ValueError(f"{dataset}: no column {column!r} (found {splits['train'].column_names}); use --text-column")
    encode = _encoder(tokenizer)
    blocks, counts = {}, {}
    for name in ("train", "validation"):
        ids = np.concatenate([encode(text) for text in splits[name][column] if text])
        usable = len(ids) // block_size * block_size
        if usable == 0:
            raise ValueError(f"{dataset}: the {name} split has fewer than {block_size} tokens; lower --block-size")
        blocks[name] = torch.from_numpy(ids[:usable].astype(np.int64)).view(-1, block_size)
        counts[name] = Counter(dict(zip(*np.unique(ids[:usable], return_counts=True))))
    vocab = BYTE_VOCAB if tokenizer is None else len(tokenizer)
    total = sum(counts["train"].values())
    # Laplace-smoothed unigram model of the training tokens, scored on the validation tokens.
    nll = -sum(int(n) * math.log((counts["train"][t] + 1) / (total + vocab)) for t, n in counts["validation"].items())
    unigram = math.exp(nll / blocks["validation"].numel())
    return TextData(blocks["train"], blocks["validation"], vocab, "bytes" if tokenizer is None else
                    getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
                    (len(splits["train"]), len(splits["validation"])), unigram)  # fmt: skip


def _encoder(tokenizer: Any):
    if tokenizer is None:
        return lambda text: np.append(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64), END)
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return lambda text: np.asarray(tokenizer(text)["input_ids"] + end, dtype=np.int64)


def stdlib_documents() -> list[tuple[str, str]]:
    """(file name, text) of the standard library's top-level modules, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in sorted(root.glob("*.py"))]


def _load(dataset: str):
    import datasets

    if dataset == STDLIB:
        docs = stdlib_documents()
        train = [text for i, (_, text) in enumerate(docs) if i % 10]
        validation = [text for i, (_, text) in enumerate(docs) if i % 10 == 0]
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                                     "validation": datasets.Dataset.from_dict({"text": validation})})  # fmt: skip
    path = Path(dataset)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        ds = datasets.load_from_disk(str(path))
    elif path.is_dir() and sorted(path.glob("**/*.parquet")):
        ds = _by_split("parquet", sorted(glob.glob(str(path / "**" / "*.parquet"), recursive=True)))
    elif path.is_dir() and sorted(path.glob("**/*.txt")):
        files = sorted(glob.glob(str(path / "**" / "*.txt"), recursive=True))
        ds = _by_split("text", files, sample_by="document")
    elif path.exists() or dataset.startswith((".", "/", "~")) or dataset.count("/") > 1:
        raise ValueError(f"--dataset {dataset!r}: no saved dataset, parquet or .txt files there; {TEXT_FIX}")
    else:
        name, _, config = dataset.partition(":")
        if not hub_reachable():
            go_offline()
        try:
            ds = datasets.load_dataset(name, config or None)
        except Exception as exc:
            raise ValueError(f"--dataset {dataset!r}: could not load it from the hub or its cache ({exc}); "
                             f"{TEXT_FIX}") from exc  # fmt: skip
    if not isinstance(ds, datasets.DatasetDict):
        ds = datasets.DatasetDict({"train": ds})
    if "validation" not in ds:
        other = "test" if "test" in ds else None
        if other:
            ds = datasets.DatasetDict({"train": ds["train"], "validation": ds[other]})
        else:
            split = ds["train"].train_test_split(test_size=0.1, seed=0)
            ds = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    return ds


def _by_split(kind: str, files: list[str], **kwargs: Any):
    import datasets

    # The split is named by the file (train-00000-of-00001.parquet) or by a folder (validation/doc.txt).
    aliases = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
               "dev": "validation", "test": "test"}  # fmt: skip
    splits: dict[str, list[str]] = {}
    for f in files:
        names = [Path(f).stem.split("-")[0], *reversed(Path(f).parent.parts)]
        split = next((aliases[n] for n in names if n in aliases), "train")
        splits.setdefault(split, []).append(f)
    return datasets.load_dataset(kind, data_files=splits, **kwargs)
