"""GGUF files for llama.cpp and Ollama, written from a (merged) transformers model.

Only architectures whose GGUF transformers itself can load back are written, and each one exactly
as transformers' GGUF loader reads it (`transformers/modeling_gguf_pytorch_utils.py`,
`transformers/integrations/ggml.py`, `transformers/integrations/gguf/`), which is llama.cpp's own
layout: tensor names from gguf's `TensorNameMap`, Llama's q/k rows permuted for llama.cpp's rotary
embedding, Gemma's RMSNorm weights stored as `w + 1`, GPT-2's Conv1D weights transposed.

After writing, the file is read back: the model config transformers rebuilds from its metadata must
equal the model's own (so a setting GGUF cannot carry, such as a logit soft-cap, is an error, not a
silently different model), and a tokenizer rebuilt from it must tokenise sample texts the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from affiner.core.errors import AffinerError

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
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise AffinerError(f"unknown GGUF type '{gguf_type}' (supported: {', '.join(GGUF_TYPES)}).")
    config = model.config
    arch = gguf_architecture(config)
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    kv = _architecture_metadata(arch, config, vocab_rows)
    tokenizer_kv, origin = _tokenizer_metadata(tokenizer, vocab_rows, source_gguf)
    notes = _llama_cpp_notes(arch, config)

    header = _general_metadata(name, license_id, gguf_type)
    check_config(config, arch, header + kv, tokenizer_kv, [n for n, _ in _named_tensors(arch, model)])
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value, vtype, sub_type in header + kv + tokenizer_kv:
        writer.add_key_value(key, value, vtype, sub_type)
    count, size = 0, 0
    for gguf_name, array in _tensors(arch, model):
        data, raw_dtype = _encode(array, gguf_type)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
        count, size = count + 1, size + data.nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    if source_gguf is None:
        check_tokenizer(path, tokenizer, sample_texts or [])
    return GgufReport(path, arch, gguf_type, count, size, origin, notes)


def _general_metadata(name: str, license_id: str | None, gguf_type: str) -> list[tuple]:
    import gguf
    from gguf import GGUFValueType as T

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    out = [_kv("general.type", "model", T.STRING), _kv("general.name", name, T.STRING)]
    if license_id:
        out.append(_kv("general.license", license_id, T.STRING))
    out.append(_kv("general.file_type", int(file_type), T.UINT32))
    if gguf_type == "q8_0":
        out.append(_kv("general.quantization_version", gguf.GGML_QUANT_VERSION, T.UINT32))
    return out


def _rope_parameters(config) -> dict:
    rope = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in rope:  # Gemma 3: one set per attention type
        rope = rope["full_attention"]
    return rope


def _kv(key: str, value, vtype, sub_type=None) -> tuple:
    return key, value, vtype, sub_type


def _architecture_metadata(arch: str, config, vocab_rows: int) -> list[tuple]:
    from gguf import GGUFValueType as T

    u32, f32 = T.UINT32, T.FLOAT32
    if arch == "gpt2":
        return [_kv("gpt2.context_length", config.n_positions, u32),
                _kv("gpt2.embedding_length", config.n_embd, u32),
                _kv("gpt2.feed_forward_length", config.n_inner or 4 * config.n_embd, u32),
                _kv("gpt2.block_count", config.n_layer, u32),
                _kv("gpt2.attention.head_count", config.n_head, u32),
                _kv("gpt2.attention.layer_norm_epsilon", float(config.layer_norm_epsilon), f32)]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = _rope_parameters(config)
    out = [_kv(f"{arch}.context_length", config.max_position_embeddings, u32),
           _kv(f"{arch}.embedding_length", config.hidden_size, u32),
           _kv(f"{arch}.block_count", config.num_hidden_layers, u32),
           _kv(f"{arch}.feed_forward_length", config.intermediate_size, u32),
           _kv(f"{arch}.attention.head_count", config.num_attention_heads, u32),
           _kv(f"{arch}.attention.head_count_kv", config.num_key_value_heads, u32),
           _kv(f"{arch}.attention.layer_norm_rms_epsilon", float(config.rms_norm_eps), f32),
           _kv(f"{arch}.rope.freq_base", float(rope.get("rope_theta", 10000.0)), f32),
           _kv(f"{arch}.vocab_size", vocab_rows, u32)]
    if arch == "llama":
        out += [_kv("llama.rope.dimension_count", head_dim, u32)]
        if head_dim != config.hidden_size // config.num_attention_heads:
            out += [_kv("llama.attention.key_length", head_dim, u32), _kv("llama.attention.value_length", head_dim, u32)]
    else:  # gemma3
        out += [_kv("gemma3.attention.key_length", head_dim, u32),
                _kv("gemma3.attention.value_length", head_dim, u32),
                _kv("gemma3.attention.sliding_window", config.sliding_window, u32)]
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


def _named_tensors(arch: str, model):
    """(GGUF name, tensor) for every weight written; the tied output head is left to the loader."""
    import gguf

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


def _tensors(arch: str, model):
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


def _encode(array: np.ndarray, gguf_type: str):
    """(data, raw ggml type or None): 1-D tensors (norms, biases) stay f32, as llama.cpp keeps them."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim < 2 or gguf_type == "f32":
        return array, None
    if gguf_type == "q8_0" and array.shape[-1] % 32 == 0:
        return quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None  # f16, or a q8_0 row whose length is not a multiple of 32


