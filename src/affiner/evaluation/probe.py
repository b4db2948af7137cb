"""The held-out probe: scores computed during training, so the log shows when the model learned and the loop can
keep the best step.

The held-out loss of the first PROBE_LOSS_ROWS held-out questions is cheap (one forward pass) and steady enough to
choose a step by; answers are generated, and scored, for the first eval.sample_size questions only when that is
set, as generation costs seconds per probe. Training takes the probe as a function and never imports
evaluation; `probe_for` is what the commands hand it.
"""

from __future__ import annotations

from affiner.core.config import RunConfig
from affiner.core.runfolder import RunFolder
from affiner.core.settings import GREEDY, Settings
from affiner.core.templates import Example, Template
from affiner.evaluation import metrics
from affiner.evaluation.generation import eval_decoding, generate
from affiner.evaluation.scoring import held_out_losses

PROBE_LOSS_ROWS = 32  # a probe costs a forward pass over them: 1.5 s on the quickstart's CPU


def training_probe(template: Template, tokenizer, loss_examples: list[Example], answer_examples: list[Example],
                   max_new_tokens: int, batch_size: int, decoding: Settings = GREEDY):
    """Score held-out questions during training: the loss of `loss_examples`, the answers to `answer_examples`
    (decoded as the final evaluation decodes)."""

    def probe(model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        result = {}
        if answer_examples:
            answers = generate(model, tokenizer, template, answer_examples, max_new_tokens, batch_size, decoding,
                               desc="held-out sample")
            n = len(answer_examples)
            pairs = list(zip(answers, answer_examples))
            result = {"eval_contains": sum(metrics.contains_reference(a.text, e.expected) for a, e in pairs) / n,
                      "eval_stop_rate": sum(a.stopped for a in answers) / n,
                      "eval_rouge_l": sum(metrics.rouge_l(a.text, e.expected) for a, e in pairs) / n}
        sums, counts = held_out_losses(model, tokenizer, template, loss_examples, batch_size)
        model.train(was_training)
        if counts:
            result["eval_loss"] = sum(sums) / max(sum(counts), 1)
        return {k: round(v, 5) for k, v in result.items()}

    return probe


def probe_for(run: RunFolder, config: RunConfig, template: Template, tokenizer):
    """The probe of a run whose config asks for one (eval.every_steps), on its first held-out questions."""
    if not config.eval.every_steps:
        return None
    held_out = run.held_out()
    return training_probe(template, tokenizer, held_out[:PROBE_LOSS_ROWS], held_out[: config.eval.sample_size],
                          config.eval.max_new_tokens, config.eval.batch_size, eval_decoding(config))
