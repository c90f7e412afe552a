"""autohdr.data and the embedded fixture dataset: discovery, splits, decoding, dataset, loader, bad inputs."""

from __future__ import annotations

import re
from pathlib import Path
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, JpegImagePlugin

from autohdr import data as data_mod
from autohdr.data import (DataError, PairDataset, load_image, make_loader, prepare_overfit_split, read_split_csv,
                          scan_pairs, select_pairs, train_val_split, validate_pairs, write_split_csv)
from autohdr.data.dataset import DecodedImages
from autohdr.lens.geometry import PARAM_NAMES, brown_conrady_grid, folded_fraction, warp
from autohdr.lens.model import DEFAULT_PARAM_BOUNDS
from tests.helpers_data import copy_pairs, gradient_rgb, load_script, save, truncate, write_pair
from tests.plugins.data_fixtures import hash_tree
from tests.tolerances import assert_close

GT_COLUMNS = ["image_id", *PARAM_NAMES, "residual_max_px"]
#: Draft (DCT-domain 1/2) decode vs full decode + bilinear resize: mean |diff| per image. Measured on the
#: 72 fixture inputs at 128x128: mean 0.008, max 0.023 (textured crops); a wrong or shifted image is ~0.1.
DRAFT_MEAN_TOL = 0.03


def named(path) -> str:
    """A ``match=`` pattern for a path inside an error message."""
    return re.escape(str(path))


@pytest.fixture(scope="module")
def fixture_rows(fixture_root):
    return scan_pairs(fixture_root)


@pytest.fixture(scope="module")
def ground_truth(fixture_root):
    return pd.read_csv(fixture_root.parent / "ground_truth.csv", dtype={"image_id": str})


def masked_mae(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b).abs()[:, mask].mean().item()


# ----------------------------------------------------------------------------- the fixture dataset

class TestFixtureDataset:
    def test_layout(self, fixture_root):
        names = sorted(p.name for p in fixture_root.iterdir())
        assert all(re.fullmatch(r"p\d{3}_(original|generated)\.jpg", n) for n in names), names[:5]
        ids = {n.split("_")[0] for n in names}
        assert len(ids) >= 64 and len(names) == 2 * len(ids)
        assert (fixture_root.parent / "README.md").is_file()

    def test_size_is_small(self, fixture_root):
        total = sum(p.stat().st_size for p in fixture_root.parent.rglob("*") if p.is_file())
        assert total < 5e6, f"fixtures take {total / 1e6:.1f} MB"

    def test_ground_truth_columns_and_ids(self, ground_truth, fixture_rows):
        assert list(ground_truth.columns[: len(GT_COLUMNS)]) == GT_COLUMNS
        assert set(ground_truth.columns) - set(GT_COLUMNS) <= {"source"}
        assert sorted(ground_truth.image_id) == fixture_rows.image_id.tolist()
        assert not ground_truth.image_id.duplicated().any()

    def test_params_inside_model_bounds_and_k1_positive(self, ground_truth):
        for name, (lo, hi) in zip(PARAM_NAMES, DEFAULT_PARAM_BOUNDS):
            assert ground_truth[name].between(lo, hi).all(), name
        assert (ground_truth.k1 >= 0.12).all()

    def test_residual_share_and_size(self, ground_truth):
        residual = ground_truth.residual_max_px
        assert (residual >= 0).all()
        assert 0.2 <= (residual > 0).mean() <= 0.45
        assert residual[residual > 0].between(2.0, 5.0).all()

    def test_grids_do_not_fold(self, ground_truth):
        params = torch.tensor(ground_truth[list(PARAM_NAMES)].to_numpy(), dtype=torch.float64)
        assert folded_fraction(brown_conrady_grid(params, 64, 64)).item() == 0.0

    def test_images_are_256_rgb_and_input_differs(self, fixture_rows):
        for row in fixture_rows.iloc[::9].itertuples():
            inp, tgt = load_image(row.input_path), load_image(row.target_path)
            assert inp.shape == tgt.shape == (3, 256, 256)
            assert (inp - tgt).abs().mean().item() > 0.01, row.image_id

    def test_gt_params_correct_the_parametric_pairs(self, fixture_rows, ground_truth):
        rows = fixture_rows.set_index("image_id")
        ratios = []
        for gt in ground_truth[ground_truth.residual_max_px == 0].itertuples():
            inp, tgt = load_image(rows.at[gt.image_id, "input_path"]), load_image(rows.at[gt.image_id, "target_path"])
            params = torch.tensor([[getattr(gt, n) for n in PARAM_NAMES]], dtype=torch.float32)
            grid = brown_conrady_grid(params, 256, 256)
            valid = (grid[0].abs() <= 1.0 - 2.0 / 255.0).all(-1)   # 1 px inside the input frame
            corrected = warp(inp[None], grid)[0]
            ratio = masked_mae(corrected, tgt, valid) / masked_mae(inp, tgt, valid)
            assert ratio < 0.5, f"{gt.image_id}: corrected/uncorrected error ratio {ratio:.2f}"
            ratios.append(ratio)
        assert len(ratios) >= 40 and np.mean(ratios) < 0.25


class TestRegeneration:
    def test_same_seed_same_bytes(self, tmp_path):
        gen = load_script("make_fixture_dataset")
        for name in ("a", "b"):
            gen.generate(tmp_path / name, seed=0, pairs=2, check=0, log=lambda _: None)
        assert hash_tree(tmp_path / "a") == hash_tree(tmp_path / "b")
        assert sorted(p.name for p in (tmp_path / "a" / "pairs").iterdir()) == [
            "p000_generated.jpg", "p000_original.jpg", "p001_generated.jpg", "p001_original.jpg"]

    def test_other_seed_other_data(self, tmp_path):
        gen = load_script("make_fixture_dataset")
        gen.generate(tmp_path / "s0", seed=0, pairs=1, check=0, log=lambda _: None)
        gen.generate(tmp_path / "s1", seed=1, pairs=1, check=0, log=lambda _: None)
        assert hash_tree(tmp_path / "s0") != hash_tree(tmp_path / "s1")

    def test_matches_the_embedded_fixtures(self, tmp_path, fixture_root, ground_truth):
        """Pair i depends on (seed, i) only, so 2 regenerated pairs equal the first 2 stored ones."""
        gen = load_script("make_fixture_dataset")
        table = gen.generate(tmp_path, seed=0, pairs=2, check=0, log=lambda _: None)
        for image_id in ("p000", "p001"):
            for tag in ("original", "generated"):
                new = load_image(tmp_path / "pairs" / f"{image_id}_{tag}.jpg")
                old = load_image(fixture_root / f"{image_id}_{tag}.jpg")
                assert (new - old).abs().mean().item() < 1.0 / 255.0, (image_id, tag)
        stored = ground_truth.set_index("image_id").loc[["p000", "p001"], list(PARAM_NAMES)].to_numpy()
        np.testing.assert_allclose(table[list(PARAM_NAMES)].to_numpy(), stored, rtol=1e-8)


# ----------------------------------------------------------------------------- discovery and splits

