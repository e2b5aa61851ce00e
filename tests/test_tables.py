"""The README's tables of figures are regenerated from bench/results/ (bench/tables.py); these tests
fail when a README table no longer matches its result files."""

from __future__ import annotations

import re

import pytest

from bench import tables


@pytest.fixture(scope="module")
def readme() -> str:
    return tables.README.read_text(encoding="utf-8")


def change_first_figure(body: str) -> str:
    """The table `body` with the first digit after the label of its first data row changed."""
    head, sep, *rows = body.split("\n")
    label, cells = rows[0].split(" | ", 1)
    row = label + " | " + re.sub(r"\d", lambda m: str((int(m[0]) + 1) % 10), cells, count=1)
    return "\n".join([head, sep, row, *rows[1:]])


def test_readme_tables_match_their_result_files(readme):
    assert tables.check(readme) == []
    assert set(tables.blocks(readme)) == set(tables.TABLES)


def test_check_names_each_table_whose_figure_changed(readme):
    for name, body in tables.blocks(readme).items():
        changed = readme.replace(body, change_first_figure(body), 1)
        assert changed != readme
        problems = tables.check(changed)
        assert len(problems) == 1 and problems[0].startswith(f"{name}:"), (name, problems)


def test_check_cli_exits_1_on_a_changed_figure(readme, tmp_path, capsys):
    body = tables.blocks(readme)["finetune_dist"]
    path = tmp_path / "README.md"
    path.write_text(readme.replace(body, body.replace("12,494", "12,495")), encoding="utf-8")
    assert tables.main(["--check", "--readme", str(path)]) == 1
    assert "finetune_dist: the README's table differs" in capsys.readouterr().err
    path.write_text(readme, encoding="utf-8")
    assert tables.main(["--check", "--readme", str(path)]) == 0


def test_write_restores_the_figures_and_nothing_else(readme, tmp_path):
    body = tables.blocks(readme)["loop"]
    stale = readme.replace(body, change_first_figure(body))
    path = tmp_path / "README.md"
    path.write_text(stale, encoding="utf-8")
    assert tables.main(["--write", "--readme", str(path)]) == 0
    assert path.read_text(encoding="utf-8") == readme


def test_missing_result_files_are_named(readme, tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    problems = tables.check(readme)
    assert len(problems) == len(tables.TABLES)
    assert "finetune_dist: result file bench/results/finetune_dist_gpu.json is missing" in problems
    assert tables.write(readme) == readme


def test_bad_markers_are_reported(readme):
    assert any("no function generates it" in p
               for p in tables.check(readme + "\n<!-- table: nosuch -->\n| a |\n|---|\n<!-- /table -->\n"))
    assert any(p.startswith("markers:") for p in tables.check(readme + "\n<!-- table: loop -->\n| a |\n"))
    body = tables.blocks(readme)["search"]
    unmarked = readme.replace(f"<!-- table: search -->\n{body}\n<!-- /table -->", body)
    assert tables.check(unmarked) == ["search: not marked in the README (<!-- table: search --> ... <!-- /table -->)"]


def test_figures_round_half_up_as_written():
    assert tables.num(0.6375) == "0.638"
    assert tables.num(280.5, 0) == "281"
    assert tables.num(53960.8, 0) == "53,961"
    assert tables.pct(0.0954) == "9.5%"
    assert tables.pct(0.552, 0) == "55%"
