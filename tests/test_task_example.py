"""The smallest new task, as docs/finetuning.md shows it: one class and one config file, run by
`llm finetune task=<name>` through the same fit as every other task."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, char_checkpoint, compose, fast_overrides, write_corpus

DOCS = ROOT / "docs" / "finetuning.md"


def _block(after: str, lang: str) -> str:
    """The first ```lang block after the line ``after`` in docs/finetuning.md."""
    text = DOCS.read_text(encoding="utf-8").split(after, 1)[1]
    return text.split(f"```{lang}\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_a_new_task_is_one_class_and_one_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llm.cli.finetune import finetune

    (tmp_path / "my_tasks.py").write_text(_block("<!-- task-class -->", "python"))
    conf = tmp_path / "conf" / "task"
    conf.mkdir(parents=True)
    (conf / "top_layers.yaml").write_text(_block("<!-- task-config -->", "yaml"))
    monkeypatch.syspath_prepend(str(tmp_path))
    init = char_checkpoint(tmp_path / "init.ckpt", block_size=32)
    cfg = compose(
        "finetune",
        [
            "task=top_layers",
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
            f"init={init}",
            f"data.path={write_corpus(tmp_path)}",
            *fast_overrides(tmp_path, 2),
        ],
    )
    before = torch.load(init, weights_only=True)["state_dict"]
    result = finetune(cfg)
    assert type(result["module"]).__name__ == "GPTLitModule" and result["trainer"].global_step == 2
    after = result["module"].state_dict()
    n, blocks = int(cfg.task.layers), result["module"].config.n_layer
    assert 0 < n < blocks
    for i in range(blocks):  # the frozen blocks are the init's, the last `layers` trained
        key = f"model.h.{i}.attn.c_attn.weight"
        assert torch.equal(after[key], before[key]) == (i < blocks - n), i
    assert result["params/trainable"] < result["params/total"]
    assert "my_tasks" in sys.modules
