"""The hand-written tar header reader against Python's `tarfile` on the formats writers produce."""

from __future__ import annotations

import io
import struct
import tarfile

import pytest

from flip.data.shards import ShardError, iter_tar_samples
from flip.data.shards.tar_stream import TarStream, _number, decompressed

LONG_FOLDER = "faces/" + "x" * 120  # longer than a ustar name: prefix, GNU long name or pax path
MEMBERS = [  # (name, data or None for a folder, or ("link", target))
    ("00000.jpg", b"\xff\xd8" + bytes(range(256)) * 3),
    ("00000.txt", b"a face with glasses"),
    ("folder", None),
    ("00001.jpg", b"j" * 512),  # exactly one block
    ("00001.txt", b"t" * 513),  # one byte into a second block
    ("00002.txt", b""),
    ("link.txt", ("link", "00001.txt")),
    ("hard.txt", ("hard", "00000.txt")),
    (f"{LONG_FOLDER}/00003.jpg", b"long name"),
    ("visage_é_顔.txt", b"non-ASCII name"),
]


def _archive(tar_format: int, compression: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}", format=tar_format) as tar:
        for name, content in MEMBERS:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000.25  # fractional: pax writes an mtime record
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(content, tuple):
                info.type = tarfile.SYMTYPE if content[0] == "link" else tarfile.LNKTYPE
                info.linkname = content[1]
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _with_tarfile(data: bytes, read_every: int) -> list[tuple[str, bool, bytes]]:
    members = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        for i, member in enumerate(tar):
            content = b""
            if member.isfile() and i % read_every == 0:
                content = tar.extractfile(member).read()
            members.append((member.name, member.isfile(), content))
    return members


def _with_tar_stream(data: bytes, read_every: int) -> list[tuple[str, bool, bytes]]:
    tar = TarStream(decompressed(io.BytesIO(data), data[:512]))
    return [
        (name, is_file, tar.read() if is_file and i % read_every == 0 else b"")
        for i, (name, is_file) in enumerate(tar)
    ]


FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


@pytest.mark.parametrize("read_every", [1, 2, 3], ids=["read-all", "skip-every-other", "skip-two-in-three"])
@pytest.mark.parametrize("tar_format", FORMATS.values(), ids=FORMATS.keys())
def test_members_names_and_data_are_the_ones_tarfile_reads(tar_format: int, read_every: int) -> None:
    data = _archive(tar_format)
    expected = _with_tarfile(data, read_every)
    assert [name for name, *_ in expected] == [name for name, _ in MEMBERS]  # the archive is what we meant
    assert _with_tar_stream(data, read_every) == expected


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
def test_compressed_archives_read_as_tarfiles_r_star_mode_does(compression: str) -> None:
    data = _archive(tarfile.PAX_FORMAT, compression)
    assert _with_tar_stream(data, 1) == _with_tarfile(data, 1)


def test_a_header_with_an_old_writers_signed_checksum_is_accepted_as_tarfile_accepts_it() -> None:
    data = bytearray(_archive(tarfile.GNU_FORMAT))
    header = data[:512]
    header[0:8] = "ée.jpg\0".encode()  # name bytes >= 0x80: signed and unsigned sums differ
    header[148:156] = b" " * 8
    signed = sum(struct.unpack("512b", bytes(header)))
    header[148:156] = b"%06o\0 " % signed
    data[:512] = header
    assert _with_tar_stream(bytes(data), 1) == _with_tarfile(bytes(data), 1)
    assert _with_tar_stream(bytes(data), 1)[0][0] == "ée.jpg"


def test_numbers_in_gnu_base_256_fields_are_read() -> None:
    for value, digits in ((2**40, 12), (-5, 8), (0o7777777, 8), (123, 12)):
        assert _number(tarfile.itn(value, digits, tarfile.GNU_FORMAT)) == value


