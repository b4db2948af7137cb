"""affiner's batch decoder: rows leave the batch when they end, and the answers are model.generate's."""

import functools
from dataclasses import replace

import pytest
import torch
from transformers import LogitsProcessorList

from affiner.core import kv_cache
from affiner.core.decoding import decode_queue, decode_rows, left_pad, penalties
from affiner.core.models import load_model, load_tokenizer
from affiner.core.settings import GREEDY, Settings

PROMPTS = ["QUILT?", "What does the acronym FROND stand for, in full, please?", "Define MAPLE.", "TANGO"]


def _batch(tokenizer):
    return left_pad([tokenizer(p)["input_ids"] for p in PROMPTS], tokenizer.pad_token_id)


def _until_stop(tokens: list[int], stop: int) -> list[int]:
    return tokens[:tokens.index(stop) + 1] if stop in tokens else tokens


def _a_stop_that_ends_rows_at_different_steps(free_run: torch.Tensor) -> int:
    """A token the rows of a free run first write at different steps, so that rows leave one by one."""
    firsts: dict[int, set[int]] = {}
    for row in free_run.tolist():
        for step, token in enumerate(row):
            firsts.setdefault(token, set())
        for token in set(row):
            firsts[token].add(row.index(token))
    return max(firsts, key=lambda token: (len(firsts[token]), -min(firsts[token])))


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama", "tiny_gemma"])
def test_greedy_rows_are_model_generate_s_even_as_rows_leave_the_batch(request, fixture):
    folder = request.getfixturevalue(fixture)
    tokenizer, model = load_tokenizer(str(folder)), load_model(str(folder))
    input_ids, attention = _batch(tokenizer)
    width = input_ids.shape[1]
    free = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=tokenizer.pad_token_id)[:, width:]
    stop = _a_stop_that_ends_rows_at_different_steps(free)
    expected = [_until_stop(row, stop) for row in free.tolist()]
    assert len({len(row) for row in expected}) > 1  # rows do leave the batch at different steps

    assert decode_rows(model, input_ids, attention, 16, [stop], GREEDY) == expected


QUEUED = PROMPTS + ["A much longer prompt that goes on and on about FROND, MAPLE, QUILT and the TANGO", "OK",
                    "Tell me about TANGO dancing in two words", "Define QUILT and FROND"]


