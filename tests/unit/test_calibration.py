import numpy as np
import pytest

from edgeexport.calibration import load_calibration, split
from edgeexport.config import CalibrationConfig, ImagePreprocess, InputSpec
from edgeexport.errors import CalibrationError

SPEC = [InputSpec(name="x", shape=[1, 4])]


def _npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def test_split_is_deterministic_disjoint_and_sized():
    cfg = CalibrationConfig(samples=30, holdout=10, seed=3)
    a_cal, a_hold = split(100, cfg)
    b_cal, b_hold = split(100, cfg)
    assert (a_cal == b_cal).all() and (a_hold == b_hold).all()
    assert len(a_cal) == 30 and len(a_hold) == 10 and not set(a_cal) & set(a_hold)
    c_cal, _ = split(100, CalibrationConfig(samples=30, holdout=10, seed=4))
    assert not (c_cal == a_cal).all()
    d_cal, d_hold = split(1000, CalibrationConfig())
    assert len(d_hold) == 200 and len(d_cal) == 256


def test_fewer_samples_than_asked_for(tmp_path):
    with pytest.raises(CalibrationError, match="asked for 90 calibration samples but only 80"):
        split(100, CalibrationConfig(samples=90, holdout=20))
    with pytest.raises(CalibrationError, match="at least 2"):
        split(1, CalibrationConfig())
    with pytest.raises(CalibrationError, match="leaves no calibration samples"):
        split(10, CalibrationConfig(holdout=10))


def test_holdout_never_reaches_calibration(tmp_path):
    x = np.arange(50 * 4, dtype=np.float32).reshape(50, 4)
    cs = load_calibration(CalibrationConfig(path=_npz(tmp_path, x=x), holdout=10), SPEC)
    cal_rows = {tuple(f["x"][0]) for f in cs.calibration()}
    hold_rows = {tuple(f["x"][0]) for f in cs.holdout()}
    assert len(cal_rows) == 40 and len(hold_rows) == 10 and not cal_rows & hold_rows
    assert next(cs.calibration())["x"].shape == (1, 4)
    assert cs.summary()["sha256"] == load_calibration(CalibrationConfig(path=_npz(tmp_path, "e.npz", x=x)), SPEC).sha256


@pytest.mark.parametrize("arrays,match", [
    ({"y": np.zeros((5, 4), np.float32)}, "do not match the model inputs"),
    ({"x": np.zeros((5, 3), np.float32)}, "dimension 1 is 3 but the model needs 4"),
    ({"x": np.zeros((5,), np.float32)}, "expected rank"),
    ({"x": np.zeros((5, 4), np.complex64)}, "not done silently"),
    ({"x": np.array([[0, 0, 0, np.nan]] * 5, np.float32)}, "NaN or Inf in 5 sample"),
    ({"x": np.array([[0, 0, 0, np.inf]] + [[0, 0, 0, 0]] * 4, np.float32)}, "first at index 0"),
])
def test_mismatched_data_is_refused(tmp_path, arrays, match):
    with pytest.raises(CalibrationError, match=match):
        load_calibration(CalibrationConfig(path=_npz(tmp_path, **arrays)), SPEC)


def test_float64_is_cast_and_recorded(tmp_path):
    cs = load_calibration(CalibrationConfig(path=_npz(tmp_path, x=np.arange(20.0).reshape(5, 4)), min_holdout=1), SPEC)
    assert next(cs.holdout())["x"].dtype == np.float32
    assert any("float64 -> float32" in n for n in cs.summary()["notes"])


def test_labels_from_npz_and_count_check(tmp_path):
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    cs = load_calibration(CalibrationConfig(path=_npz(tmp_path, x=x, labels=np.arange(6)), holdout=2, min_holdout=2),
                          SPEC)
    assert cs.holdout_labels() is not None and len(cs.holdout_labels()) == 2
    with pytest.raises(CalibrationError, match="5 labels for 6 samples"):
        load_calibration(CalibrationConfig(path=_npz(tmp_path, "f.npz", x=x, labels=np.arange(5)), min_holdout=1), SPEC)


