"""GGUF files for llama.cpp and Ollama, written from a (merged) transformers model.

Only architectures whose GGUF transformers itself can load back are written, and each one exactly
as transformers' GGUF loader reads it (`transformers/modeling_gguf_pytorch_utils.py`,
`transformers/integrations/ggml.py`, `transformers/integrations/gguf/`), which is llama.cpp's own
layout: tensor names from gguf's `TensorNameMap`, Llama's q/k rows permuted for llama.cpp's rotary
embedding, Gemma's RMSNorm weights stored as `w + 1`, GPT-2's Conv1D weights transposed.

Types (`GGUF_TYPES`): f32, f16, bf16, q8_0 and q4_0, all encoded by gguf-py's own quantisers (the
reference ones of ggml, which `llama-quantize` also uses for these types without an importance matrix).
q4_0 (`DEFAULT_GGUF_TYPE`) is the size Ollama users expect: about a quarter of f16. 1-D tensors stay f32
whatever the type, and a tensor whose rows are not a whole number of blocks is stored f16 (see
`tensor_type` for what a 4-bit file keeps at higher precision, and why). `gguf_lora` writes a run's
LoRA adapter as a llama.cpp adapter GGUF with the names, shapes and row order defined here.

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

GgmlType = gguf.GGMLQuantizationType
# --gguf-type -> (ggml type of the 2-D weights, general.file_type)
_FILE = gguf.LlamaFileType
_TYPES = {"f32": (GgmlType.F32, _FILE.ALL_F32), "f16": (GgmlType.F16, _FILE.MOSTLY_F16),
          "bf16": (GgmlType.BF16, _FILE.MOSTLY_BF16), "q8_0": (GgmlType.Q8_0, _FILE.MOSTLY_Q8_0),
          "q4_0": (GgmlType.Q4_0, _FILE.MOSTLY_Q4_0)}
GGUF_TYPES = tuple(_TYPES)
DEFAULT_GGUF_TYPE = "q4_0"  # 4 bits a weight (4.5 with its scales): what Ollama users expect to download
_QUANTIZED = {GgmlType.Q8_0, GgmlType.Q4_0}
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
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> how many tensors have it


# ---------------------------------------------------------------------------------------- writing


def write_gguf(model, tokenizer, path: Path, gguf_type: str = DEFAULT_GGUF_TYPE, name: str = "model",
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
    header = general_metadata(name, gguf_type, "model", license_id)
    named = _named_tensors(arch, model)
    check_config(config, arch, header + kv, tokenizer_kv, [n for n, _ in named])
    head = _output_head([n for n, _ in named])
    types: dict[str, int] = {}
    encoded = (_encoded(key, array, tensor_type(key, array.shape, gguf_type, head), types)
               for key, array in _tensors(arch, model, named))
    count, size = write_file(path, arch, header + kv + tokenizer_kv, encoded)
    if source_gguf is None:  # a copied vocabulary is the base's own; a written one must prove itself
        check_tokenizer(path, tokenizer, sample_texts or [])
    return GgufReport(path, arch, gguf_type, count, size, origin, _llama_cpp_notes(arch, config), types)


def write_file(path: Path, arch: str, entries: list[Entry],
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


def general_metadata(name: str, gguf_type: str, kind: str = "model", license_id: str | None = None) -> list[Entry]:
    """general.* entries of a model (`kind` "model") or adapter ("adapter") file of `gguf_type`."""
    out = [entry("general.type", kind, T.STRING), entry("general.name", name, T.STRING)]
    if license_id:
        out.append(entry("general.license", license_id, T.STRING))
    weights, file_type = _TYPES[gguf_type]
    out.append(entry("general.file_type", int(file_type), T.UINT32))
    if weights in _QUANTIZED:
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


def tensor_names(arch: str, config) -> "gguf.TensorNameMap":
    """llama.cpp's names for the tensors of a transformers model of `arch` (a GGUF architecture name)."""
    n_layers = config.n_layer if arch == "gpt2" else config.num_hidden_layers
    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, _TENSOR_ARCH[arch]), n_layers)


def gguf_tensor_name(names: "gguf.TensorNameMap", hf_name: str) -> str | None:
    """The GGUF name of the transformers tensor `hf_name` ("model.layers.0.self_attn.q_proj.weight" ->
    "blk.0.attn_q.weight"), or None when llama.cpp has none."""
    stem, suffix = hf_name, ""
    if hf_name.endswith((".weight", ".bias")):
        stem, suffix = hf_name.rsplit(".", 1)
        suffix = "." + suffix
    for candidate in (stem, stem.split(".", 1)[-1]):  # transformers also tries without the wrapper's prefix
        found = names.get_name(candidate)
        if found is not None:
            return found + suffix
    return None


