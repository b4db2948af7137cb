"""GGUF files of a quickstart run as llama.cpp and Ollama users get them: file sizes, and the held-out answers
computed by llama.cpp itself.

    .venv/bin/affiner train quickstart                          # ~80 s on 2 cores
    .venv/bin/python bench/gguf_quickstart.py                   # the latest finished run under runs/
    .venv/bin/python bench/gguf_quickstart.py --run runs/quickstart-20261129-051500 --out /tmp/gguf-bench

Writes, through affiner.export's library functions (not the CLI): the merged model as a 4-bit GGUF (the
default type) and as f16 for comparison, the run's adapter as a LoRA GGUF, and the base as a 4-bit GGUF.
Prints the file sizes; target: the 4-bit merged file under 400 MB.

With llama-cpp-python installed, every held-out question is answered greedily in llama.cpp from the prompt
the run's template renders (token ids as the run's tokenizer makes them, so both sides read the same
prompt), stopping on the template's stop tokens and turn markers as `affiner evaluate` does. "Contains the
reference" is printed for each file and route against the merged transformers model's; target: the 4-bit
file within 5 points. Routes: merged f16, merged 4-bit, and base + LoRA GGUF with two bases: the embedded
Q4_K_M GGUF the run was trained on (what `llama-server -m base.gguf --lora adapter.gguf` serves), and the
base written by affiner in 4 bits. It also counts the prompts llama.cpp's own tokenizer splits as the run's
does (a user's llama-server tokenises the text itself).
"""

from __future__ import annotations

import os

os.environ["TQDM_DISABLE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from affiner.core.models import load_for, tokenizer_for  # noqa: E402
from affiner.core.runfolder import RunFolder  # noqa: E402
from affiner.core.stopping import turn_markers  # noqa: E402
from affiner.core.templates import encode_prompt, render_prompt  # noqa: E402
from affiner.evaluation.generation import decode, generate  # noqa: E402
from affiner.evaluation.metrics import contains_reference  # noqa: E402
from affiner.export.gguf_lora import write_lora_gguf  # noqa: E402
from affiner.export.gguf_writer import DEFAULT_GGUF_TYPE, write_gguf  # noqa: E402
from affiner.export.merge import tuned_model  # noqa: E402
from affiner.export.ollama import source_gguf  # noqa: E402

TARGET_MB = 400
TARGET_POINTS = 5


def write_files(run: RunFolder, out: Path) -> dict[str, Path]:
    """The GGUF files of the run, written with affiner's library functions; name -> path."""
    config, template = run.config(), run.template()
    tokenizer = tokenizer_for(config, run.path)
    source = source_gguf(config.model.base)
    files = {}
    merged = tuned_model(run.path, config, tokenizer, template)
    for gguf_type in (DEFAULT_GGUF_TYPE, "f16"):
        files[f"merged {gguf_type}"] = timed(f"merged {gguf_type}", lambda t=gguf_type: write_gguf(
            merged, tokenizer, out / f"merged-{t}.gguf", t, name=run.name, source_gguf=source).path)
    files["adapter"] = timed("LoRA adapter", lambda: write_lora_gguf(run.path, merged.config, out / "adapter.gguf",
                                                                      name=run.name).path)
    del merged
    base = load_for(config, full_precision=True, quantized=False)
    files[f"base {DEFAULT_GGUF_TYPE}"] = timed(f"base {DEFAULT_GGUF_TYPE}", lambda: write_gguf(
        base, tokenizer, out / f"base-{DEFAULT_GGUF_TYPE}.gguf", DEFAULT_GGUF_TYPE, source_gguf=source).path)
    if source is not None:
        files["base (source GGUF)"] = source
    return files


def timed(what: str, write):
    started = time.perf_counter()
    path = write()
    print(f"  wrote {what}: {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.0f} s",
          flush=True)
    return path


def transformers_answers(run: RunFolder, examples, max_new_tokens: int) -> list[str]:
    config, template = run.config(), run.template()
    tokenizer = tokenizer_for(config, run.path)
    model = tuned_model(run.path, config, tokenizer, template)
    answers = generate(model, tokenizer, template, examples, max_new_tokens, batch_size=config.eval.batch_size)
    return [a.text for a in answers]


def llama_cpp_answers(run: RunFolder, examples, model: Path, lora: Path | None, max_new_tokens: int):
    """(answers, prompts llama.cpp tokenises as the run does) for one GGUF model, with an adapter or without."""
    import llama_cpp

    config, template = run.config(), run.template()
    tokenizer = tokenizer_for(config, run.path)
    llm = llama_cpp.Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=512, n_batch=512,
                          n_threads=os.cpu_count(), seed=0, verbose=False)
    stop_ids = list(template.stop_token_ids) or [tokenizer.eos_token_id]
    markers = turn_markers(template)
    answers, same_split = [], 0
    for example in examples:
        ids = encode_prompt(template, tokenizer, example)
        text = render_prompt(template, example, tokenizer)
        own = llm.tokenize(text.encode("utf-8"), add_bos=ids[:1] == [tokenizer.bos_token_id], special=True)
        same_split += own == ids
        new_ids: list[int] = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            new_ids.append(int(token))
            if token in stop_ids or len(new_ids) >= max_new_tokens or starts_new_turn(new_ids, markers, tokenizer):
                break
        answers.append(decode(new_ids, stop_ids, tokenizer, markers).text)
    return answers, same_split


