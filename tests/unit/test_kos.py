"""IOCM rejection note of a superseded SEG: built on subject B's SEGs, validated, read back."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from scp_node.dicom.reference import InstanceReference
from scp_node.dicom.volume import SourceVolume, load_volume
from scp_node.errors import SegmentationError
from scp_node.inference.registry import ModelSpec
from scp_node.output.kos import build_rejection_note
from scp_node.output.seg import build_segmentation
from scp_node.output.uids import output_uids
from tests.support.validators import check_with_dciodvfy

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
KOS_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": "liver-unet.v1",
            "version": "1.2.0",
            "series_description": "AI liver segmentation",
            "weights": {"architecture": "unet"},
            "labels": [
                {
                    "value": 1,
                    "name": "Liver",
                    "category": {
                        "code": "123037004",
                        "scheme": "SCT",
                        "meaning": "Anatomical Structure",
                    },
                    "type": {"code": "10200004", "scheme": "SCT", "meaning": "Liver"},
                    "color": [221, 130, 101],
                }
            ],
        }
    )


@pytest.fixture(scope="module")
def segs(ct_b_files: list[Path], spec: ModelSpec) -> tuple[hd.seg.Segmentation, ...]:
    """The SEG of the first 14 slices (superseded) and of all 20 (superseding)."""
    volume: SourceVolume = load_volume(ct_b_files)
    labelmap = np.zeros(volume.array.shape, dtype=np.uint8)
    labelmap[:, 200:260, 150:220] = 1
    part = load_volume(ct_b_files[:14])
    old = build_segmentation(part, labelmap[:14], spec, software_version="0.1.0")
    new = build_segmentation(volume, labelmap, spec, software_version="0.1.0", instance_number=2)
    assert old is not None and new is not None
    return old, new


def _note(
    segs: tuple[hd.seg.Segmentation, ...], spec: ModelSpec
) -> hd.ko.KeyObjectSelectionDocument:
    old, new = segs
    return build_rejection_note(
        InstanceReference.from_dataset(old),
        new,
        source_series_instance_uid=str(new.ReferencedSeriesSequence[0].SeriesInstanceUID),
        model_name=spec.name,
        model_version=spec.version,
        software_version="0.1.0",
    )


@pytest.fixture(scope="module")
def written(
    segs: tuple[hd.seg.Segmentation, ...], spec: ModelSpec, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    path = tmp_path_factory.mktemp("kos") / "kos.dcm"
    _note(segs, spec).save_as(path, enforce_file_format=True)
    return path


def test_dciodvfy_reports_no_error(written: Path) -> None:
    check_with_dciodvfy(written, "KeyObjectSelectionDocument")


def test_reads_back_with_the_superseded_seg_as_evidence(
    written: Path, segs: tuple[hd.seg.Segmentation, ...]
) -> None:
    old, new = segs
    ds = pydicom.dcmread(written)
    assert ds.SOPClassUID == KOS_STORAGE
    assert ds.Modality == "KO"
    title = ds.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113001",
        "DCM",
        "Rejected for Quality Reasons",
    )
    (study,) = ds.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == old.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == old.SeriesInstanceUID
    (instance,) = series.ReferencedSOPSequence
    assert instance.ReferencedSOPInstanceUID == old.SOPInstanceUID
    assert instance.ReferencedSOPClassUID == SEG_STORAGE
    # Patient and study copied from the superseding SEG.
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "StudyID"):
        assert ds.get(keyword) == new.get(keyword), keyword

    document = hd.ko.KeyObjectSelectionDocument.from_dataset(ds)
    (reference,) = document.content.get_references()
    assert reference.referenced_sop_instance_uid == old.SOPInstanceUID
    assert reference.referenced_sop_class_uid == SEG_STORAGE
    assert document.resolve_reference(old.SOPInstanceUID) == (
        old.StudyInstanceUID,
        old.SeriesInstanceUID,
        old.SOPInstanceUID,
    )
    description = [
        item.TextValue for item in ds.ContentSequence if getattr(item, "ValueType", "") == "TEXT"
    ]
    assert description == [f"Superseded by {new.SOPInstanceUID}"]


def test_uids_are_deterministic_and_of_their_own_series(
    written: Path, segs: tuple[hd.seg.Segmentation, ...], spec: ModelSpec
) -> None:
    old, new = segs
    ds = pydicom.dcmread(written)
    again = _note(segs, spec)
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
    )
    assert ds.SeriesInstanceUID not in (old.SeriesInstanceUID, new.SeriesInstanceUID)
    source_series = str(new.ReferencedSeriesSequence[0].SeriesInstanceUID)
    expected = output_uids(
        "kos",
        source_series_instance_uid=source_series,
        model_name=spec.name,
        model_version=spec.version,
        source_sop_instance_uids=[
            f"superseded {old.SOPInstanceUID}",
            f"superseding {new.SOPInstanceUID}",
        ],
    )
    assert ds.SeriesInstanceUID == expected.series_instance_uid
    assert ds.SOPInstanceUID == expected.sop_instance_uid
    # The reverse pair is another note.
    reverse = build_rejection_note(
        InstanceReference.from_dataset(new),
        old,
        source_series_instance_uid=source_series,
        model_name=spec.name,
        model_version=spec.version,
        software_version="0.1.0",
    )
    assert reverse.SOPInstanceUID != ds.SOPInstanceUID
    assert reverse.SeriesInstanceUID == ds.SeriesInstanceUID


def test_refuses_self_and_other_study(
    segs: tuple[hd.seg.Segmentation, ...], spec: ModelSpec
) -> None:
    old, new = segs
    args = {
        "source_series_instance_uid": "1.2.3",
        "model_name": spec.name,
        "model_version": spec.version,
        "software_version": "0.1.0",
    }
    with pytest.raises(SegmentationError, match="itself"):
        build_rejection_note(InstanceReference.from_dataset(new), new, **args)
    other = replace(InstanceReference.from_dataset(old), study_instance_uid="1.2.3.4")
    with pytest.raises(SegmentationError, match="study"):
        build_rejection_note(other, new, **args)


def test_instance_reference_checks_uids() -> None:
    with pytest.raises(ValueError, match="sop_instance_uid"):
        InstanceReference("1.2", "1.2.3", "", SEG_STORAGE)
    with pytest.raises(ValueError, match="sop_class_uid"):
        InstanceReference("1.2", "1.2.3", "1.2.3.4", "1..2")
