"""Optuna ask/tell loop over Hydra's launcher: one trial = one Hydra job in its own folder.

Each trial's job gets three environment variables (through ``hydra.job.env_set``, so they are
also recorded in the job's ``.hydra/hydra.yaml``): the storage URL, the study name and the
trial number. ``llm.sweeps.pruning`` reads them to report intermediate val losses for pruning,
and ``llm.sweeps.report`` to find a run's trial.

A worker killed outright (SIGKILL) leaves its trial RUNNING. Each trial records the worker that
asked for it (the ``worker`` user attribute: host, pid, process start time), so the next worker
on the same host fails it at once when that process is gone; trials of workers on other hosts
are failed once their heartbeats stop. Either way the trial is ``interrupted`` and not counted.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
)
from hydra.core.utils import JobReturn
from hydra.errors import HydraException
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from llm import faults
from llm.sweeps.env import ENV_STORAGE, ENV_STUDY, ENV_TRIAL

log = logging.getLogger(__name__)

# user attr on FAIL trials: why it failed; "interrupted" ones do not count toward n_trials
FAIL_REASON = "fail_reason"
INTERRUPTED = "interrupted"
# user attr on every trial this sweeper asks for: the process that runs it (see worker_record)
WORKER = "worker"

SYNTAX_HELP = (
    "use Hydra's sweep syntax: `choice(a, b, c)` or `a,b,c` (categorical), "
    "`interval(low, high)` (float; int if both ends are ints), `range(start, stop[, step])` "
    "(stop excluded, as in Hydra), optionally wrapped in `tag(log, ...)` for a log scale"
)


def _encode(value: Any) -> str:
    """Render a suggested value as an override value Hydra parses back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    plain = re.fullmatch(r"[A-Za-z_][\w\-/]*", text) and text.lower() not in (
        "true",
        "false",
        "null",
        "nan",
        "inf",
    )
    if plain:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def distribution_from_override(override: Override) -> BaseDistribution:
    """Turn one sweep override (``key=interval(...)`` etc.) into an Optuna distribution."""
    key = override.get_key_element()
    value = override.value()
    tags = set(getattr(value, "tags", None) or ())
    unknown = tags - {"log"}
    if unknown:
        raise HydraException(
            f"Search space for {key!r}: unknown tag(s) {sorted(unknown)}; only `log` is "
            f"supported ({SYNTAX_HELP})"
        )
    log_scale = "log" in tags
    if isinstance(value, ChoiceSweep):
        if log_scale:
            raise HydraException(f"Search space for {key!r}: `log` does not apply to choice()")
        choices = [v for v in override.sweep_iterator()]
        if not choices:
            raise HydraException(f"Search space for {key!r}: choice() needs at least one value")
        bad = [c for c in choices if not (c is None or isinstance(c, bool | int | float | str))]
        if bad:
            raise HydraException(
                f"Search space for {key!r}: choices must be numbers, strings, booleans or "
                f"null, got {bad!r}"
            )
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        if value.start is None or value.stop is None or not value.step:
            raise HydraException(f"Search space for {key!r}: range() needs start and stop")
        values = list(override.sweep_iterator())
        if not values:
            raise HydraException(f"Search space for {key!r}: {override.input_line} is empty")
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            step = 1 if log_scale else int(value.step)
            return IntDistribution(int(values[0]), int(values[-1]), log=log_scale, step=step)
        return FloatDistribution(
            float(values[0]),
            float(values[-1]),
            log=log_scale,
            step=None if log_scale else float(value.step),
        )
    if isinstance(value, IntervalSweep):
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise HydraException(
        f"Search space for {key!r}: {override.input_line!r} is not supported; {SYNTAX_HELP}"
    )


def parse_search_space(
    overrides: Sequence[Override],
) -> tuple[dict[str, BaseDistribution], list[str]]:
    """Split overrides into Optuna distributions (sweeps) and fixed ``key=value`` overrides.

    Later overrides win, so a plain ``key=value`` on the command line pins a parameter that
    the config searches, and a sweep on the command line replaces the config's range.
    """
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in overrides:
        key = override.get_key_element()
        if override.is_sweep_override():
            try:
                space[key] = distribution_from_override(override)
            except ValueError as e:  # Optuna rejects e.g. low > high or log with low <= 0
                raise HydraException(f"Search space {override.input_line!r} is invalid: {e}") from e
            fixed.pop(key, None)
        else:
            fixed[key] = override.input_line
            space.pop(key, None)
    return space, list(fixed.values())


