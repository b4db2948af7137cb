"""The Streamlit script behind `affiner app`: base and tuned answers side by side, and each run's curves.

Started by `affiner app [RUN ...]`; by hand:

    streamlit run src/affiner/interfaces/app_page.py -- runs/quickstart-20261122-183000
    AFFINER_APP_RUNS=runs/a:runs/b streamlit run src/affiner/interfaces/app_page.py

The base model is loaded once per set of run folders (st.cache_resource) and shared by every
browser session; switching adapters only switches the active adapter. Query parameters open the
page on a prompt and generate at once: ?prompt=...&input=...&greedy=1&temperature=0.7&top_p=0.9
&top_k=40&max_new_tokens=64&seed=1&repetition_penalty=1.1&models=a,b&page=runs (see `affiner app --help`).
With $AFFINER_APP_KEY set (as `affiner app --api-key-env NAME` does), each browser session must give
that key before the page shows or generates anything.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import time  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import urlencode  # noqa: E402

import streamlit as st  # noqa: E402

from affiner.core.errors import AffinerError  # noqa: E402
from affiner.core.runfolder import CONFIG_FILE, RunFolder, model_names  # noqa: E402
from affiner.core.settings import MAX_PENALTY, Settings  # noqa: E402
from affiner.interfaces import app  # noqa: E402
from affiner.interfaces.chat import run_repetition_penalty  # noqa: E402
from affiner.interfaces.engine import BASE, Reply  # noqa: E402

DEFAULTS = {"instruction": "", "input": "", "greedy": False, **asdict(Settings())}
WIDGET_KEYS = (*DEFAULTS, "models", "page")
PAGES = ("Compare", "Runs")
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


@st.cache_resource(show_spinner="Loading the base model and its adapters (once for every session)…")
def cached_engine(folders: tuple[str, ...]):
    return app.load_engine(folders)


# ---------------------------------------------------------------------------------------- state


def _number(params, key: str, kind, low: float, high: float, notes: list[str]):
    if key not in params:
        return None
    try:
        value = kind(params[key])
    except ValueError:
        notes.append(f"{key}={params[key]!r} is not a number")
        return None
    if not low <= value <= high:
        notes.append(f"{key}={value} is outside [{low}, {high}]")
        return None
    return value


def initial_state(params, names: list[str], penalty: float = 1.0) -> tuple[dict, list[str]]:
    """Widget values for a new session: the defaults (the repetition penalty: `penalty`, the first run's
    eval.repetition_penalty, as chat does), overridden by the link's query parameters."""
    state = dict(DEFAULTS, models=names[:1], page=PAGES[0], repetition_penalty=penalty)
    notes: list[str] = []
    state["instruction"] = params.get("prompt", "")
    state["input"] = params.get("input", "")
    if (greedy := params.get("greedy", "").strip().lower()) in TRUE | FALSE:
        state["greedy"] = greedy in TRUE
    elif "greedy" in params:
        notes.append(f"greedy={params['greedy']!r} is neither 1, true, yes, on nor 0, false, no, off")
    for key, kind, low, high in (("temperature", float, 0.0, 2.0), ("top_p", float, 0.01, 1.0),
                                 ("top_k", int, 0, 1000), ("max_new_tokens", int, 1, 4096),
                                 ("seed", int, 0, 2**31 - 1), ("repetition_penalty", float, 1.0, MAX_PENALTY)):
        value = _number(params, key, kind, low, high, notes)
        if value is not None:
            state[key] = value
    if state["temperature"] == 0:
        state["greedy"], state["temperature"] = True, DEFAULTS["temperature"]
    if "models" in params:
        wanted = [m.strip() for m in params["models"].split(",") if m.strip()]
        unknown = [m for m in wanted if m not in names]
        if unknown:
            notes.append(f"no model named {', '.join(unknown)} (models: {', '.join(names)})")
        state["models"] = [m for m in wanted if m in names]
    if params.get("page", "").strip().lower() == "runs":
        state["page"] = "Runs"
    return state, notes


def start_session(names: list[str], penalty: float) -> None:
    if "comparisons" in st.session_state:
        # Keep the widgets' values while they are not shown (the other page), instead of resetting them.
        for key in WIDGET_KEYS:
            if key in st.session_state:
                st.session_state[key] = st.session_state[key]
        return
    params = {k: st.query_params.get(k) for k in st.query_params.keys()}
    state, notes = initial_state(params, names, penalty)
    st.session_state.update(state)
    st.session_state["comparisons"] = []
    st.session_state["auto_generate"] = bool(state["instruction"].strip())
    st.session_state["link_notes"] = notes