# ---------------------------------------------------------------------------------------- tokenizer

_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 2, 3, 4, 5


def _tokenizer_metadata(tokenizer, vocab_rows: int, source_gguf: Path | None) -> tuple[list[tuple], str]:
    if source_gguf is not None:
        return _copied_tokenizer(source_gguf, vocab_rows), f"copied from {source_gguf.name}"
    return _byte_level_tokenizer(tokenizer, vocab_rows), "byte-level BPE (vocabulary and merges)"


def _copied_tokenizer(source: Path, vocab_rows: int) -> list[tuple]:
    out = read_metadata(source, prefix="tokenizer.")
    tokens = next((v for k, v, *_ in out if k == "tokenizer.ggml.tokens"), [])
    if len(tokens) != vocab_rows:
        raise AffinerError(f"the vocabulary of {source} has {len(tokens)} tokens but the model has {vocab_rows} "
                           "embedding rows; the GGUF would not load.")
    return out


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_metadata(path: Path, prefix: str = "") -> list[tuple]:
    """(key, value, type, element type) of a GGUF file's metadata whose keys start with `prefix`.

    gguf's GGUFReader takes tens of seconds over a 262k-token vocabulary; this reads it in a second.
    """
    import mmap
    import struct

    from gguf import GGUFValueType

    def string(blob, pos: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", blob, pos)
        return bytes(blob[pos + 8:pos + 8 + length]).decode("utf-8"), pos + 8 + length

    out = []
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        magic, _version, _tensors, count = struct.unpack_from("<4sIQQ", blob, 0)
        if magic != b"GGUF":
            raise AffinerError(f"{path} is not a GGUF file.")
        pos = 24
        for _ in range(count):
            key, pos = string(blob, pos)
            (vtype,) = struct.unpack_from("<I", blob, pos)
            pos += 4
            sub_type = None
            if vtype == GGUFValueType.STRING:
                value, pos = string(blob, pos)
            elif vtype == GGUFValueType.ARRAY:
                sub_type, length = struct.unpack_from("<IQ", blob, pos)
                pos += 12
                if sub_type == GGUFValueType.STRING:
                    value = []
                    for _ in range(length):
                        item, pos = string(blob, pos)
                        value.append(item)
                else:
                    fmt = _SCALARS[sub_type]
                    value = list(struct.unpack_from(f"<{length}{fmt[1]}", blob, pos))
                    pos += struct.calcsize(fmt) * length
                sub_type = GGUFValueType(sub_type)
            else:
                fmt = _SCALARS[vtype]
                (value,) = struct.unpack_from(fmt, blob, pos)
                pos += struct.calcsize(fmt)
            if key.startswith(prefix):
                out.append(_kv(key, value, GGUFValueType(vtype), sub_type))
    return out


def _byte_level_tokenizer(tokenizer, vocab_rows: int) -> list[tuple]:
    from gguf import GGUFValueType as T

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None or spec.get("normalizer") is not None:
        kind = f"{model.get('type', type(tokenizer).__name__)} with pre-tokenizer " \
               f"{(spec.get('pre_tokenizer') or {}).get('type')} and normalizer {(spec.get('normalizer') or {}).get('type')}"
        raise AffinerError(f"affiner writes GGUF vocabularies for byte-level BPE tokenizers (GPT-2, Llama 3, Qwen "
                           f"style) and copies those of GGUF bases; this tokenizer is {kind}. Export --merged and "
                           "convert it with llama.cpp's convert_hf_to_gguf.py instead.")
    tokens: list[str | None] = [None] * vocab_rows
    types = [_TOKEN_NORMAL] * vocab_rows
    for token, index in model["vocab"].items():
        if index < vocab_rows:
            tokens[index] = token
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_rows:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = _TOKEN_CONTROL if added.get("special") else _TOKEN_USER_DEFINED
    if len(tokenizer) > vocab_rows:
        raise AffinerError(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab_rows} embedding rows.")
    for index, token in enumerate(tokens):
        if token is None:  # embedding rows past the vocabulary (padded for speed): never produced
            tokens[index], types[index] = f"[PAD{index}]", _TOKEN_UNUSED
    unk = tokenizer.unk_token_id
    if unk is not None and types[unk] == _TOKEN_NORMAL:
        types[unk] = _TOKEN_UNKNOWN
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    out = [_kv("tokenizer.ggml.model", "gpt2", T.STRING), _kv("tokenizer.ggml.pre", pre, T.STRING),
           _kv("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
           _kv("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
           _kv("tokenizer.ggml.add_bos_token", bool(probe) and probe[0] == tokenizer.bos_token_id
               and tokenizer.bos_token_id is not None, T.BOOL),
           _kv("tokenizer.ggml.add_eos_token", bool(probe) and probe[-1] == tokenizer.eos_token_id
               and tokenizer.eos_token_id is not None and len(probe) > 1, T.BOOL)]
    if merges:
        out.append(_kv("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING))
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unknown", tokenizer.unk_token_id), ("padding", tokenizer.pad_token_id)):
        if token_id is not None:
            out.append(_kv(f"tokenizer.ggml.{key}_token_id", int(token_id), T.UINT32))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        out.append(_kv("tokenizer.chat_template", tokenizer.chat_template, T.STRING))
    return out


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer that transformers' GGUF loader rebuilds the same way."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"  # GPT-2's own split, the default of transformers' byte-level GGUF tokenizer
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel" \
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space"):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_PRE_TOKENIZER_SPLITS,
        )

        regex = (steps[0].get("pattern") or {}).get("Regex")
        return next((name for name, split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == regex), None)
    return None


# ---------------------------------------------------------------------------------------- checks


def check_config(config, arch: str, kv: list[tuple], tokenizer_kv: list[tuple], tensor_names: list[str]) -> None:
    """The config transformers rebuilds from the file's metadata must compute what the model computes.

    transformers reads it from a small probe file with the same metadata and tensor names (and, but for
    GPT-2 whose vocabulary size is the token count, without the vocabulary), before the real file exists.
    """
    import tempfile

    import gguf
    from transformers import AutoConfig

    with tempfile.TemporaryDirectory(prefix="affiner-gguf-probe-") as folder:
        probe = Path(folder) / "probe.gguf"
        writer = gguf.GGUFWriter(str(probe), arch)
        keep = {"tokenizer.ggml.tokens"} if arch == "gpt2" else set()
        for key, value, vtype, sub_type in kv + [t for t in tokenizer_kv if t[2] != gguf.GGUFValueType.ARRAY
                                                  or t[0] in keep]:
            writer.add_key_value(key, value, vtype, sub_type)
        for name in tensor_names:
            writer.add_tensor(name, np.zeros(1, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
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


def check_tokenizer(path: Path, tokenizer, texts: list[str]) -> None:
    """A tokenizer rebuilt from the file must give the same ids as the run's, special tokens included."""
    from transformers import AutoTokenizer

    rebuilt = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    specials = " ".join(t for t in (tokenizer.bos_token, tokenizer.eos_token) if t)
    probes = [*texts, "Hello world! What does QUILT stand for?\n### Answer: 42 — déjà vu, 東京.", specials]
    for text in probes:
        ours, theirs = tokenizer(text)["input_ids"], rebuilt(text)["input_ids"]
        if ours != theirs:
            path.unlink(missing_ok=True)
            raise AffinerError(f"the tokenizer rebuilt from the GGUF file splits {text[:60]!r} into {theirs[:12]} "
                               f"where the model's own gives {ours[:12]}; no GGUF was written. Export --merged "
                               "and convert it with llama.cpp's convert_hf_to_gguf.py instead.")
