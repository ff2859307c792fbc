"""Typed scan identifiers of the ATLAS releases and their BIDS labels.

Identifiers are parsed with a regex and never assembled from raw text elsewhere, so a typo in a
folder name is an error here rather than a silently wrong subject later. The patterns are strict (fixed
digit counts, no other characters), which also keeps every label derived from them safe to use in a path.

* R1.1 native (ICPSR): ``c0001s0001t01`` (cohort, subject, time point) -> :class:`ScanId`;
* R1.1 standard (FCP-INDI): ``Site1/031768/t01`` -> :class:`IndiScanId`;
* R2.0: ``sub-r001s001`` + ``ses-1`` (cohort r001, subject s001, session 1) -> :class:`Atlas2ScanId`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

NATIVE_ID = re.compile(r"^c(?P<cohort>\d{4})s(?P<subject>\d{4})t(?P<timepoint>\d{2})$")
NATIVE_SUB = re.compile(r"^c(?P<cohort>\d{4})s(?P<subject>\d{4})$")
ATLAS2_SUB = re.compile(r"^r(?P<cohort>\d{3})s(?P<subject>\d{3,4})$")
NAMINGS = ("native", "atlas2")


class IdError(ValueError):
    """Raised for text that is not a valid identifier."""


class _ReleaseId:
    """What the scan ids share: number fields each in ``0..limit`` (``_LIMITS``, in field order; ``_WHAT`` names
    the id in errors) and text forms made from format strings over those fields: ``_TEXT`` the id,
    ``_COHORT`` its cohort, ``_SUBJECT`` its subject."""

    _WHAT: ClassVar[str]
    _LIMITS: ClassVar[dict[str, int]]
    _TEXT: ClassVar[str]
    _COHORT: ClassVar[str]
    _SUBJECT: ClassVar[str]

    def _values(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self._LIMITS}

    def __post_init__(self) -> None:
        values = self._values()
        if not all(0 <= values[name] <= limit for name, limit in self._LIMITS.items()):
            raise IdError(f"{self._WHAT} out of range: " + " ".join(f"{k}={v}" for k, v in values.items()))

    def __str__(self) -> str:
        return self._TEXT.format(**self._values())

    @property
    def cohort_id(self) -> str:
        return self._COHORT.format(**self._values())

    @property
    def subject_id(self) -> str:
        return self._SUBJECT.format(**self._values())


@dataclass(frozen=True, order=True)
class ScanId(_ReleaseId):
    """One scan of the native (ICPSR) release: cohort, subject and time point, e.g. ``c0001s0001t01``."""

    cohort: int
    subject: int
    timepoint: int
    _WHAT, _LIMITS = "scan id", {"cohort": 9999, "subject": 9999, "timepoint": 99}
    _TEXT = "c{cohort:04d}s{subject:04d}t{timepoint:02d}"
    _COHORT, _SUBJECT = "c{cohort:04d}", "c{cohort:04d}s{subject:04d}"

    @classmethod
    def parse(cls, text: str) -> "ScanId":
        match = NATIVE_ID.match(str(text).strip())
        if not match:
            raise IdError(f"not an ATLAS scan id (expected e.g. c0001s0001t01): {text!r}")
        return cls(int(match["cohort"]), int(match["subject"]), int(match["timepoint"]))

    def bids_labels(self, naming: str = "native") -> tuple[str, str]:
        """``(subject, session)`` BIDS labels: ``native`` keeps the release's IDs
        (``c0001s0001``, ``t01``), ``atlas2`` follows ATLAS 2.0 (``r001s001``, ``1``)."""
        if naming == "native":
            return self.subject_id, f"t{self.timepoint:02d}"
        if naming == "atlas2":
            if self.cohort > 999:
                raise IdError(f"cohort {self.cohort} does not fit the ATLAS 2.0 naming (r###)")
            width = 3 if self.subject <= 999 else 4
            return f"r{self.cohort:03d}s{self.subject:0{width}d}", str(self.timepoint)
        raise IdError(f"unknown naming {naming!r}; choose one of {NAMINGS}")

    @classmethod
    def from_bids(cls, subject: str, session: str) -> "ScanId":
        """Inverse of :meth:`bids_labels` for either naming."""
        subject = subject.removeprefix("sub-")
        session = session.removeprefix("ses-")
        for pattern in (NATIVE_SUB, ATLAS2_SUB):
            match = pattern.match(subject)
            if match:
                timepoint = session[1:] if session.startswith("t") else session
                if not timepoint.isdigit():
                    break
                return cls(int(match["cohort"]), int(match["subject"]), int(timepoint))
        raise IdError(f"cannot map BIDS labels sub-{subject} ses-{session} to an ATLAS scan id")


INDI_SUBJECT = re.compile(r"^\d{1,6}$")
INDI_SITE = re.compile(r"^Site(?P<site>\d{1,3})$")
INDI_SESSION = re.compile(r"^t(?P<timepoint>\d{2})$")


@dataclass(frozen=True, order=True)
class IndiScanId(_ReleaseId):
    """One scan of the FCP-INDI standard-space archive: ``Site1/031768/t01`` (site, subject, time point); its
    files are named by the six-digit subject (:attr:`file_stem`)."""

    site: int
    subject: int
    timepoint: int
    _WHAT, _LIMITS = "INDI scan id", {"site": 999, "subject": 999999, "timepoint": 99}
    _TEXT, _COHORT, _SUBJECT = "Site{site}/{subject:06d}/t{timepoint:02d}", "Site{site}", "{subject:06d}"

    @classmethod
    def parse_parts(cls, site: str, subject: str, session: str) -> "IndiScanId":
        site_m = INDI_SITE.match(str(site).strip())
        ses_m = INDI_SESSION.match(str(session).strip())
        subject = str(subject).strip()
        if not site_m or not ses_m or not INDI_SUBJECT.match(subject):
            raise IdError(f"not an INDI scan id: site={site!r} subject={subject!r} session={session!r}")
        return cls(int(site_m["site"]), int(subject), int(ses_m["timepoint"]))

    @classmethod
    def parse(cls, text: str) -> "IndiScanId":
        parts = str(text).strip().split("/")
        if len(parts) != 3:
            raise IdError(f"not an INDI scan id (expected Site1/031768/t01): {text!r}")
        return cls.parse_parts(*parts)

    @property
    def file_stem(self) -> str:
        return self.subject_id

    def bids_labels(self, naming: str = "native") -> tuple[str, str]:
        if naming == "native":
            return f"{self.subject:06d}", f"t{self.timepoint:02d}"
        if naming == "atlas2":
            return f"r{self.site:03d}s{self.subject:06d}", str(self.timepoint)
        raise IdError(f"unknown naming {naming!r}; choose one of {NAMINGS}")


ATLAS2_SUBJECT = re.compile(r"^(?:sub-)?r(?P<cohort>\d{3})s(?P<subject>\d{3})$")
ATLAS2_SESSION = re.compile(r"^(?:ses-)?(?P<session>0|[1-9]\d{0,2})$")
ATLAS2_COHORT = re.compile(r"^R(?P<cohort>\d{3})$")
ATLAS2_SCAN = re.compile(r"^(?P<subject>sub-r\d{3}s\d{3})_(?P<session>ses-\d{1,3})$")


@dataclass(frozen=True, order=True)
class Atlas2ScanId(_ReleaseId):
    """One scan of ATLAS R2.0: ``sub-r001s001`` / ``ses-1`` (cohort 1, subject 1, session 1).

    Its text form (the scan key) is the release's own file-name prefix, ``sub-r001s001_ses-1``. Subject
    labels are exactly ``r`` + 3 digits + ``s`` + 3 digits; sessions are decimal digits without leading
    zeros, so that text -> id -> text is exact (``ses-01`` is rejected rather than silently renamed).
    """

    cohort: int
    subject: int
    session: int
    _WHAT, _LIMITS = "ATLAS 2.0 scan id", {"cohort": 999, "subject": 999, "session": 999}
    _COHORT, _SUBJECT = "R{cohort:03d}", "r{cohort:03d}s{subject:03d}"     # the cohort folder name, R001

    @classmethod
    def parse_subject(cls, subject: str) -> tuple[int, int]:
        """``(cohort, subject)`` of ``r001s001`` or ``sub-r001s001``."""
        match = ATLAS2_SUBJECT.match(str(subject).strip())
        if not match:
            raise IdError(f"not an ATLAS 2.0 subject label (expected e.g. sub-r001s001): {subject!r}")
        return int(match["cohort"]), int(match["subject"])

    @classmethod
    def parse_parts(cls, subject: str, session: str) -> "Atlas2ScanId":
        cohort, number = cls.parse_subject(subject)
        match = ATLAS2_SESSION.match(str(session).strip())
        if not match:
            raise IdError(f"not an ATLAS 2.0 session label (expected e.g. ses-1): {session!r}")
        return cls(cohort, number, int(match["session"]))

    @classmethod
    def parse(cls, text: str) -> "Atlas2ScanId":
        match = ATLAS2_SCAN.match(str(text).strip())
        if not match:
            raise IdError(f"not an ATLAS 2.0 scan id (expected e.g. sub-r001s001_ses-1): {text!r}")
        return cls.parse_parts(match["subject"], match["session"])

    def __str__(self) -> str:
        from .naming import ScanRef  # naming is built on this module

        return ScanRef(*self.bids_labels()).key

    def bids_labels(self, naming: str = "native") -> tuple[str, str]:
        """``(subject, session)`` BIDS labels: the release's own (``r001s001``, ``1``) under either naming,
        since R2.0 already follows the ATLAS 2.0 convention."""
        if naming not in NAMINGS:
            raise IdError(f"unknown naming {naming!r}; choose one of {NAMINGS}")
        return self.subject_id, str(self.session)
