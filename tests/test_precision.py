"""Precision and placement beyond one CPU, tested at the device boundary: torch's answers about CUDA and
MPS are mocked, so the table of dtypes, the device of each rank and what reaches `from_pretrained` are
checked on this CPU. Also: the loss applies each model's own output scaling (Granite, Cohere)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
import transformers

from affiner.core import devices, models
from affiner.core.config import RunConfig
from affiner.core.errors import AffinerError
from affiner.core.loss import token_losses
from affiner.core.devices import device, resolve_dtype
from affiner.core.models import dtype_for, load_for

T4, A100 = (7, 5), (8, 0)
GEMMA = "gemma3_text"


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a CUDA machine with the given compute capability, or an Apple MPS one, or a CPU.

    torch.cuda.is_bf16_supported() answers yes on every GPU here, as torch does where bf16 is merely
    emulated (a T4): the precision rules must not trust it."""
    devices.note.cache_clear()
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("AFFINER_CPU_BF16", raising=False)

    def pretend(kind: str, capability: tuple[int, int] = A100, macos14: bool = True,
                cpu_bf16_speedup: float = 0.3) -> None:  # by default a CPU that only emulates bf16 (AVX2)
        monkeypatch.setattr(devices, "cpu_bf16_speedup", lambda: cpu_bf16_speedup)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: kind == "cuda")
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: kind == "mps")
        monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos14)

    yield pretend
    devices.note.cache_clear()


# ---------------------------------------------------------------------------------------- devices


def test_each_rank_uses_its_own_gpu(machine, monkeypatch):
    machine("cuda")
    assert device() == torch.device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert device() == torch.device("cuda:3") and device().type == "cuda"


def test_mps_then_cpu(machine):
    machine("mps")
    assert device() == torch.device("mps")
    machine("cpu")
    assert device() == torch.device("cpu")


# ---------------------------------------------------------------------------------------- the table


@pytest.mark.parametrize("kind, capability, precision, model_type, expected", [
    ("cuda", T4, "auto", "llama", torch.float16),       # emulated bf16 is not taken: fp16 with the scaler
    ("cuda", T4, "fp16", "llama", torch.float16),
    ("cuda", T4, "fp32", GEMMA, torch.float32),
    ("cuda", A100, "auto", "llama", torch.bfloat16),
    ("cuda", A100, "auto", GEMMA, torch.bfloat16),
    ("cuda", A100, "auto", "gemma3", torch.bfloat16),
    ("cuda", A100, "bf16", None, torch.bfloat16),
    ("cuda", A100, "fp16", "llama", torch.float16),
    ("cuda", A100, "fp32", None, torch.float32),
    ("cpu", A100, "auto", GEMMA, torch.float32),
    ("cpu", A100, "bf16", None, torch.bfloat16),  # asked for: given, with a note where it is emulated
    ("cpu", A100, "fp16", GEMMA, torch.float32),
    ("mps", A100, "auto", None, torch.float32),
    ("mps", A100, "fp16", "llama", torch.float16),
    ("mps", A100, "bf16", GEMMA, torch.bfloat16),
])
def test_precision_table(machine, kind, capability, precision, model_type, expected):
    machine(kind, capability)
    assert resolve_dtype(precision, model_type) == expected


def test_gemma_on_a_gpu_without_native_bf16_falls_back_to_fp32_and_says_why(machine, capsys):
    machine("cuda", T4)
    assert resolve_dtype("auto", GEMMA) == torch.float32
    out = capsys.readouterr().err
    assert "overflow in fp16" in out and "compute capability 7.5" in out and "fp32" in out
    resolve_dtype("auto", GEMMA)
    assert capsys.readouterr().err == ""  # once per process, though loader and training loop both ask


def test_explicit_bf16_without_native_bf16_is_refused(machine):
    machine("cuda", T4)
    with pytest.raises(AffinerError, match=r"emulated.*compute capability 7\.5.*fp16 \(or fp32\)"):
        resolve_dtype("bf16", "llama")
    with pytest.raises(AffinerError, match=r"emulated.*Use precision: fp32 \(gemma3_text overflows"):
        resolve_dtype("bf16", GEMMA)


@pytest.mark.parametrize("capability, advice", [(A100, r"bf16 \(or fp32\)"), (T4, r"fp32 \(or bf16 on a GPU")])
def test_explicit_fp16_on_gemma_is_refused_naming_the_overflow(machine, capability, advice):
    machine("cuda", capability)
    with pytest.raises(AffinerError, match=rf"fp16 overflows on gemma3_text.*NaN.*{advice}"):
        resolve_dtype("fp16", GEMMA)


def test_mps_bf16_needs_macos_14(machine):
    machine("mps", macos14=False)
    with pytest.raises(AffinerError, match="macOS 14"):
        resolve_dtype("bf16")
    with pytest.raises(AffinerError, match="overflows on gemma3_text"):
        resolve_dtype("fp16", GEMMA)


