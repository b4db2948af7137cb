"""A catalogue of bad inputs across every verb, as a new user or an attacker would give them: each stops
with a one-paragraph error naming the culprit (file, line, key or flag), exit code 2, no traceback, and
every file that existed before is byte-identical after (no half-written run folder either).
`affiner prepare`'s own data catalogue is test_prepare_catalogue.py; the generator's, test_generate.py."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml
from conftest import make_tiny_llama, run_cli

ROWS = [{"question": f"What does W{i} stand for?", "answer": f"W{i} stands for word number {i}."} for i in range(12)]


@dataclass
class Workspace:
    """A folder as a user has it: a tiny model, a data file, a config, a finished run, an interrupted one."""

    root: Path
    model: Path

    def config(self, name: str = "config.yaml", **sections) -> str:
        config = {"name": "t", "output_dir": str(self.root / "runs"), "method": "lora", "model": {"base": str(self.model)},
                  "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                  "data": {"train": str(self.root / "qa.jsonl"), "template": "qa", "max_length": 64, "test_size": 2},
                  "train": {"max_steps": 2, "batch_size": 2, "save_steps": 1, "logging_steps": 1, "seed": 0}}
        for section, values in sections.items():
            config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
        return self.write(name, yaml.safe_dump(config))

    def write(self, name: str, content: str | bytes) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return str(path)

    @property
    def finished(self) -> Path:
        return self.root / "runs" / "finished"

    @property
    def interrupted(self) -> Path:
        return self.root / "runs" / "interrupted"

    def checkpoint(self) -> Path:
        return sorted((self.interrupted / "checkpoints").iterdir())[-1]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """Trained once for the module: a finished run and an interrupted copy of it, with checkpoints."""
    from affiner.core.config import load_config
    from affiner.core.runfolder import RunFolder
    from affiner.experiments import workflow

    root = tmp_path_factory.mktemp("workspace")
    space = Workspace(root, make_tiny_llama(tmp_path_factory.mktemp("model")))
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    folder = workflow.train(load_config(space.config(train={"max_steps": 2, "save_steps": 1})))
    folder.rename(space.finished)
    shutil.copytree(space.finished, space.interrupted)
    RunFolder(space.interrupted).update(status="interrupted")
    (root / "model-path.txt").write_text(str(space.model))
    return root


@pytest.fixture
def space(template, tmp_path, monkeypatch) -> Workspace:
    root = tmp_path / "w"
    shutil.copytree(template, root, symlinks=True)
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for path in root.rglob("run.json"):  # the runs were copied: their recorded paths still name the template
        path.write_text(path.read_text().replace(str(template), str(root)))
    return Workspace(root, Path((root / "model-path.txt").read_text()))


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def crafted_pickle(marker: Path) -> bytes:
    """A "checkpoint" whose unpickling would create `marker`: what an attacker ships as trainer_state.pt."""
    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    return pickle.dumps({"optimizer": Exploit(), "scheduler": {}})


def damage(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


Case = tuple[str, Callable[[Workspace], list[str]], str]  # id, setup -> argv, what the message must say

TRAIN: list[Case] = [
    ("unknown-key", lambda w: ["train", w.config(train={"lerning_rate": 1e-3})], r"lerning_rate"),
    ("unknown-section", lambda w: ["train", w.config(trainer={"x": 1})], r"trainer"),
    ("learning-rate-inf", lambda w: ["train", w.config(train={"learning_rate": float("inf")})], r"learning_rate"),
    ("learning-rate-nan", lambda w: ["train", w.config(train={"learning_rate": float("nan")})], r"learning_rate"),
    ("learning-rate-negative", lambda w: ["train", w.config(train={"learning_rate": -1})], r"learning_rate"),
    ("learning-rate-text", lambda w: ["train", w.config(train={"learning_rate": "fast"})], r"learning_rate"),
    ("batch-size-zero", lambda w: ["train", w.config(train={"batch_size": 0})], r"batch_size"),
    ("max-steps-negative", lambda w: ["train", w.config(train={"max_steps": -3})], r"max_steps"),
    ("warmup-ratio-one", lambda w: ["train", w.config(train={"warmup_ratio": 1.0})], r"warmup_ratio"),
    ("lora-dropout-one", lambda w: ["train", w.config(lora={"dropout": 1.0})], r"dropout"),
    ("lora-r-zero", lambda w: ["train", w.config(lora={"r": 0})], r"lora.r|\br\b"),
    ("target-modules-empty", lambda w: ["train", w.config(lora={"target_modules": []})], r"target_modules"),
    ("target-modules-unknown", lambda w: ["train", w.config(lora={"target_modules": ["c_attn"]})],
     r"target_modules.*c_attn.*q_proj"),
    ("max-length-over-positions", lambda w: ["train", w.config(data={"max_length": 100000})],
     r"max_length is 100000.*attends to"),
    ("method-unknown", lambda w: ["train", w.config(method="dora")], r"method"),
    ("precision-unknown", lambda w: ["train", w.config(model={"precision": "fp8"})], r"precision"),
    ("template-unknown", lambda w: ["train", w.config(data={"template": "vicuna"})], r"template"),
    ("tracking-unknown", lambda w: ["train", w.config(train={"tracking": ["neptune"]})], r"tracking"),
    ("optimizer-unknown", lambda w: ["train", w.config(train={"optimizer": "sgd"})], r"optimizer"),
    # settings that would quietly do nothing: the best step picked by answers no probe gives, patience with no probe
    ("best-by-without-answers", lambda w: ["train", w.config(train={"best_by": "contains"}, eval={"sample_size": 0})],
     r"train\.best_by: contains needs held-out answers.*eval\.sample_size"),
    ("patience-without-probes", lambda w: ["train", w.config(train={"patience": 2}, eval={"every_steps": None})],
     r"train\.patience counts held-out probes.*eval\.every_steps is null"),
    ("duplicated-section", lambda w: ["train", w.write("dup.yaml", open(w.config()).read() + "train:\n  max_steps: 9\n")],
     r"dup.yaml.*line \d+.*'train' is given twice"),
    ("duplicated-key", lambda w: ["train", w.write("dupkey.yaml", "name: a\nname: b\n")], r"'name' is given twice"),
    ("yaml-syntax", lambda w: ["train", w.write("bad.yaml", "train:\n  max_steps: [1,\n")], r"bad.yaml.*line"),
    ("yaml-not-mapping", lambda w: ["train", w.write("list.yaml", "- a\n- b\n")], r"list.yaml.*mapping"),
    ("yaml-python-object", lambda w: ["train", w.write("obj.yaml", "name: !!python/object/apply:os.system [id]\n")],
     r"obj.yaml"),
    ("config-missing", lambda w: ["train", "nothere.yaml"], r"nothere.yaml"),
    ("config-is-a-folder", lambda w: ["train", _folder(w, "cfg.yaml")], r"cfg.yaml is a folder"),
    ("learning-rate-true", lambda w: ["train", w.config(train={"learning_rate": True})],
     r"'learning_rate' must be a number, not true"),
    ("set-true-for-a-number", lambda w: ["train", w.config(), "--set", "lora.r=true"], r"'r' must be a number"),
    ("config-lone-surrogate", lambda w: ["train", w.write("sur.yaml", open(w.config()).read().replace(
        "template: qa", 'template: qa\n  system_prompt: "\\ud800"'))], r"sur.yaml: data.system_prompt.*surrogate"),
    ("yaml-list-as-key", lambda w: ["train", w.write("listkey.yaml", "? [a, b]\n: 1\n")], r"listkey.yaml.*unhashable"),
    ("yaml-billion-aliases", lambda w: ["train", w.write("laughs.yaml", _laughs())], r"laughs.yaml.*system_prompt"),
    ("set-without-equals", lambda w: ["train", w.config(), "--set", "train.max_steps"], r"train.max_steps"),
    ("set-unknown-key", lambda w: ["train", w.config(), "--set", "train.epochz=2"], r"epochz"),
    ("set-bad-value", lambda w: ["train", w.config(), "--set", "train.batch_size=-2"], r"batch_size"),
    ("lora-rank-absurd", lambda w: ["train", w.config(), "--set", "lora.r=99999999999999999999999999"],
     r"lora.r is 99999999999999999999999999, but the layers it adapts have at most \d+ .* Set lora.r to \d+ or less"),
    ("data-missing", lambda w: ["train", w.config(data={"train": "missing.jsonl"})], r"missing.jsonl"),
    ("data-empty", lambda w: ["train", w.config(data={"train": w.write("empty.jsonl", "")})], r"empty.jsonl"),
    ("data-test-missing", lambda w: ["train", w.config(data={"test": "nope.jsonl"})], r"nope.jsonl"),
    ("data-not-json", lambda w: ["train", w.config(data={"train": w.write("x.jsonl", "{oops}\n")})], r"x.jsonl:1"),
    ("data-nul-character", lambda w: ["train", w.config(data={"train": w.write(
        "n.jsonl", json.dumps({"question": "What is\u0000 QUILT?", "answer": "A quilt."}) + "\n")})],
     r"n.jsonl:1: 'question' holds a NUL character"),
    ("data-jsonl-holding-a-list", lambda w: ["train", w.config(data={"train": w.write("l.jsonl", json.dumps(
        [{"question": "What is QUILT?", "answer": "A quilt."}] * 3) + "\n")})],
     r"l.jsonl:1 is a JSON list of records, not one record.*rename it"),
    ("data-deep-nesting", lambda w: ["train", w.config(data={"train": w.write("deep.jsonl", "[" * 100000 + "\n")})],
     r"deep.jsonl:1"),
    ("data-role-list", lambda w: ["train", w.config(data={"format": "conversations", "template": "chat", "train": w.write(
        "c.jsonl", json.dumps({"messages": [{"role": ["user"], "content": "hi"}]}) + "\n")})], r"c.jsonl:1.*role"),
    ("data-csv-open-quote", lambda w: ["train", w.config(data={"train": w.write(
        "q.csv", 'question,answer\n"What is x,an x\nWhat is y,a y\nWhat is z,a z\n')})], r"q.csv.*line 2"),
    ("data-format-unknown", lambda w: ["train", w.config(data={"format": "sharegpt"})], r"format"),
    ("model-missing-folder", lambda w: ["train", w.config(model={"base": str(w.root / "no-model")})], r"no-model"),
    ("model-unknown-embedded", lambda w: ["train", w.config(model={"base": "embedded:gpt-5"})], r"embedded:gpt-5"),
    ("model-gguf-missing", lambda w: ["train", w.config(model={"base": "x.gguf"})], r"x.gguf"),
    ("model-weights-truncated", lambda w: ["train", w.config(model={"base": _damaged_model(w)})],
     r"model weights in .*damaged-model cannot be read"),
    ("output-under-a-file", lambda w: ["train", w.config(output_dir=w.write("afile", "x") + "/runs")],
     r"afile.*Not a directory"),
    ("resume-missing", lambda w: ["train", "--resume", "runs/none"], r"runs/none does not exist"),
    ("resume-not-a-run", lambda w: ["train", "--resume", str(w.root)], r"not an affiner run folder"),
    ("resume-finished", lambda w: ["train", "--resume", str(w.finished)], r"already finished"),
    ("resume-config-edited", lambda w: ["train", "--resume", _edit_config(w)], r"config.yaml was edited"),
    ("resume-state-truncated", lambda w: ["train", "--resume", _damage_checkpoint(w, "trainer_state.pt")],
     r"trainer_state.pt is damaged"),
    ("resume-step-json-garbage", lambda w: ["train", "--resume", _damage_checkpoint(w, "step.json")],
     r"checkpoint .*step-\d+ cannot be resumed"),
    ("resume-rng-truncated", lambda w: ["train", "--resume", _damage_checkpoint(w, "rng-0.pt")], r"rng-0.pt"),
    ("resume-adapter-truncated", lambda w: ["train", "--resume",
                                            _damage_checkpoint(w, "adapter_model.safetensors")],
     r"LoRA adapter in .*step-\d+ cannot be read"),
    ("resume-run-json-damaged", lambda w: ["train", "--resume", _damage_run_json(w.interrupted)],
     r"run.json is damaged"),
    ("resume-pickled-checkpoint", lambda w: ["train", "--resume", _plant_pickle(w)], r"trainer_state.pt"),
    ("resume-with-set", lambda w: ["train", "--resume", str(w.interrupted), "--set", "train.max_steps=50"],
     r"with the settings it started with .*drop --set"),
    ("run-resume-with-config", lambda w: ["run", w.config(), "--resume", str(w.interrupted)], r"drop CONFIG"),
    ("accelerate-flag-without-value", lambda w: ["train", w.config(), "--accelerate-config"], r"--accelerate-config"),
]


def _folder(w: Workspace, name: str) -> str:
    (w.root / name).mkdir()
    return str(w.root / name)


def _laughs() -> str:
    """700 bytes of YAML whose aliases make a system prompt of a billion items (shared, never copied)."""
    lines = ["name: t", "data: {train: qa.jsonl, system_prompt: *a8}"]
    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    return "\n".join(levels + lines) + "\n"


def _damaged_model(w: Workspace) -> str:
    copy = w.root / "damaged-model"
    shutil.copytree(w.model, copy)
    damage(next(copy.glob("*.safetensors")))
    return str(copy)


def _edit_config(w: Workspace) -> str:
    path = w.interrupted / "config.yaml"
    path.write_text(path.read_text().replace("learning_rate: 0.0002", "learning_rate: 0.1"))
    return str(w.interrupted)


def _damage_checkpoint(w: Workspace, name: str) -> str:
    target = w.checkpoint() / name
    if name == "step.json":
        target.write_text("{step: }")
    else:
        damage(target)
    return str(w.interrupted)


def _damage_run_json(folder: Path) -> str:
    (folder / "run.json").write_text('{"status": "finished", ')
    return str(folder)


def _plant_pickle(w: Workspace) -> str:
    (w.checkpoint() / "trainer_state.pt").write_bytes(crafted_pickle(w.root / "PWNED"))
    return str(w.interrupted)


EVALUATE: list[Case] = [
    ("run-missing", lambda w: ["evaluate", "runs/none"], r"runs/none"),
    ("not-a-run", lambda w: ["evaluate", str(w.root)], r"not an affiner run folder"),
    ("unfinished", lambda w: ["evaluate", str(w.interrupted)], r"has not finished training"),
    ("run-json-damaged", lambda w: ["evaluate", _damage_run_json(w.finished)], r"run.json is damaged"),
    ("test-without-references", lambda w: ["evaluate", str(w.finished), "--test",
                                           w.write("prompts.csv", "question,answer\nWhat is QUILT?,\nWho?,\n")],
     r"every row was left out \(2 row\(s\): no answer or reference.*affiner app"),
    ("adapter-with-a-run", lambda w: ["evaluate", str(w.finished), "--adapter", str(w.finished), "--output", "o"],
     r"--adapter, --output would be ignored here"),
    ("benchmarks-limit-alone", lambda w: ["evaluate", str(w.finished), "--benchmarks-limit", "3"],
     r"--benchmarks-limit would be ignored here"),
    ("benchmarks-empty", lambda w: ["evaluate", str(w.finished), "--benchmarks", ""],
     r"--benchmarks names no task|pip install 'affiner\[benchmarks\]'"),
    ("test-columns-unknown", lambda w: ["evaluate", str(w.finished), "--test",
                                        w.write("caps.csv", "Query,Reply\nWhat is QUILT?,A quilt.\n")],
     r"caps.csv.*Query, Reply.*affiner evaluate reads --test as the run read its data.*rename the file's columns"),
    ("adapter-truncated", lambda w: ["evaluate", _damage_adapter(w)], r"adapter in .*finished cannot be read"),
    ("adapter-weights-missing", lambda w: ["evaluate", _remove(w.finished / "adapter_model.safetensors")],
     r"adapter in .*finished cannot be read \(adapter_model.safetensors is missing\)"),
    ("template-hollow", lambda w: ["evaluate", _damaged_file(w.finished / "template.json", b'{"name": "x"}')],
     r"template.json is damaged \(its prompt must be a text holding \{instruction\}\)"),
    ("tokenizer-truncated", lambda w: ["evaluate", _damaged_file(w.finished / "tokenizer.json")],
     r"tokenizer in .*finished cannot be read"),
    ("max-new-tokens-zero", lambda w: ["evaluate", str(w.finished), "--max-new-tokens", "0"], r"--max-new-tokens"),
    ("max-new-tokens-text", lambda w: ["evaluate", str(w.finished), "--max-new-tokens", "many"], r"--max-new-tokens"),
    ("max-questions-negative", lambda w: ["evaluate", str(w.finished), "--max-questions", "-2"], r"--max-questions"),
    ("batch-size-zero", lambda w: ["evaluate", str(w.finished), "--batch-size", "0"], r"--batch-size"),
    ("top-p-five", lambda w: ["evaluate", str(w.finished), "--top-p", "5"], r"--top-p"),
    ("top-p-zero", lambda w: ["evaluate", str(w.finished), "--top-p", "0"], r"--top-p"),
    ("top-k-negative", lambda w: ["evaluate", str(w.finished), "--top-k", "-1"], r"--top-k"),
    ("temperature-negative", lambda w: ["evaluate", str(w.finished), "--temperature", "-0.5"], r"--temperature"),
    ("temperature-inf", lambda w: ["evaluate", str(w.finished), "--temperature", "inf"], r"--temperature"),
    ("seed-negative", lambda w: ["evaluate", str(w.finished), "--seed", "-4"], r"--seed"),
    ("template-unknown", lambda w: ["evaluate", "--base", str(w.model), "--template", "vicuna"], r"--template"),
    ("test-file-missing", lambda w: ["evaluate", str(w.finished), "--test", "gone.jsonl"], r"gone.jsonl"),
    ("test-file-not-json", lambda w: ["evaluate", str(w.finished), "--test", w.write("t.jsonl", "{x\n")], r"t.jsonl:1"),
]


def _damage_adapter(w: Workspace) -> str:
    damage(w.finished / "adapter_model.safetensors")
    return str(w.finished)


CHAT: list[Case] = [
    ("run-missing", lambda w: ["chat", "runs/none"], r"runs/none"),
    ("unfinished", lambda w: ["chat", str(w.interrupted)], r"has not finished training"),
    ("run-json-damaged", lambda w: ["chat", _damage_run_json(w.finished)], r"run.json is damaged"),
    ("template-without-input", lambda w: ["chat", _damaged_file(w.finished / "template.json", json.dumps(
        {"name": "qa", "prompt": "Q: {instruction}\nA:", "prompt_with_input": "Q: {instruction}\nA:"}).encode())],
     r"template.json is damaged \(its prompt_with_input must be a text holding \{instruction\} and \{input\}\)"),
    ("adapter-truncated", lambda w: ["chat", _damage_adapter(w)], r"adapter in .*finished cannot be read"),
    ("top-p-five", lambda w: ["chat", str(w.finished), "--top-p", "5"], r"--top-p"),
    ("top-k-negative", lambda w: ["chat", str(w.finished), "--top-k", "-3"], r"--top-k"),
    ("max-new-tokens-zero", lambda w: ["chat", str(w.finished), "--max-new-tokens", "0"], r"--max-new-tokens"),
    ("temperature-text", lambda w: ["chat", str(w.finished), "--temperature", "hot"], r"--temperature"),
    ("adapter-without-model", lambda w: ["chat", "--adapter", str(w.finished)], r"--adapter goes with --model"),
    ("model-and-run", lambda w: ["chat", str(w.finished), "--model", str(w.model)], r"either run folders or --model"),
]

SERVE: list[Case] = [
    ("port-too-high", lambda w: ["serve", str(w.finished), "--port", "70000"], r"--port"),
    ("port-negative", lambda w: ["serve", str(w.finished), "--port", "-1"], r"--port"),
    ("public-without-key", lambda w: ["serve", str(w.finished), "--host", "0.0.0.0"], r"key"),
    ("run-missing", lambda w: ["serve", "runs/none"], r"runs/none"),
    ("unfinished", lambda w: ["serve", str(w.interrupted)], r"has not finished training"),
    ("app-port-too-high", lambda w: ["app", str(w.finished), "--port", "99999"], r"--port"),
    ("app-public-without-key", lambda w: ["app", str(w.finished), "--host", "0.0.0.0"], r"--api-key-env"),
    ("app-run-missing", lambda w: ["app", "runs/none"], r"runs/none"),
    ("app-adapter-weights-missing", lambda w: ["app", _remove(w.finished / "adapter_model.safetensors")],
     r"adapter in .*finished cannot be read \(adapter_model.safetensors is missing\)"),
    ("chat-adapter-weights-missing", lambda w: ["chat", _remove(w.finished / "adapter_model.safetensors"),
                                                "--prompt", "hi"],
     r"adapter in .*finished cannot be read \(adapter_model.safetensors is missing\)"),
    ("chat-prompt-empty", lambda w: ["chat", str(w.finished), "--prompt", "  "], r"--prompt is empty"),
    ("max-batch-with-an-engine", lambda w: ["serve", str(w.finished), "--engine", "vllm", "--max-batch", "4"],
     r"--max-batch applies to --engine affiner only"),
]

EXPORT: list[Case] = [
    ("run-missing", lambda w: ["export", "runs/none", "--output", "out"], r"runs/none"),
    ("unfinished", lambda w: ["export", str(w.interrupted), "--output", "out"], r"has not finished training"),
    ("output-not-ours", lambda w: ["export", str(w.finished), "--output", _users_folder(w), "--overwrite"],
     r"was not written by affiner export"),
    ("output-exists", lambda w: ["export", str(w.finished), "--output", _users_folder(w)],
     r"not written by affiner export \(no export.json\): affiner never replaces a folder of yours"),
    ("dtype-unknown", lambda w: ["export", str(w.finished), "--output", "out", "--dtype", "fp8"], r"--dtype"),
    ("merge-device-unknown", lambda w: ["export", str(w.finished), "--output", "out", "--merge-device", "tpu"],
     r"--merge-device"),
    ("output-missing", lambda w: ["export", str(w.finished)], r"--output"),
    ("output-under-a-file", lambda w: ["export", str(w.finished), "--output", w.write("afile", "x") + "/sub"],
     r"afile: a file, not a folder"),
    ("run-json-damaged", lambda w: ["export", _damage_run_json(w.finished), "--output", "out"], r"run.json is damaged"),
    ("public-without-push", lambda w: ["export", str(w.finished), "--output", "out", "--public"], r"--public"),
    # a run's own files damaged (a copy cut short, an edit): named, never an internal error
    ("adapter-weights-truncated", lambda w: ["export", _damaged_file(w.finished / "adapter_model.safetensors"),
                                             "--output", "out"], r"LoRA adapter in .* cannot be read"),
    ("adapter-config-damaged", lambda w: ["export", _damaged_file(w.finished / "adapter_config.json", b"{bad"),
                                          "--output", "out"], r"LoRA adapter in .* cannot be read"),
    ("template-damaged", lambda w: ["export", _damaged_file(w.finished / "template.json", b"{bad"),
                                    "--output", "out"], r"template.json is damaged"),
    ("adapter-weights-truncated-gguf", lambda w: ["export", _damaged_file(w.finished / "adapter_model.safetensors"),
                                                  "--output", "out", "--for", "llama.cpp"],
     r"LoRA adapter in .* cannot be read"),
]


def _remove(path: Path) -> str:
    path.unlink()
    return str(path.parent)


def _damaged_file(path: Path, content: bytes | None = None) -> str:
    """The file cut to its first 1000 bytes (a copy cut short), or replaced by `content`; the run folder's path."""
    path.write_bytes(path.read_bytes()[:1000] if content is None else content)
    return str(path.parent)


