"""Photoshoot-aware train/val split, and split files autohdr never writes over a user's.

Group split (autohdr.data.pairs): ids ``<group>_g<k>`` of one photoshoot never straddle the split
(a hypothesis property over random id sets), ids without a group split exactly as the per-pair
split did, and ``--group-regex`` / ``AUTOHDR_GROUP_REGEX`` / ``data.group_regex`` reach it or fail
with one line. Split files (autohdr.data.split_files): a file autohdr did not write, or changed
since, is refused with its path and left byte-identical; autohdr's own files are rewritten.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from autohdr.data import DataError, pair_groups, prepare_overfit_split, read_split_csv, scan_pairs, train_val_split
from autohdr.data.settings import DataSettings
from autohdr.data.split_files import SIDECAR_NAME, check_replaceable, write_owned_files
from autohdr.runs.debug import SPLIT_FILES, data_preset_from_env, select_rows
from autohdr.runs.presets import DataPreset
from autohdr.cli import EXIT_BAD_SIGNAL, EXIT_OK, EXIT_USAGE, main
from tests.helpers_data import REPO_ROOT, copy_pairs, write_pair
from tests.plugins.data_fixtures import hash_tree

PREPARE_SCRIPT = REPO_ROOT / "scripts" / "debug_prepare_overfit_split.py"
#: Another tool's split: same name and columns as autohdr's, its own rows and formatting.
FOREIGN_CSV = b"image_id,input_path,target_path\r\nshoot_g1,/elsewhere/a.jpg,/elsewhere/b.jpg\r\n"


def run_cli(*argv) -> tuple[int, str]:
    """``autohdr.cli.main(argv)`` in-process: the exit code and the one stderr line (asserted to be one)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    lines = err.getvalue().strip().splitlines()
    return code, (lines[0] if len(lines) == 1 and "Traceback" not in err.getvalue() else err.getvalue())


def rows_of(ids: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"image_id": ids, "input_path": [f"/in/{i}.jpg" for i in ids],
                         "target_path": [f"/out/{i}.jpg" for i in ids]})


def per_pair_split(ids: list[str], val_frac: float, seed: int) -> tuple[list[str], list[str]]:
    """The split before photoshoot groups (reference): the first round(n * val_frac) of a seeded permutation."""
    n = len(ids)
    n_val = min(n - 1, max(1, int(round(n * val_frac)))) if n >= 2 else 0
    order = np.random.default_rng(seed).permutation(n)
    val = set(order[:n_val].tolist())
    return [ids[i] for i in range(n) if i not in val], [ids[i] for i in range(n) if i in val]


# ------------------------------------------------------------------------------ groups of ids

class TestPairGroups:
    def test_default_pattern(self):
        ids = ["9f1c-77_g0", "9f1c-77_g12", "b_g3", "plain", "x_g", "x_gA", "a_g1_g2"]
        assert pair_groups(ids) == ["9f1c-77", "9f1c-77", "b", "plain", "x_g", "x_gA", "a_g1"]

    @pytest.mark.parametrize("off", [None, "", "none", "NONE"])
    def test_grouping_off(self, off):
        assert pair_groups(["a_g0", "a_g1"], off) == ["a_g0", "a_g1"]

    def test_custom_pattern_and_optional_group(self):
        assert pair_groups(["s1-001", "s1-002", "s2-001", "solo"], r"^(?P<group>s\d+)-") == ["s1", "s1", "s2", "solo"]
        # the named group does not take part in the match: the id is its own group
        assert pair_groups(["k_a", "k_b"], r"(?P<group>z)?_") == ["k_a", "k_b"]

    @pytest.mark.parametrize("pattern, fragment", [("(", "is not a valid regular expression"),
                                                   (r"^(.+)_g\d+$", "has no named group 'group'"),
                                                   (r"(?P<shoot>.+)_g", "has no named group 'group'")])
    def test_bad_pattern(self, pattern, fragment):
        with pytest.raises(ValueError, match=fragment) as info:
            train_val_split(rows_of(["a_g0", "b_g0"]), 0.5, 0, pattern)
        assert repr(pattern) in str(info.value)


# ------------------------------------------------------------------------------ the split

#: Random id sets: photoshoots ``<hex>_g<k>`` of 1-5 pairs, mixed with ids of no photoshoot.
_groups = st.lists(st.tuples(st.text("0123456789abcdef-", min_size=1, max_size=6), st.integers(1, 5)),
                   min_size=0, max_size=10, unique_by=lambda g: g[0])
_plain = st.lists(st.text("abcdefgh0123456789", min_size=1, max_size=5).map(lambda s: "p" + s),
                  min_size=0, max_size=10, unique=True)


