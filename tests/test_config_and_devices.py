"""The config base every model shares (presets, JSON round trip, checked fields) and the one device
resolver."""

from dataclasses import dataclass

import pytest
import torch

from fromscratch.config import ModelConfig, json_field
from fromscratch.devices import cpu_description, describe_device, resolve_device
from fromscratch.errors import UserError
from fromscratch.llama import LlamaConfig
from fromscratch.transformer import TransformerConfig


@dataclass
class ExampleConfig(ModelConfig):
    width: int = 8
    rate: float = 0.5
    name: str = "x"
    gated: bool = False
    heads: int | None = None

    PRESETS = {"wide": dict(width=64)}

    def validate(self):
        if self.width % 2:
            raise UserError(f"width must be even, got {self.width}")


def test_presets_overrides_and_a_json_round_trip():
    config = ExampleConfig.from_preset("wide", rate=1)
    assert (config.width, config.rate) == (64, 1.0) and isinstance(config.rate, float)
    assert ExampleConfig.from_dict(config.to_dict()) == config
    with pytest.raises(UserError, match="unknown Example preset 'huge'; presets: wide"):
        ExampleConfig.from_preset("huge")


@pytest.mark.parametrize("values, message", [
    ({"width": "8"}, "width must be int, got '8' (str)"),
    ({"width": [8]}, "width must be int, got [8] (list)"),
    ({"width": True}, "width must be int, got True (bool)"),
    ({"rate": "fast"}, "rate must be float"),
    ({"rate": float("nan")}, "rate must be a finite number"),
    ({"gated": 1}, "gated must be bool"),
    ({"heads": "2"}, "heads must be int or null"),
    ({"width": 7}, "width must be even"),
    ({"depth": 3}, "unknown ExampleConfig field(s) depth"),
])
def test_every_field_is_checked_and_the_source_is_named(values, message):
    with pytest.raises(UserError) as error:
        ExampleConfig.from_dict(values, source="run/model_config.json")
    assert str(error.value).startswith("run/model_config.json: ") and message in str(error.value)
    with pytest.raises(UserError, match="must be a JSON object"):
        ExampleConfig.from_dict([1, 2], source="x.json")


def test_model_configs_derive_from_the_base():
    for config_class in (LlamaConfig, TransformerConfig):
        assert issubclass(config_class, ModelConfig)
        for name in config_class.PRESETS:
            config = config_class.from_preset(name)
            assert config_class.from_dict(config.to_dict()) == config
    with pytest.raises(UserError, match="n_layers must be int"):
        LlamaConfig.from_dict({"n_layers": "2"})


def test_json_field_names_the_key_as_the_file_spells_it():
    hf = {"hidden_size": "64", "rope_theta": 10000}
    with pytest.raises(UserError, match="config.json: hidden_size must be int"):
        json_field(hf, "hidden_size", int, "config.json")
    assert json_field(hf, "rope_theta", float, "config.json") == 10000.0
    assert json_field(hf, "absent", int | None, "config.json", None) is None
    with pytest.raises(UserError, match="config.json: has no 'vocab_size'"):
        json_field(hf, "vocab_size", int, "config.json")


def test_one_device_resolver():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for name, message in (("tpu", "--device tpu: not a device"), ("banana", "not a device")):
        with pytest.raises(UserError, match=message):
            resolve_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device is available here"):
            resolve_device("cuda:1")


ZEN3_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: fpu avx2 avx512f avx512_bf16
"""


def test_describe_device_names_the_cpu_generation():
    """Two hosts that platform.processor() calls alike differ in family, model and AVX-512: the
    description reads them from the first processor of /proc/cpuinfo."""
    assert cpu_description(ZEN3_CPUINFO) == {"model_name": "AMD EPYC 7B13", "family": "25", "model": "1",
                                             "avx512f": False, "avx512_bf16": False}
    zen4 = ZEN3_CPUINFO.replace("model\t\t: 1\n", "model\t\t: 17\n", 1).replace("fma\n", "fma avx512f avx512_bf16\n", 1)
    assert cpu_description(zen4)["model"] == "17" and cpu_description(zen4)["avx512_bf16"]
    assert cpu_description("") == {"model_name": "", "family": "", "model": "", "avx512f": False, "avx512_bf16": False}
    here = describe_device("cpu")
    assert here["type"] == "cpu" and here["threads"] == torch.get_num_threads() and here["cores"] >= 1
    assert here["vector"] == torch.backends.cpu.get_cpu_capability()
