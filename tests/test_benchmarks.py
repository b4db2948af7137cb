"""Standard benchmarks through lm-evaluation-harness, paired base vs tuned: run offline on a tiny model and a
local six-item task (tests/data/lm_eval_task), refused early on bad input, and rendered as a report section."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from affiner.core.errors import AffinerError
from affiner.evaluation.benchmarks import paired_results, run_benchmarks
from affiner.evaluation.report_markdown import benchmarks_section

TASK_DIR = Path(__file__).parent / "data" / "lm_eval_task"
TASK = "affiner_acronyms"
ROWS = len((TASK_DIR / "rows.jsonl").read_text().splitlines())


def never_loaded():
    pytest.fail("a model was loaded before the benchmarks were checked")


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory, tiny_gpt2) -> Path:
    """A LoRA adapter strong enough to change the tiny model's choices: the tuned model scores differently."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_gpt2),
                           LoraConfig(r=4, lora_alpha=256, target_modules=["c_attn", "c_fc", "c_proj"],
                                      init_lora_weights=False))
    folder = tmp_path_factory.mktemp("lora")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def benchmarked(tiny_gpt2, lora_adapter):
    """The local task on the tiny GPT-2 and on it with the adapter (loaded lazily, as evaluate's plan does)."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: pip install 'affiner[benchmarks]'")
    from transformers import AutoTokenizer

    from affiner.core.models import load_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)  # without a pad token, which lm-eval would add to it
    assert tokenizer.pad_token is None
    models = {"base": load_model(str(tiny_gpt2)), "tuned": lambda: load_model(str(tiny_gpt2), adapter=lora_adapter)}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(TASK_DIR)  # the task's data_files path is relative, as `datasets` reads it: to the working folder
        result = run_benchmarks(models, tokenizer, [TASK], TASK_DIR, limit=ROWS - 2, batch_size=4)
    return result, tokenizer


def test_both_models_are_scored_with_standard_errors_and_paired(benchmarked):
    import lm_eval

    result, _ = benchmarked
    assert json.loads(json.dumps(result)) == result  # what metrics.json can hold as it is
    assert result["models"] == ["base", "tuned"] and result["baseline"] == "base"
    assert result["lm_eval_version"] == lm_eval.__version__
    entry = result["tasks"][TASK]
    assert entry["items"] == ROWS - 2 == result["limit"]  # --benchmarks-limit reached lm-eval
    assert str(entry["version"]) in {"1", "1.0"} and entry["shots"] == 0
    assert set(entry["metrics"]) == {"acc", "acc_norm"}
    for metric in entry["metrics"].values():
        assert metric["higher_is_better"] is True
        for score in metric["models"].values():
            assert 0 <= score["value"] <= 1
            assert score["stderr"] is not None and score["stderr"] >= 0
        base, tuned = metric["models"]["base"], metric["models"]["tuned"]
        change = metric["differences"]["tuned"]
        assert change["value"] == pytest.approx(tuned["value"] - base["value"])
        half = 1.959964 * math.hypot(base["stderr"], tuned["stderr"])
        assert (change["low"], change["high"]) == pytest.approx((change["value"] - half, change["value"] + half))


def test_the_tuned_model_is_the_one_with_the_adapter(benchmarked):
    result, _ = benchmarked
    scores = [(m["models"]["base"]["value"], m["models"]["tuned"]["value"]) for m in result["tasks"][TASK]["metrics"].values()]
    assert any(base != tuned for base, tuned in scores), scores  # not the base model scored twice


def test_the_callers_tokenizer_is_left_as_it_was(benchmarked):
    _, tokenizer = benchmarked
    assert tokenizer.pad_token is None  # lm-eval gave GPT-2's tokenizer a pad token: to its own copy only


def test_an_unknown_task_is_refused_with_close_names_before_any_model_loads():
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: pip install 'affiner[benchmarks]'")
    with pytest.raises(AffinerError, match=f"no task called 'affiner_acronym'.*{TASK}"):
        run_benchmarks({"base": never_loaded}, None, ["affiner_acronym"], TASK_DIR, None, 4)


def test_a_task_whose_dataset_cannot_be_had_is_named_before_any_model_loads(tmp_path, offline_hub, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: pip install 'affiner[benchmarks]'")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)  # restored afterwards
    yaml = (TASK_DIR / f"{TASK}.yaml").read_text().replace(f"task: {TASK}", "task: affiner_hub_only")
    yaml = yaml.replace("dataset_path: json", "dataset_path: affiner-tests/no-such-dataset")
    (tmp_path / "hub_only.yaml").write_text(yaml.replace("    test: rows.jsonl\n", "").replace("  data_files:\n", ""))
    with pytest.raises(AffinerError, match="task 'affiner_hub_only'.*unreachable"):
        run_benchmarks({"base": never_loaded}, None, ["affiner_hub_only"], tmp_path, None, 4)


def test_a_missing_data_file_and_a_broken_task_file_are_named_as_such(tmp_path, offline_hub, monkeypatch):
    """Offline, every failure was blamed on the Hub, the README's own local task included when run from elsewhere;
    a task file that did not parse was reported as an unknown task."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: pip install 'affiner[benchmarks]'")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)  # restored afterwards
    monkeypatch.chdir(tmp_path)  # not the task's folder: its relative data_files is not found from here
    with pytest.raises(AffinerError, match=f"task '{TASK}': a data file it names is not there; a relative "
                                           "data_files path is read from the folder affiner runs in") as error:
        run_benchmarks({"base": never_loaded}, None, [TASK], TASK_DIR, None, 4)
    assert "unreachable" not in str(error.value)
    broken = tmp_path / "tasks"
    broken.mkdir()
    (broken / "broken.yaml").write_text('task: broken_task\ndoc_to_text: "Question: {{question}}\n')
    with pytest.raises(AffinerError, match=r"the task file .*broken.yaml does not parse as YAML"):
        run_benchmarks({"base": never_loaded}, None, ["broken_task"], broken, None, 4)


