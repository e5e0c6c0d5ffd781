"""The whole node runs an nnU-Net v2 folder: storescu -> `scp-node serve` -> SEG at the PACS.

Subject A is written as a DICOM CT series (DICOM pixel order, LPS), sent with dcmtk's
``storescu``; the node's model folder is the real nnU-Net format built by the session
fixture ``nnunet_folder``. The SEG that reaches the PACS stand-in is checked against the
source series (every frame on a source slice's position, same orientation and frame of
reference) and against ``nnUNetPredictor`` run on the same image (per-label Dice >= 0.99).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.support.datasets import ct_dataset
from tests.support.nnunet_folder import reference_predictor
from tests.support.seg_checks import (
    assert_frames_on_source_slices,
    dice_score,
    labelmap_by_source,
    wait_for_seg,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SEG_TIMEOUT_S = 300


def _write_series(shared_data: Path, out: Path) -> tuple[list[Path], np.ndarray]:
    """Subject A as axial DICOM slices; returns the files and the (z, y, x) RAS array
    nnU-Net's reader gives for the NIfTI."""
    import nibabel as nib

    image = nib.as_closest_canonical(nib.load(shared_data / "ct-abdomen-a" / "ct.nii.gz"))
    affine = image.affine
    assert np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))), "expects axis-aligned"
    data = np.asarray(image.dataobj, dtype=np.float32)  # (i to R, j to A, k to S)
    ni, nj, nk = data.shape
    spacing = [float(s) for s in np.diag(affine[:3, :3])]
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    files: list[Path] = []
    out.mkdir(parents=True)
    for k in range(nk):
        # DICOM columns run to patient Left (-i), rows to Posterior (-j).
        pixels = np.round(data[::-1, ::-1, k].T).astype(np.int16)
        ras = affine @ np.array([ni - 1, nj - 1, k, 1.0])
        ds = ct_dataset(
            (study, series, generate_uid()),
            size=1,
            Rows=nj,
            Columns=ni,
            PatientID="NNUNET-A",
            PatientName="Subject^A",
            PatientBirthDate="",
            PatientSex="",
            StudyDate="20240101",
            StudyTime="120000",
            StudyID="1",
            AccessionNumber="",
            ReferringPhysicianName="",
            Manufacturer="test",
            SeriesNumber=3,
            InstanceNumber=k + 1,
            ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
            FrameOfReferenceUID=frame,
            ImagePositionPatient=[-ras[0], -ras[1], ras[2]],
            ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
            PixelSpacing=[spacing[1], spacing[0]],
            SliceThickness=spacing[2],
            RescaleIntercept=0,
            RescaleSlope=1,
            PixelData=pixels.tobytes(),
        )
        path = out / f"a{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files, np.ascontiguousarray(data.transpose(2, 1, 0))


def _model_dir(root: Path, folder: Path) -> Path:
    directory = root / "models" / "nnunet-a"
    directory.mkdir(parents=True)
    (directory / "model.toml").write_text(
        f'format = "nnunetv2"\nversion = "0.1"\n[nnunet]\nfolder = "{folder}"\n'
        '[series]\nmodalities = ["CT"]\nmin_slices = 10\n',
        encoding="utf-8",
    )
    return directory


def test_an_nnunet_folder_runs_through_the_whole_node(
    nnunet_folder: Path,
    shared_data: Path,
    tmp_path: Path,
    node_factory: Any,
    pacs_factory: Any,
) -> None:
    files, image_ras = _write_series(shared_data, tmp_path / "series")
    models = _model_dir(tmp_path, nnunet_folder).parent
    node = node_factory(worker={"model": "nnunet-a", "models_dir": str(models), "threads": 2})
    pacs = pacs_factory(node.pacs_port)
    node.start()
    node.storescu(files)
    seg_path = wait_for_seg(pacs, SEG_TIMEOUT_S)
    seg = hd.seg.segread(seg_path)
    sources = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, files)}

    # Geometry against the source, not against our own code.
    assert seg.FrameOfReferenceUID == next(iter(sources.values())).FrameOfReferenceUID
    assert (seg.Rows, seg.Columns) == (image_ras.shape[1], image_ras.shape[2])
    assert_frames_on_source_slices(seg, list(sources.values()))
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    assert [float(v) for v in orientation.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]

    # The SEG's label map in source slice order (z ascending = the NIfTI's k).
    order = sorted(sources, key=lambda uid: float(sources[uid].ImagePositionPatient[2]))
    labelmap, names = labelmap_by_source(seg, order)

    reference = reference_predictor(nnunet_folder)
    spacing = [float(sources[order[0]].SliceThickness), 3.0, 3.0]
    expected_ras = reference.predict_single_npy_array(image_ras[None], {"spacing": spacing})
    expected = expected_ras[:, ::-1, ::-1]  # to DICOM pixel order
    values = {"liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4}
    assert names, "the SEG has no segment"
    for number, name in names.items():
        dice = dice_score(labelmap == number, expected == values[name])
        assert dice >= 0.99, f"{name}: Dice {dice:.4f} against nnUNetPredictor"
    for name, value in values.items():
        if name not in names.values():
            assert not (expected == value).any(), f"{name} missing from the SEG"
