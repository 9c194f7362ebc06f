"""Pretraining end to end on CPU: the LightningModule, callbacks, checkpoints and Hydra entry."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import ROOT, TEXT, VERDICT, compose, run_cli, tiny_overrides
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from llm.model import GPT
from llm.training.callbacks import AttentionHeatmapCallback, SampleTextCallback
from llm.training.module import GPTLitModule
from llm.training.throughput import Throughput

TINY = {"block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0}
# conf/optim/adamw.yaml (the one home of the defaults) with a short schedule
OPTIM = {
    **OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "optim" / "adamw.yaml")),  # type: ignore[dict-item]
    **{"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "decay_steps": 10, "betas": [0.9, 0.99]},
}


def _fitted(tok: Any) -> Any:
    """The shared char tokenizer, refitted on TEXT (the corpus these tests train on)."""
    tok.fit([TEXT])
    return tok


def _loader(tok: Any, block: int = 16, batch: int = 8) -> DataLoader:
    ids = torch.tensor(tok.encode(TEXT))
    n = (len(ids) - 1) // block
    x, y = ids[: n * block].view(n, block), ids[1 : n * block + 1].view(n, block)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _trainer(out: Path, max_steps: int, callbacks: list[Any] | None = None, **kw: Any) -> L.Trainer:
    args: dict[str, Any] = {
        "accelerator": "cpu",
        "max_steps": max_steps,
        "val_check_interval": 3,
        "check_val_every_n_epoch": None,
        "limit_val_batches": 2,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": TensorBoardLogger(out, name="tb", version="", default_hp_metric=False),
        "callbacks": callbacks or [],
    }
    return L.Trainer(**{**args, **kw})


def test_module_trains_checkpoints_and_reloads(tmp_path: Path, char_tokenizer: Any) -> None:
    L.seed_everything(0)
    tok = _fitted(char_tokenizer)
    module = GPTLitModule(model={**TINY, "vocab_size": tok.vocab_size}, optim=OPTIM)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", save_last=True)
    trainer = _trainer(tmp_path, 6, [ckpt, Throughput()])  # as every run has
    dl = _loader(tok)
    trainer.fit(module, dl, dl)

    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"]))
    assert math.isfinite(float(metrics["val/loss"]))
    val_loss = float(metrics["val/loss"])
    assert float(metrics["val/ppl"]) == pytest.approx(math.exp(val_loss), rel=1e-4)
    assert float(metrics["train/tokens_per_sec"]) > 0
    assert Path(ckpt.best_model_path).is_file() and Path(ckpt.last_model_path).is_file()

    raw = torch.load(ckpt.last_model_path, map_location="cpu", weights_only=True)
    assert raw["global_step"] == 6
    assert raw["hyper_parameters"]["model"]["vocab_size"] == tok.vocab_size
    assert raw["hyper_parameters"]["optim"]["betas"] == [0.9, 0.99]

    reloaded = GPTLitModule.load_from_checkpoint(ckpt.last_model_path, weights_only=True)
    x, _ = next(iter(dl))
    module.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x)[0], module(x)[0])


def test_mfu_is_logged_when_peak_flops_are_known(
    tmp_path: Path, char_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a GPU whose peak FLOPs Lightning knows: here 1 TFLOP/s, so MFU is logged."""
    from llm.training import throughput

    monkeypatch.setattr(throughput, "peak_flops", lambda device, precision: 1e12)
    tok = _fitted(char_tokenizer)
    module = GPTLitModule(model={**TINY, "vocab_size": tok.vocab_size}, optim=OPTIM)
    trainer = _trainer(tmp_path, 3, limit_val_batches=0, callbacks=[throughput.Throughput()])
    trainer.fit(module, _loader(tok))
    m = trainer.callback_metrics
    tps, mfu = float(m["train/tokens_per_sec"]), float(m["train/mfu"])
    assert mfu == pytest.approx(module.model.flops_per_token() * tps / 1e12, rel=1e-4)
    assert "train/tokens_per_sec" in trainer.progress_bar_metrics  # shown in the console too


