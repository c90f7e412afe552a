"""Data: pair discovery and splits (:mod:`.pairs`), decoding and the dataset (:mod:`.dataset`),
the ``AUTOHDR_*`` environment (:mod:`.settings`).

The names below are the package's public API (``from autohdr.data import PairDataset``).
"""

from autohdr.data.dataset import PairDataset, load_image, make_loader, validate_pairs
from autohdr.data.pairs import (
    IMAGE_EXTENSIONS, INPUT_TAG, SPLIT_COLUMNS, TARGET_TAG, DataError, ensure_outside_data_root,
    prepare_overfit_split, read_split_csv, scan_pairs, select_pairs, train_val_split, write_split_csv,
)

__all__ = [
    "IMAGE_EXTENSIONS", "INPUT_TAG", "SPLIT_COLUMNS", "TARGET_TAG", "DataError", "PairDataset",
    "ensure_outside_data_root", "load_image", "make_loader", "prepare_overfit_split", "read_split_csv",
    "scan_pairs", "select_pairs", "train_val_split", "validate_pairs", "write_split_csv",
]
