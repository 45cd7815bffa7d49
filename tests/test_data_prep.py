"""data_prep: the three dataset converters, on small fake trees of real cxr4 images."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import pytest

from data_prep import cohen, kermany, radiography
from data_prep._manifest import COLUMNS, image_size
from patchflannel.manifest import read_manifest


@pytest.fixture(scope="module")
def films(data_dir) -> list[Path]:
    """Twelve real films of several sizes (every 100th cxr4 image)."""
    paths = sorted((data_dir / "cxr4" / "images").glob("*/*.jpg"))[::100][:12]
    assert len(paths) == 12
    return paths


def _size(path: Path) -> tuple[int, int]:
    """``(width, height)`` by decoding with OpenCV: independent of the Pillow header read."""
    height, width = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).shape
    return width, height


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix == ".png":  # a real PNG, as the database publishes
        assert cv2.imwrite(str(dst), cv2.imread(str(src), cv2.IMREAD_GRAYSCALE))
    else:
        shutil.copyfile(src, dst)
    return dst


def _cut(src: Path, dst: Path, keep: int) -> Path:
    """A copy of ``src`` cut after ``keep`` bytes, as a broken download would be."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes()[:keep])
    return dst


def _check(out: Path, expected: list[tuple]) -> None:
    """The manifest at ``out`` holds exactly ``expected`` rows of (relative path, label, id, view, source file)."""
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        raw = list(reader)
    assert [(r["image"], r["label"], r["patient_id"], r["view"]) for r in raw] == [e[:4] for e in expected]
    for row, (*_, src) in zip(read_manifest(out), expected, strict=True):
        assert Path(row["image"]).is_file()
        assert (int(row["orig_width"]), int(row["orig_height"])) == _size(src)


# --- Cohen -------------------------------------------------------------------------------------

@pytest.mark.parametrize("finding, label", [
    ("COVID-19", "covid"), ("COVID-19, ARDS", "covid"), ("Pneumonia/Viral/COVID-19", "covid"),
    ("SARS", "viral"), ("MERS-CoV", "viral"), ("Varicella", "viral"), ("Pneumonia/Viral/Influenza/H1N1", "viral"),
    ("Pneumonia/Viral/Herpes ", "viral"), ("Streptococcus", "bacterial"), ("E.Coli", "bacterial"),
    ("Mycoplasma Bacterial Pneumonia", "bacterial"), ("Pneumonia/Bacterial/Staphylococcus/MRSA", "bacterial"),
    ("Pneumonia/Bacterial", "bacterial"), ("No Finding", "normal"),
    ("Pneumocystis", None), ("Pneumonia/Fungal/Pneumocystis", None), ("ARDS", None), ("Lipoid", None),
    ("Pneumonia", None), ("Unknown", None), ("todo", None), ("", None), ("Streptococcus, Influenza", None),
])
def test_cohen_label(finding, label):
    assert cohen.cohen_label(finding) == label


COHEN_FIELDS = ["patientid", "offset", "sex", "age", "finding", "RT_PCR_positive", "survival", "view",
                "modality", "date", "location", "folder", "filename", "doi", "url", "license"]


def _cohen_tree(root: Path, films: list[Path]) -> None:
    """metadata.csv + images/ covering every rule; films[i] is the source of image i."""
    images = root / "images"
    for i in range(9):
        _copy(films[i], images / f"c{i}.jpg")
    _cut(films[9], images / "header_cut.jpg", 200)
    _cut(films[10], images / "tail_cut.jpg", films[10].stat().st_size // 2)
    rows = [  # patientid, finding, view, modality, folder, filename
        ("1", "COVID-19", "PA", "X-ray", "images", "c0.jpg"),
        ("1", "Pneumonia/Viral/COVID-19", "AP Supine", "X-ray", "images", "c1.jpg"),
        ("1", "COVID-19, ARDS", "L", "X-ray", "images", "c2.jpg"),  # lateral
        ("2", "COVID-19", "Axial", "CT", "volumes", "ct.nii.gz"),
        ("2", "No Finding", "PA", "X-ray", "images", "c3.jpg"),  # prior film of a covid patient (CT)
        ("3", "SARS", "AP", "X-ray", "images", "c4.jpg"),
        ("4", "Streptococcus", "PA", "X-ray", "images", "c5.jpg"),
        ("5", "Pneumonia/Fungal/Pneumocystis", "PA", "X-ray", "images", "c6.jpg"),
        ("6", "No Finding", "AP erect", "X-ray", "", "c7.jpg"),  # no folder: images/
        ("7", "Pneumonia/Bacterial/Klebsiella", "AP semi erect", "X-ray", "images", "c8.jpg"),
        ("8", "COVID-19, ARDS", "AP", "X-ray", "images", "header_cut.jpg"),
        ("9", "Influenza", "PA", "X-ray", "images", "absent.jpg"),
        ("10", "COVID-19", "PA", "X-ray", "images", "tail_cut.jpg"),
        ("11", "todo", "PA", "X-ray", "images", "c0.jpg"),
    ]
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COHEN_FIELDS, restval="")
        writer.writeheader()
        for pid, finding, view, modality, folder, filename in rows:
            writer.writerow({"patientid": pid, "finding": finding, "view": view, "modality": modality,
                             "folder": folder, "filename": filename, "license": "CC BY 4.0"})


