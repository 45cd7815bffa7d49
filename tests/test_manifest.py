"""Strict manifest reading (patchflannel.manifest) and any-name pack columns (patchflannel.store)."""
from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest

from patchflannel.errors import DataNotFoundError, PatchflannelError
from patchflannel.manifest import ManifestError, ManifestRow, read_inputs_manifest
from patchflannel.store import H5MaskedDataset, column_keys, pack_npz_files, write_masked_npz


def write(tmp_path, data: bytes | str, name: str = "manifest.csv"):
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def refused(path, line, *words, **kwargs) -> ManifestError:
    """Reading ``path`` raises a ManifestError naming the file, ``line`` and each of ``words``."""
    with pytest.raises(ManifestError) as info:
        read_inputs_manifest(path, **kwargs)
    err = info.value
    assert isinstance(err, PatchflannelError) and isinstance(err, ValueError)
    assert err.line == line and err.path == str(path)
    msg = str(err)
    assert msg.startswith(str(path) if line is None else f"{path}, line {line}: "), msg
    for w in words:
        assert w in msg, msg
    assert err.hint and err.hint in msg  # every refusal says what to do
    return err


GOOD = [ManifestRow(2, "images/a.png", {"label": "covid", "patient_id": "p1"}),
        ManifestRow(3, "images/b.png", {"label": "normal", "patient_id": "p2"})]
GOOD_TEXT = "image,label,patient_id\nimages/a.png,covid,p1\nimages/b.png,normal,p2\n"


def test_plain_manifest(tmp_path):
    assert read_inputs_manifest(write(tmp_path, GOOD_TEXT)) == GOOD


@pytest.mark.parametrize("data", [
    b"\xef\xbb\xbf" + GOOD_TEXT.encode(),  # UTF-8 BOM (Excel "CSV UTF-8")
    GOOD_TEXT.replace("\n", "\r\n").encode(),  # CRLF
    b"\xef\xbb\xbf" + GOOD_TEXT.replace("\n", "\r\n").encode(),
    GOOD_TEXT.replace("\n", "\r").encode(),  # old Mac
    GOOD_TEXT.rstrip("\n").encode(),  # no final newline
    GOOD_TEXT.replace("\n", "\r\n", 1).encode(),  # mixed
])
def test_bom_and_line_endings(tmp_path, data):
    assert read_inputs_manifest(write(tmp_path, data)) == GOOD


def test_blank_rows_skipped_and_line_numbers_kept(tmp_path):
    path = write(tmp_path, "\n image , label\n\na.png,\"x\ny\"\n,,\n   \nb.png,z\n")
    assert read_inputs_manifest(path) == [ManifestRow(4, "a.png", {"label": "x\ny"}), ManifestRow(8, "b.png", {"label": "z"})]


def test_quoted_commas_unicode_and_verbatim_values(tmp_path):
    path = write(tmp_path, 'image,label,note\n" a,b.png ",covid,"say ""hi"", ok "\nnaïve/é.png,normal,\n')
    assert read_inputs_manifest(path) == [ManifestRow(2, "a,b.png", {"label": "covid", "note": 'say "hi", ok '}),
                                          ManifestRow(3, "naïve/é.png", {"label": "normal", "note": ""})]


def test_other_path_column(tmp_path):
    path = write(tmp_path, "file,label\na.png,x\n")
    assert read_inputs_manifest(path, "file") == [ManifestRow(2, "a.png", {"label": "x"})]


def test_latin1_refused_with_line(tmp_path):
    path = write(tmp_path, "image,label\na.png,x\nna\xefve.png,y\n".encode("latin-1"))
    err = refused(path, 3, "not valid UTF-8", "byte ef", "Latin-1", "iconv")
    assert err.__cause__ is None and err.__suppress_context__


def test_utf16_refused(tmp_path):
    refused(write(tmp_path, GOOD_TEXT.encode("utf-16")), None, "UTF-16", "UTF-8")
    refused(write(tmp_path, GOOD_TEXT.encode("utf-16-le")), 1, "NUL", "UTF-16")


