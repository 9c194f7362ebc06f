"""Local benchmark tasks from the held-out end of a text (tiny shakespeare's last 10% by
default), for tiny models and offline machines.

Writes into ``--out``:

- ``mc.jsonl``: HellaSwag-format rows (``ctx`` = a line's first words, ``endings`` = its true
  rest and the rests of three other lines, ``label``), for
  ``callbacks.multiple_choice.path=`` during training;
- ``local_mc.yaml`` (the same rows as an lm-evaluation-harness multiple-choice task) and
  ``local_ppl.yaml`` (perplexity over the held-out paragraphs, from ``ppl.jsonl``), for
  ``llm evaluate harness.include_path=<out> harness.tasks=[local_mc,local_ppl]``.

    python scripts/make_local_tasks.py [--text data/tinyshakespeare/input.txt] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

MC_YAML = """# lm-evaluation-harness task: written by scripts/make_local_tasks.py
task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
PPL_YAML = """# lm-evaluation-harness task: written by scripts/make_local_tasks.py
task: local_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""


def make_tasks(
    text: str, out: Path, rows: int = 200, paragraphs: int = 20, seed: int = 0
) -> list[Path]:
    """Write mc.jsonl, ppl.jsonl and the two task YAMLs (absolute data paths) into ``out``."""
    held_out = text[int(len(text) * 0.9) :]
    lines = [ln.split() for ln in held_out.splitlines() if len(ln.split()) >= 6]
    if len(lines) < 4:
        raise ValueError("the text's last 10% has fewer than 4 lines of 6 words or more")
    rng = random.Random(seed)
    picked = rng.sample(lines, min(rows, len(lines)))
    split = [(" ".join(w[: len(w) // 2]), " ".join(w[len(w) // 2 :])) for w in picked]
    mc = []
    for i, (ctx, ending) in enumerate(split):
        others = rng.sample([e for j, (_, e) in enumerate(split) if j != i and e != ending], 3)
        label = rng.randrange(4)
        endings = [*others[:label], ending, *others[label:]]
        mc.append({"ctx": ctx, "endings": endings, "label": label})
    paras = [p.strip() for p in held_out.split("\n\n") if len(p.strip()) > 80][:paragraphs]
    out.mkdir(parents=True, exist_ok=True)
    mc_path, ppl_path = (out / "mc.jsonl").resolve(), (out / "ppl.jsonl").resolve()
    mc_path.write_text("".join(json.dumps(r) + "\n" for r in mc), encoding="utf-8")
    ppl_path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paras), encoding="utf-8")
    (out / "local_mc.yaml").write_text(MC_YAML.format(data=mc_path), encoding="utf-8")
    (out / "local_ppl.yaml").write_text(PPL_YAML.format(data=ppl_path), encoding="utf-8")
    return [mc_path, ppl_path, out / "local_mc.yaml", out / "local_ppl.yaml"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", default="data/tinyshakespeare/input.txt")
    parser.add_argument("--out", default="data/local_tasks")
    parser.add_argument("--rows", type=int, default=200, help="multiple-choice questions")
    parser.add_argument("--paragraphs", type=int, default=20, help="perplexity documents")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    text = Path(args.text).read_text(encoding="utf-8")
    for path in make_tasks(text, Path(args.out), args.rows, args.paragraphs, args.seed):
        print(path)


if __name__ == "__main__":
    main()
