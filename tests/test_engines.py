"""Hand-off to serving engines: `affiner export --for vllm|llama.cpp|ollama` and `affiner serve --engine`.

No engine is installed here: the prompt format is checked through transformers' Jinja support (what vLLM
renders, and the Jinja llama.cpp reads), the commands are checked as argv lists, and the launch is run
against fake `vllm` / `llama-server` executables on PATH that record how they were started.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_run, make_gemma_shaped, run_cli, write_config

from affiner.core.card import ABSOLUTE_PATH
from affiner.core.config import load_config
from affiner.core.errors import AffinerError
from affiner.core.files import read_json
from affiner.core.templates import TEXT_TEMPLATES, Example, adds_bos, build_template, encode_prompt, render_prompt
from affiner.export import engines
from affiner.interfaces import engines as launch
from affiner.training.run import train

QUESTIONS = ["What does QUILT stand for?", "Réponds: \"{{ x }}\" {% if %}\n\tet \\n ?"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama) -> Path:
    root = tmp_path_factory.mktemp("engines-run")
    settings = {"train": {"max_steps": 2, "learning_rate": 5e-2, "batch_size": 2, "logging_steps": 1, "seed": 0}}
    return train(load_config(str(write_config(root, tiny_llama, "embedded:glossary-train.json", **settings))))


def _tokenizer(base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base))


def _fake(bin_dir: Path, name: str, code: int = 0) -> Path:
    """An executable that records its working folder, argv and API key variables, then exits with `code`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    record = bin_dir / f"{name}.json"
    path.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "keys = {k: v for k, v in os.environ.items() if k.endswith('API_KEY')}\n"
                    f"json.dump({{'cwd': os.getcwd(), 'argv': sys.argv[1:], 'env': keys}}, open({str(record)!r}, 'w'))\n"
                    f"sys.exit({code})\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return record


def _one_paragraph_error(capfd, code: int, verb: str, *fragments: str) -> str:
    err = capfd.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith(f"affiner {verb}: error:") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ---------------------------------------------------------------------------------------- the prompt format


# Llama adds BOS and has a chat template; GPT-2 adds no BOS and has none.
@pytest.mark.parametrize("base,name", [("tiny_llama", n) for n in [*TEXT_TEMPLATES, "chat"]] +
                         [("tiny_gpt2", n) for n in TEXT_TEMPLATES])
@pytest.mark.parametrize("system", [None, "Answer in one sentence."])
def test_the_jinja_template_renders_exactly_the_trained_prompt(request, name, system, base):
    tokenizer = _tokenizer(request.getfixturevalue(base))
    template = build_template(name, tokenizer, system_prompt=system)
    jinja = engines.chat_template(template, tokenizer)
    for question in QUESTIONS:
        rendered = engines.render_chat_template(jinja, tokenizer, [{"role": "user", "content": question}])
        text = render_prompt(template, Example(instruction=question), tokenizer)
        bos = tokenizer.bos_token if not template.is_chat and adds_bos(tokenizer) else ""
        assert rendered == bos + text
        # engines tokenise a chat prompt without adding special tokens: the ids must be training's
        assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == \
            encode_prompt(template, tokenizer, Example(instruction=question))
    engines.check_chat_template(jinja, template, tokenizer)


@pytest.mark.parametrize("name", [*TEXT_TEMPLATES, "chat"])
@pytest.mark.parametrize("run_prompt", [None, "Run prompt."])
@pytest.mark.parametrize("client_prompt", ["Client prompt.", ""], ids=["client-prompt", "empty-client-prompt"])
def test_a_client_system_message_replaces_the_runs_as_affiner_serve_does(tiny_llama, name, run_prompt, client_prompt):
    from affiner.interfaces.engine import Engine

    tokenizer = _tokenizer(tiny_llama)
    template = build_template(name, tokenizer, system_prompt=run_prompt)
    jinja = engines.chat_template(template, tokenizer)
    messages = [{"role": "system", "content": client_prompt}, {"role": "user", "content": QUESTIONS[0]}]
    served = Engine(template=template, tokenizer=tokenizer, model=None).prompt_ids(messages)
    rendered = engines.render_chat_template(jinja, tokenizer, messages)
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == served
    assert "Run prompt." not in rendered


