"""The published BraTS layouts on disk: which files make a case, and each dataset's label values.

A :class:`Layout` knows how to recognise a dataset root, list its cases and parse one case folder;
:data:`LAYOUTS` holds every layout, tried in order by :func:`discover` when ``data.layout=auto``:

================  ==============================================================  ==========
``msd``           Medical Segmentation Decathlon Task01_BrainTumour:               1 oedema,
                  ``imagesTr/BRATS_001.nii.gz`` (4D: FLAIR, T1w, T1gd, T2w),       2 non-enh.,
                  ``labelsTr/BRATS_001.nii.gz``, ``imagesTs/``                     3 enhancing
``brats2018``     BraTS 2018 and 2019: ``HGG/<case>/<case>_{t1,t1ce,t2,flair,      0/1/2/4
                  seg}.nii[.gz]`` and ``LGG/...``
``brats2023``     BraTS 2023 and later: ``<case>/<case>-{t1n,t1c,t2w,t2f,          0/1/2/3
                  seg}.nii.gz``, e.g. ``BraTS-GLI-00000-000``
``brats2020``     ``BraTS20_Training_001/BraTS20_Training_001_{...,seg}.nii[.gz]``  0/1/2/4
                  (the published set has one seg file named
                  ``W39_1998.09.19_Segm.nii``: a lone ``*seg*`` file is taken as
                  the case's segmentation, with a warning)
``brats2021``     ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii[.gz]``                0/1/2/4
================  ==============================================================  ==========

Images are always returned in the channel order :data:`MODALITIES` (t1, t1ce, t2, flair),
whatever the files' order: per-modality files are listed in that order, and the 4D MSD image is
reordered by the modality names of its ``dataset.json`` (:attr:`Discovery.channel_order`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from revseg.errors import ConfigError, DataError
from revseg.metrics.regions import (  # re-exported: the label conventions go with the layouts
    BRATS,
    BRATS2023,
    BRATS2024,
    MSD,
    REGIONS,
    LabelConvention,
)

__all__ = [
    "BRATS",
    "BRATS2023",
    "LAYOUTS",
    "LAYOUT_NAMES",
    "MODALITIES",
    "BRATS2024",
    "MSD",
    "REGIONS",
    "CaseFiles",
    "Discovery",
    "LabelConvention",
    "Layout",
    "discover",
    "find_case",
    "get_layout",
]

log = logging.getLogger(__name__)

MODALITIES = ("t1", "t1ce", "t2", "flair")
"""Channel order of the image, by modality name (never by file order)."""

_NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case as found on disk.

    Attributes:
        case: case id (the folder name, or the MSD file name without suffix).
        image: four paths in the order :data:`MODALITIES`, or one 4D file (MSD).
        label: the segmentation, or None when there is none.
        missing: ``(what, expected path)`` for each file that should be there but is not
            (``what`` is a modality name or ``"seg"``).
        notes: remarks for the user (e.g. a misnamed segmentation that was used).
    """

    case: str
    image: tuple[str, ...]
    label: str | None
    missing: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[str, ...]:
        """Every existing file of the case, images first."""
        return tuple(p for p in self.image if p) + ((self.label,) if self.label else ())

    def item(self) -> dict:
        """The MONAI dict ``{"case", "image", "label"}`` (``image`` a list, or one 4D path)."""
        image: list[str] | str = list(self.image) if len(self.image) > 1 else self.image[0]
        return {"case": self.case, "image": image, "label": self.label}


@dataclass(frozen=True)
class Discovery:
    """What :func:`discover` found: the layout, its cases and the image channel order."""

    layout: Layout
    root: Path
    cases: list[CaseFiles]
    channel_order: tuple[int, ...] | None = None
    """For a 4D image: the file's volume index of each of :data:`MODALITIES`; None otherwise."""
    left_out: tuple[Path, ...] = ()
    """Folders beside the case folders that hold no file of the layout (e.g. an empty one)."""


