"""The project's constants, each defined once. `docs/architecture.md` has the glossary of the words."""

from __future__ import annotations

# Shipped models (folders under model_core/shipped/, loadable by name).
DEFAULT_ENCODER = "ar3d-encoder"  # the pretrained encoder: explain, and the start of every fine-tune
DEFAULT_SEGMENTER = "ar3d-ct-organs"  # the phantom demo's segmentation model
DEMO_ORGANS = ("liver", "spleen")  # what `ar3d demo`'s simulated user may paint on the shipped CT
ENCODER_ENV = "AR3D_ENCODER"  # a checkpoint folder that stands in for DEFAULT_ENCODER
SCRATCH = "scratch"  # "no pretrained encoder": a new, randomly initialised one

# Image modality. A checkpoint records what it was trained on ("CT", "MRI" or "any"); intensity
# normalisation has one kind per modality ("ct": an HU window, "mri": percentile scaling).
MODALITIES = ("CT", "MRI")  # what a user passes (--modality) and a checkpoint records, besides "any"
MODALITY_ANY = "any"
INTENSITY_KINDS = ("ct", "mri")  # IntensityConfig.kind: "CT" -> "ct", "MRI" -> "mri"
CT_FULL_HU = (-1000.0, 1000.0)  # the pretraining window of CT: air to dense bone
CT_SOFT_TISSUE_HU = (-160.0, 240.0)  # the radiologist's abdominal soft-tissue window (level 40, width 400)

# Geometry of the model's input.
MODEL_SPACING = (1.5, 1.5, 1.5)  # mm along R, A, S when a checkpoint records none
PRETRAIN_WINDOW = (128, 128, 32)  # voxels of one pretraining sub-volume (crop, crop, slab), as in AR-SSL4M
WINDOW_PATCHES = 6  # a segmentation window's edge in patches (96 voxels for 16^3 patches)

# Pretraining.
ENCODER_SIZES = ("tiny", "small", "base")  # ViT3DConfig.preset names
SEQUENCE_KINDS = ("spatial", "contrast", "semantic")  # the three kinds of pretraining sequence
MAX_STUDY_SCANS = 40  # scans one study may hold (HLIP's fixed scan-index table)
HLIP_SCANS = 4  # scans per HLIP training sample (a study with fewer repeats some)
CONTRASTS = ("t1n", "t1c", "t2w", "t2f")  # the four co-registered MRI contrasts of a contrast sequence
CONTRAST_ALIASES = {  # other names of those contrasts in file names (BraTS 2021+ names are the canonical ones)
    "t1": "t1n", "t1pre": "t1n", "t1native": "t1n",
    "t1post": "t1c", "t1ce": "t1c", "t1gd": "t1c",
    "t2": "t2w", "flair": "t2f",
}

# Fine-tuning. "Training mode" is what trains: the decoder alone on a frozen encoder ("head") or
# everything ("full"). "Annotation" is how a label map was painted: "dense" (every voxel labelled,
# 0 background) or "sparse" (scribbles, 0 unpainted).
TRAINING_MODES = ("head", "full")
ANNOTATIONS = ("dense", "sparse")
DEFAULT_STEPS = {"head": 400, "full": 300}  # optimizer steps of a fine-tune
DEFAULT_LR = {"head": 1e-3, "full": 1e-4}  # peak learning rate of a fine-tune
IGNORE = 255  # training-target value of unannotated voxels (sparse annotation, padding)

# Compute.
DEVICES = ("auto", "cpu", "cuda", "mps")  # "auto": cuda, then mps, then cpu; also "cuda:N"
DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps"
AMP_MODES = ("auto", "bf16", "off")  # bf16 autocast: where supported, always, never
