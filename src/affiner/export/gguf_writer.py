"""GGUF files for llama.cpp and Ollama, written from a (merged) transformers model.

Only architectures whose GGUF transformers itself can load back are written, and each one exactly
as transformers' GGUF loader reads it (`transformers/modeling_gguf_pytorch_utils.py`,
`transformers/integrations/ggml.py`, `transformers/integrations/gguf/`), which is llama.cpp's own
layout: tensor names from gguf's `TensorNameMap`, Llama's q/k rows permuted for llama.cpp's rotary
embedding, Gemma's RMSNorm weights stored as `w + 1`, GPT-2's Conv1D weights transposed.

After writing, the file is read back: the model config transformers rebuilds from its metadata must
equal the model's own (so a setting GGUF cannot carry, such as a logit soft-cap, is an error, not a
silently different model), and a tokenizer rebuilt from it must tokenise sample texts the same way.
The vocabulary is written by `gguf_tokenizer`, the metadata entries are those of `gguf_metadata`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGUFValueType as T

from affiner.core.errors import AffinerError
from affiner.export.gguf_metadata import Entry, entry
from affiner.export.gguf_tokenizer import check_tokenizer, tokenizer_metadata

GGUF_TYPES = ("f32", "f16", "q8_0")
# transformers model_type -> gguf general.architecture
ARCHITECTURES = {"llama": "llama", "gemma3_text": "gemma3", "gpt2": "gpt2"}
_TENSOR_ARCH = {"llama": "LLAMA", "gemma3": "GEMMA3", "gpt2": "GPT2"}
# Config entries that describe the checkpoint or the runtime, not the function the model computes.
_NOT_COMPARED = {
    "_name_or_path", "_model_name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version",
    "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id",
    "output_attentions", "output_hidden_states", "return_dict", "quantization_config", "id2label", "label2id",
    "feed_forward_length", "n_ctx", "chunk_size_feed_forward", "problem_type", "tokenizer_class",
    "task_specific_params", "torchscript", "is_encoder_decoder", "initializer_range", "_sliding_window_pattern",
}


def supported() -> str:
    return "llama (Llama, Mistral-style), gemma3 (Gemma 3 text models) and gpt2"


def gguf_architecture(config) -> str:
    """The GGUF architecture name of a transformers config, or an AffinerError saying what is supported."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in ARCHITECTURES:
        raise AffinerError(f"affiner cannot write a GGUF file for the '{model_type}' architecture; it writes "
                           f"{supported()}. The merged safetensors export (--merged) works for every architecture: "
                           "convert merged/ with llama.cpp's convert_hf_to_gguf.py instead.")
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        raise AffinerError(f"this {model_type} model uses '{rope['rope_type']}' rotary scaling, which affiner's GGUF "
                           "writer does not carry; export --merged and convert it with llama.cpp's "
                           "convert_hf_to_gguf.py instead.")
    return ARCHITECTURES[model_type]


@dataclass
class GgufReport:
    path: Path
    architecture: str
    gguf_type: str
    tensors: int
    bytes: int
    tokenizer: str  # where the vocabulary came from
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- writing


def write_gguf(model, tokenizer, path: Path, gguf_type: str = "f32", name: str = "model",
               license_id: str | None = None, source_gguf: Path | None = None,
               sample_texts: list[str] | None = None) -> GgufReport:
    """Write `model` (a plain, merged transformers model) and its tokenizer as one GGUF file, then check it.

    `source_gguf`: the GGUF the base model came from; its tokenizer metadata is copied as it is, since
    the run's tokenizer was built from it. `sample_texts` are tokenised by the original tokenizer and
    the one rebuilt from the file, which must agree.
    """
    if gguf_type not in GGUF_TYPES:
        raise AffinerError(f"unknown GGUF type '{gguf_type}' (supported: {', '.join(GGUF_TYPES)}).")
    config = model.config
    arch = gguf_architecture(config)
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    kv = _architecture_metadata(arch, config, vocab_rows)
    tokenizer_kv, origin = tokenizer_metadata(tokenizer, vocab_rows, source_gguf)
    header = _general_metadata(name, license_id, gguf_type)
    check_config(config, arch, header + kv, tokenizer_kv, [n for n, _ in _named_tensors(arch, model)])
    encoded = ((key, *_encode(array, gguf_type)) for key, array in _tensors(arch, model))
    count, size = _write_file(path, arch, header + kv + tokenizer_kv, encoded)
    if source_gguf is None:  # a copied vocabulary is the base's own; a written one must prove itself
        check_tokenizer(path, tokenizer, sample_texts or [])
    return GgufReport(path, arch, gguf_type, count, size, origin, _llama_cpp_notes(arch, config))


