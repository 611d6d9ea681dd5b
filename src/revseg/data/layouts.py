"""The dataset layouts on disk: everything revseg knows of each, in one entry of :data:`LAYOUTS`.

A :class:`Layout` recognises a dataset root, lists its cases and parses one case folder, and
holds the label convention, the case ids, the submission names and how the synthetic generator
names a case. :func:`discover` tries the layouts in order when ``data.layout=auto``:

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

A dataset in nnU-Net's raw format is not a layout: its ``dataset.json`` describes its channels,
labels and files (:mod:`revseg.data.nnunet`). Adding a layout is one entry of :data:`LAYOUTS`
(and a row above) and a test that generates a dataset in it (``tests/data/test_new_layout.py``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from revseg.errors import ConfigError, DataError

# re-exported: the label conventions go with the layouts
from revseg.metrics.regions import BRATS, BRATS2023, BRATS2024, MSD, REGIONS, LabelConvention

__all__ = [
    "BRATS",
    "BRATS2023",
    "LAYOUTS",
    "MISNAMED_SEG_2020",
    "MODALITIES",
    "BRATS2024",
    "MSD",
    "MSD_FILE_ORDER",
    "REGIONS",
    "CaseFiles",
    "Discovery",
    "ExampleFiles",
    "LabelConvention",
    "Layout",
    "discover",
    "example_layouts",
    "find_case",
    "folder_files",
    "folder_parser",
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


ExampleFiles = Callable[[int, int], dict[str, str]]
"""``files(index, num_cases)``: where the synthetic generator writes case ``index`` of
``num_cases``, relative to the dataset root: modality (or ``image`` for a 4D file) and ``seg``
-> path."""


@dataclass(frozen=True)
class Layout:
    """A dataset layout, e.g. BraTS 2021: what its files are, what its labels mean, how its cases
    and submission files are named.

    Attributes:
        name: the ``data.layout`` value.
        pattern: what a case looks like, for messages.
        convention: the dataset's label values (of its truth and of the predictions written).
        parse: ``parse(folder_or_file)``: one case folder (or 4D file), or None if it is not one.
        case_id: a regular expression every case id of the layout starts with (``re.match``):
            how evaluation tells the label convention of a flat folder of label maps.
        example_files: how the synthetic generator names a case (:data:`ExampleFiles`).
        detect: ``detect(root)``: does ``root`` look like this layout? None: a folder of
            ``root`` is a case (``parse``).
        find: ``find(root)``: the cases under ``root`` (missing files are recorded, not raised).
            None: the case folders of ``root``.
        four_d: images are one 4D file per case.
        volume_order: for ``four_d``, each volume's modality as published (``dataset.json``
            may say otherwise: :func:`msd_channel_order`).
        truth_convention: the convention evaluation reads the truth in, where it allows more
            than ``convention`` (2023's truth may hold 2024's resection cavity). None: the same.
        submission: the challenge's file name of a case's segmentation (``{case}``: the id).
        one_case: :func:`find_case` (``layout="auto"``) may name this layout from one case;
            False where only the root tells it from a later layout of the same files and labels
            (2018's grade folders, 2020's case names): one such case reads as that one.
        variants: other namings the generator writes that read as this layout, name ->
            :data:`ExampleFiles` (BraTS 2019's ``BraTS19_`` cases in ``.nii.gz``: brats2018).
        example_manifest: ``keys(files)``: the layout's own keys in the generated
            ``dataset.json``, given every case's :data:`ExampleFiles` (the Decathlon's keys).
    """

    name: str
    pattern: str
    convention: LabelConvention
    parse: Callable[[Path], CaseFiles | None]
    case_id: str
    example_files: ExampleFiles
    detect: Callable[[Path], bool] | None = None
    find: Callable[[Path], list[CaseFiles]] | None = None
    four_d: bool = False
    volume_order: tuple[str, ...] = ()
    truth_convention: LabelConvention | None = None
    submission: str = "{case}.nii.gz"
    one_case: bool = True
    variants: dict[str, ExampleFiles] = field(default_factory=dict)
    example_manifest: Callable[[list[dict[str, str]]], dict] | None = None

    def __post_init__(self) -> None:
        parse = self.parse
        if self.detect is None:
            object.__setattr__(self, "detect", lambda root: _any_case(root, parse))
        if self.find is None:
            object.__setattr__(self, "find", _find_folders(parse))
        if self.truth_convention is None:
            object.__setattr__(self, "truth_convention", self.convention)

    def submission_name(self, case: str) -> str:
        """The file name of case ``case``'s segmentation in a challenge submission."""
        return self.submission.format(case=case)


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