class TestScanPairs:
    def test_fixture_pairs(self, fixture_rows, fixture_root):
        assert list(fixture_rows.columns) == ["image_id", "input_path", "target_path"]
        assert fixture_rows.image_id.is_monotonic_increasing and len(fixture_rows) >= 64
        first = fixture_rows.iloc[0]
        assert first.input_path == str(fixture_root / f"{first.image_id}_original.jpg")
        assert first.target_path == str(fixture_root / f"{first.image_id}_generated.jpg")

    def test_extensions_and_hidden_files(self, tmp_path):
        write_pair(tmp_path, "b", ext=".png")
        write_pair(tmp_path, "a", ext=".JPEG")
        (tmp_path / "._c_original.jpg").write_bytes(b"AppleDouble")
        (tmp_path / "notes.txt").write_text("x")
        rows = scan_pairs(tmp_path)
        assert rows.image_id.tolist() == ["a", "b"]
        assert rows.target_path[1].endswith("b_generated.png")

    def test_missing_root(self, tmp_path):
        with pytest.raises(DataError, match=named(tmp_path / "nope") + ".*does not exist"):
            scan_pairs(tmp_path / "nope")

    def test_root_is_a_file(self, tmp_path):
        (tmp_path / "f.jpg").write_bytes(b"x")
        with pytest.raises(DataError, match=named(tmp_path / "f.jpg") + ".*not a folder"):
            scan_pairs(tmp_path / "f.jpg")

    def test_empty_folder(self, tmp_path):
        with pytest.raises(DataError, match=f"no pairs found in data root {named(tmp_path)}"):
            scan_pairs(tmp_path)

    def test_parent_folder_hint(self, tmp_path):
        write_pair(tmp_path / "pairs", "a")
        with pytest.raises(DataError, match="no pairs found.*subfolders pairs"):
            scan_pairs(tmp_path)

    def test_missing_target_names_the_expected_file(self, tmp_path):
        write_pair(tmp_path, "a")
        save(gradient_rgb(), tmp_path / "b_original.jpg")
        with pytest.raises(DataError, match="without a target file: b_original.jpg.*" + named(tmp_path / "b_generated")):
            scan_pairs(tmp_path)

    def test_two_inputs_for_one_id(self, tmp_path):
        write_pair(tmp_path, "a")
        save(gradient_rgb(), tmp_path / "a_original.png")
        with pytest.raises(DataError, match="more than one file.*a_original"):
            scan_pairs(tmp_path)

    def test_target_without_input_warns(self, tmp_path):
        write_pair(tmp_path, "a")
        save(gradient_rgb(), tmp_path / "z_generated.jpg")
        with pytest.warns(UserWarning, match="z_generated.jpg"):
            assert scan_pairs(tmp_path).image_id.tolist() == ["a"]

    def test_does_not_write(self, immutable_data_root):
        scan_pairs(immutable_data_root)
        validate_pairs(scan_pairs(immutable_data_root))


class TestSplitCsv:
    def test_round_trip(self, fixture_rows, tmp_path):
        path = write_split_csv(fixture_rows.iloc[:5], tmp_path / "sub" / "split.csv")
        pd.testing.assert_frame_equal(read_split_csv(path), fixture_rows.iloc[:5].reset_index(drop=True))

    def test_ids_stay_strings(self, tmp_path):
        inp, tgt = write_pair(tmp_path, "007")
        path = write_split_csv(scan_pairs(tmp_path), tmp_path / "s.csv")
        assert read_split_csv(path).image_id.tolist() == ["007"]

    def test_relative_paths_resolve_against_the_csv(self, tmp_path):
        write_pair(tmp_path / "img", "a")
        (tmp_path / "s.csv").write_text("image_id,input_path,target_path\na,img/a_original.jpg,img/a_generated.jpg\n")
        assert read_split_csv(tmp_path / "s.csv").input_path[0] == str(tmp_path / "img" / "a_original.jpg")

    def test_missing_columns(self, tmp_path):
        path = tmp_path / "bad.csv"
        path.write_text("image_id,input_path\na,x.jpg\n")
        with pytest.raises(DataError, match=named(path) + r" is missing column\(s\) \['target_path'\]"):
            read_split_csv(path)

    def test_duplicate_ids(self, fixture_rows, tmp_path):
        rows = pd.concat([fixture_rows.iloc[:3], fixture_rows.iloc[[1]]])
        path = write_split_csv(rows, tmp_path / "dup.csv")
        with pytest.raises(DataError, match=named(path) + r" has duplicate image_id\(s\): p001"):
            read_split_csv(path)

    def test_missing_files(self, tmp_path):
        inp, tgt = write_pair(tmp_path, "a")
        path = write_split_csv(scan_pairs(tmp_path), tmp_path / "s.csv")
        tgt.unlink()
        with pytest.raises(DataError, match=r"references 1 file\(s\) that do not exist: " + named(tgt)):
            read_split_csv(path)

    def test_empty_and_header_only(self, tmp_path):
        (tmp_path / "empty.csv").write_text("")
        with pytest.raises(DataError, match="empty.csv cannot be parsed"):
            read_split_csv(tmp_path / "empty.csv")
        (tmp_path / "header.csv").write_text("image_id,input_path,target_path\n")
        with pytest.raises(DataError, match="header.csv has no rows"):
            read_split_csv(tmp_path / "header.csv")

    def test_missing_csv(self, tmp_path):
        with pytest.raises(DataError, match="split CSV .*nope.csv does not exist"):
            read_split_csv(tmp_path / "nope.csv")

    def test_write_refuses_missing_columns(self, tmp_path):
        with pytest.raises(DataError, match=r"missing column\(s\) \['input_path', 'target_path'\]"):
            write_split_csv(pd.DataFrame({"image_id": ["a"]}), tmp_path / "s.csv")