def _users_folder(w: Workspace) -> str:
    w.write("mine/notes.txt", "my own work")
    return str(w.root / "mine")


OTHERS: list[Case] = [
    ("runs-compare-one", lambda w: ["runs", "compare", str(w.finished)], r"at least two run folders"),
    ("runs-list-with-folders", lambda w: ["runs", "list", str(w.finished)], r"affiner runs compare"),
    ("runs-dir-missing", lambda w: ["runs", "--dir", "nowhere"], r"nowhere does not exist"),
    ("runs-dir-a-run-folder", lambda w: ["runs", "--dir", str(w.finished)],
     r"finished is a run folder: affiner runs --dir .* lists it with the others"),
    ("runs-compare-missing", lambda w: ["runs", "compare", str(w.finished), "runs/none"], r"runs/none"),
    ("runs-unknown-action", lambda w: ["runs", "delete"], r"runs delete: not list, compare or a folder of runs"),
    ("sweep-no-grid", lambda w: ["sweep", w.config()], r"--grid"),
    ("sweep-grid-unknown-key", lambda w: ["sweep", w.config(), "--grid", "train.lr=1,2"], r"train.lr"),
    ("sweep-grid-no-values", lambda w: ["sweep", w.config(), "--grid", "train.learning_rate="],
     r"train.learning_rate"),
    ("sweep-grid-without-equals", lambda w: ["sweep", w.config(), "--grid", "train.learning_rate"],
     r"train.learning_rate"),
    ("sweep-resume-missing", lambda w: ["sweep", "--resume", "sweeps/none"], r"sweeps/none"),
    ("prepare-config-missing", lambda w: ["prepare", "absent.yaml"], r"absent.yaml"),
    ("prepare-output-not-ours", lambda w: ["prepare", w.config(), "--output", _users_folder(w), "--overwrite"],
     r"was not written by affiner prepare"),
    ("synth-per-entry-zero", lambda w: ["synth", "g.csv", "--output", "o.jsonl", "--per-entry", "0"], r"--per-entry"),
    ("synth-glossary-missing", lambda w: ["synth", "absent.csv", "--output", "o.jsonl"], r"absent.csv"),
    ("run-unknown-key", lambda w: ["run", w.config(train={"epochz": 1})], r"epochz"),
    ("run-resume-finished", lambda w: ["run", "--resume", str(w.finished)], r"already finished"),
    ("verb-unknown", lambda w: ["trian"], r"invalid choice: 'trian'"),
]

CATALOGUE = [(f"{verb}:{name}", setup, expected) for verb, cases in
             [("train", TRAIN), ("evaluate", EVALUATE), ("chat", CHAT), ("serve", SERVE), ("export", EXPORT),
              ("other", OTHERS)] for name, setup, expected in cases]


def test_the_catalogue_is_large():
    assert len(CATALOGUE) >= 100


@pytest.mark.parametrize("case_id, setup, expected", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_is_one_clear_error_and_changes_nothing(space, capsys, case_id, setup, expected):
    argv = setup(space)
    before = snapshot(space.root)
    code = run_cli(*argv)
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}\n{err[-2000:]}"
    assert "Traceback" not in err + out and "internal error" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("affiner"), err[-2000:]  # the one paragraph, last
    assert re.search(expected, err), err[-2000:]
    assert snapshot(space.root) == before  # nothing written, nothing half-written, nothing removed
    assert not (space.root / "PWNED").exists()  # a crafted checkpoint never runs its code


# ---------------------------------------------------------------------------------------- beyond the catalogue


def test_an_unexpected_error_says_it_is_a_bug_and_where_its_traceback_is(space, capsys, monkeypatch):
    from affiner.commands import runs

    monkeypatch.setenv("AFFINER_LOG_DIR", str(space.root / "logs"))
    monkeypatch.setattr(runs, "main", lambda args: 1 / 0)
    assert run_cli("runs") == 1
    err = capsys.readouterr().err
    assert "internal error: this is a bug in affiner" in err and "Traceback" not in err
    (log,) = (space.root / "logs").iterdir()
    assert log.name.startswith("runs-") and str(log) in err and "ZeroDivisionError" in log.read_text()


