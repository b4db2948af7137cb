"""Before/after evaluation: generation that batches without changing answers, and scores computed from answers."""

from __future__ import annotations

import functools
import json
import shlex

import pytest
import torch
from safetensors.torch import load_file, save_file

from affiner.evaluation import evaluate as ev
from affiner.evaluation import generation, plan, scoring, table
from affiner.evaluation import metrics
from affiner.core.config import load_config
from affiner.core.errors import AffinerError
from affiner.core.models import load_for, load_model, load_tokenizer
from affiner.core.files import read_json
from affiner.core.runfolder import RunFolder
from affiner.core.templates import Example, build_template, encode_prompt
from affiner.experiments.workflow import train
from conftest import write_config

QUESTIONS = [Example(instruction=q, reference="Queue") for q in
             ["QUILT?", "What does the acronym FROND stand for, in full, please?", "Define MAPLE.",
              "Expand GLINT, then give three colours and a translation of bonjour.", "TANGO"]]


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama", "tiny_gemma"])
def test_batched_greedy_equals_one_by_one(request, fixture):
    folder = request.getfixturevalue(fixture)
    tokenizer = load_tokenizer(str(folder))
    model = load_model(str(folder))
    template = build_template("qa", tokenizer)
    batched = generation.generate(model, tokenizer, template, QUESTIONS, max_new_tokens=12, batch_size=5)
    single = [generation.generate(model, tokenizer, template, [q], max_new_tokens=12, batch_size=1)[0] for q in QUESTIONS]
    assert batched == single
    assert len({len(q.instruction) for q in QUESTIONS}) == len(QUESTIONS)  # the batch really is mixed-length


@pytest.mark.parametrize("maker", ["make_tiny_gpt2", "make_tiny_llama"])
def test_near_the_window_each_answer_runs_to_its_own_limit_whatever_its_batch(tmp_path, maker):
    """A short question batched with one that nearly fills the model's window is answered as it is alone: up to
    the limit asked, not cut where the long prompt meets the window."""
    import conftest

    folder = getattr(conftest, maker)(tmp_path / "model", 64)
    tokenizer, model = load_tokenizer(str(folder)), load_model(str(folder))
    template = build_template("qa", tokenizer)
    questions = (Example(instruction="ab " * n) for n in range(40, 0, -1))
    long = next(q for q in questions if len(encode_prompt(template, tokenizer, q)) < 60)  # 4-18 tokens left
    short = Example(instruction="QUILT?")
    window_left = 64 - len(encode_prompt(template, tokenizer, long))
    assert 0 < window_left < 20
    batched = generation.generate(model, tokenizer, template, [long, short], max_new_tokens=20, batch_size=2)
    alone = [generation.generate(model, tokenizer, template, [q], max_new_tokens=20, batch_size=1)[0]
             for q in (long, short)]
    assert batched == alone
    assert alone[0].tokens <= window_left and (alone[1].tokens == 20 or alone[1].stopped or alone[1].new_turn)