def _decode_step_rows(model, monkeypatch) -> list[int]:
    """The number of rows of each decode step (a forward reading one new token a row) the model runs from now on."""
    rows, real = [], model.forward

    @functools.wraps(real)
    def counting(*args, **kwargs):
        if kwargs["input_ids"].shape[1] == 1:
            rows.append(kwargs["input_ids"].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    return rows


@pytest.mark.parametrize("penalty", [1.0, 1.5])
@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama", "tiny_gemma"])
def test_a_queue_refilling_its_batch_gives_every_prompt_its_one_by_one_answer(request, monkeypatch, fixture, penalty):
    """Rows join a batch still decoding (their caches merged, growing past their spare columns, Gemma's
    sliding-window layers past their 64-token window) and each prompt gets the tokens `model.generate` gives it
    alone, with or without a repetition penalty."""
    tokenizer, model = load_tokenizer(str(request.getfixturevalue(fixture))), load_model(
        str(request.getfixturevalue(fixture)))
    settings, pad = replace(GREEDY, repetition_penalty=penalty), tokenizer.pad_token_id
    prompts = [tokenizer(p)["input_ids"] for p in QUEUED]
    alone = [model.generate(input_ids=torch.tensor([p]), max_new_tokens=80, do_sample=False, eos_token_id=None,
                            logits_processor=LogitsProcessorList(penalties(settings, len(p))),
                            pad_token_id=pad)[0, len(p):].tolist() for p in prompts]  # transformers' own cache
    stop = max({t for row in alone for t in row}, key=lambda t: len({len(_until_stop(row, t)) for row in alone}))
    expected = [_until_stop(row, stop) for row in alone]
    assert len({len(row) for row in expected}) > 1 and max(map(len, expected)) == 80  # rows end far apart
    steps = _decode_step_rows(model, monkeypatch)

    answers = dict(decode_queue(model, prompts, pad, 80, [stop], settings, batch_size=3))
    assert [answers[i] for i in range(len(prompts))] == expected
    assert max(steps) == 3 and any(later > earlier for earlier, later in zip(steps, steps[1:]))  # rows joined


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_bf16_logits_picked_through_the_kept_fp32_buffer_give_model_generate_s_answers(request, fixture):
    """A bf16 model's logits are copied into one fp32 buffer kept from step to step and prompt to prompt (the
    penalty writes into it): each prompt, decoded alone, gets the tokens `model.generate` gives it."""
    folder = request.getfixturevalue(fixture)
    tokenizer, model = load_tokenizer(str(folder)), load_model(str(folder)).to(torch.bfloat16)
    settings, pad = replace(GREEDY, repetition_penalty=1.5), tokenizer.pad_token_id
    prompts = [tokenizer(p)["input_ids"] for p in QUEUED]
    expected = [model.generate(input_ids=torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                               logits_processor=LogitsProcessorList(penalties(settings, len(p))),
                               pad_token_id=pad)[0, len(p):].tolist() for p in prompts]
    assert len({tuple(row) for row in expected}) > 1

    answers = dict(decode_queue(model, prompts, pad, 24, [], settings, batch_size=1))
    assert [answers[i] for i in range(len(prompts))] == expected


def test_an_empty_queue_decodes_nothing(tiny_llama):
    tokenizer, model = load_tokenizer(str(tiny_llama)), load_model(str(tiny_llama))
    assert list(decode_queue(model, [], tokenizer.pad_token_id, 8, [], GREEDY, batch_size=3)) == []


def test_a_cache_that_cannot_be_joined_is_decoded_batch_after_batch(monkeypatch, tiny_llama):
    tokenizer, model = load_tokenizer(str(tiny_llama)), load_model(str(tiny_llama))
    prompts = [tokenizer(p)["input_ids"] for p in QUEUED]
    expected = dict(decode_queue(model, prompts, tokenizer.pad_token_id, 12, [], GREEDY, batch_size=3))
    monkeypatch.setattr(kv_cache, "joinable", lambda cache: False)
    steps = _decode_step_rows(model, monkeypatch)

    assert dict(decode_queue(model, prompts, tokenizer.pad_token_id, 12, [], GREEDY, batch_size=3)) == expected
    assert steps == [3] * 11 + [3] * 11 + [2] * 11  # three batches, none joined while another decoded


def test_a_row_done_by_the_caller_leaves_the_batch_and_the_others_go_on(tiny_llama):
    tokenizer, model = load_tokenizer(str(tiny_llama)), load_model(str(tiny_llama))
    input_ids, attention = _batch(tokenizer)
    whole = decode_rows(model, input_ids, attention, 10, [], GREEDY)
    seen: list[int] = []

    def second_row_done_after_three(rows: list[int], new_tokens: list[list[int]]) -> list[bool]:
        seen.append(rows)
        return [row == 1 and len(tokens) == 3 for row, tokens in zip(rows, new_tokens)]

    cut = decode_rows(model, input_ids, attention, 10, [], GREEDY, second_row_done_after_three)
    assert cut[1] == whole[1][:3] and [cut[i] for i in (0, 2, 3)] == [whole[i] for i in (0, 2, 3)]
    assert seen == [[0, 1, 2, 3]] * 3 + [[0, 2, 3]] * 7  # the batch shrank once the row was done


def test_sampling_draws_through_the_warpers_and_is_reproducible(tiny_llama):
    tokenizer, model = load_tokenizer(str(tiny_llama)), load_model(str(tiny_llama))
    input_ids, attention = _batch(tokenizer)
    settings = Settings(temperature=1.0, top_k=1, top_p=1.0)  # top-k 1 leaves one token to draw: the argmax
    assert decode_rows(model, input_ids, attention, 8, [], settings) == decode_rows(model, input_ids, attention, 8, [],
                                                                                    GREEDY)
    hot = Settings(temperature=2.0, top_k=0, top_p=1.0)
    torch.manual_seed(3)
    first = decode_rows(model, input_ids, attention, 8, [], hot)
    torch.manual_seed(3)
    assert decode_rows(model, input_ids, attention, 8, [], hot) == first
    assert first != decode_rows(model, input_ids, attention, 8, [], GREEDY)


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_gemma"])
def test_a_repetition_penalty_gives_model_generate_s_answers_and_breaks_loops(request, fixture):
    folder = request.getfixturevalue(fixture)
    tokenizer, model = load_tokenizer(str(folder)), load_model(str(folder))
    input_ids, attention = _batch(tokenizer)
    width, penalised = input_ids.shape[1], replace(GREEDY, repetition_penalty=1.5)
    free = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=24, do_sample=False,
                          logits_processor=LogitsProcessorList(penalties(penalised, width)), eos_token_id=None,
                          pad_token_id=tokenizer.pad_token_id)[:, width:]
    stop = _a_stop_that_ends_rows_at_different_steps(free)
    expected = [_until_stop(row, stop) for row in free.tolist()]

    assert decode_rows(model, input_ids, attention, 24, [stop], penalised) == expected  # rows leaving as they end
    plain = decode_rows(model, input_ids, attention, 24, [], GREEDY)
    assert sum(len(row) - len(set(row)) for row in free.tolist()) < sum(len(row) - len(set(row)) for row in plain)
    assert penalised.describe() == "greedy, repetition penalty 1.5"


