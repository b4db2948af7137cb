"""What the decoding benchmarks share: the instruct recipe's base model, as `affiner evaluate` loads it (the
precision `auto` picks), and its first held-out questions. Imported by the scripts of this folder, which Python
runs with the folder on its path."""

from __future__ import annotations

from affiner.core.config import RunConfig, load_config
from affiner.core.models import load_for, tokenizer_for
from affiner.core.templates import Example, Template, build_template
from affiner.data.formats import to_examples
from affiner.data.read import read_rows


def instruct_questions(count: int) -> tuple[RunConfig, object, object, Template, list[Example]]:
    """The instruct recipe's config, tokenizer, base model, template and first `count` held-out examples."""
    config = load_config("instruct")
    tokenizer, model = tokenizer_for(config), load_for(config)
    template = build_template(config.data.template, tokenizer)
    return config, tokenizer, model, template, to_examples(read_rows(config.data.test))[:count]