@dataclass(frozen=True)
class Layout:
    """A dataset layout, e.g. BraTS 2021.

    Attributes:
        name: the ``data.layout`` value.
        pattern: what a case looks like, for messages.
        convention: the dataset's label values.
        detect: ``detect(root)``: does ``root`` look like this layout?
        find: ``find(root)``: the cases under ``root`` (missing files are recorded, not raised).
        parse: ``parse(folder_or_file)``: one case folder (or 4D file), or None if it is not one.
        four_d: images are one 4D file per case.
    """

    name: str
    pattern: str
    convention: LabelConvention
    detect: Callable[[Path], bool]
    find: Callable[[Path], list[CaseFiles]]
    parse: Callable[[Path], CaseFiles | None]
    four_d: bool = False
    modality_files: dict[str, str] = field(default_factory=dict)


def _nifti(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii.gz`` or ``folder/stem.nii``, whichever exists (an error if both)."""
    found = [folder / f"{stem}{suffix}" for suffix in _NIFTI_SUFFIXES]
    found = [path for path in found if path.is_file()]
    if len(found) > 1:
        raise DataError(f"{folder}: case folder has both {found[0].name} and {found[1].name}")
    return found[0] if found else None


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(_NIFTI_SUFFIXES) and not path.name.startswith(".")


def _strip_suffix(name: str) -> str:
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# -- one folder per case, one file per modality (BraTS 2018-2021 and 2023+) ----------------------


def _folder_parser(sep: str, names: dict[str, str]) -> Callable[[Path], CaseFiles | None]:
    """Parser of ``<case>/<case><sep><name>.nii[.gz]`` folders; ``names`` maps our modality names
    (and ``seg``) to the file name parts."""

    def parse(folder: Path) -> CaseFiles | None:
        if not folder.is_dir() or folder.name.startswith("."):
            return None
        case = folder.name
        found = {key: _nifti(folder, f"{case}{sep}{part}") for key, part in names.items()}
        if not any(found.values()):
            return None
        missing, notes = [], []
        if found["seg"] is None:  # BraTS 2020 has one case with a misnamed seg file
            known = {p.name for p in found.values() if p is not None}
            others = [
                p
                for p in sorted(folder.iterdir())
                if _is_nifti(p) and p.name not in known and "seg" in p.name.lower()
            ]
            if len(others) == 1:
                found["seg"] = others[0]
                notes.append(f"using {others[0]} as the segmentation (misnamed)")
        for key, part in names.items():
            if found[key] is None:
                missing.append((key, os.fspath(folder / f"{case}{sep}{part}.nii.gz")))
        image = tuple(os.fspath(found[m]) if found[m] else "" for m in MODALITIES)
        label = os.fspath(found["seg"]) if found["seg"] else None
        return CaseFiles(case, image, label, tuple(missing), tuple(notes))

    return parse


_NAMES_2021 = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}
_NAMES_2023 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}
_parse_2021 = _folder_parser("_", _NAMES_2021)
_parse_2023 = _folder_parser("-", _NAMES_2023)


def _case_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _find_folders(parse: Callable[[Path], CaseFiles | None]) -> Callable[[Path], list[CaseFiles]]:
    def find(root: Path) -> list[CaseFiles]:
        return [case for folder in _case_folders(root) if (case := parse(folder)) is not None]

    return find


def _any_case(root: Path, parse: Callable[[Path], CaseFiles | None], prefix: str = "") -> bool:
    return any(
        folder.name.startswith(prefix) and parse(folder) is not None
        for folder in _case_folders(root)
    )


_GRADES = ("HGG", "LGG")


def _find_2018(root: Path) -> list[CaseFiles]:
    cases = []
    for grade in _GRADES:
        if (root / grade).is_dir():
            cases += _find_folders(_parse_2021)(root / grade)
    return cases


# -- Medical Segmentation Decathlon Task01_BrainTumour -------------------------------------------

MSD_FILE_ORDER = ("flair", "t1", "t1ce", "t2")
"""Volume order of the published MSD images (FLAIR, T1w, T1gd, T2w)."""

_MSD_NAMES = {
    "flair": "flair",
    "t1": "t1",
    "t1w": "t1",
    "t1n": "t1",
    "t1gd": "t1ce",
    "t1ce": "t1ce",
    "t1c": "t1ce",
    "t2": "t2",
    "t2w": "t2",
}


def msd_channel_order(root: Path) -> tuple[int, ...]:
    """Volume index of each of :data:`MODALITIES` in the 4D images, from the names in
    ``root/dataset.json`` (``"modality": {"0": "FLAIR", ...}``), else the published order.

    Raises:
        DataError: ``dataset.json`` names modalities that are not the four BraTS ones.
    """
    names = list(MSD_FILE_ORDER)
    path = root / "dataset.json"
    try:
        modality = json.loads(path.read_text()).get("modality")
    except (OSError, ValueError, AttributeError):
        modality = None
    if isinstance(modality, dict) and modality:
        try:
            names = [_MSD_NAMES[str(modality[k]).lower()] for k in sorted(modality, key=int)]
        except (KeyError, ValueError):
            raise DataError(
                f"{path}: modality {modality} is not FLAIR, T1w, T1gd, T2w in some order"
            ) from None
    if sorted(names) != sorted(MODALITIES):
        raise DataError(f"{path}: modalities {names} are not the four of BraTS")
    return tuple(names.index(m) for m in MODALITIES)


def _parse_msd(path: Path) -> CaseFiles | None:
    if not (path.is_file() and _is_nifti(path)):
        return None
    case = _strip_suffix(path.name)
    label = None
    labels_dir = path.parent.parent / path.parent.name.replace("images", "labels")
    if path.parent.name.startswith("images") and labels_dir.is_dir():
        label = _nifti(labels_dir, case)
    missing = () if label else (("seg", os.fspath(labels_dir / path.name)),)
    return CaseFiles(case, (os.fspath(path),), os.fspath(label) if label else None, missing)


def _find_msd(root: Path) -> list[CaseFiles]:
    cases = []
    for split in ("imagesTr", "imagesTs"):
        if (root / split).is_dir():
            cases += [c for p in sorted((root / split).iterdir()) if (c := _parse_msd(p))]
    return cases


LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "msd",
        "imagesTr/BRATS_001.nii.gz (4D) + labelsTr/BRATS_001.nii.gz",
        MSD,
        lambda root: (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir(),
        _find_msd,
        _parse_msd,
        four_d=True,
    ),
    Layout(
        "brats2018",
        "HGG/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz and LGG/...",
        BRATS,
        lambda root: any((root / g).is_dir() for g in _GRADES),
        _find_2018,
        _parse_2021,
        modality_files=_NAMES_2021,
    ),
    Layout(
        "brats2023",
        "<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz",
        BRATS2023,
        lambda root: _any_case(root, _parse_2023),
        _find_folders(_parse_2023),
        _parse_2023,
        modality_files=_NAMES_2023,
    ),
    Layout(
        "brats2020",
        "BraTS20_Training_001/BraTS20_Training_001_{t1,t1ce,t2,flair,seg}.nii",
        BRATS,
        lambda root: _any_case(root, _parse_2021, prefix="BraTS20_"),
        _find_folders(_parse_2021),
        _parse_2021,
        modality_files=_NAMES_2021,
    ),
    Layout(
        "brats2021",
        "<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz",
        BRATS,
        lambda root: _any_case(root, _parse_2021),
        _find_folders(_parse_2021),
        _parse_2021,
        modality_files=_NAMES_2021,
    ),
)
"""Known layouts, tried in this order by :func:`discover` (the more specific first)."""

LAYOUT_NAMES = tuple(layout.name for layout in LAYOUTS)


def get_layout(name: str) -> Layout:
    """The layout called ``name``.

    Raises:
        ConfigError: unknown name (naming ``data.layout`` and the choices).
    """
    for layout in LAYOUTS:
        if layout.name == name:
            return layout
    raise ConfigError(f"data.layout must be auto or one of {', '.join(LAYOUT_NAMES)}, got {name!r}")


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DataError(f"data.root: directory not found: {root}")
    if not root.is_dir():
        raise DataError(f"data.root: not a directory: {root}")


def _detect(root: Path) -> Layout:
    for layout in LAYOUTS:
        if layout.detect(root):
            return layout
    raise DataError(
        f"data.root: no case folders found in {root} (expected one of the layouts: "
        + "; ".join(f"{layout.name}: {layout.pattern}" for layout in LAYOUTS)
        + ")"
    )


def discover(root: str | os.PathLike, layout: str = "auto") -> Discovery:
    """Find the cases of a dataset, detecting its layout unless ``layout`` names one.

    Missing files are recorded in :attr:`CaseFiles.missing`, not raised, so that every problem
    can be reported at once (see :mod:`revseg.data.checks`).

    Args:
        root: dataset folder.
        layout: ``"auto"`` or one of :data:`LAYOUT_NAMES`.

    Returns:
        A :class:`Discovery`; its cases are sorted by case id.

    Raises:
        DataError: ``root`` is missing or holds no case of the layout.
        ConfigError: unknown ``layout``.
    """
    root = Path(root)
    chosen = None if layout == "auto" else get_layout(layout)
    _check_root(root)
    chosen = chosen or _detect(root)
    cases = sorted(chosen.find(root), key=lambda c: c.case)
    if not cases:
        raise DataError(
            f"data.root: no case of layout {chosen.name} ({chosen.pattern}) found in {root}"
        )
    ids = [c.case for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(f"data.root: case id {duplicates[0]} appears twice in {root}")
    for case in cases:
        for note in case.notes:
            log.warning("%s: %s", case.case, note)
    order = msd_channel_order(root) if chosen.four_d else None
    left_out = () if chosen.four_d else _left_out(chosen, cases)
    for folder in left_out:
        log.warning("%s: no file of layout %s in the folder: left out", folder, chosen.name)
    return Discovery(chosen, root, cases, order, left_out)


def _left_out(layout: Layout, cases: list[CaseFiles]) -> tuple[Path, ...]:
    """The folders beside the case folders that ``layout.parse`` does not take as a case."""
    folders = {Path(next(f for f in (*c.image, c.label) if f)).parent for c in cases}
    homes = sorted({folder.parent for folder in folders})
    return tuple(
        folder
        for home in homes
        for folder in _case_folders(home)
        if folder not in folders and layout.parse(folder) is None
    )


def find_case(path: str | os.PathLike, layout: str = "auto") -> Discovery:
    """One case: a case folder, a 4D image file (MSD) or one of a case's modality files.

    Args:
        path: the folder or file.
        layout: ``"auto"`` or one of :data:`LAYOUT_NAMES` (decides the label convention).

    Returns:
        A :class:`Discovery` holding the one case.

    Raises:
        DataError: ``path`` is not a case of any (or the given) layout.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"input: not found: {path}")
    candidates = LAYOUTS if layout == "auto" else (get_layout(layout),)
    targets = [path]
    if path.is_file() and not _is_nifti(path):
        raise DataError(f"input: not a NIfTI file (.nii or .nii.gz): {path}")
    if path.is_file():
        targets.append(path.parent)  # a modality file of a case folder
    for target in targets:
        for candidate in candidates:
            if candidate.four_d != target.is_file():
                continue
            case = candidate.parse(target)
            if case is None:
                continue
            if candidate.four_d:
                if not _is_4d(target):
                    continue
                images_dir = target.parent.name.startswith("images")
                root = target.parent.parent if images_dir else target.parent
                return Discovery(candidate, target.parent, [case], msd_channel_order(root))
            if candidate.name in ("brats2018", "brats2020") and layout == "auto":
                candidate = get_layout("brats2021")  # same files and labels
            return Discovery(candidate, target.parent, [case])
    raise DataError(
        f"input: {path} is not a case folder, a case's image file or a 4D image "
        f"(expected <case>/<case>_t1.nii.gz ..., <case>/<case>-t1n.nii.gz ... or a 4D NIfTI)"
    )


def _is_4d(path: Path) -> bool:
    import nibabel as nib

    try:
        return len(nib.load(path).shape) == 4
    except Exception as error:  # noqa: BLE001 - any unreadable header
        raise DataError(f"{path}: cannot read: {' '.join(str(error).split())}") from None
