"""Test-only helpers: small volumes with detectable orientation, DICOM edits, enhanced CT files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from ctsparse.io.geometry import LPS_RAS
from ctsparse.volume import Volume

PYDICOM_DATA = Path(pydicom.__file__).parent / "data" / "test_files"


def ramp_volume(
    shape: tuple[int, int, int] = (12, 10, 8), affine: np.ndarray | None = None, seed: int = 0
) -> Volume:
    """Integer HU with a different gradient along each axis plus noise, so any flip or swap shows."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    hu = -900 + 7 * i + 31 * j + 113 * k + rng.integers(0, 5, size=shape)
    if affine is None:
        affine = np.diag([0.7, 0.9, 2.5, 1.0])
        affine[:3, 3] = [-40.0, 12.5, 101.0]
    return Volume(
        array=hu.astype(np.float32), affine=np.asarray(affine, dtype=np.float64), source="synthetic"
    )


def rotation_z(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


def edit_dicom(path: Path, change: Callable[[Dataset], None], dest: Path | None = None) -> Path:
    """Read a real file, change it, write it back (or to ``dest``)."""
    ds = pydicom.dcmread(path)
    change(ds)
    out = dest or path
    ds.save_as(out, enforce_file_format=True)
    return out


def slice_z(path: Path) -> float:
    return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])


def write_enhanced_ct(volume: Volume, path: Path, *, seed: int = 0) -> Path:
    """An Enhanced CT Image Storage file: one frame per axial slice, frames stored in random order,
    position and rescale in per-frame functional groups, orientation and spacing in shared groups.

    Expects an axis-aligned canonical volume; frames use the standard LPS axial orientation.
    """
    arr = volume.array[::-1, ::-1, :]  # columns toward +L, rows toward +P
    lps = LPS_RAS @ volume.affine
    nx, ny, nz = arr.shape
    origin = lps[:3, 3] + lps[:3, 0] * (nx - 1) + lps[:3, 1] * (ny - 1)
    sx, sy = (float(np.linalg.norm(volume.affine[:3, a])) for a in (0, 1))
    sz = float(volume.affine[2, 2])
    order = np.random.default_rng(seed).permutation(nz)
    intercepts = [-1024.0 - 10 * (k % 3) for k in range(nz)]

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.Modality, ds.Manufacturer = "CT", "test"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows, ds.Columns, ds.NumberOfFrames = ny, nx, nz
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1

    shared = Dataset()
    orient, measures = Dataset(), Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing, measures.SliceThickness = [sy, sx], sz
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    frames, pixels = [], []
    for k in order:
        group, pos, rescale, ftype = Dataset(), Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = [float(v) for v in origin + lps[:3, 2] * k]
        rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = 1, intercepts[k], "HU"
        ftype.FrameType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
        group.PlanePositionSequence = Sequence([pos])
        group.PixelValueTransformationSequence = Sequence([rescale])
        group.CTImageFrameTypeSequence = Sequence([ftype])
        frames.append(group)
        pixels.append(np.round(arr[:, :, k].T - intercepts[k]).astype(np.int16))
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def encode_jpeg_lossless(image: np.ndarray, precision: int = 16) -> bytes:
    """A JPEG lossless (process 14, selection value 1: predict from the left) codestream of one
    unsigned grayscale image (ITU-T T.81 annex H), for DICOM transfer syntax 1.2.840.10008.1.2.4.70.

    pydicom can write RLE, JPEG-LS and JPEG 2000 but no lossless JPEG, the syntax most archived
    CT uses; this plain encoder (one Huffman table: every difference category a 5-bit code) lets
    the tests decode real lossless JPEG through the same plugins as a scanner's files.
    """
    img = np.asarray(image, dtype=np.int64)
    rows, cols = img.shape
    assert img.min() >= 0 and img.max() < 1 << precision
    pred = np.empty_like(img)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = img[0, :-1]  # first line: the left neighbour
    pred[1:, 0] = img[:-1, 0]  # first column: the sample above
    pred[1:, 1:] = img[1:, :-1]  # everywhere else: the left neighbour (Ra)
    bits: list[str] = []
    for d in (img - pred).ravel().tolist():
        ssss = abs(d).bit_length()
        bits.append(format(ssss, "05b"))  # canonical codes: category s -> the 5-bit code s
        if ssss:
            bits.append(format(d if d > 0 else (d - 1) & ((1 << ssss) - 1), f"0{ssss}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    scan = bytearray()
    for i in range(0, len(stream), 8):
        byte = int(stream[i : i + 8], 2)
        scan.append(byte)
        if byte == 0xFF:
            scan.append(0x00)  # byte stuffing
    counts = [0] * 16
    counts[4] = 17  # 17 categories (0..16), all of code length 5
    dht = bytes([0x00, *counts, *range(17)])
    sof = bytes([precision, rows >> 8, rows & 255, cols >> 8, cols & 255, 1, 1, 0x11, 0])
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # one component, table 0, predictor 1, point transform 0

    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker, (len(body) + 2) >> 8, (len(body) + 2) & 255]) + body

    return (
        b"\xff\xd8" + segment(0xC3, sof) + segment(0xC4, dht) + segment(0xDA, sos) + bytes(scan) + b"\xff\xd9"
    )


def recompress_series(
    folder: Path, transfer_syntax: str, encode: Callable[[np.ndarray], bytes], **header: object
) -> None:
    """Rewrite every file of a series folder with its pixels as `encode(stored pixels)`, one
    fragment per frame, under `transfer_syntax`; `header` sets e.g. Bits* and Rescale*."""
    from pydicom.encaps import encapsulate

    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        for key, value in header.items():
            setattr(ds, key, value)
        stored = np.round((hu - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
        ds.PixelData = encapsulate([encode(stored)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.save_as(path, enforce_file_format=True)