def test_cohen(data_dir, films, tmp_path):
    root = tmp_path / "covid-chestxray-dataset"
    _cohen_tree(root, films)
    out = tmp_path / "out" / "cohen.csv"
    summary = cohen.build_manifest(root, out)
    img = "../covid-chestxray-dataset/images/"
    _check(out, [
        (img + "c0.jpg", "covid", "cohen-1", "PA", films[0]),
        (img + "c1.jpg", "covid", "cohen-1", "AP Supine", films[1]),
        (img + "c4.jpg", "viral", "cohen-3", "AP", films[4]),
        (img + "c5.jpg", "bacterial", "cohen-4", "PA", films[5]),
        (img + "c7.jpg", "normal", "cohen-6", "AP erect", films[7]),
        (img + "c8.jpg", "bacterial", "cohen-7", "AP semi erect", films[8]),
    ])
    assert summary["rows"] == 6
    assert summary["labels"] == {"covid": 2, "viral": 1, "bacterial": 2, "normal": 1}
    assert summary["dropped"] == {
        "No Finding film of a COVID-19 patient": 1, "missing image file": 1,
        "no class for finding 'Pneumonia/Fungal/Pneumocystis'": 1, "no class for finding 'todo'": 1,
        "not a frontal view": 1, "not an X-ray": 1, "truncated image file": 1, "unreadable image file": 1,
    }
    assert {r["source"] for r in read_manifest(out)} == {"cohen"}