def test_an_archive_without_its_end_blocks_ends_cleanly() -> None:
    data = _archive(tarfile.PAX_FORMAT)
    members = _with_tar_stream(data, 1)
    end = data.rindex(b"non-ASCII name") + 512  # the last member's data block, then only zeros
    assert _with_tar_stream(data[:end], 1) == members


def _damaged(data: bytes, how: str, member: int = 2) -> bytes:
    """The archive with a member's header checksum broken, or cut inside that header or the data before."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        header = tar.getmembers()[member].offset
    if how == "checksum":
        return data[:header] + bytes([data[header] ^ 1]) + data[header + 1 :]
    return data[: header + 100] if how == "cut-in-header" else data[: header - 300]


@pytest.mark.parametrize(
    ("how", "error"), [("checksum", ValueError), ("cut-in-header", EOFError), ("cut-in-data", EOFError)]
)
def test_damage_is_an_error_not_a_shorter_archive(how: str, error: type) -> None:
    data = _damaged(_archive(tarfile.USTAR_FORMAT), how)
    tar = TarStream(io.BytesIO(data))
    with pytest.raises(error):
        for _ in tar:
            tar.read()


def test_a_shard_damaged_in_its_second_sample_yields_the_first_and_is_counted_damaged(tmp_path) -> None:
    """tarfile in a stream ends a shard silently at a bad header; the training reader reports it."""
    path = tmp_path / "shard.tar"
    path.write_bytes(_damaged(_archive(tarfile.PAX_FORMAT), "checksum", member=4))  # 00001.txt
    samples = []
    with pytest.raises(ShardError) as raised:
        samples.extend(iter_tar_samples(str(path)))
    assert samples == [("00000", {"jpg": MEMBERS[0][1], "txt": MEMBERS[1][1]})]
    assert raised.value.reason == "truncated_tar"
    assert "is damaged after sample '00001'" in raised.value.detail


@pytest.mark.parametrize("piped", [False, True], ids=["file", "pipe"])
@pytest.mark.parametrize("compression", ["", "gz"])
def test_the_training_reader_gives_the_samples_of_a_shard_file_or_stream(
    tmp_path, compression, piped
) -> None:
    """A local file is read from its start again; a stream (pipe:, remote) with its first block put back."""
    path = tmp_path / f"shard.tar{'.' + compression if compression else ''}"
    path.write_bytes(_archive(tarfile.PAX_FORMAT, compression))
    samples = dict(iter_tar_samples(f"pipe:cat {path}" if piped else str(path)))
    assert samples["00000"] == {"jpg": MEMBERS[0][1], "txt": MEMBERS[1][1]}
    assert samples["00001"] == {"jpg": MEMBERS[3][1], "txt": MEMBERS[4][1]}
    assert samples["00002"] == {"txt": b""}
    assert samples[f"{LONG_FOLDER}/00003"] == {"jpg": b"long name"}
    assert samples["visage_é_顔"] == {"txt": b"non-ASCII name"}
    assert "link" not in samples and "hard" not in samples  # links are no regular files


def _with_size_field(data: bytes, field: bytes) -> bytes:
    """The archive with its first header's size field replaced (and its checksum made to hold)."""
    header = bytearray(data[:512])
    header[124:136] = field
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + data[512:]


@pytest.mark.parametrize("pax", [False, True], ids=["header", "pax-record"])
def test_a_negative_size_is_refused_not_read_as_the_rest_of_the_archive(pax: bool) -> None:
    if pax:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("00000.jpg")
            info.pax_headers = {"size": "-5"}
            tar.addfile(info, io.BytesIO(b""))
        data = buffer.getvalue()
    else:
        data = _with_size_field(_archive(tarfile.GNU_FORMAT), tarfile.itn(-5, 12, tarfile.GNU_FORMAT))
    tar = TarStream(io.BytesIO(data))
    with pytest.raises(ValueError, match="negative size"):
        for _ in tar:
            tar.read()