def test_nul_byte_refused(tmp_path):
    refused(write(tmp_path, b"image,label\na.png,x\nb.png,y\x00\n"), 3, "NUL byte")


def test_trailing_comma_refused(tmp_path):
    path = write(tmp_path, "image,label\na.png,x\nb.png,y,\n")
    refused(path, 3, "3 fields", "header (line 1) has 2", "trailing comma")


def test_unquoted_comma_refused(tmp_path):
    refused(write(tmp_path, "image,label\na.png,viral,bacterial\n"), 2, "3 fields", "quote")


def test_short_row_refused(tmp_path):
    path = write(tmp_path, "image,label,patient_id\na.png,x,p1\nb.png,y\n")
    refused(path, 3, "2 fields", "has 3", "add the missing fields")


def test_single_field_short_row_refused(tmp_path):
    refused(write(tmp_path, "image,label\na.png,x\nb.png\n"), 3, "1 fields")


@pytest.mark.parametrize("header,words", [
    ("image,,label", ["column 2", "no name"]),
    ("image,label,", ["column 3", "no name"]),  # trailing comma in the header
    ("image, ,label", ["column 2", "no name"]),
    ("image,label,label", ["'label' appears twice", "columns 2 and 3"]),
    ("image,label, label ", ["'label' appears twice"]),
    ("image,image", ["'image' appears twice"]),
])
def test_bad_header_refused(tmp_path, header, words):
    path = write(tmp_path, f"{header}\na.png,x,y\n")
    refused(path, 1, *words, "name")


def test_slash_and_odd_column_names_read(tmp_path):
    path = write(tmp_path, "image,a/b,.,naïve,mask,input\na.png,1,2,3,4,5\n")
    assert read_inputs_manifest(path) == [
        ManifestRow(2, "a.png", {"a/b": "1", ".": "2", "naïve": "3", "mask": "4", "input": "5"})]


def test_reserved_column_refused(tmp_path):
    path = write(tmp_path, "image,label,input\na.png,x,y\n")
    refused(path, 1, "'input' is reserved", "rename", reserved=("input",))
    assert read_inputs_manifest(path)[0].columns == {"label": "x", "input": "y"}
    assert read_inputs_manifest(path, "input", reserved=("input",))[0].path == "y"  # the path column may use it


def test_missing_path_column(tmp_path):
    refused(write(tmp_path, "file,label\na.png,x\n"), 1, "no 'image' column", "['file', 'label']")
    refused(write(tmp_path, "Image,label\na.png,x\n"), 1, "did you mean 'Image'")
    refused(write(tmp_path, "image;label\na.png;x\n"), 1, "';'-separated")
    refused(write(tmp_path, "image\tlabel\na.png\tx\n"), 1, "tab-separated")


def test_bom_header_not_missing(tmp_path):
    # the probe's case: the BOM glued to the first name made 'image' "missing"
    rows = read_inputs_manifest(write(tmp_path, b"\xef\xbb\xbfimage\r\na.png\r\n"))
    assert rows == [ManifestRow(2, "a.png", {})]


@pytest.mark.parametrize("row", ["  ,x", '"",x', '" ",x'])
def test_empty_path_cell_refused(tmp_path, row):
    refused(write(tmp_path, f"image,label\na.png,x\n{row}\n"), 3, "'image' cell is empty")


def test_duplicate_path_refused(tmp_path):
    refused(write(tmp_path, "image,label\na.png,x\nb.png,y\n./a.png,z\n"), 4, "already listed on line 2")


def test_header_only(tmp_path):
    for text in ("image,label\n", "image,label", "\ufeffimage,label\r\n\r\n,\r\n"):
        path = write(tmp_path, text)
        refused(path, 1, "no data rows")
        assert read_inputs_manifest(path, allow_empty=True) == []


@pytest.mark.parametrize("data", [b"", b"\xef\xbb\xbf", b"\n\n", b"\r\n  \r\n", b",,\n"])
def test_empty_file(tmp_path, data):
    refused(write(tmp_path, data), None, "the file is empty", "header")


