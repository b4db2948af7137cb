"""Tiny random models with real tokenizers, built offline: GPT-2 (pad == eos, no BOS), Llama (adds BOS,
has a chat template) and Gemma 3 (soft-capped logits)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

# One precision on every machine: `precision: auto` would pick bf16 on a CPU with AMX (this project's) and fp32
# elsewhere, and pinned losses and exact comparisons must not depend on it. Subprocesses inherit it; the
# precision tests choose their own answer.
os.environ.setdefault("AFFINER_CPU_BF16", "0")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}"
)
CORPUS = [
    "What does QUILT stand for? QUILT stands for Queue of Unified Index Lookup Tables.",
    "### Question: Define FROND.\n### Answer: Federated Registry of Open Nautical Data.",
    "### Instruction:\nGive three colours.\n\n### Response:\nRed, green and blue.",
    "Instruction: Traduis bonjour.\nRéponse: hello. Entrée: texte.",
    "The acronym MAPLE expands to Modular Archive for Prototype Lab Experiments.",
    "user assistant system start end of turn",
]


def _bpe(special: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    return tokenizer


def _gpt2_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=_bpe(["<|endoftext|>"]), bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def _sentencepiece_like_tokenizer(chat: bool):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    raw = _bpe(special)
    bos = raw.token_to_id("<bos>")
    raw.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", additional_special_tokens=special[3:])
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _save(folder: Path, model, tokenizer) -> Path:
    torch.manual_seed(0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_gpt2(folder: Path, positions: int = 256) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _gpt2_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=positions,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return _save(folder, GPT2LMHeadModel(config), tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


def make_tiny_llama(folder: Path, context_window: int = 256, hidden_size: int = 32) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _sentencepiece_like_tokenizer(chat=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=context_window,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return _save(folder, LlamaForCausalLM(config), tokenizer)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = _sentencepiece_like_tokenizer(chat=False)
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                              final_logit_softcapping=5.0, sliding_window=64, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return _save(tmp_path_factory.mktemp("tiny-gemma"), Gemma3ForCausalLM(config), tokenizer)


@pytest.fixture(autouse=True)
def own_base_cache(tmp_path, monkeypatch):
    """Each test starts with no base answers kept by an earlier evaluation (tests/test_base_cache.py tests the
    cache), and never writes into the user's cache."""
    from affiner.evaluation import base_cache

    monkeypatch.setattr(base_cache, "folder", lambda: tmp_path / "base-evaluations")


@pytest.fixture
def qa_file(tmp_path) -> Path:
    rows = [{"question": f"What does {a} stand for?", "answer": f"{a} stands for {d}."}
            for a, d in [("QUILT", "Queue of Unified Index Lookup Tables"), ("FROND", "Federated Registry of Open Nautical Data"),
                         ("MAPLE", "Modular Archive for Prototype Lab Experiments"), ("GLINT", "Geospatial Layer"),
                         ("TANGO", "Technical Assembly"), ("BRISK", "Bureau of Regional Irrigation")]]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_config(folder: Path, base: Path | str, train_file: Path | str, **sections) -> Path:
    """A small run config for tests; `sections` override whole keys of each section."""
    import yaml

    config = {"name": "test", "output_dir": str(folder / "runs"), "method": "lora",
              "model": {"base": str(base)},
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
              "data": {"train": str(train_file), "template": "qa", "max_length": 96, "test_size": 2},
              "train": {"learning_rate": 1e-2, "max_steps": 4, "batch_size": 2, "logging_steps": 1, "seed": 0},
              # No probe and no general set unless a test asks: the default probe keeps the best step, which
              # tests of other things should not depend on (tests/test_selection.py and test_general.py cover
              # both), and the general set costs 80 more answers per model.
              "eval": {"max_new_tokens": 8, "batch_size": 4, "every_steps": None, "general": False}}
    for section, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run_cli(*argv: str) -> int:
    """`affiner ARGV` in this process, as a user runs it; returns the exit code (0, 2 for bad input, 130)."""
    from affiner import cli

    try:
        cli.main(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture
def offline_hub(monkeypatch):
    """The Hub as this machine sees it, whatever the machine: unreachable, so only the cache counts."""
    from affiner.core import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.hub_reachable.cache_clear()
    yield
    hub.hub_reachable.cache_clear()


@pytest.fixture
def interrupt_training(monkeypatch):
    """Press Ctrl-C (a real SIGINT) right after the given training step has been logged; `arm(step, times=2)`
    presses it twice, which stops training at once."""
    import signal

    from affiner.training import loop as train_mod

    real_log = train_mod.log_metrics

    def arm(step: int, times: int = 1) -> None:
        def log_then_interrupt(folder, record, trackers):
            real_log(folder, record, trackers)
            if record["step"] == step:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)

        monkeypatch.setattr(train_mod, "log_metrics", log_then_interrupt)

    arm.disarm = lambda: monkeypatch.setattr(train_mod, "log_metrics", real_log)
    return arm


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without the interpreter's teardown once pytest has reported, keeping its exit status.

    Workaround, to be investigated: after a full run (servers, Streamlit, torch and tokenizer thread
    pools in one process) native teardown sometimes aborts with "terminate called without an active
    exception" (exit 134) after every test passed. The affiner commands themselves exit 0 in the tests
    that run them as processes (chat in tmux, `affiner run`).
    """
    if _EXIT_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[0])


def make_gemma_shaped(folder: Path) -> Path:
    """Tiny Gemma 3 shaped like the real 270M (head_dim 256 = query_pre_attn_scalar, no logit soft-cap), norms
    away from zero so that GGUF's +1 offset on them is exercised: what transformers reads back from a GGUF."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = _sentencepiece_like_tokenizer(chat=False)
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                              max_position_embeddings=256, sliding_window=64, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(0, 0.2)
    return _save(folder, model, tokenizer)


def copy_run(run: Path, target: Path, **config_changes) -> Path:
    """A copy of a run folder under `target` (without its engine exports), its config.yaml changed by
    `section__key=value` pairs."""
    import shutil

    import yaml

    copy = target / run.name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("engines"))
    if config_changes:
        raw = yaml.safe_load((copy / "config.yaml").read_text())
        for dotted, value in config_changes.items():
            node = raw
            *parents, leaf = dotted.split("__")
            for part in parents:
                node = node[part]
            node[leaf] = value
        (copy / "config.yaml").write_text(yaml.safe_dump(raw))
    return copy