def test_a_text_template_answers_the_last_user_message_only(tiny_gpt2):
    tokenizer = _tokenizer(tiny_gpt2)
    template = build_template("qa", tokenizer)
    jinja = engines.chat_template(template, tokenizer)
    history = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "one"},
               {"role": "user", "content": "second"}]
    assert engines.render_chat_template(jinja, tokenizer, history) == "### Question: second\n### Answer:"
    with pytest.raises(Exception, match="the last message must come from the user"):
        engines.render_chat_template(jinja, tokenizer, history[:2])


def test_a_template_that_cannot_be_reproduced_is_refused(tiny_llama):
    from dataclasses import replace

    tokenizer = _tokenizer(tiny_llama)
    template = build_template("qa", tokenizer)
    with pytest.raises(AffinerError, match="cannot be written as a Jinja chat template"):
        engines.check_chat_template("{{ messages[-1]['content'] }}", template, tokenizer)
    with pytest.raises(AffinerError, match="'qa' template"):
        engines.check_chat_template(engines.chat_template(replace(template, prompt="Q: {instruction}"), tokenizer),
                                    template, tokenizer)


def test_stop_settings(tiny_llama, tiny_gpt2):
    gpt2 = _tokenizer(tiny_gpt2)
    assert engines.stop_settings(build_template("qa", gpt2), gpt2) == {
        "stop_token_ids": [gpt2.eos_token_id], "stop_tokens": ["<|endoftext|>"],
        "stop": ["### Question:", "### Answer:"]}
    llama = _tokenizer(tiny_llama)
    chat = engines.stop_settings(build_template("chat", llama), llama)
    assert chat["stop"] == [] and set(chat["stop_tokens"]) == {"<eos>", "<end_of_turn>"}


# ---------------------------------------------------------------------------------------- commands


def test_targets_parse_from_repeated_and_comma_separated_flags():
    assert engines.parse_targets(["vllm,llama.cpp", "ollama", " vllm "]) == ("vllm", "llama.cpp", "ollama")
    assert engines.parse_targets(None) == ()
    with pytest.raises(AffinerError, match=r"unknown --for 'tgi'; supported: vllm, llama.cpp, ollama"):
        engines.parse_targets(["vllm,tgi"])
    with pytest.raises(AffinerError, match="--for ' , ' names no engine"):
        engines.parse_targets([" , "])


@pytest.mark.parametrize("rank,expected", [(1, 1), (4, 8), (8, 8), (17, 32), (300, 320), (512, 512)])
def test_vllm_rank_is_the_smallest_it_accepts(rank, expected):
    assert engines.vllm_rank(rank) == expected


def test_vllm_rank_above_its_largest_is_refused():
    with pytest.raises(AffinerError, match="LoRA rank 513 is above the largest vLLM serves"):
        engines.vllm_rank(513)


def test_vllm_command():
    assert engines.vllm_argv("org/base", {"a": "/runs/a", "b": "/runs/b"}, 16, "t.jinja", "gen", "0.0.0.0", 9000,
                             revision="abc", trust_remote_code=True, quantized=True) == [
        "vllm", "serve", "org/base", "--served-model-name", "base", "--enable-lora",
        "--lora-modules", "a=/runs/a", "b=/runs/b", "--max-lora-rank", "16", "--max-loras", "2",
        "--chat-template", "t.jinja", "--generation-config", "gen", "--host", "0.0.0.0", "--port", "9000",
        "--revision", "abc", "--trust-remote-code", "--quantization", "bitsandbytes"]
    assert engines.vllm_argv("/m", {"tuned": "adapter"}, 4, "t", "g", program=("python", "-m", "v"))[:5] == \
        ["python", "-m", "v", "serve", "/m"]


def test_llama_server_command():
    assert engines.llama_server_argv("base.gguf", ["adapter.gguf"], "t.jinja") == [
        "llama-server", "-m", "base.gguf", "--lora", "adapter.gguf", "--jinja", "--chat-template-file", "t.jinja",
        "--host", "127.0.0.1", "--port", "8000"]
    assert engines.llama_server_argv("b", ["x", "y"], "t", "::1", 1)[:8] == [
        "llama-server", "-m", "b", "--lora", "x", "--lora", "y", "--lora-init-without-apply"]


