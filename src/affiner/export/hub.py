"""The Hugging Face Hub side of an export: the base model's Hub id and licence, and the push.

The token comes from HF_TOKEN or `hf auth login` through huggingface_hub; affiner never prints or
saves it, and scrubs it (and anything shaped like one) from the Hub's error messages.
"""

from __future__ import annotations

import re
from pathlib import Path

from affiner.core.card import hub_id
from affiner.core.errors import AffinerError
from affiner.core.hub import endpoint_reachable, hub_endpoint, hub_reachable
from affiner.export.gguf_metadata import read_metadata

EMBEDDED_LICENCES = {
    "embedded:gemma-3-270m": ("gemma", ("Gemma Terms of Use (https://ai.google.dev/gemma/terms) and the Gemma "
                                       "Prohibited Use Policy (https://ai.google.dev/gemma/prohibited_use_policy): "
                                       "this model is a Model Derivative of Gemma and is distributed under them")),
}
PROBE_SECONDS = 3.0


# ---------------------------------------------------------------------------------------- the push


def check_push(repo_id: str) -> None:
    """Fail before any work: a malformed name, no token, or a Hub that cannot be reached."""
    from huggingface_hub import get_token

    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo_id):
        raise AffinerError(f"--push {repo_id!r} must name a Hub repository as ORG/NAME, e.g. my-org/glossary-gemma.")
    if not get_token():
        raise AffinerError("--push needs a Hugging Face token with write access: set HF_TOKEN (or run `hf auth login`, "
                           "formerly `huggingface-cli login`). affiner never prints or saves it.")
    endpoint = hub_endpoint()
    if not endpoint_reachable(endpoint, PROBE_SECONDS):
        raise AffinerError(f"the Hugging Face Hub ({endpoint}) is unreachable from this machine, so --push cannot "
                           "work; nothing was exported. Export without --push, and upload the folder later from a "
                           "connected machine with `hf upload ORG/NAME DIR`.")


def push_folder(folder: Path, repo_id: str, private: bool = True, message: str = "affiner export",
                ignore: list[str] | None = None) -> str:
    """Create the repository (private unless asked) and upload the folder but `ignore`; returns the repository URL."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_endpoint())
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=message,
                          ignore_patterns=ignore)
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises HTTP, network and validation errors
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        text = lines[0] if len(lines) == 1 or lines[-1].startswith("For more information") else \
            f"{lines[0]} ({lines[-1]})"  # the Hub's own explanation comes last
        raise AffinerError(f"uploading {folder} to {repo_id} on {hub_endpoint()} failed: {scrub_token(text)}. The "
                           f"export in {folder} is complete; upload it later with `hf upload {repo_id} {folder}`.") \
            from None
    return str(url)


def scrub_token(text: str) -> str:
    """Error text from huggingface_hub, with the token (and anything shaped like one) removed."""
    from huggingface_hub import get_token

    token = get_token()
    if token:
        text = text.replace(token, "***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)


# ---------------------------------------------------------------------------------------- the base model


def base_licence(base: str, revision: str | None = None) -> tuple[str | None, str]:
    """(Hub licence id or None, sentence for the card) of a base model."""
    if base in EMBEDDED_LICENCES:
        return EMBEDDED_LICENCES[base]
    path = Path(base).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        licence = next((str(v) for k, v, *_ in read_metadata(path, "general.") if k == "general.license"), None)
        return (licence, f"{licence}, as stated in the base GGUF file's metadata") if licence else \
            (None, "not stated in the base GGUF file: see where it came from")
    if path.is_dir():
        licence = read_front_matter(path / "README.md").get("license")
        return (str(licence), f"{licence}, from the base model folder's README.md") if licence else \
            (None, "not stated in the base model folder: see where it came from")
    if hub_id(base) is None:  # a local model that is no longer here (a run copied to another machine)
        return None, "not stated: the base model is not at hand here; see where it came from"
    licence = _hub_licence(base, revision)
    if licence:
        return licence, f"{licence}, from the model card of {base} on the Hub"
    return None, f"see the base model's card (https://huggingface.co/{base})"


def _hub_licence(base: str, revision: str | None) -> str | None:
    import huggingface_hub

    cached = huggingface_hub.try_to_load_from_cache(base, "README.md", revision=revision)
    if isinstance(cached, str):
        licence = read_front_matter(Path(cached)).get("license")
        if licence:
            return str(licence)
    if not hub_reachable():
        return None
    try:
        info = huggingface_hub.HfApi(endpoint=hub_endpoint()).model_info(base, revision=revision, timeout=10)
        data = info.card_data.to_dict() if info.card_data else {}
        return str(data["license"]) if data.get("license") else None
    except Exception:  # noqa: BLE001 - no card, gated, offline: the card then points to the base card
        return None


def read_front_matter(readme: Path) -> dict:
    """The YAML front matter of a model card, {} when there is none or it does not parse."""
    import yaml

    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8", errors="replace")
    match = re.match(r"---\s*\n(.*?)\n---\s*\n", text, re.DOTALL)
    try:
        data = yaml.safe_load(match.group(1)) if match else {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}