def test_missing_file(tmp_path):
    with pytest.raises(DataNotFoundError, match="manifest not found"):
        read_inputs_manifest(tmp_path / "nope.csv")
    with pytest.raises(DataNotFoundError):
        read_inputs_manifest(tmp_path)  # a folder


def test_unclosed_quote_refused(tmp_path):
    refused(write(tmp_path, 'image,label\na.png,x\n"b.png,y\nc.png,z\n'), 3, "never closed")


def test_text_after_closing_quote_refused(tmp_path):
    refused(write(tmp_path, 'image,label\na.png,"x"y\n'), 2, "malformed CSV")


def test_huge_line_refused(tmp_path):
    path = write(tmp_path, "image,label\na.png,x\n" + "b" * (csv.field_size_limit() + 10) + ".png,y\n")
    refused(path, 3, "longer than", "characters")


def test_long_line_under_limit_read(tmp_path):
    long = "d/" * 20000 + "x.png"
    assert read_inputs_manifest(write(tmp_path, f"image,label\n{long},y\n"))[0].path == long


def test_real_manifest_reads():
    from pathlib import Path

    manifest = Path("/work/shared/data/cxr4/manifest.csv")
    if not manifest.is_file():
        pytest.skip("shared data not mounted")
    rows = read_inputs_manifest(manifest)
    with open(manifest, newline="") as f:
        expected = list(csv.DictReader(f))
    assert [r.path for r in rows] == [e["image"] for e in expected]
    assert [r.columns for r in rows] == [{k: v for k, v in e.items() if k != "image"} for e in expected]


# --- HDF5 packs with any column names -------------------------------------------------------

def tiny_npz(tmp_path, n=3, size=8):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i}.npz"
        write_masked_npz(p, working_image=rng.integers(0, 255, (size, size), dtype=np.uint8),
                         working_mask=rng.random((size, size)) > 0.5, orig_shape=(16, 12),
                         content_box=(0, 1, 8, 7), scale=0.5, segmenter="test", preprocess={"a": 1},
                         source=f"src{i}.png")
        paths.append(p)
    return paths


ODD_COLUMNS = ["", "a/b", "image", "naïve", ".", "..", "/", "a//b/", "mask", "masked_image", "input",
               "columns", "column_names", "npz", "c0000_", "x" * 5000, "nul\x00name", "label", "Label"]


def test_pack_stores_any_column_name(tmp_path):
    paths = tiny_npz(tmp_path)
    columns = {name: [f"{j}-{i}" for i in range(3)] for j, name in enumerate(ODD_COLUMNS)}
    pack_npz_files(paths, tmp_path / "pack.h5", columns)
    ds = H5MaskedDataset(tmp_path / "pack.h5")
    assert list(ds.columns) == ODD_COLUMNS  # original names, in the given order
    assert ds.columns == columns
    item = ds[1]
    z = np.load(paths[1])
    np.testing.assert_array_equal(item["masked_image"], z["masked_image"])  # not replaced by the column
    np.testing.assert_array_equal(item["mask"], z["mask"])
    assert item[""] == "0-1" and item["a/b"] == "1-1" and item["image"] == "2-1" and item["naïve"] == "3-1"
    assert ds.row(1) == {name: values[1] for name, values in columns.items()}
    with h5py.File(tmp_path / "pack.h5", "r") as h5:  # plain names stay readable with h5ls / h5py
        assert "label" in h5["columns"] and "Label" in h5["columns"]
        assert all(isinstance(h5["columns"][k], h5py.Dataset) for k in h5["columns"])
        assert len(h5["columns"]) == len(ODD_COLUMNS)


def test_pack_reads_in_dataloader_workers(tmp_path):
    torch = pytest.importorskip("torch")
    paths = tiny_npz(tmp_path, n=4)
    pack_npz_files(paths, tmp_path / "pack.h5", {"": list("abcd"), "a/b": list("efgh"), "mask": list("ijkl")})
    loader = torch.utils.data.DataLoader(H5MaskedDataset(tmp_path / "pack.h5"), batch_size=2, num_workers=2)
    batches = list(loader)
    assert [v for b in batches for v in b[""]] == list("abcd")
    assert [v for b in batches for v in b["a/b"]] == list("efgh")
    assert batches[0]["mask"].dtype == torch.bool


