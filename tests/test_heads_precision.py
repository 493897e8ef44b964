"""Head training precision: bf16 autocast by default only where /proc/cpuinfo names native bf16
units (avx512_bf16 or amx_bf16), as extraction decides, fp32 elsewhere; forcing either works."""
import pytest
import torch

from cache import runtime
from cache.synthetic import write_synthetic_cache
from heads import settings as head_settings
from heads.data import load_head_data
from heads.fit import fit_head, fit_heads, resolve_precision

CPU = torch.device("cpu")
SETTINGS = {**head_settings.DEFAULTS, "depth": 1, "width": 32, "max_epochs": 3, "patience": 3, "batch_size": 128}


@pytest.fixture
def cpu_flags(monkeypatch, tmp_path):
    """Makes cache.runtime read the given flags line as the CPU's (its CPUINFO setting)."""
    cpuinfo = tmp_path / "cpuinfo"

    def set_flags(flags):
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(runtime, "CPUINFO", cpuinfo)
    return set_flags


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("precision") / "features.h5"
    write_synthetic_cache(path, rows={"train": 1200, "val": 500, "test": 200}, dim=24, separation=1.0)
    return load_head_data(path)


@pytest.mark.parametrize("flags, native", [("fpu sse2 avx2 fma avx512f avx512bw", False),
                                           ("fpu avx2 avx512f avx512_bf16 avx512_vnni", True),
                                           ("fpu avx2 amx_bf16 amx_tile amx_int8", True),
                                           ("fpu avx2 avx512_bf16x", False)])
def test_auto_precision_is_bf16_only_where_the_cpu_has_native_bf16(cpu_flags, flags, native):
    cpu_flags(flags)
    assert resolve_precision("auto", CPU) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"


def _val_curve(result):
    return [h["val_mean_auc"] for h in result.history]


def test_a_head_trains_under_bf16_autocast_by_default_only_with_native_bf16(cpu_flags, data):
    def fit(precision):
        return fit_head(train=data.train, val=data.val, settings={**SETTINGS, "precision": precision}, device="cpu")
    fp32, bf16 = fit("fp32"), fit("bf16")
    assert _val_curve(bf16) != _val_curve(fp32)  # autocast really ran: the rounding shows
    assert bf16.best_val_auc == pytest.approx(fp32.best_val_auc, abs=0.01)
    cpu_flags("fpu avx2 avx512f")
    assert _val_curve(fit("auto")) == _val_curve(fp32)
    cpu_flags("fpu avx2 avx512f avx512_bf16")
    assert _val_curve(fit("auto")) == _val_curve(bf16)


def test_heads_of_one_pass_must_share_their_precision(data):
    with pytest.raises(ValueError, match="precision"):
        fit_heads(train=data.train, val=data.val, device="cpu",
                  settings_list=[{**SETTINGS, "precision": "fp32"}, {**SETTINGS, "precision": "bf16"}])
