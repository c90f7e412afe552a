"""autohdr.data.settings: DataSettings from the environment, the KMP variable, the fixture root."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from autohdr.data import settings as settings_mod
from autohdr.runs.debug import resolve_preset
from autohdr.runs.presets import load_preset
from autohdr.data.settings import ENV_VARS, DataSettings, default_fixture_root, ensure_kmp_duplicate_lib_ok


class TestDataSettings:
    def test_defaults(self):
        s = DataSettings.from_env({})
        assert s == DataSettings()
        assert (s.data_root, s.split_dir, s.num_workers, s.batch_size, s.resize_hw, s.val_frac, s.split_seed,
                s.max_pairs) == (None, None, 0, 8, (128, 128), 0.2, 0, None)

    @pytest.mark.parametrize("var, raw, expected", [
        ("AUTOHDR_DATA_ROOT", "/data/pairs", Path("/data/pairs")),
        ("AUTOHDR_SPLIT_DIR", "splits", Path("splits")),
        ("AUTOHDR_NUM_WORKERS", "4", 4),
        ("AUTOHDR_BATCH_SIZE", " 16 ", 16),
        ("AUTOHDR_RESIZE_HW", "96,128", (96, 128)),
        ("AUTOHDR_RESIZE_HW", " 64 , 32 ", (64, 32)),
        ("AUTOHDR_RESIZE_HW", "none", None),
        ("AUTOHDR_VAL_FRAC", "0.25", 0.25),
        ("AUTOHDR_SPLIT_SEED", "7", 7),
        ("AUTOHDR_MAX_PAIRS", "48", 48),
    ])
    def test_each_variable(self, var, raw, expected):
        s = DataSettings.from_env({var: raw})
        assert getattr(s, ENV_VARS[var]) == expected
        others = {f.name for f in dataclasses.fields(DataSettings)} - {ENV_VARS[var]}
        assert all(getattr(s, name) == getattr(DataSettings(), name) for name in others)

    def test_every_field_has_a_variable(self):
        assert sorted(ENV_VARS.values()) == sorted(f.name for f in dataclasses.fields(DataSettings))

    def test_data_root_expands_user(self):
        assert DataSettings.from_env({"AUTOHDR_DATA_ROOT": "~/pairs"}).data_root == Path("~/pairs").expanduser()

    def test_blank_means_unset(self):
        assert DataSettings.from_env({var: "  " for var in ENV_VARS}) == DataSettings()

    @pytest.mark.parametrize("var, raw, expected", [
        ("AUTOHDR_NUM_WORKERS", "-1", "integer >= 0"),
        ("AUTOHDR_NUM_WORKERS", "two", "integer >= 0"),
        ("AUTOHDR_BATCH_SIZE", "0", "integer >= 1"),
        ("AUTOHDR_BATCH_SIZE", "8.0", "integer >= 1"),
        ("AUTOHDR_RESIZE_HW", "128", "'H,W'"),
        ("AUTOHDR_RESIZE_HW", "128x128", "'H,W'"),
        ("AUTOHDR_RESIZE_HW", "128,128,3", "'H,W'"),
        ("AUTOHDR_RESIZE_HW", "8,8", ">= 16"),
        ("AUTOHDR_VAL_FRAC", "1.5", "strictly between 0 and 1"),
        ("AUTOHDR_VAL_FRAC", "nan", "strictly between 0 and 1"),
        ("AUTOHDR_VAL_FRAC", "0", "strictly between 0 and 1"),
        ("AUTOHDR_SPLIT_SEED", "-3", "integer >= 0"),
        ("AUTOHDR_MAX_PAIRS", "0", "integer >= 1"),
        ("AUTOHDR_MAX_PAIRS", "all", "integer >= 1"),
        ("AUTOHDR_BATCH_SIZE", "1_6", "integer >= 1"),  # Python's digit groups are refused, as in --set
        ("AUTOHDR_VAL_FRAC", "0.2_5", "strictly between 0 and 1"),
    ])
    def test_malformed_value_names_the_variable(self, var, raw, expected):
        with pytest.raises(ValueError, match=f"^{var}='{raw}' is not valid: expected .*{expected}"):
            DataSettings.from_env({var: raw})

    def test_reads_os_environ_by_default(self, monkeypatch):
        for var in ENV_VARS:
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("AUTOHDR_BATCH_SIZE", "3")
        assert DataSettings.from_env().batch_size == 3

    def test_direct_construction_is_checked(self):
        with pytest.raises(ValueError, match="batch_size must be >= 1, got 0; val_frac must be"):
            DataSettings(batch_size=0, val_frac=2.0)

    def test_frozen(self):
        with pytest.raises(dataclasses.FrozenInstanceError):
            DataSettings().batch_size = 4


class TestEnsureKmpDuplicateLibOk:
    def test_sets_when_unset(self):
        environ: dict[str, str] = {}
        assert ensure_kmp_duplicate_lib_ok(environ) == "TRUE"
        assert environ == {"KMP_DUPLICATE_LIB_OK": "TRUE"}

    @pytest.mark.parametrize("user_value", ["FALSE", "1", ""])
    def test_never_overrides(self, user_value):
        environ = {"KMP_DUPLICATE_LIB_OK": user_value}
        assert ensure_kmp_duplicate_lib_ok(environ) == user_value
        assert environ == {"KMP_DUPLICATE_LIB_OK": user_value}

    def test_os_environ_by_default(self, monkeypatch):
        monkeypatch.delenv("KMP_DUPLICATE_LIB_OK", raising=False)
        ensure_kmp_duplicate_lib_ok()
        assert os.environ["KMP_DUPLICATE_LIB_OK"] == "TRUE"


class TestDefaultFixtureRoot:
    def test_points_at_the_embedded_pairs(self):
        root = default_fixture_root()
        assert root == Path(settings_mod.__file__).resolve().parents[2] / "fixtures" / "pairs"
        assert any(root.glob("*_original.jpg"))

    def test_missing_is_a_clear_error(self, monkeypatch, tmp_path):
        monkeypatch.setattr(settings_mod, "repo_root", lambda: tmp_path)
        with pytest.raises(FileNotFoundError, match="embedded fixture data not found at .*make_fixture_dataset.py"):
            default_fixture_root()


class TestRunConfiguration:
    """What a debug run uses: the preset file, then the AUTOHDR_* variables, then --set."""

    def test_variables_override_the_preset(self):
        data = resolve_preset("stage2_probe", environ={"AUTOHDR_BATCH_SIZE": "4", "AUTOHDR_RESIZE_HW": "96,64",
                                                       "AUTOHDR_NUM_WORKERS": "2", "AUTOHDR_SPLIT_SEED": "7"}).data
        assert (data.batch_size, data.resize_hw, data.num_workers, data.split_seed) == (4, (96, 64), 2, 7)

    def test_set_overrides_the_variables(self):
        preset = resolve_preset("stage2_probe", ["data.batch_size=2", "data.num_pairs=8"],
                                environ={"AUTOHDR_BATCH_SIZE": "4", "AUTOHDR_MAX_PAIRS": "6"})
        assert (preset.data.batch_size, preset.data.num_pairs) == (2, 8)

    @pytest.mark.parametrize("max_pairs,expected", [("8", 8), ("48", 32)])
    def test_max_pairs_caps_the_pair_count(self, max_pairs, expected):
        assert load_preset("stage2_probe").data.num_pairs == 32
        assert resolve_preset("stage2_probe", environ={"AUTOHDR_MAX_PAIRS": max_pairs}).data.num_pairs == expected

    def test_full_size_is_refused_with_the_reason(self):
        with pytest.raises(ValueError, match=r"AUTOHDR_RESIZE_HW=none .* a batch needs one image size"):
            resolve_preset("stage2_probe", environ={"AUTOHDR_RESIZE_HW": "none"})

    def test_blank_variables_are_ignored(self):
        assert resolve_preset("stage2_probe", environ={"AUTOHDR_BATCH_SIZE": "  "}) == load_preset("stage2_probe")
