"""Callbacks that watch training at each validation: a TensorBoard text sample and attention
heat maps (does the model start to spell? do heads specialise?), which do nothing unless the
trainer's logger is a `TensorBoardLogger`, and a multiple-choice benchmark scored next to the
validation loss.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from llm.heatmaps import HeatmapCanvas
from llm.training.board import write_text


def _tensorboard(trainer: L.Trainer) -> Any | None:
    """The SummaryWriter of the first TensorBoardLogger, or None."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _should_run(trainer: L.Trainer) -> bool:
    """Rank zero only, not under FSDP (sharded weights), and during a sanity check only a fresh
    run's: that check is its step 0 (`GPTLitModule.log_initial_validation`), a resumed run's
    repeats a validation already logged."""
    if not trainer.is_global_zero:
        return False
    if trainer.sanity_checking and trainer.global_step != 0:
        return False
    return "FSDP" not in type(trainer.strategy).__name__


def _encode(pl_module: L.LightningModule, text: str) -> list[int] | None:
    tok = getattr(pl_module, "tokenizer", None)
    if tok is None:
        return None
    try:
        ids = list(tok.encode(text)) if text else []
    except (KeyError, ValueError) as err:
        rank_zero_warn(f"cannot encode {text!r} with this tokenizer ({err}); skipping")
        return None
    if not ids:
        eot = getattr(tok, "eot_id", None)
        ids = [eot if eot is not None else 0]
    return ids


