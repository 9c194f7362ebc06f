"""``llm prepare data=tinyshakespeare tokenizer=gpt2``: tokenize a corpus into the token cache.

Re-running is cheap: a valid cache is reused; a changed corpus or tokenizer config gets a new
cache folder; an interrupted build resumes from its last finished shard. Training builds the
same cache on first use; this verb does it ahead of time.
"""

from __future__ import annotations

import logging
import time

from hydra.utils import instantiate
from omegaconf import DictConfig

from llm import checks
from llm.cli.app import hydra_app
from llm.data.cache import (
    DEFAULT_SHARD_TOKENS,
    ensure_token_cache,
    load_token_cache,
    split_counts,
)
from llm.data.corpus import Corpus


def prepare(cfg: DictConfig) -> dict:
    """Build (or reuse) the cache for ``cfg.data`` + ``cfg.tokenizer``; return its statistics.

    Uses the corpus and cache settings of ``cfg.data`` directly (not the DataModule), so that
    preparing data never imports torch or Lightning.
    """
    checks.data_path(cfg.data)
    tokenizer = instantiate(cfg.tokenizer)
    corpus = instantiate(cfg.data.corpus)
    path = cfg.data.path if "path" in cfg.data.keys() else None  # noqa: SIM118 - `???` raises
    if callable(corpus) and not isinstance(corpus, Corpus):
        corpus = corpus(path=path) if path is not None else corpus()
    t0 = time.perf_counter()
    folder, built = ensure_token_cache(
        corpus,
        tokenizer,
        cfg.data.get("cache_dir", "data/cache"),
        workers=cfg.data.get("tokenize_workers"),
        shard_tokens=cfg.data.get("shard_tokens", DEFAULT_SHARD_TOKENS),
        max_tokens=cfg.data.get("max_tokens"),
    )
    seconds = time.perf_counter() - t0
    val_fraction = cfg.data.get("val_fraction", 0.1)
    _, _, meta, _ = load_token_cache(folder, val_fraction)
    n_train, n_val = split_counts(meta["total"], val_fraction)
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    shards = [n for n in names if n.startswith("shard-")]
    return {
        "status": "built" if built else "reused",
        "corpus": meta["corpus"]["name"],
        "tokenizer": meta["tokenizer"]["identity"],
        "vocab_size": meta["vocab_size"],
        "dtype": meta["dtype"],
        "train_tokens": n_train,
        "val_tokens": n_val,
        "total_tokens": meta["total"],
        "folder": str(folder),
        "shards": len(shards),
        "files": [n for n in names if n not in shards],
        "seconds": round(seconds, 2),
        "build_seconds": meta["seconds"],
    }


def _log_to_stderr() -> None:
    """Show llm's log (rebuild reasons, progress lines) on stderr.

    Hydra's ``job_logging: disabled`` (no log file) also disables every logger that exists
    already, llm's included: turn those back on.
    """
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    for name, logger in logging.root.manager.loggerDict.items():
        if name.split(".")[0] == "llm" and isinstance(logger, logging.Logger):
            logger.disabled = False


@hydra_app("prepare")
def main(cfg: DictConfig) -> None:
    """Build or reuse the cache and print its statistics (an interrupted build says how to
    resume: the `llm` command prints the message of its KeyboardInterrupt)."""
    _log_to_stderr()
    stats = prepare(cfg)
    print(f"token cache {stats['status']}: {stats['folder']}")
    print(f"  corpus      {stats['corpus']}")
    print(f"  tokenizer   {stats['tokenizer']} (vocab_size {stats['vocab_size']:,})")
    print(f"  dtype       {stats['dtype']}")
    print(f"  train       {stats['train_tokens']:,} tokens")
    print(f"  val         {stats['val_tokens']:,} tokens")
    print(f"  total       {stats['total_tokens']:,} tokens")
    print(f"  shards      {stats['shards']} (shard-*.bin), and {', '.join(stats['files'])}")
    print(f"  time        {stats['seconds']:.2f}s (build took {stats['build_seconds']:.2f}s)")
