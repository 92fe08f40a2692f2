"""Model zoo: official names and shapes, the article's math, checkpoints, errors, summary."""

import json
import pathlib
import pickle
import urllib.error
import zipfile

import pytest
import torch
import torch.nn.functional as F

import scconv
from scconv.summary import count

OFFICIAL = json.loads(
    (pathlib.Path(__file__).parent / "data" / "official_state_dicts.json").read_text()
)
SCNETS = ["scnet50", "scnet101", "scnet50_v1d", "scnet101_v1d"]


@pytest.mark.parametrize("name", SCNETS)
def test_state_dict_keys_and_shapes_match_official(name):
    with torch.device("meta"):
        model = scconv.create_model(name)
    state = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(state) == list(OFFICIAL[name]["state_dict"])
    assert state == OFFICIAL[name]["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL[name]["params"]


def test_list_models_and_unknown_name():
    assert scconv.list_models() == sorted(SCNETS + ["resnet50", "resnet101"])
    with pytest.raises(ValueError, match=r"unknown model 'scnet42'.*resnet50.*scnet50"):
        scconv.create_model("scnet42")


def test_resnet_baselines_are_torchvision_modules():
    import torchvision

    model = scconv.create_model("resnet50")
    assert type(model) is torchvision.models.ResNet
    with pytest.raises(ValueError, match="resnet50 has no SC-Conv"):
        scconv.create_model("resnet50", gate="eager")


# --- An independent reference: the article's SCConv math written over a state dict ------------


def _conv_bn(x, sd, conv, bn, stride=1, padding=0, dilation=1):
    x = F.conv2d(x, sd[f"{conv}.weight"], stride=stride, padding=padding, dilation=dilation)
    return F.batch_norm(
        x,
        sd[f"{bn}.running_mean"],
        sd[f"{bn}.running_var"],
        sd[f"{bn}.weight"],
        sd[f"{bn}.bias"],
        training=False,
        eps=1e-5,
    )


def _reference_scnet(x, sd, layers, deep_stem, avg_down, avd):
    """SCNet forward (eval) from the paper/article equations, over the official key names."""
    if deep_stem:
        x = F.relu(_conv_bn(x, sd, "conv1.0", "conv1.1", stride=2, padding=1))
        x = F.relu(_conv_bn(x, sd, "conv1.3", "conv1.4", padding=1))
        x = F.relu(_conv_bn(x, sd, "conv1.6", "bn1", padding=1))
    else:
        x = F.relu(_conv_bn(x, sd, "conv1", "bn1", stride=2, padding=3))
    x = F.max_pool2d(x, 3, 2, 1)
    for stage, blocks in enumerate(layers, start=1):
        for i in range(blocks):
            p = f"layer{stage}.{i}"
            stride = 2 if (stage > 1 and i == 0) else 1
            use_avd = avd and i == 0 and stage > 1
            conv_stride = 1 if use_avd else stride
            a = F.relu(_conv_bn(x, sd, f"{p}.conv1_a", f"{p}.bn1_a"))
            b = F.relu(_conv_bn(x, sd, f"{p}.conv1_b", f"{p}.bn1_b"))
            a = F.relu(_conv_bn(a, sd, f"{p}.k1.0", f"{p}.k1.1", stride=conv_stride, padding=1))
            # SC-Conv: k4(k3(b) * sigmoid(b + up(k2(avgpool_4(b)))))
            k2 = _conv_bn(
                F.avg_pool2d(b, 4, 4), sd, f"{p}.scconv.k2.1", f"{p}.scconv.k2.2", padding=1
            )
            k3 = _conv_bn(b, sd, f"{p}.scconv.k3.0", f"{p}.scconv.k3.1", padding=1)
            gated = k3 * torch.sigmoid(b + F.interpolate(k2, size=b.shape[-2:], mode="nearest"))
            b = F.relu(
                _conv_bn(
                    gated, sd, f"{p}.scconv.k4.0", f"{p}.scconv.k4.1", stride=conv_stride, padding=1
                )
            )
            if use_avd:
                a, b = F.avg_pool2d(a, 3, stride, 1), F.avg_pool2d(b, 3, stride, 1)
            out = _conv_bn(torch.cat([a, b], 1), sd, f"{p}.conv3", f"{p}.bn3")
            if i == 0:
                if avg_down:
                    residual = F.avg_pool2d(
                        x, stride, stride, ceil_mode=True, count_include_pad=False
                    )
                    residual = _conv_bn(residual, sd, f"{p}.downsample.1", f"{p}.downsample.2")
                else:
                    residual = _conv_bn(
                        x, sd, f"{p}.downsample.0", f"{p}.downsample.1", stride=stride
                    )
            else:
                residual = x
            x = F.relu(out + residual)
    x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    return F.linear(x, sd["fc.weight"], sd["fc.bias"])


@pytest.mark.parametrize(
    "name, options",
    [
        ("scnet50", dict(layers=(3, 4, 6, 3), deep_stem=False, avg_down=False, avd=False)),
        ("scnet50_v1d", dict(layers=(3, 4, 6, 3), deep_stem=True, avg_down=True, avd=True)),
    ],
)
def test_eager_model_matches_independent_reference(name, options, perturb_batchnorm):
    torch.manual_seed(0)
    model = perturb_batchnorm(scconv.create_model(name, gate="eager", num_classes=10)).eval()
    x = torch.randn(2, 3, 128, 112)
    with torch.no_grad():
        out = model(x)
        expected = _reference_scnet(x, model.state_dict(), **options)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.std() > 1e-3  # a degenerate network would make the comparison vacuous


def test_forward_features_returns_four_stages():
    model = scconv.scnet50(gate="eager").eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, 128, 128))
    assert [tuple(f.shape) for f in features] == [
        (1, 256, 32, 32),
        (1, 512, 16, 16),
        (1, 1024, 8, 8),
        (1, 2048, 4, 4),
    ]


