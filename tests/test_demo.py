"""`make demo`: the figure's columns are the contact sheet's (vanilla | personalized | stage 1 |
Layout-and-Retouch), the stage-1 column is the layout the method's own run used, and the
command ends by naming the figure and saying what it shows."""
import numpy as np

from lr_tutorial import cli, demo
from lr_tutorial.toy import contact


def test_demo_draws_the_contact_sheet_columns_from_one_method_run(tmp_path, monkeypatch):
    from lr_tutorial import pipeline
    drawn, runs = {}, []
    draw, call = contact.draw, pipeline.LayoutAndRetouch.__call__

    def spy_draw(columns, prompts, path):
        drawn.update(columns=columns, prompts=list(prompts))
        return draw(columns, prompts, path)

    def spy_call(self, *a, **k):
        runs.append(call(self, *a, **k))
        return runs[-1]
    monkeypatch.setattr(contact, "draw", spy_draw)
    monkeypatch.setattr(pipeline.LayoutAndRetouch, "__call__", spy_call)
    out = demo.run(tmp_path / "demo", steps=2, progress=False)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["final_images.npy", "intermediates.png",
                                                    demo.FIGURE]
    columns = drawn["columns"]
    assert set(columns) == set(contact.COLUMNS)
    assert drawn["prompts"] == demo.DEMO_PROMPTS
    assert len(runs) == 1  # one Layout-and-Retouch run gives both of the method's columns
    assert np.array_equal(columns["stage 1"], runs[0].layout.images)
    assert np.array_equal(columns["Layout-and-Retouch"], runs[0].images)
    assert all(len(columns[c]) == len(demo.DEMO_PROMPTS) for c in contact.COLUMNS)


def test_the_demo_command_ends_by_naming_its_figure_and_what_it_shows(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "run", lambda out, overwrite=False: out)
    assert cli.main(["demo", "--out", str(tmp_path / "d")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2] == f"figure: {tmp_path / 'd' / demo.FIGURE}"
    assert all(w in lines[-1] for w in ("vanilla", "personalized", "stage 1", "Layout-and-Retouch",
                                        "oracle"))
