"""Small, valid DICOM data sets for tests that send instances over a real association."""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def ct_dataset(
    uids: tuple[str, str, str] | None = None, *, size: int = 2, **overrides: Any
) -> Dataset:
    """A minimal CT image the node accepts: ``size`` x ``size`` 16-bit pixels of value 1.

    Parameters
    ----------
    uids
        (Study, Series, SOP Instance UID); fresh random UIDs when None. Fixed UIDs let
        hypothesis replay a case.
    size
        Rows and columns.
    overrides
        Attributes to set; a value of None deletes the attribute.
    """
    study, series, sop = uids or (generate_uid(), generate_uid(), generate_uid())
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "CT"
    ds.Rows = size
    ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x01\x00" * (size * size)
    for key, value in overrides.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds
