"""Shard I/O: the one place that knows how FLIP's webdataset shards are named, written and read.

- `format`: member extensions (the one list of accepted image extensions) and the layout of
  a flip-data output folder;
- `writing`: deterministic, atomic shard writes and the fingerprint that decides whether
  shards on disk are current;
- `reading`: the safe tar reader, which decodes images, captions and `.json` only, with
  decoders that cannot unpickle;
- `tar_stream`: the tar headers that reader walks, parsed without `tarfile`'s per-member cost.

The FaceShapes generator, flip-data, the benchmark shard reader and the training pipeline
all go through it.
"""

from flip.data.shards.format import (
    CAPTION_EXTENSIONS,
    CAPTION_MEMBER,
    IMAGE_EXTENSIONS,
    IMAGE_MEMBER,
    IMAGE_SUFFIXES,
    MARKER,
    METADATA_EXTENSIONS,
    METADATA_MEMBER,
    PART_FILE,
    REPORT_NAME,
    STATS_SUFFIX,
    WANTED_EXTENSIONS,
    is_image_file,
    part_tag,
    split_member_name,
)
from flip.data.shards.reading import (
    MemberSpan,
    SampleError,
    ShardError,
    TarIndex,
    decode_caption,
    decode_image,
    decode_json,
    decode_sample,
    iter_tar_samples,
    locate_members,
    not_a_tar,
    pick,
)
from flip.data.shards.writing import PAX_MTIME, TAR_MTIME, fingerprint, write_shard

__all__ = [
    "CAPTION_EXTENSIONS",
    "CAPTION_MEMBER",
    "IMAGE_EXTENSIONS",
    "IMAGE_MEMBER",
    "IMAGE_SUFFIXES",
    "MARKER",
    "METADATA_EXTENSIONS",
    "METADATA_MEMBER",
    "PART_FILE",
    "PAX_MTIME",
    "REPORT_NAME",
    "STATS_SUFFIX",
    "TAR_MTIME",
    "WANTED_EXTENSIONS",
    "MemberSpan",
    "SampleError",
    "ShardError",
    "TarIndex",
    "decode_caption",
    "decode_image",
    "decode_json",
    "decode_sample",
    "fingerprint",
    "is_image_file",
    "iter_tar_samples",
    "locate_members",
    "not_a_tar",
    "part_tag",
    "pick",
    "split_member_name",
    "write_shard",
]
