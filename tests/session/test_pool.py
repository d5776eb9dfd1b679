"""ChatSettings' quantize setting and the model pool: an fp32 and an int8 copy of one checkpoint are two entries."""

from __future__ import annotations

import pytest

from gptchat.core.errors import UsageError
from gptchat.core.model import quant
from gptchat.core.session import prefs
from gptchat.core.session.pool import ModelPool
from gptchat.core.session.settings import ChatSettings, settings_from
from tests.factory import hf_model, save


def test_quantize_setting_parses_checks_and_is_the_machines():
    s = ChatSettings()
    assert s.quantize is None
    assert s.with_value("quantize", "INT8").quantize == "int8"
    assert s.with_value("quantize", "int8").with_value("quantize", "none").quantize is None
    with pytest.raises(UsageError, match="quantize is one of"):
        s.with_value("quantize", "int4")
    assert settings_from(quantize="int8").quantize == "int8"
    with pytest.raises(UsageError):
        settings_from(quantize="fp8")
    assert "quantize" not in prefs.KEPT  # like device and dtype: not restored at the next launch
    reopened = prefs.conversation_settings(ChatSettings(quantize="int8", device="cpu"), {"template": "raw"})
    assert (reopened.quantize, reopened.device, reopened.template) == ("int8", "cpu", "raw")


@pytest.mark.skipif(not quant.available(), reason="this PyTorch has no fbgemm int8 kernels")
def test_fp32_and_int8_loads_are_distinct_pool_entries(tmp_path):
    spec = str(save(hf_model(n_layer=1, n_embd=32, n_positions=64), tmp_path / "m"))
    pool = ModelPool()
    full = pool.load(spec, "cpu", "fp32")
    low = pool.load(spec, "cpu", None, "int8")
    assert low is not full and len(pool.loaded()) == 2
    assert full.key[-1] == "none" and low.key[-1] == "int8"
    assert quant.is_quantized(low.lm.engine.model) and not quant.is_quantized(full.lm.engine.model)
    assert pool.load(spec, "cpu", None, "int8") is low and pool.load(spec, "cpu", "fp32") is full  # cached
    assert pool.get(spec, "cpu") is full and pool.get(spec, "cpu", quantize="int8") is low
    params = sum(p.numel() * p.element_size() for p in low.lm.engine.model.parameters())
    assert low.bytes >= params + 50257 * (32 + 4)  # the packed int8 weights count: the head's alone is V x (C + 4)
    pool.unload(spec)
    assert pool.loaded() == []


def test_peak_rss_counts_from_its_reset():
    """peak_rss is the process's high-water mark; reset_peak_rss (Linux) starts it over from the RSS now: an
    experiment's row reports its own peak, not an earlier row's."""
    from gptchat.core.session.pool import peak_rss, process_rss, reset_peak_rss

    import mmap

    big = mmap.mmap(-1, 256 * 2**20)  # its own mapping, every page touched: unmapped again on close
    for i in range(0, len(big), mmap.PAGESIZE):
        big[i] = 1
    high = peak_rss()
    assert high >= len(big) and high >= process_rss() - 16 * 2**20  # (other threads may grow the RSS meanwhile)
    big.close()
    if not reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak RSS")
    low = peak_rss()
    assert low < high - 200 * 2**20 and low >= process_rss() - 16 * 2**20
