"""The label vocabulary: traps between sources, coverage of every staged and documented code."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ecgvlm import labels as L

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_af_trap_cpsc_fibrillation_chapman_flutter():
    # CPSC "AF" is atrial fibrillation; Chapman-Shaoxing "AF" is atrial flutter, "AFIB" is
    # fibrillation. Canonical AF = fibrillation (Challenge), AFL = flutter.
    assert L.canonical_label("cpsc2018", "AF") == "AF"
    assert L.canonical_label("chapman_shaoxing", "AF") == "AFL"
    assert L.canonical_label("chapman_shaoxing", "AFIB") == "AF"
    assert L.FINDINGS["AF"].name == "atrial fibrillation"
    assert L.FINDINGS["AF"].snomed == "164889003"
    assert L.FINDINGS["AFL"].name == "atrial flutter"
    assert L.FINDINGS["AFL"].snomed == "164890007"
    # The same concept by SNOMED code, whatever the dataset.
    assert L.canonical_label("chapman_shaoxing", "164890007") == "AFL"
    assert L.canonical_label("georgia", "164889003") == "AF"


def test_other_traps_between_sources():
    # CPSC STE = ST elevation; Chapman STE = "ST extension" (164930006), STTU = elevation.
    assert L.canonical_label("cpsc2018", "STE") == "STE"
    assert L.canonical_label("chapman_shaoxing", "STE") == "NSSTTA"
    assert L.canonical_label("chapman_shaoxing", "STTU") == "STE"
    # Chapman VEB = ventricular escape beat; Challenge 164884008 "VEB" = ventricular ectopics.
    assert L.canonical_label("chapman_shaoxing", "VEB") == "VEsB"
    assert L.canonical_label("cpsc2018", "164884008") == "PVC"
    # Chapman ST = sinus tachycardia, not an ST-segment finding.
    assert L.canonical_label("chapman_shaoxing", "ST") == "STach"
    # An abbreviation means nothing in a SNOMED-only dataset: kept as an explicit unknown.
    assert L.canonical_label("georgia", "AF") == "UNK:AF"


def test_cpsc_numeric_classes_match_abbreviations():
    abbrevs = ["Normal", "AF", "I-AVB", "LBBB", "RBBB", "PAC", "PVC", "STD", "STE"]
    for number, abbrev in enumerate(abbrevs, start=1):
        assert L.canonical_label("cpsc2018", str(number)) == L.canonical_label("cpsc2018", abbrev)


def test_unknown_codes_are_explicit_and_named():
    label = L.canonical_label("georgia", "999999")
    assert label == "UNK:999999"
    assert L.is_unknown(label)
    assert L.label_name(label) == "unknown code 999999"
    assert L.canonical_labels("georgia", ["426783006", "999999", " "]) == ("NSR", "UNK:999999")
    with pytest.raises(KeyError):
        L.label_name("NOT_A_LABEL")
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        L.canonical_label("nope", "AF")


def test_synonyms_merge_into_one_label():
    # Chapman MI subtypes and LBBB variants share one SNOMED code each.
    assert {L.canonical_label("chapman", c) for c in ["MI", "MIBW", "MIFW", "MILW", "MISW"]} == {
        "MI"
    }
    assert {L.canonical_label("chapman", c) for c in ["LBBB", "LBBBB", "LFBBB"]} == {"LBBB"}
    assert L.canonical_labels("cpsc2018_extra", ["713426002", "713427006", "59118001"]) == (
        "IRBBB",
        "RBBB",
    )


def test_vocabulary_is_well_formed():
    vocab = L.FINDINGS
    snomeds = [f.snomed for f in vocab.values()]
    assert len(set(snomeds)) == len(snomeds), "two findings share a SNOMED code"
    for abbrev, f in vocab.items():
        assert f.abbrev == abbrev
        assert f.snomed.isdigit() and f.name and f.kind in L.KINDS
        # Each finding maps from its own SNOMED code.
        assert L.canonical_label("georgia", f.snomed) == abbrev
    assert L.emittable_labels() == sorted(vocab)
    for ds in L.DATASETS:
        assert set(L.emittable_labels(ds)) <= set(vocab)


def test_dataset_names_normalise():
    assert L.normalize_dataset("ptb-xl") == "ptbxl"
    assert L.normalize_dataset("MIT-BIH") == "mitdb"
    assert L.normalize_dataset("cpsc2018_extra") == "cpsc2018_extra"
    assert L.normalize_dataset("Chapman") == "chapman_shaoxing"


def test_mitdb_beats_and_rhythms():
    assert L.beat_finding("V") == "PVC"
    assert L.aami_class("V") == "V"
    assert L.beat_finding("N") is None and L.aami_class("N") == "N"
    assert L.aami_class("A") == "S" and L.beat_finding("A") == "PAC"
    assert L.aami_class("F") == "F" and L.aami_class("/") == "Q"
    assert L.aami_class("+") is None and not L.is_beat("+")
    assert L.canonical_label("mitdb", "(AFL\x00") == "AFL"  # NUL-padded aux as in 100.atr
    assert L.canonical_label("mitdb", "(AFIB") == "AF"
    assert L.canonical_label("mitdb", "(B") == "VBig"


def _labels_md_rows(text: str, heading: str) -> list[list[str]]:
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append(
                [c.strip().strip("`").replace("\\|", "|") for c in line.strip("|").split("|")]
            )
    return rows[1:]  # drop the header row


def test_every_documented_code_maps(shared_ecg_dir):
    """Every code in LABELS.md's tables maps into the vocabulary (no UNK)."""
    text = (shared_ecg_dir / "LABELS.md").read_text()
    cpsc = _labels_md_rows(text, "## 1. CPSC 2018")
    assert len(cpsc) == 9
    for number, abbrev, _meaning, snomed, *_ in cpsc:
        label = L.canonical_label("cpsc2018", abbrev)
        assert (
            label == L.canonical_label("cpsc2018", number) == L.canonical_label("georgia", snomed)
        )
    rhythms = _labels_md_rows(text, "### Rhythms (11)")
    conditions = _labels_md_rows(text, "### Other conditions")
    assert len(rhythms) == 11 and len(conditions) > 40
    for acronym, _name, snomed, *_ in rhythms + conditions:
        label = L.canonical_label("chapman_shaoxing", acronym)
        assert not L.is_unknown(label), acronym
        # Where both the acronym and its SNOMED code map, they agree.
        by_code = L.canonical_label("chapman_shaoxing", snomed)
        assert by_code == label, (acronym, snomed, label, by_code)
    beats = _labels_md_rows(text, "### Annotation symbols")
    beat_symbols = re.search(r"Beat symbols: ([^.]+)\.", text).group(1).split()
    for symbol in beat_symbols:
        assert L.aami_class(symbol) in L.AAMI_CLASSES, symbol
    assert {row[0] for row in beats} & set(beat_symbols) <= set(L.beat_types())
    aux = _labels_md_rows(text, "### Rhythm strings")
    for code, meaning, _count in aux:
        if meaning.startswith("comment"):
            continue
        assert not L.is_unknown(L.canonical_label("mitdb", code)), code


def test_every_staged_header_code_maps(shared_ecg_dir):
    """Every code in every staged 12-lead labels.csv maps, and agrees with its SNOMED column."""
    n = 0
    for path in sorted(shared_ecg_dir.glob("*/labels.csv")):
        dataset = path.parent.name
        with path.open() as fh:
            for row in csv.DictReader(fh):
                codes = row["dx_as_in_header"].split(";")
                snomed = row["snomed_codes"].split(";")
                got = [L.canonical_label(dataset, c) for c in codes]
                assert not any(L.is_unknown(g) for g in got), (dataset, row["record"], got)
                assert got == [L.canonical_label("georgia", s) for s in snomed]
                n += 1
    assert n >= 90


def test_findings_load_lazily():
    code = (
        "import ecgvlm.labels as L; assert L.findings.cache_info().currsize == 0; "
        "L.FINDINGS; assert L.findings.cache_info().currsize == 1"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