def folder_parser(sep: str, names: dict[str, str]) -> Callable[[Path], CaseFiles | None]:
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
_parse_2021 = folder_parser("_", _NAMES_2021)
_parse_2023 = folder_parser("-", _NAMES_2023)


def folder_files(
    case: str, sep: str, names: dict[str, str], suffix: str = ".nii.gz", home: str = ""
) -> dict[str, str]:
    """The files of a case folder as :func:`folder_parser` with the same ``sep`` and ``names``
    reads them: ``{key: "<home><case>/<case><sep><name><suffix>"}`` (an :data:`ExampleFiles`)."""
    return {key: f"{home}{case}/{case}{sep}{part}{suffix}" for key, part in names.items()}


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


def _example_2018(prefix: str, suffix: str) -> ExampleFiles:
    """BraTS 2018/2019 cases: every third in ``LGG/``, ids ``<prefix>_TCIA<nn>_<index>_1``."""

    def files(index: int, num_cases: int) -> dict[str, str]:
        grade = "LGG" if index % 3 == 2 else "HGG"
        case = f"{prefix}_TCIA{index % 10:02d}_{index:03d}_1"
        return folder_files(case, "_", _NAMES_2021, suffix, home=f"{grade}/")

    return files


MISNAMED_SEG_2020 = "W39_1998.09.19_Segm.nii"
"""The name of the one misnamed segmentation of the published BraTS 2020 training set; the
generated ``brats2020`` dataset gives it to its last case (when there are at least two)."""


def _example_2020(index: int, num_cases: int) -> dict[str, str]:
    case = f"BraTS20_Training_{index + 1:03d}"
    files = folder_files(case, "_", _NAMES_2021, ".nii")
    if num_cases >= 2 and index == num_cases - 1:
        files["seg"] = f"{case}/{MISNAMED_SEG_2020}"
    return files


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


def msd_channel_order(root: Path, published: tuple[str, ...] = MSD_FILE_ORDER) -> tuple[int, ...]:
    """Volume index of each of :data:`MODALITIES` in the 4D images, from the names in
    ``root/dataset.json`` (``"modality": {"0": "FLAIR", ...}``), else the ``published`` order.

    Raises:
        DataError: ``dataset.json`` names modalities that are not the four BraTS ones.
    """
    names = list(published)
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


def _example_msd(index: int, num_cases: int) -> dict[str, str]:
    name = f"BRATS_{index + 1:03d}.nii.gz"
    return {"image": f"imagesTr/{name}", "seg": f"labelsTr/{name}"}


def _manifest_msd(files: list[dict[str, str]]) -> dict:
    """The Decathlon's own ``dataset.json`` keys of Task01, for the generated cases ``files``."""
    return {
        "name": "BRATS",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {
            "0": "background",
            "1": "edema",
            "2": "non-enhancing tumor",
            "3": "enhancing tumour",
        },
        "numTraining": len(files),
        "training": [{"image": f"./{f['image']}", "label": f"./{f['seg']}"} for f in files],
    }


