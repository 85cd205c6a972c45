"""Entry names every platform's extractor can create: one table per rule of the policy in
zipmiddleware/names.py, then properties over random names (the rules hold of every output, and
the fast ``planning.arcnames`` gives exactly the name table's names)."""

from __future__ import annotations

import os
import subprocess
import sys
import unicodedata

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from zipmiddleware import planning
from zipmiddleware.names import _DEVICES, NameTable, plain_names, safe_arcname
from zipmiddleware.planning import _utf8, arcnames

from .servers import PROJECT

NFD_E = "e\u0301"  # "é" decomposed, as macOS hands it out
NFC_E = "\u00e9"


def rule_table(cases: list[tuple[str, str, str]]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(
        ("given", "safe"), [(g, s) for _, g, s in cases], ids=[i for i, _, _ in cases]
    )


# -- one table per rule -------------------------------------------------------------------------

NFC_CASES = [
    ("nfd-leaf", f"caf{NFD_E}.txt", f"caf{NFC_E}.txt"),
    ("nfd-folder", f"Pok{NFD_E}mon/save.dat", f"Pok{NFC_E}mon/save.dat"),
    ("nfc-unchanged", f"caf{NFC_E}.txt", f"caf{NFC_E}.txt"),
    ("angstrom-sign", "\u212b.txt", "\u00c5.txt"),  # a canonical singleton
    ("hangul-jamo", "\u1100\u1161.txt", "\uac00.txt"),
    ("japanese-dakuten", "\u30cf\u309a\u30c3\u30af", "\u30d1\u30c3\u30af"),  # パック from ハ+゚
    ("no-compatibility-folding", "\ufb01le \u00b9.txt", "\ufb01le \u00b9.txt"),  # NFC, not NFKC
]

FORBIDDEN_CASES = [(f"forbidden-{hex(ord(c))}", f"x/a{c}b.txt", "x/a_b.txt") for c in '<>:"|?*'] + [
    ("first-component-not-a-drive", "ab:c", "ab_c"),
    ("all-forbidden", 'x/<>:"|?*', "x/_______"),
    ("colon-later-component", "ok/C:x", "ok/C_x"),
    ("drive-still-dropped", "C:evil/x", "evil/x"),
    ("drive-then-space", "C: x/y", "x/y"),
    ("drive-after-dropped-parts", "./C:x", "x"),
    ("stream-name", "file.txt:secret", "file.txt_secret"),
    ("backslash-separates", "a\\b\\c.txt", "a/b/c.txt"),
    ("composed-not-less-than", "\u226e.txt", "\u226e.txt"),  # "≮" holds no "<"
    ("decomposed-not-less-than", "<\u0338.txt", "\u226e.txt"),
]

TRAILING_CASES = [
    ("trailing-dot", "readme.", "readme"),
    ("trailing-dots", "readme...", "readme"),
    ("trailing-space-dot-mix", "readme . .", "readme"),
    ("folder-trailing-dot", "v1./notes.txt", "v1/notes.txt"),
    ("folder-trailing-space", "v1 /notes.txt", "v1/notes.txt"),
    ("only-dots", "x/.../y", "x/_/y"),
    ("only-dots-leaf", "x/....", "x/_"),
    ("dot-space-dot", "x/. ./y", "x/_/y"),
    ("only-dots-alone", "...", "_"),
    ("dot-dropped", "x/./y", "x/y"),
    ("dotdot-dropped", "x/../y", "x/y"),
    ("spaced-dotdot-dropped", "x/ .. /y", "x/y"),
    ("leading-dots-kept", "..a", "..a"),
    ("dotfile-kept", ".profile", ".profile"),
    ("inner-dots-kept", "a.b.c", "a.b.c"),
    ("forbidden-then-dot", "a?.", "a_"),
    ("ideographic-space-before-dot", "a\u3000.", "a"),
]

DEVICE_CASES = [
    ("con", "CON", "CON_"),
    ("con-lower", "con", "con_"),
    ("con-ext", "CON.txt", "CON_.txt"),
    ("con-mixed-case", "cOn.TxT", "cOn_.TxT"),
    ("nul-double-ext", "nul.tar.gz", "nul_.tar.gz"),
    ("com1-double-ext", "Com1.tar.gz", "Com1_.tar.gz"),
    ("prn", "prn.log", "prn_.log"),
    ("aux", "AUX", "AUX_"),
    ("com9", "com9", "com9_"),
    ("lpt1", "LPT1.bin", "LPT1_.bin"),
    ("lpt9", "lpt9", "lpt9_"),
    ("com-superscript-1", "COM\u00b9", "COM\u00b9_"),
    ("com-superscript-2", "com\u00b2.txt", "com\u00b2_.txt"),
    ("lpt-superscript-3", "LPT\u00b3.x", "LPT\u00b3_.x"),
    ("conin", "CONIN$", "CONIN$_"),
    ("conout-ext", "conout$.log", "conout$_.log"),
    ("dotless-i-conin", "con\u0131n$", "con\u0131n$_"),  # upper case: CONIN$
    ("device-then-spaces", "CON  .txt", "CON  _.txt"),
    ("device-trailing-dot", "CON.", "CON_"),
    ("device-trailing-space", "nul ", "nul_"),
    ("device-folder", "con/readme.txt", "con_/readme.txt"),
    ("device-deep-folder", "a/AUX/b", "a/AUX_/b"),
    ("not-com10", "COM10", "COM10"),
    ("not-com0", "COM0.txt", "COM0.txt"),
    ("not-lpt0", "lpt0", "lpt0"),
    ("not-console", "CONSOLE.txt", "CONSOLE.txt"),
    ("not-null", "NULL.txt", "NULL.txt"),
    ("not-suffix", "falcon.txt", "falcon.txt"),
    ("not-extension", "readme.con", "readme.con"),
    ("not-after-dotfile", ".con", ".con"),
    ("not-with-colon", "AUX:", "AUX_"),
    ("not-fullwidth", "\uff23\uff2f\uff2e", "\uff23\uff2f\uff2e"),
]


@rule_table(NFC_CASES)
def test_names_are_nfc(given: str, safe: str) -> None:
    assert safe_arcname(given) == safe


@rule_table(FORBIDDEN_CASES)
def test_characters_windows_forbids_become_underscores(given: str, safe: str) -> None:
    assert safe_arcname(given) == safe


@rule_table(TRAILING_CASES)
def test_no_component_ends_in_a_dot_or_a_space(given: str, safe: str) -> None:
    assert safe_arcname(given) == safe


@rule_table(DEVICE_CASES)
def test_no_component_is_a_windows_device(given: str, safe: str) -> None:
    assert safe_arcname(given) == safe


@pytest.mark.parametrize(
    ("given", "names"),
    [
        ([f"caf{NFD_E}.txt", f"caf{NFC_E}.txt"], [f"caf{NFC_E}.txt", f"caf{NFC_E} (1).txt"]),
        ([f"CAF{NFD_E.upper()}.txt", f"caf{NFC_E}.txt"], ["CAF\u00c9.txt", f"caf{NFC_E} (1).txt"]),
        ([f"Pok{NFD_E}mon/a", f"pok{NFC_E}mon/A"], [f"Pok{NFC_E}mon/a", f"pok{NFC_E}mon/A (1)"]),
        (["readme.", "readme"], ["readme", "readme (1)"]),
        (["CON", "CON_", "con_ (1)"], ["CON_", "CON_ (1)", "con_ (1) (1)"]),
        (["con.txt", "CON_.TXT"], ["con_.txt", "CON_ (1).TXT"]),
        (["d/a:b", "d/a_b", "d/a|b"], ["d/a_b", "d/a_b (1)", "d/a_b (2)"]),
        (["x/...", "x/_", "x/. ."], ["x/_", "x/_ (1)", "x/_ (2)"]),
        (["v1./a", "v1/a", "V1 /a"], ["v1/a", "v1/a (1)", "V1/a (2)"]),
        (["dd:", "dd_/x"], ["dd_", "dd_ (1)/x"]),  # the file named as the folder
        (["\u0390", "\u03aa\u0301"], ["\u0390", "\u03aa\u0301 (1)"]),  # the same ignoring case, canonically
        (["Stra\u00dfe", "STRASSE"], ["Stra\u00dfe", "STRASSE (1)"]),
    ],
    ids=[
        "nfd-nfc", "nfd-nfc-case", "nfd-folder", "trailing-dot", "device", "device-ext", "forbidden",
        "only-dots", "folder-trailing", "file-as-folder", "canonical-caseless", "full-case-folding",
    ],
)  # fmt: skip
def test_clashes_made_by_the_rules_are_numbered(given: list[str], names: list[str]) -> None:
    table = NameTable()
    assert [table.add(safe_arcname(name)) for name in given] == names
    assert arcnames(given) == names


@pytest.mark.parametrize("device", sorted(_DEVICES))
def test_every_device_name_is_renamed_in_any_case(device: str) -> None:
    for variant in {device, device.lower(), device.title()}:
        for name in [variant, f"{variant}.txt", f"{variant} .x.y", f"d/{variant}/e"]:
            assert safe_arcname(name) != name and not plain_names([name])
        assert safe_arcname(f"{variant}x.txt") == f"{variant}x.txt"  # a longer name is no device


def test_names_are_the_same_on_every_host() -> None:
    """Nothing hangs on hash order: two interpreters with other hash seeds give the same names."""
    script = (
        "from zipmiddleware.planning import arcnames\n"
        "rels = ['CON', 'CON_', 'a.', 'A', 'e\\u0301', '\\u00e9', 'x:y', 'x_y', 'd', 'D/x', 'n.', 'N/y'] * 3\n"
        "print(arcnames(rels))\n"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(PROJECT)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outputs) == 1


# -- properties over random names ---------------------------------------------------------------

# Pieces that each touch a rule (or nearly do), put together into components and paths.
PIECES = [
    "a", "A", "b.txt", "B.TXT", "x", "a (1)", ".profile", "SS", "\u00df", "\u0131", "\u0130",
    NFC_E, NFD_E, "\u00c9", "E\u0301", "\u212b", "\u00c5", "\u0390", "\u03aa\u0301", "\u1fb3", "\u0345",
    "\u226e", "<\u0338", "\u00a0", "\u3000", "\ufb01", "\u00b9",
    "con", "CON", "Con.txt", "nul.tar.gz", "com1", "COM\u00b9", "lpt\u00b3.x", "conin$", "CONOUT$",
    "con\u0131n$", "com0", "com10", "CON_", "aux ",
    ".", "..", "...", " ", " sp ", ".x", "x.", "x. .", "\t", "\n", "\x00", "\x7f", "\x85",
    "C:", "c:x", ":", "<", ">", '"', "|", "?", "*", "\\", "x\\y",
    "\u202e", "\u200b", "\u200d", "\ufeff", "\ufffe", "\U000e0041", "\x9b",
    "\udce9", "\udcff", "\udcc3\udca9",
]  # fmt: skip
COMPONENT = st.lists(st.sampled_from(PIECES), min_size=1, max_size=3).map("".join) | st.text(max_size=6)
WEIRD = st.lists(COMPONENT, min_size=1, max_size=4).map("/".join)
# Plain names, in few folders and with clashes ignoring case, so that chunks pass the quick check.
PLAIN = st.builds(
    "{}/{}{}".format,
    st.sampled_from(["d", "D", "d/e", "Data", "x", "x/d"]),
    st.sampled_from(["f", "F", "level_", "con", "d", "e"]),
    st.sampled_from(["", "1", ".txt", ".TXT", ".pak"]),
)
RELS = st.lists(st.one_of(PLAIN, PLAIN, PLAIN, WEIRD), max_size=80)


def _components(name: str) -> list[str]:
    return name.split("/")


@given(WEIRD)
@example("C:")
@example("..")
@example(" . /  .. /...")
@example("\udcc3\udca9/e\u0301")
def test_every_safe_name_follows_every_rule(name: str) -> None:
    safe = safe_arcname(name)
    assert unicodedata.is_normalized("NFC", safe)
    assert not any(ord(c) < 0x20 or c in '<>:"|?*\\\x7f' for c in safe)
    assert not any(unicodedata.category(c) in ("Cc", "Cf") or ord(c) & 0xFFFE == 0xFFFE for c in safe)
    if safe:
        for part in _components(safe):
            assert part not in ("", ".", "..")
            assert part == part.strip() and not part.endswith(".")
            assert part.partition(".")[0].rstrip(" ").upper() not in _DEVICES
    assert safe_arcname(safe) == safe  # a safe name stays as it is


@given(st.lists(WEIRD | PLAIN, max_size=6))
def test_plain_names_are_left_as_they_are(names: list[str]) -> None:
    if plain_names(names):
        assert [safe_arcname(name) for name in names] == names and all(names)
    if all(name.isascii() for name in names):  # for ASCII, exactly those
        assert plain_names(names) == all(name and safe_arcname(name) == name for name in names)


@given(st.lists(WEIRD | PLAIN, max_size=6))
def test_keys_are_canonical_caseless(names: list[str]) -> None:
    names = [safe_arcname(name) for name in names]
    full = [unicodedata.normalize("NFC", unicodedata.normalize("NFD", name).casefold()) for name in names]
    assert [NameTable.key(name) for name in names] == full
    assert NameTable.keys(names) == full


@given(RELS, st.sampled_from([1, 2, 3, 5, 32]))
@example(["d/x"] * 40 + ["e" + NFD_E] + ["d/y"] * 3 + ["con"], 32)
def test_arcnames_are_the_name_tables(rels: list[str], chunk: int) -> None:
    saved, planning.PLAIN_CHUNK = planning.PLAIN_CHUNK, chunk
    try:
        fast = arcnames(rels)
    finally:
        planning.PLAIN_CHUNK = saved
    table = NameTable()
    assert fast == [table.add(safe_arcname(rel) or "_") for rel in rels]
    keys = NameTable.keys(fast)
    assert len(set(keys)) == len(keys)  # no two alike, ignoring case and normalization
    folders = {"/".join(key.split("/")[:i]) for key in keys for i in range(1, key.count("/") + 1)}
    assert folders.isdisjoint(keys)  # no file named as a folder
    for name in fast:  # the numbering keeps every rule
        assert safe_arcname(name) == name


@given(WEIRD, COMPONENT)
@example("C:", "d:x")
@example("..", "C:x")
@example("a", "..\\C:x")
def test_a_name_made_safe_within_its_safe_folder(folder: str, leaf: str) -> None:
    if all(_utf8(name) for name in (folder, leaf)):
        assert safe_arcname(leaf, within=safe_arcname(folder)) == safe_arcname(f"{folder}/{leaf}")
