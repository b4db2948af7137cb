"""The report writer on small hand-made evaluations: every file, the numbers in them, and the HTML as a
browser renders it (headless Chromium, skipped when it is not installed)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from affiner.evaluation.report import write_report

FILES = {"report.md", "report.html", "answers.csv", "metrics.json", "metrics.png", "lengths.png"}
METRIC_INFO = {
    "contains": {"label": "contains the reference", "higher_is_better": True, "kind": "rate"},
    "rouge_l": {"label": "ROUGE-L F1", "higher_is_better": True, "kind": "score"},
    "tokens": {"label": "answer length (tokens)", "higher_is_better": None, "kind": "count"},
    "perplexity": {"label": "perplexity (held-out)", "higher_is_better": False, "kind": "loss"},
}
HOSTILE = "What does <script>alert(1)</script> a|b mean?"


def _answer(text: str, stopped: bool, tokens: int, contains: float, rouge: float) -> dict:
    return {"text": text, "stopped": stopped, "tokens": tokens, "scores": {"contains": contains, "rouge_l": rouge}}


def _examples() -> list[dict]:
    """Five questions; (contains, rouge_l) base -> tuned:
    Q1 0->1 (+0.5), Q2 0->1 (+0.8), Q3 1->0 (-0.3), Q4 1->1 (+0.4, no primary change), HOSTILE 1->0 (-0.6)."""
    rows = [
        ("What is QUILT?", "Queue of Unified Index Lookup Tables", (0.0, 0.2), (1.0, 0.7)),
        ("What is FROND?", "Federated Registry of Open Nautical Data", (0.0, 0.1), (1.0, 0.9)),
        ("What is MAPLE?", "Modular Archive for Prototype Lab Experiments", (1.0, 0.8), (0.0, 0.5)),
        ("What is BIRCH?", "Batch Index", (1.0, 0.5), (1.0, 0.9)),
        (HOSTILE, "x|y\nnext line", (1.0, 0.9), (0.0, 0.3)),
    ]
    examples = []
    for i, (question, reference, (bc, br), (tc, tr)) in enumerate(rows):
        examples.append({
            "question": question, "input": "context line" if i == 1 else "", "reference": reference,
            "answers": {"base": _answer(f"base says {i}\nmore", False, 48, bc, br),
                        "tuned": _answer(f"tuned says {i} | piped", True, 8 + i, tc, tr)},
        })
    return examples


def _ci(mean: float, low: float | None = None, high: float | None = None) -> dict:
    return {"mean": mean, "low": low, "high": high}


def _evaluation() -> dict:
    return {
        "title": "quickstart-20261122-182707",
        "models": ["base", "tuned"],
        "primary_metric": "contains",
        "settings": {"decoding": "greedy", "max_new_tokens": 48, "template": "qa",
                     "test": "embedded:glossary-test.json", "questions": 5},
        "metric_info": METRIC_INFO,
        "metrics": {
            "contains": {"base": _ci(0.6, 0.2, 1.0), "tuned": _ci(0.6, 0.2, 1.0)},
            "rouge_l": {"base": _ci(0.5, 0.25, 0.75), "tuned": _ci(0.66, 0.45, 0.85)},
            "tokens": {"base": _ci(48.0), "tuned": _ci(10.0, 9.0, 11.5)},
            "perplexity": {"base": _ci(12.5), "tuned": _ci(3.25)},
        },
        "judge": {"absolute": {"base": {"accuracy": 0.4, "judged": 5, "unparseable": 0, "failed": 0},
                               "tuned": {"accuracy": 0.8, "judged": 5, "unparseable": 1, "failed": 0}},
                  "pairwise": {"tuned": {"win_rate": 0.75, "wins": 3, "losses": 1, "ties": 1, "unparseable": 0}}},
        "examples": _examples(),
    }


def _two_tuned() -> dict:
    evaluation = _evaluation()
    evaluation["models"] = ["base", "run-a", "run-b"]
    evaluation["judge"] = None
    for name, metric in evaluation["metrics"].items():
        metric["run-a"] = metric.pop("tuned")
        metric["run-b"] = {"mean": {"contains": 0.2, "rouge_l": 0.4, "tokens": 60.0, "perplexity": 20.0}[name],
                           "low": None, "high": None}
    for example in evaluation["examples"]:
        answers = example["answers"]
        answers["run-a"] = answers.pop("tuned")
        answers["run-b"] = _answer("run-b rambles", False, 48, 0.0, 0.1)
    return evaluation


def _headline(markdown: str) -> dict[str, list[str]]:
    """Rows of the first markdown table, keyed by metric label."""
    section = markdown.split("## Headline", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")][1:]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in row.strip("|").split(" | ")] for row in rows)}


def _section(markdown: str, title: str) -> str:
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _questions_in(section: str) -> list[str]:
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")][1:]
    return [re.split(r"(?<!\\)\|", row)[2].strip() for row in rows]


# --------------------------------------------------------------------------- files and numbers

def test_writes_every_file_and_keeps_other_files(tmp_path: Path) -> None:
    keep = tmp_path / "summary.json"
    keep.write_text("{}", encoding="utf-8")
    paths = write_report(tmp_path, _evaluation())
    assert set(paths) == FILES
    for name, path in paths.items():
        assert path == tmp_path / name and path.is_file() and path.stat().st_size > 0
    assert keep.read_text(encoding="utf-8") == "{}"
    # No temporary file left behind by the atomic writes.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES | {"summary.json"})
    for name in ("metrics.png", "lengths.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_rewriting_replaces_files(tmp_path: Path) -> None:
    write_report(tmp_path, _evaluation())
    evaluation = _evaluation()
    evaluation["title"] = "second-run"
    write_report(tmp_path, evaluation)
    assert (tmp_path / "report.md").read_text(encoding="utf-8").startswith("# second-run\n")


def test_interrupted_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from affiner.core import files  # the one atomic write every report file goes through

    write_report(tmp_path, _evaluation())
    before = (tmp_path / "report.html").read_bytes()

    def interrupted_replace(source: str, target: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", interrupted_replace)
    evaluation = _evaluation()
    evaluation["title"] = "never-written"
    with pytest.raises(KeyboardInterrupt):
        write_report(tmp_path, evaluation)
    assert (tmp_path / "report.html").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)


def test_leaves_matplotlib_global_state_alone(tmp_path: Path) -> None:
    import sys

    import matplotlib

    backend, settings = matplotlib.get_backend(), dict(matplotlib.rcParams)
    had_pyplot = "matplotlib.pyplot" in sys.modules
    write_report(tmp_path, _two_tuned())
    assert matplotlib.get_backend() == backend
    assert dict(matplotlib.rcParams) == settings
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot


def test_metrics_json_round_trips(tmp_path: Path) -> None:
    evaluation = _evaluation()
    write_report(tmp_path, evaluation)
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert set(saved) == {"settings", "models", "primary_metric", "metrics", "metric_info", "judge"}
    for key in saved:
        assert saved[key] == evaluation[key]
    assert saved["metrics"]["rouge_l"]["tuned"] == {"mean": 0.66, "low": 0.45, "high": 0.85}
    assert saved["metrics"]["perplexity"]["base"]["low"] is None
    assert list(saved["metric_info"]) == list(METRIC_INFO)


def test_metrics_json_is_strict_json(tmp_path: Path) -> None:
    evaluation = _evaluation()
    evaluation["metrics"]["perplexity"]["base"]["mean"] = float("nan")
    write_report(tmp_path, evaluation)
    text = (tmp_path / "metrics.json").read_text(encoding="utf-8")
    assert "NaN" not in text
    assert json.loads(text)["metrics"]["perplexity"]["base"]["mean"] is None


def test_answers_csv(tmp_path: Path) -> None:
    write_report(tmp_path, _evaluation())
    with (tmp_path / "answers.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    per_model = ["answer", "stopped", "tokens", "contains", "rouge_l"]
    assert rows[0] == ["question", "input", "reference"] + [f"{m}_{f}" for m in ("base", "tuned") for f in per_model]
    assert len(rows) == 1 + 5
    examples = _examples()
    for row, example in zip(rows[1:], examples):
        record = dict(zip(rows[0], row))
        assert record["question"] == example["question"]
        assert record["input"] == example["input"]
        assert record["reference"] == example["reference"]
        for model in ("base", "tuned"):
            answer = example["answers"][model]
            assert record[f"{model}_answer"] == answer["text"]
            assert record[f"{model}_stopped"] == str(answer["stopped"]).lower()
            assert int(record[f"{model}_tokens"]) == answer["tokens"]
            assert float(record[f"{model}_contains"]) == answer["scores"]["contains"]
            assert float(record[f"{model}_rouge_l"]) == answer["scores"]["rouge_l"]
    # Newlines, pipes and markup survive the CSV quoting unchanged.
    assert rows[5][0] == HOSTILE and rows[5][2] == "x|y\nnext line"


# --------------------------------------------------------------------------- markdown

def test_markdown_headline_deltas_and_intervals(tmp_path: Path) -> None:
    write_report(tmp_path, _evaluation())
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert markdown.startswith("# quickstart-20261122-182707\n")
    assert "decoding: greedy" in markdown and "max_new_tokens: 48" in markdown
    table = _headline(markdown)
    assert list(table) == [info["label"] for info in METRIC_INFO.values()]
    # contains: 0.6 -> 0.6, rates in % and percentage points.
    assert table["contains the reference"] == ["60 % [20 %, 100 %]", "60 % [20 %, 100 %]", "+0 pp = same"]
    # rouge_l: 0.66 - 0.5 = +0.160, higher is better.
    assert table["ROUGE-L F1"] == ["0.500 [0.250, 0.750]", "0.660 [0.450, 0.850]", "+0.160 ▲ better"]
    # tokens: 10 - 48 = -38.0, no good direction, no interval for base.
    assert table["answer length (tokens)"] == ["48.0", "10.0 [9.0, 11.5]", "-38.0"]
    # perplexity: 3.25 - 12.5 = -9.250, lower is better.
    assert table["perplexity (held-out)"] == ["12.500", "3.250", "-9.250 ▲ better"]


def test_markdown_worse_delta(tmp_path: Path) -> None:
    evaluation = _evaluation()
    evaluation["metrics"]["perplexity"]["tuned"]["mean"] = 13.0
    evaluation["metrics"]["contains"]["tuned"] = {"mean": 0.45, "low": None, "high": None}
    write_report(tmp_path, evaluation)
    table = _headline((tmp_path / "report.md").read_text(encoding="utf-8"))
    assert table["perplexity (held-out)"][-1] == "+0.500 ▼ worse"
    assert table["contains the reference"][1:] == ["45 %", "-15 pp ▼ worse"]


def test_float_noise_is_not_an_improvement(tmp_path: Path) -> None:
    evaluation = _evaluation()
    evaluation["metrics"]["contains"] = {"base": _ci(0.3), "tuned": _ci(0.1 + 0.2)}  # 0.30000000000000004
    evaluation["metrics"]["perplexity"] = {"base": _ci(2.0), "tuned": _ci(2.0 - 1e-9)}
    write_report(tmp_path, evaluation)
    table = _headline((tmp_path / "report.md").read_text(encoding="utf-8"))
    assert table["contains the reference"][-1] == "+0 pp = same"
    assert table["perplexity (held-out)"][-1] == "+0.000 = same"


def test_markdown_wins_regressions_and_examples(tmp_path: Path) -> None:
    write_report(tmp_path, _evaluation())
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert markdown.index("## Judge") < markdown.index("## Largest wins") < markdown.index("## Largest regressions")
    judge = _section(markdown, "Judge")
    assert "| tuned | 80 % | 5 | 1 | 0 |" in judge and "| tuned | 75 % | 3 | 1 | 1 | 0 |" in judge
    # Both wins flip contains 0 -> 1; FROND gains more ROUGE-L (+0.8) than QUILT (+0.5).
    wins = _section(markdown, "Largest wins")
    assert _questions_in(wins) == ["What is FROND?<br><br>Input: context line", "What is QUILT?"]
    assert "ROUGE-L F1" in wins
    # Both regressions flip 1 -> 0; the hostile question loses more ROUGE-L (-0.6) than MAPLE (-0.3).
    regressions = _section(markdown, "Largest regressions")
    assert _questions_in(regressions) == ["What does &lt;script>alert(1)&lt;/script> a\\|b mean?", "What is MAPLE?"]
    assert "| -1 | -0.600 |" in regressions
    every = _section(markdown, "Every question")
    assert ("| 5 | What does &lt;script>alert(1)&lt;/script> a\\|b mean? | x\\|y<br>next line | base says 4<br>more"
            " | reference 1 | tuned says 4 \\| piped | reference 0 |") in every
    # Every row of the per-example table has the header's number of cells once pipes are escaped.
    rows = [line for line in every.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 5
    assert {len(re.split(r"(?<!\\)\|", row)) for row in rows} == {len(re.split(r"(?<!\\)\|", rows[0]))}


def test_no_wins_or_regressions_says_none(tmp_path: Path) -> None:
    evaluation = _evaluation()
    for example in evaluation["examples"]:
        example["answers"]["tuned"]["scores"]["contains"] = example["answers"]["base"]["scores"]["contains"]
    evaluation["judge"] = None
    write_report(tmp_path, evaluation)
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "## Judge" not in markdown
    assert "\nnone\n" in _section(markdown, "Largest wins")
    assert "\nnone\n" in _section(markdown, "Largest regressions")


def test_lower_is_better_primary_metric_ranks_drops_as_wins(tmp_path: Path) -> None:
    evaluation = _evaluation()
    evaluation["primary_metric"] = "repetition"
    evaluation["metric_info"] = {"repetition": {"label": "repeated 3-grams", "higher_is_better": False, "kind": "rate"},
                                 **METRIC_INFO}
    evaluation["metrics"]["repetition"] = {"base": {"mean": 0.5, "low": 0.1, "high": 0.9},
                                           "tuned": {"mean": 0.2, "low": 0.0, "high": 0.4}}
    for i, example in enumerate(evaluation["examples"]):
        example["answers"]["base"]["scores"]["repetition"] = 0.5
        example["answers"]["tuned"]["scores"]["repetition"] = [0.1, 0.5, 0.9, 0.3, 0.5][i]
    write_report(tmp_path, evaluation)
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert _headline(markdown)["repeated 3-grams"][-1] == "-30 pp ▲ better"
    assert _questions_in(_section(markdown, "Largest wins")) == ["What is QUILT?", "What is BIRCH?"]
    assert _questions_in(_section(markdown, "Largest regressions")) == ["What is MAPLE?"]


def test_two_tuned_models(tmp_path: Path) -> None:
    paths = write_report(tmp_path, _two_tuned())
    assert set(paths) == FILES
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    header = next(line for line in _section(markdown, "Headline").splitlines() if line.startswith("| metric"))
    assert [c.strip() for c in header.strip("|").split("|")] == \
        ["metric", "base", "run-a", "run-b", "Δ run-a − base", "Δ run-b − base"]
    table = _headline(markdown)
    # run-a: as "tuned" above; run-b: 0.2 - 0.6 = -40 pp, 0.4 - 0.5 = -0.100, 60 - 48 = +12.0, 20 - 12.5 = +7.500.
    assert table["contains the reference"][2:] == ["20 %", "+0 pp = same", "-40 pp ▼ worse"]
    assert table["ROUGE-L F1"][2:] == ["0.400", "+0.160 ▲ better", "-0.100 ▼ worse"]
    assert table["answer length (tokens)"][2:] == ["60.0", "-38.0", "+12.0"]
    assert table["perplexity (held-out)"][2:] == ["20.000", "-9.250 ▲ better", "+7.500 ▼ worse"]
    # Wins and regressions compare the first tuned model with the base.
    assert _questions_in(_section(markdown, "Largest wins")) == ["What is FROND?<br><br>Input: context line",
                                                                 "What is QUILT?"]
    assert "run-a against base" in _section(markdown, "Largest wins")
    every = _section(markdown, "Every question")
    assert "| run-a answer | run-a: right or wrong | run-b answer | run-b: right or wrong |" in every
    with (tmp_path / "answers.csv").open(encoding="utf-8", newline="") as handle:
        header_row = next(csv.reader(handle))
    assert header_row[3:] == [f"{m}_{f}" for m in ("base", "run-a", "run-b")
                              for f in ("answer", "stopped", "tokens", "contains", "rouge_l")]
    assert json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))["models"] == ["base", "run-a", "run-b"]
    html_text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Δ run-b − base" in html_text and "run-b rambles" in html_text


def test_base_only_and_no_examples(tmp_path: Path) -> None:
    evaluation = _evaluation()
    evaluation["models"] = ["base"]
    evaluation["examples"] = []
    evaluation["judge"] = None
    assert set(write_report(tmp_path, evaluation)) == FILES
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert _headline(markdown)["ROUGE-L F1"] == ["0.500 [0.250, 0.750]"]
    assert "\nnone\n" in _section(markdown, "Largest wins")


# --------------------------------------------------------------------------- html

def test_html_is_self_contained_and_escaped(tmp_path: Path) -> None:
    write_report(tmp_path, _evaluation())
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.IGNORECASE)
    assert "http://" not in page and "https://" not in page
    images = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)
    assert len(images) == 2 and all(src.startswith("data:image/png;base64,") for src in images)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; a|b mean?" in page
    assert 'id="headline"' in page
    for info in METRIC_INFO.values():
        assert info["label"] in page
    assert "tuned says 4 | piped" in page


def _chromium(*arguments: str, profile: Path) -> subprocess.CompletedProcess:
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (apt-get install chromium); CI installs it")
def test_html_renders_in_chromium(tmp_path: Path) -> None:
    from matplotlib.image import imread

    folder = tmp_path / "report"
    page = write_report(folder, _evaluation())["report.html"].resolve()
    shot = tmp_path / "shot.png"
    result = _chromium(f"--screenshot={shot}", "--window-size=1200,900", page.as_uri(), profile=tmp_path / "profile-1")
    assert shot.is_file(), f"no screenshot; chromium said:\n{result.stderr[-2000:]}"

    pixels = imread(str(shot))[:, :, :3]
    assert pixels.shape[:2] == (900, 1200)
    colours = {tuple(p) for p in (pixels[::3, ::3].reshape(-1, 3) * 255).round().astype(int)}
    assert len(colours) > 50, "the screenshot is (nearly) blank"
    red, green, blue = (pixels[:, :, i] * 255 for i in range(3))
    blueish = (blue - red > 20) & (blue - green > 8)
    greenish = (green - red > 15) & (green - blue > 10)
    # Whole tinted cells, not a few anti-aliased pixels; base cells sit in the headline table at the top.
    assert blueish.sum() > 2000 and greenish.sum() > 2000
    assert blueish[:450].sum() > 2000 and greenish[:450].sum() > 2000

    dom = _chromium("--dump-dom", page.as_uri(), profile=tmp_path / "profile-2").stdout
    assert re.search(r'<table[^>]*\bid="headline"', dom)
    headline = dom.split('id="headline"', 1)[1].split("</table>", 1)[0]
    for info in METRIC_INFO.values():
        assert info["label"] in headline
    # The hostile question stayed text: no script element was created from it.
    assert "<script" not in dom.lower() and "&lt;script&gt;alert(1)&lt;/script&gt;" in dom


def test_a_change_is_better_only_when_its_paired_interval_excludes_zero(tmp_path: Path) -> None:
    from affiner.core.templates import Example
    from affiner.evaluation.evaluate import build_evaluation
    from affiner.evaluation.generation import Answer

    examples = [Example(instruction=f"q{i}", response=f"r{i}") for i in range(16)]
    answers = {m: [Answer(text="a", stopped=True, tokens=1)] * 16 for m in ("base", "tuned")}
    base_rouge = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6] * 2  # questions differ widely: the unpaired intervals are wide
    scores = {"base": [{"rouge_l": r, "chrf": 0.5} for r in base_rouge],
              "tuned": [{"rouge_l": r + 0.05, "chrf": 0.5 + c} for r, c in
                        zip(base_rouge, [0.3, -0.2, 0.3, -0.2, 0.1, -0.2, 0.3, -0.3] * 2)]}
    losses = {"base": ([20.0, 40.0, 30.0, 10.0] * 4, [10] * 16), "tuned": ([18.0, 38.0, 28.0, 8.0] * 4, [10] * 16)}
    evaluation = build_evaluation("t", examples, answers, scores, losses, None, {})
    assert evaluation["changes"]["rouge_l"]["tuned"] == pytest.approx({"mean": 0.05, "low": 0.05, "high": 0.05})
    assert evaluation["changes"]["loss"]["tuned"] == pytest.approx({"mean": -0.2, "low": -0.2, "high": -0.2})
    write_report(tmp_path, evaluation)
    table = _headline((tmp_path / "report.md").read_text(encoding="utf-8"))
    base_ci, tuned_ci = table["ROUGE-L F1"][:2]
    assert float(tuned_ci.split("[")[1].split(",")[0]) < float(base_ci.split(", ")[1].rstrip("]"))  # overlap
    assert table["ROUGE-L F1"][2] == "+0.050 [+0.050, +0.050] ▲ better"  # yet every question gained
    assert table["test loss (held-out answers)"][2] == "-0.200 [-0.200, -0.200] ▲ better"
    chrf = table["chrF"][2]
    assert re.fullmatch(r"\+0\.01\d \[-0\.\d+, \+0\.\d+\] ≈ within noise", chrf)  # up on average, down on half
    assert json.loads((tmp_path / "metrics.json").read_text())["changes"]["chrf"]["tuned"]["mean"] == pytest.approx(0.0125)


def test_a_gain_on_paraphrases_of_few_items_is_not_over_claimed(tmp_path: Path) -> None:
    """Twelve acronyms asked five ways each: a change up on 8 acronyms and down on 4 is within noise once each
    acronym's paraphrases are resampled together, though it would read better from 60 independent questions."""
    from affiner.core.templates import Example
    from affiner.evaluation.evaluate import build_evaluation
    from affiner.evaluation.generation import Answer

    def evaluation_of(grouped: bool) -> dict:
        examples = [Example(instruction=f"q{i}-{k}", response=f"r{i}", group=f"A{i}" if grouped else "")
                    for i in range(12) for k in range(5)]
        answers = {m: [Answer(text="a", stopped=True, tokens=1)] * 60 for m in ("base", "tuned")}
        change = [0.5] * 8 + [-0.5] * 4
        scores = {"base": [{"rouge_l": 0.5}] * 60, "tuned": [{"rouge_l": 0.5 + change[i // 5]} for i in range(60)]}
        losses = {"base": ([10.0] * 60, [10] * 60), "tuned": ([10.0 - 2 * change[i // 5] for i in range(60)], [10] * 60)}
        return build_evaluation("t", examples, answers, scores, losses, None, {})

    for grouped, verdict in ((True, "≈ within noise"), (False, "▲ better")):
        write_report(tmp_path, evaluation_of(grouped))
        table = _headline((tmp_path / "report.md").read_text(encoding="utf-8"))
        assert table["ROUGE-L F1"][2].endswith(verdict), (grouped, table["ROUGE-L F1"])
        assert table["test loss (held-out answers)"][2].endswith(verdict), (grouped, table["test loss (held-out answers)"])


def test_perplexity_and_judge_changes_have_paired_intervals_and_one_question_gives_no_verdict(tmp_path: Path) -> None:
    from affiner.core.templates import Example
    from affiner.evaluation.evaluate import build_evaluation
    from affiner.evaluation.generation import Answer

    def evaluation_of(n: int, judged_tuned: int) -> dict:
        examples = [Example(instruction=f"q{i}", response=f"r{i}") for i in range(n)]
        answers = {m: [Answer(text="a", stopped=True, tokens=1)] * n for m in ("base", "tuned")}
        scores = {"base": [{"rouge_l": 0.2 + 0.1 * (i % 3), "judge": 0.0} for i in range(n)],
                  "tuned": [{"rouge_l": 0.25 + 0.1 * (i % 3), **({"judge": 1.0} if i < judged_tuned else {})}
                            for i in range(n)]}
        losses = {"base": ([20.0 + i for i in range(n)], [10] * n), "tuned": ([20.0 + i - (i % 2) for i in range(n)],
                                                                              [10] * n)}
        return build_evaluation("t", examples, answers, scores, losses, {"absolute": {}}, {})

    evaluation = evaluation_of(40, judged_tuned=12)
    perplexity = evaluation["changes"]["perplexity"]["tuned"]
    assert perplexity["low"] <= perplexity["mean"] <= perplexity["high"] < 0  # every other question easier
    assert evaluation["changes"]["judge"]["tuned"] == pytest.approx({"mean": 1.0, "low": 1.0, "high": 1.0})
    write_report(tmp_path, evaluation_of(1, judged_tuned=1))  # one question: a difference, and no evidence
    table = _headline((tmp_path / "report.md").read_text(encoding="utf-8"))
    for label in ("ROUGE-L F1", "test loss (held-out answers)", "perplexity (held-out answers)"):
        assert "better" not in table[label][-1] and "worse" not in table[label][-1], (label, table[label])


def test_one_value_has_no_bootstrap_interval() -> None:
    from affiner.evaluation import metrics

    assert all(np.isnan(end) for end in metrics.bootstrap_interval([0.7]))


@pytest.mark.parametrize("change, low, high, text, judged", [
    # The interval's upper end just below 0: it excludes 0 (a measurable drop), printed with its sign.
    (-0.129, -0.329, -0.000366, "-0.129 [-0.329, -0.000] ▼ worse", "worse"),
    # A change that rounds to 0 inside a wide interval was measured as noise, not as "same".
    (0.00004, -0.004, 0.004, "+0.000 [-0.004, +0.004] ≈ within noise", "noise"),
    # Every paired difference 0 (float noise aside): the same.
    (1e-17, -2e-17, 3e-17, "+0.000 [+0.000, +0.000] = same", "same"),
    (0.25, 0.1, 0.4, "+0.250 [+0.100, +0.400] ▲ better", "better"),
])
def test_a_delta_cell_reads_its_verdict_from_the_interval_before_rounding(change, low, high, text, judged):
    from affiner.evaluation.report_content import format_delta_cell

    assert format_delta_cell(change, "score", True, {"low": low, "high": high}) == (text, judged)


def test_a_rate_interval_just_below_zero_keeps_its_sign():
    from affiner.evaluation.report_content import format_delta_cell

    assert format_delta_cell(-0.008, "rate", False, {"low": -0.017, "high": -0.0003}) == \
        ("-0.8 pp [-1.7 pp, -0 pp] ▲ better", "better")