@st.composite
def grouped_ids(draw) -> list[str]:
    ids = [f"{name}_g{k}" for name, size in draw(_groups) for k in range(size)] + draw(_plain)
    ids = list(dict.fromkeys(ids))
    return draw(st.permutations(ids))


class TestGroupSplit:
    @settings(max_examples=150, deadline=None)
    @given(ids=grouped_ids(), val_frac=st.floats(0.05, 0.95), seed=st.integers(0, 2 ** 31))
    def test_no_group_crosses(self, ids, val_frac, seed):
        assume(ids)
        groups = dict(zip(ids, pair_groups(ids)))
        if len(set(groups.values())) < 2 and len(ids) >= 2:
            with pytest.raises(DataError, match="belong to one photoshoot group"):
                train_val_split(rows_of(ids), val_frac, seed)
            return
        train, val = train_val_split(rows_of(ids), val_frac, seed)
        train_ids, val_ids = train.image_id.tolist(), val.image_id.tolist()
        assert {groups[i] for i in train_ids}.isdisjoint(groups[i] for i in val_ids)
        assert sorted(train_ids + val_ids) == sorted(ids)
        assert train_ids == [i for i in ids if i in set(train_ids)]  # input order kept on both sides
        assert val_ids == [i for i in ids if i in set(val_ids)]
        assert list(train.index) == list(range(len(train))) and list(val.index) == list(range(len(val)))
        if len(ids) >= 2:
            target = min(len(ids) - 1, max(1, int(round(len(ids) * val_frac))))
            assert train_ids and val_ids
            assert len(val_ids) <= target or len({groups[i] for i in val_ids}) == 1
        assert train_val_split(rows_of(ids), val_frac, seed)[1].image_id.tolist() == val_ids  # seeded

    @settings(max_examples=100, deadline=None)
    @given(ids=st.lists(st.text("abcdefgh0123456789", min_size=1, max_size=6), min_size=1, max_size=40, unique=True),
           val_frac=st.floats(0.05, 0.95), seed=st.integers(0, 2 ** 31))
    def test_plain_ids_split_as_before(self, ids, val_frac, seed):
        train, val = train_val_split(rows_of(ids), val_frac, seed)
        assert (train.image_id.tolist(), val.image_id.tolist()) == per_pair_split(ids, val_frac, seed)

    def test_fixture_ids_split_as_before(self, fixture_root):
        fixture_rows = scan_pairs(fixture_root)
        ids = fixture_rows.image_id.tolist()
        for seed in (0, 1, 7):
            train, val = train_val_split(fixture_rows, 0.2, seed)
            assert (train.image_id.tolist(), val.image_id.tolist()) == per_pair_split(ids, 0.2, seed)

    def test_grouping_off_splits_grouped_ids_by_pair(self):
        ids = [f"shoot{s}_g{k}" for s in range(4) for k in range(3)]
        train, val = train_val_split(rows_of(ids), 0.25, 3, "none")
        assert (train.image_id.tolist(), val.image_id.tolist()) == per_pair_split(ids, 0.25, 3)
        grouped_val = train_val_split(rows_of(ids), 0.25, 3)[1].image_id.tolist()
        assert len({i.split("_")[0] for i in grouped_val}) == 1 and len(grouped_val) == 3

    def test_seed_moves_whole_groups(self):
        ids = [f"s{s:02d}_g{k}" for s in range(20) for k in range(2)]
        vals = {seed: train_val_split(rows_of(ids), 0.2, seed)[1].image_id.tolist() for seed in (0, 0, 1)}
        assert len(vals[0]) == 8 and vals[0] != vals[1]
        assert all(f"{i[:-1]}{1 - int(i[-1])}" in vals[0] for i in vals[0])  # both pairs of each shoot

    def test_one_group_is_refused_with_the_way_out(self):
        with pytest.raises(DataError, match=r"all 3 pairs belong to one photoshoot group 'shoot'.*'none'"):
            train_val_split(rows_of(["shoot_g0", "shoot_g1", "shoot_g2"]), 0.3, 0)
        train, val = train_val_split(rows_of(["shoot_g0"]), 0.3, 0)  # a single pair: train only, as before
        assert (len(train), len(val)) == (1, 0)