def current_settings() -> Settings:
    s = st.session_state
    return Settings(temperature=0.0 if s["greedy"] else float(s["temperature"]), top_p=float(s["top_p"]),
                    top_k=int(s["top_k"]), max_new_tokens=int(s["max_new_tokens"]),
                    seed=None if s["seed"] is None else int(s["seed"]),
                    repetition_penalty=float(s["repetition_penalty"]))


def share_query(comparison: dict) -> dict:
    """The query parameters that reopen the page on this comparison (defaults left out)."""
    settings = comparison["settings"]
    query = {"prompt": comparison["instruction"], **({"input": comparison["input"]} if comparison["input"] else {})}
    if settings["temperature"] == 0:
        query["greedy"] = "1"
    elif settings["temperature"] != DEFAULTS["temperature"]:
        query["temperature"] = str(settings["temperature"])
    for key in ("top_p", "top_k", "max_new_tokens", "seed"):
        if settings.get(key) is not None and settings[key] != DEFAULTS[key]:
            query[key] = str(settings[key])
    if settings.get("repetition_penalty") is not None:  # always: a new page starts from the run's own penalty
        query["repetition_penalty"] = str(settings["repetition_penalty"])
    if tuned := [n for n in comparison["answers"] if n != BASE]:
        query["models"] = ",".join(tuned)
    return query


# ---------------------------------------------------------------------------------------- Compare page


def sidebar_controls(names: list[str]) -> None:
    st.sidebar.subheader("Decoding")
    greedy = st.sidebar.toggle("Greedy (temperature 0)", key="greedy",
                               help="always pick the most likely next token: the same answer every time")
    st.sidebar.slider("Temperature", 0.0, 2.0, step=0.05, key="temperature", disabled=greedy)
    st.sidebar.slider("Top-p", 0.01, 1.0, step=0.01, key="top_p", disabled=greedy)
    st.sidebar.number_input("Top-k (0: off)", min_value=0, max_value=1000, step=1, key="top_k", disabled=greedy)
    st.sidebar.slider("Repetition penalty (1: off)", 1.0, MAX_PENALTY, step=0.05, key="repetition_penalty",
                      help="above 1, words the answer already holds are made less likely (the question's "
                           "words stay free): a small model that loops stops looping")
    st.sidebar.number_input("Max new tokens", min_value=1, max_value=4096, step=1, key="max_new_tokens")
    st.sidebar.number_input("Seed (empty: random)", min_value=0, max_value=2**31 - 1, value=None, step=1,
                            key="seed", disabled=greedy,
                            help="every model samples with this seed, so they differ only by the adapter")


def model_header(name: str, kind: str, base_id: str, folders_by_name: dict[str, Path]) -> str:
    if kind == "base":
        return "**base** · no adapter"  # the base model's name is in the caption above
    folder = folders_by_name[name].name
    return f"**{name}**" if folder == name else f"**{name}** · `{folder}`"


def answer_columns(models: list[tuple[str, str]], base_id: str, folders_by_name: dict[str, Path]) -> dict:
    slots = {}
    for column, (name, kind) in zip(st.columns(len(models)), models):
        with column:
            st.markdown(model_header(name, kind, base_id, folders_by_name))
            slots[name] = (st.empty(), st.empty())
    return slots


def show_comparison(comparison: dict, base_id: str, folders_by_name: dict[str, Path]) -> None:
    """A finished comparison, as it was generated (on reruns, e.g. after a setting changed)."""
    models = [(name, "base" if name == BASE else "tuned") for name in comparison["answers"]]
    slots = answer_columns(models, base_id, {**folders_by_name, **comparison["folders"]})
    for name, kind in models:
        box, meta = slots[name]
        answer = comparison["answers"][name]
        box.markdown(app.answer_box(kind, answer["text"], name), unsafe_allow_html=True)
        meta.caption(app.timing_line(answer) if "error" not in answer else answer["error"])
    with st.expander("Prompt the model saw"):
        st.code(comparison["prompt"], language=None)