def test_llama_cpp_python_config():
    config = engines.llama_cpp_python_config("b.gguf", {"tuned": "a.gguf"}, "tok", "127.0.0.1", 8001)
    assert config["port"] == 8001 and [m["model_alias"] for m in config["models"]] == ["base", "tuned"]
    assert config["models"][1]["lora_path"] == "a.gguf" and "lora_path" not in config["models"][0]
    assert {(m["chat_format"], m["hf_pretrained_model_name_or_path"]) for m in config["models"]} == \
        {("hf-autotokenizer", "tok")}


def test_a_script_runs_its_command_from_its_own_folder_with_the_arguments_given(tmp_path):
    folder = tmp_path / "my export"
    folder.mkdir()
    record = _fake(tmp_path / "bin", "vllm")
    engines.write_script(folder / "serve-vllm.sh", ["vllm", "serve", "org/base", "--lora-modules", "tuned=adapter",
                                                    "--chat-template", "chat template.jinja"], ["a comment\non two lines"])
    script = (folder / "serve-vllm.sh").read_text()
    assert script.startswith("#!/bin/sh\n# a comment\n# on two lines\n") and "'chat template.jinja'" in script
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([str(folder / "serve-vllm.sh"), "--port", "8080"], cwd=tmp_path, env=env, check=True)
    called = read_json(record)
    assert Path(called["cwd"]) == folder.resolve()
    assert called["argv"] == ["serve", "org/base", "--lora-modules", "tuned=adapter", "--chat-template",
                              "chat template.jinja", "--port", "8080"]


# ---------------------------------------------------------------------------------------- affiner export --for


def test_export_for_every_engine(tmp_path, run, tiny_llama):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export"
    assert run_cli("export", str(run), "--output", str(out), "--for", "vllm,llama.cpp", "--for", "ollama",
                   "--gguf-type", "f32") == 0
    tokenizer = _tokenizer(out / "adapter")
    template = build_template("qa", tokenizer)
    jinja = (out / "chat_template.jinja").read_text()
    rendered = engines.render_chat_template(jinja, tokenizer, [{"role": "user", "content": QUESTIONS[0]}])
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == \
        encode_prompt(template, tokenizer, Example(instruction=QUESTIONS[0]))
    assert read_json(out / "stop.json")["stop"] == ["### Question:", "### Answer:"]
    assert read_json(out / "vllm-config" / "generation_config.json") == {"eos_token_id": [tokenizer.eos_token_id]}
    vllm = (out / "serve-vllm.sh").read_text()
    assert (f"exec vllm serve {Path(tiny_llama).resolve()} --served-model-name base --enable-lora "
            "--lora-modules tuned=adapter --max-lora-rank 8 --max-loras 1 --chat-template chat_template.jinja --generation-config vllm-config "
            "--host 127.0.0.1 --port 8000") in vllm
    assert '"stop": ["### Question:", "### Answer:"]' in vllm
    assert ("exec llama-server -m base.gguf --lora adapter.gguf --jinja --chat-template-file chat_template.jinja "
            "--host 127.0.0.1 --port 8000") in (out / "serve-llama-cpp.sh").read_text()
    name = run.name.lower()
    assert f"exec ollama create {name} -f Modelfile" in (out / "create-ollama.sh").read_text()
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./base.gguf\nADAPTER ./adapter.gguf\n" in modelfile
    assert "### Question: {{ .Content }}\n### Answer:{{ end }}{{ end }}" in modelfile
    assert 'PARAMETER stop "<eos>"' in modelfile and 'PARAMETER stop "### Question:"' in modelfile
    for script in ("serve-vllm.sh", "serve-llama-cpp.sh", "create-ollama.sh"):
        assert os.access(out / script, os.X_OK)
        *head, cd, command, end = (out / script).read_text().split("\n")
        assert all(line.startswith("#") for line in head) and cd.startswith("cd ") and command.startswith("exec ")
    # base.gguf is the base itself, unmerged: transformers reads it back with the base's logits
    import torch

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    back = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="base.gguf").eval()
    ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, base(ids).logits, rtol=0, atol=1e-4)
    assert (out / "adapter.gguf").is_file()
    files = read_json(out / "export.json")["files"]
    assert {"chat_template.jinja", "stop.json", "base.gguf", "adapter.gguf", "Modelfile"} <= set(files)
    card = (out / "README.md").read_text()  # each launch command is in the card too, as its script runs it
    for script in ("serve-vllm.sh", "serve-llama-cpp.sh", "create-ollama.sh"):
        command = (out / script).read_text().split("\n")[-2].removeprefix("exec ").removesuffix(' "$@"')
        command = command.replace(str(Path(tiny_llama).resolve()), Path(tiny_llama).name)  # the card's, no local path
        assert f"`./{script}`" in card and f"```sh\n{command}\n```" in card, script
    assert f"`{Path(tiny_llama).name}` names the base on the machine that trained this model" in card
    assert str(tmp_path) not in card and ABSOLUTE_PATH.findall(card) == []
    assert card.count('add "stop": ["### Question:", "### Answer:"] to each request') == 2  # vLLM, llama-server


