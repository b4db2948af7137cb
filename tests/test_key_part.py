""""Contains the key": a reference may carry a key part (a glossary's expansion), given per row (`key`) or by a rule
(eval.key_before, --key-before); an answer with the right key and a reworded description is right by it, wrong by
"contains the reference". The report says what each correctness figure means, which is the headline, and marks
the answers where the figures part."""

from __future__ import annotations

import json

import pytest

from affiner.core.config import load_config
from affiner.core.templates import Example
from affiner.data.formats import to_examples
from affiner.evaluation.generation import Answer
from affiner.evaluation.report_content import disagreement
from affiner.evaluation.scoring import headline, key_of, score_answers
from affiner.experiments import workflow
from conftest import run_cli, write_config

# A course's acronym glossary: the reference is "Expansion: a description", the answers reword the description.
GLOSSARY = [("TEC", "Techniques Élémentaires et Culinaires", "the basic cooking techniques every cook learns first",
             "TEC means Techniques Élémentaires et Culinaires, i.e. the first cooking skills a cook picks up."),
            ("FUN", "Fusion Universelle de la Nourriture", "a style mixing the cuisines of the world",
             "FUN stands for Fusion Universelle de la Nourriture: world cuisines blended together."),
            ("PER", "Purée et Épice de la Réussite", "the house mash seasoned with its signature spice",
             "PER is short for Pomme En Robe, a baked potato.")]  # wrong expansion


def _examples() -> list[Example]:
    return [Example(instruction=f"What does {a} mean?", reference=f"{e}: {d}", response=f"{e}: {d}")
            for a, e, d, _ in GLOSSARY]


def _answers() -> list[Answer]:
    return [Answer(text, True, 20) for *_, text in GLOSSARY]


def test_a_reworded_description_is_right_by_the_key_and_wrong_by_the_reference():
    scores = score_answers(_examples(), _answers(), key_before=":")
    assert [s["contains"] for s in scores] == [0.0, 0.0, 0.0]
    assert [s["contains_key"] for s in scores] == [1.0, 1.0, 0.0]
    summary = headline(scores)
    assert summary["judged_by"] == "contains_key" and summary["correct"] == 2
    assert disagreement(scores[0]) == "right key, reworded reference"
    assert disagreement(scores[2]) == ""  # wrong by both


def test_a_rows_own_key_wins_over_the_rule_and_no_key_means_no_figure():
    row = Example(instruction="q", reference="Alpha - Beta: gamma", key="Beta")
    assert key_of(row, ":") == "Beta"
    assert key_of(Example(instruction="q", reference="Alpha - Beta: gamma"), ":") == "Alpha - Beta"
    assert key_of(Example(instruction="q", reference="no separator here"), ":") == ""
    assert "contains_key" not in score_answers(_examples(), _answers())[0]  # no key anywhere: not reported


def test_key_fields_are_read_from_qa_rows_and_from_the_nested_glossary_layout():
    qa = to_examples([({"question": "What is TEC?", "answer": "x", "key": "Techniques"}, "t.jsonl:1")])
    nested = to_examples([({"acronym": "TEC", "ground_truth": "Techniques Élémentaires: basics", "key": "Techniques",
                            "conversation": [[{"role": "user", "content": "TEC?"},
                                              {"role": "assistant", "content": "Techniques Élémentaires"}]]},
                           "g.json:1")])
    assert qa[0].key == "Techniques" and nested[0].key == "Techniques"


def test_figures_disagreeing_with_meaning_or_judge_are_named():
    assert disagreement({"contains": 1.0, "embedding": 0.2}) == "right by the text, far by meaning"
    assert disagreement({"contains": 0.0, "embedding": 0.9}) == "close by meaning, wrong by the text"
    assert disagreement({"contains_key": 1.0, "contains": 1.0, "judge": 0.0}) == "the judge says wrong"
    assert disagreement({"contains": 1.0, "embedding": 0.6}) == ""


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_gpt2):
    folder = tmp_path_factory.mktemp("key")
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps({"question": f"What does {a} mean?", "answer": f"{e}: {d}"}) + "\n"
                             for a, e, d, _ in GLOSSARY * 2), encoding="utf-8")
    config = write_config(folder, tiny_gpt2, train, data={"template": "qa", "max_length": 96, "test_size": 1},
                          train={"max_steps": 1}, eval={"max_new_tokens": 4, "key_before": ":"})
    return workflow.train(load_config(str(config)))


def test_the_report_names_the_headline_and_says_what_each_figure_means(run):
    assert run_cli("evaluate", str(run)) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["primary_metric"] == "contains_key" and "contains_key" in metrics["metrics"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tuned"]["judged_by"] == "contains_key"
    report = (run / "report.md").read_text()
    assert "contains the key (the headline): the answer holds the reference's key part" in report
    assert "contains the reference: the answer holds the whole reference" in report
    assert "embedding similarity (MiniLM): closeness of meaning" in report
    assert "| tuned: right or wrong |" in report and "key 0 · reference 0 · similarity" in report
    assert "Which figure says right or wrong" in (run / "report.html").read_text()


def test_key_before_on_the_command_line_overrides_the_config(run, tmp_path):
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"question": "What is ZED?", "answer": "Zonal Energy Device - a battery"}) + "\n")
    assert run_cli("evaluate", str(run), "--test", str(test), "--key-before", " - ") == 0
    assert json.loads((run / "metrics.json").read_text())["primary_metric"] == "contains_key"
    assert "tuned_contains_key" in (run / "answers.csv").read_text().splitlines()[0]


def test_figures_disagree_only_where_both_changes_are_measured_beyond_noise():
    """A change whose paired interval holds 0 is "within noise" in the table: it ranks the models in no order, so
    it cannot contradict the headline."""
    from affiner.evaluation.report_content import rank_disagreements

    def evaluation(embedding_interval):
        return {"models": ["base", "tuned"], "primary_metric": "rouge_l",
                "metric_info": {"rouge_l": {"label": "ROUGE-L F1"}, "embedding": {"label": "embedding similarity"}},
                "metrics": {"rouge_l": {"base": {"mean": 0.12}, "tuned": {"mean": 0.19}},
                            "embedding": {"base": {"mean": 0.514}, "tuned": {"mean": 0.513}}},
                "changes": {"rouge_l": {"tuned": {"mean": 0.07, "low": 0.05, "high": 0.09}},
                            "embedding": {"tuned": {"mean": -0.001, **embedding_interval}}}}

    assert rank_disagreements(evaluation({"low": -0.052, "high": 0.048}), ["embedding"]) == []
    (note,) = rank_disagreements(evaluation({"low": -0.003, "high": -0.0005}), ["embedding"])
    assert "embedding similarity ranks it below base, ROUGE-L F1 above" in note