def generate(engine, base_id: str, folders_by_name: dict[str, Path]) -> dict | None:
    """Stream every selected model's answer into its column, base first, and return the comparison."""
    s = st.session_state
    instruction, input_text, settings = s["instruction"], s["input"], current_settings()
    models = [(BASE, "base")] + [(name, "tuned") for name in s["models"] if name in engine.adapters]
    try:
        prompt = engine.prompt_text(app.messages_for(instruction, input_text), settings.max_new_tokens)
    except AffinerError as exc:
        st.error(str(exc))
        return None
    slots = answer_columns(models, base_id, folders_by_name)
    for name, kind in models:
        slots[name][0].markdown(app.answer_box(kind, "", name, pending=True), unsafe_allow_html=True)
    with st.expander("Prompt the model saw"):
        st.code(prompt, language=None)
    answers, replies = {}, {}

    def comparison() -> dict:
        return {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "instruction": instruction, "input": input_text,
                "settings": app.settings_dict(settings), "answers": answers, "prompt": prompt,
                "folders": {name: folders_by_name[name] for name in answers if name != BASE}}

    try:
        for name, kind in models:
            box, meta = slots[name]

            def show(text: str, box=box, kind=kind, name=name) -> None:
                box.markdown(app.answer_box(kind, text, name, pending=True), unsafe_allow_html=True)

            replies[name] = Reply()
            try:
                answer = app.generate_answer(engine, name, instruction, input_text, settings, on_piece=show,
                                             reply=replies[name])
            except AffinerError as exc:
                box.error(str(exc))
                answers[name] = {"text": "", "tokens": 0, "seconds": 0.0, "first_token_seconds": None,
                                 "tokens_per_second": 0.0, "error": str(exc)}
                continue
            box.markdown(app.answer_box(kind, answer["text"], name), unsafe_allow_html=True)
            meta.caption(app.timing_line(answer))
            answers[name] = answer
    except BaseException:  # Streamlit's Stop, or a widget changed mid-answer, ends the script run here
        # What was said is kept, marked as cut: the next run shows this question's answers, never the previous one's.
        answers.update({name: app.answer_of(reply) for name, reply in replies.items() if name not in answers})
        st.session_state["comparisons"].append(comparison())
        raise
    return comparison()


def session_history(comparisons: list[dict]) -> None:
    st.divider()
    st.subheader(f"This session: {len(comparisons)} comparison{'s' if len(comparisons) != 1 else ''}")
    rows = []
    for c in reversed(comparisons):
        row = {"time": c["time"], "instruction": c["instruction"], "input": c["input"],
               "temperature": c["settings"]["temperature"]}
        row.update({name: a["text"] for name, a in c["answers"].items()})
        rows.append(row)
    st.dataframe(rows, hide_index=True)
    st.download_button("Download the comparisons (CSV)", data=app.comparisons_download(comparisons),
                       file_name="affiner-comparisons.csv", mime="text/csv", key="download_csv")


def compare_page(folders: list[Path], names: list[str]) -> None:
    config = RunFolder(folders[0]).config()
    base_id = config.model.base
    folders_by_name = dict(zip(names, folders))
    st.title("Base and tuned, side by side")
    st.caption(f"Base model `{base_id}` · template `{config.data.template}` · method `{config.method}` · "
               "every model sees the same prompt and decoding settings; only the adapter differs.")
    for note in st.session_state.get("link_notes", []):
        st.warning(f"Link parameter ignored: {note}.")
    main_label, input_label = app.field_labels(config.data.template)
    st.text_area(main_label, key="instruction", height=100, placeholder="What does QUILT stand for?")
    if input_label:
        st.text_area(input_label, key="input", height=68,
                     help="context for the instruction, placed where the run's template puts an input")
    else:  # a link's input would reach a template that has no place for it
        st.session_state["input"] = ""
    left, right = st.columns([4, 1], vertical_alignment="bottom")
    left.multiselect("Tuned models next to base", names, key="models",
                     help="adapters of one base model, loaded once: switching costs no reload")
    clicked = right.button("Generate", type="primary", key="generate")
    engine = cached_engine(tuple(str(f) for f in folders))
    st.session_state["engine_id"] = id(engine)
    auto = st.session_state.pop("auto_generate", False)
    comparisons = st.session_state["comparisons"]
    if clicked or auto:
        if not st.session_state["instruction"].strip():
            st.warning(f"Write {'a' if main_label != 'Instruction' else 'an'} {main_label.lower()} first.")
        else:
            comparison = generate(engine, base_id, folders_by_name)
            if comparison is not None:
                comparisons.append(comparison)
                if not auto:  # the address bar becomes a link to this comparison
                    st.query_params.from_dict(share_query(comparison))
    elif comparisons:
        show_comparison(comparisons[-1], base_id, folders_by_name)
    if comparisons:
        url = getattr(st.context, "url", None) or ""
        st.caption(f"Link to this comparison: `{url}?{urlencode(share_query(comparisons[-1]))}`")
        session_history(comparisons)