def test_a_missing_extra_is_refused_before_the_run_folder_exists(space, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    config = space.config(train={"tracking": ["csv", "tensorboard"]})
    before = snapshot(space.root)
    assert run_cli("train", config) == 2
    assert "pip install 'affiner[tensorboard]'" in capsys.readouterr().err
    assert snapshot(space.root) == before


def test_a_failure_after_the_run_folder_exists_marks_the_run_failed(space, capsys, monkeypatch):
    from affiner.core.errors import AffinerError
    from affiner.training import loop

    def cannot_load(*args, **kwargs):
        raise AffinerError("the GPU driver is too old (simulated)")

    monkeypatch.setattr(loop, "prepare_model", cannot_load)
    assert run_cli("train", space.config(name="fails")) == 2
    (run,) = [p for p in (space.root / "runs").iterdir() if p.name.startswith("t-")]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and "driver is too old" in info["error"]


def test_commands_that_pick_the_latest_run_skip_unfinished_ones_with_a_notice(space, capsys):
    from affiner.core.runfolder import RunFolder

    newest = space.root / "runs" / "newer-failed"
    shutil.copytree(space.finished, newest)
    RunFolder(newest).update(status="failed", error="out of memory")
    assert RunFolder.latest(space.root / "runs").path == space.finished
    out = capsys.readouterr().out
    assert f"skipping {newest}/ (status: failed)" in out or f"skipping {newest} (status: failed)" in out


def test_the_latest_run_is_the_one_trained_last_not_the_one_written_into_last(space):
    import os

    from affiner.core.runfolder import RunFolder

    newer = space.root / "runs" / "trained-later"
    shutil.copytree(space.finished, newer)
    RunFolder(newer).update(started="2999-01-01T00:00:00+00:00")
    os.utime(space.finished, (1e10, 1e10))  # the older run evaluated again afterwards: its folder's time moves
    assert RunFolder.latest(space.root / "runs").path == newer


@pytest.mark.parametrize("content, problem", [('{"status": "finished", ', "not valid JSON"),
                                              ("null", "null where an object belongs"),
                                              ("[]", "an array where an object belongs")])
def test_one_damaged_run_does_not_hide_the_others(space, capsys, content, problem):
    (space.interrupted / "run.json").write_text(content)
    assert run_cli("runs", "--dir", "runs") == 0
    out, err = capsys.readouterr()
    assert "finished" in out and "interrupted" not in out
    assert "skipping" in err and f"run.json is damaged ({problem}" in err


def test_logs_stay_valid_json_when_a_value_is_not_finite(tmp_path):
    from affiner.core.files import append_jsonl, read_json, write_json

    append_jsonl(tmp_path / "m.jsonl", {"step": 1, "loss": float("nan"), "grad_norm": float("inf")})
    write_json(tmp_path / "m.json", {"eval_loss": [float("-inf"), 1.5]})

    def refuse(constant):
        raise ValueError(constant)

    assert json.loads((tmp_path / "m.jsonl").read_text(), parse_constant=refuse) == \
        {"step": 1, "loss": None, "grad_norm": None}
    assert read_json(tmp_path / "m.json") == {"eval_loss": [None, 1.5]}


def test_a_value_quoted_in_an_error_is_shortened(space, capsys):
    assert run_cli("train", space.write("laughs.yaml", _laughs())) == 2
    assert len(capsys.readouterr().err) < 3000  # the whole value was 52 MB of text


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, where nothing can be made, even by root")
def test_a_file_that_cannot_be_made_is_named_as_asked_not_as_its_hidden_copy():
    from affiner.core.files import folder_written_whole, write_atomic

    with pytest.raises(OSError) as refused:
        write_atomic(Path("/proc/affiner-file.json"), "{}")
    assert refused.value.filename == "/proc/affiner-file.json"
    with pytest.raises(OSError) as refused, folder_written_whole(Path("/proc/affiner-folder")):
        pass
    assert refused.value.filename == "/proc/affiner-folder"
