"""The one loader: what the config says about the base (revision, remote code, quantisation) reaches
transformers, for the model and its tokenizer, and remote code stays off unless asked, loudly."""

from __future__ import annotations

import pytest
import transformers

from affiner.core.config import RunConfig
from affiner.core.models import load_for, tokenizer_for


class Captured(Exception):
    """Raised by the stand-in for from_pretrained once it has seen its arguments."""


@pytest.fixture
def calls(monkeypatch, offline_hub):
    seen: list[tuple[str, dict]] = []

    def from_pretrained(name, **kwargs):
        seen.append((name, kwargs))
        raise Captured

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(auto, "from_pretrained", from_pretrained)
    return seen


def config(**model) -> RunConfig:
    return RunConfig.model_validate({"data": {"train": "x.jsonl"}, "model": {"base": "org/model", **model}})


@pytest.mark.parametrize("load", [load_for, tokenizer_for], ids=["model", "tokenizer"])
def test_revision_and_remote_code_reach_transformers(load, calls, capsys):
    with pytest.raises(Captured):
        load(config(revision="v1.2", trust_remote_code=True))
    name, kwargs = calls[-1]
    assert name == "org/model" and kwargs["revision"] == "v1.2" and kwargs["trust_remote_code"] is True
    assert "trust_remote_code is on" in capsys.readouterr().out


@pytest.mark.parametrize("load", [load_for, tokenizer_for], ids=["model", "tokenizer"])
def test_remote_code_is_off_unless_asked(load, calls, capsys):
    with pytest.raises(Captured):
        load(config())
    _, kwargs = calls[-1]
    assert "trust_remote_code" not in kwargs and "revision" not in kwargs
    assert "trust_remote_code" not in capsys.readouterr().out


def test_qlora_is_quantised_unless_export_asks_for_full_weights(calls):
    pytest.importorskip("bitsandbytes")
    qlora = RunConfig.model_validate({"data": {"train": "x.jsonl"}, "method": "qlora", "model": {"base": "org/m"}})
    with pytest.raises(Captured):
        load_for(qlora)
    assert calls[-1][1]["quantization_config"].load_in_4bit
    with pytest.raises(Captured):
        load_for(qlora, full_precision=True, quantized=False)
    assert "quantization_config" not in calls[-1][1]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_a_saved_tokenizer_lists_its_added_tokens_and_loads_back_the_same(fixture, request, tmp_path):
    """affiner writes the added-token list transformers 5 leaves out (without it each load parses the whole
    tokenizer.json in Python: 4.1-4.5 s for Gemma's against 2.55 s), and the tokenizer reads back unchanged."""
    import json

    from affiner.core.gguf_cache import save_tokenizer
    from affiner.core.models import load_tokenizer

    tokenizer = load_tokenizer(str(request.getfixturevalue(fixture)))
    save_tokenizer(tokenizer, tmp_path)
    listed = json.loads((tmp_path / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {int(i): t["content"] for i, t in listed.items()} == {
        i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    again = load_tokenizer(str(tmp_path))
    assert type(again) is type(tokenizer) and again.all_special_tokens == tokenizer.all_special_tokens
    for text in ("<bos>a question<eos>", "### Question: what? ### Answer: yes", "  spaces\n\ttabs <pad>"):
        assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert again.decode(again(text)["input_ids"]) == tokenizer.decode(tokenizer(text)["input_ids"])


def test_a_cached_gguf_conversion_gets_gemma_s_image_markers_as_special_tokens(tiny_gemma, tmp_path):
    """A GGUF calls Gemma 3's image markers user-defined tokens, transformers reads them as text, and a base model's
    stray `<start_of_image>` showed in its answers; a conversion cached before the fix is upgraded in place."""
    import json

    from tokenizers import AddedToken

    from affiner.core.gguf_cache import GGUF_TOKENIZER_VERSION, save_tokenizer, upgrade_gguf_tokenizer
    from affiner.core.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_gemma))
    tokenizer.add_tokens([AddedToken("<start_of_image>", special=False, normalized=False), "<table>"])
    save_tokenizer(tokenizer, tmp_path)
    (tmp_path / "converted.json").write_text(json.dumps({"source": "gemma.gguf", "seconds": 60.0}))
    marker, table = tokenizer.convert_tokens_to_ids(["<start_of_image>", "<table>"])
    word = tokenizer("Answer", add_special_tokens=False)["input_ids"][0]
    assert tokenizer.decode([marker, word], skip_special_tokens=True).startswith("<start_of_image>")

    upgrade_gguf_tokenizer(tmp_path)
    upgraded = load_tokenizer(str(tmp_path))
    assert upgraded.decode([marker, word, table], skip_special_tokens=True) == tokenizer.decode([word, table])
    assert len(upgraded) == len(tokenizer) and upgraded("a <start_of_image> b")["input_ids"] == tokenizer(
        "a <start_of_image> b")["input_ids"]  # same ids: only what a decoded answer shows changes
    assert json.loads((tmp_path / "converted.json").read_text()) == {"source": "gemma.gguf", "seconds": 60.0,
                                                                      "tokenizer": GGUF_TOKENIZER_VERSION}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left aside