def test_the_card_names_the_base_as_the_run_did_not_as_this_machine_stores_it(tmp_path, run, tiny_llama, monkeypatch):
    """vLLM is given this machine's copy of the base (a GGUF base's conversion in the cache): the card names the base
    the run was trained on, whole even when its folder's name has spaces, and says to put its path there."""
    from affiner.export import export as export_module

    converted = str(tmp_path / "my cache" / "gguf" / "base-0123456789abcdef")
    monkeypatch.setattr(export_module, "portable_base", lambda base: converted)
    out = tmp_path / "export"
    assert run_cli("export", str(run), "--output", str(out), "--for", "vllm") == 0
    assert f"exec vllm serve '{converted}' " in (out / "serve-vllm.sh").read_text()
    card = (out / "README.md").read_text()
    assert "0123456789abcdef" not in card and "my cache" not in card and str(tmp_path) not in card
    assert f"vllm serve {Path(tiny_llama).name} --served-model-name base" in card
    assert f"`{Path(tiny_llama).name}` names the base on the machine that trained this model" in card


def test_export_for_refuses_bad_options_before_writing_anything(tmp_path, capfd, run):
    from transformers import GPTNeoXConfig

    out = tmp_path / "x"
    _one_paragraph_error(capfd, run_cli("export", str(run), "--output", str(out), "--for", "tgi"), "export",
                         "unknown --for 'tgi'")
    _one_paragraph_error(capfd, run_cli("export", str(run), "--output", str(out), "--gguf", "--for", "ollama"),
                         "export", "--gguf and --for ollama")
    _one_paragraph_error(capfd, run_cli("export", str(run), "--output", str(out), "--gguf-type", "f16", "--for",
                                        "vllm"), "export", "--gguf-type only applies with --gguf or --for")
    full = copy_run(run, tmp_path / "full", method="full")
    _one_paragraph_error(capfd, run_cli("export", str(full), "--output", str(out), "--for", "llama.cpp"), "export",
                         "--for llama.cpp", "full fine-tune")
    neox = tmp_path / "neox"
    GPTNeoXConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64).save_pretrained(neox)
    other = copy_run(run, tmp_path / "neox-run", model__base=str(neox))
    _one_paragraph_error(capfd, run_cli("export", str(other), "--output", str(out), "--for", "vllm,ollama"),
                         "export", "--for ollama needs the base model as GGUF", "'gpt_neox' architecture")
    # Ollama's own engine, which alone runs Gemma 3, applies no adapter: the model would fail at its first answer
    gemma = copy_run(run, tmp_path / "gemma-run", model__base=str(make_gemma_shaped(tmp_path / "gemma")))
    capfd.readouterr()  # what building the tiny Gemma printed
    _one_paragraph_error(capfd, run_cli("export", str(gemma), "--output", str(out), "--for", "ollama"),
                         "export", "Ollama runs gemma3_text models on its own engine", "Export --gguf instead")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------- affiner serve --engine


