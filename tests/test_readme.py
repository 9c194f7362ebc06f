"""The README is a test: every command in its code blocks, each `llm ...` command with settings
in its text, and each `$ command` transcript runs as written, in README order, so the README
cannot drift from the code again (issue 19: its own `'prompt=Hello, "world"!'` example failed on
the default char model, whose vocabulary has no `"`).

What the test adds to a command is listed here and nowhere else: overrides that cut its time
(SHORT), local stand-ins for Hub downloads (OFFLINE), the files the commands name (made in the
working folder, as a reader would have them), and the values of placeholders such as `<run>`
(taken from the runs the commands before it made). Commands that cannot run offline on a CPU
are skipped for a reason said here: programs in SKIPPED_PROGRAMS, commands in SKIPPED_COMMANDS,
and `llm` commands whose composed config needs a GPU or the Hugging Face Hub (those are still
composed, so a wrong key in them fails too). A command that is neither run nor skipped fails the
quick test below. Each command runs in a process of its own, forked from one that imported
torch and Lightning once (helpers.CliServer), with its words split as a shell splits them.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import ROOT, SHAKESPEARE, TEXT, CliServer, compose, hf_gpt2_dir, write_jsonl

README = ROOT / "README.md"

# a command's first words -> why the test does not run it
SKIPPED_PROGRAMS = {
    "git clone": "clones the repository over the network",
    "python3 -m venv": "makes a virtual environment (the test runs in one)",
    "pip install": "installs from the package index",
    "python -m pytest": "the test suite itself",
    "tensorboard": "a server that runs until stopped",
    "llm serve": "a server that runs until stopped: tests/test_serve.py starts the command, "
    "talks to it (curl's requests, the openai client, a browser) and stops it",
    "curl": "a request to the `llm serve` above, which the test does not start",
    "python scripts/ladder.py": "twelve llm runs, minutes each: its rungs' commands are tested "
    "in tests/test_dpo.py and tests/test_grpo.py, its table measured in docs/post_training.md",
    "torchrun": "two nodes of one run, started together: tests/test_multinode.py runs the "
    "README's two torchrun commands",
    "sbatch": "needs a SLURM cluster: tests/test_multinode.py runs its step with SLURM's "
    "variables and a fake scontrol",
    "python scripts/screenshots.py": "trains a run and a sweep and drives a browser for minutes: "
    "tests/test_screenshots.py shoots a tiny run with it where Playwright and Chromium are",
}
# a command, exactly as the README shows it -> why the test does not run it
SKIPPED_COMMANDS = {
    "llm train experiment=shakespeare_char_cpu trainer=ddp_cpu": "its ranks are two more "
    "interpreters, a third of this test's time: tests/test_ddp_cpu.py runs this command",
    "llm export ckpt_path=<run>/checkpoints/last.ckpt out=<run>/checkpoints/last-single.ckpt": (
        "consolidates a sharded run's checkpoint folder, which no README command before it "
        "makes: tests/test_fsdp.py runs it on a trainer=fsdp_cpu run"
    ),
    "llm generate ckpt_path=<run>/checkpoints/last-single.ckpt": "reads the export above: "
    "tests/test_fsdp.py loads what it exports as generate does",
}
GPU = "trains on a GPU (the tests run on the CPU)"
HUB_DATA = "streams its corpus from the Hugging Face Hub"
HARNESS = "lm-evaluation-harness downloads each task's data from the Hugging Face Hub"

# overrides that cut a command's time, added to it (or replacing its own value of the key)
STEPS = ("trainer.max_steps", "trainer.val_check_interval")
FIT = ("trainer.limit_val_batches=1", "callbacks.sample_text=null", "callbacks.attention=null")
SHORT: dict[str, tuple[str, ...]] = {
    "train": FIT,
    "finetune": FIT,
    "rl": (*FIT, "task.group_size=2", "task.max_new_tokens=4", "data.val_limit=2"),
    "generate": ("max_new_tokens=24",),
    "chat": ("max_new_tokens=24",),
    "evaluate": ("limit_batches=2",),
}
SHORT_WHEN = {  # a setting on the command line -> more overrides
    "hparams_search": ("hydra.sweeper.n_trials=2",),
    "task=instruct": ("task.max_new_tokens=4",),
}
# settings that would download from the Hub -> what the test gives instead (made in `inputs`)
OFFLINE = {"init=gpt2": "init={gpt2}"}  # a random GPT-2 of the Hub's layout and vocabulary
STDIN = {"chat": "Hello\n/quit\n"}
# what a successful command of each verb prints
PRINTS = {
    "train": "Best val/loss:",
    "finetune": "Best val/loss:",
    "rl": "val/accuracy:",
    "generate": "tokens/s",
    "chat": "",  # its standard output holds the reply only (checked below)
    "evaluate": "val_loss:",
    "classify": "",  # a label of sms.tsv and its probability (checked below)
    "inspect": "wrote:",
    "export": "",  # checked by the files it writes
    "tokenize": "pieces:",
    "prepare": "token cache",
    "report": "report.csv",
    "--help": "llm",
}


@dataclass(frozen=True)
class Command:
    """One command of the README: its text as shown (comment dropped) and where it is."""

    text: str
    line: int
    kind: str  # bash | inline | transcript | python
    expected: tuple[str, ...] = ()  # a transcript's output lines

    @property
    def id(self) -> str:
        return f"L{self.line}:{self.text[:60]}"


def _drop_comment(line: str) -> str:
    """The line without its `# comment` (a `#` after a blank, outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str) -> list[Command]:
    """The README's commands in order: ```bash lines, ```python blocks, `$ ` transcripts in
    plain ``` blocks, and inline `llm ...` spans with a setting (`key=value` or `--help`)."""
    commands: list[Command] = []
    block: list[tuple[int, str]] | None = None
    lang = ""
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if block is None:
                block, lang = [], line[3:].strip()
                continue
            commands += _block_commands(lang, block)
            block = None
        elif block is not None:
            block.append((number, line))
        else:
            for span in re.findall(r"`([^`]+)`", line):
                words = span.split()
                if words[0] == "llm" and any("=" in w or w == "--help" for w in words[1:]):
                    commands.append(Command(span, number, "inline"))
    return commands