def test_cohen_cli_keeps_covid_no_finding_on_request(data_dir, films, tmp_path, capsys):
    root = tmp_path / "cohen"
    _cohen_tree(root, films)
    out = tmp_path / "cohen.csv"
    cohen.main([str(root), "--out", str(out), "--keep-covid-no-finding"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 7 and summary["labels"]["normal"] == 2
    assert "No Finding film of a COVID-19 patient" not in summary["dropped"]
    normals = [r for r in read_manifest(out) if r["label"] == "normal"]
    assert [r["patient_id"] for r in normals] == ["cohen-2", "cohen-6"]


def test_cohen_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="metadata.csv"):
        cohen.main([str(tmp_path), "--out", str(tmp_path / "m.csv")])
    (tmp_path / "metadata.csv").write_text("patientid,finding\n1,COVID-19\n")
    with pytest.raises(SystemExit, match="lacks the columns"):
        cohen.main([str(tmp_path), "--out", str(tmp_path / "m.csv")])
    assert not (tmp_path / "m.csv").exists()


# --- Kermany -----------------------------------------------------------------------------------

@pytest.mark.parametrize("stem, parsed", [
    ("person1_bacteria_1", ("bacterial", "kermany-person1")),
    ("person1506_virus_2616", ("viral", "kermany-person1506")),
    ("IM-0416-0001", ("normal", "kermany-IM-0416")), ("NORMAL2-IM-0927-0001", ("normal", "kermany-IM-0927")),
    ("person1_fungus_1", None), ("IM-0416", None), ("scan", None),
])
def test_kermany_label(stem, parsed):
    assert kermany.kermany_label(stem) == parsed


def test_kermany_cli(data_dir, films, tmp_path, capsys):
    root = tmp_path / "chest_xray"
    _copy(films[0], root / "train/NORMAL/IM-0001-0001.jpeg")
    _copy(films[1], root / "train/NORMAL/NORMAL2-IM-0416-0001.jpeg")
    _copy(films[2], root / "train/PNEUMONIA/person1_bacteria_1.jpeg")
    _copy(films[3], root / "train/PNEUMONIA/person1_virus_2.jpeg")
    _copy(films[4], root / "test/PNEUMONIA/person7_virus_15.jpeg")
    _copy(films[2], root / "val/PNEUMONIA/person2_bacteria_5.jpeg")  # same bytes as train's person1_bacteria_1
    _copy(films[5], root / "train/NORMAL/person5_virus_10.jpeg")  # name disagrees with folder
    _copy(films[5], root / "val/PNEUMONIA/person5_virus_10.jpeg")  # its copy in the right folder is kept
    _copy(films[6], root / "train/PNEUMONIA/IM-0003-0001.jpeg")  # name disagrees with folder
    _copy(films[7], root / "train/NORMAL/scan.jpeg")
    _cut(films[8], root / "train/PNEUMONIA/person9_bacteria_30.jpeg", 200)
    (root / "__MACOSX/train/NORMAL").mkdir(parents=True)
    (root / "__MACOSX/train/NORMAL/._IM-0001-0001.jpeg").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (root / "train/NORMAL/.DS_Store").write_bytes(b"\x00")
    out = tmp_path / "kermany.csv"
    kermany.main([str(root), "--out", str(out)])
    summary = json.loads(capsys.readouterr().out)
    _check(out, [  # sorted path order: test/ < train/ < val/
        ("chest_xray/test/PNEUMONIA/person7_virus_15.jpeg", "viral", "kermany-person7", "AP", films[4]),
        ("chest_xray/train/NORMAL/IM-0001-0001.jpeg", "normal", "kermany-IM-0001", "AP", films[0]),
        ("chest_xray/train/NORMAL/NORMAL2-IM-0416-0001.jpeg", "normal", "kermany-IM-0416", "AP", films[1]),
        ("chest_xray/train/PNEUMONIA/person1_bacteria_1.jpeg", "bacterial", "kermany-person1", "AP", films[2]),
        ("chest_xray/train/PNEUMONIA/person1_virus_2.jpeg", "viral", "kermany-person1", "AP", films[3]),
        ("chest_xray/val/PNEUMONIA/person5_virus_10.jpeg", "viral", "kermany-person5", "AP", films[5]),
    ])
    assert summary["rows"] == 6
    assert summary["labels"] == {"covid": 0, "viral": 3, "bacterial": 1, "normal": 2}
    assert summary["dropped"] == {"duplicate file (same SHA-1)": 1, "file name matches no class": 1,
                                  "label disagrees with folder": 2, "unreadable image file": 1}


# --- COVID-19 Radiography Database -------------------------------------------------------------

def test_radiography_newer_layout(data_dir, films, tmp_path):
    root = tmp_path / "COVID-19_Radiography_Dataset"
    for i, (folder, stem) in enumerate([("COVID", "COVID-1"), ("Normal", "Normal-1"),
                                        ("Viral Pneumonia", "Viral Pneumonia-1"), ("Lung_Opacity", "Lung_Opacity-1")]):
        _copy(films[i], root / folder / "images" / f"{stem}.png")
        _copy(films[i + 4], root / folder / "masks" / f"{stem}.png")
        (root / f"{folder}.metadata.xlsx").write_bytes(b"PK\x03\x04 not read")
    (root / "README.md.txt").write_text("COVID-19 Radiography Database")
    out = tmp_path / "manifests" / "radiography.csv"
    summary = radiography.build_manifest(root, out)
    base = "../COVID-19_Radiography_Dataset/"
    _check(out, [
        (base + "COVID/images/COVID-1.png", "covid", "radiography-COVID-1", "", films[0]),
        (base + "Normal/images/Normal-1.png", "normal", "radiography-Normal-1", "", films[1]),
        (base + "Viral Pneumonia/images/Viral Pneumonia-1.png", "viral", "radiography-Viral Pneumonia-1", "", films[2]),
    ])
    assert summary["rows"] == 3
    assert summary["labels"] == {"covid": 1, "viral": 1, "bacterial": 0, "normal": 1}
    assert summary["dropped"] == {"Lung_Opacity (not one of the four classes)": 1}
    assert "cannot prevent patient leakage" in summary["warning"]


def test_radiography_older_layout_cli(data_dir, films, tmp_path, capsys):
    root = tmp_path / "COVID-19 Radiography Database"
    _copy(films[0], root / "COVID-19" / "COVID-19(1).png")
    _copy(films[1], root / "NORMAL" / "NORMAL(1).png")
    _copy(films[2], root / "Viral Pneumonia" / "Viral Pneumonia (1).png")
    (root / "NORMAL" / "NORMAL(2).png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _copy(films[3], root / "stray.png")  # in no class folder
    out = root / "manifest.csv"
    radiography.main([str(root), "--out", str(out)])
    summary = json.loads(capsys.readouterr().out)
    _check(out, [
        ("COVID-19/COVID-19(1).png", "covid", "radiography-COVID-19(1)", "", films[0]),
        ("NORMAL/NORMAL(1).png", "normal", "radiography-NORMAL(1)", "", films[1]),
        ("Viral Pneumonia/Viral Pneumonia (1).png", "viral", "radiography-Viral Pneumonia (1)", "", films[2]),
    ])
    assert summary["dropped"] == {"not in a class folder": 1, "unreadable image file": 1}
    assert summary["labels"] == {"covid": 1, "viral": 1, "bacterial": 0, "normal": 1}
    assert "no patient ids" in summary["warning"]
    assert {r["source"] for r in read_manifest(out)} == {"radiography"}


def test_radiography_empty_root_writes_nothing(tmp_path):
    (tmp_path / "Lung_Opacity").mkdir()
    with pytest.raises(SystemExit, match="no radiography images"):
        radiography.main([str(tmp_path), "--out", str(tmp_path / "m.csv")])
    assert not (tmp_path / "m.csv").exists()


def test_image_size_swaps_for_exif_rotation(data_dir, films, tmp_path):
    from PIL import Image

    film = next(p for p in films if _size(p)[0] != _size(p)[1])
    with Image.open(film) as im:
        width, height = im.size
        exif = im.getexif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise on display
        im.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert image_size(tmp_path / "rotated.jpg") == (height, width)
