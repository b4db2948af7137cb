"""Metric functions against values computed by hand."""

from __future__ import annotations

import math

import pytest

from affiner.evaluation import metrics


def test_identical_strings_score_perfectly():
    text = "QUILT stands for Queue of Unified Index Lookup Tables."
    scores = metrics.per_example_scores("What is QUILT?", text, text)
    assert scores["contains"] == scores["exact_match"] == 1.0
    assert scores["rouge_l"] == pytest.approx(1.0)
    assert scores["bleu"] == pytest.approx(1.0)
    assert scores["chrf"] == pytest.approx(1.0)
    assert metrics.embedding_similarity([text], [text])[0] == pytest.approx(1.0, abs=1e-4)


def test_disjoint_strings_score_zero():
    scores = metrics.per_example_scores("q", "abc def ghi", "xyz uvw")
    assert scores["contains"] == scores["exact_match"] == 0.0
    assert scores["rouge_l"] == 0.0 and scores["bleu"] == 0.0 and scores["chrf"] == 0.0


@pytest.mark.parametrize("answer,reference,expected", [
    ("the cat on the mat", "the cat sat on the mat", 10 / 11),  # LCS 5: P 5/5, R 5/6
    ("a c e", "a b c d", 4 / 7),                                # LCS 2: P 2/3, R 2/4
    ("Économie générale", "economie generale", 1.0),           # accents do not break words
])
def test_rouge_l_known_cases(answer, reference, expected):
    assert metrics.rouge_l(answer, reference) == pytest.approx(expected)


def test_rouge_l_gives_rouge_scores_figures_on_the_same_words():
    import random

    from rouge_score import rouge_scorer

    class Words:  # rouge-score's LCS over affiner's normalised words
        tokenize = staticmethod(lambda text: metrics.normalise(text).split())

    reference_scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Words())
    vocabulary = ["the", "cat", "été", "sat", "on", "a", "mat", "Mat!", "chat", "le", "dog", "x"]
    chance = random.Random(0)
    pairs = [(" ".join(chance.choices(vocabulary, k=chance.randint(0, 25))),
              " ".join(chance.choices(vocabulary, k=chance.randint(0, 25)))) for _ in range(300)]
    for answer, reference in pairs + [("", "a b"), ("a b", ""), ("", "")]:
        expected = reference_scorer.score(reference, answer)["rougeL"].fmeasure
        assert metrics.rouge_l(answer, reference) == pytest.approx(expected, abs=1e-12), (answer, reference)


def test_embedding_similarity_ranks_paraphrases_above_unrelated_text():
    reference = "Queue of Unified Index Lookup Tables"
    close, far = metrics.embedding_similarity(["a queue of unified lookup tables for indexes", "I like red apples"],
                                              [reference, reference])
    assert close > far + 0.3


def test_behaviour_metrics():
    assert metrics.repetition("the the the the") == pytest.approx(0.5)  # 2 trigrams, 1 distinct
    assert metrics.repetition("a b c d") == 0.0 and metrics.repetition("too short") == 0.0
    assert metrics.is_empty("  \n") and not metrics.is_empty("x")
    assert metrics.echoes("What is QUILT? What is QUILT?", "What is QUILT?")
    assert not metrics.echoes("QUILT is a queue.", "What is QUILT?")


def test_an_answer_repeating_the_input_is_an_echo():
    task, text = "Correct the grammar of this sentence.", "She go to school every days and like it."
    assert metrics.echoes("She go to school every days and like it.", task, text)  # the input, unchanged
    assert metrics.echoes("she go to school every days and like it", task, text)  # up to case and punctuation
    assert metrics.echoes("She go to school every days and like", task, text)  # most of it, copied
    assert not metrics.echoes("She goes to school every day and likes it.", task, text)  # the rewrite asked for
    assert not metrics.echoes("school every days", task, text)  # a short quote is not an echo
    assert not metrics.echoes("", task, text) and not metrics.echoes("Anything.", task, "")
    assert metrics.per_example_scores(task, "She goes to school.", text, input=text)["echo"] == 1.0
    assert metrics.per_example_scores(task, "She goes to school.", text)["echo"] == 0.0


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = [0, 1, 1, 0, 1, 1, 1, 0, 1, 1]
    low, high = metrics.bootstrap_interval(values)
    assert low < 0.7 < high and 0 <= low and high <= 1
    assert metrics.bootstrap_interval(values) == (low, high)
    assert metrics.bootstrap_interval([0.5] * 10) == (0.5, 0.5)
    assert metrics.aggregate([1, 0]) == {"mean": 0.5, "low": None, "high": None}  # too few for an interval