def test_pickled_data_is_never_loaded(tmp_path):
    path = tmp_path / "p.npy"
    np.save(path, np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    with pytest.raises(CalibrationError, match="never unpickles"):
        load_calibration(CalibrationConfig(path=str(path)), SPEC)


def test_garbage_and_missing_files(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(CalibrationError, match="not a numpy"):
        load_calibration(CalibrationConfig(path=str(bad)), SPEC)
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration(CalibrationConfig(path=str(tmp_path / "nope.npz")), SPEC)
    with pytest.raises(CalibrationError, match="unsupported file type"):
        (tmp_path / "d.csv").write_text("1,2")
        load_calibration(CalibrationConfig(path=str(tmp_path / "d.csv")), SPEC)


def test_no_data_is_an_error_not_random_data():
    with pytest.raises(CalibrationError) as e:
        load_calibration(CalibrationConfig(), SPEC)
    assert "synthetic" in e.value.fix


def test_synthetic_only_when_asked_and_flagged():
    cs = load_calibration(CalibrationConfig(path="synthetic:50"), SPEC)
    summary = cs.summary()
    assert summary["synthetic"] is True and summary["total_samples"] == 50
    assert any("SYNTHETIC" in n for n in summary["notes"])


def _write_digit_pngs(folder, n=12, mode="L"):
    from PIL import Image
    from sklearn.datasets import load_digits

    folder.mkdir()
    for i, img in enumerate(load_digits().images[:n]):
        Image.fromarray((img * 16).astype(np.uint8)).convert(mode).save(folder / f"{i:02d}.png")


def test_image_folder_with_preprocessing(tmp_path):
    _write_digit_pngs(tmp_path / "imgs")
    spec = [InputSpec(name="image", shape=[1, 1, 8, 8])]
    pre = ImagePreprocess(color="gray", scale=1 / 256, mean=[0.5], std=[0.5])
    cs = load_calibration(CalibrationConfig(path=str(tmp_path / "imgs"), preprocess=pre, holdout=2, min_holdout=2), spec)
    x = next(cs.holdout())["image"]
    assert x.shape == (1, 1, 8, 8) and x.dtype == np.float32 and -1.0 <= x.min() and x.max() <= 1.0
    assert cs.summary()["preprocess"]["size"] == [8, 8] and cs.summary()["kind"] == "images"
    # NHWC RGB at another size
    spec3 = [InputSpec(name="image", shape=[1, 16, 16, 3])]
    cs3 = load_calibration(CalibrationConfig(path=str(tmp_path / "imgs"), preprocess=ImagePreprocess(layout="nhwc"),
                                             min_holdout=1), spec3)
    assert next(cs3.calibration())["image"].shape == (1, 16, 16, 3)


def test_image_folder_errors(tmp_path):
    spec = [InputSpec(name="image", shape=[1, 1, 8, 8])]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no images found"):
        load_calibration(CalibrationConfig(path=str(tmp_path / "empty"), preprocess=ImagePreprocess(color="gray")), spec)
    _write_digit_pngs(tmp_path / "imgs", n=3)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(CalibrationError, match="cannot decode image .*broken.png"):
        load_calibration(CalibrationConfig(path=str(tmp_path / "imgs"), preprocess=ImagePreprocess(color="gray")), spec)
    with pytest.raises(CalibrationError, match="channel"):
        load_calibration(CalibrationConfig(path=str(tmp_path / "imgs")), spec)  # rgb into a 1-channel input


def test_separate_validation_source(tmp_path):
    cal = np.arange(40 * 4, dtype=np.float32).reshape(40, 4)
    val = -np.arange(1, 11 * 4 + 1, dtype=np.float32).reshape(11, 4)
    cfg = CalibrationConfig(path=_npz(tmp_path, "c.npz", x=cal), validation_path=_npz(tmp_path, "v.npz", x=val))
    cs = load_calibration(cfg, SPEC)
    assert all(f["x"].min() >= 0 for f in cs.calibration()) and all(f["x"].max() < 0 for f in cs.holdout())
    assert len(cs.calib_idx) == 40 and len(cs.holdout_idx) == 11
    assert cs.summary()["validation_source"].endswith("v.npz")
    with pytest.raises(CalibrationError, match="asked for 12 validation samples but the validation data has 11"):
        load_calibration(cfg.model_copy(update={"holdout": 12}), SPEC)


def test_image_glob_resize_shorter_and_center_crop(tmp_path):
    from PIL import Image

    from edgeexport.bundle.loader import preprocess_image

    (tmp_path / "g").mkdir()
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 255  # a white center block: after shorter-side resize to 10 and a 10x10 center crop, all white
    Image.fromarray(wide).save(tmp_path / "g" / "a.png")
    wide[9, 19] = 230  # a second, different image (identical samples are refused), still white enough
    Image.fromarray(wide).save(tmp_path / "g" / "b.png")
    (tmp_path / "g" / "notes.txt").write_text("not an image")
    pre = ImagePreprocess(resize_shorter=10)
    spec = [InputSpec(name="image", shape=[1, 3, 10, 10])]
    cs = load_calibration(CalibrationConfig(path=str(tmp_path / "g" / "*"), preprocess=pre, holdout=1, min_holdout=1),
                          spec)
    assert cs.num_samples == 2 and cs.summary()["preprocess"]["resize_shorter"] == 10
    x = next(cs.holdout())["image"]
    assert x.shape == (1, 3, 10, 10) and x.min() > 0.8  # only the white centre survived the crop
    # the device-side loader's preprocessing gives the very same array
    direct = preprocess_image(tmp_path / "g" / "a.png", cs.summary()["preprocess"])
    np.testing.assert_array_equal(direct, cs.data.arrays["image"][0])


def _whole_array_hash(arrays: dict) -> str:
    """The content hash as defined in the manifest docs, computed from whole in-memory arrays."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("layout", ["npy", "npz", "npz-compressed", "npy-fortran", "npy-float64"])
def test_stores_read_in_place_and_hash_like_whole_arrays(tmp_path, layout, monkeypatch):
    from edgeexport.calibration import store

    monkeypatch.setattr(store, "BLOCK_BYTES", 100)  # many small blocks: the scan must stitch them exactly
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 4)).astype(np.float64 if layout == "npy-float64" else np.float32)
    if layout.startswith("npy"):
        path = tmp_path / "x.npy"
        np.save(path, np.asfortranarray(x) if layout == "npy-fortran" else x)
    else:
        path = tmp_path / "x.npz"
        (np.savez_compressed if layout == "npz-compressed" else np.savez)(path, x=x)
    cs = load_calibration(CalibrationConfig(path=str(path), holdout=7, seed=1, min_holdout=7), SPEC)
    want = x.astype(np.float32)
    assert cs.sha256 == _whole_array_hash({"x": want})
    got = {int(i): f["x"] for i, f in zip(cs.calib_idx, cs.calibration())}
    assert len(got) == 30 and all(np.array_equal(v, want[i : i + 1]) for i, v in got.items())
    hold = np.concatenate([f["x"] for f in cs.holdout()])
    np.testing.assert_array_equal(hold, want[cs.holdout_idx])


def test_stores_refuse_truncated_and_foreign_data(tmp_path):
    x = np.zeros((50, 4), np.float32)
    np.save(tmp_path / "x.npy", x)
    data = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[: len(data) - 16])
    with pytest.raises(CalibrationError, match="shorter than its header says"):
        load_calibration(CalibrationConfig(path=str(tmp_path / "cut.npy")), SPEC)
    np.savez(tmp_path / "s.npz", x=x)
    data = (tmp_path / "s.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CalibrationError, match="cannot read"):
        load_calibration(CalibrationConfig(path=str(tmp_path / "cut.npz")), SPEC)
    np.save(tmp_path / "scalar.npy", np.float32(1))
    with pytest.raises(CalibrationError, match="single number"):
        load_calibration(CalibrationConfig(path=str(tmp_path / "scalar.npy")), SPEC)


def test_separate_validation_hash_covers_both_sources(tmp_path):
    a = np.arange(40, dtype=np.float32).reshape(10, 4)
    b = -np.arange(24, dtype=np.float32).reshape(6, 4)
    cs = load_calibration(CalibrationConfig(path=_npz(tmp_path, "a.npz", x=a),
                                            validation_path=_npz(tmp_path, "b.npz", x=b), min_holdout=6), SPEC)
    assert cs.sha256 == _whole_array_hash({"x": np.concatenate([a, b])})
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in cs.holdout()]), b[cs.holdout_idx - 10])


def test_decoded_images_are_cached_within_budget(tmp_path, monkeypatch):
    from edgeexport.calibration import store

    calls = []

    def decode(path):
        calls.append(path)
        return np.full((2, 2), int(path.stem), np.float32)

    files = [tmp_path / f"{i}.png" for i in range(6)]
    monkeypatch.setattr(store, "DECODED_CACHE_BYTES", 3 * 16)  # room for three decoded samples
    s = store.Decoded(files, decode)
    assert s.shape == (6, 2, 2) and len(calls) == 1
    first = s.rows(0, 6)
    assert [int(v) for v in first[:, 0, 0]] == list(range(6)) and len(calls) == 6
    s.rows(0, 6)
    assert len(calls) == 9  # samples 0-2 came from the cache, 3-5 were decoded again
    s.row(1)[:] = 99  # callers get copies: the cache cannot be changed through them
    assert s.row(1)[0, 0] == 1


def test_too_few_held_out_samples_are_refused_unless_accepted_knowingly(tmp_path):
    x = np.arange(40 * 4, dtype=np.float32).reshape(40, 4)
    with pytest.raises(CalibrationError, match="validation would use 8 held-out sample"):
        load_calibration(CalibrationConfig(path=_npz(tmp_path, x=x)), SPEC)
    assert len(load_calibration(CalibrationConfig(path=_npz(tmp_path, x=x), min_holdout=8), SPEC).holdout_idx) == 8


def test_identical_samples_are_refused(tmp_path):
    same = np.repeat(np.arange(4, dtype=np.float32)[None], 60, axis=0)
    with pytest.raises(CalibrationError, match="every sample of .* is identical"):
        load_calibration(CalibrationConfig(path=_npz(tmp_path, x=same)), SPEC)
