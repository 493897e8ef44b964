"""The shared label vocabulary: each dataset's label names mapped onto one set of names, so
that a head trained on one dataset can be scored on another's classes.

The shared names are NIH ChestX-ray14's spellings where NIH has the finding, else the
CheXpert observation's. A dataset's label that is spelled exactly like a shared name maps to
it without an entry here; a label with no counterpart keeps its own name (it is shared with
no other dataset). Only one-to-one meanings are mapped: PadChest's `mass` is Mass, but
VinDr's `Nodule/Mass` stays its own (it is neither NIH class alone).
"""
from __future__ import annotations

SHARED = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
    "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
    "No Finding", "Lung Opacity", "Lung Lesion", "Fracture", "Enlarged Cardiomediastinum", "Support Devices",
)

ALIASES = {
    "chexpert": {"Pleural Effusion": "Effusion"},
    "mimic": {"Pleural Effusion": "Effusion"},
    "padchest": {
        "atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly", "consolidation": "Consolidation",
        "pulmonary edema": "Edema", "pleural effusion": "Effusion", "emphysema": "Emphysema",
        "pulmonary fibrosis": "Fibrosis", "hiatal hernia": "Hernia", "infiltrates": "Infiltration",
        "mass": "Mass", "nodule": "Nodule", "pleural thickening": "Pleural_Thickening", "pneumonia": "Pneumonia",
        "pneumothorax": "Pneumothorax", "normal": "No Finding",
    },
    "vindr": {
        "Pleural effusion": "Effusion", "Pleural thickening": "Pleural_Thickening", "Pulmonary fibrosis": "Fibrosis",
        "No finding": "No Finding",
    },
}


def shared_name(dataset: str, label: str) -> str:
    """The shared name of `dataset`'s label `label` (its own name where it has no counterpart)."""
    return ALIASES.get(dataset, {}).get(label, label)


def mapping(dataset: str, classes) -> dict:
    """{own name: shared name} for a cache's classes."""
    return {label: shared_name(dataset, label) for label in classes}


def describe(dataset: str, classes) -> list[str]:
    """One line per class: `own -> shared`, or `own (no counterpart)`."""
    lines = []
    for own, shared in mapping(dataset, classes).items():
        if shared != own:
            lines.append(f"{own} -> {shared}")
        else:
            lines.append(own if own in SHARED else f"{own} (no counterpart)")
    return lines