def test_cpu_notes_for_an_explicit_precision(machine, capsys):
    machine("cpu")
    assert resolve_dtype("fp16") == torch.float32
    assert "needs a GPU" in capsys.readouterr().err
    assert resolve_dtype("bf16") == torch.bfloat16
    assert "bf16 is emulated on this CPU (0.3x the speed of fp32)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- loading


class Captured(Exception):
    """Raised by the stand-in for from_pretrained once it has seen its arguments."""


class Loads(list):
    """The keyword arguments of each from_pretrained call; `model_type` is what the base's config says."""
    model_type = "llama"


@pytest.fixture
def loads(monkeypatch, offline_hub) -> Iterator[Loads]:
    seen = Loads()

    def from_pretrained(name, **kwargs):
        seen.append(kwargs)
        raise Captured

    def config(name, **kwargs):
        return transformers.PretrainedConfig.from_dict({"model_type": seen.model_type})

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config)
    models.model_config_of.cache_clear()  # each test plays another model behind the same name
    yield seen
    models.model_config_of.cache_clear()


def run_config(method: str = "lora", **model) -> RunConfig:
    return RunConfig.model_validate({"data": {"train": "x.jsonl"}, "method": method,
                                     "model": {"base": "org/model", **model}})


def test_a_plain_base_loads_straight_onto_the_ranks_gpu(machine, monkeypatch, loads):
    machine("cuda", A100)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(Captured):
        load_for(run_config())
    assert loads[-1]["device_map"] == {"": "cuda:1"} and loads[-1]["dtype"] == torch.bfloat16