def test_column_keys_unique_and_safe():
    names = ODD_COLUMNS + ["c0001_a_b", "a_b", "a-b", "a.b", "é", "e"]
    keys = column_keys(names)
    assert len(set(keys.values())) == len(names)
    for k in keys.values():
        assert k and "/" not in k and k not in (".", "..") and k.isascii() and len(k) <= 64
    assert keys["label"] == "label" and keys["Label"] == "Label" and keys["a-b"] == "a-b"
    assert keys[""].startswith("c") and keys["c0001_a_b"] != "c0001_a_b"  # a plain name can't take a made-up key


def test_pack_refuses_bad_columns(tmp_path):
    paths = tiny_npz(tmp_path, n=2)
    with pytest.raises(ValueError, match="column names must be strings"):
        pack_npz_files(paths, tmp_path / "p.h5", {None: ["a", "b"]})
    with pytest.raises(ValueError, match="NUL"):
        pack_npz_files(paths, tmp_path / "p.h5", {"x": ["a", "b\x00"]})
    with pytest.raises(ValueError, match="2 files"):
        pack_npz_files(paths, tmp_path / "p.h5", {"x": ["a"]})
    assert not (tmp_path / "p.h5").exists()


def test_old_packs_still_read(tmp_path):
    """Packs written before ``column_names``: columns under their plain names, '/' nesting."""
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("masked_image", data=np.zeros((2, 4, 4), np.uint8))
        h5.create_dataset("mask", data=np.ones((2, 4, 4), bool))
        h5.create_dataset("orig_shape", data=np.full((2, 2), 4))
        h5.create_dataset("content_box", data=np.zeros((2, 4), np.int64))
        str_dtype = h5py.string_dtype()
        for name, values in {"input": ["a", "b"], "label": ["covid", "normal"], "x/y": ["1", "2"]}.items():
            h5.create_dataset(f"columns/{name}", data=np.asarray(values, dtype=object), dtype=str_dtype)
    ds = H5MaskedDataset(path)
    assert ds.columns == {"input": ["a", "b"], "label": ["covid", "normal"], "x/y": ["1", "2"]}
    assert ds[1]["label"] == "normal" and ds[1]["x/y"] == "2" and ds[1]["mask"].all()


def test_pack_without_columns(tmp_path):
    paths = tiny_npz(tmp_path, n=2)
    pack_npz_files(paths, tmp_path / "p.h5")
    ds = H5MaskedDataset(tmp_path / "p.h5")
    assert ds.columns == {} and len(ds) == 2 and set(ds[0]) == {"masked_image", "mask", "orig_shape", "content_box"}
    with h5py.File(tmp_path / "p.h5", "r") as h5:
        assert json.loads(h5["column_names"][()]) == []


def test_manifest_rows_to_pack_round_trip(tmp_path):
    """A manifest with awkward names -> read -> pack -> read back unchanged."""
    path = write(tmp_path, "\ufeffimage,,a/b,mask\r\nimg0.png,1,2,3\r\nimg1.png,4,5,6\r\n")
    with pytest.raises(ManifestError):  # the empty header name is refused at the manifest
        read_inputs_manifest(path)
    path = write(tmp_path, "\ufeffimage,a/b,mask,naïve\r\nimg0.png,1,2,3\r\nimg1.png,4,5,6\r\n")
    rows = read_inputs_manifest(path)
    names = list(rows[0].columns)
    pack_npz_files(tiny_npz(tmp_path, n=2), tmp_path / "p.h5", {k: [r.columns[k] for r in rows] for k in names})
    ds = H5MaskedDataset(tmp_path / "p.h5")
    assert ds.columns == {"a/b": ["1", "4"], "mask": ["2", "5"], "naïve": ["3", "6"]}
