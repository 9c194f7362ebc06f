"""A clean stop on SIGTERM or Ctrl-C: finish the batch, checkpoint, say how to resume, and end
with the signal's exit status (130 for Ctrl-C, 143 for SIGTERM) so schedulers and `&&` chains
see an interrupted run."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L

from llm.interrupts import Interrupted

log = logging.getLogger("llm")


class GracefulShutdown(L.Callback):
    """SIGTERM or a first Ctrl-C: finish the current batch, checkpoint, stop cleanly.

    The checkpoint is the run's ``last.ckpt`` (written by its :class:`RunCheckpoint`, atomically),
    so the one command that resumes any stop is ``ckpt_path=<run>/checkpoints/last.ckpt``; it is
    printed once, by the command as it ends (:meth:`interrupted` is the exception it ends with).
    A second Ctrl-C interrupts at once (Lightning's own KeyboardInterrupt handling). Handlers are
    installed for the training run only, and only in the main thread (signal handlers cannot be
    set elsewhere). Under DDP the ranks agree to stop every ``sync_every_n_steps`` steps, so
    other steps never wait on a collective, and no stop falls between the batches of one
    accumulated step. In a SLURM job with Lightning's auto-requeue, SLURM's warning signal
    (SIGUSR1, ``--signal=SIGUSR1@90``) stops the same way and then runs Lightning's requeue
    (:meth:`_requeue`). ``dirpath`` is where the checkpoint goes when the run has no
    RunCheckpoint (``callbacks.model_checkpoint=null``).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        command: str = "llm train",
        sync_every_n_steps: int = 10,
    ) -> None:
        self.dirpath = dirpath
        self.command = command  # the verb the resume hint names (llm train, llm finetune)
        self.sync_every_n_steps = max(int(sync_every_n_steps), 1)
        self.message = ""
        self.signum: int | None = None
        self.ckpt_path: str | None = None
        self.requeue_signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\nReceived {signal.Signals(signum).name}: stopping after this batch "
            "and saving a checkpoint (Ctrl-C again to abort)",
            file=sys.stderr,
            flush=True,
        )

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handler:
                signal.signal(signum, previous)
        self._previous = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signum, self.ckpt_path = None, None
        self.requeue_signal = requeue_signal(trainer)
        if threading.current_thread() is not threading.main_thread():
            return
        signals = [signal.SIGTERM, signal.SIGINT]
        if self.requeue_signal is not None:  # in place of Lightning's, which saves mid-step
            signals.append(self.requeue_signal)
        for signum in signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handler)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return  # mid-accumulation: a checkpoint would lose the gradients gathered so far
        stop = self.signum is not None
        requeue = stop and self.signum == self.requeue_signal
        if trainer.world_size > 1:
            if trainer.global_step % self.sync_every_n_steps:
                return
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
            if stop:
                requeue = trainer.strategy.reduce_boolean_decision(requeue, all=False)
            if stop and self.signum is None:  # another rank's signal
                self.signum = self.requeue_signal if requeue else signal.SIGTERM
        if not stop:
            return
        if requeue:  # SLURM's warning before preemption: Lightning's save and requeue
            path, validates = self._requeue(trainer), False
        else:
            # a validation the schedule runs after this batch writes last.ckpt with its
            # results (a resumed run starts after it and would never make it up); else save now
            validates = validates_after_this_batch(trainer)
            path = self._checkpoint_after_validation(trainer) if validates else None
            path = path or self._save(trainer)
        if trainer.is_global_zero:
            self.ckpt_path = str(path)
            self.message = resume_message(path, command=self.command)
            if requeue:
                self.message = (
                    f"Checkpoint saved to {path}\nSLURM job {os.environ.get('SLURM_JOB_ID')} "
                    "requeued: started again, the same command resumes from it"
                )
            log.info(
                "stopped by %s at step %d; checkpoint %s",
                signal.Signals(self.signum or signal.SIGTERM).name,
                trainer.global_step,
                path,
            )
        trainer.strategy.barrier("graceful_shutdown")
        trainer.should_stop = True
        # should_stop alone also validates once more (the module's end-of-run validation);
        # a stop on a signal must be quick, so skip it unless the schedule validates here anyway
        trainer.fit_loop.epoch_loop._skip_next_val = not validates

    @staticmethod
    def _checkpoint_after_validation(trainer: L.Trainer) -> Path | None:
        """The last.ckpt the run's RunCheckpoint writes at the end of the coming validation."""
        from llm.training.checkpointing import RunCheckpoint

        ckpt = trainer.checkpoint_callback
        return ckpt.last_path if isinstance(ckpt, RunCheckpoint) and ckpt.save_last else None

    @staticmethod
    def _requeue(trainer: L.Trainer) -> Path:
        """Lightning's SLURM auto-requeue, at a step's end rather than wherever the signal
        fell: ``<run>/hpc_ckpt_<n>.ckpt`` (every rank calls), then ``scontrol requeue <job>``
        from rank 0. The requeued job resumes from that file (Lightning's rule, and
        :func:`llm.training.run.resume_requeued`)."""
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer._signal_connector._slurm_sigusr_handler_fn(signal.SIGUSR1, None)  # type: ignore[arg-type]
        return Path(path)

    def _save(self, trainer: L.Trainer) -> Path:
        """The run's last.ckpt, through its RunCheckpoint where it has one (every rank calls)."""
        from llm.training.checkpointing import LAST, RunCheckpoint

        ckpt = trainer.checkpoint_callback
        if isinstance(ckpt, RunCheckpoint):
            return Path(ckpt.save_last_now(trainer))
        path = Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints") / LAST
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(path)  # atomic: the Trainer's AtomicCheckpointIO
        return path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def interrupted(self) -> Interrupted | None:
        """What the command ends with after a signal stopped the run (None if none did)."""
        if self.signum is None:
            return None
        name = signal.Signals(self.signum).name
        return Interrupted(f"Stopped by {name}.\n{self.message}".strip(), self.signum)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()