def starts_new_turn(new_ids: list[int], markers: tuple[str, ...], tokenizer) -> bool:
    """Whether the answer has run into a new turn of the template, as `affiner evaluate` stops it."""
    tail = tokenizer.decode(new_ids[-16:], skip_special_tokens=True)
    return any(marker in tail for marker in markers)


def contains_rate(examples, answers: list[str]) -> float:
    return sum(contains_reference(a, e.expected) for e, a in zip(examples, answers)) / len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a finished quickstart run (default: the latest under runs/)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/affiner-gguf-bench"), help="where the GGUFs go")
    args = parser.parse_args()
    run = RunFolder.open(args.run) if args.run else RunFolder.latest("runs")
    if run is None:
        raise SystemExit("no finished run under runs/: train one with `.venv/bin/affiner train quickstart`.")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"run: {run.path}")
    files = write_files(run, args.out)
    print("\nfile sizes:")
    for name, path in files.items():
        print(f"  {name:20s} {path.stat().st_size / 1e6:8.1f} MB")
    four_bit = files[f"merged {DEFAULT_GGUF_TYPE}"].stat().st_size / 1e6
    verdict = "PASS" if four_bit < TARGET_MB else "FAIL"
    print(f"4-bit merged file: {four_bit:.0f} MB (target < {TARGET_MB} MB): {verdict}")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("\nllama-cpp-python is not installed: no llama.cpp answers (see the module docstring).")
        return
    evaluate_routes(run, files)


def evaluate_routes(run: RunFolder, files: dict[str, Path]) -> None:
    examples = run.held_out()
    budget = run.config().eval.max_new_tokens
    started = time.perf_counter()
    reference = contains_rate(examples, transformers_answers(run, examples, budget))
    print(f"\n{len(examples)} held-out questions, greedy, at most {budget} new tokens")
    print(f"  {'merged, transformers fp32':38s} contains {reference:6.1%}   ({time.perf_counter() - started:.0f} s)")
    routes = {f"merged {t}, llama.cpp": (files[f"merged {t}"], None) for t in (DEFAULT_GGUF_TYPE, "f16")}
    for base in ("base (source GGUF)", f"base {DEFAULT_GGUF_TYPE}"):
        if base in files:
            routes[f"{base} + LoRA GGUF, llama.cpp"] = (files[base], files["adapter"])
    rates = {}
    for name, (model, lora) in routes.items():
        started = time.perf_counter()
        answers, same_split = llama_cpp_answers(run, examples, model, lora, budget)
        rates[name] = contains_rate(examples, answers)
        print(f"  {name:38s} contains {rates[name]:6.1%}   ({time.perf_counter() - started:.0f} s; llama.cpp's "
              f"tokenizer splits {same_split}/{len(examples)} prompts as the run's)", flush=True)
    gap = 100 * (reference - rates[f"merged {DEFAULT_GGUF_TYPE}, llama.cpp"])
    print(f"4-bit file vs merged transformers model: {gap:.1f} points lower (target within {TARGET_POINTS}): "
          f"{'PASS' if gap <= TARGET_POINTS else 'FAIL'}")


if __name__ == "__main__":
    main()