class TestTrainValSplit:
    def test_disjoint_cover_and_seeded(self, fixture_rows):
        train, val = train_val_split(fixture_rows, 0.2, seed=0)
        assert len(val) == round(0.2 * len(fixture_rows))
        assert set(train.image_id).isdisjoint(val.image_id)
        assert sorted([*train.image_id, *val.image_id]) == fixture_rows.image_id.tolist()
        again = train_val_split(fixture_rows, 0.2, seed=0)[1]
        assert again.image_id.tolist() == val.image_id.tolist()
        assert train_val_split(fixture_rows, 0.2, seed=1)[1].image_id.tolist() != val.image_id.tolist()

    @pytest.mark.parametrize("n, expected_val", [(1, 0), (2, 1), (3, 1), (10, 2)])
    def test_small_tables(self, fixture_rows, n, expected_val):
        train, val = train_val_split(fixture_rows.iloc[:n], 0.2, seed=0)
        assert (len(train), len(val)) == (n - expected_val, expected_val)

    @pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, float("nan")])
    def test_bad_fraction(self, fixture_rows, frac):
        with pytest.raises(ValueError, match="val_frac must be strictly between 0 and 1"):
            train_val_split(fixture_rows, frac, seed=0)

    def test_empty(self, fixture_rows):
        with pytest.raises(DataError, match="empty"):
            train_val_split(fixture_rows.iloc[:0], 0.2, seed=0)


class TestSelectAndPrepare:
    def test_first_n_and_shuffled(self, fixture_rows):
        assert select_pairs(fixture_rows, 4).image_id.tolist() == ["p000", "p001", "p002", "p003"]
        shuffled = select_pairs(fixture_rows, 4, seed=5, shuffle=True).image_id.tolist()
        assert shuffled == sorted(shuffled) and shuffled != ["p000", "p001", "p002", "p003"]
        assert select_pairs(fixture_rows, 4, seed=5, shuffle=True).image_id.tolist() == shuffled

    def test_prepare_writes_identical_splits(self, immutable_data_root, tmp_path):
        count = min(6, len(scan_pairs(immutable_data_root)))
        report = prepare_overfit_split(immutable_data_root, tmp_path, count)
        train, val = read_split_csv(report["train_split"]), read_split_csv(report["val_split"])
        pd.testing.assert_frame_equal(train, val)
        assert report["num_pairs_written"] == count and report["note"] is None

    def test_refuses_out_dir_inside_data_root(self, fixture_root, tmp_path):
        root = copy_pairs(fixture_root, tmp_path / "data", 2)
        before = hash_tree(root)
        with pytest.raises(DataError, match="inside the data root"):
            prepare_overfit_split(root, root / "splits", 2)
        assert hash_tree(root) == before

    def test_rejects_bad_pairs_before_writing(self, tmp_path):
        write_pair(tmp_path / "data", "a", size=(32, 48), target_size=(30, 40))
        with pytest.raises(DataError, match="sizes differ"):
            prepare_overfit_split(tmp_path / "data", tmp_path / "out", 2)
        assert not (tmp_path / "out" / "train_split.csv").exists()

    def test_overfit_split_fixture(self, make_overfit_split, data_root):
        count = min(8, len(scan_pairs(data_root)))
        split = make_overfit_split(count, (64, 64))
        assert split is make_overfit_split(count, (64, 64))
        assert split.train_csv.read_bytes() == split.val_csv.read_bytes()
        assert len(split.rows) == count and split.resize_hw == (64, 64)
        batch = next(iter(make_loader(PairDataset(split.rows, split.resize_hw), 4, False, 0, 0)))
        assert batch["input_image"].shape == (min(4, count), 3, 64, 64)  # any stored size or aspect ratio


