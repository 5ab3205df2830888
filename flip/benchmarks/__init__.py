"""Readers for face datasets in the layouts they are published in."""

from flip.benchmarks.affectnet import read_affectnet
from flip.benchmarks.base import LabelledSplit, MalformedFileError
from flip.benchmarks.celeba import (
    CELEBA_ATTRIBUTES,
    CELEBA_SPLITS,
    CelebAFormatError,
    CelebARecord,
    read_celeba,
)
from flip.benchmarks.celeba_attributes import read_celeba_split, read_lfwa
from flip.benchmarks.celeba_caption import read_celeba_caption
from flip.benchmarks.csv_labels import read_csv_labels
from flip.benchmarks.faceshapes_dense import read_faceshapes_dense
from flip.benchmarks.fairface import read_fairface
from flip.benchmarks.fer2013 import read_fer2013
from flip.benchmarks.folder import read_folder
from flip.benchmarks.landmarks import read_300w, read_aflw19, read_wflw
from flip.benchmarks.parsing import read_celebamask_hq, read_lapa
from flip.benchmarks.rafdb import read_rafdb
from flip.benchmarks.shards import read_faceshapes, read_labelled_shards
from flip.benchmarks.utkface import read_utkface
from flip.benchmarks.verification import read_calfw, read_cplfw, read_lfw

__all__ = [
    "CELEBA_ATTRIBUTES",
    "CELEBA_SPLITS",
    "CelebAFormatError",
    "CelebARecord",
    "LabelledSplit",
    "MalformedFileError",
    "read_300w",
    "read_affectnet",
    "read_aflw19",
    "read_calfw",
    "read_celeba",
    "read_celeba_caption",
    "read_celeba_split",
    "read_celebamask_hq",
    "read_cplfw",
    "read_csv_labels",
    "read_faceshapes",
    "read_faceshapes_dense",
    "read_fairface",
    "read_fer2013",
    "read_folder",
    "read_labelled_shards",
    "read_lapa",
    "read_lfw",
    "read_lfwa",
    "read_rafdb",
    "read_utkface",
    "read_wflw",
]
