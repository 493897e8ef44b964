"""Every encoder family, built from tiny random configurations (no downloads): extracted into a
cache, described by `cache info`, trained on by heads.train and reproduced by heads.predict."""
import json
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
SMALL = ["--device", "cpu", "--precision", "fp32", "--workers", "0", "--batch-size", "16", "--val-fraction", "0.3"]


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


@pytest.mark.parametrize("prefix", sorted(encoders.FAMILIES), ids=lambda prefix: prefix or "torchvision")
def test_every_registered_family_builds_seeded_random_weights(prefix, tiny_dinov2):
    """A family is tested by being registered: its example (or, for a family that needs one, a
    tiny local folder) builds with --weights none, the same network in every process."""
    family = encoders.FAMILIES[prefix]
    if family.module:
        pytest.importorskip(family.module)
    spec = family.example or f"{prefix}:{tiny_dinov2}"
    one, two = (encoders.build_encoder(spec, weights="none", image_size=64) for _ in range(2))
    inputs = one.preprocessing.to_inputs(torch.rand(2, 64, 64))
    with torch.inference_mode():
        features = one.embed(inputs)
        torch.testing.assert_close(features, two.embed(inputs))
    assert features.shape == (2, one.feature_dim) and torch.isfinite(features).all()
    assert one.weights_tag == "random" and one.recipe()["block_dims"] == list(one.block_dims)


def test_default_cache_path_names_the_variant():
    assert encoders.default_cache_path("resnet50", image_size=224) == "outputs/cache/resnet50-224.h5"
    assert encoders.default_cache_path("hf:microsoft/rad-dino", image_size=518, layers=("last:4",)) == \
        "outputs/cache/hf-microsoft-rad-dino-518-last-4.h5"
    assert encoders.default_cache_path("resnet50", image_size=448, layers=("layer3", "layer4")) == \
        "outputs/cache/resnet50-448-layer3+layer4.h5"
    # weights other than the family's pretrained default get their own file
    assert encoders.default_cache_path("resnet50", image_size=224, weights_tag="random") == \
        "outputs/cache/resnet50-224-random.h5"
    assert encoders.default_cache_path("timm:vit_small", image_size=224, weights_tag="mine-ab12cd34") == \
        "outputs/cache/timm-vit_small-224-mine-ab12cd34.h5"


# /proc/cpuinfo flag lines of a Sapphire Rapids (AMX, AVX512-BF16) and of an AVX2-only CPU
NATIVE_BF16_FLAGS = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
NO_BF16_FLAGS = "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n"


@pytest.fixture
def fake_cpu(monkeypatch, tmp_path):
    """fake_cpu(flags): the CPU flags the precision detection reads, whatever this machine has."""
    from cache import runtime

    def fake(flags: str):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\n{flags}")
        monkeypatch.setattr(runtime, "CPUINFO", cpuinfo)
    return fake


def test_cpu_bf16_is_the_default_only_with_native_bf16(fake_cpu, tmp_path):
    from cache import runtime
    from extract import pipeline
    fake_cpu(NATIVE_BF16_FLAGS)
    assert runtime.cpu_has_native_bf16() and pipeline.resolve_precision("auto", CPU) == "bf16"
    fake_cpu(NO_BF16_FLAGS)  # avx512f alone is not bf16
    assert not runtime.cpu_has_native_bf16() and pipeline.resolve_precision("auto", CPU) == "fp32"
    assert pipeline.resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert pipeline.resolve_precision("fp16", CPU) == "fp16"
    assert not runtime.cpu_has_native_bf16(tmp_path / "missing")  # no /proc (macOS): fp32


