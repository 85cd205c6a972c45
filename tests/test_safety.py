"""Nothing outside the roots, no unsafe entry names, nothing internal in responses."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from zipmiddleware import FileTarget, ZipEntry, ZipTarget
from zipmiddleware.names import NameTable, content_disposition, display_name, safe_arcname

from .conftest import read_zip


@pytest.mark.parametrize(
    ("given", "safe"),
    [
        ("../../etc/passwd", "etc/passwd"),
        ("/etc/passwd", "etc/passwd"),
        ("a/../../b", "a/b"),
        ("C:\\Windows\\system32\\x.dll", "Windows/system32/x.dll"),
        ("c:relative.txt", "relative.txt"),
        ("a\\..\\..\\b.txt", "a/b.txt"),
        ("./a/./b//c.txt", "a/b/c.txt"),
        ("nul\x00byte.txt", "nul_byte.txt"),
        ("line\nbreak.txt", "line_break.txt"),
        ("  spaced  /x", "spaced/x"),
        ("日本語/ゲーム.iso", "日本語/ゲーム.iso"),
        ("..", ""),
        # Invisible characters: a bidi override that would show this as "photoexe.jpg", C1
        # controls, zero-width ones (HFS+ ignores them), a BOM, non-characters. Spaces stay.
        ("photo\u202egpj.exe", "photo_gpj.exe"),
        ("next\x85line\x9b.txt", "next_line_.txt"),
        ("zero\u200bwidth\u200d\ufeff.txt", "zero_width__.txt"),
        ("no\ufffechar\ufdd0\U0010ffff", "no_char__"),
        ("\u202e/x", "_/x"),
        ("ideographic\u3000space\u00a0nbsp.txt", "ideographic\u3000space\u00a0nbsp.txt"),
    ],
)
def test_safe_arcname(given: str, safe: str) -> None:
    assert safe_arcname(given) == safe


def test_duplicates_are_renamed_case_insensitively() -> None:
    table = NameTable()
    added = [
        table.add(name) for name in ["a.txt", "A.TXT", "a.txt", "dir/x", "dir", "f", "f/g", ".rc", ".rc"]
    ]
    assert added == ["a.txt", "A (1).TXT", "a (2).txt", "dir/x", "dir (1)", "f", "f (1)/g", ".rc", ".rc (1)"]


def test_many_clashing_names_cost_a_few_lookups_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """6,000 names alike but for case once took 18 million lookups (45 s of a worker's CPU)."""
    table = NameTable()
    calls = 0
    taken = NameTable._taken

    def counting(self: NameTable, key: str) -> bool:
        nonlocal calls
        calls += 1
        return taken(self, key)

    monkeypatch.setattr(NameTable, "_taken", counting)
    names = [table.add("".join(c.upper() if i >> k & 1 else c for k, c in enumerate("abcdefghijklm")) + ".txt")
             for i in range(6000)]  # fmt: skip
    assert len({name.casefold() for name in names}) == 6000
    assert calls <= 3 * 6000


def test_non_utf8_disk_names_are_decoded_as_cp1252() -> None:
    assert display_name(os.fsdecode(b"caf\xe9.txt")) == "café.txt"
    assert display_name(os.fsdecode(b"\x81x")) == "\ufffdx"  # undefined in cp1252
    assert display_name("plain ü") == "plain ü"


def test_content_disposition_cannot_inject_headers() -> None:
    value = content_disposition('evil"\r\nSet-Cookie: x=1.zip')
    assert "\r" not in value and "\n" not in value
    assert value.startswith('attachment; filename="evil\\"__Set-Cookie: x=1.zip"')


def test_content_disposition_replaces_invisible_characters() -> None:
    value = content_disposition("photos\u202epiz.exe\u200b\x85")
    assert value == "attachment; filename=photos_piz.exe__; filename*=UTF-8''photos_piz.exe__"
    # Nothing left but an extension: no hidden file ".zip".
    assert content_disposition("\u202e.zip") == "attachment; filename=download.zip; filename*=UTF-8''_.zip"
    # A surrogate no file name holds (a resolver's own string) is no error.
    assert content_disposition("\ud800x.zip") == "attachment; filename=\"?x.zip\"; filename*=UTF-8''%3Fx.zip"
    assert safe_arcname("\ud800x/y") == "_x/y"


def test_given_paths_outside_roots_are_404(make_client, games: Path, tmp_path: Path) -> None:
    """Outside the roots is answered as not found: a 403 would tell which outside paths exist."""
    (games / "link-out").symlink_to(tmp_path / "secret.txt")
    client = make_client(lambda request, name: FileTarget(games / name), rule="/download/<path:name>")
    for name in ["..%2Fsecret.txt", "link-out"]:
        response = client.get(f"/download/{name}", status=404)
        assert "secret" not in response.text and str(tmp_path) not in response.text
    client = make_client(lambda request, name: FileTarget("/etc/passwd"))
    assert "root:" not in client.get("/download/x", status=404).text
    missing = make_client(lambda request, name: FileTarget("/etc/no-such-file-here"))
    assert missing.get("/download/x", status=404).text == client.get("/download/x", status=404).text


def test_entry_outside_roots_refuses_the_whole_zip(make_client, games: Path, tmp_path: Path) -> None:
    resolve = lambda request, name: ZipTarget(  # noqa: E731
        [ZipEntry("ok", path=games / "doom/doom.wad"), ZipEntry("leak", path=tmp_path / "secret.txt")]
    )
    assert make_client(resolve).get("/download/x", status=404)


def test_relative_paths_are_under_the_first_root(make_client) -> None:
    client = make_client(lambda request, name: FileTarget(name.replace("~", "/")))
    assert client.get("/download/doom~doom.wad").body.startswith(b"IWAD")
    client.get("/download/..~secret.txt", status=404)


def test_no_roots_means_no_paths(make_client, games: Path, caplog) -> None:
    client = make_client(lambda request, name: FileTarget(games / "doom/doom.wad"), roots=[])
    with caplog.at_level(logging.ERROR, logger="zipmiddleware"):
        client.get("/download/x", status=500)
    assert "no 'roots' configured" in caplog.text
    sources_only = make_client(lambda request, name: ZipTarget([ZipEntry("a", source=b"fine")]), roots=[])
    assert read_zip(sources_only.get("/download/x").body) == {"a": b"fine"}


def test_resolver_entry_names_are_made_safe_and_unique(make_client, caplog) -> None:
    """A resolver's own entry names go through the same rules as a folder's (checked in batches
    of plain names, the others one by one); a name with nothing left once made safe is a 500
    that names it in the log only."""
    given = [f"plain/{n:03d}.txt" for n in range(100)] + ["../../etc/passwd", "C:\\evil", "PLAIN/000.TXT"]
    entries = [ZipEntry(name, source=name.encode()) for name in given]
    client = make_client(lambda request, name: ZipTarget(entries))
    names = read_zip(client.get("/download/x").body)
    assert list(names)[100:] == ["etc/passwd", "evil", "PLAIN/000 (1).TXT"]
    assert list(names)[:100] == given[:100] and names["etc/passwd"] == b"../../etc/passwd"
    blank = make_client(lambda request, name: ZipTarget([*entries[:50], ZipEntry("../..", source=b"x")]))
    with caplog.at_level(logging.ERROR, logger="zipmiddleware"):
        answer = blank.get("/download/x", status=500)
    assert b"../.." not in answer.body
    assert "entry name '../..' is empty once made safe" in caplog.text


def test_walk_skips_symlinks_leaving_the_roots(make_client, games: Path, tmp_path: Path, caplog) -> None:
    quake = games / "quake"
    (quake / "passwd").symlink_to("/etc/passwd")
    (quake / "etc").symlink_to("/etc")
    (quake / "secret").symlink_to(tmp_path / "secret.txt")
    (quake / "id1" / "loop").symlink_to(quake)  # inside the root, but a loop
    (quake / "doom").symlink_to(games / "doom")  # inside the root: followed
    client = make_client(lambda request, name: ZipTarget.from_directory(games / name))
    with caplog.at_level(logging.WARNING, logger="zipmiddleware"):
        entries = read_zip(client.get("/download/quake").body)
    assert set(entries) == {"doom/doom.wad", "id1/config.cfg", "id1/pak0.pak", "quake.exe"}
    assert "resolves outside the roots" in caplog.text


def test_directory_symlinked_out_of_roots_is_404(make_client, games: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "a").write_bytes(b"a")
    (games / "outlink").symlink_to(tmp_path / "elsewhere")
    client = make_client(lambda request, name: ZipTarget.from_directory(games / name))
    client.get("/download/outlink", status=404)


def test_walk_with_unsafe_and_colliding_names(make_client, games: Path) -> None:
    folder = games / "names"
    folder.mkdir()
    for raw in [
        b"caf\xe9.txt",
        "café.txt".encode(),
        b"CAFE.txt",
        b"cafe.txt",
        b"back\\slash.txt",
        b"\xff\xfe.bin",
    ]:
        (folder / os.fsdecode(raw)).write_bytes(raw)
    client = make_client(lambda request, name: ZipTarget.from_directory(games / name))
    entries = read_zip(client.get("/download/names").body)
    assert sorted(entries) == sorted(
        ["CAFE.txt", "back/slash.txt", "café.txt", "café (1).txt", "cafe (1).txt", "ÿþ.bin"]
    )
    assert sorted(entries.values()) == sorted(os.fsencode(name) for name in os.listdir(folder))


def test_walk_gives_names_windows_and_macos_can_create(make_client, games: Path) -> None:
    """Names a Linux disk holds but Windows cannot create or macOS takes for another's, renamed
    (then numbered where that makes two alike), in the archive of the folder holding them."""
    folder = games / "odd"
    (folder / "CON").mkdir(parents=True)
    (folder / "Pok\u00e9mon.").mkdir()
    for rel in [
        "CON/save.dat",
        "CON_",
        "nul.tar.gz",
        "COM\u00b9.log",
        "notes.",
        "notes",
        "what?.txt",
        "what_.txt",
        "12:30 <draft>.txt",
        "caf\u00e9.txt",
        "cafe\u0301.txt",
        "Pok\u00e9mon./save.dat",
        "...",
        "photo\u202egpj.exe",
        "zero\u200bwidth.txt",
        "zero_width.txt",
    ]:
        (folder / rel).write_bytes(rel.encode())
    client = make_client(lambda request, name: ZipTarget.from_directory(games / name))
    entries = read_zip(client.get("/download/odd").body)
    # In walk order (sorted by path), each name made safe, then numbered if another took it.
    assert {name: body.decode() for name, body in entries.items()} == {
        "12_30 _draft_.txt": "12:30 <draft>.txt",
        "COM\u00b9_.log": "COM\u00b9.log",
        "CON_/save.dat": "CON/save.dat",
        "CON_ (1)": "CON_",
        "Pok\u00e9mon/save.dat": "Pok\u00e9mon./save.dat",
        "_": "...",
        "caf\u00e9.txt": "cafe\u0301.txt",
        "caf\u00e9 (1).txt": "caf\u00e9.txt",
        "notes": "notes",
        "notes (1)": "notes.",
        "nul_.tar.gz": "nul.tar.gz",
        "what_.txt": "what?.txt",
        "what_ (1).txt": "what_.txt",
        "photo_gpj.exe": "photo\u202egpj.exe",
        "zero_width.txt": "zero_width.txt",
        "zero_width (1).txt": "zero\u200bwidth.txt",
    }


def test_missing_entry_is_404_before_anything_is_sent(make_client, games: Path) -> None:
    resolve = lambda request, name: ZipTarget(
        [ZipEntry("a", path=games / "doom/doom.wad"), ZipEntry("b", path=name)]
    )  # noqa: E731
    response = make_client(resolve).get("/download/ghost.bin", status=404)
    assert "ghost" not in response.text


def test_special_files_are_not_served(make_client, games: Path) -> None:
    os.mkfifo(games / "pipe")
    client = make_client(lambda request, name: FileTarget(games / name))
    client.get("/download/pipe", status=404)  # and must not hang on open()
    client.get("/download/quake", status=404)  # a folder is not a file