def _write_file(path: Path, arch: str, entries: list[Entry],
                tensors: Iterable[tuple[str, np.ndarray, "gguf.GGMLQuantizationType | None"]]) -> tuple[int, int]:
    """One GGUF file from metadata entries and (name, data, raw ggml type) tensors; (tensor count, bytes)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value, vtype, sub_type in entries:
        writer.add_key_value(key, value, vtype, sub_type)
    count, size = 0, 0
    for name, data, raw_dtype in tensors:
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
        count, size = count + 1, size + data.nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return count, size


def _general_metadata(name: str, license_id: str | None, gguf_type: str) -> list[Entry]:
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    out = [entry("general.type", "model", T.STRING), entry("general.name", name, T.STRING)]
    if license_id:
        out.append(entry("general.license", license_id, T.STRING))
    out.append(entry("general.file_type", int(file_type), T.UINT32))
    if gguf_type == "q8_0":
        out.append(entry("general.quantization_version", gguf.GGML_QUANT_VERSION, T.UINT32))
    return out


def _rope_parameters(config) -> dict:
    rope = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in rope:  # Gemma 3: one set per attention type
        rope = rope["full_attention"]
    return rope


def _architecture_metadata(arch: str, config, vocab_rows: int) -> list[Entry]:
    u32, f32 = T.UINT32, T.FLOAT32
    if arch == "gpt2":
        return [entry("gpt2.context_length", config.n_positions, u32),
                entry("gpt2.embedding_length", config.n_embd, u32),
                entry("gpt2.feed_forward_length", config.n_inner or 4 * config.n_embd, u32),
                entry("gpt2.block_count", config.n_layer, u32),
                entry("gpt2.attention.head_count", config.n_head, u32),
                entry("gpt2.attention.layer_norm_epsilon", float(config.layer_norm_epsilon), f32)]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = _rope_parameters(config)
    out = [entry(f"{arch}.context_length", config.max_position_embeddings, u32),
           entry(f"{arch}.embedding_length", config.hidden_size, u32),
           entry(f"{arch}.block_count", config.num_hidden_layers, u32),
           entry(f"{arch}.feed_forward_length", config.intermediate_size, u32),
           entry(f"{arch}.attention.head_count", config.num_attention_heads, u32),
           entry(f"{arch}.attention.head_count_kv", config.num_key_value_heads, u32),
           entry(f"{arch}.attention.layer_norm_rms_epsilon", float(config.rms_norm_eps), f32),
           entry(f"{arch}.rope.freq_base", float(rope.get("rope_theta", 10000.0)), f32),
           entry(f"{arch}.vocab_size", vocab_rows, u32)]
    if arch == "llama":
        out += [entry("llama.rope.dimension_count", head_dim, u32)]
        if head_dim != config.hidden_size // config.num_attention_heads:
            out += [entry("llama.attention.key_length", head_dim, u32), entry("llama.attention.value_length", head_dim, u32)]
    else:  # gemma3
        out += [entry("gemma3.attention.key_length", head_dim, u32),
                entry("gemma3.attention.value_length", head_dim, u32),
                entry("gemma3.attention.sliding_window", config.sliding_window, u32)]
    return out


def _llama_cpp_notes(arch: str, config) -> list[str]:
    """Settings transformers reads back from the file but llama.cpp hard-codes differently."""
    if arch != "gemma3":
        return []
    notes = []
    if config.query_pre_attn_scalar != config.head_dim:
        notes.append(f"llama.cpp scales Gemma 3 attention by 1/sqrt(head_dim={config.head_dim}), this model by "
                     f"1/sqrt(query_pre_attn_scalar={config.query_pre_attn_scalar}): llama.cpp and Ollama will "
                     "compute different answers from this file")
    pattern = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(config.num_hidden_layers)]
    if list(config.layer_types) != pattern:
        notes.append("llama.cpp assumes Gemma 3's one-in-six full-attention layers; this model's layer_types "
                     "differ, so llama.cpp and Ollama will compute different answers from this file")
    return notes


# ---------------------------------------------------------------------------------------- tensors


def _named_tensors(arch: str, model) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every weight written; the tied output head is left to the loader."""
    config = model.config
    n_layers = config.n_layer if arch == "gpt2" else config.num_hidden_layers
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, _TENSOR_ARCH[arch]), n_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # transformers and llama.cpp re-tie the head when the file has no output.weight
        gguf_name = _gguf_name(names, hf_name)
        if gguf_name is None:
            raise AffinerError(f"the GGUF writer has no llama.cpp name for the tensor {hf_name} of this "
                               f"{config.model_type} model; export --merged and convert it with llama.cpp's "
                               "convert_hf_to_gguf.py instead.")
        out.append((gguf_name, tensor))
    return out