@pytest.mark.parametrize("flags, expected", [(NATIVE_BF16_FLAGS, "bf16"), (NO_BF16_FLAGS, "fp32")])
def test_extract_auto_precision_follows_the_cpu_flags(flags, expected, fake_cpu, small_dir, tmp_path):
    fake_cpu(flags)
    path = tmp_path / "c.h5"
    call_main("extract", "--data-dir", small_dir, "--cache", path, "--weights", "none", "--backbone", "resnet18",
              "--image-size", "32", "--split", "val", *SMALL, "--precision", "auto", check_rc=0)  # the last flag wins
    assert cache.read_attrs(path)["precision"] == expected


def _save_tiny_vit(folder, *, patch_size=16):
    """A random 2-block transformers ViT for 64 px, saved as save_pretrained does."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, patch_size=patch_size, image_size=64)
    torch.manual_seed(0)
    transformers.ViTModel(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    return _save_tiny_vit(tmp_path_factory.mktemp("vit"))


def test_a_plain_hf_vit_resamples_its_position_embeddings_at_other_sizes(small_dir, tiny_vit, tmp_path):
    import transformers
    encoder = encoders.build_encoder(f"hf:{tiny_vit}", weights="pretrained", image_size=96)
    reference = transformers.ViTModel.from_pretrained(tiny_vit).eval()
    inputs = encoder.preprocessing.to_inputs(torch.rand(2, 96, 96))
    with torch.inference_mode():
        expected = reference(pixel_values=inputs, interpolate_pos_encoding=True).last_hidden_state[:, 0]
        torch.testing.assert_close(encoder.embed(inputs), expected, rtol=1e-4, atol=1e-5)
    path = tmp_path / "c.h5"
    call_main("extract", "--data-dir", small_dir, "--cache", path, "--backbone", f"hf:{tiny_vit}",
              "--image-size", "96", "--split", "val", *SMALL, check_rc=0)
    assert cache.read_attrs(path)["image_size"] == 96


def test_hf_size_it_cannot_take_is_one_line_exit_2(small_dir, tmp_path):
    coarse = _save_tiny_vit(tmp_path / "coarse", patch_size=64)  # one 64 px patch: nothing fits in 32 px
    result = call_main("extract", "--data-dir", small_dir, "--cache", tmp_path / "c.h5", "--weights", "none",
                       "--backbone", f"hf:{coarse}", "--image-size", "32", *SMALL, check_rc=2)
    assert "--image-size 32" in result.stderr and "leave --image-size out" in result.stderr
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


def _one_error_line(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def _renamed_weights_file(family: str, path):
    """A weights file of the right architecture whose parameter names are all wrong."""
    if family == "torchvision":
        state = torchvision.models.resnet18(weights=None).state_dict()
    elif family == "timm":
        state = pytest.importorskip("timm").create_model("test_vit", pretrained=False).state_dict()
    else:
        state = pytest.importorskip("torchxrayvision").models.DenseNet(weights=None).state_dict()
    torch.save({f"encoder.{key}": value for key, value in state.items()}, path)
    return path


FAMILY_BACKBONES = {name: encoders.FAMILIES[prefix].example for name, prefix in
                    (("torchvision", ""), ("timm", "timm"), ("xrv", "xrv"))}


@pytest.mark.parametrize("family", ["torchvision", "timm", "hf", "xrv"])
def test_weights_whose_names_do_not_fit_are_refused_for_every_family(family, small_dir, tiny_vit, tmp_path):
    if family == "hf":
        from safetensors.torch import load_file, save_file
        import shutil
        folder = shutil.copytree(tiny_vit, tmp_path / "renamed")
        state = load_file(folder / "model.safetensors")
        save_file({f"encoder.{key}": value for key, value in state.items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
        flags, named = ["--backbone", f"hf:{folder}"], str(folder)
    else:
        weights = _renamed_weights_file(family, tmp_path / "renamed.pth")
        flags, named = ["--backbone", FAMILY_BACKBONES[family], "--weights", weights], f"--weights {weights}"
    result = call_main("extract", "--data-dir", small_dir, "--cache", tmp_path / "c.h5", *flags,
                       "--image-size", "64", *SMALL)
    error = _one_error_line(result)
    assert named in error and "do not match" in error and "missing: " in error and "unexpected: encoder." in error
    assert not (tmp_path / "c.h5").exists()


@pytest.mark.parametrize("family", ["torchvision", "timm", "xrv"])
def test_a_matching_weights_file_loads_for_every_family(family, tmp_path):
    """The same file twice gives the same network, and a different file another one."""
    pytest.importorskip({"torchvision": "torchvision", "timm": "timm", "xrv": "torchxrayvision"}[family])
    backbone = FAMILY_BACKBONES[family]
    random = encoders.build_encoder(backbone, weights="none", image_size=64)
    state = {key: value + 0.01 * torch.randn_like(value) if value.is_floating_point() else value
             for key, value in torch.load(_plain_state(family, tmp_path), weights_only=True).items()}
    torch.save(state, tmp_path / "trained.pth")
    loaded = encoders.build_encoder(backbone, weights=str(tmp_path / "trained.pth"), image_size=64)
    inputs = loaded.preprocessing.to_inputs(torch.rand(2, 64, 64))
    with torch.inference_mode():
        assert not torch.allclose(loaded.embed(inputs), random.embed(inputs))
    assert loaded.weights["weights"] == "file:trained.pth" and len(loaded.weights["weights_sha256"]) == 64


def _plain_state(family, tmp_path):
    path = tmp_path / "plain.pth"
    if family == "torchvision":
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    elif family == "timm":
        torch.save(pytest.importorskip("timm").create_model("test_vit", pretrained=False).state_dict(), path)
    else:
        torch.save(pytest.importorskip("torchxrayvision").models.DenseNet(weights=None).state_dict(), path)
    return path


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    ("tensor", "not a state dict of named tensors (it holds a Tensor)"),
    ("numbers", "not a state dict of named tensors ('epoch' are not tensors)"),
    (b"PK\x03\x04 not really a zip", "not a loadable state dict"),
])
@pytest.mark.parametrize("backbone", ["timm:test_vit", "resnet18"])
def test_a_weights_file_that_is_no_state_dict_is_one_line(backbone, content, message, small_dir, tmp_path):
    if backbone.startswith("timm"):
        pytest.importorskip("timm")
    weights = tmp_path / "weights.pth"
    if content == "tensor":
        torch.save(torch.zeros(3), weights)
    elif content == "numbers":
        torch.save({"epoch": 3}, weights)
    else:
        weights.write_bytes(content)
    result = call_main("extract", "--data-dir", small_dir, "--cache", tmp_path / "c.h5", "--backbone", backbone,
                       "--weights", weights, "--image-size", "64", *SMALL)
    error = _one_error_line(result)
    assert f"--weights {weights}: " in error and message in error
    assert not (tmp_path / "c.h5").exists()


def _break_truncated_weights(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return "model"


def _break_config_type(folder):
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = "wide"
    (folder / "config.json").write_text(json.dumps(config))
    return "hidden_size"


def _break_mean_length(folder):
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    processor["image_mean"] = [0.5, 0.5]
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return "preprocessor_config.json: image_mean is (0.5, 0.5)"


def _break_config_json(folder):
    (folder / "config.json").write_text("[1, 2]")
    return "config.json: not a JSON object"


@pytest.mark.parametrize("damage", [_break_truncated_weights, _break_config_type, _break_mean_length,
                                    _break_config_json])
def test_a_damaged_hf_folder_is_one_line_naming_it(damage, small_dir, tiny_vit, tmp_path):
    import shutil
    folder = shutil.copytree(tiny_vit, tmp_path / "damaged")
    expected = damage(folder)
    result = call_main("extract", "--data-dir", small_dir, "--cache", tmp_path / "c.h5", "--backbone",
                       f"hf:{folder}", *SMALL)
    error = _one_error_line(result)
    assert str(folder) in error and expected in error
    assert not (tmp_path / "c.h5").exists()


def test_the_hf_folder_hash_covers_config_processor_and_weights(small_dir, tiny_vit, tmp_path):
    """An edited config.json (another activation) must not resume a cache of the old network."""
    import shutil
    folder = shutil.copytree(tiny_vit, tmp_path / "vit")
    original = encoders.weights_sha256(folder)
    (folder / "README.md").write_text("a model card decides nothing")
    assert encoders.weights_sha256(folder) == original
    path = tmp_path / "c.h5"
    flags = ["--data-dir", small_dir, "--cache", path, "--backbone", f"hf:{folder}", *SMALL]
    call_main("extract", *flags, "--split", "test", check_rc=0)
    assert cache.read_attrs(path)["weights_sha256"] == original
    config = json.loads((folder / "config.json").read_text())
    config["hidden_act"] = "relu"
    (folder / "config.json").write_text(json.dumps(config))
    edited = encoders.weights_sha256(folder)
    result = call_main("extract", *flags, "--split", "train")
    assert result.returncode == 2 and "weights_sha256" in result.stderr
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    processor["image_mean"] = [0.4, 0.4, 0.4]
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    assert len({original, edited, encoders.weights_sha256(folder)}) == 3


def test_layers_that_batchnorm_folding_would_remove_are_computed():
    """conv1 and bn1 of a ResNet are folded into one convolution for speed; named in --layers,
    they stay, and give exactly their own outputs (bn1 before the in-place ReLU)."""
    encoder = encoders.build_encoder("resnet18", weights="none", image_size=64, layers=("conv1", "bn1", "layer4"))
    assert encoder.block_dims == (64, 64, 512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(encoders.RANDOM_WEIGHTS_SEED)
        reference = torchvision.models.resnet18(weights=None).eval()
    _randomize_batchnorm(reference)
    _randomize_batchnorm(encoder.model.net)
    inputs = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        conv1 = reference.conv1(inputs)
        bn1 = reference.bn1(conv1)
        features = encoder.embed(inputs.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(features[:, :64], conv1.mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features[:, 64:128], bn1.mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)
    assert any(type(m) is torch.nn.Identity for m in encoder.model.net.layer1.modules())  # the rest is folded


class _Branches(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.unused = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(3, 4, 3)
        self.describe = _ReturnsADict()

    def forward(self, inputs):
        return self.describe(self.stem(inputs))["map"]


class _ReturnsADict(torch.nn.Module):
    def forward(self, inputs):
        return {"map": inputs}


def test_a_layer_that_gives_no_feature_is_one_clear_error():
    inputs = torch.randn(1, 3, 16, 16)
    with pytest.raises(encoders.EncoderError, match="--layers unused: not run in this encoder's forward pass"):
        encoders.PooledLayers(_Branches(), ("stem", "unused"), "cls")(inputs)
    with pytest.raises(encoders.EncoderError, match="--layers describe: its output is a dict"):
        encoders.PooledLayers(_Branches(), ("describe",), "cls")(inputs)
    assert [b.shape for b in encoders.PooledLayers(_Branches(), ("stem",), "cls")(inputs)] == [(1, 4)]


def test_weights_tag_names_all_but_the_family_default():
    record = {"weights": "torchvision:IMAGENET1K_V2", "weights_sha256": ""}
    assert encoders.weights_tag(record, family_default=True) == ""
    assert encoders.weights_tag({"weights": "torchvision:IMAGENET1K_V1", "weights_sha256": ""},
                                family_default=False) == "imagenet1k_v1"
    assert encoders.weights_tag({"weights": "random(seed=0)", "weights_sha256": ""}, family_default=False) == "random"
    assert encoders.weights_tag({"weights": "file:chexpert.pth", "weights_sha256": "ab12cd34ef" + "0" * 54},
                                family_default=False) == "chexpert-ab12cd34"
    assert encoders.build_encoder("resnet18", weights="none", image_size=32).weights_tag == "random"