def test_schedule_steps_per_optimizer_step(tmp_path: Path, char_tokenizer: Any) -> None:
    tok = _fitted(char_tokenizer)
    module = GPTLitModule(model={**TINY, "vocab_size": tok.vocab_size}, optim=OPTIM)
    trainer = _trainer(tmp_path, 12, limit_val_batches=0)
    trainer.fit(module, _loader(tok))
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(OPTIM["min_lr"])  # past decay_steps=10


def test_nan_loss_raises_with_step(tmp_path: Path, char_tokenizer: Any) -> None:
    tok = _fitted(char_tokenizer)
    module = GPTLitModule(model={**TINY, "vocab_size": tok.vocab_size}, optim=OPTIM)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float("nan"))
    trainer = _trainer(tmp_path, 3, limit_val_batches=0)
    with pytest.raises(RuntimeError, match="global step 0"):
        trainer.fit(module, _loader(tok))


@pytest.mark.slow
def test_callbacks_log_text_and_attention(tmp_path: Path, char_tokenizer: Any) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tok = _fitted(char_tokenizer)
    module = GPTLitModule(model={**TINY, "vocab_size": tok.vocab_size}, optim=OPTIM)
    module.tokenizer = tok
    callbacks = [
        SampleTextCallback(prompt="First", max_new_tokens=10),
        AttentionHeatmapCallback(layers="all", text="hear me speak"),
    ]
    trainer = _trainer(tmp_path, 3, callbacks)
    dl = _loader(tok)
    trainer.fit(module, dl, dl)

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    heads = {f"val/attention/layer{i}/head{h}" for i in (0, 1) for h in (0, 1)}  # layers=all
    assert set(tags["images"]) == heads  # one image per head: readable in the IMAGES card
    image = events.Images("val/attention/layer1/head1")[0]
    assert 180 <= image.width <= 330 and 180 <= image.height <= 360  # 13 tokens: 180 px maps
    assert "sample" in tags["tensors"]  # the text sample, named as what it is
    assert not [t for t in tags["tensors"] if t.endswith("text_summary")]
    sample = events.Tensors("sample")[0].tensor_proto.string_val[0].decode()
    settings, body = sample.split("\n\n", 1)
    assert settings == (
        "prompt `'First'` · temperature 0.8 · top_k 200 · max_new_tokens 10 · seed 1337"
    )
    assert body.strip().startswith("First")


class _Weights(L.Callback):
    """The model's weights at each validation, for the samples drawn off the training thread."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.at[trainer.global_step] = {
            k: v.detach().clone() for k, v in pl_module.model.state_dict().items()
        }


@pytest.mark.slow
def test_callbacks_work_off_the_training_thread(tmp_path: Path, char_tokenizer: Any) -> None:
    """Heat maps and samples are drawn on background threads while training goes on: each
    validation's images and sample are there at the end, the sample of the weights at its
    step (a copy: the optimizer goes on changing the model's own)."""
    import threading

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tok = _fitted(char_tokenizer)
    module = GPTLitModule(model={**TINY, "vocab_size": tok.vocab_size}, optim=OPTIM)
    module.tokenizer = tok
    sample, attention, weights = (
        SampleTextCallback(max_new_tokens=12),
        AttentionHeatmapCallback(),
        _Weights(),
    )
    threads: set[str] = set()
    for callback, name in ((sample, "sample"), (attention, "draw")):
        work = getattr(callback, name)

        def traced(*args: Any, work: Any = work) -> None:
            threads.add(threading.current_thread().name)
            work(*args)

        setattr(callback, name, traced)
    trainer = _trainer(tmp_path, 6, [sample, attention, weights], val_check_interval=2)
    dl = _loader(tok)
    trainer.fit(module, dl, dl)

    assert threads and threading.main_thread().name not in threads
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    for head in (0, 1):
        assert [e.step for e in events.Images(f"val/attention/layer0/head{head}")] == [2, 4, 6]
    samples = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("sample")}
    assert sorted(samples) == sorted(weights.at) == [2, 4, 6]
    for step, state in weights.at.items():
        module.model.load_state_dict(state)
        ids = tok.encode(sample.prompt)
        out = module.model.generate(
            torch.tensor([ids]), 12, temperature=0.8, top_k=200, seed=sample.seed
        )
        assert samples[step] == sample.markdown(tok, ids, out[0].tolist())
    assert weights.at[2]["lm_head.weight"].ne(weights.at[6]["lm_head.weight"]).any()


