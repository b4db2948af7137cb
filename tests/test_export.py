"""affiner export: adapter, merged model, GGUF, model card and Hub push, checked on tiny models.

The runs are trained once per module (a few steps at a high learning rate, so that the adapter is far
from zero); every export is written under tmp_path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import copy_run, make_gemma_shaped, make_tiny_gpt2, run_cli, write_config
from fake_hub import FakeHub
from safetensors.torch import load_file, save_file

from affiner.core.card import hub_id
from affiner.core.config import load_config
from affiner.core.errors import AffinerError
from affiner.core.files import read_json, write_json
from affiner.core.formatting import format_aggregate
from affiner.core.models import load_model
from affiner.core.templates import Example, build_template, encode_prompt, load_template
from affiner.export import export as export_mod
from affiner.export import hub, merge, ollama
from affiner.training.run import train

TOKEN = "hf_AffinerTestSecret0123456789abcdefXYZ"
PROMPT = "### Question: What does QUILT stand for?\n### Answer:"


# ---------------------------------------------------------------------------------------- fixtures


def _train(root: Path, base: Path, **sections) -> Path:
    settings = {"train": {"max_steps": 4, "learning_rate": 5e-2, "batch_size": 2, "logging_steps": 1, "seed": 0}}
    settings.update(sections)
    return train(load_config(str(write_config(root, base, "embedded:glossary-train.json", **settings))))


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_llama) -> Path:
    """A LoRA run of tiny Llama, evaluated on two questions so that the model card has numbers."""
    from affiner.evaluation.evaluate import evaluate

    folder = _train(tmp_path_factory.mktemp("llama-run"), tiny_llama)
    evaluate(folder, max_questions=2)
    return folder


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory) -> Path:
    """Tiny GPT-2 with the 1024 positions of every real GPT-2: the one length transformers reads back from GGUF."""
    return make_tiny_gpt2(tmp_path_factory.mktemp("gpt2-1024"), positions=1024)


@pytest.fixture(scope="module")
def gemma_base(tmp_path_factory) -> Path:
    return make_gemma_shaped(tmp_path_factory.mktemp("gemma-shaped"))


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, gpt2_base) -> Path:
    return _train(tmp_path_factory.mktemp("gpt2-run"), gpt2_base)


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory, gemma_base) -> Path:
    return _train(tmp_path_factory.mktemp("gemma-run"), gemma_base, train={"max_steps": 2})


def affiner_export(*argv: str) -> int:
    return run_cli("export", *argv)


def _ids(tokenizer, text: str = PROMPT) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt")["input_ids"]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _greedy(model, ids: torch.Tensor, n: int = 6) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------- adapter


def test_adapter_export_reloads_with_plain_peft_and_disables_to_the_base(tmp_path, llama_run, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_mod.export(llama_run, tmp_path / "export")
    adapter = out / "adapter"
    assert {"adapter_model.safetensors", "adapter_config.json", "template.json", "tokenizer.json"} <= \
        {p.name for p in adapter.iterdir()}
    weights, trained = load_file(adapter / "adapter_model.safetensors"), load_file(llama_run / "adapter_model.safetensors")
    assert weights.keys() == trained.keys() and all(torch.equal(weights[k], trained[k]) for k in weights)
    assert max(float(v.abs().max()) for k, v in weights.items() if "lora_B" in k) > 1e-2  # far from its zero start
    # a local base by its last part, as the card names it: never a path of this machine, which --push would publish
    assert read_json(adapter / "adapter_config.json")["base_model_name_or_path"] == Path(tiny_llama).name
    assert load_template(adapter) == load_template(llama_run)

    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    ids = _ids(tokenizer)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(adapter)).eval()
    ours = load_model(str(tiny_llama), adapter=llama_run)
    base = _logits(load_model(str(tiny_llama)), ids)
    tuned = _logits(ours, ids)
    torch.testing.assert_close(_logits(plain, ids), tuned, rtol=0, atol=1e-6)
    assert float((tuned - base).abs().max()) > 1e-2  # the adapter changes the model
    with plain.disable_adapter():
        torch.testing.assert_close(_logits(plain, ids), base, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------- merged


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_merged_equals_unmerged_equals_the_reloaded_export(request, tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = request.getfixturevalue(f"{name}_run")
    config = load_config(str(run / "config.yaml"))
    out = export_mod.export(run, tmp_path / "export", merged=True)
    tokenizer = AutoTokenizer.from_pretrained(str(out / "merged"))
    ids = _ids(tokenizer)
    unmerged = _logits(load_model(config.model.base, adapter=run), ids)
    merged = merge.tuned_model(run, config, tokenizer, load_template(run))
    reloaded = AutoModelForCausalLM.from_pretrained(str(out / "merged"))
    torch.testing.assert_close(_logits(merged, ids), unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(reloaded, ids), unmerged, rtol=0, atol=1e-5)
    saved = json.loads((out / "merged" / "config.json").read_text())
    assert saved["use_cache"] is True and "quantization_config" not in saved
    assert set(load_file(out / "merged" / "model.safetensors")) and \
        not any("lora" in k for k in load_file(out / "merged" / "model.safetensors"))
    generation = json.loads((out / "merged" / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert (eos if isinstance(eos, list) else [eos]) == list(load_template(run).stop_token_ids)
    assert load_template(out / "merged") == load_template(run)
    # readable by whoever may read the export (transformers writes the weights through a 0600 temporary file)
    assert {oct(p.stat().st_mode & 0o777) for p in (out / "merged").iterdir()} == {oct(0o666 & ~_umask())}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_current_folder_as_output_is_refused(tmp_path, llama_run, monkeypatch, capsys):
    """`--output .` in an empty folder: swapping it for the export would leave the shell in a removed folder (it was
    an internal error before)."""
    run = llama_run
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert run_cli("export", str(run), "--output", ".") == 2
    err = capsys.readouterr().err
    assert "--output . is the current folder" in err and "--output export" in err
    assert not any((tmp_path / "here").iterdir())


def test_a_nan_in_the_adapter_is_refused_and_nothing_is_written(tmp_path, llama_run):
    broken = copy_run(llama_run, tmp_path)
    weights = load_file(broken / "adapter_model.safetensors")
    name = min(k for k in weights if "lora_B" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, broken / "adapter_model.safetensors")
    (tmp_path / "exports").mkdir()
    with pytest.raises(AffinerError, match=re.escape(name)):
        export_mod.export(broken, tmp_path / "exports" / "x", merged=True)
    assert list((tmp_path / "exports").iterdir()) == []


def test_a_non_finite_merged_weight_is_named(tmp_path, llama_run, tiny_llama):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    weights = load_file(base / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    run = copy_run(llama_run, tmp_path / "runs", model__base=str(base))
    with pytest.raises(AffinerError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        export_mod.export(run, tmp_path / "x", merged=True)
    assert not (tmp_path / "x").exists() and not _leftovers(tmp_path)


def test_a_qlora_run_merges_into_a_full_precision_base(tmp_path, capsys, llama_run, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = copy_run(llama_run, tmp_path / "runs", method="qlora")
    out = export_mod.export(run, tmp_path / "x", merged=True)
    assert "full precision" in capsys.readouterr().out
    ids = _ids(AutoTokenizer.from_pretrained(str(out / "merged")))
    unmerged = _logits(load_model(str(tiny_llama), adapter=run), ids)  # fp32 base, no 4-bit anywhere
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(str(out / "merged")), ids), unmerged,
                               rtol=0, atol=1e-5)
    assert "QLoRA" in (out / "README.md").read_text()


def test_a_full_fine_tune_exports_the_whole_model_and_its_gguf(tmp_path, gpt2_base):
    from transformers import AutoModelForCausalLM

    run = _train(tmp_path, gpt2_base, method="full", train={"max_steps": 2, "learning_rate": 1e-3})
    out = export_mod.export(run, tmp_path / "x", merged=True, gguf=True, gguf_type="f32")
    assert (out / "model" / "model.safetensors").is_file() and not (out / "adapter").exists()
    ids = torch.tensor([[5, 6, 7, 8]])
    tuned = _logits(load_model(str(run)), ids)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(str(out / "model")), ids), tuned,
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf"), ids),
                               tuned, rtol=0, atol=1e-4)
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front["library_name"] == "transformers" and "full-fine-tune" in front["tags"]


def _base_recording(tmp_path: Path, base: Path, recorded: dict) -> Path:
    """A copy of `base` whose config.json records `recorded` as its dtype (the weights stay as they are)."""
    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    config = json.loads((copy / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (copy / "config.json").write_text(json.dumps({**config, **recorded}))
    return copy


@pytest.mark.parametrize("option,recorded,expected", [
    ("fp16", {}, torch.float16),
    ("bf16", {"dtype": "float32"}, torch.bfloat16),
    ("fp32", {"dtype": "bfloat16"}, torch.float32),
    ("base", {"torch_dtype": "float16"}, torch.float16),  # the key older transformers wrote
    (None, {"dtype": "bfloat16"}, torch.bfloat16),  # base by default
    (None, {}, torch.float32),  # nothing recorded, as in the embedded Gemma's converted folder
])
def test_merged_weights_are_saved_in_the_dtype_asked_for(tmp_path, llama_run, tiny_llama, option, recorded, expected):
    from transformers import AutoModelForCausalLM

    run = copy_run(llama_run, tmp_path / "runs", model__base=str(_base_recording(tmp_path, tiny_llama, recorded)))
    out = tmp_path / "x"
    assert affiner_export(str(run), "--output", str(out), "--merged", *(["--dtype", option] if option else [])) == 0
    weights = load_file(out / "merged" / "model.safetensors")
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {expected}
    name = str(expected).removeprefix("torch.")
    assert read_json(out / export_mod.EXPORT_FILE)["dtype"] == name
    assert read_json(out / export_mod.EXPORT_FILE)["merge_device"] == "cpu"
    reloaded = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype="auto")
    assert next(reloaded.parameters()).dtype == expected
    config = load_config(str(run / "config.yaml"))
    unmerged = _logits(load_model(config.model.base, adapter=run), _ids(_tokenizer(out)))
    tolerance = 1e-5 if expected == torch.float32 else 0.1  # one rounding of every weight, nothing more
    torch.testing.assert_close(_logits(reloaded.float(), _ids(_tokenizer(out))), unmerged, rtol=0, atol=tolerance)


def _tokenizer(out: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(out / "merged"))


def test_the_merge_runs_on_the_cpu_unless_asked_even_with_a_gpu(tmp_path, monkeypatch, llama_run):
    monkeypatch.setattr(merge, "device", lambda: torch.device("cuda"))  # what a GPU machine answers
    out = export_mod.export(llama_run, tmp_path / "x", merged=True)
    assert read_json(out / export_mod.EXPORT_FILE)["merge_device"] == "cpu"
    assert merge.resolve_merge_device() == merge.resolve_merge_device("cpu") == torch.device("cpu")
    assert merge.resolve_merge_device("auto") == torch.device("cuda")
    with pytest.raises(AffinerError, match="--merge-device"):
        merge.resolve_merge_device("gpu")


def test_a_weight_that_overflows_fp16_is_refused_by_name(tiny_llama):
    model = load_model(str(tiny_llama))
    with torch.no_grad():
        model.get_parameter("model.layers.0.mlp.up_proj.weight")[0, 0] = 1e6
    with pytest.raises(AffinerError, match=r"model\.layers\.0\.mlp\.up_proj\.weight overflows float16.*bf16"):
        merge.cast_model(model, torch.float16)


def test_export_options_are_refused_before_anything_is_written(tmp_path, capfd, llama_run):
    for option, value in (("--dtype", "int8"), ("--merge-device", "gpu")):
        assert affiner_export(str(llama_run), "--output", str(tmp_path / "x"), "--merged", option, value) == 2
        err = capfd.readouterr().err
        assert "invalid choice" in err and value in err
    _one_paragraph_error(capfd, affiner_export(str(llama_run), "--output", str(tmp_path / "x"), "--dtype", "bf16"),
                         "--dtype only applies with --merged")
    assert not (tmp_path / "x").exists() and not _leftovers(tmp_path)


# ---------------------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("name", ["llama", "gemma", "gpt2"])
def test_gguf_loads_back_through_transformers_and_answers_like_the_merged_model(request, tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = request.getfixturevalue(f"{name}_run")
    out = export_mod.export(run, tmp_path / "export", merged=True, gguf=True, gguf_type="f32")
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out / "merged"))
    back = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf").eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(out), gguf_file="model.gguf")
    ids = _ids(tokenizer)
    assert _ids(gguf_tokenizer).tolist() == ids.tolist()
    assert _greedy(back, ids) == _greedy(merged, ids)
    torch.testing.assert_close(_logits(back, ids), _logits(merged, ids), rtol=0, atol=1e-4)
    # Whoever prompts the export by its chat template (vLLM, llama-server --jinja) prompts it as training did,
    # not with the base's own template.
    from gguf import GGUFReader

    trained = encode_prompt(load_template(run), tokenizer, Example(instruction="What does QUILT stand for?"))
    asked = [{"role": "user", "content": "What does QUILT stand for?"}]
    assert tokenizer.apply_chat_template(asked, add_generation_prompt=True, tokenize=True)["input_ids"] == trained
    field = GGUFReader(out / "model.gguf").fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode("utf-8") == tokenizer.chat_template

    # the card's one-shot line gives the rendered prompt: not a conversation, which the file's template would start
    assert "llama-completion -m model.gguf -p " in (out / "README.md").read_text()
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and "ollama create" in modelfile
    assert "### Question: {{ .Content }}\n### Answer:{{ end }}{{ end }}" in modelfile
    for token in tokenizer.convert_ids_to_tokens(list(load_template(run).stop_token_ids)):
        assert f"PARAMETER stop {json.dumps(token)}" in modelfile


@pytest.mark.parametrize("gguf_type,ggml_type,file_type", [("f16", "F16", 1), ("q8_0", "Q8_0", 7), ("bf16", "BF16", 32)])
def test_gguf_types(tmp_path, llama_run, gguf_type, ggml_type, file_type):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_mod.export(llama_run, tmp_path / "x", gguf=True, gguf_type=gguf_type)
    reader = GGUFReader(str(out / "model.gguf"))
    assert int(reader.fields["general.file_type"].contents()) == file_type
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == ggml_type and types["blk.0.attn_norm.weight"] == "F32"
    config = load_config(str(llama_run / "config.yaml"))
    tokenizer = AutoTokenizer.from_pretrained(str(llama_run))
    merged = merge.tuned_model(llama_run, config, tokenizer, load_template(llama_run))
    back = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf")
    ids = _ids(tokenizer)
    torch.testing.assert_close(_logits(back, ids), _logits(merged, ids), rtol=0, atol=0.05)


def test_gguf_refuses_what_it_cannot_write(tmp_path, llama_run, tiny_gemma, tiny_gpt2):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig

    from affiner.export.gguf_writer import write_gguf

    neox = tmp_path / "neox"
    GPTNeoXConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64).save_pretrained(neox)
    run = copy_run(llama_run, tmp_path / "runs", model__base=str(neox))
    with pytest.raises(AffinerError, match=r"'gpt_neox' architecture.*llama.*gemma3.*gpt2.*--merged"):
        export_mod.export(run, tmp_path / "x", gguf=True)
    assert not (tmp_path / "x").exists()
    # settings that transformers (and llama.cpp) would not read back from the file
    for base, setting in ((tiny_gemma, "final_logit_softcapping=5.0"), (tiny_gpt2, "n_positions=256")):
        target = tmp_path / base.name / "model.gguf"
        target.parent.mkdir()
        model, tokenizer = AutoModelForCausalLM.from_pretrained(str(base)), AutoTokenizer.from_pretrained(str(base))
        with pytest.raises(AffinerError, match=re.escape(setting)):
            write_gguf(model, tokenizer, target)
        assert not target.exists()


def test_chat_template_modelfile(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    modelfile = ollama.modelfile(build_template("chat", tokenizer), tokenizer, "my run")
    template = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.DOTALL).group(1)
    assert template == "{{ if .System }}<start_of_turn>system\n{{ .System }}<end_of_turn>\n{{ end }}" \
                       "<start_of_turn>user\n{{ .Prompt }}<end_of_turn>\n<start_of_turn>assistant\n" \
                       "{{ .Response }}<end_of_turn>\n"  # BOS left to llama.cpp, which adds it itself
    assert 'PARAMETER stop "<end_of_turn>"' in modelfile and 'PARAMETER stop "<eos>"' in modelfile
    assert "ollama create my-run -f Modelfile" in modelfile


# ---------------------------------------------------------------------------------------- model card


def test_model_card_describes_the_run_from_its_files(tmp_path, llama_run, tiny_llama):
    out = export_mod.export(llama_run, tmp_path / "x")
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and front["license"] == "other" and "lora" in front["tags"]
    config = load_config(str(llama_run / "config.yaml"))
    assert f"`{tiny_llama.name}`" in card and str(tiny_llama) not in card  # no path of this machine
    assert "| method | lora |" in card
    assert f"| LoRA rank r | {config.lora.r} |" in card and f"| LoRA alpha | {config.lora.alpha} |" in card
    data = read_json(llama_run / "data.json")
    for side in ("train", "test"):
        assert data[side]["sha256"] in card and f"| {data[side]['examples']} |" in card
    summary, metrics = read_json(llama_run / "summary.json"), read_json(llama_run / "metrics.json")
    for model in ("base", "tuned"):
        assert format_aggregate(metrics["metrics"]["contains"][model], "rate") in card
        assert format_aggregate(metrics["metrics"]["rouge_l"][model], "score") in card
    assert f"{summary['tuned']['questions']} held-out questions" in card and summary["decoding"] in card
    # two questions: no interval in the table, so the card does not announce any (nor does the report's plot)
    assert "Too few questions for intervals" in card and "Intervals are 95 %" not in card
    assert "too few questions for intervals" in (llama_run / "report.html").read_text()
    assert "Template `qa`" in card and "### Question:" in card
    assert "licence: not stated in the base model folder" in card
    assert f"| steps trained | {read_json(llama_run / 'run.json')['steps']} |" in card


def test_model_card_of_an_unevaluated_run_says_how_to_evaluate(tmp_path, gpt2_run):
    card = (export_mod.export(gpt2_run, tmp_path / "x") / "README.md").read_text()
    assert f"Not evaluated yet: run `affiner evaluate` on the run folder `{gpt2_run.name}`" in card


def test_base_licences(tmp_path, offline_hub):
    assert hub.base_licence("embedded:gemma-3-270m")[0] == "gemma"
    assert "ai.google.dev/gemma/terms" in hub.base_licence("embedded:gemma-3-270m")[1]
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# A model\n")
    assert hub.base_licence(str(folder))[0] == "apache-2.0"
    licence, text = hub.base_licence("some-org/never-downloaded-model")
    assert licence is None and "see the base model's card" in text
    assert hub_id("embedded:gemma-3-270m") == "google/gemma-3-270m"
    assert hub_id(str(folder)) is None and hub_id("org/name") == "org/name"


# ---------------------------------------------------------------------------------------- the Hub


def _no_token(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def _files_containing(root: Path, secret: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_push_uploads_the_export_to_a_private_repo_and_the_token_stays_secret(tmp_path, capfd, monkeypatch,
                                                                              llama_run):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub(TOKEN) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert affiner_export(str(llama_run), "--output", str(tmp_path / "x"), "--push", "my-org/glossary") == 0
        assert affiner_export(str(llama_run), "--output", str(tmp_path / "y"), "--push", "my-org/open",
                              "--public") == 0
    out = tmp_path / "x"
    repo = hub.repos["my-org/glossary"]
    assert repo["private"] is True and hub.repos["my-org/open"]["private"] is False
    local = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    local.pop(export_mod.EXPORT_FILE)
    assert repo["files"] == local and "adapter/adapter_model.safetensors" in repo["files"]
    assert not hub.unexpected
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    captured = capfd.readouterr()
    assert f"{hub.url}/my-org/glossary" in captured.out
    for root in (tmp_path, llama_run):
        assert _files_containing(root, TOKEN.encode()) == []
    assert TOKEN not in captured.out and TOKEN not in captured.err


def test_hub_errors_are_shown_without_the_token(tmp_path, capfd, monkeypatch, llama_run):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub("another-token", echo_auth=True) as hub:  # refuses the token, and quotes it back
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        code = affiner_export(str(llama_run), "--output", str(tmp_path / "x"), "--push", "my-org/glossary")
    err = capfd.readouterr().err
    assert code == 2 and "uploading" in err and "***" in err and TOKEN not in err and "Traceback" not in err
    assert (tmp_path / "x" / "README.md").is_file()  # the export itself is complete and kept
    assert _files_containing(tmp_path, TOKEN.encode()) == []


def test_push_without_a_token_or_a_reachable_hub_fails_before_exporting(tmp_path, capfd, monkeypatch, llama_run):
    _no_token(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert affiner_export(str(llama_run), "--output", str(tmp_path / "x"), "--push", "my-org/glossary") == 2
    assert "set HF_TOKEN" in capfd.readouterr().err and not (tmp_path / "x").exists()

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    started = time.time()
    assert affiner_export(str(llama_run), "--output", str(tmp_path / "x"), "--push", "my-org/glossary") == 2
    err = capfd.readouterr().err
    assert "unreachable" in err and time.time() - started < 5 and not (tmp_path / "x").exists()
    assert TOKEN not in err


# ---------------------------------------------------------------------------------------- the command


def _one_paragraph_error(capfd, code: int, fragment: str) -> None:
    err = capfd.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("affiner export: error:") and fragment in err, err
    assert "\n" not in err and "Traceback" not in err


def test_cli_errors(tmp_path, capfd, llama_run):
    _one_paragraph_error(capfd, affiner_export(str(tmp_path / "nope"), "--output", str(tmp_path / "x")),
                         "does not exist")
    unfinished = copy_run(llama_run, tmp_path / "runs")
    write_json(unfinished / "run.json", {**read_json(unfinished / "run.json"), "status": "training"})
    _one_paragraph_error(capfd, affiner_export(str(unfinished), "--output", str(tmp_path / "x")),
                         "has not finished training")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    before = (taken / "notes.txt").stat().st_mtime_ns
    # never advised to --overwrite a folder that --overwrite refuses
    _one_paragraph_error(capfd, affiner_export(str(llama_run), "--output", str(taken)), "not written by affiner export")
    _one_paragraph_error(capfd, affiner_export(str(llama_run), "--output", str(taken), "--overwrite"),
                         "not written by affiner export")
    assert [p.name for p in taken.iterdir()] == ["notes.txt"] and (taken / "notes.txt").stat().st_mtime_ns == before
    _one_paragraph_error(capfd, affiner_export(str(llama_run), "--output", str(tmp_path / "x"), "--gguf",
                                               "--gguf-type", "q4_k"), "q4_k")
    _one_paragraph_error(capfd, affiner_export(str(llama_run), "--output", str(llama_run / "export")),
                         "overlaps the run folder")
    assert not (tmp_path / "x").exists() and not _leftovers(tmp_path)
    if Path("/proc/self").is_dir():  # a folder where nothing can be made, even by root: named as given
        _one_paragraph_error(capfd, affiner_export(str(llama_run), "--output", "/proc/affiner-export"),
                             "/proc/affiner-export: No such file or directory")


def test_overwrite_replaces_an_export_only_once_the_new_one_is_complete(tmp_path, llama_run):
    out = export_mod.export(llama_run, tmp_path / "x")
    with pytest.raises(AffinerError, match="already exists"):
        export_mod.export(llama_run, out)
    broken = copy_run(llama_run, tmp_path / "runs")
    weights = load_file(broken / "adapter_model.safetensors")
    weights[next(iter(weights))][0, 0] = float("nan")
    save_file(weights, broken / "adapter_model.safetensors")
    card = (out / "README.md").read_text()
    with pytest.raises(AffinerError, match="NaN"):
        export_mod.export(broken, out, overwrite=True)
    assert (out / "README.md").read_text() == card and not _leftovers(tmp_path)
    export_mod.export(llama_run, out, merged=True, overwrite=True)
    assert (out / "merged" / "model.safetensors").is_file() and not _leftovers(tmp_path)


# ---------------------------------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_embedded_gemma_exports_a_gguf_that_answers_like_the_merged_model(tmp_path, monkeypatch):
    """The default base end to end: Gemma 3 270M from its GGUF, one LoRA step, merged and written back to GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = train(load_config(str(write_config(tmp_path, "embedded:gemma-3-270m", "embedded:glossary-train.json",
                                             train={"max_steps": 1, "batch_size": 2, "learning_rate": 1e-3}))))
    out = export_mod.export(run, tmp_path / "export", merged=True, gguf=True, gguf_type="f32")
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "google/gemma-3-270m" and front["license"] == "gemma"
    assert "ai.google.dev/gemma/terms" in card
    tokenizer = AutoTokenizer.from_pretrained(str(out / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    back = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32).eval()
    ids = _ids(tokenizer)
    assert _greedy(back, ids, 8) == _greedy(merged, ids, 8)
    torch.testing.assert_close(_logits(back, ids), _logits(merged, ids), rtol=0, atol=1e-3)
    source = ollama.source_gguf("embedded:gemma-3-270m")
    from affiner.export.gguf_metadata import read_metadata

    copied = {k: v for k, v, *_ in read_metadata(out / "model.gguf", "tokenizer.")}
    assert copied.pop("tokenizer.chat_template") == tokenizer.chat_template  # the run's prompt format, for chats
    original = {k: v for k, v, *_ in read_metadata(source, "tokenizer.") if k != "tokenizer.chat_template"}
    assert copied == original  # the vocabulary, as llama.cpp had it


CONVERSATIONS = {
    "one question": [{"role": "user", "content": "What does QUILT stand for?"}],
    "with a system message": [{"role": "system", "content": "Answer like a pirate."},
                              {"role": "user", "content": "What does QUILT stand for?"}],
    "a second question": [{"role": "user", "content": "What does QUILT stand for?"},
                          {"role": "assistant", "content": "Queue of Unified Index Lookup Tables."},
                          {"role": "user", "content": "And FROND?"}],
    "both": [{"role": "system", "content": "Answer like a pirate."},
             {"role": "user", "content": "What does QUILT stand for?"},
             {"role": "assistant", "content": "Queue of Unified Index Lookup Tables."},
             {"role": "user", "content": "And FROND?"}],
}


@pytest.mark.parametrize("name", ["qa", "alpaca", "instruction", "chat"])
@pytest.mark.parametrize("system", [None, "Be brief."], ids=["no-system-prompt", "system-prompt"])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_the_modelfile_prompts_every_turn_as_affiner_does(tiny_llama, name, system, conversation):
    """`ollama run` is a conversation: on each turn the prompt Ollama renders from the Modelfile (emulated by
    tests/ollama_templates.py) must be the one affiner's own chat and server give the model: a text template
    answers the last question alone, a chat template writes the system prompt once, at the start."""
    from transformers import AutoTokenizer

    from affiner.interfaces.engine import Engine
    from ollama_templates import render

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    template = build_template(name, tokenizer, system_prompt=system)
    modelfile = ollama.modelfile(template, tokenizer, "my run")
    go_template = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.DOTALL).group(1)
    system_line = re.search(r'SYSTEM """(.*?)"""', modelfile, re.DOTALL)
    messages = CONVERSATIONS[conversation]
    prompt = render(go_template, messages, system_line.group(1) if system_line else None)
    # llama.cpp adds BOS itself (tokenizer.ggml.add_bos_token), then reads special tokens in the text.
    ollama_ids = tokenizer(prompt)["input_ids"]
    assert ollama_ids == Engine(template=template, tokenizer=tokenizer, model=None).prompt_ids(messages)


def test_the_vllm_script_says_when_its_hub_base_is_not_the_weights_trained():
    """The embedded base is the Q4_K_M file dequantised: vLLM's base from the Hub is the original, not those."""
    said = "\n".join(export_mod.vllm_script_comments({"stop": [], "stop_token_ids": []}, "embedded:gemma-3-270m"))
    assert "Q4_K_M" in said and "google/gemma-3-270m holds the original weights" in said and "--merged" in said
    assert "original weights" not in "\n".join(export_mod.vllm_script_comments({"stop": [], "stop_token_ids": []}, "gpt2"))


def test_an_adapter_exports_without_its_base_at_hand(tmp_path, llama_run):
    """A run copied to another machine, its base not there: the adapter, card and tokenizer are the run's own."""
    moved = copy_run(llama_run, tmp_path / "moved", model__base=str(tmp_path / "not-here"))
    out = export_mod.export(moved, tmp_path / "export")
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