def _block_commands(lang: str, block: list[tuple[int, str]]) -> list[Command]:
    if lang == "python":
        return [Command("\n".join(line for _, line in block), block[0][0], "python")]
    if lang == "bash":
        commands, pending, start = [], "", 0
        for number, line in block:
            start = start or number
            pending += _drop_comment(line)
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            if pending.strip():
                commands.append(Command(pending.strip(), start, "bash"))
            pending, start = "", 0
        return commands
    commands = []
    for number, line in block:  # a transcript: `$ command`, then what it prints
        if line.startswith("$ "):
            commands.append(Command(line[2:].strip(), number, "transcript"))
        elif commands:
            last = commands[-1]
            commands[-1] = Command(last.text, last.line, last.kind, (*last.expected, line))
    return commands


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


def _sweeps(argv: list[str]) -> list[tuple[str, list[str]]]:
    """The overrides of a `-m` command with their values (one value for a plain one)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for arg in argv[2:]:
        if arg.startswith("-"):
            continue
        override = parser.parse_override(arg)
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else []
        out.append((arg, values or [arg.partition("=")[2]]))
    return out


def _composed(argv: list[str]) -> object:
    """The config `llm <verb> ...` runs with (a sweep's first job)."""
    from llm.cli import VERBS
    from llm.cli.app import quote_free_text

    verb = VERBS[argv[1]]
    overrides = [arg for arg in argv[2:] if not arg.startswith("-")]
    if "-m" in argv:
        overrides = [f"{arg.partition('=')[0]}={values[0]}" for arg, values in _sweeps(argv)]
    overrides = [quote_free_text(a, verb.free_text) for a in overrides]
    return compose(verb.config, overrides)


def skip_reason(command: Command) -> str | None:
    """Why the test does not run ``command`` (None: it runs); an error for a command it does
    not know how to run."""
    for program, reason in SKIPPED_PROGRAMS.items():
        if command.text == program or command.text.startswith(program + " "):
            return reason
    if command.text in SKIPPED_COMMANDS:
        return SKIPPED_COMMANDS[command.text]
    if command.kind == "python":
        return None
    argv = shlex.split(_fill_blind(command.text))
    if argv[0] != "llm":
        raise AssertionError(
            f"README line {command.line}: `{command.text}` is neither run nor skipped: run it "
            "(tests/test_readme.py) or list it in SKIPPED_PROGRAMS with the reason why not"
        )
    if len(argv) < 2 or argv[1].startswith("-"):
        return None  # llm --help
    from llm.cli import VERBS

    assert argv[1] in VERBS, f"README line {command.line}: unknown verb in `{command.text}`"
    if "--help" in argv:
        return None
    cfg = _composed(argv)
    trainer = cfg.get("trainer")  # type: ignore[attr-defined]
    if trainer is not None and trainer.accelerator in ("gpu", "cuda"):
        return GPU
    harness = cfg.get("harness")  # type: ignore[attr-defined]
    if harness is not None and harness.tasks and not harness.include_path:
        return HARNESS
    data = cfg.get("data")  # type: ignore[attr-defined]
    corpus = data.get("corpus") if data is not None else None
    if corpus is not None and corpus._target_.endswith("HFDataset"):
        return HUB_DATA
    return None


PLACEHOLDERS = ("<run>", "<date>", "<Qwen3 or Llama folder>", "path/to/qwen3-folder", "<verb>")


def _fill_blind(text: str) -> str:
    """``text`` with every placeholder given a dummy value: enough to parse and compose."""
    for placeholder in PLACEHOLDERS:
        text = text.replace(placeholder, "train" if placeholder == "<verb>" else "placeholder")
    return re.sub(r"=\.\.\.(?=\s|$)", "=placeholder", text)


def test_every_readme_command_is_run_or_skipped_for_a_reason() -> None:
    """Quick: each command parses, names a known placeholder only, and has a plan; skipped
    `llm` commands compose (a key or group they name exists)."""
    kinds = {c.kind for c in COMMANDS}
    assert kinds == {"bash", "inline", "transcript", "python"}, kinds
    assert any(c.text == "llm train" for c in COMMANDS)  # the main job, whose run <run> is
    reasons = {}
    for command in COMMANDS:
        reasons[command.text] = skip_reason(command)
        leftover = re.findall(r"<[^<>]*>", _fill_blind(command.text))
        assert reasons[command.text] or not leftover, (
            f"README line {command.line}: no value for the placeholder {leftover}"
        )
    skipped = {text: r for text, r in reasons.items() if r}
    listed = {*SKIPPED_PROGRAMS.values(), *SKIPPED_COMMANDS.values(), GPU, HUB_DATA, HARNESS}
    assert set(skipped.values()) <= listed
    assert set(SKIPPED_COMMANDS) <= set(reasons), "a skipped command the README no longer has"
    ddp = (ROOT / "tests" / "test_ddp_cpu.py").read_text(encoding="utf-8")
    assert '"trainer=ddp_cpu"' in ddp and 'run_cli("train"' in ddp  # the skip's reason holds
    # what runs on a CPU is not skipped: the CPU recipes, resuming, the sweeps, finetuning
    assert reasons["llm train"] is None
    assert reasons["llm train experiment=shakespeare_char_cpu_speedrun"] is None
    assert reasons["llm train experiment=shakespeare_char trainer=gpu"] == GPU
    assert len(skipped) <= len(COMMANDS) // 2, skipped


@dataclass
class Outcome:
    """A README command as the test ran it."""

    argv: list[str]
    proc: subprocess.CompletedProcess[str]
    seconds: float  # wall time, and CPU time (with the processes it started) where known
    cpu: float
    problem: str | None  # what is wrong with what it did, beside its exit code


class ReadmeRunner:
    """Runs the README's commands in order in one working folder, the way a reader would:
    placeholders filled from the runs before, time cut by SHORT, the Hub by OFFLINE."""

    def __init__(self, work: Path, server: CliServer, inputs: dict[str, Path]) -> None:
        self.work = work
        self.server = server
        self.inputs = inputs
        self.main: Path | None = None  # the run of the README's main job (`llm train`)
        self.runs: dict[tuple[str, ...], Path] = {}  # a command's words -> its run folder
        self.latest: dict[str, Path] = {}  # train, finetune, sweep -> the newest such run
        self.seconds = self.cpu = 0.0  # the current command's time so far

    def newest(self, kind: str) -> Path:
        assert kind in self.latest, f"a placeholder names a {kind} run before one ran"
        return self.latest[kind]

    def main_run(self) -> Path:
        assert self.main is not None, "a placeholder names the main job's run before it ran"
        return self.main

    def fill(self, text: str, resumed: Path | None) -> str:
        """The README's placeholders, given values from the runs made so far: `<run>` is the
        main job's run (the one a resumed run's command made, when resuming), in
        `logs/finetune/runs/` the newest finetuning run, `<date>` the newest sweep."""

        def relative(folder: Path) -> str:
            return str(folder.relative_to(self.work))

        values: dict[str, Callable[[], str]] = {
            "logs/train/runs/<run>": lambda: relative(resumed or self.main_run()),
            "logs/finetune/runs/<run>": lambda: relative(self.newest("finetune")),
            "<run>": lambda: relative(self.main_run()),
            "logs/train/multiruns/<date>": lambda: relative(self.newest("sweep")),
            "<Qwen3 or Llama folder>": lambda: str(self.inputs["qwen3"]),
            "path/to/qwen3-folder": lambda: str(self.inputs["qwen3"]),
            "<verb>": lambda: "train",
        }
        for placeholder, value in values.items():
            if placeholder in text:
                text = text.replace(placeholder, value())
        if re.search(r"=\.\.\.(?=\s|$)", text):  # ckpt_path=...
            ckpt = relative(self.main_run() / "checkpoints" / "last.ckpt")
            text = re.sub(r"=\.\.\.(?=\s|$)", f"={ckpt}", text)
        return text

    def shortened(self, argv: list[str], steps: int) -> list[str]:
        """``argv`` with SHORT's overrides (replacing its own value of a key) and OFFLINE's."""
        short = list(SHORT.get(argv[1], ()))
        if argv[1] in ("train", "finetune", "rl"):
            short += [f"{key}={steps}" for key in STEPS]
        for setting, extra in SHORT_WHEN.items():
            if any(a.startswith(setting) for a in argv):
                short += extra
        out = [OFFLINE[a].format(**self.inputs) if a in OFFLINE else a for a in argv]
        for override in short:
            key = override.partition("=")[0] + "="
            mine = [i for i, a in enumerate(out) if a.startswith(key)]
            if mine:
                out[mine[0]] = override
            else:
                out.append(override)
        return out

    def call(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        start, cpu = time.perf_counter(), self.server.cpu_seconds
        proc = self.server.run(argv, self.work, stdin=STDIN.get(argv[1], ""))
        self.seconds += time.perf_counter() - start
        self.cpu += self.server.cpu_seconds - cpu
        return proc

    def outcome(self, argv: list[str], proc: subprocess.CompletedProcess[str]) -> Outcome:
        """The outcome of the command just run, with the time it and its setup took."""
        outcome = Outcome(argv, proc, self.seconds, self.cpu, None)
        self.seconds = self.cpu = 0.0
        return outcome

    def run(self, command: Command) -> Outcome:
        if command.kind == "python":
            argv = ["python", "-c", self.fill(command.text, None)]
            return self.outcome(argv, self.call(argv))
        words = shlex.split(command.text)
        verb = words[1] if len(words) > 1 else ""
        resumed = None
        if verb in ("train", "finetune") and any(w.startswith("ckpt_path=") for w in words):
            # resuming <run>: the run of the same command without ckpt_path=, made if the
            # README has not made it yet; it goes on from its 2 steps to 4
            base = [w for w in words if not w.startswith("ckpt_path=")]
            resumed = self.runs.get(tuple(sorted(base)))
            if resumed is None:
                proc = self.call(self.shortened(base, 2))
                assert proc.returncode == 0, f"`{shlex.join(base)}`: {proc.stderr[-3000:]}"
                resumed = self._run_folder(proc)
        argv = shlex.split(self.fill(command.text, resumed))
        if "--help" not in argv:
            argv = self.shortened(argv, 4 if resumed else 2)
        multirun = self.work / "logs" / "train" / "multiruns"
        before = set(multirun.iterdir()) if multirun.is_dir() else set()
        proc = self.call(argv)
        outcome = self.outcome(argv, proc)
        if command.kind == "transcript":
            shown = [line.rstrip() for line in command.expected]
            printed = (proc.stdout + proc.stderr).rstrip("\n").splitlines()
            if printed != shown:
                outcome.problem = f"printed {printed}, the README shows {shown}"
            return outcome
        if proc.returncode != 0:
            return outcome
        outcome.problem = self.check(words, argv, proc, before)
        return outcome

    def _run_folder(self, proc: subprocess.CompletedProcess[str]) -> Path:
        found = re.search(r"^Run folder: +(.+)$", proc.stdout + proc.stderr, re.M)
        assert found, proc.stdout[-2000:]
        return Path(found.group(1).strip())

    def check(
        self,
        words: list[str],
        argv: list[str],
        proc: subprocess.CompletedProcess[str],
        before: set[Path],
    ) -> str | None:
        """What is wrong with what a command that exited with 0 printed and wrote, if anything."""
        verb = "--help" if "--help" in argv else argv[1]
        if verb not in PRINTS:
            return f"what does `llm {verb}` print when it works? Say it in PRINTS"
        if PRINTS[verb] not in proc.stdout + proc.stderr:
            return f"{PRINTS[verb]!r} is not in what it printed"
        if verb in ("train", "finetune") and "-m" in argv:
            return self._check_sweep(argv, before)
        if verb in ("train", "finetune", "rl"):
            run = self._run_folder(proc)
            if not (run / "checkpoints" / "last.ckpt").is_file():
                return f"no last.ckpt in {run}"
            self.runs[tuple(sorted(words))] = self.latest[verb] = run
            if verb == "train" and self.main is None:
                self.main = run
        if verb == "generate":
            prompt = next(a for a in argv if a.startswith("prompt=")).partition("=")[2]
            if not proc.stdout.startswith(prompt) or len(proc.stdout) <= len(prompt):
                return f"no text after the prompt {prompt!r}: {proc.stdout[:300]!r}"
        if verb == "chat" and not proc.stdout.strip():
            return "no reply"
        if verb == "classify" and proc.stdout.split()[:1] not in (["ham"], ["spam"]):
            return f"no label of sms.tsv first: {proc.stdout[:200]!r}"
        if verb == "export":
            settings = dict(a.split("=", 1) for a in argv[2:])
            wrote = [self.work / settings["out"], self.work / settings["hf_dir"] / "config.json"]
            missing = [str(p) for p in wrote if not p.is_file()]
            return f"missing {missing}" if missing else None
        if verb == "report":
            folder = self.work / dict(a.split("=", 1) for a in argv[2:])["dir"]
            if (
                not (folder.parent / f"{folder.name}_report" / "report.csv").is_file()
                and not (folder / "report" / "report.csv").is_file()
            ):
                return f"no report.csv for {folder}"
        return None

    def _check_sweep(self, argv: list[str], before: set[Path]) -> str | None:
        """A new sweep folder with one finished job per combination (or per Optuna trial)."""
        new = set((self.work / "logs" / "train" / "multiruns").iterdir()) - before
        if len(new) != 1:
            return f"expected one new sweep folder, found {sorted(new)}"
        trials = [a for a in argv if a.startswith("hydra.sweeper.n_trials=")]
        if trials:
            expected = int(trials[-1].partition("=")[2])
        else:
            expected = math.prod(len(values) for _, values in _sweeps(argv))
        self.latest["sweep"] = sweep = new.pop()
        jobs = [p for p in sweep.iterdir() if (p / "checkpoints" / "last.ckpt").is_file()]
        return None if len(jobs) == expected else f"{len(jobs)} jobs finished, not {expected}"


def _inputs(work: Path) -> dict[str, Path]:
    """The files the README's commands name, in the working folder as a reader has them, and
    the local models the test gives for Hub names."""
    from _hf_utils import train_tokenizer

    from llm.model import GPT, GPTConfig

    shakespeare = work / "data" / "tinyshakespeare" / "input.txt"
    shakespeare.parent.mkdir(parents=True)
    shutil.copyfile(SHAKESPEARE, shakespeare)
    (work / "my_corpus.txt").write_text(TEXT * 20, encoding="utf-8")
    sms = [("spam", "WINNER! Claim your free prize now, call 0800 123 456"),
           ("ham", "Are we still on for dinner tonight?"),
           ("spam", "URGENT: your account won a cash prize, text WIN to 80082"),
           ("ham", "I'll be home late, start without me")]  # fmt: skip
    rows = "".join(f"{label}\t{text}\n" for label, text in sms * 10)
    (work / "sms.tsv").write_text("label\ttext\n" + rows, encoding="utf-8")
    alpaca = [{"instruction": f"Name a {w}.", "input": "", "output": f"A {w}."}
              for w in ("colour", "fruit", "planet", "river", "tree", "metal")]  # fmt: skip
    (work / "alpaca.json").write_text(json.dumps(alpaca * 3), encoding="utf-8")
    pairs = [{"prompt": f"Name a {w}.", "chosen": f"A {w}.", "rejected": "No."}
             for w in ("colour", "fruit", "planet", "river", "tree", "metal")]  # fmt: skip
    write_jsonl(work / "pairs.jsonl", pairs * 3)
    write_jsonl(work / "prompts.jsonl", [{"prompt": f"Name a {w}.", "answer": w}
                                         for w in ("colour", "fruit", "planet")] * 4)  # fmt: skip
    endings = ["[step] Mix 2 cups of flour.", "It rains.", "He sings (badly).", "Done!"]
    rows_mc = [{"ctx": f"[header] How to bake bread {i}. [title] Preheat the oven to 200°C.",
                "endings": endings, "label": i % 4} for i in range(4)]  # fmt: skip
    write_jsonl(work / "hellaswag_val.jsonl", rows_mc)
    gpt2 = hf_gpt2_dir(work / "standins" / "gpt2")
    qwen3 = work / "standins" / "qwen3"
    shape = dict(vocab_size=336, block_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    qwen = dict(head_dim=8, norm="rmsnorm", mlp="swiglu", mlp_hidden=48, pos_encoding="rope")
    qwen.update(qk_norm=True, bias=False, tie_weights=False)  # what makes it a Qwen3
    GPT(GPTConfig(**shape, **qwen)).save_pretrained(qwen3)  # type: ignore[arg-type]
    train_tokenizer(qwen3)
    return {"gpt2": gpt2, "qwen3": qwen3}


def _failure(command: Command, outcome: Outcome | Exception) -> str | None:
    """What went wrong with a command, with what it printed; None if nothing."""
    if isinstance(outcome, Exception):
        return f"README line {command.line}: `{command.text}`: {outcome!r}"
    proc = outcome.proc
    if (command.kind == "transcript" or proc.returncode == 0) and outcome.problem is None:
        return None
    said = f"README line {command.line}: `{shlex.join(outcome.argv)}` exited with "
    said += f"{proc.returncode} ({outcome.seconds:.1f} s, CPU {outcome.cpu:.1f} s)"
    if outcome.problem:
        said += f": {outcome.problem}"
    return f"{said}\n{proc.stdout[-1500:]}\n{proc.stderr[-2500:]}"


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path: Path) -> None:
    """Every README command that is not skipped, run in README order in one working folder
    (one test, not one per command: under `-n 2` the commands must share that folder)."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is not there (the README's commands train on it)")
    chars = set(SHAKESPEARE.read_text(encoding="utf-8"))
    assert '"' not in chars and "{" not in chars  # as the README says of the char model
    work, streams = tmp_path / "work", tmp_path / "streams"
    work.mkdir()
    streams.mkdir()
    server = CliServer(streams)
    runner = ReadmeRunner(work, server, _inputs(work))
    failures, ran = [], 0
    try:
        for command in COMMANDS:
            try:
                if skip_reason(command):
                    continue
                done = runner.run(command)
                ran += 1
                print(f"{done.seconds:6.1f} s  CPU {done.cpu:5.1f} s  {command.id}")
                failures.append(_failure(command, done))
            except Exception as e:  # this command's failure, not the ones' after it
                failures.append(_failure(command, e))
    finally:
        server.close()
    failed = [f for f in failures if f]
    assert not failed, f"{len(failed)} of {ran} README commands failed:\n\n" + "\n\n".join(failed)
    assert ran >= 25, ran