def requeue_signal(trainer: L.Trainer) -> int | None:
    """The signal SLURM sends before it preempts the job (``--signal=SIGUSR1@90``), where the
    run is a SLURM job step with Lightning's auto-requeue on (its default); else None."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    environment = trainer._accelerator_connector.cluster_environment
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return environment.requeue_signal
    return None


def resume_message(
    path: str | os.PathLike[str],
    overrides: list[str] | None = None,
    command: str = "llm train",
) -> str:
    """How to resume from ``path``: this run's overrides with ``ckpt_path`` replaced.

    The overrides are the job's own (Hydra's ``overrides.task``: a sweep job's values, not the
    sweep's lists); the run folder is pinned so the resumed run continues in the same one.
    """
    if overrides is None:
        overrides = _job_overrides()
    args = [a for a in overrides if a.split("=", 1)[0].lstrip("+~") != "ckpt_path"]
    quoted = [shlex.quote(a) for a in [f"ckpt_path={path}", *args]]
    cmd = " ".join([command, *quoted])
    return f"Checkpoint saved to {path}\nResume with: {cmd}"


def _job_overrides() -> list[str]:
    """This job's overrides (a sweep job's own values) and its run folder, or the bare argv."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return sys.argv[1:]
    hydra_cfg = HydraConfig.get()
    pinned = [o for o in hydra_cfg.overrides.task if not str(o).startswith("hydra.run.dir=")]
    return [*map(str, pinned), f"hydra.run.dir={hydra_cfg.runtime.output_dir}"]


def validates_after_this_batch(trainer: L.Trainer) -> bool:
    """Whether ``val_check_interval`` schedules a validation after the batch that just ended
    (Lightning's batch-based rule: every ``val_check_batch`` batches of the run, or of the epoch
    when ``check_val_every_n_epoch`` is set)."""
    every = trainer.val_check_batch
    if not every or every == float("inf"):
        return False
    loop = trainer.fit_loop.epoch_loop
    done = loop.total_batch_idx if trainer.check_val_every_n_epoch is None else loop.batch_idx
    return (done + 1) % int(every) == 0