# --- Checkpoints ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_like_scnet():
    torch.manual_seed(1)
    model = scconv.scnet50(gate="eager", num_classes=7)
    from conftest import _perturb_batchnorm

    return _perturb_batchnorm(model, seed=3).eval()


def test_checkpoint_roundtrip_is_bit_identical(tmp_path, trained_like_scnet):
    path = tmp_path / "scnet50.pth"
    torch.save(trained_like_scnet.state_dict(), path)
    fresh = scconv.scnet50(weights=str(path), gate="eager", num_classes=7).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(fresh(x), trained_like_scnet(x))


@pytest.mark.parametrize(
    "wrap", ["ddp_prefix", "state_dict_key", "both", "model_key", "compile_prefix"]
)
def test_wrapped_checkpoints_load(tmp_path, trained_like_scnet, wrap):
    state = trained_like_scnet.state_dict()
    if wrap in ("ddp_prefix", "both"):
        state = {f"module.{k}": v for k, v in state.items()}
    if wrap == "compile_prefix":  # the state dict of a torch.compile'd model
        state = {f"_orig_mod.{k}": v for k, v in state.items()}
    checkpoint = {"state_dict": state, "epoch": 3} if wrap in ("state_dict_key", "both") else state
    if wrap == "model_key":
        checkpoint = {"model": state, "epoch": 3}
    path = tmp_path / "ckpt.pth"
    torch.save(checkpoint, path)
    fresh = scconv.create_model("scnet50", weights=str(path), num_classes=7)
    for k, v in trained_like_scnet.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_checkpoint_errors_name_model_and_keys(tmp_path, trained_like_scnet):
    state = dict(trained_like_scnet.state_dict())
    del state["layer1.0.conv1_a.weight"]
    state["layer9.extra"] = torch.zeros(1)
    with pytest.raises(
        ValueError,
        match=r"scnet50.*missing keys: layer1\.0\.conv1_a\.weight.*"
        r"unexpected keys: layer9\.extra",
    ):
        scconv.load_weights(scconv.scnet50(num_classes=7), state)
    # Wrong shapes: a 7-class checkpoint into a 1000-class model.
    with pytest.raises(
        ValueError, match=r"scnet50.*wrong shapes: fc\.weight \(checkpoint \(7, 2048\)"
    ):
        scconv.load_weights(scconv.scnet50(), trained_like_scnet.state_dict())
    # Another architecture's checkpoint.
    with pytest.raises(
        ValueError, match=r"checkpoint does not fit scnet50_v1d: missing keys: conv1\.0\.weight"
    ):
        scconv.load_weights(scconv.scnet50_v1d(num_classes=7), trained_like_scnet.state_dict())