def test_the_penalty_counts_the_answer_s_tokens_not_the_prompt_s():
    sequences = torch.tensor([[5, 6, 7, 8]])  # a prompt of two tokens (5, 6), an answer of two (7, 8)
    logits = torch.full((1, 10), 3.0)
    logits[0, 8] = -3.0
    (penalty,) = penalties(replace(GREEDY, repetition_penalty=1.5), prompt_width=2)
    out = penalty(sequences, logits.clone())
    assert out[0, 5] == out[0, 6] == 3.0  # the question's words stay as likely
    assert out[0, 7] == 2.0 and out[0, 8] == -4.5  # the answer's own: less likely, whatever the logit's sign
    assert penalties(GREEDY, prompt_width=2) == []


def test_an_answer_cut_at_a_text_counts_the_tokens_generated_to_write_it(tiny_gpt2):
    """A character split across byte tokens decodes to U+FFFD until complete, and tokenising a cut answer again
    can count more tokens than were generated: usage counts those generated."""
    from affiner.core.decoding import tokens_for
    from affiner.core.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_gpt2))
    ids = tokenizer("ab é z", add_special_tokens=False)["input_ids"]
    assert tokens_for("ab é z", ids, tokenizer) == len(ids)
    assert tokens_for("", ids, tokenizer) == 0
    cut = tokens_for("ab é", ids, tokenizer)
    assert tokenizer.decode(ids[:cut]) == "ab é" and cut < len(ids)
    assert tokens_for("\ufffd" * 40, ids, tokenizer) == len(ids)  # never more than were generated
    emoji = tokenizer("ok 😀 z", add_special_tokens=False)["input_ids"]
    cut = tokens_for("ok 😀", emoji, tokenizer)  # its last character is written by several byte tokens
    assert tokenizer.decode(emoji[:cut]) == "ok 😀" and tokenizer.decode(emoji[:cut - 1]) != "ok 😀"


@pytest.mark.parametrize("penalty", [1.2, 0.8])
def test_the_answer_s_penalty_gives_the_logits_of_transformers_processor(penalty):
    """AnswerRepetitionPenalty replaces RepetitionPenaltyLogitsProcessor(prompt_ignore_length=...) for speed only."""
    from transformers import RepetitionPenaltyLogitsProcessor

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=generator) * 3
    sequences = torch.randint(0, 50, (4, 9), generator=generator)
    sequences[:, 7] = sequences[:, 5]  # a token the answer already repeated
    expected = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=3)(sequences, logits.clone())
    (ours,) = penalties(replace(GREEDY, repetition_penalty=penalty), prompt_width=3)
    assert torch.equal(ours(sequences, logits.clone()), expected)
    assert torch.equal(ours(sequences[:, :3], logits.clone()), logits)  # no answer yet: nothing to penalise
