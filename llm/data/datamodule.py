"""LightningDataModule: corpus + tokenizer -> token cache -> sliding-window train/val loaders.

The cache's shards are read as one token stream: windows may span a shard boundary, so the
windows (and a run) are the same whatever ``shard_tokens`` is. Under DDP, rank r takes
positions r, r + W, ... of the one seeded order of the train windows (as Lightning's sampler
wrapper would), and a run resumed mid-epoch continues each rank's share exactly.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from llm import checks
from llm.data.cache import (
    DEFAULT_SHARD_TOKENS,
    cache_folder,
    ensure_token_cache,
    load_token_cache,
)
from llm.data.corpus import Corpus
from llm.data.dataset import SlidingWindowDataset

log = logging.getLogger(__name__)


VAL_SAMPLE_SEED = 1337


class ResumableRandomSampler(Sampler[int]):
    """Random permutation fixed by ``(seed, epoch)`` that can start part-way through an epoch.

    Lightning calls ``set_epoch`` at the start of every epoch. ``skip`` drops that many leading
    indices of the *next* iteration only (the samples a resumed run has already consumed).
    """

    def __init__(self, num_samples: int, seed: int = 1337, skip: int = 0) -> None:
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0
        self.skip = max(0, int(skip))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        # the full epoch, skipped part included: Lightning sizes every epoch from this and
        # counts the resumed epoch's batches from its restored progress
        return self.num_samples

    def __iter__(self) -> Any:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.num_samples, generator=g).tolist()
        skip, self.skip = self.skip, 0
        yield from perm[skip:]


class ResumableDistributedSampler(DistributedSampler):
    """This rank's share of ResumableRandomSampler's order, able to resume mid-epoch.

    Rank r gets positions r, r + W, ... of the order padded to a multiple of W, exactly what
    Lightning's DistributedSamplerWrapper made of a ResumableRandomSampler (so DDP runs keep
    their order). Being a DistributedSampler, Lightning uses it as it is; that wrapper could
    not skip: it indexes the whole epoch. ``skip`` is a position in the global order (samples
    over all ranks, whatever world wrote it): in the next iteration only, rank r takes
    positions skip + r, skip + r + W, ... of what is left, padded to a multiple of W, so every
    window after ``skip`` is seen once and the ranks' batch counts stay equal. ``len`` stays the
    full share (Lightning sizes the epoch from it and counts the resumed epoch's batches from
    its restored progress).
    """

    def __init__(
        self, num_samples: int, seed: int, rank: int, world_size: int, skip: int = 0
    ) -> None:
        super().__init__(
            range(int(num_samples)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
        self.skip = max(0, int(skip))

    def __iter__(self) -> Any:
        order = list(ResumableRandomSampler(len(self.dataset), self.seed + self.epoch))
        skip, self.skip = min(self.skip, len(order)), 0
        left = order[skip:]
        pad = -len(left) % self.num_replicas
        left += (order * (pad // len(order) + 1))[:pad]  # as DistributedSampler pads
        return iter(left[self.rank :: self.num_replicas])


class SpreadSampler(Sampler[int]):
    """One seeded permutation, the same at every evaluation and in every run.

    With ``limit_val_batches`` (nanoGPT's ``eval_iters``) the batches evaluated are then a fixed
    random sample from the whole validation split, not its first pages. Being fixed, it is
    off the whole-split loss by the same small amount in every run (it does not follow the
    run's seed), so evaluations and runs compare on the same windows.
    """

    def __init__(self, num_samples: int, seed: int = VAL_SAMPLE_SEED) -> None:
        g = torch.Generator().manual_seed(int(seed))
        self.order = torch.randperm(int(num_samples), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Any:
        return iter(self.order)


class ResumableLoader(DataLoader):
    """The train loader of a ResumableOrder: its sampler skips what a checkpoint consumed, so it
    resumes mid-epoch.

    Lightning takes a loader with ``state_dict`` / ``load_state_dict`` for resumable (it warns
    about any other that resumes mid-epoch); the position lives in the data module's state,
    so the loader's own is empty.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: ResumableOrder.load_state_dict has set the sampler's skip."""


class ResumableOrder:
    """A data module's train order that a checkpoint resumes exactly, mid-epoch included.

    Mixed into LightningDataModules with ``seed`` and ``batch_size`` attributes: the train
    loader takes :meth:`train_sampler`, and the checkpoint keeps how many samples of the
    epoch's seeded order were consumed (over all ranks), so a resumed run, on any number of
    devices, continues that order instead of starting the epoch again.
    """

    seed: int
    batch_size: int
    _resume_batches = 0  # train batches of the current epoch a checkpoint consumed
    _resume_samples: int | None = None  # and the samples of the order, all ranks

    def train_sampler(self, num_samples: int) -> Sampler[int]:
        """This rank's sampler over the seeded order, skipping what the checkpoint consumed."""
        world, rank = self._world_size(), self._rank()
        skip, self._resume_samples = self._resume_samples, None
        if skip is None:  # a checkpoint from before samples were counted: this run's sizes
            skip = self._resume_batches * self.batch_size * world
        self._resume_batches = 0
        if skip >= num_samples:
            skip = 0  # the checkpoint ended its epoch: the next one starts from the top
        if world > 1:  # the ranks share out what is left of the global order
            return ResumableDistributedSampler(num_samples, self.seed, rank, world, skip)
        return ResumableRandomSampler(num_samples, self.seed, skip=skip)

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1

    def _rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(getattr(trainer, "global_rank", 0) or 0) if trainer is not None else 0

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: how many train batches of the current epoch were consumed.

        ``processed`` (not ``completed``) so a checkpoint written in ``on_train_batch_end``
        counts the batch it was written after. ``train_samples_consumed`` counts them over all
        ranks (each rank took ``batch_size`` a batch): the position in the global order, so a
        run resumed on another number of devices starts where the order was left
        (:class:`llm.training.world_size.WorldSizeChange` recounts Lightning's batches).
        """
        trainer = getattr(self, "trainer", None)
        batches = 0
        if trainer is not None:
            batches = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        world = self._world_size()
        return {
            "train_batches_consumed": batches,
            "train_samples_consumed": batches * self.batch_size * world,
            "seed": self.seed,
            "batch_size": self.batch_size,  # per rank; with world_size: samples per batch
            "world_size": world,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the shuffled train order mid-epoch where the checkpoint left it.

        The order is the checkpoint's (its seed), whatever seed the resumed run was given.
        """
        self._resume_batches = int(state_dict.get("train_batches_consumed", 0))
        samples = state_dict.get("train_samples_consumed")
        self._resume_samples = None if samples is None else int(samples)
        seed = int(state_dict.get("seed", self.seed))
        if seed != self.seed:
            log.info("resuming the train order of data seed %d (this run: %d)", seed, self.seed)
            self.seed = seed


class TextDataModule(ResumableOrder, L.LightningDataModule):
    """Build (once) and serve a token cache of ``corpus`` for next-token prediction.

    ``corpus`` is a Corpus or a factory (Hydra ``_partial_: true``) called as ``corpus(path=path)``
    when ``path`` is given, else ``corpus()``. Training windows move by ``stride`` (default
    ``block_size``); validation always uses non-overlapping windows (stride = block_size) so that
    evaluation stays cheap and every val token is scored once, in a fixed shuffled order so
    that a limited number of val batches samples the whole split. ``seed`` fixes the order of
    the train windows (the configs pass the run's seed); the val sample never changes.
    """

    def __init__(
        self,
        corpus: Any,
        tokenizer: Any,
        block_size: int,
        stride: int | None = None,
        batch_size: int = 12,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        cache_dir: str | os.PathLike[str] = "data/cache",
        pin_memory: bool | None = None,
        path: str | os.PathLike[str] | None = None,
        seed: int = 1337,
        tokenize_workers: int | None = None,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        max_tokens: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(corpus, Corpus) or not callable(corpus):
            self.corpus = corpus
        else:
            self.corpus = corpus(path=path) if path is not None else corpus()
        # the keys are the data group's: this module is configured as `data`
        checks.integer("data.block_size", block_size, minimum=1, example=64)
        checks.integer("data.stride", stride, minimum=1, nullable=True, example=1)
        checks.integer("data.batch_size", batch_size, minimum=1, example=12)
        checks.integer("data.num_workers", num_workers, minimum=0, example=2)
        checks.integer("data.seed", seed, example=1337)
        if not (isinstance(val_fraction, float | int) and 0.0 < val_fraction < 1.0):
            raise checks.SettingError(
                f"data.val_fraction={val_fraction!r}: must be between 0 and 1 (exclusive): the "
                "share of tokens held out for validation (to skip validation, keep it and set "
                "trainer.limit_val_batches=0)"
            )
        self.tokenizer = tokenizer
        self.block_size = int(block_size)
        self.stride = int(stride) if stride is not None else self.block_size
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.val_fraction = float(val_fraction)
        self.cache_dir = Path(cache_dir)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.seed = int(seed)
        checks.integer("data.tokenize_workers", tokenize_workers, minimum=1, nullable=True)
        checks.integer("data.shard_tokens", shard_tokens, minimum=1, example=100_000_000)
        checks.integer("data.max_tokens", max_tokens, minimum=1, nullable=True, example=10**9)
        self.tokenize_workers = None if tokenize_workers is None else int(tokenize_workers)
        self.shard_tokens = int(shard_tokens)
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self.cache_path: Path | None = None
        self.cache_built: bool | None = None
        self.meta: dict[str, Any] | None = None
        self.train_dataset: SlidingWindowDataset | None = None
        self.val_dataset: SlidingWindowDataset | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    def prepare_data(self) -> None:
        """Build the token cache (cheap when cached); afterwards ``self.tokenizer`` is fitted.

        Once per datamodule: the CLI prepares the data before building the model (whose vocab
        size comes from it), and Lightning's fit asks again.
        """
        if self.cache_path is not None:
            return
        self.cache_path, self.cache_built = ensure_token_cache(
            self.corpus,
            self.tokenizer,
            self.cache_dir,
            workers=self.tokenize_workers,
            shard_tokens=self.shard_tokens,
            max_tokens=self.max_tokens,
        )
        from llm.tokenizers import load_tokenizer

        self.tokenizer = load_tokenizer(self.cache_path / "tokenizer.json")

    def setup(self, stage: str | None = None) -> None:
        """Memory-map the cache on every process (DDP ranks that skipped prepare_data too)."""
        if self.train_dataset is not None:
            return
        folder = self.cache_path or cache_folder(
            self.corpus, self.tokenizer, self.cache_dir, self.max_tokens
        )
        train, val, self.meta, self.tokenizer = load_token_cache(folder, self.val_fraction)
        self.cache_path = folder
        self.train_dataset = self._dataset("train", train, self.stride)
        self.val_dataset = self._dataset("val", val, self.block_size)

    def _dataset(self, split: str, tokens: Any, stride: int) -> SlidingWindowDataset:
        try:
            return SlidingWindowDataset(tokens, self.block_size, stride)
        except ValueError as e:
            hint = f" (or a larger val_fraction than {self.val_fraction})" if split == "val" else ""
            raise ValueError(f"{split} split of {self.cache_path}: {e}{hint}") from e

    def _loader(self, dataset: Any, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call prepare_data() and setup() before asking for a dataloader")
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        sampler = self.train_sampler(len(dataset)) if shuffle else SpreadSampler(len(dataset))
        return (ResumableLoader if shuffle else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)