# -- the registry --------------------------------------------------------------------------------

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            name="msd",
            pattern="imagesTr/BRATS_001.nii.gz (4D) + labelsTr/BRATS_001.nii.gz",
            convention=MSD,
            parse=_parse_msd,
            case_id=r"BRATS_\d+$",
            example_files=_example_msd,
            detect=lambda root: (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir(),
            find=_find_msd,
            four_d=True,
            volume_order=MSD_FILE_ORDER,
            example_manifest=_manifest_msd,
        ),
        Layout(
            name="brats2018",
            pattern="HGG/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz and LGG/...",
            convention=BRATS,
            parse=_parse_2021,
            case_id=r"Brats1[89]_|BraTS19_",
            example_files=_example_2018("Brats18", ".nii"),
            detect=lambda root: any((root / g).is_dir() for g in _GRADES),
            find=_find_2018,
            one_case=False,
            variants={"brats2019": _example_2018("BraTS19", ".nii.gz")},
        ),
        Layout(
            name="brats2023",
            pattern="<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz",
            convention=BRATS2023,
            parse=_parse_2023,
            case_id=r"BraTS-[A-Za-z]+-\d+-\d+",
            example_files=lambda i, n: folder_files(f"BraTS-GLI-{i:05d}-000", "-", _NAMES_2023),
            truth_convention=BRATS2024,
        ),
        Layout(
            name="brats2020",
            pattern="BraTS20_Training_001/BraTS20_Training_001_{t1,t1ce,t2,flair,seg}.nii",
            convention=BRATS,
            parse=_parse_2021,
            case_id=r"BraTS20_",
            example_files=_example_2020,
            detect=lambda root: _any_case(root, _parse_2021, prefix="BraTS20_"),
            one_case=False,
        ),
        Layout(
            name="brats2021",
            pattern="<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz",
            convention=BRATS,
            parse=_parse_2021,
            case_id=r"BraTS2021_",
            example_files=lambda i, n: folder_files(f"BraTS2021_{i:05d}", "_", _NAMES_2021),
        ),
    )
}
"""Every layout by name, tried in this order by :func:`discover` (the more specific first)."""


def get_layout(name: str) -> Layout:
    """The layout called ``name``.

    Raises:
        ConfigError: unknown name (naming ``data.layout`` and the choices).
    """
    if name not in LAYOUTS:
        raise ConfigError(f"data.layout must be auto or one of {', '.join(LAYOUTS)}, got {name!r}")
    return LAYOUTS[name]


def example_layouts() -> dict[str, tuple[Layout, ExampleFiles]]:
    """Every name the synthetic generator writes (each layout's and its variants'), sorted, with
    the layout it reads as and how it names a case."""
    named = {}
    for layout in LAYOUTS.values():
        named[layout.name] = (layout, layout.example_files)
        named.update({name: (layout, files) for name, files in layout.variants.items()})
    return dict(sorted(named.items()))


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DataError(f"data.root: directory not found: {root}")
    if not root.is_dir():
        raise DataError(f"data.root: not a directory: {root}")


def _detect(root: Path) -> Layout:
    for layout in LAYOUTS.values():
        if layout.detect(root):
            return layout
    raise DataError(
        f"data.root: no case folders found in {root} (expected one of the layouts: "
        + "; ".join(f"{layout.name}: {layout.pattern}" for layout in LAYOUTS.values())
        + ")"
    )


def discover(root: str | os.PathLike, layout: str = "auto") -> Discovery:
    """Find the cases of a dataset, detecting its layout unless ``layout`` names one.

    Missing files are recorded in :attr:`CaseFiles.missing`, not raised, so that every problem
    can be reported at once (see :mod:`revseg.data.checks`).

    Args:
        root: dataset folder.
        layout: ``"auto"`` or a name of :data:`LAYOUTS`.

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
    order = msd_channel_order(root, chosen.volume_order) if chosen.four_d else None
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
        layout: ``"auto"`` or a name of :data:`LAYOUTS` (decides the label convention).

    Returns:
        A :class:`Discovery` holding the one case.

    Raises:
        DataError: ``path`` is not a case of any (or the given) layout.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"input: not found: {path}")
    if layout == "auto":
        candidates = [candidate for candidate in LAYOUTS.values() if candidate.one_case]
    else:
        candidates = [get_layout(layout)]
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
                order = msd_channel_order(root, candidate.volume_order)
                return Discovery(candidate, target.parent, [case], order)
            return Discovery(candidate, target.parent, [case])
    raise DataError(
        f"input: {path} is not a case folder, a case's image file or a 4D image (expected "
        + "; ".join(candidate.pattern for candidate in candidates)
        + ")"
    )


def _is_4d(path: Path) -> bool:
    import nibabel as nib

    try:
        return len(nib.load(path).shape) == 4
    except Exception as error:  # noqa: BLE001 - any unreadable header
        raise DataError(f"{path}: cannot read: {' '.join(str(error).split())}") from None
