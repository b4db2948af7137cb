"""Prompt rendering and labels: the invariants that make a tuned model stop and see the same prompt it trained on."""

from __future__ import annotations

import pytest

from affiner.core.loss import IGNORE_INDEX
from affiner.data.tokens import collate, tokenize
from affiner.core.errors import AffinerError
from affiner.core.decoding import left_pad
from affiner.core.models import load_tokenizer
from affiner.core.templates import Example, build_template, encode_prompt, render_prompt

EXAMPLES = [
    Example(instruction="What does QUILT stand for?", response="QUILT stands for Queue of Unified Index Lookup Tables."),
    Example(instruction="Define FROND.", response="Federated Registry of Open Nautical Data."),
    Example(instruction="Give three colours.", input="primary ones", response="Red, green and blue."),
]
CASES = [("tiny_gpt2", "qa"), ("tiny_gpt2", "alpaca"), ("tiny_gpt2", "instruction"),
         ("tiny_llama", "qa"), ("tiny_llama", "chat"), ("tiny_gemma", "alpaca")]


def _setup(request, fixture: str, name: str):
    tokenizer = load_tokenizer(str(request.getfixturevalue(fixture)))
    return tokenizer, build_template(name, tokenizer)


@pytest.mark.parametrize("fixture,name", CASES)
def test_labels_mask_prompt_and_padding_and_end_with_eos(request, fixture, name):
    tokenizer, template = _setup(request, fixture, name)
    features = tokenize(EXAMPLES, template, tokenizer)
    batch = collate(features, tokenizer.pad_token_id)
    for row, (feature, example) in enumerate(zip(features, EXAMPLES)):
        n_prompt = len(encode_prompt(template, tokenizer, example))
        n = len(feature["input_ids"])
        labels = batch["labels"][row].tolist()
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert all(label != IGNORE_INDEX for label in labels[n_prompt:n])
        assert labels[n:] == [IGNORE_INDEX] * (len(labels) - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (len(labels) - n)
        assert labels[n - 1] in template.stop_token_ids


def test_eos_is_supervised_when_pad_equals_eos(tiny_gpt2):
    tokenizer = load_tokenizer(str(tiny_gpt2))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the GPT-2 case that breaks notebooks
    template = build_template("qa", tokenizer)
    batch = collate(tokenize(EXAMPLES, template, tokenizer), tokenizer.pad_token_id)
    for row in range(len(EXAMPLES)):
        supervised = [t for t in batch["labels"][row].tolist() if t != IGNORE_INDEX]
        assert supervised[-1] == tokenizer.eos_token_id
        assert supervised.count(tokenizer.eos_token_id) == 1


@pytest.mark.parametrize("fixture,name", CASES)
def test_training_and_inference_see_the_same_prompt_ids_with_one_bos(request, fixture, name):
    tokenizer, template = _setup(request, fixture, name)
    features = tokenize(EXAMPLES, template, tokenizer)
    prompts = [encode_prompt(template, tokenizer, e) for e in EXAMPLES]
    input_ids, attention = left_pad(prompts, tokenizer.pad_token_id)  # what generation receives
    for row, (feature, prompt) in enumerate(zip(features, prompts)):
        served = input_ids[row][attention[row].bool()].tolist()
        assert served == prompt == feature["input_ids"][: len(prompt)]
        if tokenizer.bos_token_id is not None and tokenizer.bos_token_id != tokenizer.eos_token_id:
            assert feature["input_ids"].count(tokenizer.bos_token_id) == 1
            assert feature["input_ids"][0] == tokenizer.bos_token_id


def test_chat_template_closes_the_answer_with_the_turn_end_token(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    template = build_template("chat", tokenizer)
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn in template.stop_token_ids
    feature = tokenize(EXAMPLES[:1], template, tokenizer)[0]
    assert feature["labels"][-1] == end_of_turn
    assert tokenizer.decode(feature["input_ids"]).count("<bos>") == 1


def test_text_templates_render_the_documented_formats(tiny_gpt2):
    tokenizer = load_tokenizer(str(tiny_gpt2))
    example = EXAMPLES[2]
    assert render_prompt(build_template("alpaca", tokenizer), example) == \
        "### Instruction:\nGive three colours.\n\n### Input:\nprimary ones\n\n### Response:\n"
    assert render_prompt(build_template("qa", tokenizer), EXAMPLES[0]) == \
        "### Question: What does QUILT stand for?\n### Answer:"
    assert render_prompt(build_template("instruction", tokenizer), EXAMPLES[1]) == "Instruction: Define FROND.\nRéponse:"
    system = build_template("qa", tokenizer, system_prompt="Answer briefly.")
    assert render_prompt(system, EXAMPLES[0]).startswith("Answer briefly.\n\n### Question:")


def test_chat_template_needs_a_tokenizer_that_has_one(tiny_gpt2):
    with pytest.raises(AffinerError, match="no chat template"):
        build_template("chat", load_tokenizer(str(tiny_gpt2)))


def test_multi_turn_history_needs_the_chat_template(tiny_gpt2):
    tokenizer = load_tokenizer(str(tiny_gpt2))
    example = Example(instruction="and FROND?", response="...", history=(("user", "QUILT?"), ("assistant", "Queue")),
                      source="conv.json item 3")
    with pytest.raises(AffinerError, match="conv.json item 3.*template: chat"):
        render_prompt(build_template("qa", tokenizer), example)