def test_callbacks_are_noops_without_tensorboard(
    tmp_path: Path, char_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nowhere to write, the callbacks neither sample nor draw attention (the work they
    would throw away), and nothing lands in the run folder."""
    calls: list[str] = []
    for name in ("generate", "attention_maps"):
        real = getattr(GPT, name)

        def spy(self: GPT, *args: Any, _name: str = name, _real: Any = real, **kw: Any) -> Any:
            calls.append(_name)
            return _real(self, *args, **kw)

        monkeypatch.setattr(GPT, name, spy)
    tok = _fitted(char_tokenizer)
    module = GPTLitModule(model={**TINY, "vocab_size": tok.vocab_size}, optim=OPTIM)
    module.tokenizer = tok
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SampleTextCallback(), AttentionHeatmapCallback()],
        default_root_dir=tmp_path,
    )
    dl = _loader(tok)
    trainer.fit(module, dl, dl)
    assert (
        trainer.global_step == 2
        and trainer.fit_loop.epoch_loop.val_loop.batch_progress.total.completed == 1
    )
    assert calls == [] and list(tmp_path.iterdir()) == []


# -- Hydra entry point ------------------------------------------------------------------------


def _verdict(tmp_path: Path) -> Path:
    """A small real corpus (shipped in tests/data/), in the test's own folder."""
    path = tmp_path / "the-verdict.txt"
    path.write_bytes(VERDICT.read_bytes())
    return path


def _overrides(tmp_path: Path, corpus: Path) -> list[str]:
    return [
        *tiny_overrides(tmp_path, corpus, batch_size=8),
        "data.stride=16",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "optim.warmup_steps=2",
        "callbacks.sample_text.max_new_tokens=8",
    ]


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, *args: Any) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.slow
def test_logged_train_metrics_are_of_their_step_and_tokens_per_sec_survives_validation(
    tmp_path: Path,
) -> None:
    """Each logged train/loss is the loss of the step it is plotted at (not a value left from
    an earlier step), and validation only pauses the throughput clock: with equal log and val
    intervals every logging step follows a validation, and tokens/s is still logged on each."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from llm.cli.train import train

    out = tmp_path / "run"
    keep = ("trainer.val_check_interval", "trainer.log_every_n_steps", "callbacks.sample_text")
    overrides = [o for o in _overrides(tmp_path, _verdict(tmp_path)) if not o.startswith(keep)]
    overrides += [
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=2",
        "callbacks.sample_text=null",
        "callbacks.attention=null",
        f"+callbacks.losses._target_={__name__}._Losses",
        f"output_dir={out}",
    ]
    result = train(compose("train", overrides))
    per_step = next(c for c in result["trainer"].callbacks if isinstance(c, _Losses)).losses
    events = EventAccumulator(str(out))
    events.Reload()
    # train and val points on one numbering: optimizer steps taken (0, 2, 4; the final 6 is
    # only validated), the train loss being that of the batch that step trained on
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [0, 2, 4]
    assert [e.value for e in logged] == pytest.approx([per_step[0], per_step[2], per_step[4]])
    assert [e.step for e in events.Scalars("val/loss")] == [0, 2, 4, 6]
    assert [e.step for e in events.Scalars("train/grad_norm")] == [0, 2, 4]
    logged = events.Scalars("train/tokens_per_sec")
    assert [e.step for e in logged] == [2, 4] and all(e.value > 0 for e in logged)
    assert "epoch" not in events.Tags()["scalars"]


@pytest.mark.slow
def test_train_yaml_composes_for_every_experiment_and_trainer() -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for exp in ("shakespeare_char_cpu", "shakespeare_char", "shakespeare_gpt2"):
            cfg = compose("train", overrides=[f"experiment={exp}", "output_dir=/tmp/x"])
            assert cfg.trainer.max_steps > 0 and cfg.optim.lr > cfg.optim.min_lr
            assert cfg.data.block_size == cfg.model.block_size
        for trainer in ("cpu", "gpu", "ddp", "fsdp", "ddp_cpu"):
            cfg = compose("train", overrides=[f"trainer={trainer}", "output_dir=/tmp/x"])
            assert cfg.trainer._target_ == "lightning.Trainer"
        cfg = compose("train", overrides=["output_dir=/tmp/x"], return_hydra_config=True)
        assert cfg.hydra.job.chdir is False


def test_validate_rejects_bad_settings() -> None:
    from omegaconf import OmegaConf

    from llm.training.pretrain import Pretrain

    validate = Pretrain().validate
    ok = {
        "trainer": {"max_steps": 5},
        "model": {"_target_": "llm.model.GPTConfig", "block_size": 32},
        "data": {"block_size": 32},
        "optim": OPTIM,
        "seed": 1,
    }
    validate(OmegaConf.create(ok))
    with pytest.raises(ValueError, match="max_steps"):
        validate(OmegaConf.create({**ok, "trainer": {"max_steps": -1}}))
    with pytest.raises(ValueError, match=r"data.block_size=64 > model.block_size=32"):
        validate(OmegaConf.create({**ok, "data": {"block_size": 64}}))


@pytest.mark.slow
def test_train_function_runs_and_checkpoint_rebuilds(tmp_path: Path) -> None:
    from llm.cli.train import train

    out = tmp_path / "run"
    corpus = _verdict(tmp_path)
    overrides = [*_overrides(tmp_path, corpus), f"output_dir={out}"]
    cfg = compose("train", overrides)
    result = train(cfg)

    assert math.isfinite(result["best_val_loss"])
    assert math.isfinite(float(result["trainer"].callback_metrics["train/loss"]))
    last = Path(result["last_model_path"])
    assert last.is_file() and Path(result["best_model_path"]).is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out))  # the events live in the run folder itself
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/lr/adamw", "train/grad_norm", "val/loss"):
        assert tag in tags["scalars"], tag
    # one lr curve per optimizer, in the train group; no epoch
    assert not {"epoch", "train/lr", "train/lr/decay", "lr/adamw"} & set(tags["scalars"])
    assert [e.step for e in events.Scalars("val/loss")] == [0, 3, 6]  # before, after 3 and 6
    best = min(e.value for e in events.Scalars("val/loss")[1:])  # of the trained model
    assert events.Scalars("whole_run/best_val_loss")[0].value == pytest.approx(best, abs=1e-6)
    assert result["best_val_loss"] == pytest.approx(best, abs=1e-6)
    # a sample of each validation, the untrained model's (step 0) included
    assert [e.step for e in events.Tensors("sample")] == [0, 3, 6]
    # the heat maps of each validation, the untrained model's (step 0) included, of the
    # default 20 tokens: as wide as an IMAGES card at most (its labels at full size)
    images = events.Images("val/attention/layer0/head0")
    assert [e.step for e in images] == [0, 3, 6]
    assert cfg.callbacks.attention.max_tokens == 20 and 240 < images[0].width <= 330
    # the HPARAMS tab: the overridden keys first, never paths or Hydra's keys, four metrics
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    names = [h.name for h in exp.experiment.hparam_infos]
    assert not [n for n in names if n.endswith(("path", "_dir", "_target_", "_partial_"))]
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["model.n_layer"].number_value == 2 and hp["model.n_embd"].number_value == 64
    assert hp["optim.lr"].number_value == pytest.approx(cfg.optim.lr)
    assert hp["data.batch_size"].number_value == 8 and hp["seed"].number_value == cfg.seed
    assert [m.name.tag for m in exp.experiment.metric_infos] == [
        "whole_run/best_val_loss",
        "whole_run/final_train_loss",
        "whole_run/tokens_per_sec",
        "whole_run/params",
    ]

    raw = torch.load(last, map_location="cpu", weights_only=True)
    assert raw["global_step"] == 6
    reloaded = GPTLitModule.load_from_checkpoint(last, weights_only=True)
    assert reloaded.tokenizer is not None
    assert reloaded.tokenizer.vocab_size == reloaded.config.vocab_size
    module = result["module"].cpu().eval()
    x = torch.tensor([reloaded.tokenizer.encode(corpus.read_text(encoding="utf-8")[:16])])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(x)[0], module(x)[0])

    # resume: the step counter, optimizer and schedule continue from the checkpoint
    resume = [*overrides, f"ckpt_path={last}", "trainer.max_steps=9"]
    resume.append(f"output_dir={tmp_path / 'resumed'}")
    resumed = train(compose("train", resume))
    assert resumed["trainer"].global_step == 9
    assert math.isfinite(resumed["best_val_loss"])

    # resuming another architecture or tokenizer fails before training, naming what differs
    for override, message in [
        ("model.n_layer=3", r"model.n_layer: checkpoint 2, this run 3"),
        ("tokenizer=gpt2", r"model.vocab_size: .*\n  tokenizer: checkpoint 'char'"),
    ]:
        with pytest.raises(ValueError, match=message):
            train(compose("train", [*resume, override]))


@pytest.mark.slow
def test_cli_subprocess_run(tmp_path: Path) -> None:
    overrides = [*_overrides(tmp_path, _verdict(tmp_path)), "trainer.max_steps=3"]
    proc = run_cli("train", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = list((tmp_path / "logs" / "train" / "runs").glob("*/checkpoints/last.ckpt"))
    assert len(ckpts) == 1


@pytest.mark.slow
def test_compile_trains_and_checkpoints_plain_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`compile=true`: the compiled model trains, and checkpoints hold the eager module's keys."""
    from llm.checkpoint import load_checkpoint
    from llm.cli.train import train

    overrides = [
        *_overrides(tmp_path, _verdict(tmp_path)),
        "compile=true",
        "trainer.max_steps=3",
        "trainer.limit_val_batches=0",
        "callbacks.sample_text=null",
        "callbacks.attention=null",
        f"output_dir={tmp_path / 'run'}",
    ]
    compiled: list[torch.nn.Module] = []
    real_compile = torch.compile

    def spy(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        compiled.append(model)
        return real_compile(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    result = train(compose("train", overrides))
    module = result["module"]
    assert compiled == [module.model] and result["trainer"].global_step == 3
    last = result["last_model_path"]
    keys = torch.load(last, map_location="cpu", weights_only=True)["state_dict"].keys()
    assert keys == module.state_dict().keys() and not any("_orig_mod" in k for k in keys)
    reloaded = load_checkpoint(last)  # eager, no compile needed to use it
    x = torch.randint(0, reloaded.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x)[0], module.eval()(x)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_hparams_lead_with_the_overridden_keys(tmp_path: Path, llm_main: Any) -> None:
    """Through `llm train`: HPARAMS starts with what the command line set (a sweep's axes),
    group choices by name, and holds no path; the run folder is named by the overrides."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    args = [*_overrides(tmp_path, _verdict(tmp_path)), "optim.lr=0.002", "trainer.max_steps=2"]
    assert llm_main("train", *args) == 0
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    # the date, then the overrides (Hydra sorts them; paths left out), cut after whole ones
    label = re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_(.*),\+(\d+)", run.name)
    assert label and label.group(1) == "callbacks.sample_text.max_new_tokens=8,data.batch_size=8"
    events = EventAccumulator(str(run))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    names = [h.name for h in exp.experiment.hparam_infos]
    assert names[:4] == ["model", "tokenizer", "data", "data.batch_size"]
    assert "optim.lr" in names[:12] and "data.path" not in names and "paths.data_dir" not in names
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["model"].string_value == "tiny" and hp["optim.lr"].number_value == 0.002
