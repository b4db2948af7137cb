"""The held-out probe: a fixed sample scored during training, so the log shows when the model learned.

Training takes the probe as a function and never imports evaluation; `probe_for` is what the
commands hand it.
"""

from __future__ import annotations

from affiner.core.config import RunConfig
from affiner.core.runfolder import RunFolder
from affiner.core.templates import Example, Template
from affiner.evaluation import metrics
from affiner.evaluation.generation import generate
from affiner.evaluation.scoring import held_out_losses


def training_probe(template: Template, tokenizer, examples: list[Example], max_new_tokens: int, batch_size: int):
    """Score a fixed held-out sample during training, so the log shows when the model learned."""

    def probe(model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        answers = generate(model, tokenizer, template, examples, max_new_tokens, batch_size, desc="held-out sample")
        sums, counts = held_out_losses(model, tokenizer, template, examples, batch_size)
        model.train(was_training)
        n = len(examples)
        result = {"eval_contains": sum(metrics.contains_reference(a.text, e.expected) for a, e in zip(answers, examples)) / n,
                  "eval_stop_rate": sum(a.stopped for a in answers) / n,
                  "eval_rouge_l": sum(metrics.rouge_l(a.text, e.expected) for a, e in zip(answers, examples)) / n}
        if counts:
            result["eval_loss"] = sum(sums) / max(sum(counts), 1)
        return {k: round(v, 5) for k, v in result.items()}

    return probe


def probe_for(run: RunFolder, config: RunConfig, template: Template, tokenizer):
    """The probe of a run whose config asks for one (eval.every_steps), on its first held-out questions."""
    if not config.eval.every_steps:
        return None
    sample = run.held_out()[: config.eval.sample_size]
    return training_probe(template, tokenizer, sample, config.eval.max_new_tokens, config.eval.batch_size)
