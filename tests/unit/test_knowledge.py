"""The clinical knowledge base against the label vocabulary."""

from __future__ import annotations

import re

import pytest

from ecgvlm import knowledge as kn
from ecgvlm import labels


@pytest.mark.parametrize("dataset", [None, *labels.DATASETS])
def test_every_emittable_label_has_an_entry(dataset):
    emittable = labels.emittable_labels(dataset)
    assert emittable, dataset
    assert kn.missing_entries(emittable) == []


def test_entries_agree_with_the_vocabulary():
    kb = kn.knowledge_base()
    assert set(kb) <= set(labels.FINDINGS), "knowledge names a finding the vocabulary lacks"
    for abbrev, entry in kb.items():
        finding = labels.FINDINGS[abbrev]
        assert entry.abbrev == abbrev
        assert entry.snomed == finding.snomed, abbrev
        assert entry.name.lower() == finding.name.lower(), abbrev


def test_entries_are_complete_and_cross_referenced():
    kb = kn.knowledge_base()
    cites = kn.guidelines()
    for abbrev, e in kb.items():
        assert len(e.summary) >= 40 and e.summary.endswith("."), abbrev
        assert len(e.description) > len(e.summary), abbrev
        assert len(e.key_features) >= 2, abbrev
        assert e.confusable, abbrev
        assert abbrev not in e.confusable and abbrev not in e.overlaps
        assert set(e.confusable) | set(e.overlaps) | set(e.distractor_only_with) <= set(kb)
        assert e.guideline_citation == cites[e.guideline]
        assert re.search(r"(19|20)\d\d", e.guideline_citation), e.guideline
        # Overlap is mutual after loading.
        for other in e.overlaps:
            assert abbrev in kb[other].overlaps, (abbrev, other)


@pytest.mark.parametrize(
    "a,b",
    [("RBBB", "LBBB"), ("AF", "AFL"), ("PAC", "PVC"), ("STD", "STE"), ("SB", "NSR"),
     ("STach", "NSR"), ("MoI", "IIAVBII")],
)
def test_classic_look_alikes_are_confusable_both_ways(a, b):
    kb = kn.knowledge_base()
    assert b in kb[a].confusable and a in kb[b].confusable


def test_rbbb_criteria_follow_aha_part_iii():
    rbbb = kn.knowledge("RBBB")
    assert rbbb.guideline == "aha2009_ivcd"
    assert "Part III" in rbbb.guideline_citation
    text = rbbb.summary + " " + rbbb.description
    for criterion in ("120 ms", "rsR'", "V1", "slurred S", "V6"):
        assert criterion in text


def test_unknown_labels_have_no_entry():
    with pytest.raises(KeyError, match="explicit unknown"):
        kn.knowledge("UNK:12345")
    with pytest.raises(KeyError, match="not a known finding"):
        kn.knowledge("NOPE")
    assert kn.missing_entries(["RBBB", "UNK:1", "NOPE"]) == ["NOPE"]


def test_option_text_names_the_finding():
    assert kn.knowledge("AF").option_text.startswith("Atrial fibrillation: Irregularly")