# ---------------------------------------------------------------------------------------- Runs page


def run_details(folder: Path) -> None:
    st.markdown(app.run_facts(RunFolder(folder)) + f" · `{app.display_path(folder)}`")
    metrics = app.read_metrics(folder)
    if metrics is None:
        st.info("No training curves: this run has no metrics.jsonl.")
    else:
        training_curves(metrics.reset_index())
    config_path = folder / CONFIG_FILE
    if config_path.is_file():
        with st.expander("Config (config.yaml)"):
            st.code(config_path.read_text(encoding="utf-8"), language="yaml")
    evaluation_report(folder)


def training_curves(curves) -> None:
    """Loss and learning rate against step, then the held-out scores and loss where they were logged."""
    left, right = st.columns(2)
    for column, key, title in ((left, "loss", "Training loss"), (right, "learning_rate", "Learning rate")):
        if key in curves:
            with column:
                st.markdown(f"**{title}**")
                st.line_chart(curves[["step", key]].dropna(), x="step", y=key)
    evals = [c for c in curves.columns if c.startswith("eval_")]
    if not evals:
        return
    scores = curves[["step", *evals]].dropna(how="all", subset=evals)
    losses = [c for c in evals if c == "eval_loss"]
    rates = [c for c in evals if c not in losses]
    left, right = st.columns(2)
    if rates:
        with left:
            st.markdown("**Evaluation during training** (held-out sample)")
            st.line_chart(scores, x="step", y=rates)
    if losses:
        with right:
            st.markdown("**Held-out loss**")
            st.line_chart(scores, x="step", y=losses)


def evaluation_report(folder: Path) -> None:
    report_html, report_md = folder / "report.html", folder / "report.md"
    if not (report_html.is_file() or report_md.is_file()):
        st.info(f"No evaluation report yet: `affiner evaluate {app.display_path(folder)}` writes one.")
        return
    st.markdown("**Evaluation report**")
    if not report_html.is_file():
        st.markdown(report_md.read_text(encoding="utf-8"))
    elif hasattr(st, "iframe"):
        st.iframe(report_html, height=900)
    else:  # Streamlit before st.iframe
        import streamlit.components.v1 as components

        components.html(report_html.read_text(encoding="utf-8"), height=900, scrolling=True)


def runs_page(folders: list[Path], names: list[str]) -> None:
    st.title("Runs")
    if len(folders) == 1:
        st.subheader(folders[0].name)
        run_details(folders[0])
        return
    for tab, folder in zip(st.tabs(names), folders):
        with tab:
            run_details(folder)


# ---------------------------------------------------------------------------------------- the page


def key_gate() -> None:
    """Stop the script here until this browser session has typed the page's key (when it has one)."""
    key = app.page_key()
    if key is None or st.session_state.get("unlocked"):
        return
    st.title("affiner · compare")
    sent = st.text_input("Key", type="password", key="page_key",
                         help="the key this page was started with (affiner app --api-key-env NAME)")
    if sent and app.key_matches(sent, key):
        st.session_state["unlocked"] = True
        st.rerun()
    if sent:
        st.error("Wrong key.")
    st.stop()


def main() -> None:
    app.hide_library_deprecations()
    st.set_page_config(page_title="affiner · compare", page_icon="⚖️", layout="wide")
    key_gate()  # before the runs are even read: a visitor without the key sees nothing of them
    try:
        folders = app.runs_from_environment()
    except AffinerError as exc:
        st.error(str(exc))
        st.stop()
    names = model_names(folders)
    start_session(names, max(1.0, run_repetition_penalty(folders)))  # the slider starts at 1
    page = st.sidebar.radio("Page", PAGES, key="page", horizontal=True)
    st.sidebar.caption(f"{len(folders)} run{'s' if len(folders) > 1 else ''}: " +
                       ", ".join(f"`{n}`" if n == f.name else f"`{n}` ({f.name})" for n, f in zip(names, folders)))
    try:
        if page == "Runs":
            runs_page(folders, names)
        else:
            sidebar_controls(names)
            compare_page(folders, names)
    except AffinerError as exc:
        st.error(str(exc))


main()
