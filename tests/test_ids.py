"""Typed scan identifiers: parsing, formatting and BIDS labels."""

from __future__ import annotations

import pytest

from atlas_curate.ids import IdError, IndiScanId, ScanId


@pytest.mark.parametrize("text, parts", [
    ("c0001s0001t01", (1, 1, 1)),
    ("c0011s0042t02", (11, 42, 2)),
    ("c9999s9999t99", (9999, 9999, 99)),
])
def test_scan_id_parse_and_str_round_trip(text, parts):
    scan = ScanId.parse(text)
    assert (scan.cohort, scan.subject, scan.timepoint) == parts
    assert str(scan) == text
    assert ScanId.parse(str(scan)) == scan
    assert scan.cohort_id == text[:5]
    assert scan.subject_id == text[:10]


def test_scan_id_tolerates_surrounding_whitespace():
    assert ScanId.parse(" c0002s0003t01\n") == ScanId(2, 3, 1)


@pytest.mark.parametrize("text", [
    "", "c001s0001t01", "c0001s001t01", "c0001s0001t1", "C0001S0001T01", "c0001s0001t01x",
    "c0001s0001", "x0001s0001t01", "c0001_s0001_t01", "sub-c0001s0001",
])
def test_scan_id_invalid_raises(text):
    with pytest.raises(IdError):
        ScanId.parse(text)


def test_scan_id_out_of_range_and_ordering():
    with pytest.raises(IdError):
        ScanId(10000, 1, 1)
    with pytest.raises(IdError):
        ScanId(1, 1, 100)
    assert issubclass(IdError, ValueError)
    scans = [ScanId.parse(t) for t in ("c0002s0001t01", "c0001s0002t01", "c0001s0001t02", "c0001s0001t01")]
    assert [str(s) for s in sorted(scans)] == ["c0001s0001t01", "c0001s0001t02", "c0001s0002t01", "c0002s0001t01"]


def test_bids_labels_native_and_atlas2():
    scan = ScanId.parse("c0001s0001t01")
    assert scan.bids_labels() == ("c0001s0001", "t01")
    assert scan.bids_labels("native") == ("c0001s0001", "t01")
    assert scan.bids_labels("atlas2") == ("r001s001", "1")
    assert ScanId.parse("c0012s0345t02").bids_labels("atlas2") == ("r012s345", "2")
    assert ScanId.parse("c0003s1234t01").bids_labels("atlas2") == ("r003s1234", "1")
    with pytest.raises(IdError):
        ScanId.parse("c1000s0001t01").bids_labels("atlas2")
    with pytest.raises(IdError):
        scan.bids_labels("bids2")


@pytest.mark.parametrize("text", ["c0001s0001t01", "c0004s0017t02", "c0011s0999t01", "c0003s1234t03"])
@pytest.mark.parametrize("naming", ["native", "atlas2"])
def test_from_bids_round_trip(text, naming):
    scan = ScanId.parse(text)
    subject, session = scan.bids_labels(naming)
    assert ScanId.from_bids(subject, session) == scan
    assert ScanId.from_bids(f"sub-{subject}", f"ses-{session}") == scan


@pytest.mark.parametrize("subject, session", [
    ("sub-01", "ses-1"), ("sub-r01s001", "ses-1"), ("sub-c0001s0001", "ses-baseline"), ("sub-c0001s0001t01", "ses-1"),
])
def test_from_bids_invalid(subject, session):
    with pytest.raises(IdError):
        ScanId.from_bids(subject, session)


def test_indi_scan_id():
    scan = IndiScanId.parse("Site1/031768/t01")
    assert (scan.site, scan.subject, scan.timepoint) == (1, 31768, 1)
    assert str(scan) == "Site1/031768/t01"
    assert scan.cohort_id == "Site1"
    assert scan.subject_id == "031768"
    assert scan.file_stem == "031768"
    assert scan.bids_labels() == ("031768", "t01")
    assert scan.bids_labels("atlas2") == ("r001s031768", "1")
    # the standard csv has stray whitespace in cells, and subject ids without the zero padding
    assert IndiScanId.parse_parts("Site1", " 31768", " t01") == scan
    assert IndiScanId.parse(str(IndiScanId(12, 5, 2))) == IndiScanId(12, 5, 2)


@pytest.mark.parametrize("text", ["Site1/031768", "site1/031768/t01", "Site1/03176a/t01", "Site1/031768/1",
                                  "Site1/1234567/t01", "Site1/031768/t01/extra"])
def test_indi_scan_id_invalid(text):
    with pytest.raises(IdError):
        IndiScanId.parse(text)
