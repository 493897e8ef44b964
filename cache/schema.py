"""The names the cache contract is written in: the 14 classes (label column order) and the
three split names. Every stage imports them from here; nothing else spells them out."""

CLASSES = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema",
    "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening",
    "Pneumonia", "Pneumothorax",
)
TRAIN, VAL, TEST = "train", "val", "test"
SPLITS = (TRAIN, VAL, TEST)
# A label nobody gave: masked by the uncertain policy, not mentioned, or not annotated.
UNKNOWN = 255