class TestGroupRegexSettings:
    def test_preset_field_is_validated(self):
        assert DataPreset().group_regex == r"^(?P<group>.+)_g\d+$"
        with pytest.raises(ValueError, match=r"data.group_regex '\(x' is not a valid regular expression"):
            DataPreset(group_regex="(x")

    def test_environment_variable(self):
        preset = data_preset_from_env(DataPreset(), {"AUTOHDR_GROUP_REGEX": "^(?P<group>[a-z]+)"})
        assert preset.group_regex == "^(?P<group>[a-z]+)"
        assert data_preset_from_env(DataPreset(), {"AUTOHDR_GROUP_REGEX": "none"}).group_regex == "none"
        with pytest.raises(ValueError, match=r"AUTOHDR_GROUP_REGEX='\^\(\.\+\)\$' is not valid: .*named group 'group'"):
            DataSettings.from_env({"AUTOHDR_GROUP_REGEX": "^(.+)$"})

    def test_select_rows_splits_by_group(self, tmp_path):
        root = tmp_path / "data"
        for shoot in range(5):
            for k in range(2):
                write_pair(root, f"shoot{shoot}_g{k}", size=(16, 16), seed=shoot)
        train, val = select_rows(root, DataPreset(num_pairs=10, overfit=False, val_frac=0.2, resize_hw=(16, 16)))
        assert len(val) == 2 and val.image_id.str[:6].nunique() == 1
        assert set(train.image_id.str[:6]).isdisjoint(val.image_id.str[:6])


@pytest.fixture
def one_shoot_root(tmp_path) -> Path:
    """4 pairs ``shootA_g0, shootA_g1, shootB_g0, shootB_g1``: two photoshoots by default, one by
    ``^(?P<group>shoot)``."""
    for name in ("A", "B"):
        for k in range(2):
            write_pair(tmp_path / "data", f"shoot{name}_g{k}", size=(16, 16))
    return tmp_path / "data"


@pytest.mark.parametrize("command", [["debug", "stage2_probe", "--set", "data.overfit=false"],
                                     ["train", "--stage", "stage1_param_only"]])
def test_cli_group_regex_reaches_the_split(command, one_shoot_root, tmp_path):
    # One photoshoot for the given regex: the split is refused before any training, naming the regex.
    code, line = run_cli(*command, "--data-root", one_shoot_root, "--out", tmp_path / "run", "--device", "cpu",
                         "--group-regex", "^(?P<group>shoot)")
    assert code == EXIT_USAGE
    assert "all 4 pairs belong to one photoshoot group 'shoot'" in line and "'^(?P<group>shoot)'" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("regex, fragment", [("(", "--group-regex '(' is not a valid regular expression"),
                                             ("^(.+)_g", "--group-regex '^(.+)_g' has no named group 'group'")])
@pytest.mark.parametrize("command", [["debug", "overfit_stage1"], ["train", "--stage", "stage2_hybrid"]])
def test_cli_bad_group_regex(command, regex, fragment, tmp_path):
    code, line = run_cli(*command, "--out", tmp_path / "run", "--device", "cpu", "--group-regex", regex)
    assert code == EXIT_USAGE
    assert line.startswith("autohdr: error: ") and fragment in line
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ split files

class TestOwnedFiles:
    def test_foreign_file_is_refused_and_left_alone(self, tmp_path):
        (tmp_path / "val_split.csv").write_bytes(FOREIGN_CSV)
        with pytest.raises(DataError, match="not written by autohdr") as info:
            write_owned_files(tmp_path, {"train_split.csv": "a\n", "val_split.csv": "b\n"})
        assert str(tmp_path / "val_split.csv") in str(info.value)
        assert (tmp_path / "val_split.csv").read_bytes() == FOREIGN_CSV
        assert sorted(p.name for p in tmp_path.iterdir()) == ["val_split.csv"]  # nothing else written

    def test_own_files_are_rewritten(self, tmp_path):
        write_owned_files(tmp_path, {"train_split.csv": "first\n"})
        write_owned_files(tmp_path, {"train_split.csv": "second\n", "val_split.csv": "v\n"})
        assert (tmp_path / "train_split.csv").read_text() == "second\n"
        record = json.loads((tmp_path / SIDECAR_NAME).read_text())["files"]
        assert set(record) == {"train_split.csv", "val_split.csv"}
        check_replaceable(tmp_path, ["train_split.csv", "val_split.csv", "absent.csv"])

    def test_sidecar_keeps_the_other_records(self, tmp_path):
        write_owned_files(tmp_path, {"train_split.csv": "t\n"})
        write_owned_files(tmp_path, {"overfit_report.json": "{}"})
        record = json.loads((tmp_path / SIDECAR_NAME).read_text())["files"]
        assert set(record) == {"train_split.csv", "overfit_report.json"}
        write_owned_files(tmp_path, {"train_split.csv": "t2\n"})  # still recorded, so still ours

    def test_modified_since_is_refused(self, tmp_path):
        write_owned_files(tmp_path, {"train_split.csv": "ours\n"})
        (tmp_path / "train_split.csv").write_text("ours, edited by hand\n")
        with pytest.raises(DataError, match="changed since autohdr wrote it") as info:
            write_owned_files(tmp_path, {"train_split.csv": "again\n"})
        assert str(tmp_path / "train_split.csv") in str(info.value)
        assert (tmp_path / "train_split.csv").read_text() == "ours, edited by hand\n"

    def test_unreadable_record_proves_nothing(self, tmp_path):
        write_owned_files(tmp_path, {"train_split.csv": "ours\n"})
        (tmp_path / SIDECAR_NAME).write_text("{not json")
        with pytest.raises(DataError, match="not written by autohdr"):
            check_replaceable(tmp_path, ["train_split.csv"])

    def test_a_folder_of_that_name_is_refused(self, tmp_path):
        (tmp_path / "train_split.csv").mkdir()
        with pytest.raises(DataError, match="exists and is not a plain file"):
            write_owned_files(tmp_path, {"train_split.csv": "x\n"})

    def test_csv_stays_plain(self, tmp_path):
        rows = rows_of(["a_g0", "b_g0"])
        from autohdr.data import split_csv_text
        write_owned_files(tmp_path, {"train_split.csv": split_csv_text(rows)})
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "train_split.csv"), rows)


