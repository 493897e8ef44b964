"""Every encoder family, built from tiny random configurations (no downloads): extracted into a
cache, described by `cache info`, trained on by heads.train and reproduced by heads.predict."""
import sys

import numpy as np
import pytest
import torch
import torchvision

import cache
from cache.check import describe
from conftest import call_main, predict_saved_test_images
from extract import encoders
from extract.synthetic import write_dataset

CPU = torch.device("cpu")
SMALL = ["--device", "cpu", "--workers", "0", "--batch-size", "16", "--val-fraction", "0.3"]


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    write_dataset(out, patients=30, images_per_patient=2, size=80, seed=3)
    return out


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """A 2-block DINOv2 with random weights, saved the way a downloaded one is."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("dinov2")
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, patch_size=8, image_size=64)
    torch.manual_seed(0)
    transformers.Dinov2Model(config).save_pretrained(folder)
    transformers.BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                                   do_center_crop=True, resample=3, image_mean=[0.5, 0.5, 0.5],
                                   image_std=[0.25, 0.25, 0.25]).save_pretrained(folder)
    return folder


def _family_cases(dinov2_dir):
    return {
        "torchvision-layers": (["--backbone", "resnet50", "--weights", "none", "--image-size", "64",
                                "--layers", "layer3,layer4"], 1024 + 2048),
        "timm": (["--backbone", "timm:test_efficientnet", "--weights", "none", "--image-size", "64"], 256),
        "hf": (["--backbone", f"hf:{dinov2_dir}", "--layers", "last:2", "--pooling", "cls+mean"], 2 * 2 * 32),
        "xrv": (["--backbone", "xrv:densenet121-res224-all", "--weights", "none", "--image-size", "64"], 1024),
    }


@pytest.mark.parametrize("family", ["torchvision-layers", "timm", "hf", "xrv"])
def test_each_family_extracts_trains_and_predicts(family, small_dir, tiny_dinov2, tmp_path):
    if family in ("timm", "xrv"):
        pytest.importorskip({"timm": "timm", "xrv": "torchxrayvision"}[family])
    flags, dim = _family_cases(tiny_dinov2)[family]
    path = tmp_path / "c.h5"
    result = call_main("extract", "--data-dir", small_dir, "--cache", path, *flags, *SMALL, check_rc=0)
    attrs = cache.read_attrs(path)
    assert attrs["feature_dim"] == dim and sum(attrs["preprocessing"]["block_dims"]) == dim
    table = cache.read_table(path)
    features = cache.read_features(path, {"all": np.arange(len(table["done"]))})["all"]
    assert table["done"].all() and np.isfinite(features).all() and features.std(axis=0).mean() > 0
    info = describe(path)  # what `python -m cache info` prints
    assert "block_dims" in info and "value_range" in info and attrs["backbone"] in info
    if family == "xrv":
        assert "TEST images" in result.stderr and "TEST images" in attrs["encoder_warning"]
        assert attrs["preprocessing"]["channels"] == "1 (gray)"
        assert attrs["preprocessing"]["value_range"] == [-1024.0, 1024.0]
    run = tmp_path / "run"
    trained = call_main("heads.train", "--cache", path, "--out", run, "--max-epochs", "2", "--bootstrap", "10",
                        check_rc=0)
    # the caveat travels with the features: heads.train repeats it beside its test table
    assert ("WARNING" in trained.stdout and "TEST images" in trained.stdout) == (family == "xrv")
    _, predicted, saved = predict_saved_test_images(run, small_dir, tmp_path / "p.csv", n=3)
    np.testing.assert_allclose(predicted, saved, atol=2e-3)


def test_layers_record_names_and_dims_and_change_the_fingerprint(small_dir, tmp_path):
    base = ["--weights", "none", "--image-size", "64", "--split", "val", *SMALL]
    call_main("extract", "--data-dir", small_dir, "--cache", tmp_path / "a.h5", *base, check_rc=0)
    call_main("extract", "--data-dir", small_dir, "--cache", tmp_path / "b.h5", *base, "--layers", "layer3,layer4",
              check_rc=0)
    a, b = cache.read_attrs(tmp_path / "a.h5"), cache.read_attrs(tmp_path / "b.h5")
    assert b["preprocessing"]["blocks"] == ["layer3", "layer4"] and b["preprocessing"]["block_dims"] == [1024, 2048]
    assert a["preprocessing"]["blocks"] == ["pooled"] and a["feature_dim"] == 2048
    assert a["fingerprint"] != b["fingerprint"]
    rows = np.flatnonzero(cache.read_table(tmp_path / "a.h5")["done"])
    pooled = cache.read_features(tmp_path / "a.h5", {"r": rows})["r"]
    both = cache.read_features(tmp_path / "b.h5", {"r": rows})["r"]
    # layer4's pooled block is the default feature: the second block equals it
    np.testing.assert_allclose(both[:, 1024:], pooled, rtol=2e-3, atol=2e-3)
    result = call_main("extract", "--data-dir", small_dir, "--cache", tmp_path / "c.h5", *base, "--layers", "layer9")
    assert result.returncode == 2 and "--layers layer9: no such module" in result.stderr
    assert not (tmp_path / "c.h5").exists()


def test_image_size_changes_inputs_and_is_refused_where_the_encoder_cannot(tmp_path):
    small = encoders.build_encoder("resnet50", weights="none", image_size=96)
    assert small.preprocessing.size == 96 and small.recipe()["resize"].startswith("whole image to 96x96")
    with pytest.raises(encoders.EncoderError, match="accepts only 224"):
        encoders.build_encoder("vit_b_16", weights="none", image_size=448)
    pytest.importorskip("timm")
    vit = encoders.build_encoder("timm:test_vit", weights="none", image_size=96)  # position embeddings resampled
    assert vit.preprocessing.size == 96 and vit.feature_dim == 64


def _randomize_batchnorm(model):
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.normal_(1, 0.2, generator=generator)
            module.bias.data.normal_(0, 0.2, generator=generator)


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0"])
def test_batchnorm_folding_keeps_the_function(name):
    model = torchvision.models.get_model(name, weights=None).eval()
    _randomize_batchnorm(model)
    inputs = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        reference = model(inputs)
        encoders.fold_batchnorm(model)
        folded = model(inputs)
    assert not any(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    torch.testing.assert_close(folded, reference, rtol=1e-4, atol=1e-4)


def test_missing_extra_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    with pytest.raises(encoders.EncoderError, match=r"pip install -e \.\[timm\]"):
        encoders.build_encoder("timm:test_vit", weights="none")


@pytest.mark.parametrize("spec, message", [("nope:x", "unknown family 'nope'"), ("timm:", "name the model"),
                                           ("resnet5O", "not a torchvision classification model")])
def test_bad_backbone_names_are_one_clear_error(spec, message):
    with pytest.raises(encoders.EncoderError, match=message):
        encoders.build_encoder(spec, weights="none")


def test_random_weights_are_seeded_for_every_family(tiny_dinov2):
    pytest.importorskip("timm")
    pytest.importorskip("torchxrayvision")
    for spec in ("resnet50", "timm:test_vit", f"hf:{tiny_dinov2}", "xrv:densenet121-res224-all"):
        one, two = (encoders.build_encoder(spec, weights="none", image_size=64) for _ in range(2))
        inputs = one.preprocessing.to_inputs(torch.rand(2, 64, 64))
        with torch.inference_mode():
            torch.testing.assert_close(one.embed(inputs), two.embed(inputs))


def test_default_cache_path_names_the_variant():
    assert encoders.default_cache_path("resnet50", image_size=224) == "outputs/cache/resnet50-224.h5"
    assert encoders.default_cache_path("hf:microsoft/rad-dino", image_size=518, layers=("last:4",)) == \
        "outputs/cache/hf-microsoft-rad-dino-518-last-4.h5"
    assert encoders.default_cache_path("resnet50", image_size=448, layers=("layer3", "layer4")) == \
        "outputs/cache/resnet50-448-layer3+layer4.h5"


def test_cpu_bf16_is_the_default_only_with_native_bf16(monkeypatch):
    from extract import pipeline
    monkeypatch.setattr(encoders, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(pipeline, "cpu_has_native_bf16", lambda: True)
    assert pipeline.resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(pipeline, "cpu_has_native_bf16", lambda: False)
    assert pipeline.resolve_precision("auto", CPU) == "fp32"
    assert pipeline.resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert pipeline.resolve_precision("fp16", CPU) == "fp16"


@pytest.fixture(scope="module")
def tiny_fixed_size_vit(tmp_path_factory):
    """A transformers ViT that embeds positions for 64 px only (it raises ValueError otherwise)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("vit")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, patch_size=16, image_size=64)
    transformers.ViTModel(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def test_hf_size_it_cannot_take_is_one_line_exit_2(small_dir, tiny_fixed_size_vit, tmp_path):
    result = call_main("extract", "--data-dir", small_dir, "--cache", tmp_path / "c.h5", "--weights", "none",
                       "--backbone", f"hf:{tiny_fixed_size_vit}", "--image-size", "96", *SMALL, check_rc=2)
    assert "--image-size 96" in result.stderr and "leave --image-size out" in result.stderr
    assert not (tmp_path / "c.h5").exists()


def test_hf_more_last_blocks_than_the_model_has_names_its_depth(tiny_dinov2):
    with pytest.raises(encoders.EncoderError, match=r"has 2 blocks; use last:1 \.\. last:2"):
        encoders.build_encoder(f"hf:{tiny_dinov2}", weights="none", layers=("last:5",))


def test_a_layer_named_twice_is_refused():
    with pytest.raises(encoders.EncoderError, match="layer4 named twice"):
        encoders.parse_layers("layer3,layer4, layer4")
    assert encoders.parse_layers("layer3, layer4,") == ("layer3", "layer4")


def test_the_random_weights_warning_is_one_line_once(small_dir, tmp_path):
    pytest.importorskip("timm")
    # timm:resnet10t refuses img_size, so its build runs twice: the warning must still print once
    result = call_main("extract", "--data-dir", small_dir, "--cache", tmp_path / "c.h5", "--weights", "none",
                       "--backbone", "timm:resnet10t", "--image-size", "32", "--split", "val", *SMALL, check_rc=0)
    lines = [line for line in result.stderr.splitlines() if "RANDOM encoder weights" in line]
    assert lines == ["warning: --weights none: RANDOM encoder weights; features are meaningless beyond "
                     "testing the pipeline"]
    assert "encoders.py" not in result.stderr


def test_a_weights_file_torch_cannot_load_is_one_line(tmp_path):
    junk = tmp_path / "weights.pth"
    junk.write_text("not a checkpoint\n")
    with pytest.raises(encoders.EncoderError) as caught:
        encoders.build_encoder("resnet18", weights=str(junk), image_size=32)
    assert "not a loadable state dict" in str(caught.value) and "\n" not in str(caught.value)
