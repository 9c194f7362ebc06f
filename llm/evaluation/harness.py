"""EleutherAI's lm-evaluation-harness on our models: an ``lm_eval`` model (``TemplateLM``, the
harness's own base for token-level models) over a GPT and its tokenizer, and a runner.

lm-eval is an optional extra (``pip install -e ".[eval]"``); importing this module without it
raises :class:`MissingExtra` with that command. The CLI is
``llm evaluate ckpt_path=... harness.tasks=[...]``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llm.evaluation.scoring import score_continuations
from llm.inference import IncrementalDecoder
from llm.io import atomic_write_text
from llm.model import GPT
from llm.model.generation import generate_stream
from llm.tokenizers import Tokenizer

INSTALL = 'pip install -e ".[eval]"'


class MissingExtra(RuntimeError):
    """lm-evaluation-harness is not installed."""


try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM
except ImportError as e:
    raise MissingExtra(
        f"the lm-evaluation-harness is an optional extra: install it with {INSTALL} "
        f"(or pip install lm-eval) to run harness.tasks"
    ) from e


class HarnessLM(TemplateLM):
    """A GPT and its tokenizer as an lm-eval model: loglikelihood (batched, longest first,
    contexts cropped from the left to the block size), loglikelihood_rolling (the harness's
    own non-overlapping windows of the block size) and generate_until (greedy, stop strings).

    Requests that lm-eval hands over are scored with the same code as the training-time
    benchmark (:mod:`llm.evaluation.scoring`).
    """

    def __init__(
        self, model: GPT, tokenizer: Tokenizer, batch_size: int = 16, max_gen_toks: int = 256
    ) -> None:
        super().__init__()
        if tokenizer.eot_id is None:
            raise ValueError(
                f"the harness conditions empty contexts on an end-of-text token, and this "
                f"{type(tokenizer).__name__} has none"
            )
        if batch_size < 1 or max_gen_toks < 1:
            raise ValueError(
                f"harness.batch_size and harness.max_gen_toks must be >= 1, got {batch_size} "
                f"and {max_gen_toks}"
            )
        self.model = model.eval()
        self.tok = tokenizer  # not `tokenizer`: TemplateLM expects a Hugging Face one there
        self._batch_size = int(batch_size)
        self._max_gen_toks = int(max_gen_toks)
        self._device = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return int(self.tok.eot_id)  # type: ignore[arg-type]

    @property
    def max_length(self) -> int:
        return int(self.model.config.block_size)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **_: Any
    ) -> list[int]:
        return list(self.tok.encode(string))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(list(tokens))

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **_: Any
    ) -> list[tuple[float, bool]]:
        scores = score_continuations(
            self.model, [(ctx, cont) for _, ctx, cont in requests], self.batch_size
        )
        out = []
        for (key, _ctx, _cont), s in zip(requests, scores, strict=True):
            answer = (s.logprob, s.greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """Each text's total log-likelihood over windows of the block size, every token
        predicted once (the first from end-of-text)."""
        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, (text,) in enumerate(req.args for req in requests):
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for window in map(lm_utils.make_disjoint_window, rolling):
                windows.append(window)
                owner.append(i)
        totals = [0.0] * len(requests)
        scores = score_continuations(self.model, windows, self.batch_size)
        for i, s in zip(owner, scores, strict=True):
            totals[i] += s.logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations (KV cache) up to a stop string, end-of-text or max_gen_toks,
        one request at a time."""
        out = []
        for req in requests:
            context, kwargs = req.args
            text = self._generate(context, dict(kwargs or {}))
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    def _generate(self, context: str, kwargs: dict[str, Any]) -> str:
        until = kwargs.get("until") or []
        until = [s for s in ([until] if isinstance(until, str) else until) if s]
        max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
        ids = self.tok_encode(context) or [self.eot_token_id]
        ids = ids[-self.max_length :]
        idx = torch.tensor([ids], dtype=torch.long, device=self._device)
        decoder = IncrementalDecoder(self.tok, context=ids)
        text = ""
        stream = generate_stream(
            self.model, idx, max_new, temperature=0.0, stop_token=self.eot_token_id
        )
        try:
            for tok in stream:
                t = int(tok)
                if t == self.eot_token_id:
                    break
                text += decoder.push([t])
                if any(s in text for s in until):
                    break
        finally:
            stream.close()
        text += decoder.flush()
        cut = min((text.index(s) for s in until if s in text), default=len(text))
        return text[:cut]


def evaluate_harness(
    lm: HarnessLM,
    tasks: Sequence[str],
    include_path: str | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    bootstrap_iters: int = 100000,
    seed: int = 0,
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on ``lm``: its results dict (tables, configs, versions)."""
    from lm_eval import simple_evaluate

    manager = task_manager(tasks, include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = f" or in {include_path}" if include_path else ""
        raise ValueError(
            f"harness.tasks: no task named {unknown} in lm-eval{where}; list them with "
            "`lm-eval ls tasks`, or add local task YAMLs with harness.include_path=<folder>"
        )
    try:
        results = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=bootstrap_iters,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except ConnectionError as e:
        raise RuntimeError(
            f"a task's data could not be downloaded ({e}); offline, point a local task YAML at "
            "JSON files and pass its folder as harness.include_path"
        ) from e
    assert results is not None  # None on ranks other than 0, and we run one process
    return dict(results)


def task_manager(tasks: Sequence[str], include_path: str | None = None) -> Any:
    """lm-eval's task index: the local folder's tasks alone when they are all that is asked for
    (indexing the thousands of built-in ones takes half a minute), else everything."""
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return TaskManager()
    if not Path(include_path).is_dir():
        raise FileNotFoundError(
            f"harness.include_path={include_path}: no such folder (a folder of task YAMLs)"
        )
    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(local.match_tasks([t]) for t in tasks):
        return local
    return TaskManager(include_path=include_path)


def results_table(results: dict[str, Any]) -> str:
    """The harness's own markdown table(s) of the results (and of groups, if any)."""
    table = lm_utils.make_table(results)
    if results.get("groups"):
        table += "\n" + lm_utils.make_table(results, "groups")
    return table


def results_path(folder: str | os.PathLike[str], tasks: Sequence[str]) -> Path:
    """``<folder>/harness-<tasks>-<date>.json`` (task names made file-name safe)."""
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "_", "+".join(tasks))[:80]
    return Path(folder) / f"harness-{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def save_results(results: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """The results as JSON, written atomically (lm-eval's own encoder for numpy values etc.)."""
    text = json.dumps(results, indent=2, default=lm_utils.handle_non_serializable)
    return atomic_write_text(path, text + "\n")
