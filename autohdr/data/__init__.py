"""Data: pair discovery and splits (:mod:`.pairs`), decoding and the dataset (:mod:`.dataset`),
the ``AUTOHDR_*`` environment (:mod:`.settings`), split files never written over a user's
(:mod:`.split_files`).

The names below are the package's public API (``from autohdr.data import PairDataset``).
"""

from autohdr.data.dataset import PairDataset, load_image, make_loader, validate_pairs
from autohdr.data.pairs import (
    DEFAULT_GROUP_REGEX, IMAGE_EXTENSIONS, INPUT_TAG, SPLIT_COLUMNS, TARGET_TAG, DataError, DataNotice,
    compile_group_regex, ensure_outside_data_root, fewer_pairs_notice, pair_groups, prepare_overfit_split, read_split_csv, scan_pairs, select_pairs,
    split_csv_text, train_val_split, write_split_csv,
)

__all__ = [
    "DEFAULT_GROUP_REGEX", "IMAGE_EXTENSIONS", "INPUT_TAG", "SPLIT_COLUMNS", "TARGET_TAG", "DataError", "DataNotice",
    "PairDataset", "compile_group_regex", "ensure_outside_data_root", "fewer_pairs_notice", "load_image", "make_loader", "pair_groups",
    "prepare_overfit_split", "read_split_csv", "scan_pairs", "select_pairs", "split_csv_text", "train_val_split",
    "validate_pairs", "write_split_csv",
]
