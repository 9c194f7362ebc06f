"""``llm prepare data=tinyshakespeare tokenizer=gpt2``: tokenize a corpus into the token cache.

Re-running is cheap: a valid cache is reused; a changed corpus or tokenizer config gets a new
cache folder. Training builds the same cache on first use; this verb does it ahead of time.
"""

from __future__ import annotations

import logging
import time

from hydra.utils import instantiate
from omegaconf import DictConfig

from llm.cli.app import hydra_app
from llm.data.cache import ensure_token_cache, load_token_cache
from llm.data.corpus import Corpus


def prepare(cfg: DictConfig) -> dict:
    """Build (or reuse) the cache for ``cfg.data`` + ``cfg.tokenizer``; return its statistics.

    Uses the corpus and cache settings of ``cfg.data`` directly (not the DataModule), so that
    preparing data never imports torch or Lightning.
    """
    tokenizer = instantiate(cfg.tokenizer)
    corpus = instantiate(cfg.data.corpus)
    path = cfg.data.get("path")
    if callable(corpus) and not isinstance(corpus, Corpus):
        corpus = corpus(path=path) if path is not None else corpus()
    t0 = time.perf_counter()
    folder, built = ensure_token_cache(
        corpus,
        tokenizer,
        cfg.data.get("cache_dir", "data/cache"),
        cfg.data.get("val_fraction", 0.1),
    )
    seconds = time.perf_counter() - t0
    train, val, meta, _ = load_token_cache(folder)
    return {
        "status": "built" if built else "reused",
        "corpus": meta["corpus"]["name"],
        "tokenizer": meta["tokenizer"]["identity"],
        "vocab_size": meta["vocab_size"],
        "dtype": meta["dtype"],
        "train_tokens": len(train),
        "val_tokens": len(val),
        "total_tokens": meta["total"],
        "folder": str(folder),
        "files": sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")),
        "seconds": round(seconds, 2),
        "build_seconds": meta["seconds"],
    }


@hydra_app("prepare")
def main(cfg: DictConfig) -> None:
    """Build or reuse the cache and print its statistics."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stats = prepare(cfg)
    print(f"token cache {stats['status']}: {stats['folder']}")
    print(f"  corpus      {stats['corpus']}")
    print(f"  tokenizer   {stats['tokenizer']} (vocab_size {stats['vocab_size']:,})")
    print(f"  dtype       {stats['dtype']}")
    print(f"  train       {stats['train_tokens']:,} tokens")
    print(f"  val         {stats['val_tokens']:,} tokens")
    print(f"  total       {stats['total_tokens']:,} tokens")
    print(f"  files       {', '.join(stats['files'])}")
    print(f"  time        {stats['seconds']:.2f}s (build took {stats['build_seconds']:.2f}s)")
