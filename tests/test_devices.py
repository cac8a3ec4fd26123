"""Which devices run bfloat16 in hardware: the check behind a profile's precision (klviewer.inference.precision)."""

import pytest
import torch

from klviewer.devices import bfloat16_is_native


def test_a_gpu_counts_only_bfloat16_in_hardware(monkeypatch) -> None:
    asked = []

    def supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return including_emulation  # an older GPU: bfloat16 only by emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert bfloat16_is_native(torch.device("cuda")) is False
    assert asked == [False]


@pytest.mark.parametrize(("capability", "native"), [("AVX512", True), ("AVX2", False), ("DEFAULT", False)])
def test_a_cpu_without_the_private_onednn_check_falls_back_to_its_instruction_set(monkeypatch, capability,
                                                                                  native) -> None:
    class NoCheck:
        def __getattr__(self, name: str):
            raise AttributeError(name)

    monkeypatch.setattr(torch.ops, "mkldnn", NoCheck())
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert bfloat16_is_native(torch.device("cpu")) is native