def _named_tensors(arch: str, model) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every weight written; the tied output head is left to the loader."""
    config = model.config
    names = tensor_names(arch, config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # transformers and llama.cpp re-tie the head when the file has no output.weight
        gguf_name = gguf_tensor_name(names, hf_name)
        if gguf_name is None:
            raise AffinerError(f"the GGUF writer has no llama.cpp name for the tensor {hf_name} of this "
                               f"{config.model_type} model; export --merged and convert it with llama.cpp's "
                               "convert_hf_to_gguf.py instead.")
        out.append((gguf_name, tensor))
    return out


def llama_cpp_shapes(model) -> dict[str, tuple[int, ...]]:
    """GGUF name -> numpy shape of every tensor `write_gguf` writes for `model`: what llama.cpp checks an
    adapter against. A model on the meta device will do: no weight is read."""
    arch = gguf_architecture(model.config)
    return {name: tuple(reversed(tensor.shape)) if _is_conv1d(arch, name, tensor.ndim) else tuple(tensor.shape)
            for name, tensor in _named_tensors(arch, model)}


def _tensors(arch: str, model, named: list[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in llama.cpp's layout): the inverse of what transformers' loader applies."""
    for gguf_name, tensor in named:
        array = tensor.detach().to("cpu", torch.float32).numpy()
        yield gguf_name, _to_llama_cpp(arch, model.config, gguf_name, array)


def _to_llama_cpp(arch: str, config, name: str, array: np.ndarray) -> np.ndarray:
    if arch == "gemma3" and name.endswith("norm.weight"):
        return array + np.float32(1.0)  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w
    if _is_conv1d(arch, name, array.ndim):
        return np.ascontiguousarray(array.T)  # Conv1D keeps (in, out); ggml wants (out, in)
    return reorder_rows(arch, config, name, array)


def _is_conv1d(arch: str, name: str, ndim: int) -> bool:
    return arch == "gpt2" and name.endswith(".weight") and ndim == 2 and \
        any(part in name for part in (".attn_qkv.", ".attn_output.", ".ffn_up.", ".ffn_down."))


def reorder_rows(arch: str, config, name: str, rows: np.ndarray) -> np.ndarray:
    """The output rows of weight `name` in llama.cpp's order: Llama's q/k rows permuted for its rotary
    embedding (the inverse of transformers' `_reverse_permute_weights`), any other weight as it is. A LoRA
    update B @ A has the rows of B, so B is reordered the same way."""
    if arch == "llama" and name.endswith(".weight") and (".attn_q." in name or ".attn_k." in name):
        heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
        dim = rows.shape[0] // heads // 2
        return np.ascontiguousarray(rows.reshape(heads, 2, dim, *rows.shape[1:]).swapaxes(1, 2)
                                    .reshape(rows.shape))
    return rows


def _output_head(names: list[str]) -> str:
    """The tensor llama.cpp computes the logits with: output.weight, or the tied token embeddings."""
    return "output.weight" if "output.weight" in names else "token_embd.weight"


def tensor_type(name: str, shape: tuple[int, ...], gguf_type: str, head: str) -> "gguf.GGMLQuantizationType":
    """The ggml type a tensor is stored in for `gguf_type`.

    1-D tensors (norms, biases) stay f32, as llama.cpp keeps and computes them. In a 4-bit file the output
    head (the tied token embeddings when there is no output.weight) is q8_0: its rounding errors land on
    every logit, which is why llama-quantize keeps it at 6 bits (q6_k, which gguf-py cannot write) for
    q4_0. For the quickstart's Gemma 3 270M, whose 262k-token embeddings are the head and 63 % of the
    weights, it costs 84 MB (241 MB instead of 158 MB) and is worth it: in llama.cpp the tuned model's
    answers contained the reference for 58 of the 60 held-out questions with a q8_0 head, 55 with a q4_0
    one (the merged fp32 model: 60). Untied token embeddings are only looked up, and stay q4_0 as
    llama-quantize leaves them. A tensor whose rows are not a whole number of blocks (32 weights) cannot
    be quantised and is stored f16.
    """
    if len(shape) < 2:
        return GgmlType.F32
    wanted = _TYPES[gguf_type][0]
    if wanted == GgmlType.Q4_0 and name == head:
        wanted = GgmlType.Q8_0
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return GgmlType.F16 if shape[-1] % block else wanted


def _encoded(name: str, array: np.ndarray, qtype: "gguf.GGMLQuantizationType",
             counts: dict[str, int]) -> tuple[str, np.ndarray, "gguf.GGMLQuantizationType | None"]:
    """(name, data, raw ggml type or None for a plain numpy dtype) as GGUFWriter.add_tensor takes them."""
    from gguf.quants import quantize

    counts[qtype.name] = counts.get(qtype.name, 0) + 1
    data = quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)
    return name, data, None if qtype in (GgmlType.F32, GgmlType.F16) else qtype


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
        write_file(probe, arch, entries, ((name, np.zeros(1, dtype=np.float32), None) for name in tensor_names))
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