class TestPrepareOverfitSplit:
    def test_foreign_split_is_refused(self, immutable_data_root, tmp_path):
        out = tmp_path / "splits"
        out.mkdir()
        (out / "train_split.csv").write_bytes(FOREIGN_CSV)
        result = subprocess.run([sys.executable, str(PREPARE_SCRIPT), "--data-root", str(immutable_data_root),
                                 "--out-dir", str(out), "--num-pairs", "2"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr
        assert f"refusing to overwrite {out / 'train_split.csv'}" in lines[0] and "not written by autohdr" in lines[0]
        assert (out / "train_split.csv").read_bytes() == FOREIGN_CSV
        assert sorted(p.name for p in out.iterdir()) == ["train_split.csv"]

    def test_own_split_is_rewritten(self, immutable_data_root, tmp_path):
        first = prepare_overfit_split(immutable_data_root, tmp_path, 2)
        second = prepare_overfit_split(immutable_data_root, tmp_path, 3)
        assert (first["num_pairs_written"], second["num_pairs_written"]) == (2, 3)
        assert len(read_split_csv(tmp_path / "val_split.csv")) == 3
        assert json.loads((tmp_path / "overfit_report.json").read_text())["num_pairs_written"] == 3


class TestDebugRunSplitDir:
    def test_foreign_split_in_split_dir_is_refused(self, fixture_root, tmp_path, monkeypatch):
        root = copy_pairs(fixture_root, tmp_path / "data", 4)
        split_dir = tmp_path / "their_splits"
        split_dir.mkdir()
        (split_dir / "val_split.csv").write_bytes(FOREIGN_CSV)
        before = hash_tree(split_dir)
        monkeypatch.setenv("AUTOHDR_SPLIT_DIR", str(split_dir))
        code, line = run_cli("debug", "overfit_stage1", "--data-root", root, "--out", tmp_path / "run",
                             "--device", "cpu", "--no-plots")
        assert code == EXIT_USAGE
        assert f"refusing to overwrite {split_dir / 'val_split.csv'}" in line
        assert hash_tree(split_dir) == before
        assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any training

    def test_own_split_in_split_dir_is_rewritten(self, fixture_root, tmp_path, monkeypatch):
        root = copy_pairs(fixture_root, tmp_path / "data", 2)
        split_dir = tmp_path / "splits"
        write_owned_files(split_dir, {name: "stale,autohdr,split\n" for name in SPLIT_FILES})
        monkeypatch.setenv("AUTOHDR_SPLIT_DIR", str(split_dir))
        code, output = run_cli("debug", "overfit_stage1", "--data-root", root, "--out", tmp_path / "run",
                               "--device", "cpu", "--no-plots", "--epochs", "1", "--set", "data.num_pairs=2",
                               "--set", "data.batch_size=2", "--set", "data.resize_hw=32,32",
                               "--set", "model.widths=8,8,8,8")
        assert code in (EXIT_OK, EXIT_BAD_SIGNAL), output  # one step judges little; the run itself finished
        for name in SPLIT_FILES:
            assert read_split_csv(split_dir / name).image_id.tolist() == scan_pairs(root).image_id.tolist()
        check_replaceable(split_dir, SPLIT_FILES)  # recorded as autohdr's again
