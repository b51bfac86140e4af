"""Label columns: reading them without the images, and the one-line errors for labels a
model cannot learn from (with and without --streaming)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from common.errors import UserError

if TYPE_CHECKING:  # names for the type hints only
    import datasets


def labels_of(split: datasets.Dataset) -> list:
    """The label column as a list (ints once encoded), read in one Arrow batch.
    (`split["label"]` is a lazy column in datasets >= 4 whose iteration formats one row at a
    time: 45 s for 100k rows of a parquet dataset, here, against milliseconds.)"""
    return split.select_columns(["label"]).with_format(None)[:]["label"]


def unknown_labels(flag: str, split: str, unknown: list) -> UserError:
    """The error for val labels that train does not have (with and without --streaming)."""
    return UserError(f"{flag}: the {split} split has labels that train does not "
                     f"({', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}); "
                     "every class needs training images")


def label_out_of_range(flag: str, split: str, value: int, num_classes: int) -> UserError:
    """The error for a label outside [0, num_classes): caught before any training, where it
    would otherwise fail at the first loss (on CUDA as a device-side assert)."""
    hint = (" (-1 marks an unlabelled example, as in many Hub test splits: pick a labelled "
            "split with --val-split / --train-split)" if value == -1 else "")
    return UserError(f"{flag}: the {split} split has label {value}, outside the "
                     f"{num_classes} classes 0..{num_classes - 1}{hint}")


def check_label_range(ds: datasets.Dataset, num_classes: int, flag: str, split: str) -> None:
    """Every label of `ds` in [0, num_classes), read from the label column alone."""
    labels = torch.as_tensor(labels_of(ds), dtype=torch.long)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise label_out_of_range(flag, split, int(bad[0]), num_classes)
