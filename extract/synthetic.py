"""A small synthetic dataset in the NIH layout, for tests, the demo and benchmarks.

    python -m extract.synthetic --out outputs/synthetic --patients 120

Writes Data_Entry_2017_v2020.csv (or the 2017 variant), train_val_list.txt, test_list.txt and
8-bit gray PNGs in images_001/images/ ... Each finding plants its own pattern (a grating with a
class-specific frequency and orientation in a class-specific place), strong enough that a head
on features of even a randomly initialised ResNet50 scores well above chance.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from cache.schema import CLASSES
from extract.nih import NO_FINDING

PREVALENCE = 0.15  # per class, independently: about 10% of images have no finding
# Like NIH's text-mined labels, the planted signal disagrees with the label now and then,
# so that no head can reach an AUC of 1 and settings have something to win.
SHOWN_IF_POSITIVE, SHOWN_IF_NEGATIVE = 0.8, 0.05


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("python -m extract.synthetic", add_help=add_help,
                                     description="Write a synthetic NIH-layout dataset.")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--patients", type=int, default=120)
    parser.add_argument("--images-per-patient", type=int, default=3)
    parser.add_argument("--size", type=int, default=256, help="image side (NIH: 1024)")
    parser.add_argument("--test-fraction", type=float, default=0.25, help="patients in test_list.txt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv-format", default="v2020", choices=["v2020", "2017"])
    parser.add_argument("--folders", type=int, default=2, help="images_001 ... images_NNN folders (0: flat images/)")
    return parser


def main(args) -> int:
    summary = write_dataset(args.out, patients=args.patients, images_per_patient=args.images_per_patient,
                            size=args.size, test_fraction=args.test_fraction, seed=args.seed,
                            csv_format=args.csv_format, folders=args.folders)
    print(f"wrote {summary['images']} images of {args.patients} patients to {args.out}")
    return 0


def write_dataset(out, *, patients: int, images_per_patient: int, size: int, test_fraction: float = 0.25,
                  seed: int = 0, csv_format: str = "v2020", folders: int = 2, distinct: int | None = None) -> dict:
    """Write the dataset; returns {'images': count, 'labels': (N, 14) array, 'image_ids': list}.
    `distinct`: draw only that many images and link them for the rest (same decode cost, for
    speed benchmarks that need thousands of 1024x1024 files quickly; labels then mean nothing)."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    image_ids, patient_ids, labels = [], [], []
    for patient in range(1, patients + 1):
        for follow_up in range(images_per_patient):
            image_ids.append(f"{patient:08d}_{follow_up:03d}.png")
            patient_ids.append(patient)
            labels.append((rng.random(len(CLASSES)) < PREVALENCE).astype(np.uint8))
    labels = np.array(labels)
    written = []
    for index, (image_id, label) in enumerate(zip(image_ids, labels)):
        folder = out / (f"images_{index % folders + 1:03d}/images" if folders else "images")
        folder.mkdir(parents=True, exist_ok=True)
        if distinct and index >= distinct:
            _link_or_copy(written[index % distinct], folder / image_id)
        else:
            Image.fromarray(synthetic_image(label, size=size, rng=rng)).save(folder / image_id)
        written.append(folder / image_id)
    _write_csv(out, image_ids, patient_ids, labels, csv_format=csv_format, rng=rng)
    test_patients = set(rng.permutation(patients)[: int(round(test_fraction * patients))] + 1)
    is_test = [p in test_patients for p in patient_ids]
    (out / "test_list.txt").write_text("".join(f"{i}\n" for i, t in zip(image_ids, is_test) if t))
    (out / "train_val_list.txt").write_text("".join(f"{i}\n" for i, t in zip(image_ids, is_test) if not t))
    return {"images": len(image_ids), "labels": labels, "image_ids": image_ids}


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link costs no disk and no time; decoding it costs as much as a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def synthetic_image(label: np.ndarray, *, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) uint8: a smooth chest-like background, noise, and one grating per finding
    (with the label noise above)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    lungs = np.exp(-(((xx - 0.3) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2)) + \
        np.exp(-(((xx - 0.7) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    image = 150 - 70 * lungs + rng.normal(0, 6, (size, size))
    draws = rng.random(len(label))
    shown = np.where(label == 1, draws < SHOWN_IF_POSITIVE, draws < SHOWN_IF_NEGATIVE)
    for index in np.flatnonzero(shown):
        image += _planted_pattern(index, xx, yy)
    return np.clip(image, 0, 255).astype(np.uint8)


def _planted_pattern(index: int, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    cx, cy = 0.2 + 0.2 * (index % 4), 0.2 + 0.2 * (index // 4)
    frequency, angle = 6 + 3 * (index % 5), np.pi * index / len(CLASSES)
    window = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / 0.012))
    wave = np.sin(2 * np.pi * frequency * (np.cos(angle) * xx + np.sin(angle) * yy))
    return 20 * window * wave


def _write_csv(out: Path, image_ids, patient_ids, labels, *, csv_format: str, rng) -> None:
    lines = []
    for image_id, patient, label in zip(image_ids, patient_ids, labels):
        findings = "|".join(CLASSES[i] for i in np.flatnonzero(label)) or NO_FINDING
        follow_up, age = int(image_id[9:12]), int(rng.integers(20, 80))
        sex, view = ("M", "F")[patient % 2], ("PA", "AP")[follow_up % 2]
        if csv_format == "2017":  # zero-padded ids, "058Y" ages (and a trailing comma in the header)
            lines.append(f"{image_id},{findings},{follow_up:03d},{patient:05d},{age:03d}Y,{sex},{view},1024,1024,0.143,0.143")
        else:
            lines.append(f"{image_id},{findings},{follow_up},{patient},{age},{sex},{view},1024,1024,0.143,0.143")
    if csv_format == "2017":
        header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                  "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
        name = "Data_Entry_2017.csv"
    else:
        header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                  "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
        name = "Data_Entry_2017_v2020.csv"
    (out / name).write_text(header + "\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