def classify(ret: JobReturn) -> tuple[TrialState, float | None, str | None]:
    """Map a finished job to (state, objective value, failure reason)."""
    try:
        value = ret.return_value
    except optuna.TrialPruned:
        return TrialState.PRUNED, None, None
    except Exception as e:
        return TrialState.FAIL, None, f"{type(e).__name__}: {e}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return TrialState.FAIL, None, f"task returned {value!r}, not a number"
    if not math.isfinite(number):
        return TrialState.FAIL, None, f"task returned a non-finite objective ({number})"
    return TrialState.COMPLETE, number, None


def counted_trials(study: optuna.Study) -> int:
    """Trials that count toward ``n_trials``: all but waiting and interrupted ones."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        interrupted = t.user_attrs.get(FAIL_REASON, INTERRUPTED) == INTERRUPTED
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING) or (
            t.state == TrialState.FAIL and not interrupted
        ):
            n += 1
    return n


def _machine() -> str:
    """This host, as far as its processes can see each other: the host name, and on Linux the
    boot and the pid namespace too (a container with the host's name sees other pids)."""
    name = socket.gethostname()
    if sys.platform != "linux":
        return name
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{name}/{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return name


def _started(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot; Linux), so a reused pid is told
    apart; None where unknown. Raises ProcessLookupError if there is no such live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 3
    if fields[0] in ("Z", "X"):  # killed, not yet reaped: gone all the same
        raise ProcessLookupError(pid)
    return int(fields[19])  # field 22


def worker_record(pid: int | None = None) -> dict[str, Any]:
    """The ``worker`` user attribute of a trial run by process ``pid`` (default: this one)."""
    pid = os.getpid() if pid is None else pid
    try:
        started = _started(pid) if sys.platform == "linux" else None
    except ProcessLookupError:
        started = None
    return {"host": _machine(), "pid": pid, "started": started}


def worker_alive(record: Any) -> bool | None:
    """Whether the process of a ``worker`` record still runs: None when it ran on another host
    (or the record is missing), which only its heartbeats can tell."""
    if not isinstance(record, dict) or record.get("host") != _machine():
        return None
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        if sys.platform == "linux":
            started, recorded = _started(pid), record.get("started")
            # the same start time, or one side unknown; another one: the pid was reused
            return started is None or recorded is None or started == recorded
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def fail_orphaned_trials(study: optuna.Study) -> list[int]:
    """Mark ``FAIL`` (``interrupted``: not counted) the RUNNING trials no live worker runs.

    A trial is orphaned when the process that asked for it, on this host, is gone (no waiting),
    or, for a worker elsewhere, when its heartbeat is older than the grace period (storages
    with heartbeats). A live process on this host keeps its trial whatever its heartbeat.
    Returns the numbers of the trials failed.
    """
    storage = study._storage  # type: ignore[attr-defined]
    stale: set[int] = set()
    if getattr(storage, "get_heartbeat_interval", lambda: None)():
        stale = set(storage._get_stale_trial_ids(study._study_id))  # type: ignore[attr-defined]
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        alive = worker_alive(t.user_attrs.get(WORKER))
        if alive is False or (alive is None and t._trial_id in stale):
            try:
                storage.set_trial_user_attr(t._trial_id, FAIL_REASON, INTERRUPTED)
                storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # it finished meanwhile, or another worker failed it first
            failed.append(t.number)
            log.warning(
                "Trial %d was left running by a worker that is gone: marked interrupted",
                t.number,
            )
    return failed


def absolute_storage(url: str) -> str:
    """Make a relative ``sqlite:///path`` absolute so jobs that change folder find it too."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        path = Path(url[len(prefix) :]).expanduser().resolve()
        return prefix + str(path)
    return url


def _contiguous(numbers: list[int]) -> Iterator[list[int]]:
    """Group positions of consecutive trial numbers, so job folders are named by trial number."""
    group: list[int] = []
    for i, n in enumerate(numbers):
        if group and n != numbers[group[-1]] + 1:
            yield group
            group = []
        group.append(i)
    if group:
        yield group


class _Heartbeat:
    """Record heartbeats of running trials so a killed worker's trials can be told apart."""

    def __init__(self, storage: Any, trial_ids: list[int], interval: int | None) -> None:
        self.storage, self.trial_ids, self.interval = storage, trial_ids, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _beat(self) -> None:
        for trial_id in self.trial_ids:
            self.storage.record_heartbeat(trial_id)

    def _loop(self) -> None:
        assert self.interval
        while not self._stop.wait(self.interval):
            self._beat()

    def __enter__(self) -> _Heartbeat:
        enabled = getattr(self.storage, "get_heartbeat_interval", lambda: None)()
        if self.interval and enabled:
            self._beat()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class LLMOptunaSweeperImpl:
    """The ask/launch/tell loop; constructed with the fields of ``LLMOptunaSweeperConf``."""

    def __init__(
        self,
        study_name: str,
        storage: str | None,
        direction: str,
        n_trials: int,
        n_jobs: int,
        sampler: Any,
        pruner: Any,
        params: Any,
        heartbeat_interval: int | None,
        grace_period: int | None,
    ) -> None:
        if direction not in ("minimize", "maximize"):
            raise HydraException(f"hydra.sweeper.direction={direction!r}: use minimize or maximize")
        if n_trials < 1 or n_jobs < 1:
            raise HydraException(
                f"hydra.sweeper.n_trials ({n_trials}) and n_jobs ({n_jobs}) must be >= 1"
            )
        self.study_name = study_name
        self.storage_url = absolute_storage(str(storage)) if storage else None
        self.direction = direction
        self.n_trials = int(n_trials)
        self.n_jobs = int(n_jobs)
        self.sampler = self._object(sampler, "sampler", optuna.samplers.BaseSampler)
        self.pruner = self._object(pruner, "pruner", optuna.pruners.BasePruner)
        self.params = OmegaConf.to_container(params) if isinstance(params, DictConfig) else params
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Launcher | None = None

    @staticmethod
    def _object(value: Any, name: str, kind: type) -> Any:
        if value is None or isinstance(value, kind):
            return value
        if isinstance(value, DictConfig | dict) and "_target_" in value:
            import hydra.utils

            value = hydra.utils.instantiate(value)
            if isinstance(value, kind):
                return value
        raise HydraException(
            f"hydra.sweeper.{name} must be null or a `_target_:` mapping that builds an "
            f"{kind.__module__}.{kind.__name__}, got {value!r}"
        )

    def setup(
        self,
        *,
        hydra_context: HydraContext,
        task_function: TaskFunction,
        config: DictConfig,
    ) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    # -- study -------------------------------------------------------------------------------

    def create_study(self) -> optuna.Study:
        """Create the study, or load it when the storage already holds one of this name."""
        storage: Any = None
        if self.storage_url is not None:
            try:
                if self.storage_url.startswith("sqlite:///") and ":memory:" not in self.storage_url:
                    Path(self.storage_url[len("sqlite:///") :]).parent.mkdir(
                        parents=True, exist_ok=True
                    )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    storage = optuna.storages.RDBStorage(
                        self.storage_url,
                        heartbeat_interval=self.heartbeat_interval or None,
                        grace_period=self.grace_period,
                    )
            except Exception as e:
                raise HydraException(
                    f"Cannot open the Optuna storage {self.storage_url!r}: "
                    f"{type(e).__name__}: {e}. Set hydra.sweeper.storage to a SQLAlchemy URL "
                    "you can write to, e.g. sqlite:///logs/optuna.db, or null for in-memory"
                ) from e
        try:
            return optuna.create_study(
                study_name=self.study_name,
                storage=storage,
                sampler=self.sampler,
                pruner=self.pruner,
                direction=self.direction,
                load_if_exists=True,
            )
        except ValueError as e:  # e.g. the stored study optimises the other direction
            raise HydraException(
                f"Cannot use study {self.study_name!r} in {self.storage_url}: {e}"
            ) from e

    def _job_env(self, trial: optuna.Trial) -> list[str]:
        if self.storage_url is None:
            return []
        return [
            f"++hydra.job.env_set.{ENV_STORAGE}={_encode(self.storage_url)}",
            f"++hydra.job.env_set.{ENV_STUDY}={_encode(self.study_name)}",
            f"++hydra.job.env_set.{ENV_TRIAL}={trial.number}",
        ]

    # -- sweep -------------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        """Run trials until the study holds ``n_trials`` counted trials; return job results."""
        assert self.config is not None and self.launcher is not None
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        params = [f"{k}={v}" for k, v in (self.params or {}).items()]
        space, fixed = parse_search_space(parser.parse_overrides([*params, *arguments]))
        if not space:
            raise HydraException(
                "The Optuna sweeper has an empty search space: set hydra.sweeper.params in the "
                f"hparams_search config or pass sweeps on the command line ({SYNTAX_HELP})"
            )

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        study = self.create_study()
        log.info(
            "Study %r (%s): %s over %s",
            self.study_name,
            self.storage_url or "in memory",
            self.direction,
            ", ".join(f"{k}: {d}" for k, d in space.items()),
        )
        if self.storage_url is None:
            log.warning("In-memory study: it cannot be resumed and trials cannot be pruned")

        self._check_space(study, space)
        if study.get_trials(deepcopy=False) and self.sampler is not None:
            # a seeded sampler would repeat the suggestions it made when the study started
            self.sampler.reseed_rng()
            log.info("The study has %d trials already: continuing it", len(study.get_trials()))
        returns: list[Sequence[JobReturn]] = []
        while True:
            fail_orphaned_trials(study)
            remaining = self.n_trials - counted_trials(study)
            if remaining <= 0:
                break
            trials = [self._ask(study, space) for _ in range(min(self.n_jobs, remaining))]
            returns.append(self._run_batch(study, trials, fixed))
        self._save_results(study, sweep_dir)
        return returns

    def _ask(self, study: optuna.Study, space: dict[str, BaseDistribution]) -> optuna.Trial:
        with warnings.catch_warnings():  # we record heartbeats ourselves (see _Heartbeat)
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
            trial = study.ask(space)
        trial.set_user_attr(WORKER, worker_record())  # first thing: who runs it
        faults.point("sweep.trial_started")
        return trial

    def _check_space(self, study: optuna.Study, space: dict[str, BaseDistribution]) -> None:
        """A resumed study must keep its search space (Optuna refuses changed categoricals)."""
        for t in study.get_trials(deepcopy=False):
            for name, stored in t.distributions.items():
                if name not in space:
                    continue
                try:
                    optuna.distributions.check_distribution_compatibility(stored, space[name])
                except ValueError as e:
                    raise HydraException(
                        f"The search space of {name!r} ({space[name]}) does not match study "
                        f"{self.study_name!r} in {self.storage_url} ({stored}): {e}. Resume with "
                        "the same search space, or start a new study (another "
                        "hydra.sweeper.study_name or hydra.sweep.dir)"
                    ) from e

    def _run_batch(
        self, study: optuna.Study, trials: list[optuna.Trial], fixed: list[str]
    ) -> list[JobReturn]:
        assert self.launcher is not None
        overrides = [
            (*fixed, *(f"{k}={_encode(v)}" for k, v in t.params.items()), *self._job_env(t))
            for t in trials
        ]
        told: set[int] = set()
        results: list[JobReturn] = []
        try:
            self.validate_batch_is_legal(overrides)
            with _Heartbeat(
                study._storage,  # type: ignore[attr-defined]
                [t._trial_id for t in trials],
                self.heartbeat_interval,
            ):
                for group in _contiguous([t.number for t in trials]):
                    rets = self.launcher.launch(
                        [overrides[i] for i in group], initial_job_idx=trials[group[0]].number
                    )
                    for i, ret in zip(group, rets, strict=True):
                        self._tell(study, trials[i], ret)
                        told.add(i)
                        faults.point("sweep.trial_told")
                        results.append(ret)
        except BaseException:  # Ctrl-C, a bad override: leave the study resumable
            for i, trial in enumerate(trials):
                if i not in told:
                    trial.set_user_attr(FAIL_REASON, INTERRUPTED)
                    study.tell(trial, state=TrialState.FAIL)
                    log.warning("Trial %d interrupted; rerun the search to resume", trial.number)
            raise
        return results

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Compose every job's config before launching, so typos fail before any training."""
        assert self.hydra_context is not None and self.config is not None
        for overrides in batch:
            self.hydra_context.config_loader.load_sweep_config(
                master_config=self.config, sweep_overrides=list(overrides)
            )

    def _tell(self, study: optuna.Study, trial: optuna.Trial, ret: JobReturn) -> None:
        state, value, reason = classify(ret)
        if state == TrialState.COMPLETE:
            study.tell(trial, value)
            log.info("Trial %d finished: %s", trial.number, value)
        elif state == TrialState.PRUNED:
            study.tell(trial, state=TrialState.PRUNED)
            log.info("Trial %d pruned", trial.number)
        else:
            trial.set_user_attr(FAIL_REASON, reason)
            study.tell(trial, state=TrialState.FAIL)
            log.error("Trial %d failed (%s); the search goes on", trial.number, reason)

    def _save_results(self, study: optuna.Study, sweep_dir: Path) -> None:
        counts: dict[str, int] = {}
        for t in study.get_trials(deepcopy=False):
            counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
        results: dict[str, Any] = {
            "name": "llm_optuna",
            "study_name": self.study_name,
            "storage": self.storage_url,
            "trials": counts,
        }
        try:
            best = study.best_trial
            results.update(
                best_trial=best.number, best_value=best.value, best_params=dict(best.params)
            )
            log.info("Best trial %d: %s with %s", best.number, best.value, best.params)
        except ValueError:
            log.warning("No trial of study %r completed", self.study_name)
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
