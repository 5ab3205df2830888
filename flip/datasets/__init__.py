"""Readers for face datasets in the layouts they are published in."""

from flip.datasets.affectnet import read_affectnet
from flip.datasets.base import LabelledSplit, MalformedFileError
from flip.datasets.celeba import (
    CELEBA_ATTRIBUTES,
    CELEBA_SPLITS,
    CelebAFormatError,
    CelebARecord,
    read_celeba,
)
from flip.datasets.celeba_attributes import read_celeba_split, read_lfwa
from flip.datasets.csv_labels import read_csv_labels
from flip.datasets.fer2013 import read_fer2013
from flip.datasets.folder import read_folder
from flip.datasets.rafdb import read_rafdb
from flip.datasets.shards import read_faceshapes, read_labelled_shards

__all__ = [
    "CELEBA_ATTRIBUTES",
    "CELEBA_SPLITS",
    "CelebAFormatError",
    "CelebARecord",
    "LabelledSplit",
    "MalformedFileError",
    "read_affectnet",
    "read_celeba",
    "read_celeba_split",
    "read_csv_labels",
    "read_faceshapes",
    "read_fer2013",
    "read_folder",
    "read_labelled_shards",
    "read_lfwa",
    "read_rafdb",
]