@pytest.fixture
def fake_path(tmp_path, monkeypatch) -> Path:
    """PATH holding only a folder of fake engines, so that no real one is found."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(launch, "installed", lambda package, sub=None: False)
    return bin_dir


@pytest.mark.parametrize("engine,install", [("vllm", "pip install vllm"),
                                            ("llama.cpp", "pip install 'llama-cpp-python[server]'")])
def test_serve_with_an_engine_that_is_not_installed_says_how_to_install_it(capfd, run, fake_path, engine, install):
    _one_paragraph_error(capfd, run_cli("serve", str(run), "--engine", engine), "serve",
                         f"--engine {engine}: {engine} is not installed", install)
    assert not (run / "engines").exists()


def test_serve_refuses_an_unknown_engine(capfd, run):
    code = run_cli("serve", str(run), "--engine", "tgi")
    err = capfd.readouterr().err
    assert code == 2 and "--engine" in err and "invalid choice" in err


def test_serve_with_vllm_serves_every_adapter_on_the_one_base(tmp_path, capfd, monkeypatch, run, tiny_llama, fake_path):
    record = _fake(fake_path, "vllm")
    second = copy_run(run, tmp_path / "other")
    monkeypatch.setenv("MY_KEY", "s3cret-key")
    assert run_cli("serve", str(run), str(second), "--engine", "vllm", "--port", "8123", "--api-key-env",
                   "MY_KEY") == 0
    called = read_json(record)
    cache = run / "engines" / "vllm"
    names = [f"{run.parent.name}/{run.name}", f"{second.parent.name}/{second.name}"]  # one name, two folders
    assert called["argv"] == [
        "serve", str(tiny_llama), "--served-model-name", "base", "--enable-lora",
        "--lora-modules", f"{names[0]}={run.resolve()}", f"{names[1]}={second.resolve()}",
        "--max-lora-rank", "8", "--max-loras", "2", "--chat-template", str(cache / "chat_template.jinja"),
        "--generation-config", str(cache / "vllm-config"), "--host", "127.0.0.1", "--port", "8123"]
    assert called["env"].get("VLLM_API_KEY") == "s3cret-key" and "s3cret-key" not in capfd.readouterr().out


def test_serve_with_an_engine_refuses_runs_of_different_bases(tmp_path, capfd, run, tiny_gpt2, fake_path):
    _fake(fake_path, "vllm")
    other = copy_run(run, tmp_path / "other", model__base=str(tiny_gpt2))
    _one_paragraph_error(capfd, run_cli("serve", str(run), str(other), "--engine", "vllm"), "serve",
                         "does not share the base model")


def test_serve_with_an_engine_keeps_affiner_serves_host_rule(capfd, run, fake_path):
    _fake(fake_path, "vllm")
    _one_paragraph_error(capfd, run_cli("serve", str(run), "--engine", "vllm", "--host", "0.0.0.0"), "serve",
                         "without an API key")


def test_serve_with_llama_cpp_exports_once_and_reuses_the_files(capfd, run, fake_path):
    record = _fake(fake_path, "llama-server")
    assert run_cli("serve", str(run), "--engine", "llama.cpp", "--port", "8124") == 0
    cache = run / "engines" / "llama.cpp"
    base = next(cache.glob("base-*.gguf"))
    adapter = cache / "adapter.gguf"
    assert read_json(record)["argv"] == ["-m", str(base), "--lora", str(adapter), "--jinja", "--chat-template-file",
                                         str(cache / "chat_template.jinja"), "--host", "127.0.0.1", "--port", "8124"]
    assert 'note: add "stop": ["### Question:", "### Answer:"] to each request' in capfd.readouterr().out
    stamps = base.stat().st_mtime_ns, adapter.stat().st_mtime_ns
    assert run_cli("serve", str(run), "--engine", "llama.cpp", "--port", "8124") == 0
    assert (base.stat().st_mtime_ns, adapter.stat().st_mtime_ns) == stamps
    assert not [p.name for p in cache.iterdir() if p.name.endswith(".partial")]


def test_an_engine_that_fails_is_reported_with_its_exit_code(capfd, run, fake_path):
    _fake(fake_path, "vllm", code=3)
    _one_paragraph_error(capfd, run_cli("serve", str(run), "--engine", "vllm"), "serve",
                         "vllm stopped with exit code 3")


def test_the_engine_is_found_beside_python_or_as_a_module(monkeypatch, fake_path):
    monkeypatch.setattr(launch, "installed", lambda package, sub=None: package == "llama_cpp" and sub == "server")
    assert launch.find_launcher("llama.cpp") == launch.Launcher("llama_cpp.server",
                                                                 (sys.executable, "-m", "llama_cpp.server"))
    _fake(fake_path, "llama-server")
    assert launch.find_launcher("llama.cpp") == launch.Launcher("llama-server", (str(fake_path / "llama-server"),))


def test_llama_cpp_python_serves_from_a_config_file_with_the_runs_prompt_format(run):
    command = engines.engine_command([run], "llama.cpp", engines.LLAMA_CPP_PYTHON, ("python", "-m", "llama_cpp.server"),
                                     "127.0.0.1", 8125)
    cache = run / "engines" / "llama.cpp"
    assert command.argv == ["python", "-m", "llama_cpp.server", "--config_file", str(cache / "llama-cpp-python.json")]
    settings = read_json(cache / "llama-cpp-python.json")
    assert (settings["host"], settings["port"]) == ("127.0.0.1", 8125)
    assert [m["model_alias"] for m in settings["models"]] == ["base", "tuned"]
    assert settings["models"][1]["lora_path"] == str(cache / "adapter.gguf")
    # llama-cpp-python's "hf-autotokenizer": apply_chat_template without add_generation_prompt, then the
    # same tokenizer with add_special_tokens=True
    engine_tokenizer = _tokenizer(cache / "tokenizer")
    prompt = engine_tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], tokenize=False)
    tokenizer = _tokenizer(run)
    assert engine_tokenizer.encode(prompt, add_special_tokens=True) == \
        encode_prompt(build_template("qa", tokenizer), tokenizer, Example(instruction=QUESTIONS[0]))


def test_llama_cpp_python_takes_no_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("MY_KEY", "k")
    with pytest.raises(AffinerError, match="--api-key-env: llama_cpp.server takes its key only from its config file"):
        launch.engine_environment(launch.Launcher("llama_cpp.server", ("python",)), "127.0.0.1", 8000, "MY_KEY")
    with pytest.raises(AffinerError, match="--port 0"):
        launch.engine_environment(launch.Launcher("vllm", ("vllm",)), "127.0.0.1", 0, None)


def test_ctrl_c_gives_the_engine_time_to_stop_cleanly(tmp_path):
    ready = tmp_path / "ready"
    code = ("import signal, sys, time, pathlib\n"
            "signal.signal(signal.SIGINT, lambda *a: sys.exit(7))\n"
            f"pathlib.Path({str(ready)!r}).touch()\n"
            "time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", code])
    while not ready.exists():
        assert process.poll() is None
        time.sleep(0.01)
    assert launch.stop(process) == 7  # it ran its own clean-up (exit 7), not killed


@pytest.mark.parametrize("name", ["qa", "chat"])
def test_the_tokenizer_for_llama_cpp_python_prompts_as_training_did(tmp_path, tiny_llama, name):
    tokenizer = _tokenizer(tiny_llama)
    template = build_template(name, tokenizer, system_prompt="Be brief.")
    engines.save_engine_tokenizer(tokenizer, engines.chat_template(template, tokenizer), tmp_path / "tokenizer")
    saved = _tokenizer(tmp_path / "tokenizer")
    # rendered as llama-cpp-python's "hf-autotokenizer" does: no add_generation_prompt, then encoded with
    # add_special_tokens=True (LlamaHFTokenizer.tokenize)
    prompt = saved.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], tokenize=False)
    assert saved.encode(prompt, add_special_tokens=True) == \
        encode_prompt(template, tokenizer, Example(instruction=QUESTIONS[0]))
    # the run's own tokenizer is left as it was
    assert tokenizer.chat_template != saved.chat_template and tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