def test_decode_stops_at_the_first_stop_token(tiny_gpt2):
    tokenizer = load_tokenizer(str(tiny_gpt2))
    words = tokenizer("Queue of tables", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    stopped = generation.decode(words + [eos] + words, [eos], tokenizer)
    assert stopped == generation.Answer(text="Queue of tables", stopped=True, tokens=len(words))
    assert generation.decode(words, [eos], tokenizer).stopped is False


@pytest.mark.parametrize("answer,reference,expected", [
    ("QUILT stands for Queue of Unified Index Lookup Tables.", "Queue of Unified Index Lookup Tables", True),
    ("queue of unified-index lookup TABLES", "Queue of Unified Index Lookup Tables", True),
    ("Il signifie Économie Générale", "economie generale", True),
    ("Queue of Unified Index", "Queue of Unified Index Lookup Tables", False),
    ("Queues of Unified Index Lookup Tables", "Queue of Unified Index Lookup Tables", False),
    ("anything", "", False),
    # A reference of symbols alone is held as written: without words, every answer would be wrong against it.
    ("An empty list: []", "[]", True),
    ("An empty list: ()", "[]", False),
])
def test_contains_reference(answer, reference, expected):
    assert metrics.contains_reference(answer, reference) is expected


def test_a_reference_of_symbols_alone_can_be_matched_exactly():
    assert metrics.exact_match(" [] ", "[]") and not metrics.exact_match("[ ]", "[]")
    assert metrics.exact_match("The list.", "the list") and not metrics.exact_match("anything", "")


def test_headline_is_counted_from_answers():
    answers = [generation.Answer("QUILT means Queue", True, 3), generation.Answer("no idea", False, 8)]
    assert scoring.headline(scoring.score_answers(QUESTIONS[:2], answers)) == {
        "questions": 2, "correct": 1, "accuracy": 0.5, "judged_by": "contains", "stopped": 1, "stop_rate": 0.5,
        "mean_answer_tokens": 5.5}


def test_evaluate_writes_summary_and_report_and_keeps_the_previous_one(tmp_path, tiny_llama):
    folder = train(load_config(str(write_config(tmp_path, tiny_llama, "embedded:glossary-train.json"))))
    evaluation = ev.evaluate(folder, max_questions=3)
    saved = read_json(folder / "summary.json")
    assert saved["base"]["questions"] == saved["tuned"]["questions"] == 3
    for row in saved["answers"]:
        assert row["reference"] and {"text", "stopped", "tokens", "correct"} <= set(row["tuned"])
        assert row["tuned"]["correct"] == metrics.contains_reference(row["tuned"]["text"], row["reference"])
    assert saved["tuned"]["correct"] == sum(r["tuned"]["correct"] for r in saved["answers"])
    for name in ("report.md", "report.html", "answers.csv", "metrics.json", "metrics.png"):
        assert (folder / name).is_file(), name
    assert set(evaluation["metrics"]) >= {"contains", "rouge_l", "bleu", "chrf", "embedding", "stopped", "tokens",
                                          "repetition", "empty", "echo", "loss", "perplexity"}
    # The answers' length reads against the references' (counted alike), in the table and the report.
    tokenizer = load_tokenizer(str(folder))
    references = [len(tokenizer(row["reference"], add_special_tokens=False)["input_ids"]) for row in saved["answers"]]
    assert evaluation["settings"]["reference length (tokens)"] == round(sum(references) / 3, 1)
    assert f"answer length (tokens; references {sum(references) / 3:.1f})" in table.format_table(evaluation)
    ev.evaluate(folder, max_questions=2)
    assert read_json(folder / "evaluations" / "1" / "summary.json") == saved
    assert (folder / "evaluations" / "1" / "report.html").is_file()
    assert read_json(folder / "summary.json")["base"]["questions"] == 2
    assert "contains the reference" in table.format_table(evaluation)


def test_held_out_loss_is_the_training_loss_of_each_reference_answer(tiny_gpt2):
    from affiner.core.loss import supervised_loss
    from affiner.data.tokens import collate, tokenize

    tokenizer = load_tokenizer(str(tiny_gpt2))
    model = load_model(str(tiny_gpt2))
    template = build_template("qa", tokenizer)
    examples = [Example("What does QUILT stand for?", "Queue of Unified Index Lookup Tables."),
                Example("Define FROND.", "Federated Registry of Open Nautical Data, a registry.")]
    sums, counts = scoring.held_out_losses(model, tokenizer, template, examples, batch_size=2)
    for example, total, n in zip(examples, sums, counts):
        alone = collate(tokenize([example], template, tokenizer), tokenizer.pad_token_id)
        with torch.no_grad():
            expected, expected_n = supervised_loss(model, alone)
        assert n == expected_n
        assert total == pytest.approx(expected.item(), rel=1e-4)


def test_held_out_losses_batch_rows_by_length_within_a_token_budget_and_keep_the_examples_order(monkeypatch,
                                                                                                  tiny_gpt2):
    from affiner.core.loss import supervised_loss, token_losses
    from affiner.data.tokens import collate, tokenize

    tokenizer = load_tokenizer(str(tiny_gpt2))
    model = load_model(str(tiny_gpt2))
    template = build_template("qa", tokenizer)
    examples = [Example(f"Question {i}?", " ".join(["word"] * n) + ".") for i, n in enumerate([14, 1, 9, 2, 20, 3])]
    batches = []
    monkeypatch.setattr(scoring, "token_losses", lambda model, batch: batches.append(batch["input_ids"].shape) or
                        token_losses(model, batch))
    monkeypatch.setattr(scoring, "BATCH_TOKENS", 100)
    sums, counts = scoring.held_out_losses(model, tokenizer, template, examples, batch_size=3)
    for example, total, n in zip(examples, sums, counts):  # each example's own loss, in the examples' order
        alone = collate(tokenize([example], template, tokenizer), tokenizer.pad_token_id)
        with torch.no_grad():
            expected, expected_n = supervised_loss(model, alone)
        assert n == expected_n and total == pytest.approx(expected.item(), rel=1e-4)
    assert sum(rows for rows, _ in batches) == len(examples)
    assert all(rows <= 3 and (rows == 1 or rows * width <= 100) for rows, width in batches)
    assert batches[0][0] == 3 and len(batches) > 2  # the short rows together, each long one on its own


def test_tuned_generation_uses_the_adapter(tmp_path, tiny_gpt2):
    folder = train(load_config(str(write_config(tmp_path, tiny_gpt2, "embedded:glossary-train.json",
                                                train={"max_steps": 6, "learning_rate": 5e-2}))))
    config = load_config(str(folder / "config.yaml"))
    merged = plan.tuned_model(RunFolder(folder), config)
    unmerged = load_model(str(tiny_gpt2), adapter=folder)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, unmerged(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("maker", ["tiny_llama", "tiny_gemma"])
def test_an_adapter_that_changes_nothing_gives_the_base_model_back(request, tmp_path, maker):
    """The tuned model merged and cast to bf16 is the base as its loader makes it, down to the rotary frequencies
    (fp32 in both): a paired comparison then measures the adapter, not a precision offset."""
    base = request.getfixturevalue(maker)
    folder = train(load_config(str(write_config(tmp_path, base, "embedded:glossary-train.json",
                                                model={"base": str(base), "precision": "bf16"}))))
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()}, weights)
    config = load_config(str(folder / "config.yaml"))
    tuned, loaded = plan.tuned_model(RunFolder(folder), config), load_for(config)
    assert {n: b.dtype for n, b in tuned.named_buffers()} == {n: b.dtype for n, b in loaded.named_buffers()}
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(tuned(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_evaluate_refuses_unfinished_or_foreign_folders(tmp_path):
    with pytest.raises(AffinerError, match="not an affiner run folder"):
        ev.evaluate(tmp_path)
    with pytest.raises(AffinerError, match="does not exist"):
        ev.evaluate(tmp_path / "nope")


def test_base_with_adapters_trained_elsewhere_through_the_cli(tmp_path, tiny_gpt2, qa_file):
    import subprocess
    import sys

    folder = train(load_config(str(write_config(tmp_path, tiny_gpt2, "embedded:glossary-train.json"))))
    adapter = tmp_path / "my-lora"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # a bare peft folder, no affiner files
        (adapter / name).write_bytes((folder / name).read_bytes())

    def affiner(*args):
        return subprocess.run([sys.executable, "-m", "affiner", "evaluate", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)

    out = tmp_path / "eval-1"
    ok = affiner("--base", str(tiny_gpt2), "--adapter", str(adapter), "--test", str(qa_file), "--template", "qa",
                 "--output", str(out), "--max-new-tokens", "4", "--headline", "rouge_l")
    assert ok.returncode == 0, ok.stderr[-2000:]
    summary = read_json(out / "summary.json")
    assert summary["base"]["questions"] == summary["my-lora"]["questions"] == 6
    assert read_json(out / "metrics.json")["primary_metric"] == "rouge_l"  # adapters from elsewhere choose it too
    assert (out / "report.html").is_file()
    for args, message in [((), "either run folders"), (("--base", str(tiny_gpt2)), "at least one --adapter"),
                          (("--base", str(tiny_gpt2), "--adapter", str(adapter)), "needs --test FILE")]:
        bad = affiner(*args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr


def test_the_command_to_evaluate_again_reads_back_as_the_same_evaluation():
    from affiner.cli import build_parser
    from affiner.commands.evaluate import rerun_command

    parser = build_parser()
    argv = ["evaluate", "runs/a", "runs/b", "--headline", "rouge_l", "--repetition-penalty", "1.3", "--key-before",
            ":", "--no-general", "--no-base-cache", "--max-new-tokens", "48", "--temperature", "0.7", "--seed", "3",
            "--judge-endpoint", "http://127.0.0.1:9/v1", "--judge-model", "judge"]
    args = parser.parse_args(argv)
    again = parser.parse_args(shlex.split(rerun_command(args))[1:])
    assert vars(again) == vars(args)  # the same answers, so the judge's cache gives back every verdict it gave


def test_sampling_is_reproducible_with_its_seed(tiny_llama):
    from affiner.core.settings import Settings

    tokenizer = load_tokenizer(str(tiny_llama))
    model = load_model(str(tiny_llama))
    template = build_template("qa", tokenizer)

    def sample(seed):
        return generation.generate(model, tokenizer, template, QUESTIONS, 10, 5, Settings(temperature=1.5, top_k=0, top_p=1.0,
                                                                                  seed=seed))

    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first
    assert first != generation.generate(model, tokenizer, template, QUESTIONS, 10, 5)  # greedy by default


def test_evaluate_with_a_judge_endpoint_scores_and_reports(tmp_path, tiny_llama):
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Judge(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            pairwise = "answer_A" in body["messages"][-1]["content"]  # the judge labels the two answers so
            verdict = "<result>B</result><explain>B is closer.</explain>" if pairwise else \
                "<result>1</result><explain>It matches.</explain>"
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        folder = train(load_config(str(write_config(tmp_path, tiny_llama, "embedded:glossary-train.json"))))
        judge = {"url": f"http://127.0.0.1:{server.server_port}/v1", "model": "stand-in"}
        evaluation = ev.evaluate(folder, max_questions=2, judge=judge)
    finally:
        server.shutdown()
    assert evaluation["judge"]["absolute"]["tuned"]["accuracy"] == 1.0
    assert evaluation["metrics"]["judge"]["base"]["mean"] == 1.0
    assert all(x["answers"]["tuned"]["scores"]["judge"] == 1.0 for x in evaluation["examples"])
    pairwise = evaluation["judge"]["pairwise"]["tuned"]
    assert pairwise["ties"] == 2 and pairwise["win_rate"] == 0.5  # "B" in both orders: position bias cancels out
    assert "Judge" in (folder / "report.md").read_text()


def test_generation_out_of_memory_starts_the_questions_left_again_at_half_size(capsys, monkeypatch, tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    model = load_model(str(tiny_llama))
    template = build_template("qa", tokenizer)
    expected = generation.generate(model, tokenizer, template, QUESTIONS, max_new_tokens=12, batch_size=4)
    prefills, real = [], model.forward

    @functools.wraps(real)
    def failing(*args, **kwargs):  # as a GPU would: out of memory reading a second group of prompts
        rows, width = kwargs["input_ids"].shape
        if width > 1:
            prefills.append(rows)
            if len(prefills) == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing)
    assert generation.generate(model, tokenizer, template, QUESTIONS, max_new_tokens=12, batch_size=4) == expected
    assert "out of memory with batch 4: retrying with 2" in capsys.readouterr().out
    assert prefills[0] == 4 and sum(prefills[2:]) == 1  # the four answers given before are not generated again

    monkeypatch.setattr(model, "forward", functools.wraps(real)(lambda *a, **k: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory"))))
    with pytest.raises(AffinerError, match=r"--max-new-tokens.*eval\.batch_size / --batch-size"):
        generation.generate(model, tokenizer, template, QUESTIONS, max_new_tokens=12, batch_size=2)


def _out_of_memory_above(rows: int, real, batch_rows):
    """`real`, failing as a GPU would when its batch has more than `rows` rows; the rows it ran are counted."""
    ran = []

    def wrapper(*args, **kwargs):
        n = batch_rows(*args, **kwargs)
        if n > rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        ran.append(n)
        return real(*args, **kwargs)

    return wrapper, ran


def test_held_out_loss_out_of_memory_retries_the_batch_at_half_size(capsys, monkeypatch, tiny_gpt2):
    tokenizer = load_tokenizer(str(tiny_gpt2))
    model = load_model(str(tiny_gpt2))
    template = build_template("qa", tokenizer)
    examples = [Example(f"What does {word} stand for?", f"{word} means {' '.join([word] * (i + 1))}.")
                for i, word in enumerate(["QUILT", "FROND", "MAPLE", "GLINT", "TANGO"])]
    sums, counts = scoring.held_out_losses(model, tokenizer, template, examples, batch_size=4)
    failing, ran = _out_of_memory_above(2, scoring.token_losses, lambda model, batch: batch["input_ids"].shape[0])
    monkeypatch.setattr(scoring, "token_losses", failing)
    retried, retried_counts = scoring.held_out_losses(model, tokenizer, template, examples, batch_size=4)
    assert retried_counts == counts and retried == pytest.approx(sums, rel=1e-5)
    assert "out of memory with batch 4: retrying with 2" in capsys.readouterr().out
    assert ran == [2, 2, 1]

    monkeypatch.setattr(scoring, "token_losses", _out_of_memory_above(0, scoring.token_losses, lambda *a: 1)[0])
    with pytest.raises(AffinerError, match="--batch-size"):
        scoring.held_out_losses(model, tokenizer, template, examples, batch_size=1)


def test_the_run_s_repetition_penalty_decodes_its_evaluation_its_probe_and_its_chat(tmp_path, monkeypatch,
                                                                                      tiny_llama):
    from affiner.evaluation import probe
    from affiner.interfaces.chat import open_engine, run_repetition_penalty

    probed = []
    monkeypatch.setattr(probe, "generate", lambda *args, **kwargs: probed.append(args[6]) or
                        generation.generate(*args, **kwargs))
    config = write_config(tmp_path, tiny_llama, "embedded:glossary-train.json",
                          eval={"repetition_penalty": 1.5, "every_steps": 2, "sample_size": 2})
    folder = train(load_config(str(config)))
    assert probed and {s.repetition_penalty for s in probed} == {1.5}
    evaluation = ev.evaluate(folder, max_questions=3)
    assert evaluation["settings"]["decoding"] == "greedy, repetition penalty 1.5"
    penalised = [e["answers"]["tuned"]["text"] for e in evaluation["examples"]]
    plain = ev.evaluate(folder, max_questions=3, repetition_penalty=1.0)  # the flag's value replaces the run's
    assert plain["settings"]["decoding"] == "greedy"
    assert penalised != [e["answers"]["tuned"]["text"] for e in plain["examples"]]
    assert run_repetition_penalty([folder]) == 1.5  # where the app's slider starts
    engine, name, _ = open_engine([folder])  # chat's default: the engine's, read from the run
    assert engine.repetition_penalty(name) == 1.5
    engine, name, _ = open_engine([], model=str(tiny_llama), template="qa")  # a model by name: off
    assert engine.repetition_penalty(name) == 1.0


def test_a_graded_headline_leads_the_report_and_ranks_its_wins(tmp_path, tiny_llama):
    config = write_config(tmp_path, tiny_llama, "embedded:glossary-train.json", eval={"headline": "rouge_l"})
    folder = train(load_config(str(config)))
    evaluation = ev.evaluate(folder, max_questions=4)
    assert evaluation["primary_metric"] == "rouge_l"
    report = (folder / "report.md").read_text()
    assert "ROUGE-L F1 (the headline, eval.headline): graded closeness" in report
    assert "by the change in ROUGE-L F1" in report
    changes = [e["answers"]["tuned"]["scores"]["rouge_l"] - e["answers"]["base"]["scores"]["rouge_l"]
               for e in evaluation["examples"]]
    shown = table.format_table(evaluation).split("Q: ")[1].splitlines()[0]
    best = evaluation["examples"][max(range(4), key=lambda i: changes[i])]["question"]
    assert shown == (best if max(changes) > 0 else evaluation["examples"][0]["question"])


def test_a_key_headline_without_keys_is_refused_before_any_answer(tmp_path, tiny_llama):
    config = write_config(tmp_path, tiny_llama, "embedded:glossary-train.json", eval={"headline": "contains_key"})
    folder = train(load_config(str(config)))
    with pytest.raises(AffinerError, match="eval.headline is contains_key, but no question"):
        ev.evaluate(folder, max_questions=2, plan=None)
    assert not (folder / "summary.json").exists()


def test_adapters_from_elsewhere_leave_out_prompts_over_the_context_and_list_them(tmp_path, tiny_gpt2):
    from affiner.evaluation.plan import plan_adapters

    test = tmp_path / "t.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in [{"question": "Short?", "answer": "a"},
                                                            {"question": "word " * 2000, "answer": "b"}]))
    adapter = tmp_path / "lora"
    adapter.mkdir()
    plan = plan_adapters(str(tiny_gpt2), [adapter], str(test), "qa", tmp_path / "out", None)
    assert [e.instruction for e in plan.examples] == ["Short?"]
    assert plan.dropped["count"] == 1 and plan.dropped["rows"][0]["reason"].startswith("prompt over the model's context")


def test_a_test_file_asking_a_question_twice_says_so(tmp_path, tiny_llama):
    """Copies of one question are resampled as if independent: the report must say the intervals are too narrow."""
    folder = train(load_config(str(write_config(tmp_path, tiny_llama, "embedded:glossary-train.json"))))
    rows = [{"question": "What does ZORBLE stand for?", "answer": "Zone Of Rare Blue Leaves"}] * 3 + \
           [{"question": "What does QAXEL stand for?", "answer": "Quiet Axis Lines"}]
    test = tmp_path / "repeated.json"
    test.write_text(json.dumps(rows), encoding="utf-8")
    evaluation = ev.evaluate(folder, test=str(test))
    assert evaluation["settings"][ev.REPEATED] == 2
    assert ev.REPEATED in (folder / "report.md").read_text(encoding="utf-8")
    assert ev.REPEATED not in ev.evaluate(folder, max_questions=2)["settings"]


def test_paraphrases_of_one_acronym_are_resampled_together_and_the_report_says_so(tmp_path, tiny_llama):
    folder = train(load_config(str(write_config(tmp_path, tiny_llama, "embedded:glossary-train.json"))))
    rows = [{"question": f"{ask} {word} stand for?", "answer": "Something", "group": word}
            for word in ("ZORBLE", "QAXEL") for ask in ("What does", "Tell me what")]
    rows.append({"question": "What does FLIMP stand for?", "answer": "Nothing"})  # no group: a group of its own
    test = tmp_path / "grouped.json"
    test.write_text(json.dumps(rows), encoding="utf-8")
    evaluation = ev.evaluate(folder, test=str(test))
    assert evaluation["settings"][ev.GROUPED] == "3 groups of the 5 questions"
    assert ev.GROUPED in (folder / "report.md").read_text(encoding="utf-8")
    for row in rows:
        row.pop("group", None)
    test.write_text(json.dumps(rows), encoding="utf-8")
    assert ev.GROUPED not in ev.evaluate(folder, test=str(test))["settings"]