def _tensors(arch: str, model) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in llama.cpp's layout): the inverse of what transformers' loader applies."""
    for gguf_name, tensor in _named_tensors(arch, model):
        array = tensor.detach().to("cpu", torch.float32).numpy()
        yield gguf_name, _to_llama_cpp(arch, model.config, gguf_name, array)


def _gguf_name(names, hf_name: str) -> str | None:
    stem, suffix = hf_name, ""
    if hf_name.endswith((".weight", ".bias")):
        stem, suffix = hf_name.rsplit(".", 1)
        suffix = "." + suffix
    for candidate in (stem, stem.split(".", 1)[-1]):  # transformers also tries without the wrapper's prefix
        found = names.get_name(candidate)
        if found is not None:
            return found + suffix
    return None


def _to_llama_cpp(arch: str, config, name: str, array: np.ndarray) -> np.ndarray:
    if arch == "llama" and name.endswith(".weight") and (".attn_q." in name or ".attn_k." in name):
        heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
        return _permute(array, heads)
    if arch == "gemma3" and name.endswith("norm.weight"):
        return array + np.float32(1.0)  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w
    if arch == "gpt2" and name.endswith(".weight") and array.ndim == 2 and \
            any(part in name for part in (".attn_qkv.", ".attn_output.", ".ffn_up.", ".ffn_down.")):
        return np.ascontiguousarray(array.T)  # Conv1D keeps (in, out); ggml wants (out, in)
    return array


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: the inverse of transformers' `_reverse_permute_weights`."""
    dim = weights.shape[0] // n_head // 2
    return np.ascontiguousarray(weights.reshape(n_head, 2, dim, *weights.shape[1:]).swapaxes(1, 2)
                                .reshape(weights.shape))


def _encode(array: np.ndarray, gguf_type: str) -> tuple[np.ndarray, "gguf.GGMLQuantizationType | None"]:
    """(data, raw ggml type or None): 1-D tensors (norms, biases) stay f32, as llama.cpp keeps them."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim < 2 or gguf_type == "f32":
        return array, None
    if gguf_type == "q8_0" and array.shape[-1] % 32 == 0:
        return quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None  # f16, or a q8_0 row whose length is not a multiple of 32


# ---------------------------------------------------------------------------------------- checks


def check_config(config, arch: str, kv: list[Entry], tokenizer_kv: list[Entry], tensor_names: list[str]) -> None:
    """The config transformers rebuilds from the file's metadata must compute what the model computes.

    transformers reads it from a small probe file with the same metadata and tensor names (and, but for
    GPT-2 whose vocabulary size is the token count, without the vocabulary), before the real file exists.
    """
    from transformers import AutoConfig

    keep = {"tokenizer.ggml.tokens"} if arch == "gpt2" else set()
    entries = kv + [t for t in tokenizer_kv if t[2] != T.ARRAY or t[0] in keep]
    with tempfile.TemporaryDirectory(prefix="affiner-gguf-probe-") as folder:
        probe = Path(folder) / "probe.gguf"
        _write_file(probe, arch, entries, ((name, np.zeros(1, dtype=np.float32), None) for name in tensor_names))
        rebuilt = AutoConfig.from_pretrained(folder, gguf_file=probe.name).to_dict()
    original = config.to_dict()
    differences = [f"{key}={original.get(key)!r} (the file gives {rebuilt.get(key)!r})" for key in sorted(original)
                   if key not in _NOT_COMPARED and not key.startswith("_") and _differs(original.get(key), rebuilt.get(key))]
    if differences:
        raise AffinerError(f"a GGUF file cannot carry every setting of this {config.model_type} model: "
                           f"{'; '.join(differences)}. Loaded from the file, it would compute something else, so "
                           "no GGUF was written; the merged safetensors export (--merged) carries it exactly.")


def _differs(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return not np.isclose(float(a), float(b), rtol=1e-6, atol=0)
        except (TypeError, ValueError):
            return True
    if isinstance(a, dict) and isinstance(b, dict):
        return any(_differs(a.get(k), b.get(k)) for k in set(a) | set(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    return a != b
