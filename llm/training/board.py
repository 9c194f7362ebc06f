"""What TensorBoard opens on for a run: a custom-scalars layout (loss, optimization, speed) and
the HPARAMS session (the hyperparameters, the command line's first, and the run's end figures).

TensorBoard's HPARAMS reads each metric's value from the run's last *scalar* event of that tag:
a metric with no scalar shows an empty cell. The end-of-run figures are therefore scalars too,
written once at the run's last step under ``whole_run/``, a group that sorts after ``train/`` and
``val/`` in TIME SERIES and SCALARS, and the layout gives them their own category.
"""

from __future__ import annotations

import time
from typing import Any

# the end-of-run figures (tag: name shown in HPARAMS); finetunes add their test metrics
END = "whole_run/"
END_METRICS = {
    f"{END}best_val_loss": "best val loss",
    f"{END}final_train_loss": "final train loss",
    f"{END}tokens_per_sec": "tokens/s (training time)",
    f"{END}params": "parameters",
}
BENCHMARK = "val/mc_acc"  # HPARAMS lists its last value when the run scored a benchmark


def layout(mfu: bool) -> dict[str, dict[str, list[Any]]]:
    """The CUSTOM SCALARS layout (category -> chart -> ["Multiline", tag regexes]); ``mfu``:
    the device's peak FLOP/s is known, so ``train/mfu`` is logged."""
    speed: dict[str, list[Any]] = {"tokens/s": ["Multiline", ["train/tokens_per_sec"]]}
    if mfu:
        speed["MFU"] = ["Multiline", ["train/mfu"]]
    return {
        "loss": {"train and val loss": ["Multiline", ["train/loss", "val/loss"]]},
        "optimization": {
            "learning rate": ["Multiline", [r"train/lr/.*"]],
            "gradient norm (before clipping)": ["Multiline", ["train/grad_norm"]],
        },
        "speed": speed,
        "whole run": {name: ["Multiline", [tag]] for tag, name in END_METRICS.items()},
    }


def writers(loggers: list[Any]) -> list[Any]:
    """The SummaryWriter of each TensorBoardLogger among ``loggers``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    return [lg.experiment for lg in loggers if isinstance(lg, TensorBoardLogger)]


def write_layout(loggers: list[Any], mfu: bool) -> None:
    """Write the layout once per run (at its start; a resumed run keeps the first one)."""
    for writer in writers(loggers):
        writer.add_custom_scalars(layout(mfu))


def session(params: dict[str, Any], metrics: dict[str, str], first: list[str]) -> list[Any]:
    """The hparams plugin's three summaries (experiment, session start, session end).

    ``params``: flat plain values (None left out: HPARAMS shows no value rather than "None");
    ``metrics``: tag -> name shown; ``first``: the keys the command line set, marked
    ``differs``: TensorBoard lists those first and ticks only the first five it lists.
    """
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    infos, start = [], plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, bool):
            start.hparams[key].bool_value, kind = value, "DATA_TYPE_BOOL"
        elif isinstance(value, int | float):
            start.hparams[key].number_value, kind = float(value), "DATA_TYPE_FLOAT64"
        else:
            start.hparams[key].string_value, kind = str(value), "DATA_TYPE_STRING"
        infos.append(
            api_pb2.HParamInfo(name=key, type=api_pb2.DataType.Value(kind), differs=key in first)
        )
    experiment = api_pb2.Experiment(
        hparam_infos=infos,
        metric_infos=[
            api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=name)
            for tag, name in metrics.items()
        ],
    )
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
    contents = {
        metadata.EXPERIMENT_TAG: plugin_data_pb2.HParamsPluginData(experiment=experiment),
        metadata.SESSION_START_INFO_TAG: plugin_data_pb2.HParamsPluginData(
            session_start_info=start
        ),
        metadata.SESSION_END_INFO_TAG: plugin_data_pb2.HParamsPluginData(session_end_info=end),
    }
    out = []
    for tag, content in contents.items():
        content.version = metadata.PLUGIN_DATA_VERSION
        plugin = SummaryMetadata.PluginData(
            plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString()
        )
        out.append(
            Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])
        )
    return out


def write_session(
    loggers: list[Any],
    params: dict[str, Any],
    values: dict[str, float],
    first: list[str],
    step: int,
    benchmark: bool = False,
) -> None:
    """HPARAMS' session of the run, and its end figures as scalars at ``step`` (HPARAMS reads a
    metric's value from the scalar of its tag)."""
    names = {tag: END_METRICS.get(tag, tag.removeprefix(END).replace("_", " ")) for tag in values}
    if benchmark:
        names[BENCHMARK] = "benchmark accuracy (last val/mc_acc)"
    for writer in writers(loggers):
        file_writer = writer._get_file_writer()
        for summary in session(params, names, first):
            file_writer.add_summary(summary, step)
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)
        writer.flush()


def write_text(writer: Any, tag: str, text: str, step: int) -> None:
    """Markdown ``text`` under ``tag`` itself: SummaryWriter.add_text appends ``/text_summary``,
    so a sample logged as "sample" showed as ``sample/text_summary``."""
    from torch.utils.tensorboard.summary import text as text_summary

    summary = text_summary(tag, text)
    summary.value[0].tag = tag
    writer._get_file_writer().add_summary(summary, step)