def test_without_lm_eval_the_error_says_how_to_install_it(monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets when it is not installed
    with pytest.raises(AffinerError, match=r"pip install 'affiner\[benchmarks\]'"):
        run_benchmarks({"base": never_loaded}, None, ["arc_easy"], None, None, 4)


def test_the_markdown_has_one_row_per_task_metric(benchmarked):
    result, _ = benchmarked
    rows = [line for line in "\n".join(benchmarks_section(result)).splitlines() if line.startswith(f"| {TASK} |")]
    assert [row.split(" | ")[2] for row in rows] == list(result["tasks"][TASK]["metrics"])


def lm_eval_output(acc: float, acc_stderr, perplexity: float, match: float) -> dict:
    """What simple_evaluate returns for one model, reduced to what the pairing reads."""
    return {"results": {"demo": {"alias": "demo", "acc,none": acc, "acc_stderr,none": acc_stderr,
                                 "word_perplexity,none": perplexity, "word_perplexity_stderr,none": 0.5,
                                 "exact_match,strict-match": match, "exact_match_stderr,strict-match": 0.01}},
            "versions": {"demo": 2.0}, "n-samples": {"demo": {"original": 400, "effective": 400}},
            "n-shot": {"demo": 5},
            "higher_is_better": {"demo": {"acc": True, "word_perplexity": False, "exact_match": True}}}


def test_verdicts_follow_the_interval_and_the_metrics_direction():
    raw = {"base": lm_eval_output(0.50, 0.02, 20.0, 0.30), "tuned": lm_eval_output(0.52, 0.02, 12.0, 0.10)}
    result = paired_results(raw, "0.4.13", None)
    metrics = result["tasks"]["demo"]["metrics"]
    assert list(metrics) == ["acc", "word_perplexity", "exact_match (strict-match)"]
    assert result["tasks"]["demo"]["items"] == 400 and result["tasks"]["demo"]["version"] == 2.0
    rows = {row.split(" | ")[2]: row for row in "\n".join(benchmarks_section(result)).splitlines() if row.startswith("| demo")}
    assert rows["acc"].endswith("| no measurable change |")  # +0.02 with an interval of +-0.055
    assert rows["word_perplexity"].endswith("| better |")  # lower perplexity, well outside its interval
    assert rows["exact_match (strict-match)"].endswith("| worse |")
    assert "0.500 ± 0.020" in rows["acc"] and "+0.020 [" in rows["acc"]
    assert "lm-eval 0.4.13; tasks: demo v2.0 (5-shot)." in "\n".join(benchmarks_section(result))


def test_a_score_without_standard_error_has_no_verdict():
    raw = {"base": lm_eval_output(0.5, "N/A", 20.0, 0.3), "tuned": lm_eval_output(0.9, "N/A", 20.0, 0.3)}
    result = paired_results(raw, "0.4.13", 10)
    change = result["tasks"]["demo"]["metrics"]["acc"]["differences"]["tuned"]
    assert change == {"value": pytest.approx(0.4), "low": None, "high": None}
    row = next(r for r in "\n".join(benchmarks_section(result)).splitlines() if r.startswith("| demo | 400 | acc |"))
    assert row.endswith("| no interval |") and "at most 10 items per task" in "\n".join(benchmarks_section(result))
