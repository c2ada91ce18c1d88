"""The interactive search's file opening, without a terminal."""

from shoal.cluster.interactive import line_of, open_command


def test_line_of_a_character_offset(tmp_path):
    p = tmp_path / "notes.md"
    text = "one\ntwo\n\nfour has the passage\nfive\n"
    p.write_text(text, encoding="utf-8")
    assert line_of(str(p), "markdown", 0) == 1
    assert line_of(str(p), "markdown", text.index("passage")) == 4
    assert line_of(str(p), "pdf", 10) is None  # PDF offsets are into extracted text, not lines
    assert line_of(str(tmp_path / "gone.txt"), "text", 3) is None


def test_open_command_prefers_editor_then_pager():
    assert open_command("/d/a.txt", 7, {"EDITOR": "vim"}) == ["vim", "+7", "/d/a.txt"]
    assert open_command("/d/a.txt", 7, {"EDITOR": "code --wait"}) == ["code", "--wait", "+7", "/d/a.txt"]
    assert open_command("/d/a.txt", 7, {"PAGER": "less -R"}) == ["less", "-R", "+7", "/d/a.txt"]
    assert open_command("/d/a.pdf", None, {}) == ["less", "/d/a.pdf"]
