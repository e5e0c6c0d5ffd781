"""The whole node runs a MONAI bundle: storescu -> `scp-node serve` -> SEG at the PACS.

Subject A is written as a DICOM CT series, axial or sagittal (``tests/support/
nifti_series.py``), and sent with dcmtk's ``storescu``; the node's model folder is the real
bundle format built by the session fixture ``monai_bundle``. The SEG that reaches the PACS
stand-in is checked against the source series (every frame on a source slice's position,
same orientation and frame of reference) and against ``python -m monai.bundle run`` of the
bundle on subject A's NIfTI (per-label Dice >= 0.99), voxel by voxel in patient space.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from tests.support.monai_bundle import CHANNELS
from tests.support.nifti_series import write_series
from tests.support.seg_checks import (
    assert_frames_on_source_slices,
    dice_score,
    labelmap_by_source,
    wait_for_seg,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SEG_TIMEOUT_S = 300


def _model_dir(root: Path, bundle: Path) -> Path:
    directory = root / "models" / "bundle-a"
    directory.mkdir(parents=True)
    (directory / "model.toml").write_text(
        f'format = "monai_bundle"\n[bundle]\nfolder = "{bundle}"\n'
        '[series]\nmodalities = ["CT"]\nmin_slices = 10\norientation = "any"\n',
        encoding="utf-8",
    )
    return directory


@pytest.mark.parametrize("plane", ["axial", "sagittal"])
def test_a_bundle_runs_through_the_whole_node(
    plane: str,
    monai_bundle: Path,
    monai_reference: Path,
    shared_data: Path,
    tmp_path: Path,
    node_factory: Any,
    pacs_factory: Any,
) -> None:
    import nibabel as nib

    source = shared_data / "ct-abdomen-a" / "ct.nii.gz"
    series = write_series(source, tmp_path / "series", plane)
    models = _model_dir(tmp_path, monai_bundle).parent
    node = node_factory(worker={"model": "bundle-a", "models_dir": str(models), "threads": 2})
    pacs = pacs_factory(node.pacs_port)
    node.start()
    node.storescu(series.files)
    seg_path = wait_for_seg(pacs, SEG_TIMEOUT_S)
    seg = hd.seg.segread(seg_path)
    datasets = [pydicom.dcmread(path) for path in series.files]
    order = [str(ds.SOPInstanceUID) for ds in datasets]

    # Geometry against the source files, not against our own code.
    assert seg.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    assert (seg.Rows, seg.Columns) == (datasets[0].Rows, datasets[0].Columns)
    assert_frames_on_source_slices(seg, datasets)
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    assert np.allclose(
        [float(v) for v in orientation.ImageOrientationPatient], series.image_orientation
    )

    labelmap, names = labelmap_by_source(seg, order)

    reference = nib.as_closest_canonical(nib.load(monai_reference))
    expected = series.stored(np.asarray(reference.dataobj).astype(np.uint8))
    assert expected.shape == labelmap.shape
    values = {name: channel for channel, (name, _total) in CHANNELS.items()}
    assert sorted(names.values()) == sorted(values)
    for number, name in names.items():
        dice = dice_score(labelmap == number, expected == values[name])
        assert dice >= 0.99, f"{name}: Dice {dice:.4f} against monai.bundle run ({plane})"