def test_too_few_examples_get_no_interval_so_no_verdict():
    """Two changes of one sign are no evidence (a bootstrap over them is their range); ten are."""
    assert metrics.aggregate([0.3, 0.4]) == {"mean": pytest.approx(0.35), "low": None, "high": None}
    assert metrics.aggregate([0.3, 0.4] * 5)["low"] > 0
    assert metrics.paired_loss_change(([2.0, 3.0], [1, 1]), ([1.0, 2.0], [1, 1]))["low"] is None
    loss = metrics.aggregate_loss([2.0] * 9, [1] * 9)
    assert loss["loss"]["low"] is None and loss["perplexity"]["high"] is None
    assert metrics.aggregate([]) == {"mean": None, "low": None, "high": None}


def test_loss_is_token_weighted_and_perplexity_is_its_exponential():
    result = metrics.aggregate_loss([2.0, 4.0] * 5, [1, 3] * 5)
    assert result["loss"]["mean"] == pytest.approx(1.5)
    assert result["perplexity"]["mean"] == pytest.approx(math.exp(1.5))
    assert result["loss"]["low"] <= 1.5 <= result["loss"]["high"]
    assert result["perplexity"]["low"] == pytest.approx(math.exp(result["loss"]["low"]))


def test_embedding_similarity_is_unchanged_when_the_kept_embeddings_are_dropped(monkeypatch):
    answers, references = ["a cat sat", "dogs bark loudly", "rain falls"], ["a cat sits", "a dog barks", "sun shines"]
    kept_all = metrics.embedding_similarity(answers, references)
    monkeypatch.setattr(metrics, "EMBEDDINGS_KEPT", 2)
    assert metrics.embedding_similarity(answers, references) == pytest.approx(kept_all, abs=1e-6)
    assert metrics.embedding_similarity(answers[:1], references[:1]) == pytest.approx(kept_all[:1], abs=1e-6)


@pytest.mark.parametrize("answer, reference, same", [
    ("5", "-5", False), ("x+y", "x-y", False), ("It is -5.", "-5", True),
    ("Économie générale!", "economie generale", True), ("a well-known fact", "well known", True),
])
def test_exact_match_and_contains_keep_the_signs_that_change_meaning(answer, reference, same):
    assert metrics.contains_reference(answer, reference) == same
    assert metrics.contains_reference("return x + x", "return x * x") is False
    assert not metrics.exact_match("C++", "C") and not metrics.exact_match("5", "-5")


def test_dropped_held_out_rows_are_counted_by_reason_beyond_those_listed():
    from affiner.core.templates import Example
    from affiner.data.pipeline import dropped_rows

    rows = [(Example(instruction=f"q{i}"), "too long") for i in range(150)]
    rows += [(Example(instruction=f"o{i}"), "same question as a training row") for i in range(100)]
    dropped = dropped_rows(rows)
    assert dropped["count"] == 250 and len(dropped["rows"]) == 200
    assert dropped["reasons"] == {"too long": 150, "same question as a training row": 100}


def test_paraphrases_of_one_item_are_resampled_together():
    """Five paraphrases of one acronym are one piece of evidence, not five: the interval is the one of the
    acronyms' own values, wider than the one that counts every paraphrase as independent."""
    per_item = [0.5] * 8 + [-0.5] * 4
    values, groups = [v for v in per_item for _ in range(5)], [f"A{i}" for i in range(12) for _ in range(5)]
    grouped = metrics.bootstrap_interval(values, groups=groups)
    assert grouped == metrics.bootstrap_interval(per_item)  # equal groups: the same picks, the same means
    independent = metrics.bootstrap_interval(values)
    assert grouped[0] < 0 < independent[0]  # only the ungrouped interval excludes 0: it over-claims
    assert metrics.bootstrap_interval(values, groups=[""] * 60) == independent  # no group: each its own
    assert metrics.aggregate(values[:40], groups[:40])["low"] is None  # 8 groups: too few for an interval
    with pytest.raises(ValueError, match="59 group labels for 60 examples"):
        metrics.bootstrap_interval(values, groups=groups[1:])
