"""The report generator: every word it writes, in one place.

No public volume-report pairs can be had here, so the vision-language objectives train on
*generated reports*: sentences written from what the project knows about a study (a phantom's
findings, each with its size and side; a real scan's label map: the structures present, their
volume and side). Every figure that depends on them must say "generated reports".

- `FINDINGS`: the findings the phantom studies carry, each with its zero-shot prompt ("X"; the
  negative prompt is "no X") and the nouns, templates and normal sentences that describe it.
- `describe_findings`: a report for a phantom study (findings present, some normal sentences).
- `describe_structures`: a report for a real study, from the structures of its label maps.
- `report_sentences` / `compose_report`: sentences shuffled per training step behind the fixed
  prefix ("This MRI study shows: "), as in HLIP.

Pure python + numpy (a `numpy.random.Generator` draws the wording).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

REPORT_PREFIX = "This {modality} study shows: "  # the fixed prefix before every report and prompt
NEGATION = "no {}"  # the negative prompt of a finding "X" in zero-shot scoring


@dataclass(frozen=True)
class FindingWords:
    """How one kind of finding is written."""

    modality: str  # "CT" or "MRI": the studies that can carry it
    prompt: str  # the zero-shot prompt "X" ("no X" is its negative)
    templates: tuple[str, ...]  # sentences with {size} (mm), {where}, {noun}, {volume} (ml) fields
    nouns: tuple[str, ...] = ("lesion",)
    normal: tuple[str, ...] = ()  # sentences that say it is absent


FINDINGS: dict[str, FindingWords] = {
    "liver_lesion": FindingWords(
        "CT", "liver lesion",
        ("A {size} mm {noun} in the {where}.", "There is a {size} mm {noun} in the {where}.",
         "{Where}: {noun} measuring {size} mm.", "{Size_word} {noun} ({size} mm) in the {where}.",
         "The {where} contains a {size_word} {noun} of {size} mm."),
        ("hypodense lesion", "focal lesion", "liver lesion", "low-attenuation lesion", "hepatic lesion"),
        ("No focal liver lesion.", "The liver is unremarkable.", "No liver lesion.", "Homogeneous liver parenchyma."),
    ),
    "spleen_lesion": FindingWords(
        "CT", "spleen lesion",
        ("A {size} mm {noun} in the spleen.", "The spleen contains a {size_word} {noun} ({size} mm).",
         "{Size_word} {noun} of the spleen, {size} mm.", "Splenic {noun} measuring {size} mm."),
        ("hypodense lesion", "focal lesion", "lesion", "low-attenuation lesion"),
        ("No focal splenic lesion.", "No spleen lesion.", "The splenic parenchyma is homogeneous."),
    ),
    "kidney_lesion": FindingWords(
        "CT", "kidney lesion",
        ("A {size} mm {noun} in the {where}.", "{Where}: {size_word} {noun} of {size} mm.",
         "There is a {noun} in the {where} measuring {size} mm.", "{Size_word} renal {noun} ({size} mm), {side} side."),
        ("hypodense lesion", "cyst", "renal lesion", "kidney lesion", "focal lesion"),
        ("No renal lesion.", "No kidney lesion.", "Both kidneys are unremarkable.", "Normal kidneys."),
    ),
    "splenomegaly": FindingWords(
        "CT", "enlarged spleen",
        ("The spleen is enlarged ({volume} ml).", "Splenomegaly, spleen volume {volume} ml.",
         "Enlarged spleen measuring {volume} ml.", "The spleen is enlarged, {size} mm in craniocaudal length."),
        ("spleen",),
        ("The spleen is normal in size.", "No enlarged spleen.", "No splenomegaly.", "Normal-sized spleen."),
    ),
    "metal_implant": FindingWords(
        "CT", "metal implant",
        ("A {size} mm {noun} in the {where}.", "{Noun} ({size} mm) on the {side} side, with streak artefact.",
         "There is a {noun} in the {where}.", "{Size_word} {noun} in the {where}, {size} mm."),
        ("metal implant", "metallic implant", "metal object", "radiopaque implant"),
        ("No metal implant.", "No metallic foreign body.", "No implant is seen."),
    ),
    "brain_tumour": FindingWords(
        "MRI", "brain tumour",
        ("A {size} mm {noun} in the {where} with {enhancement} on post-contrast T1 and {oedema}.",
         "{Size_word} {noun} ({size} mm) in the {where}: {enhancement} after contrast, {necrosis}, and {oedema}.",
         "There is a {noun} in the {where} measuring {size} mm, with {oedema} and {enhancement}.",
         "{Where}: {noun} of {size} mm with {necrosis}; {oedema}."),
        ("mass", "tumour", "brain tumour", "glioma", "intra-axial mass"),
        ("No intracranial mass.", "No brain tumour.", "Normal brain parenchyma.", "No abnormal enhancement.",
         "No FLAIR signal abnormality."),
    ),
}

# The brain tumour's look on the contrasts (the phantom's: enhancing rim on t1c, oedema bright on t2w / t2f).
TUMOUR_WORDS = {
    "enhancement": ("ring enhancement", "rim enhancement", "peripheral enhancement", "irregular enhancement"),
    "oedema": ("surrounding FLAIR hyperintense oedema", "perilesional oedema bright on FLAIR and T2",
               "vasogenic oedema around it, hyperintense on FLAIR"),
    "necrosis": ("central necrosis", "a necrotic core", "central non-enhancing necrosis"),
}
SIZE_WORDS = ((15.0, ("small", "small")), (30.0, ("moderate", "medium-sized")), (np.inf, ("large", "large")))
LIVER_PLACES = {"right": ("right lobe of the liver", "right hepatic lobe"), "left": ("left lobe of the liver", "left hepatic lobe")}
KIDNEY_PLACES = {"right": ("right kidney",), "left": ("left kidney",)}
IMPLANT_PLACES = {"right": ("right abdomen", "right flank", "right side of the abdomen"),
                  "left": ("left abdomen", "left flank", "left side of the abdomen")}
BRAIN_PLACES = {"right": ("right cerebral hemisphere", "right hemisphere"),
                "left": ("left cerebral hemisphere", "left hemisphere")}
PLACES = {"liver_lesion": LIVER_PLACES, "kidney_lesion": KIDNEY_PLACES, "metal_implant": IMPLANT_PLACES,
          "brain_tumour": BRAIN_PLACES}

# Real studies: label names as words, and the sentences about the structures of a label map.
STRUCTURE_TEMPLATES = (
    "The {name} is seen ({volume} ml{side_part}).", "{Name}: {volume} ml{side_part}.",
    "{Name} present, volume {volume} ml{side_part}.", "The {name} measures {volume} ml{side_part}.",
)
LESION_TEMPLATES = (
    "A {volume} ml {name}{side_part}.", "{Name} of {volume} ml{side_part}.", "There is {a_name} ({volume} ml){side_part}.",
)
SIDE_PARTS = (", {side}", ", on the {side}", ", {side} side")
LESION_WORDS = ("tumor", "tumour", "lesion", "necro", "edema", "oedema", "enhancing", "mass", "metasta", "cyst")
EMPTY_REPORT = ("No labelled structure.", "Nothing labelled in this study.")


@dataclass
class Finding:
    """One finding of a study: its kind (a key of FINDINGS), size in mm, side and volume in ml."""

    kind: str
    size_mm: float = 0.0
    side: str = ""  # "right", "left" or "" (none)
    volume_ml: float = 0.0


def size_word(size_mm: float, rng: np.random.Generator) -> str:
    for limit, words in SIZE_WORDS:
        if size_mm < limit:
            return str(rng.choice(words))
    return "large"


def describe_finding(finding: Finding, rng: np.random.Generator) -> str:
    """One sentence about `finding`, its wording drawn from `rng`."""
    words = FINDINGS[finding.kind]
    places = PLACES.get(finding.kind, {}).get(finding.side, ("spleen",))
    fields = {
        "size": f"{finding.size_mm:.0f}",
        "volume": f"{finding.volume_ml:.0f}",
        "where": str(rng.choice(places)),
        "noun": str(rng.choice(words.nouns)),
        "side": finding.side or "left",
        "size_word": size_word(finding.size_mm, rng),
        **{key: str(rng.choice(options)) for key, options in TUMOUR_WORDS.items()},
    }
    fields.update({key.capitalize(): _capital(value) for key, value in list(fields.items())})
    return _capital(str(rng.choice(words.templates)).format(**fields))


def describe_findings(findings: list[Finding], modality: str, rng: np.random.Generator, p_normal: float = 0.6) -> list[str]:
    """The sentences of a phantom study's report: each finding, then (each with `p_normal`, at least one
    when there is no finding) a normal sentence for the kinds of `modality` it does not have."""
    sentences = [describe_finding(f, rng) for f in findings]
    present = {f.kind for f in findings}
    absent = [w for k, w in FINDINGS.items() if w.modality == modality and k not in present and w.normal]
    normal = [str(rng.choice(w.normal)) for w in absent if rng.random() < p_normal]
    if not sentences and not normal and absent:  # a report never stays empty
        normal = [str(rng.choice(absent[rng.integers(len(absent))].normal))]
    return sentences + normal


@dataclass
class Structure:
    """A labelled structure of a real scan: its name, volume in ml and side ("right", "left", "midline")."""

    name: str
    volume_ml: float
    side: str


def structure_words(name: str) -> tuple[str, str | None]:
    """A label name as words, and the side it names: "kidney_left" -> ("kidney", "left")."""
    words = re.sub(r"[_\-]+", " ", name).strip().lower()
    for side in ("left", "right"):
        if re.search(rf"\b{side}\b", words):
            return re.sub(rf"\s*\b{side}\b\s*", " ", words).strip(), side
    return words, None


def describe_structures(structures: list[Structure], rng: np.random.Generator) -> list[str]:
    """The sentences of a real study's generated report: one per labelled structure."""
    if not structures:
        return [str(rng.choice(EMPTY_REPORT))]
    sentences = []
    for s in structures:
        words, named_side = structure_words(s.name)
        lesion = any(w in words for w in LESION_WORDS)
        if named_side and not lesion and rng.random() < 0.5:
            words, named_side = f"{named_side} {words}", None  # "left kidney" instead of "kidney, left"
        side = named_side or s.side
        side_part = "" if not side or side in words else ", midline" if side == "midline" else \
            str(rng.choice(SIDE_PARTS)).format(side=side)
        template = str(rng.choice(LESION_TEMPLATES if lesion else STRUCTURE_TEMPLATES))
        article = "an" if words[:1] in "aeiou" else "a"
        sentences.append(template.format(name=words, Name=_capital(words), a_name=f"{article} {words}",
                                         volume=_volume_text(s.volume_ml), side_part=side_part))
    return sentences


def _volume_text(ml: float) -> str:
    return f"{ml:.1f}" if ml < 10 else f"{ml:.0f}"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def report_prefix(modality: str) -> str:
    """The fixed prefix of a report or prompt: "This CT study shows: " ("MRI", else "imaging")."""
    name = modality.upper() if modality and modality.upper() in ("CT", "MRI") else "imaging"
    return REPORT_PREFIX.format(modality=name)


def report_sentences(report: str) -> list[str]:
    """A report's sentences (split after '.', '!' or '?' followed by a space)."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", report.strip()) if s.strip()]


def compose_report(report: str, modality: str, rng: np.random.Generator | None = None) -> str:
    """The text a model reads: the prefix, then the report's sentences (shuffled when `rng` is given)."""
    sentences = report_sentences(report)
    if rng is not None:
        sentences = [sentences[i] for i in rng.permutation(len(sentences))]
    return report_prefix(modality) + " ".join(sentences)


def prompt_pair(finding: str, modality: str = "") -> tuple[str, str]:
    """The zero-shot prompts of a finding "X": ("<prefix>X.", "<prefix>no X.")."""
    text = finding.strip().rstrip(".")
    return report_prefix(modality) + text + ".", report_prefix(modality) + NEGATION.format(text) + "."
