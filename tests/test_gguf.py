"""GGUF files as llama.cpp and Ollama users take them: every type the writer offers (the 4-bit one much
smaller), and a run's LoRA adapter as a llama.cpp adapter GGUF that, added to the base GGUF, is the merged
model. Checked through transformers' GGUF loader and gguf's reader always, and through llama.cpp itself
(llama-cpp-python) when it is installed.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _save, _sentencepiece_like_tokenizer, make_gemma_shaped, make_tiny_gpt2, write_config

from affiner.core.config import load_config
from affiner.core.errors import AffinerError
from affiner.core.models import load_for, tokenizer_for
from affiner.core.templates import Example, encode_prompt, load_template
from affiner.export import merge
from affiner.export.gguf_lora import ADAPTER_TYPES, write_lora_gguf
from affiner.export.gguf_writer import DEFAULT_GGUF_TYPE, GGUF_TYPES, write_gguf
from affiner.training.run import train

QUESTIONS = ["What does QUILT stand for?", "Define FROND.", "Give three colours."]
# Largest logit error, relative to the largest logit, that each type may add on a tiny random model: rounding
# bounds (f16: 2^-11, bf16: 2^-8, q8_0: 1/254, q4_0: 1/16 of a block's largest weight), summed over layers.
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1e-2, "q8_0": 3e-2, "q4_0": 0.3}


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gemma_base(tmp_path_factory) -> Path:
    return make_gemma_shaped(tmp_path_factory.mktemp("gemma-gguf"))


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory) -> Path:
    """Tiny GPT-2 with 1024 positions, the one length transformers reads back from a GPT-2 GGUF."""
    return make_tiny_gpt2(tmp_path_factory.mktemp("gpt2-gguf"), positions=1024)


@pytest.fixture(scope="module")
def bases(tiny_llama, gemma_base, gpt2_base) -> dict[str, Path]:
    return {"llama": tiny_llama, "gemma": gemma_base, "gpt2": gpt2_base}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bases) -> dict[str, Path]:
    """A LoRA run of each base, a few steps at a high learning rate so that the adapter is far from zero."""
    settings = {"train": {"max_steps": 4, "learning_rate": 5e-2, "batch_size": 2, "logging_steps": 1, "seed": 0}}
    return {name: train(load_config(str(write_config(tmp_path_factory.mktemp(f"{name}-run"), base,
                                                     "embedded:glossary-train.json", **settings))))
            for name, base in bases.items()}


def _model_and_tokenizer(base: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(base)).eval(), AutoTokenizer.from_pretrained(str(base))


def _run_models(run: Path):
    """(base model, merged model, tokenizer, template) of a run, both models in fp32."""
    config = load_config(str(run / "config.yaml"))
    tokenizer, template = tokenizer_for(config, run), load_template(run)
    base = load_for(config, full_precision=True, quantized=False).eval()
    return base, merge.tuned_model(run, config, tokenizer, template), tokenizer, template


def _prompts(tokenizer, template) -> list[list[int]]:
    return [encode_prompt(template, tokenizer, Example(instruction=q)) for q in QUESTIONS]


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _greedy(model, ids: list[int], n: int = 8) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(_logits(model, ids)[-1].argmax()))
    return ids[-n:]


def _reader(path: Path):
    from gguf import GGUFReader

    return GGUFReader(str(path))


def _field(reader, key: str):
    return reader.fields[key].contents()


# ---------------------------------------------------------------------------------------- model types


def test_the_default_type_is_four_bit():
    assert DEFAULT_GGUF_TYPE == "q4_0" and set(GGUF_TYPES) >= {"f32", "f16", "bf16", "q8_0", "q4_0"}


@pytest.mark.parametrize("gguf_type", GGUF_TYPES)
@pytest.mark.parametrize("name", ["llama", "gemma", "gpt2"])
def test_each_type_writes_and_reads_back(tmp_path, bases, name, gguf_type):
    from transformers import AutoModelForCausalLM

    model, tokenizer = _model_and_tokenizer(bases[name])
    report = write_gguf(model, tokenizer, tmp_path / "model.gguf", gguf_type)
    reader = _reader(report.path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert report.tensor_types == {k: list(types.values()).count(k) for k in set(types.values())}
    assert types["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors stay f32 in every type
    attention = "blk.0.attn_q.weight" if name != "gpt2" else "blk.0.attn_qkv.weight"
    assert types[attention] == gguf_type.upper()
    head = "output.weight" if "output.weight" in types else "token_embd.weight"
    assert types[head] == ("Q8_0" if gguf_type == "q4_0" else gguf_type.upper())
    # what transformers (and so the read-back check) rebuilds from the file computes what the model computes
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf", dtype=torch.float32).eval()
    ids = tokenizer("### Question: What does QUILT stand for?\n### Answer:")["input_ids"]
    expected, got = _logits(model, ids), _logits(back, ids)
    error = float((got - expected).abs().max() / expected.abs().max())
    assert error <= TOLERANCE[gguf_type]


def _wider_llama(folder: Path, intermediate: int, hidden: int = 128) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _sentencepiece_like_tokenizer(chat=False)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return _save(folder, LlamaForCausalLM(config), tokenizer)


def test_the_four_bit_file_is_much_smaller(tmp_path):
    model, tokenizer = _model_and_tokenizer(_wider_llama(tmp_path / "base", intermediate=256))
    sizes = {t: write_gguf(model, tokenizer, tmp_path / f"{t}.gguf", t).path.stat().st_size
             for t in ("f32", "f16", "q4_0")}
    assert sizes["q4_0"] < 0.4 * sizes["f16"] and sizes["f16"] < 0.6 * sizes["f32"]


@pytest.mark.parametrize("gguf_type", ["q4_0", "q8_0"])
def test_rows_that_are_not_whole_blocks_are_stored_f16(tmp_path, gguf_type):
    from transformers import AutoModelForCausalLM

    # ffn_down's rows hold intermediate_size = 48 weights: one and a half blocks of 32
    model, tokenizer = _model_and_tokenizer(_wider_llama(tmp_path / "base", intermediate=48, hidden=64))
    write_gguf(model, tokenizer, tmp_path / "model.gguf", gguf_type)
    types = {t.name: t.tensor_type.name for t in _reader(tmp_path / "model.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == gguf_type.upper()
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf", dtype=torch.float32)
    ids = tokenizer("Define FROND.")["input_ids"]
    assert float((_logits(back, ids) - _logits(model, ids)).abs().max() / _logits(model, ids).abs().max()) \
        <= TOLERANCE[gguf_type]


def test_an_unknown_type_is_refused_before_anything_is_written(tmp_path, tiny_llama):
    model, tokenizer = _model_and_tokenizer(tiny_llama)
    with pytest.raises(AffinerError, match=r"q4_k.*f32, f16, bf16, q8_0, q4_0"):
        write_gguf(model, tokenizer, tmp_path / "model.gguf", "q4_k")
    assert not (tmp_path / "model.gguf").exists()


# ---------------------------------------------------------------------------------------- LoRA adapter GGUF


@pytest.mark.parametrize("name", ["llama", "gemma", "gpt2"])
def test_base_plus_lora_gguf_is_the_merged_gguf(tmp_path, runs, name):
    """Each tensor of the merged model's GGUF is the base GGUF's plus alpha / rank * B A from the adapter GGUF:
    the names, shapes and row order (Llama's q/k permutation) are the ones llama.cpp adds the update to."""
    run = runs[name]
    base, merged, tokenizer, _ = _run_models(run)
    write_gguf(base, tokenizer, tmp_path / "base.gguf", "f32")
    write_gguf(merged, tokenizer, tmp_path / "merged.gguf", "f32")
    report = write_lora_gguf(run, base.config, tmp_path / "adapter.gguf")
    adapter = _reader(tmp_path / "adapter.gguf")
    assert (_field(adapter, "general.type"), _field(adapter, "adapter.type")) == ("adapter", "lora")
    assert _field(adapter, "general.architecture") == _field(_reader(tmp_path / "base.gguf"), "general.architecture")
    settings = json.loads((run / "adapter_config.json").read_text())
    assert _field(adapter, "adapter.lora.alpha") == pytest.approx(settings["lora_alpha"])
    lora = {t.name: np.array(t.data) for t in adapter.tensors}
    before = {t.name: np.array(t.data) for t in _reader(tmp_path / "base.gguf").tensors}
    after = {t.name: np.array(t.data) for t in _reader(tmp_path / "merged.gguf").tensors}
    adapted = {n.removesuffix(".lora_a") for n in lora if n.endswith(".lora_a")}
    assert len(adapted) == report.pairs and adapted <= set(before)
    assert adapted == {n for n in before if not np.array_equal(before[n], after[n])}  # nothing missed
    for weight in adapted:
        a, b = lora[f"{weight}.lora_a"], lora[f"{weight}.lora_b"]
        rows, columns = before[weight].shape
        assert a.shape == (settings["r"], columns) and b.shape == (rows, settings["r"])
        update = settings["lora_alpha"] / a.shape[0] * (b @ a)
        np.testing.assert_allclose(before[weight] + update, after[weight], rtol=0, atol=1e-5)


def test_lora_gguf_types_and_rslora_alpha(tmp_path, runs):
    """f16 and bf16 halve the file; an rsLoRA adapter's alpha is written so that alpha / rank is its scale."""
    run = runs["llama"]
    base_config = _run_models(run)[0].config
    sizes = {t: write_lora_gguf(run, base_config, tmp_path / f"{t}.gguf", t).bytes for t in ADAPTER_TYPES}
    assert sizes["f16"] == sizes["bf16"] == sizes["f32"] // 2
    copy = _adapter_copy(run, tmp_path / "rslora", use_rslora=True)
    report = write_lora_gguf(copy, base_config, tmp_path / "rslora.gguf")
    settings = json.loads((run / "adapter_config.json").read_text())
    assert report.alpha == pytest.approx(settings["lora_alpha"] * math.sqrt(settings["r"]))
    assert report.alpha / settings["r"] == pytest.approx(settings["lora_alpha"] / math.sqrt(settings["r"]))


def _adapter_copy(run: Path, folder: Path, **changes) -> Path:
    folder.mkdir(parents=True)
    shutil.copyfile(run / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    settings = json.loads((run / "adapter_config.json").read_text()) | changes
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return folder


@pytest.mark.parametrize("change,named", [
    ({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"alpha_pattern": {"q_proj": 2}}, "alpha_pattern"), ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
    ({"bias": "all"}, "bias='all'"),
    ({"peft_type": "IA3"}, "IA3")])
def test_lora_gguf_refuses_what_llama_cpp_cannot_apply(tmp_path, runs, change, named):
    run = runs["llama"]
    base_config = _run_models(run)[0].config
    copy = _adapter_copy(run, tmp_path / "adapter", **change)
    with pytest.raises(AffinerError, match=named):
        write_lora_gguf(copy, base_config, tmp_path / "adapter.gguf")
    assert not (tmp_path / "adapter.gguf").exists()


def test_lora_gguf_refuses_embedding_updates_and_another_base(tmp_path, runs, bases):
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, GPTNeoXConfig

    run = runs["llama"]
    base_config = AutoConfig.from_pretrained(str(bases["llama"]))
    copy = _adapter_copy(run, tmp_path / "embedding")
    weights = load_file(copy / "adapter_model.safetensors")
    weights["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, base_config.vocab_size)
    save_file(weights, copy / "adapter_model.safetensors")
    with pytest.raises(AffinerError, match="embed_tokens.lora_embedding_A"):
        write_lora_gguf(copy, base_config, tmp_path / "adapter.gguf")
    wider = AutoConfig.from_pretrained(str(bases["llama"]), hidden_size=64)
    with pytest.raises(AffinerError, match="does not fit this base.*another base"):
        write_lora_gguf(run, wider, tmp_path / "adapter.gguf")
    with pytest.raises(AffinerError, match="'gpt_neox' architecture"):
        write_lora_gguf(run, GPTNeoXConfig(), tmp_path / "adapter.gguf")
    assert not (tmp_path / "adapter.gguf").exists()


# ---------------------------------------------------------------------------------------- llama.cpp


def _llama_cpp(model: Path, lora: Path | None = None):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: the GGUF files are "
                                    "checked through transformers and gguf only")
    # logits_all: llama-cpp-python keeps the logits it is asked for only then
    return llama_cpp.Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=256, n_batch=256,
                           n_threads=2, seed=0, logits_all=True, verbose=False)


def _llama_cpp_greedy(llm, ids: list[int], n: int = 8) -> list[int]:
    """Greedy tokens from llama.cpp's own logits after `ids` (token ids, so no tokenizer is involved)."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


@pytest.mark.parametrize("name,base_type", [("llama", "f32"), ("llama", "f16"), ("gemma", "f32"), ("gpt2", "f32")])
def test_llama_cpp_base_plus_lora_answers_like_the_merged_model(tmp_path, runs, name, base_type):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    base, merged, tokenizer, template = _run_models(runs[name])
    write_gguf(base, tokenizer, tmp_path / "base.gguf", base_type)
    write_lora_gguf(runs[name], base.config, tmp_path / "adapter.gguf")
    prompts = _prompts(tokenizer, template)
    expected = [_greedy(merged, ids) for ids in prompts]
    assert expected != [_greedy(base, ids) for ids in prompts]  # the adapter changes the answers
    llm = _llama_cpp(tmp_path / "base.gguf", tmp_path / "adapter.gguf")
    assert [_llama_cpp_greedy(llm, ids) for ids in prompts] == expected
    for ids in prompts:  # and the logits themselves, to the rounding of the base's type and llama.cpp's f16 cache
        llm.reset()
        llm.eval(ids)
        want = _logits(merged, ids).numpy()
        got = np.array(llm.scores[:len(ids)])
        assert np.abs(got - want).max() <= max(TOLERANCE[base_type], 3e-3) * np.abs(want).max()


@pytest.mark.parametrize("name", ["llama", "gemma", "gpt2"])
def test_llama_cpp_runs_the_four_bit_file(tmp_path, runs, name):
    """The 4-bit file loads in llama.cpp, and its next-token logits follow the merged model's: the top token
    of each prompt is among the merged model's five likeliest, and the logits correlate."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    _, merged, tokenizer, template = _run_models(runs[name])
    write_gguf(merged, tokenizer, tmp_path / "model.gguf", "q4_0")
    llm = _llama_cpp(tmp_path / "model.gguf")
    for ids in _prompts(tokenizer, template):
        expected = _logits(merged, ids)[-1].numpy()
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[llm.n_tokens - 1])
        assert int(np.argmax(got)) in np.argsort(expected)[-5:]
        assert np.corrcoef(got, expected)[0, 1] > 0.9


def test_a_vocabulary_copied_from_a_gguf_base_carries_the_runs_chat_template_not_the_bases(tmp_path):
    """llama-server renders chats with the file's chat template: the base's own (an instruct GGUF's) or none
    would prompt the model otherwise than it was trained."""
    from types import SimpleNamespace

    from gguf import GGUFWriter

    from affiner.export.gguf_tokenizer import tokenizer_metadata

    source = tmp_path / "base.gguf"
    writer = GGUFWriter(str(source), "llama")
    writer.add_token_list(["<unk>", "a", "b"])
    writer.add_chat_template("{{ the base's own }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    entries, origin = tokenizer_metadata(SimpleNamespace(chat_template="{{ the run's }}"), 3, source)
    templates = [value for key, value, *_ in entries if key == "tokenizer.chat_template"]
    assert templates == ["{{ the run's }}"] and origin == "copied from base.gguf"
    assert [value for key, value, *_ in entries if key == "tokenizer.ggml.tokens"] == [["<unk>", "a", "b"]]
