"""``llm inspect ckpt_path=... 'prompt=...'``: look inside a model on a prompt.

The views (:mod:`llm.inspection`): the top next tokens at each position, the logit lens, every
head's attention, head and block ablation, and activation patching between ``prompt=`` and
``corrupt=``. A text summary goes to stdout (``json=true``: one JSON object instead); the
figures go to ``out_dir`` as PNGs and TensorBoard images, with the JSON as ``inspect.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from llm import checks
from llm.cli.app import (
    beside_model,
    hydra_app,
    load_model_source,
    model_source,
    read_free_text,
    resolve_device,
)

VIEWS = ("next_token", "lens", "attention", "ablation", "patching")


def chosen_views(cfg: DictConfig) -> list[str]:
    """The views to run: ``all`` is every view, patching only when ``corrupt=`` is set."""
    views = cfg.views
    if views == "all":
        return [v for v in VIEWS if v != "patching" or cfg.corrupt is not None]
    listed = OmegaConf.to_container(views) if OmegaConf.is_list(views) else [views]
    names = [str(v) for v in listed]  # type: ignore[union-attr]
    unknown = [v for v in names if v not in VIEWS]
    if unknown or not names:
        raise ValueError(f"views={views}: choose all or a list of {', '.join(VIEWS)}")
    return names


def out_dir(cfg: DictConfig, key: str, value: str) -> Path:
    """``out_dir``, else the checkpoint's run folder's inspect/ (or the init folder's)."""
    if cfg.out_dir is not None:
        return Path(str(cfg.out_dir))
    return beside_model(key, value, "inspect", "out_dir")


def val_batches(cfg: DictConfig, model: Any, tokenizer: Any) -> list[Any]:
    """The first ``limit_batches`` batches of the data's validation split, read with the
    model's tokenizer and context: the batches ``llm evaluate`` scores."""
    import hydra

    checks.data_path(cfg.data)
    data = cfg.data.copy()
    with open_dict(data):
        if data.get("block_size") is None:
            data.block_size = int(model.config.block_size)
    dm = hydra.utils.instantiate(data, tokenizer=tokenizer)
    dm.prepare_data()
    dm.setup("validate")
    batches = []
    for i, batch in enumerate(dm.val_dataloader()):
        if cfg.limit_batches is not None and i >= int(cfg.limit_batches):
            break
        batches.append(batch)
    if not batches:
        raise ValueError("split=val: the validation split is empty: nothing to score")
    return batches


def check_settings(cfg: DictConfig, views: list[str]) -> None:
    """Refuse a wrong setting of the chosen views before the model is loaded."""
    checks.integer("top_k", cfg.top_k, minimum=1, example=5)
    if "ablation" in views:
        if cfg.split not in ("prompt", "val"):
            raise ValueError(f"split={cfg.split}: choose prompt or val")
        checks.integer("limit_batches", cfg.limit_batches, minimum=1, nullable=True, example=4)
    missing = [key for key in ("corrupt", "answer", "wrong") if cfg.get(key) is None]
    if "patching" in views and missing:
        raise ValueError(
            f"views=patching needs {', '.join(f'{m}=' for m in missing)}: e.g. "
            "corrupt='<the prompt with one fact changed>' answer=' Mary' wrong=' John'"
        )


def run_views(cfg: DictConfig, lm: Any, ids: list[int], views: list[str]) -> dict[str, dict]:
    """Each chosen view's result, by view name."""
    from llm import inspection
    from llm.inspection.ablation import prompt_batches

    check_settings(cfg, views)
    model, tok, k = lm.model, lm.tokenizer, int(cfg.top_k)
    results: dict[str, dict] = {}
    if "next_token" in views:
        results["next_token"] = inspection.next_token(model, tok, ids, k)
    if "lens" in views:
        results["lens"] = inspection.logit_lens(model, tok, ids, k)
    if "attention" in views:
        results["attention"] = inspection.attention(model, tok, ids)
    if "ablation" in views:
        batches = prompt_batches(ids) if cfg.split == "prompt" else val_batches(cfg, model, tok)
        results["ablation"] = {"split": str(cfg.split), **inspection.head_ablation(model, batches)}
    if "patching" in views:
        corrupt = inspection.encode(model, tok, str(cfg.corrupt), key="corrupt")
        answer = inspection.single_token(tok, str(cfg.answer), "answer")
        wrong = inspection.single_token(tok, str(cfg.wrong), "wrong")
        results["patching"] = inspection.activation_patching(
            model, tok, ids, corrupt, answer, wrong
        )
    return results


@hydra_app("inspect")
def main(cfg: DictConfig) -> dict[str, dict]:
    """Load, run the views, write the figures and JSON, print the summary (or the JSON)."""
    from llm.inspection import encode
    from llm.inspection.drawing import write_figures
    from llm.io import atomic_open

    key, value = model_source(cfg)
    views = chosen_views(cfg)
    check_settings(cfg, views)
    prompt = read_free_text(cfg, "prompt")
    folder = out_dir(cfg, key, value)
    device = resolve_device(str(cfg.device))
    lm = load_model_source(key, value, device)
    ids = encode(lm.model, lm.tokenizer, prompt)
    results = run_views(cfg, lm, ids, views)
    written = write_figures(results, folder, tensorboard=bool(cfg.tensorboard))
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_open(folder / "inspect.json", "w") as f:
        json.dump({key: value, "prompt": prompt, **results}, f)
    written.append(folder / "inspect.json")
    if cfg.json:
        print(json.dumps({key: value, "prompt": prompt, **results}))
    else:
        print(summary(results, f"{'checkpoint' if key == 'ckpt_path' else 'init'}: {value}"))
        print("wrote: " + ", ".join(str(p) for p in written))
    return results


def _cell(piece: str, width: int = 6) -> str:
    from llm.heatmaps import visible

    shown = visible(piece)
    return (shown if len(shown) <= width else shown[: width - 1] + "…").ljust(width)


def summary(results: dict[str, dict], header: str) -> str:
    """The views as text: tables a terminal shows."""
    from llm.heatmaps import visible

    lines = [header]
    if "next_token" in results:
        r = results["next_token"]
        lines += ["", f"next token: the top {r['k']} after each token; what came, its rank"]
        for pos in r["positions"]:
            came = pos.get("next")
            said = f"{_cell(came['token'])} {came['prob']:.3f} #{came['rank']:<4}" if came else ""
            top = "  ".join(f"{_cell(t['token'])} {t['prob']:.3f}" for t in pos["top"])
            lines.append(f"  {pos['position']:>3} {_cell(pos['token'])} came {said:<20} top {top}")
    if "lens" in results:
        r = results["lens"]
        width = max(len(p) for p in r["points"])
        lines += ["", "logit lens: the top next token after each block (last: the model's own)"]
        lines.append(f"  {'token':<{width}}  " + " ".join(_cell(t, 4) for t in r["tokens"]))
        for point, row in reversed(list(zip(r["points"], r["top"], strict=True))):
            cells = " ".join(_cell(cell[0]["token"], 4) for cell in row)
            lines.append(f"  {point:<{width}}  {cells}")
    if "attention" in results:
        maps = results["attention"]["maps"]
        lines += ["", f"attention: {len(maps)} layers x {len(maps[0])} heads (figures below)"]
    if "ablation" in results:
        r = results["ablation"]
        lines += [
            "",
            f"ablation on the {'prompt' if r['split'] == 'prompt' else 'val split'} "
            f"({r['tokens_scored']} tokens): base loss "
            f"{r['base']:.4f}; loss increase with one head zeroed (layer x head):",
        ]
        lines += [
            f"  layer {i:<3} " + " ".join(f"{v:+.4f}" for v in row)
            for i, row in enumerate(r["increase"])
        ]
        lines.append(
            "  loss increase with every head of a layer zeroed, and with its block removed:"
        )
        lines += [
            f"  layer {i:<3} {a - r['base']:+.4f}  {b - r['base']:+.4f}"
            for i, (a, b) in enumerate(zip(r["layers"], r["blocks"], strict=True))
        ]
    if "patching" in results:
        r = results["patching"]
        lines += [
            "",
            f"activation patching: logit({visible(r['answer'])}) - logit({visible(r['wrong'])}) "
            f"clean {r['clean_diff']:.4f}, corrupt {r['corrupt_diff']:.4f}; restored share "
            "(1: all of it) per point x position:",
        ]
        lines.append("  " + " " * 12 + " ".join(_cell(t, 5) for t in r["tokens"]))
        for point, row in reversed(list(zip(r["points"], r["effect"], strict=True))):
            lines.append(f"  {point:<12}" + " ".join(f"{v:+5.2f}" for v in row))
    return "\n".join(lines)