# ----------------------------------------------------------------------------- decoding

class TestLoadImage:
    def test_shape_dtype_range(self, fixture_rows):
        image = load_image(fixture_rows.input_path[0])
        assert image.shape == (3, 256, 256) and image.dtype == torch.float32
        assert 0.0 <= image.min().item() and image.max().item() <= 1.0 and image.std().item() > 0.02

    def test_resize(self, fixture_rows):
        assert load_image(fixture_rows.input_path[0], (96, 128)).shape == (3, 96, 128)
        assert load_image(fixture_rows.input_path[0], [128, 128]).shape == (3, 128, 128)

    def test_draft_close_to_full_decode(self, fixture_rows):
        for path in fixture_rows.input_path:
            fast, full = load_image(path, (128, 128), draft=True), load_image(path, (128, 128), draft=False)
            assert fast.shape == full.shape == (3, 128, 128)
            assert (fast - full).abs().mean().item() < DRAFT_MEAN_TOL, path

    def test_draft_asks_the_jpeg_decoder(self, fixture_rows, monkeypatch):
        calls = []
        original = JpegImagePlugin.JpegImageFile.draft

        def spy(self, mode, size, *args, **kwargs):
            calls.append((mode, size))
            return original(self, mode, size, *args, **kwargs)

        monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
        load_image(fixture_rows.input_path[0], (64, 96))
        assert calls == [("RGB", (96, 64))]
        load_image(fixture_rows.input_path[0], (64, 96), draft=False)
        load_image(fixture_rows.input_path[0])
        assert len(calls) == 1

    def test_large_jpeg_with_draft(self, tmp_path):
        path = save(gradient_rgb(1024, 1024), tmp_path / "big.jpg", quality=90)
        fast, full = load_image(path, (128, 128)), load_image(path, (128, 128), draft=False)
        assert fast.shape == (3, 128, 128)
        assert (fast - full).abs().mean().item() < DRAFT_MEAN_TOL

    @pytest.mark.parametrize("ext", [".png", ".jpg"])
    def test_grayscale_converted(self, tmp_path, ext):
        gray = gradient_rgb()[..., 0]
        image = load_image(save(gray, tmp_path / f"g{ext}"))
        assert image.shape == (3, 32, 48)
        assert_close(image[0], image[1])
        assert_close(image[0], image[2])
        if ext == ".png":
            assert_close(image[0], torch.from_numpy(gray).float() / 255.0)

    def test_rgba_converted(self, tmp_path):
        rgb = gradient_rgb()
        rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], -1)
        image = load_image(save(rgba, tmp_path / "a.png"))
        assert_close(image, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0)

    def test_palette_with_transparency_converted_without_warning(self, tmp_path):
        img = Image.fromarray(gradient_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        img.info["transparency"] = 0
        path = tmp_path / "p.png"
        img.save(path, transparency=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert load_image(path).shape == (3, 32, 48)

    def test_16_bit_png_scaled_to_unit_range(self, tmp_path):
        values = np.array([[0, 1000, 32768, 65535]] * 4, dtype=np.uint16)
        path = save(values, tmp_path / "deep.png")
        with Image.open(path) as img:
            assert img.mode.startswith("I")   # PIL sees a 16-bit image, not 8-bit
        image = load_image(path)
        expected = torch.tensor([0.0, 1000 / 65535, 32768 / 65535, 1.0]).expand(4, 4)
        for channel in image:
            assert_close(channel, expected)

    def test_16_bit_png_resized(self, tmp_path):
        path = save(np.full((64, 64), 40000, np.uint16), tmp_path / "flat16.png")
        image = load_image(path, (16, 16))
        assert image.shape == (3, 16, 16)
        assert_close(image, torch.full((3, 16, 16), 40000 / 65535))

    def test_corrupt_jpeg(self, tmp_path):
        path = tmp_path / "x_original.jpg"
        path.write_bytes(b"this is not a jpeg" * 20)
        with pytest.raises(DataError, match=named(path) + " cannot be decoded"):
            load_image(path)

    def test_truncated_jpeg(self, fixture_rows, tmp_path):
        path = truncate(Path(fixture_rows.input_path[0]), tmp_path / "half_original.jpg")
        for resize in (None, (128, 128)):
            with pytest.raises(DataError, match=named(path) + ".*truncated"):
                load_image(path, resize)

    def test_missing_file(self, tmp_path):
        with pytest.raises(DataError, match=named(tmp_path / "gone.jpg") + " does not exist"):
            load_image(tmp_path / "gone.jpg")

    @pytest.mark.parametrize("resize", [(0, 8), (8,), (8, 8, 8)])
    def test_bad_resize(self, fixture_rows, resize):
        with pytest.raises(ValueError, match="resize_hw must be None or"):
            load_image(fixture_rows.input_path[0], resize)


# ----------------------------------------------------------------------------- dataset and loader

class TestPairDataset:
    def test_item(self, fixture_rows):
        item = PairDataset(fixture_rows.iloc[:3], (128, 128))[1]
        assert set(item) == {"input_image", "target_image", "image_id", "input_path", "target_path"}
        assert item["input_image"].shape == item["target_image"].shape == (3, 128, 128)
        assert item["input_image"].dtype == torch.float32
        assert item["image_id"] == "p001" and item["target_path"] == fixture_rows.target_path[1]

    def test_full_size_and_negative_index(self, fixture_rows):
        dataset = PairDataset(fixture_rows.iloc[:3])
        assert len(dataset) == 3 and dataset[-1]["image_id"] == "p002"
        assert dataset[0]["input_image"].shape == (3, 256, 256)
        with pytest.raises(IndexError):
            dataset[3]

    def test_hflip_flips_both_images(self, fixture_rows):
        rows = fixture_rows.iloc[:16]
        plain, flipping = PairDataset(rows, (64, 64)), PairDataset(rows, (64, 64), hflip=True, seed=3)
        flips = []
        for i in range(len(rows)):
            a, b = plain[i], flipping[i]
            flipped = flipping.flipped(i)
            flips.append(flipped)
            for key in ("input_image", "target_image"):
                expected = a[key].flip(-1) if flipped else a[key]
                assert torch.equal(b[key], expected), (i, key, flipped)
        assert 0 < sum(flips) < len(flips)

    def test_hflip_seeded_per_epoch(self, fixture_rows):
        a, b = (PairDataset(fixture_rows.iloc[:16], hflip=True, seed=3) for _ in range(2))
        pattern = [a.flipped(i) for i in range(16)]
        assert pattern == [b.flipped(i) for i in range(16)]
        a.set_epoch(1)
        assert [a.flipped(i) for i in range(16)] != pattern
        assert not any(PairDataset(fixture_rows.iloc[:16]).flipped(i) for i in range(16))

    @pytest.mark.parametrize("resize", [None, (16, 16)])
    def test_size_mismatch_names_both_files(self, tmp_path, resize):
        inp, tgt = write_pair(tmp_path, "a", size=(32, 48), target_size=(30, 40))
        with pytest.raises(DataError, match=f"{named(inp)} \\(48x32\\) and {named(tgt)} \\(40x30\\).*sizes differ"):
            PairDataset(scan_pairs(tmp_path), resize)[0]

    def test_truncated_file_raises_data_error(self, fixture_rows, tmp_path):
        rows = fixture_rows.iloc[:2].copy()
        bad = truncate(Path(rows.target_path[1]), tmp_path / "p001_generated.jpg")
        rows.loc[1, "target_path"] = str(bad)
        dataset = PairDataset(rows, (128, 128))
        dataset[0]
        with pytest.raises(DataError, match=named(bad) + ".*truncated"):
            dataset[1]
        with pytest.raises(DataError, match=named(bad)):
            list(make_loader(dataset, 2, False, 0, 0))

    def test_bad_tables(self, fixture_rows):
        with pytest.raises(DataError, match="at least one pair"):
            PairDataset(fixture_rows.iloc[:0])
        with pytest.raises(DataError, match=r"missing column\(s\) \['target_path'\]"):
            PairDataset(fixture_rows[["image_id", "input_path"]])


class TestDecodedImages:
    def test_items_are_those_decoded_each_time_and_each_file_is_decoded_once(self, fixture_rows, monkeypatch):
        rows = fixture_rows.iloc[:6]
        expected = [PairDataset(rows, (64, 64))[i] for i in range(len(rows))]
        decoded = DecodedImages(1 << 20)
        kept = PairDataset(rows, (64, 64), decoded=decoded)
        decoded_paths = []
        real = data_mod.dataset._decode
        monkeypatch.setattr(data_mod.dataset, "_decode", lambda *a, **k: decoded_paths.append(a[0]) or real(*a, **k))
        for _ in range(3):
            for i in range(len(rows)):
                for key in ("input_image", "target_image"):
                    assert torch.equal(kept[i][key], expected[i][key]), (i, key)
        assert sorted(decoded_paths) == sorted([*rows.input_path, *rows.target_path])  # once each
        assert len(decoded) == 12 and decoded.held_bytes == 12 * 3 * 64 * 64 * 4

    def test_flips_still_change_per_epoch(self, fixture_rows):
        rows = fixture_rows.iloc[:16]
        plain = PairDataset(rows, (64, 64), hflip=True, seed=3)
        kept = PairDataset(rows, (64, 64), hflip=True, seed=3, decoded=DecodedImages(1 << 30))
        for epoch in (0, 1):
            plain.set_epoch(epoch), kept.set_epoch(epoch)
            for i in range(len(rows)):
                assert torch.equal(kept[i]["input_image"], plain[i]["input_image"]), (epoch, i)

    def test_past_its_bound_images_are_decoded_each_time(self, fixture_rows):
        one_image = 3 * 64 * 64 * 4
        decoded = DecodedImages(3 * one_image)
        dataset = PairDataset(fixture_rows.iloc[:4], (64, 64), decoded=decoded)
        for i in range(4):
            dataset[i]
        assert len(decoded) == 3 and decoded.held_bytes == 3 * one_image
        assert torch.equal(dataset[3]["target_image"], PairDataset(fixture_rows.iloc[:4], (64, 64))[3]["target_image"])
        with pytest.raises(ValueError, match="max_bytes must be >= 0, got -1"):
            DecodedImages(-1)

    def test_debug_loaders_share_one_memory_between_train_and_val(self, fixture_rows):
        from autohdr.runs.debug import build_loaders
        from autohdr.runs.presets import load_preset
        data = load_preset("overfit_stage1").data
        train, val = build_loaders(fixture_rows.iloc[:8], fixture_rows.iloc[:8], data, seed=0)
        assert train.dataset.decoded is val.dataset.decoded is not None
        list(train)
        held = len(train.dataset.decoded)
        list(val)
        assert held == 16 and len(val.dataset.decoded) == 16  # val found every pair already decoded


class TestValidatePairs:
    def test_fixture_rows_pass(self, fixture_rows):
        assert validate_pairs(fixture_rows) == len(fixture_rows)
        assert validate_pairs(fixture_rows, max_check=5) == 5

    def test_lists_every_problem(self, tmp_path):
        write_pair(tmp_path, "a")                                                   # fine
        _, missing = write_pair(tmp_path, "b")
        small_in, small_tgt = write_pair(tmp_path, "c", size=(32, 48), target_size=(16, 16))
        corrupt, _ = write_pair(tmp_path, "d")
        truncated, _ = write_pair(tmp_path, "e", size=(128, 128))
        rows = scan_pairs(tmp_path)
        missing.unlink()
        corrupt.write_bytes(b"garbage" * 50)
        truncate(truncated, truncated)
        with pytest.raises(DataError) as info:
            validate_pairs(rows)
        message = str(info.value)
        assert message.startswith("4 problem(s) in 5 checked pair(s)")
        assert f"{missing}: target file of b does not exist" in message
        assert f"{small_in} (48x32) and {small_tgt} (16x16): input and target sizes differ for c" in message
        assert f"{corrupt}: input of d cannot be read" in message
        assert f"{truncated}: input of e: no JPEG end marker" in message
        assert validate_pairs(rows, max_check=1) == 1

    def test_decode_finds_a_garbled_body(self, fixture_rows, tmp_path):
        data = bytearray(Path(fixture_rows.input_path[0]).read_bytes())
        data[3000:3004] = b"\xff\xc0\x00\x11"   # a frame marker inside the scan data; header and EOI intact
        write_pair(tmp_path, "a", size=(256, 256))
        (tmp_path / "a_original.jpg").write_bytes(bytes(data))
        rows = scan_pairs(tmp_path)
        validate_pairs(rows)
        with pytest.raises(DataError, match="a_original.jpg: input of a cannot be read"):
            validate_pairs(rows, decode=True)

    def test_duplicate_ids(self, fixture_rows):
        with pytest.raises(DataError, match=r"duplicate image_id\(s\): p000"):
            validate_pairs(pd.concat([fixture_rows.iloc[:2], fixture_rows.iloc[:1]]))


class TestMakeLoader:
    def test_batches(self, fixture_rows):
        loader = make_loader(PairDataset(fixture_rows.iloc[:6], (64, 64)), 4, False, 0, 0)
        batches = list(loader)
        assert [b["input_image"].shape for b in batches] == [(4, 3, 64, 64), (2, 3, 64, 64)]
        assert batches[0]["image_id"] == ["p000", "p001", "p002", "p003"]
        assert isinstance(batches[1]["target_path"], list)

    def test_seeded_shuffle(self, fixture_rows):
        dataset = PairDataset(fixture_rows.iloc[:12], (32, 32))

        def order(seed):
            return [i for b in make_loader(dataset, 4, True, 0, seed) for i in b["image_id"]]

        assert order(0) == order(0)
        assert order(0) != order(1)
        assert sorted(order(0)) == fixture_rows.image_id[:12].tolist()

    def test_workers(self, fixture_rows):
        loader = make_loader(PairDataset(fixture_rows.iloc[:4], (32, 32)), 2, False, 2, 0)
        assert [i for b in loader for i in b["image_id"]] == ["p000", "p001", "p002", "p003"]

    def test_bad_arguments(self, fixture_rows):
        with pytest.raises(ValueError, match="batch_size must be >= 1"):
            make_loader(PairDataset(fixture_rows.iloc[:2]), 0, False, 0, 0)


# ----------------------------------------------------------------------------- the overfit mode on your data

@pytest.mark.overfit_stage1
def test_the_overfit_mode_on_your_data_is_all_good(immutable_data_root, pytestconfig, tmp_path, capsys):
    """``pytest --data-root=DIR -m overfit_stage1`` (or ``-m data_root``): the overfit mode's preset on your
    data, judged with its signals, must end ALL GOOD. On the embedded fixtures the shared debug runs
    already do this (tests/test_diagnostics.py), so without a data root of your own it is skipped."""
    from autohdr import cli
    from tests.plugins.data_fixtures import user_data_root
    if user_data_root(pytestconfig) is None:
        pytest.skip("runs on your data only: pass --data-root=DIR (the fixtures' overfit run is the shared one)")
    code = cli.main(["debug", "overfit_stage1", "--data-root", str(immutable_data_root), "--out",
                     str(tmp_path / "run"), "--device", "cpu", "--no-plots"])
    out = capsys.readouterr().out
    assert code == cli.EXIT_OK, f"the overfit mode on {immutable_data_root} is not all good:\n{out}"