def test_qlora_quantises_onto_the_ranks_gpu(machine, monkeypatch, loads):
    pytest.importorskip("bitsandbytes")
    machine("cuda", T4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(Captured):
        load_for(run_config("qlora"))
    kwargs = loads[-1]
    assert kwargs["device_map"] == {"": "cuda:2"} and kwargs["quantization_config"].load_in_4bit
    assert kwargs["dtype"] == torch.float16 == kwargs["quantization_config"].bnb_4bit_compute_dtype


def test_gemma_base_on_a_t4_loads_in_fp32(machine, loads):
    machine("cuda", T4)
    loads.model_type = GEMMA
    assert dtype_for(run_config()) == torch.float32
    with pytest.raises(Captured):
        load_for(run_config())
    assert loads[-1]["dtype"] == torch.float32
    with pytest.raises(AffinerError, match="overflows"):
        load_for(run_config(precision="fp16"))


def test_full_fine_tuning_keeps_fp32_masters_on_the_gpu(machine, loads):
    machine("cuda", A100)
    with pytest.raises(Captured):
        load_for(run_config("full"), full_precision=True)
    assert loads[-1]["dtype"] == torch.float32 and loads[-1]["device_map"] == {"": "cuda:0"}


def test_on_a_cpu_without_native_bf16_nothing_changes(machine, loads):
    machine("cpu", cpu_bf16_speedup=0.3)  # AVX2: bf16 emulated, slower than fp32
    with pytest.raises(Captured):
        load_for(run_config())
    assert "device_map" not in loads[-1] and loads[-1]["dtype"] == torch.float32


def test_a_cpu_with_native_bf16_computes_in_bf16_and_says_why(machine, loads, capsys):
    machine("cpu", cpu_bf16_speedup=5.8)  # AMX
    assert resolve_dtype("auto") == torch.bfloat16
    out, err = capsys.readouterr()
    assert "bf16 on this CPU (its bf16 matrix products run 5.8x faster" in err and not out  # stdout: answers alone
    assert resolve_dtype("fp32") == torch.float32 and resolve_dtype("fp16") == torch.float32
    machine("cpu", cpu_bf16_speedup=2.2)  # AVX512-BF16 (Zen 4), whose measurement once fell under 2.0
    assert resolve_dtype("auto") == torch.bfloat16
    machine("cpu", cpu_bf16_speedup=1.2)  # faster, but not enough to pay for bf16's coarser forward
    assert resolve_dtype("auto") == torch.float32 and resolve_dtype("bf16") == torch.bfloat16


def test_processes_training_together_on_cpus_all_take_the_main_ones_measurement(machine, monkeypatch):
    """Under torchrun on CPUs each process measuring its own speed-up (on cores the others load) could pick
    another dtype; the main process's measurement is broadcast and every process, main or not, decides by it."""
    broadcast = []

    def share(value):  # what the main process (rank 0) sent, whatever this process had
        broadcast.append(value)
        return 2.2

    machine("cpu", cpu_bf16_speedup=1.2)  # this process alone would measure too little for bf16
    try:
        devices.share_cpu_bf16_speedup(share, is_main=False)
        assert broadcast == [None]  # a process other than the main one does not measure
        assert resolve_dtype("auto") == torch.bfloat16
        assert devices.precision_reason(torch.bfloat16) == ("cpu: bf16 matrix products measured 2.2x fp32's speed "
                                                            "(by the main process, for every process)")
        assert devices.precision_reason(torch.float32, "fp32") == "cpu: model.precision fp32"
        devices.share_cpu_bf16_speedup(share, is_main=True)
        assert broadcast == [None, 1.2]  # the main process sends its own measurement
    finally:
        devices.share_cpu_bf16_speedup(lambda value: None, is_main=False)  # no agreement: each measures again
    assert resolve_dtype("auto") == torch.float32


def test_the_cpu_measurement_is_real_and_overridable(machine, monkeypatch):
    machine("cpu")
    monkeypatch.undo()  # the real measurement, on this machine
    devices.cpu_bf16_speedup.cache_clear()
    assert devices.cpu_bf16_speedup() > 0
    monkeypatch.setenv("AFFINER_CPU_BF16", "1")
    assert resolve_dtype("auto") == torch.bfloat16
    monkeypatch.setenv("AFFINER_CPU_BF16", "0")
    assert resolve_dtype("auto") == torch.float32


def test_a_cpu_that_emulates_bf16_is_told_by_one_small_product(monkeypatch):
    """An emulated bf16 product of 1024 x 1024 takes seconds (torch's fallback kernel): the measurement, which every
    command makes at start-up, stops at the product of half the size when bf16 is clearly slower there."""
    def products(speedups: dict[int, float]) -> list[int]:
        sizes = []
        monkeypatch.setattr(devices, "bf16_product_speedup", lambda size, rounds: sizes.append(size) or speedups[size])
        devices.cpu_bf16_speedup.cache_clear()
        assert devices.cpu_bf16_speedup() == speedups[sizes[-1]]
        return sizes

    try:
        assert products({512: 0.1, 1024: 0.01}) == [512]  # emulated: told at half the size
        assert products({512: 1.9, 1024: 2.4}) == [512, 1024]  # native: the full measurement decides
        assert products({512: 0.9, 1024: 1.6}) == [512, 1024]  # not clearly slower: measured in full
    finally:
        devices.cpu_bf16_speedup.cache_clear()


def test_measuring_the_cpu_leaves_the_runs_random_stream_alone():
    """The measurement's random matrices do not come from the global generator, which the run seeded for its LoRA
    weights and data order: a run measured and one pinned by AFFINER_CPU_BF16 start from the same weights."""
    devices.cpu_bf16_speedup.cache_clear()
    try:
        torch.manual_seed(3)
        expected = torch.rand(4)
        torch.manual_seed(3)
        devices.cpu_bf16_speedup()
        assert torch.equal(torch.rand(4), expected)
    finally:
        devices.cpu_bf16_speedup.cache_clear()


def test_a_cpu_held_to_avx2_stays_in_fp32(tmp_path):
    """This CPU restricted to AVX2 (oneDNN's and ATen's instruction sets capped, as an older CPU has them): bf16
    products fall to an emulated kernel and `auto` keeps fp32, whatever the machine running the tests."""
    script = ("from affiner.core.devices import cpu_bf16_speedup, resolve_dtype; import torch; "
              "assert resolve_dtype('auto') == torch.float32, cpu_bf16_speedup(); print(cpu_bf16_speedup())")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    env.pop("AFFINER_CPU_BF16", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) < devices.CPU_BF16_MIN_SPEEDUP / 2


def test_mps_loads_onto_mps(machine, loads):
    machine("mps")
    with pytest.raises(Captured):
        load_for(run_config(precision="fp16"))
    assert loads[-1]["device_map"] == {"": "mps"} and loads[-1]["dtype"] == torch.float16


# ---------------------------------------------------------------------------------------- output scaling


def _tiny(config_class, model_class, **settings):
    torch.manual_seed(0)
    config = config_class(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, **settings)
    model = model_class(config).eval()
    with torch.no_grad():  # logits of a random model are near zero, where any scaling changes the loss little
        model.get_output_embeddings().weight.mul_(20)
    return model


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 97, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    labels = input_ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[1, -3:] = -100  # padding
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("family, settings", [
    ("Granite", {"logits_scaling": 4.0}),
    ("Cohere", {"logit_scale": 0.25}),
    ("Cohere2", {"logit_scale": 4.0}),
    ("HyperCLOVAX", {"logits_scaling": 0.25}),  # multiplies where Granite divides
])
def test_the_loss_applies_the_models_own_output_scaling(family, settings):
    model_class = getattr(transformers, f"{family}ForCausalLM")
    model = _tiny(getattr(transformers, f"{family}Config"), model_class, **settings)
    batch = _batch()
    with torch.no_grad():
        losses, rows = token_losses(model, batch)
        reference = model(**batch).loss  # transformers' mean over supervised tokens, full logits
    assert rows.tolist() == [0] * 7 + [1] * 4
    torch.testing.assert_close(losses.mean(), reference, rtol=1e-5, atol=1e-6)
    assert not torch.isclose(losses.mean(), _plain_loss(model, batch), rtol=0.02)


def _plain_loss(model, batch) -> torch.Tensor:
    """The loss without any output scaling: the test would pass vacuously if it equalled the real one."""
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, :-1])
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
