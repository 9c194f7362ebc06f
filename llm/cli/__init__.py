"""The ``llm`` command: one verb per stage of the path, each a Hydra app taking overrides.

``llm train model=baby optim.lr=6e-4``, ``llm train -m optim.lr=1e-3,3e-3``,
``llm generate ckpt_path=... prompt="ROMEO:"``; ``python -m llm <verb>`` is the same.
The verbs' modules are imported only when run, so ``llm --help`` costs no torch import.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Verb:
    """A verb: its module (with a Hydra ``main``), config, one-line summary and examples."""

    module: str
    config: str
    summary: str
    description: str
    examples: tuple[str, ...]
    free_text: tuple[str, ...] = ()  # keys whose values are free text (quoted for Hydra)
    # the experiment run when the command line chooses none of RECIPE_GROUPS: `llm train` alone
    # is a recipe, while a user's own groups compose on the groups' clean defaults
    recipe: str | None = None


VERBS: dict[str, Verb] = {
    "train": Verb(
        "llm.cli.train",
        "train",
        "pretrain a GPT (default: nanoGPT's CPU recipe on tiny shakespeare)",
        "Pretrain a GPT from scratch. Every run writes its config, TensorBoard logs and\n"
        "checkpoints to its own folder under logs/train/runs/. With no group chosen on the\n"
        "command line it runs experiment=shakespeare_char_cpu (keys such as optim.lr=\n"
        "change it); choosing model=, tokenizer=, data=, trainer=, optim= or experiment=\n"
        "composes those groups on their own defaults instead.",
        (
            "llm train                                        # experiment=shakespeare_char_cpu",
            "llm train model=baby tokenizer=gpt2 trainer=gpu optim.lr=6e-4",
            "llm train -m optim.lr=3e-4,1e-3 model=tiny,cpu    # a 4-job sweep",
        ),
        recipe="shakespeare_char_cpu",
    ),
    "finetune": Verb(
        "llm.cli.finetune",
        "finetune",
        "finetune a checkpoint or Hugging Face weights: text, classify, instruct, dpo, grpo",
        "Finetune from a llm checkpoint or a Hugging Face folder (init=...): continue\n"
        "pretraining on text, train a classifier, follow instructions, prefer chosen over\n"
        "rejected responses (dpo) or learn from a reward (grpo); lora=default trains LoRA\n"
        "adapters only. Runs land in logs/finetune/runs/.",
        (
            "llm finetune task=text init=logs/train/runs/<date>/checkpoints/last.ckpt "
            "data.path=corpus.txt",
            "llm finetune task=classify init=gpt2 data.path=sms.tsv task.trainable_layers=1",
            "llm finetune task=instruct init=gpt2 data.path=alpaca.json lora=default",
            "llm finetune task=dpo init=last.ckpt data.path=pairs.jsonl task.beta=0.1",
        ),
    ),
    "rl": Verb(
        "llm.cli.rl",
        "rl",
        "reinforcement learning with a verifiable reward (GRPO) from a checkpoint",
        "Sample groups of completions per prompt, score them with a reward function\n"
        "(reward=exact_match, arithmetic, format or your own), and step the policy toward\n"
        "the better ones of each group (GRPO); the same as llm finetune task=grpo. Runs\n"
        "land in logs/rl/runs/.",
        (
            "llm rl init=logs/finetune/runs/<date>/checkpoints/last.ckpt reward=arithmetic",
            "llm rl init=last.ckpt data.path=prompts.jsonl task.group_size=16 task.kl_coef=0.04",
        ),
    ),
    "evaluate": Verb(
        "llm.cli.evaluate",
        "evaluate",
        "val loss, perplexity, bits per char; or lm-evaluation-harness benchmarks",
        "Score a checkpoint on the validation split of a corpus (the one it was trained\n"
        "on by default), with the checkpoint's own tokenizer; or, with harness.tasks, run\n"
        'EleutherAI\'s lm-evaluation-harness on it (pip install -e ".[eval]"). init=<folder>\n'
        "evaluates Hugging Face weights instead of a checkpoint.",
        (
            "llm evaluate ckpt_path=logs/train/runs/<date>/checkpoints/last.ckpt",
            "llm evaluate ckpt_path=last.ckpt data=text_files data.path=other.txt",
            "llm evaluate ckpt_path=last.ckpt harness.tasks=[hellaswag,arc_easy] harness.limit=100",
            "llm evaluate init=gpt2 harness.tasks=[my_task] harness.include_path=tasks/ "
            "harness.output_dir=eval/",
        ),
    ),
    "generate": Verb(
        "llm.cli.generate",
        "generate",
        "sample text from a checkpoint",
        "Sample a continuation of a prompt with the checkpoint's tokenizer and a KV cache.\n"
        "Free text needs no Hydra quoting: prompt=Hello, world! works; prompt_file=<path>\n"
        "(or - for standard input) reads a long prompt.",
        (
            "llm generate ckpt_path=last.ckpt prompt=ROMEO: max_new_tokens=300",
            "llm generate ckpt_path=last.ckpt 'prompt=O Romeo, Romeo!' temperature=0.7 top_p=0.9",
            "echo 'To be, or' | llm generate ckpt_path=last.ckpt prompt_file=-",
        ),
        free_text=("prompt",),
    ),
    "chat": Verb(
        "llm.cli.chat",
        "chat",
        "talk to a checkpoint in the terminal, turn by turn",
        "A multi-turn conversation, replies streamed as they are sampled. Instruction-finetuned\n"
        "checkpoints get the prompt template they trained with, base models continue your\n"
        "text; the KV cache is kept across turns. /reset starts over, /quit (or end of input)\n"
        "exits.",
        (
            "llm chat ckpt_path=logs/finetune/runs/<date>/checkpoints/last.ckpt",
            "llm chat ckpt_path=last.ckpt temperature=0.7 top_p=0.9 max_new_tokens=128",
            "printf 'Name three colours.\\n/quit\\n' | llm chat ckpt_path=last.ckpt",
        ),
        free_text=("system",),
    ),
    "serve": Verb(
        "llm.cli.serve",
        "serve",
        "serve a checkpoint over OpenAI's HTTP API, with a chat page",
        "An OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models,\n"
        "/health) and a chat page at /; concurrent requests share batched decode steps over\n"
        "one KV cache. Listens on 127.0.0.1 unless host= says otherwise; api_key= makes\n"
        "requests send it. Ctrl-C or SIGTERM stops it cleanly. Needs the serve extra.",
        (
            "llm serve ckpt_path=logs/train/runs/<date>/checkpoints/last.ckpt",
            "llm serve init=path/to/hf_folder port=8080 api_key=secret",
            "llm serve ckpt_path=last.ckpt host=0.0.0.0 port=0",
        ),
    ),
    "classify": Verb(
        "llm.cli.classify",
        "classify",
        "label a text with a finetuned classifier",
        "Print the predicted label and its probability for a text (task=classify checkpoints).",
        (
            "llm classify ckpt_path=logs/finetune/runs/<date>/checkpoints/last.ckpt "
            "'text=Claim your free prize now!'",
            "llm classify ckpt_path=last.ckpt text_file=message.txt",
        ),
        free_text=("text",),
    ),
    "inspect": Verb(
        "llm.cli.inspect",
        "inspect",
        "look inside a model: next tokens, logit lens, attention, ablation, patching",
        "On a prompt: the top next tokens at each position, the logit lens (each block's\n"
        "residual stream read through the final norm and head), every head's attention, the\n"
        "loss with each head zeroed (split=val: on the val split) and, with corrupt=, answer=\n"
        "and wrong=, activation patching. Figures (PNG, TensorBoard) and inspect.json go to\n"
        "out_dir (default <run folder>/inspect); json=true prints the JSON.",
        (
            "llm inspect ckpt_path=last.ckpt 'prompt=ROMEO:'",
            "llm inspect ckpt_path=last.ckpt 'prompt=To be, or not' views=[lens,ablation] "
            "split=val",
            "llm inspect init=gpt2 'prompt=When Mary and John went to the store, John gave a "
            "drink to' 'corrupt=When Mary and John went to the store, Mary gave a drink to' "
            "'answer= Mary' 'wrong= John' views=[patching] out_dir=ioi",
        ),
        free_text=("prompt", "corrupt", "answer", "wrong"),
    ),
    "prepare": Verb(
        "llm.cli.prepare",
        "prepare",
        "tokenize a corpus into the token cache",
        "Tokenize a corpus once into data/cache/<corpus>-<tokenizer>/ (reused by training).",
        (
            "llm prepare data=tinyshakespeare tokenizer=gpt2",
            "llm prepare data=text_files data.path=my_corpus/ tokenizer=char",
        ),
    ),
    "tokenize": Verb(
        "llm.cli.tokenize",
        "tokenize",
        "show how a tokenizer splits a text",
        "Print the ids and pieces of a text under any tokenizer.",
        (
            "llm tokenize tokenizer=o200k_base 'text=we are building an agi'",
            "llm tokenize tokenizer=bpe tokenizer.vocab_size=512 "
            "fit_on=data/tinyshakespeare/input.txt 'text=To be, or not to be'",
        ),
        free_text=("text",),
    ),
    "report": Verb(
        "llm.cli.report",
        "report",
        "table and plots of a sweep's runs",
        "Rank the runs under a folder (a sweep, logs/, or one run) by best val loss (or by a\n"
        "benchmark logged during training); write report.md, report.csv and the val-loss\n"
        "curves into <dir>/report/.",
        (
            "llm report dir=logs/train/multiruns/<date>",
            "llm report dir=logs out=reports/all",
            "llm report dir=logs/train/multiruns/<date> sort=val/mc_acc_norm",
        ),
    ),
    "export": Verb(
        "llm.cli.export",
        "export",
        "merge LoRA adapters; write a Hugging Face folder",
        "Fold a LoRA checkpoint's adapters into plain weights (out=...), and/or write a\n"
        "language model as a Hugging Face folder (hf_dir=...). An existing out or hf_dir is\n"
        "replaced only with overwrite=true; the input checkpoint never is.",
        (
            "llm export ckpt_path=logs/finetune/runs/<date>/checkpoints/last.ckpt out=merged.ckpt",
            "llm export ckpt_path=last.ckpt hf_dir=my-gpt2/",
            "llm export ckpt_path=last.ckpt hf_dir=my-gpt2/ overwrite=true",
        ),
    ),
}


def usage() -> str:
    """``llm --help``: the verbs, one line each."""
    width = max(map(len, VERBS))
    lines = [
        "usage: llm <verb> [key=value ...] [-m] [--help]",
        "",
        "A GPT from scratch: pretrain, finetune, evaluate and sample it; every setting is a",
        "Hydra override (group=option or key=value).",
        "",
        "verbs:",
        *(f"  {name:<{width}}  {verb.summary}" for name, verb in VERBS.items()),
        "",
        "`llm <verb> --help` shows a verb's examples and config groups.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llm`` console script and of ``python -m llm``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    verb = VERBS.get(name)
    if verb is None:
        print(f"llm: unknown verb {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        from llm.cli.help import verb_help

        print(verb_help(name, verb))
        return 0
    from llm.cli import sweep
    from llm.cli.app import debug, report_error, run_verb, with_recipe

    sweep.swept = None
    try:
        module = importlib.import_module(verb.module)
        result = run_verb(module.main, with_recipe(verb.recipe, rest), verb.free_text)
    except KeyboardInterrupt as e:  # a message says what was kept and how to resume
        print(str(e) or "Interrupted.", file=sys.stderr)
        return int(getattr(e, "exit_code", 130))
    except Exception as e:
        if debug():
            raise
        print(report_error(e, name), file=sys.stderr)
        return 1
    finally:
        if sweep.swept is not None:  # a -m sweep ends with its jobs' table, failed ones too
            sweep.print_sweep_report(sweep.swept)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
