"""Tiny synthetic data folders in each registered dataset's documented layout (label files
and small images), for the registry tests. `WRITERS[name](folder)` returns (data_dir,
Options); a dataset registered without a writer here fails test_every_registered_dataset_*."""
from __future__ import annotations

import csv
import gzip
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from extract.datasets.chexpert import CLASSES as CHEXPERT_CLASSES
from extract.datasets.table import Options
from extract.synthetic import write_dataset

try:
    import pydicom  # noqa: F401
    HAVE_PYDICOM = True
except ImportError:
    HAVE_PYDICOM = False


def write_png(path, *, bits: int = 8, size: int = 16, seed: int = 0) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if bits == 16:
        Image.fromarray(rng.integers(0, 4096, (size, size), dtype=np.uint16)).save(path)
    else:
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)


def write_dicom(path, *, size: int = 16, seed: int = 0, monochrome1: bool = False, **header) -> None:
    """A small uncompressed 12-bit DICOM when pydicom is installed; else a placeholder file
    (the readers only locate images; decoding is the embed step's). `header`: more fields,
    e.g. PatientSex="F", PatientAge="045Y", ViewPosition="PA"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not HAVE_PYDICOM:
        path.write_bytes(b"\0" * 128 + b"DICM")
        return
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    pixels = np.random.default_rng(seed).integers(0, 4096, (size, size), dtype=np.uint16)
    dataset.Rows, dataset.Columns = size, size
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.SamplesPerPixel, dataset.PixelRepresentation = 1, 0
    dataset.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    dataset.PixelData = pixels.tobytes()
    with warnings.catch_warnings():  # pydicom warns about the deliberately garbled values
        warnings.simplefilter("ignore", UserWarning)
        for key, value in header.items():
            setattr(dataset, key, value)
    dataset.save_as(str(path), enforce_file_format=True)


# Header values as the real files write them, garbled and missing ones included, and what the
# kit records for each: (PatientSex, PatientAge, ViewPosition) -> (sex, age, view).
DICOM_HEADERS = [
    (("M", "045Y", "PA"), ("M", 45.0, "PA")),
    (("F", "006M", "AP"), ("F", 0.5, "AP")),
    (("F", "51", "PA"), ("F", 51.0, "PA")),  # RSNA and SIIM write bare years
    (("O", "000Y", "LL"), ("", np.nan, "LL")),  # other sex, an anonymiser's zero age
    ((" m ", "X1Y", ""), ("M", np.nan, "")),
    (("", "412Y", " ap"), ("", np.nan, "AP")),
    (None, ("", np.nan, "")),  # no fields at all
]


def dicom_header(index: int) -> dict:
    """The header fields of the index-th synthetic DICOM (cycling through DICOM_HEADERS)."""
    fields = DICOM_HEADERS[index % len(DICOM_HEADERS)][0]
    return {} if fields is None else dict(zip(("PatientSex", "PatientAge", "ViewPosition"), fields))


def _write_rows(path, header, rows, *, gz: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if gz else open
    with opener(path, "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _ternary(rng, n):
    return [rng.choice(["1.0", "0.0", "-1.0", "", ""]) for _ in range(n)]


def nih(folder: Path):
    write_dataset(folder, patients=6, images_per_patient=2, size=16)
    return folder, Options()


def chexpert(folder: Path):
    """The folder given is CheXpert-v1.0-small itself; Path values name it."""
    data_dir, rng = folder / "CheXpert-v1.0-small", np.random.default_rng(0)
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_CLASSES]
    for name, first_patient, count in (("train", 1, 8), ("valid", 64541, 3)):
        rows = []
        for patient in range(first_patient, first_patient + count):
            for view, frontal, ap_pa in (("view1_frontal", "Frontal", ("PA", "AP")[patient % 2]),
                                         ("view2_lateral", "Lateral", "")):
                relative = f"{name}/patient{patient:05d}/study1/{view}.jpg"
                write_png(data_dir / relative, seed=patient)
                rows.append([f"CheXpert-v1.0-small/{relative}", ("Male", "Female")[patient % 2], 40 + patient % 50,
                             frontal, ap_pa, *_ternary(rng, len(CHEXPERT_CLASSES))])
        _write_rows(data_dir / f"{name}.csv", header, rows)
    return data_dir, Options()


def mimic(folder: Path):
    rng = np.random.default_rng(1)
    labels, splits, meta = [], [], []
    for subject, split in ((10000001, "train"), (10000002, "train"), (11000003, "validate"), (12000004, "test")):
        for study in (50000000 + subject % 100 * 10, 50000001 + subject % 100 * 10):
            labels.append([subject, study, *_ternary(rng, len(CHEXPERT_CLASSES))])
            for dicom, view in ((f"d{study}a", "PA"), (f"d{study}b", "LATERAL")):
                splits.append([dicom, study, subject, split])
                meta.append([dicom, subject, study, "CHEST (PA AND LAT)", view, 16, 16, 21000101, 120000.0])
                write_png(folder / f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom}.jpg")
    prefix = "mimic-cxr-2.0.0-"
    _write_rows(folder / f"{prefix}chexpert.csv.gz", ["subject_id", "study_id", *CHEXPERT_CLASSES], labels, gz=True)
    _write_rows(folder / f"{prefix}split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], splits, gz=True)
    _write_rows(folder / f"{prefix}metadata.csv.gz",
                ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                 "Columns", "StudyDate", "StudyTime"], meta, gz=True)
    return folder, Options()


PADCHEST_HEADER = ["", "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
                   "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodLabel", "Labels"]


def padchest(folder: Path):
    rows = []
    cases = [("PA", "['normal']"), ("AP_horizontal", "['pleural effusion', ' cardiomegaly']"),
             ("L", "['nodule']"), ("PA", "['pneumonia', 'pleural effusion']"), ("AP", "['cardiomegaly']"),
             ("PA", "['mass']"), ("PA", "['atelectasis']"), ("AP", "['normal']")]
    for index, (projection, labels) in enumerate(cases):
        image_id, image_dir = f"{index:030d}_abc.png", (0, 54)[index % 2]  # folders not contiguous
        write_png(folder / str(image_dir) / image_id, bits=16, seed=index)
        rows.append([index, image_id, image_dir, "20150914", f"s{index}", f"{index // 2:032d}", "1950.0", "MF"[index % 2],
                     "POSTEROANTERIOR", projection, "Physician", labels])
    _write_rows(folder / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", PADCHEST_HEADER, rows)
    return folder, Options()


VINDR_CLASSES = ["Aortic enlargement", "Cardiomegaly", "Pleural effusion", "No finding"]


def vindr(folder: Path):
    rng = np.random.default_rng(2)
    train, test = [], []
    for image in range(6):
        image_id = f"{image:032x}"
        write_dicom(folder / "train" / f"{image_id}.dicom", seed=image, **dicom_header(image))
        for rater in ("R1", "R2", "R3"):
            train.append([image_id, rater, *rng.integers(0, 2, len(VINDR_CLASSES))])
    for image in range(6, 9):
        image_id = f"{image:032x}"
        write_dicom(folder / "test" / f"{image_id}.dicom", seed=image, **dicom_header(image))
        test.append([image_id, *rng.integers(0, 2, len(VINDR_CLASSES))])
    _write_rows(folder / "annotations/image_labels_train.csv", ["image_id", "rad_id", *VINDR_CLASSES], train)
    _write_rows(folder / "annotations/image_labels_test.csv", ["image_id", *VINDR_CLASSES], test)
    return folder, Options()


def rsna(folder: Path):
    rows = []
    for index in range(10):
        patient = f"{index:08x}-0000-0000-0000-000000000000"
        write_dicom(folder / "stage_2_train_images" / f"{patient}.dcm", seed=index, **dicom_header(index))
        boxes = index % 3 if index % 2 else 0
        rows += [[patient, 10, 20, 30, 40, 1] for _ in range(boxes)] or [[patient, "", "", "", "", 0]]
    _write_rows(folder / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    return folder, Options()


def siim(folder: Path):
    rows = []
    for index in range(10):
        image_id = f"1.2.276.0.7230010.3.1.4.8323329.{index}.1517875201.850819"
        write_dicom(folder / "dicom-images-train" / image_id / f"1.2.{index}" / f"{image_id}.dcm", seed=index,
                    **dicom_header(index))
        rows += [[image_id, "1 2 3 4"]] * (index % 3) if index % 2 else [[image_id, "-1"]]
    _write_rows(folder / "train-rle.csv", ["ImageId", " EncodedPixels"], rows)
    return folder, Options()


def own_csv(folder: Path):
    rows = []
    for index in range(12):
        path = f"scans/{index}.png"
        write_png(folder / path, seed=index)
        rows.append([path, f"p{index // 2}", ("train", "train", "val", "test")[index // 2 % 4],
                     ("1", "0", "-1", "")[index % 4], ("0", "1", "", "-1.0")[index % 4]])
    labels_csv = _write_rows(folder / "labels.csv", ["path", "patient_id", "split", "Effusion", "Mass"], rows)
    return folder, Options(labels_csv=str(labels_csv))


WRITERS = {"nih": nih, "chexpert": chexpert, "mimic": mimic, "padchest": padchest, "vindr": vindr, "rsna": rsna,
           "siim": siim, "csv": own_csv}
