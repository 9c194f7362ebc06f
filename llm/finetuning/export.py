"""Merge LoRA adapters into plain weights.

`python -m llm.finetuning.export ckpt_path=.../last.ckpt out=merged.ckpt [hf_dir=gpt2-ft/]`
writes a checkpoint that loads without LoRA (and, for LM tasks, a Hugging Face GPT-2 folder).
"""

from __future__ import annotations

import sys
from pathlib import Path

from llm.finetuning.checkpoint import export_merged, load_finetuned


def main(argv: list[str] | None = None) -> Path:
    """Parse key=value arguments (ckpt_path, out, hf_dir), export, print where it went."""
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv) if "=" in a)
    if "ckpt_path" not in args or "out" not in args:
        raise SystemExit(
            "usage: python -m llm.finetuning.export ckpt_path=... out=... [hf_dir=...]"
        )
    out = export_merged(args["ckpt_path"], args["out"])
    print(f"merged checkpoint: {out}")
    if args.get("hf_dir"):
        module = load_finetuned(out)
        if hasattr(module, "head"):
            raise SystemExit("hf_dir= exports language models only, not classifiers")
        print(f"Hugging Face folder: {module.model.save_pretrained(args['hf_dir'])}")
    return out


if __name__ == "__main__":
    main()