class _NotATensor:
    pass


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """torch hub's cache in a fresh folder: downloads land in ``hub_dir / "checkpoints"``."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_official_weights_without_network_name_the_url(monkeypatch, hub_dir):
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    def gone(url, dst, *args, **kwargs):
        raise urllib.error.HTTPError(url, 404, "Not Found", None, None)

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(OSError, match=r"checkpoint of scnet50 from https://\S+: Name or service"):
        scconv.scnet50(weights="official")
    monkeypatch.setattr(torch.hub, "download_url_to_file", gone)
    with pytest.raises(OSError, match=r"from https://\S+: HTTP Error 404: Not Found"):
        scconv.scnet50(weights="official")


class _RunsCode:
    """Unpickling this calls ``pathlib.Path.touch`` on ``marker``: code run from a checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.fixture
def http_folder(tmp_path):
    """(folder, base URL): a folder served over HTTP on 127.0.0.1 for the test's duration."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "served"
    folder.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _no_download(url, *args, **kwargs):
    raise AssertionError(f"downloaded {url} again")


def test_weights_from_a_url_load_like_a_file(http_folder, hub_dir, tmp_path, monkeypatch):
    """A URL is downloaded into the hub cache and read weights-only, as a path is: a file that
    would run code is refused (and the code does not run), a file that is no checkpoint gets the
    same reasons, and a bad download is deleted from the cache. Two URLs ending in the same file
    name get a copy each; only files named like the official checkpoints are hash-checked."""
    folder, base = http_folder
    cache = hub_dir / "checkpoints"
    models = [scconv.scnet50(num_classes=3) for _ in range(2)]
    for index, model in enumerate(models):
        (folder / str(index)).mkdir()
        # "-0001." looks like a hash prefix: a user's file name is not hash-checked.
        torch.save(model.state_dict(), folder / str(index) / "weights-0001.pth")
    for index, model in enumerate(models):
        loaded = scconv.scnet50(num_classes=3, weights=f"{base}/{index}/weights-0001.pth")
        assert torch.equal(loaded.fc.weight, model.fc.weight)
    assert len(list(cache.glob("*-weights-0001.pth"))) == 2
    cached = sorted(p.name for p in cache.iterdir())
    with monkeypatch.context() as offline:  # a cached URL is read from the cache
        offline.setattr(torch.hub, "download_url_to_file", _no_download)
        loaded = scconv.scnet50(num_classes=3, weights=f"{base}/1/weights-0001.pth")
    assert torch.equal(loaded.fc.weight, models[1].fc.weight)

    marker = tmp_path / "code-ran"
    torch.save({"fc.weight": _RunsCode(marker)}, folder / "evil.pth")
    (folder / "page.pth").write_text("<html>not found</html>")
    for file, reason in (("evil.pth", "it holds Python objects that weights-only loading refuses"),
                         ("page.pth", "not a file written by torch.save")):  # fmt: skip
        with pytest.raises(ValueError, match=f"{file}.*not a readable torch checkpoint: {reason}"):
            scconv.scnet50(num_classes=3, weights=f"{base}/{file}")
    assert not marker.exists()
    with pytest.raises(OSError, match=r"from http://\S+/missing.pth: HTTP Error 404"):
        scconv.scnet50(num_classes=3, weights=f"{base}/missing.pth")
    with pytest.raises(ValueError, match="names no file"):
        scconv.scnet50(num_classes=3, weights=f"{base}/")

    # A file named like an official checkpoint, from any host, must match the hash in its name:
    # a mirror's other content never lands in the cache under the official name.
    official = scconv.models.OFFICIAL_URLS["scnet50"].rsplit("/", 1)[1]
    torch.save(models[0].state_dict(), folder / official)
    with pytest.raises(ValueError, match=rf"checkpoint of scnet50 from http://\S+/{official} is"):
        scconv.scnet50(num_classes=3, weights=f"{base}/{official}")
    assert sorted(p.name for p in cache.iterdir()) == cached  # bad downloads were not kept


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")  # torch's, on plain.pth
def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scconv.scnet50(weights=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth' does not exist"):
        scconv.scnet50(weights=tmp_path / "nope.pth")  # a pathlib.Path is a path too
    with pytest.raises(IsADirectoryError, match="is a directory"):
        scconv.scnet50(weights=tmp_path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint\x00\x01")
    with pytest.raises(ValueError, match="junk.pth.*not a readable torch checkpoint: not a file"):
        scconv.scnet50(weights=str(junk))
    # Each unreadable file says why, never torch's advice to load with weights_only=False.
    empty = tmp_path / "empty.pth"
    empty.touch()
    truncated = tmp_path / "truncated.pth"
    torch.save({"w": torch.ones(8)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    pickled_object = tmp_path / "object.pth"
    torch.save({"w": _NotATensor()}, pickled_object)
    plain_pickle = tmp_path / "plain.pth"
    plain_pickle.write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))
    one_byte = tmp_path / "one-byte.pth"  # a pickle's first byte and nothing after it
    one_byte.write_bytes(b"\x80")
    legacy = tmp_path / "legacy.pth"  # torch.save's old format (protocol 2 pickles), cut short
    torch.save({"w": torch.ones(8)}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:100])
    zeroed = tmp_path / "zeroed.pth"  # a torch.save archive whose pickle was overwritten
    torch.save({"w": torch.ones(8)}, zeroed)
    with zipfile.ZipFile(zeroed) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(zeroed, "w") as archive:
        for info, data in members:
            archive.writestr(info, bytes(len(data)) if info.filename.endswith("data.pkl") else data)
    for path, reason in [
        (empty, "the file is empty"),
        (truncated, "a damaged or truncated torch.save archive"),
        (pickled_object, "it holds Python objects that weights-only loading refuses.*_NotATensor"),
        (plain_pickle, "a pickle of protocol 4, not a file written by torch.save"),
        (zeroed, r"its pickled data is damaged \(Unsupported operand 0\)"),
        (one_byte, "a damaged or truncated torch.save file of the legacy format"),
        (legacy, "a damaged or truncated torch.save file of the legacy format"),
    ]:
        with pytest.raises(ValueError, match=f"not a readable torch checkpoint: {reason}") as info:
            scconv.scnet50(weights=str(path))
        assert "weights_only` set to `False`" not in str(info.value)
    no_tensors = tmp_path / "meta.pth"
    torch.save({"epoch": 3}, no_tensors)
    with pytest.raises(ValueError, match="scnet50: checkpoint holds no state dict"):
        scconv.scnet50(weights=str(no_tensors))
    with pytest.raises(ValueError, match="no official checkpoint for 'scnet101_v1d'"):
        scconv.scnet101_v1d(weights="official")


def test_too_small_input_names_smallest_size():
    model = scconv.scnet50(gate="eager").eval()
    assert model.min_input_size == 97
    with pytest.raises(
        ValueError, match=r"96x96 pixels is too small.*smallest input that works is 97x97"
    ):
        model(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match=r"128x32 pixels is too small"):
        model(torch.randn(1, 3, 128, 32))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 97, 97)).shape == (1, 1000)
    with pytest.raises(
        ValueError, match=r"SCConv input of spatial size \(3, 3\) is smaller than its pooling_r=4"
    ):
        scconv.SCConv(8, 8, 1, 1, 1, 1, pooling_r=4)(torch.randn(1, 8, 3, 3))


def test_dilated_variants_build_and_run():
    model = scconv.scnet50(dilated=True, gate="eager").eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, 128, 128))
    assert features[-1].shape[-1] == 16  # stages 3 and 4 keep stride 8
    with pytest.raises(ValueError, match="dilation must be 1, 2 or 4"):
        scconv.scnet50(dilation=3)
    # v1d's avd pools in the first block of every stage but layer1 (the official rule: stride 2,
    # or the first block of a dilated stage that keeps stride 1), and in no other block.
    with torch.device("meta"):
        layers = [getattr(scconv.scnet50_v1d(dilated=True), f"layer{i}") for i in (1, 2, 3, 4)]
    assert [layer[0].avd for layer in layers] == [False, True, True, True]
    assert not any(block.avd for layer in layers for block in layer[1:])


# --- Gate selection ----------------------------------------------------------------------------


def test_gate_names_repr_and_set_gate(monkeypatch):
    with pytest.raises(
        ValueError, match="unknown gate 'fast'; valid gates are eager, triton, auto"
    ):
        scconv.scnet50(gate="fast")
    monkeypatch.setenv("SCCONV_GATE", "triton")
    model = scconv.scnet50()
    assert {m.gate for m in model.modules() if isinstance(m, scconv.SCConv)} == {"triton"}
    assert "gate='triton'" in repr(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert scconv.set_gate(model, "eager") is model
    assert "gate='eager'" in repr(model) and "gate='triton'" not in repr(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="valid gates"):
        scconv.set_gate(model, "cuda")
    with pytest.raises(ValueError, match="has no SCConv modules"):
        scconv.set_gate(scconv.create_model("resnet50"), "eager")
    monkeypatch.setenv("SCCONV_GATE", "bogus")
    with pytest.raises(ValueError, match="SCCONV_GATE='bogus' is not a gate"):
        scconv.scnet50()


def test_auto_gate_runs_eager_on_cpu(monkeypatch):
    from scconv import gating

    x = torch.randn(2, 3, 8, 8)
    assert gating.resolve_gate("auto", x) == "eager"
    monkeypatch.delenv("SCCONV_GATE", raising=False)
    assert gating.default_gate() == "auto"
    # The functional dispatcher takes its default from SCCONV_GATE too.
    monkeypatch.setenv("SCCONV_GATE", "bogus")
    with pytest.raises(ValueError, match="SCCONV_GATE='bogus'"):
        scconv.sc_gate(x, x[..., :2, :2], x)


# --- Summary -------------------------------------------------------------------------------------

EXPECTED_SUMMARY = {
    "scnet50": (25.56, 3.93),
    "scnet50_v1d": (25.58, 4.69),
    "scnet101": (44.57, 7.17),
    "scnet101_v1d": (44.69, 9.04),
    "resnet50": (25.56, 4.09),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SUMMARY))
def test_summary_reproduces_paper_figures(name):
    row = count(name, 224)
    params, macs = EXPECTED_SUMMARY[name]
    assert abs(row["params_M"] - params) <= 0.01
    assert abs(row["GMACs"] - macs) <= 0.01


def test_summary_cli(capsys):
    from scconv.__main__ import main

    main(["summary", "scnet50", "resnet50"])
    out = capsys.readouterr().out
    assert "scnet50" in out and "25.56" in out and "3.93" in out and "4.09" in out
    for argv, message in [
        (["summary", "resnet18"], "unknown model(s) resnet18"),
        (["summary", "scnet50", "--size", "96"], "the smallest input that works is 97x97"),
        (["summary", "--size", "0"], "--size must be positive"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "python -m scconv summary: error:" in err, argv
        assert message in err, err


def test_summary_defaults_to_every_model_and_names_the_input():
    from scconv.summary import summary

    table = summary(size=128)
    assert list(table["model"]) == scconv.list_models()
    assert (table["input"] == "128x128").all()