class Background:
    """One background thread for a callback's TensorBoard work (drawing heat maps, sampling
    text, encoding images), so the training thread only hands over data it copied and trains on.

    One job at a time: the next hand-off waits for the one before, and so do the end of fitting
    and a failed run, so nothing is lost and a run's end waits for its last images; a job's
    error is raised on the training thread at that wait."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._job: Future[None] | None = None

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-board")
        self._job = self._pool.submit(fn, *args)

    def wait(self) -> None:
        """Until the job handed over last is done (its error raised here)."""
        job, self._job = self._job, None
        if job is not None:
            job.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None


class _OffThread(L.Callback):
    """A callback whose work runs on its :class:`Background` thread, waited for at teardown
    (the Trainer's loggers close after it) and when the run fails."""

    def __init__(self) -> None:
        self.background = Background()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.background.close()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        try:
            self.background.close()
        except Exception as err:  # the run's own error is the one to report
            rank_zero_warn(f"{type(self).__name__}: {type(err).__name__}: {err}")


class SampleTextCallback(_OffThread):
    """After each validation, the one before the first step included (step 0: the untrained
    model's gibberish, the start the heat maps and the val loss have too), sample from a fixed
    prompt and log it as TensorBoard text, headed by the prompt and the sampling settings (so
    samples of different runs compare)."""

    def __init__(
        self,
        prompt: str = "\n",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = 200,
        seed: int = 1337,
    ) -> None:
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        super().__init__()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = _tensorboard(trainer)
        if writer is None or not _should_run(trainer):
            return
        ids = _encode(pl_module, self.prompt)
        if ids is None:
            return
        model = pl_module.model
        ids = ids[-model.config.block_size :]
        step = trainer.global_step
        if pl_module.device.type != "cpu":  # a copy would take accelerator memory: sample here
            self.sample(writer, model, pl_module.tokenizer, ids, step)
            return
        # a copy of this step's weights (parameters copy without their gradients), which the
        # optimizer's next steps leave alone while the background thread samples from it
        self.background.submit(
            self.sample, writer, copy.deepcopy(model), pl_module.tokenizer, ids, step
        )

    def sample(self, writer: Any, model: Any, tokenizer: Any, ids: list[int], step: int) -> None:
        """Sample after ``ids`` and write it at ``step`` (its own generator: the global RNG,
        which dropout draws from, is left alone)."""
        idx = torch.tensor([ids], device=next(model.parameters()).device)
        with torch.no_grad():
            out = model.generate(
                idx,
                self.max_new_tokens,
                temperature=self.temperature,
                top_k=self.top_k,
                seed=self.seed,
            )
        write_text(writer, "sample", self.markdown(tokenizer, ids, out[0].tolist()), step)

    def markdown(self, tokenizer: Any, prompt: list[int], ids: list[int]) -> str:
        """The settings, then prompt and continuation as a code block (spacing survives)."""
        settings = (
            f"prompt `{self.prompt!r}` · temperature {self.temperature} · top_k {self.top_k} "
            f"· max_new_tokens {self.max_new_tokens} · seed {self.seed}"
        )
        text = tokenizer.decode(prompt) + tokenizer.decode(ids[len(prompt) :])
        return settings + "\n\n" + "    " + text.replace("\n", "\n    ")


class AttentionHeatmapCallback(_OffThread):
    """At each validation, the one before the first step included (step 0: the untrained
    model), log attention on a fixed input: one figure per head (``val/attention/layer0/head1``),
    at most 330 px wide for the default 20 tokens, so IMAGES' card (350 px wide, the figure
    fitted to it) shows its token labels at full size; each token more adds 12 px, and from
    about 24 the card shrinks the figure unless "Show actual image size" is ticked.

    ``layers``: a layer index, a list of them, or ``"all"``. ``text`` null reads the first
    ``max_tokens`` tokens of the validation data, which every tokenizer can encode.
    """

    def __init__(
        self,
        layers: int | Sequence[int] | str = 0,
        text: str | None = None,
        max_tokens: int = 20,
    ) -> None:
        if isinstance(layers, str) and layers != "all":
            raise ValueError(f"callbacks.attention.layers={layers!r}: an index, a list or 'all'")
        self.layers = layers
        self.text = text
        self.max_tokens = max_tokens
        self._canvas: HeatmapCanvas | None = None  # the background thread's own
        super().__init__()

    def layer_indices(self, n_layer: int) -> list[int]:
        if self.layers == "all":
            return list(range(n_layer))
        chosen = [self.layers] if isinstance(self.layers, int) else list(self.layers)
        bad = [i for i in chosen if not -n_layer <= int(i) < n_layer]
        if bad:
            raise ValueError(
                f"callbacks.attention.layers={self.layers}: the model has {n_layer} layers "
                f"(0..{n_layer - 1}); {bad} are not among them"
            )
        return [int(i) % n_layer for i in chosen]

    def _ids(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[int] | None:
        if self.text is not None:
            return _encode(pl_module, self.text)
        loaders = trainer.val_dataloaders
        dataset = getattr(loaders[0] if isinstance(loaders, list) else loaders, "dataset", None)
        if dataset is None or len(dataset) == 0:
            return None
        return [int(i) for i in dataset[0][0]]  # the first window's inputs

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = _tensorboard(trainer)
        if writer is None or not _should_run(trainer):
            return
        ids = self._ids(trainer, pl_module)
        if not ids:
            return
        model = pl_module.model
        ids = ids[: min(self.max_tokens, model.config.block_size)]
        idx = torch.tensor([ids], device=pl_module.device)
        tok = pl_module.tokenizer
        pieces = getattr(tok, "pieces", None)  # per-token strings, when the tokenizer has them
        labels = list(pieces(ids)) if pieces else [tok.decode([i]) for i in ids]
        maps = {  # (H, T, T) per layer, in host memory: drawn and written off this thread
            layer: model.attention_maps(idx, layer)[0].float().cpu().numpy()
            for layer in self.layer_indices(model.config.n_layer)
        }
        self.background.submit(self.draw, writer, maps, labels, trainer.global_step)

    def draw(self, writer: Any, maps: dict[int, np.ndarray], labels: list[str], step: int) -> None:
        """One image per head (``val/attention/layer<L>/head<H>``) at ``step``, all drawn on one
        figure kept from the first validation (the labels stay the same)."""
        t = len(labels)
        if self._canvas is None or (self._canvas.t, self._canvas.labels) != (t, labels):
            self._canvas = HeatmapCanvas(t, labels)
        for layer, heads in maps.items():
            for head, weights in enumerate(heads):
                image = self._canvas.render(weights, layer, head)
                tag = f"val/attention/layer{layer}/head{head}"
                writer.add_image(tag, image, step, dataformats="HWC")


class MultipleChoiceCallback(L.Callback):
    """At each validation, score a HellaSwag-format multiple-choice file
    (:mod:`llm.evaluation.multiple_choice`) and log ``val/mc_acc`` and ``val/mc_acc_norm`` next
    to val/loss, so sweeps can rank runs by a benchmark (``llm report sort=val/mc_acc_norm``).

    ``path`` None leaves it off (the default config's entry: enable it with
    ``callbacks.multiple_choice.path=<file.jsonl>``). ``limit``: the first N rows. The file is
    read and encoded once, at setup, so a bad row fails the run before it trains. Under DDP
    each rank scores its share and the counts are summed; skipped under FSDP (sharded weights).
    """

    def __init__(self, path: str | None = None, limit: int | None = None, batch_size: int = 16):
        self.path = path
        self.limit = limit
        self.batch_size = batch_size
        self._encoded: list[Any] = []
        self._labels: list[int] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.path is None or self._encoded:
            return
        from llm.evaluation.multiple_choice import encode_examples, read_examples

        tok = getattr(pl_module, "tokenizer", None)
        if tok is None:
            raise ValueError("callbacks.multiple_choice needs a model with a tokenizer")
        examples = read_examples(self.path, self.limit)
        try:
            self._encoded = encode_examples(tok, examples)
        except (KeyError, ValueError) as e:  # a character the model's vocabulary lacks
            raise ValueError(f"callbacks.multiple_choice.path={self.path}: {e}") from e
        self._labels = [ex.label for ex in examples]

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._encoded or trainer.sanity_checking:
            return
        if "FSDP" in type(trainer.strategy).__name__:
            return
        from llm.evaluation.multiple_choice import score_examples

        rank, world = trainer.global_rank, trainer.world_size
        mine = slice(rank, None, world)
        correct, correct_norm = score_examples(
            pl_module.model, self._encoded[mine], self._labels[mine], self.batch_size
        )
        counts = torch.tensor(
            [correct, correct_norm, len(self._labels[mine])],
            dtype=torch.long,
            device=pl_module.device,
        )
        if world > 1:
            counts = pl_module.all_gather(counts).reshape(-1, 3).sum(0)
        n = float(counts[2])
        # identical on every rank already; sync_dist only silences Lightning's DDP warning
        pl_module.log("val/mc_acc", float(counts[0]) / n, sync_dist=True)
        pl_module.log("val/mc_acc_norm", float(counts[1]) / n, sync_dist=True)
