"""Answers end where a reader stops: at a stop token, or where the model starts a new turn of its template
(`### Question:` after its answer), which is cut out and counted apart from answers that stopped by themselves;
the same in evaluation's batches and in the engine's stream (chat, app, serve)."""

from __future__ import annotations

import pytest
import torch

from affiner.core.models import load_tokenizer
from affiner.core.stopping import RowEnds, TurnCutter, cut_at_turn, trim_unfinished_marker, turn_markers
from affiner.core.templates import TEXT_TEMPLATES, Template, build_template
from affiner.evaluation.generation import decode, generate

QA = Template(name="qa", **TEXT_TEMPLATES["qa"])


def test_markers_are_read_from_the_saved_template():
    assert turn_markers(QA) == ("### Question:", "### Answer:")
    assert turn_markers(Template(name="alpaca", **TEXT_TEMPLATES["alpaca"])) == \
        ("### Instruction:", "### Input:", "### Response:")
    assert turn_markers(Template(name="chat", chat_template="{{ messages }}")) == ()  # stop tokens end turns


def test_an_answer_is_cut_at_the_first_marker():
    assert cut_at_turn(" QUILT stands for X.\n### Question: What is Y?\n### Answer: Z", turn_markers(QA)) == \
        (" QUILT stands for X.\n", True)
    assert cut_at_turn(" a # b ## c", turn_markers(QA)) == (" a # b ## c", False)
    assert cut_at_turn(" ### Question: Y?", turn_markers(QA)) == (" ", True)  # the answer's start opens a line


INSTRUCTION = Template(name="instruction", **TEXT_TEMPLATES["instruction"])


def test_a_marker_inside_a_sentence_is_part_of_the_answer_as_in_training():
    """The instruction template's markers are plain words ("Entrée:", "Réponse:"): an answer that uses them in a
    sentence was trained in full and must be let out in full; a turn begins only at the start of a line."""
    answer = " Le format attendu est Entrée: une liste, Réponse: sa somme."
    assert cut_at_turn(answer, turn_markers(INSTRUCTION)) == (answer, False)
    assert cut_at_turn(answer + "\n  Instruction: autre chose", turn_markers(INSTRUCTION)) == (answer + "\n  ", True)
    cutter = TurnCutter(turn_markers(INSTRUCTION))
    assert "".join(cutter.feed(c) for c in answer) + cutter.flush() == answer and not cutter.cut


def test_a_requests_stop_text_ends_the_answer_anywhere():
    cutter = TurnCutter(("END",), anywhere=True)
    assert "".join(cutter.feed(p) for p in [" one two E", "N", "D three"]) + cutter.flush() == " one two " and cutter.cut
    assert cut_at_turn(" one END", ("END",), anywhere=True) == (" one ", True)
    assert cut_at_turn(" one END", ("END",)) == (" one END", False)


@pytest.mark.parametrize("pieces", [[" QUILT", " stands", " for X.\n", "###", " Quest", "ion: What"],
                                    [" QUILT stands for X.\n### Question: What"],
                                    list(" QUILT stands for X.\n### Question: What")])
def test_a_stream_lets_out_the_answer_and_nothing_of_the_new_turn(pieces):
    cutter = TurnCutter(turn_markers(QA))
    assert "".join(cutter.feed(p) for p in pieces) + cutter.flush() == " QUILT stands for X.\n" and cutter.cut


def test_a_stream_without_marker_is_let_out_whole_even_if_it_looks_like_one_for_a_while():
    cutter = TurnCutter(turn_markers(QA))
    pieces = [" a ##", "# Quest", " b", " c"]
    assert "".join(cutter.feed(p) for p in pieces) + cutter.flush() == " a ### Quest b c" and not cutter.cut


def test_each_row_of_a_batch_stops_at_its_own_new_turn(tiny_gpt2):
    tokenizer = load_tokenizer(str(tiny_gpt2))
    turned = tokenizer(" It is X.\n### Question:", add_special_tokens=False)["input_ids"]
    going_on = tokenizer(" It is X, and ### more and more words", add_special_tokens=False)["input_ids"]
    ends = RowEnds(tokenizer, [100, 100], [turn_markers(QA)] * 2)
    assert ends([0, 1], [turned, going_on[:len(turned)]]) == [True, False]
    in_a_sentence = tokenizer(" The form says ### Question: here", add_special_tokens=False)["input_ids"]
    long_then_turn = tokenizer(" word" * 40 + "\n### Question:", add_special_tokens=False)["input_ids"]
    assert ends([0, 1], [in_a_sentence, long_then_turn]) == [False, True]


def test_a_row_ends_at_its_own_limit_stop_text_or_cancel_whatever_its_neighbours(tiny_gpt2):
    import threading

    tokenizer = load_tokenizer(str(tiny_gpt2))
    cancelled = threading.Event()
    long_stop = "END OF THE ANSWER HERE"  # more characters than the markers' tail has tokens
    ends = RowEnds(tokenizer, [5, 100, 100, 100], [(), (), (), turn_markers(QA)], [(), (long_stop,), (), ()],
                   [None, None, cancelled, None])
    words = tokenizer(" a b c d e", add_special_tokens=False)["input_ids"]
    stopped = tokenizer(" fine." + " " + long_stop, add_special_tokens=False)["input_ids"]
    assert ends([0, 1, 2, 3], [words[:5], stopped, words[:2], words]) == [True, True, False, False]
    assert ends([0, 2], [words[:4], words[:3]]) == [False, False]  # rows given by their index in the batch
    cancelled.set()
    assert ends([2, 3], [words[:3], words]) == [True, False]


def test_decoding_cuts_the_new_turn_and_does_not_call_it_a_stop(tiny_gpt2):
    tokenizer = load_tokenizer(str(tiny_gpt2))
    ids = tokenizer(" It is X.\n### Question: what next", add_special_tokens=False)["input_ids"]
    answer = decode(ids, [tokenizer.eos_token_id], tokenizer, turn_markers(QA))
    assert answer.text == "It is X." and answer.new_turn and not answer.stopped
    assert answer.tokens == len(tokenizer(" It is X.\n", add_special_tokens=False)["input_ids"])
    stopped = decode(ids[:3] + [tokenizer.eos_token_id], [tokenizer.eos_token_id], tokenizer, turn_markers(QA))
    assert stopped.stopped and not stopped.new_turn


def test_a_marker_the_limit_left_unfinished_is_not_part_of_the_answer(tiny_gpt2):
    """A base model at its token limit in the middle of "\n### Question:" wrote the start of a new turn, not
    answer: it is left out, in evaluation, in a served reply and in a stream alike. It was not finished, so the
    answer ran to the limit (not into a new turn), and its tokens count: they were generated. An answer that
    ended with a stop token is whole as written ("Réponse: R" with the instruction template's markers)."""
    markers = turn_markers(QA)
    assert trim_unfinished_marker(" It is X.\n###", markers) == " It is X.\n"
    assert trim_unfinished_marker(" It is X.\n  ### Quest", markers) == " It is X.\n  "
    assert trim_unfinished_marker(" It is X. ###", markers) == " It is X. ###"  # not where a turn begins
    assert trim_unfinished_marker(" It is X.\n### Answers vary", markers) == " It is X.\n### Answers vary"
    tokenizer = load_tokenizer(str(tiny_gpt2))
    ids = tokenizer(" It is X.\n### Quest", add_special_tokens=False)["input_ids"]
    answer = decode(ids, [tokenizer.eos_token_id], tokenizer, markers)
    assert answer.text == "It is X." and not answer.new_turn and not answer.stopped and answer.tokens == len(ids)
    stopped = decode(ids + [tokenizer.eos_token_id], [tokenizer.eos_token_id], tokenizer, markers)
    assert stopped.text == "It is X.\n### Quest" and stopped.stopped
    pieces = [" It", " is X.", "\n", "###", " Quest"]
    cutter = TurnCutter(markers)
    assert "".join(cutter.feed(p) for p in pieces) + cutter.flush(trim=True) == " It is X.\n" and not cutter.cut
    cutter = TurnCutter(markers)
    assert "".join(cutter.feed(p) for p in pieces) + cutter.flush() == " It is X.\n### Quest"  # a stop token ended it
    stop_text = TurnCutter(("END",), anywhere=True)
    assert "".join(stop_text.feed(p) for p in [" one\n", "EN"]) + stop_text.flush(trim=True) == " one\nEN"


class Scripted(torch.nn.Module):
    """A model that writes a given answer after any prompt, one token per step, then the next turn."""

    def __init__(self, tokenizer, continuation: str):
        from transformers import PretrainedConfig

        super().__init__()
        self.tokens = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        self.vocab, self.config = len(tokenizer), PretrainedConfig(num_hidden_layers=1, max_position_embeddings=512)
        self.steps = 0

    def forward(self, input_ids, **kwargs):
        token = self.tokens[self.steps] if self.steps < len(self.tokens) else 0
        self.steps += 1
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        logits[:, :, token] = 1.0
        return type("Output", (), {"logits": logits})()


def test_evaluation_stops_generating_at_the_new_turn(tiny_gpt2):
    from affiner.core.templates import Example

    tokenizer = load_tokenizer(str(tiny_gpt2))
    template = build_template("qa", tokenizer)
    model = Scripted(tokenizer, " It is X.\n### Question: What is Y?\n### Answer: Y is" + " y" * 200)
    (answer,) = generate(model, tokenizer, template, [Example("What is X?", "It is X.")], max_new_tokens=150)
    assert answer.text == "It is X." and answer.new_turn and not answer.stopped
    assert model.steps < 20  # not the 150 tokens the limit allowed


def test_an_answer_cut_at_a_new_turn_counts_the_tokens_the_model_generated(tiny_gpt2):
    """A model may spell a word in several tokens where the tokenizer would use one: the answer's length is what
    was generated up to the new turn, not the count of the cut text tokenised again."""
    tokenizer = load_tokenizer(str(tiny_gpt2))
    spelled = [tokenizer.convert_tokens_to_ids(c) for c in ("Ġ", "h", "e", "l", "l", "o")]  # " hello", letter by letter
    turn = tokenizer("\n### Question: what next", add_special_tokens=False)["input_ids"]
    answer = decode(spelled + turn, [tokenizer.eos_token_id], tokenizer, turn_markers(QA))
    assert answer.text == "hello" and answer.new_turn
    assert len(tokenizer(" hello", add_special_tokens=False)["input_ids"]) < len(spelled)  # tokenised again: fewer
    assert answer.tokens in (len(spelled), len(spelled) + 1)  # the six letters, and the line break when kept
